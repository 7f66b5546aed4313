"""CheXbert labeler: parity with transformers' BertModel + heads, real MiniLM-L6 weights,
WordPiece ids against transformers' BertTokenizer, and safe checkpoint loading.

Oracles: transformers' BertModel (eager attention), its pure-Python BertTokenizerLegacy
(the same algorithm as the BertTokenizer of transformers 2.5.1 that CheXbert used), and the
original's text and truncation rules written out below from CheXbert's
src/bert_tokenizer.py. transformers is used only here, never by mrgr1.
"""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mrgr1.chexbert import (BertConfig, BertEncoder, CheXbert, convert_to_safetensors, encode_reports,
                            read_checkpoint)
from mrgr1.labels import CONDITIONS, NO_FINDING

transformers = pytest.importorskip("transformers")
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # noqa: E402

REPORTS = [
    "No acute cardiopulmonary process.",
    "FINDINGS: Heart size is mildly enlarged.\n\nSmall left pleural effusion with adjacent atelectasis.\n"
    "IMPRESSION:  1. Possible early pneumonia in the right lower lobe.  2. ET tube 4 cm above the carina.",
    "",
    "   \n\t  ",
    "Interval removal of the right PICC line. No pneumothorax. Stable mediastinal contours; "
    "degenerative changes of the thoracic spine, old healed rib fractures (L 5th-7th).",
    "Pulmonary edema, moderate, improved since 12/03/2019 ... ? consolidation vs. atelectasis!!",
    "Café-au-lait naïve résumé: opacité rétrocardiaque. 中国医院",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3 + " hydropneumothorax",
    "The lungs are clear. " * 120,  # about 600 word pieces: cut to 512
]


def original_ids(tok: BertTokenizerLegacy, report: str) -> list[int]:
    """CheXbert's get_impressions_from_csv + tokenize, applied to one report."""
    text = report.strip().replace("\n", " ")
    text = re.sub(r"\s+", " ", text).strip()
    pieces = tok.tokenize(text)
    if not pieces:  # an empty report
        return [tok.cls_token_id, tok.sep_token_id]
    ids = [tok.cls_token_id] + tok.convert_tokens_to_ids(pieces) + [tok.sep_token_id]
    return ids[:511] + [tok.sep_token_id] if len(ids) > 512 else ids


@pytest.fixture(scope="module")
def vocab_path(minilm_dir):
    return os.path.join(minilm_dir, "vocab.txt")


@pytest.fixture(scope="module")
def legacy_tokenizer(vocab_path):
    return BertTokenizerLegacy(vocab_path)


# ----------------------------------------------------------------------------- an original-layout checkpoint

class OracleLabeler(nn.Module):
    """CheXbert's bert_labeler rebuilt on transformers' BertModel with random weights (eval: no dropout)."""

    def __init__(self, hidden=128, heads=2):
        super().__init__()
        cfg = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2,
                                      num_attention_heads=heads, intermediate_size=2 * hidden,
                                      max_position_embeddings=512, attn_implementation="eager")
        self.bert = transformers.BertModel(cfg)  # with its pooler, as in the release
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])
        self.eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> list[torch.Tensor]:
        cls_hidden = self.bert(torch.tensor([ids])).last_hidden_state[:, 0]
        return [h(cls_hidden)[0] for h in self.linear_heads]

    def save_like_release(self, path):
        """The layout of the public chexbert.pth: DataParallel keys, optimizer state, epoch."""
        sd = {"module." + k: v for k, v in self.state_dict().items()}
        torch.save({"model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 2e-5}]},
                    "epoch": 3}, path)


@pytest.fixture(scope="module")
def oracle_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    oracle = OracleLabeler()
    for head in oracle.linear_heads:  # larger head weights: labels vary across reports
        nn.init.normal_(head.weight, std=1.0)
    path = tmp_path_factory.mktemp("ckpt") / "chexbert.pth"
    oracle.save_like_release(path)
    return oracle, str(path)


def test_logits_and_labels_match_transformers_bert_with_heads(oracle_checkpoint, vocab_path, legacy_tokenizer):
    oracle, path = oracle_checkpoint
    model = CheXbert.from_pretrained(path, vocab_path)
    ours = model.logits(REPORTS, batch_size=4)  # sorted, padded batches
    assert [o.shape[1] for o in ours] == [4] * 13 + [2]
    for i, report in enumerate(REPORTS):  # the oracle sees one unpadded report at a time
        expected = oracle.logits(original_ids(legacy_tokenizer, report))
        for head in range(len(CONDITIONS)):
            torch.testing.assert_close(ours[head][i], expected[head], atol=1e-4, rtol=1e-4)
    labels = model.label(REPORTS, batch_size=3)
    oracle_labels = torch.stack([torch.stack([lg.argmax() for lg in oracle.logits(original_ids(legacy_tokenizer, r))])
                                 for r in REPORTS])
    assert labels.dtype == torch.long and labels.shape == (len(REPORTS), 14)
    assert torch.equal(labels, oracle_labels)
    assert labels[:, NO_FINDING].max() <= 1


def test_labels_do_not_depend_on_batch_size_or_order(oracle_checkpoint, vocab_path):
    model = CheXbert.from_pretrained(oracle_checkpoint[1], vocab_path)
    one_by_one = torch.cat([model.label([r]) for r in REPORTS])
    assert torch.equal(model.label(REPORTS, batch_size=64), one_by_one)
    assert torch.equal(model.label(REPORTS[::-1], batch_size=2), one_by_one.flip(0))
    assert model.label([]).shape == (0, 14)


def test_safetensors_copy_loads_to_the_same_logits(oracle_checkpoint, vocab_path, tmp_path):
    path = oracle_checkpoint[1]
    out = str(tmp_path / "chexbert.safetensors")
    convert_to_safetensors(path, out)
    tensors = load_file(out)
    assert not any(k.startswith("module.") or "optimizer" in k for k in tensors)
    a = CheXbert.from_pretrained(path, vocab_path).logits(REPORTS)
    b = CheXbert.from_pretrained(out, vocab_path).logits(REPORTS)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_safetensors_copy_remembers_a_non_default_head_count(tmp_path, vocab_path):
    torch.manual_seed(1)
    oracle = OracleLabeler(hidden=128, heads=4)  # 4 heads of 32: not the hidden // 64 default
    oracle.save_like_release(tmp_path / "c.pth")
    convert_to_safetensors(str(tmp_path / "c.pth"), str(tmp_path / "c.safetensors"), num_heads=4)
    model = CheXbert.from_pretrained(str(tmp_path / "c.safetensors"), vocab_path)
    assert model.bert.cfg.num_heads == 4
    report = "Small right pleural effusion."
    ids = BertTokenizerLegacy(vocab_path)(report)["input_ids"]
    for ours, theirs in zip(model.logits([report]), oracle.logits(ids)):
        torch.testing.assert_close(ours[0], theirs, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- real public weights

def test_encoder_loads_minilm_and_matches_transformers_hidden_states(minilm_dir):
    with open(os.path.join(minilm_dir, "config.json")) as f:
        cfg = BertConfig.from_hf_dict(json.load(f))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (6, 384, 12)
    ours = BertEncoder(cfg).eval()
    ours.load_hf_state_dict(load_file(os.path.join(minilm_dir, "model.safetensors")), "minilm")
    theirs = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0  # padded rows
    mask[2, 3:] = 0
    with torch.no_grad():
        h_ours, h_theirs = ours(ids, mask), theirs(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(h_ours[real], h_theirs[real], atol=1e-4, rtol=1e-4)


def test_wordpiece_ids_equal_bert_tokenizer(oracle_checkpoint, vocab_path, legacy_tokenizer):
    model = CheXbert.from_pretrained(oracle_checkpoint[1], vocab_path)
    ours = encode_reports(model.tokenizer, REPORTS)
    assert ours == [original_ids(legacy_tokenizer, r) for r in REPORTS]
    fast = transformers.BertTokenizer(vocab_path)  # the tokenizers-backed one of transformers 5
    assert ours[:-1] == [fast(re.sub(r"\s+", " ", r).strip())["input_ids"] for r in REPORTS[:-1]]
    assert ours[2] == ours[3] == [101, 102]  # empty report -> [CLS][SEP]
    long = ours[-1]
    assert len(long) == 512 and long[0] == 101 and long[-1] == 102
    pieces = legacy_tokenizer.convert_ids_to_tokens(ours[6])
    assert {"cafe", "naive", "resume", "中", "国"} <= set(pieces)  # accents stripped, CJK chars split off


# ----------------------------------------------------------------------------- safe loading

class RunsCode:
    """Unpickling this calls os.system: a weights_only load must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_executable_content_is_refused_and_not_run(tmp_path, vocab_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"module.bert.x": RunsCode(marker)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="not a plain state dict.*must not be unpickled") as err:
        CheXbert.from_pretrained(str(path), vocab_path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["truncated", "text", "list", "no_model_state_dict", "empty"])
def test_a_wrong_or_truncated_file_gives_an_error_naming_it(content, oracle_checkpoint, tmp_path):
    path = tmp_path / f"{content}.pth"
    if content == "truncated":
        data = open(oracle_checkpoint[1], "rb").read()
        path.write_bytes(data[: len(data) // 2])
    elif content == "text":
        path.write_text("<html>404 Not Found</html>\n")
    elif content == "list":
        torch.save([torch.ones(2)], path)
    elif content == "no_model_state_dict":
        torch.save({"state_dict": {"bert.x": torch.ones(2)}}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_checkpoint(str(tmp_path / "nowhere.pth"))


def test_missing_and_unexpected_keys_are_listed(oracle_checkpoint, vocab_path, tmp_path):
    ckpt = torch.load(oracle_checkpoint[1], weights_only=True)
    sd = ckpt["model_state_dict"]
    del sd["module.linear_heads.13.weight"], sd["module.bert.encoder.layer.1.output.LayerNorm.bias"]
    sd["module.classifier.weight"] = torch.ones(2)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        CheXbert.from_pretrained(str(tmp_path / "bad.pth"), vocab_path)
    msg = str(err.value)
    assert "linear_heads.13.weight" in msg and "bert.encoder.layer.1.output.LayerNorm.bias" in msg
    assert "unexpected keys (1): ['classifier.weight']" in msg


def test_dropout_acts_in_training_only(oracle_checkpoint, vocab_path):
    model = CheXbert.from_pretrained(oracle_checkpoint[1], vocab_path)
    ids, mask = torch.tensor([[101, 2053, 102]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(ids, mask)[0], model(ids, mask)[0])
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(ids, mask)[0], model.eval()(ids, mask)[0])
