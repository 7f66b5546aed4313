"""CheXbert: a BERT-base encoder and 14 linear heads that label a radiology report.

CheXbert (Smit et al., EMNLP 2020, "CheXbert: Combining Automatic Labelers and Expert
Annotations for Accurate Radiology Report Labeling"; github.com/stanfordmlgroup/CheXbert)
reads a report and predicts, for each of the 14 CheXpert observations, one class:
0 blank, 1 positive, 2 negative, 3 uncertain ("No Finding": 0 blank, 1 positive).
MRG-R1's clinical reward (MCCS, mrgr1/rewards.py) compares these labels between a
generated report and the reference.

    text --clean--> WordPiece ids [CLS] ... [SEP] (at most 512)      # [B, T]
         --BERT encoder (post-norm, erf GELU)--> hidden states        # [B, T, H]
         --hidden state of [CLS] --14 linear heads--> logits          # 13 x [B, 4], 1 x [B, 2]
         --argmax per head--> labels                                  # [B, 14]

The encoder is written here from the BERT paper (Devlin et al., 2019) and is config
driven, so the same code loads any BERT-family checkpoint (e.g. MiniLM-L6, hidden 384).

Example:
    from mrgr1.chexbert import CheXbert, convert_to_safetensors
    convert_to_safetensors("chexbert.pth", "chexbert.safetensors")   # once; faster later loads
    labeler = CheXbert.from_pretrained("chexbert.safetensors", "vocab.txt", device="cuda")
    labeler.label(["No acute cardiopulmonary process.", "Small left pleural effusion."])
    # LongTensor [2, 14] in the order of mrgr1.labels.CONDITIONS
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers.implementations import BertWordPieceTokenizer
from torch import nn

from mrgr1.files import read_text
from mrgr1.labels import CONDITIONS, NO_FINDING


class CheXbertFileError(ValueError):
    """A CheXbert weights file that cannot be used (unreadable, unsafe to unpickle, another model);
    the message names the file. Callers show it as one line: it is the user's file, not a bug."""


MAX_TOKENS = 512  # CheXbert cuts every report to 512 WordPiece ids, [CLS] and [SEP] included
PAD_ID = 0  # "[PAD]" in bert-base-uncased's vocab.txt; the original pads with 0 too
CONFIG_METADATA_KEY = "mrgr1_bert_config"  # where convert_to_safetensors stores the config


# ----------------------------------------------------------------------------- config

@dataclass
class BertConfig:
    vocab_size: int = 30522  # bert-base-uncased WordPiece vocabulary
    hidden_size: int = 768  # BERT-base width (MiniLM-L6: 384)
    num_layers: int = 12  # BERT-base depth (MiniLM-L6: 6)
    num_heads: int = 12  # attention heads; BERT-base uses 64-dim heads
    intermediate_size: int = 3072  # feed-forward width, 4 x hidden in BERT-base
    max_positions: int = 512  # learned absolute positions: also the longest input
    type_vocab_size: int = 2  # segment A/B embeddings; a report is all segment 0
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon
    dropout: float = 0.1  # hidden, attention-probability and head dropout (training only)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "BertConfig":
        """Read a Hugging Face BERT config.json dict."""
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"config hidden_act={d['hidden_act']!r}: only exact (erf) 'gelu' is implemented")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config position_embedding_type={d['position_embedding_type']!r}: "
                             "only 'absolute' is implemented")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                   intermediate_size=d["intermediate_size"], max_positions=d["max_position_embeddings"],
                   type_vocab_size=d.get("type_vocab_size", 2), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                   dropout=d.get("hidden_dropout_prob", 0.1))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], num_heads: int | None = None) -> "BertConfig":
        """Sizes read off the tensors of a Hugging Face-named encoder state dict (no "bert." prefix).

        The head count is not visible in any shape: unless given, it is hidden // 64, the
        BERT-base convention (CheXbert: 768 // 64 = 12).
        """
        vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
        layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")}
        return cls(vocab_size=vocab, hidden_size=hidden, num_layers=len(layers),
                   num_heads=num_heads or hidden // 64,
                   intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
                   max_positions=sd["embeddings.position_embeddings.weight"].shape[0],
                   type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0])


# ----------------------------------------------------------------------------- encoder

class BertEmbeddings(nn.Module):
    """x_t = LayerNorm(word[id_t] + position[t] + token_type[0])."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, H]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        # One segment only: every token gets token-type 0, as in the original labeler.
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """Post-norm transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x)), FFN = W2 gelu(W1 x)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        if h % cfg.num_heads:
            raise ValueError(f"hidden_size {h} is not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, nh, T, H / nh]
        B, T, H = t.shape
        return t.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2)

    def attention(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + mask) V over all heads; keep [B, 1, 1, T] is True on real tokens."""
        B, T, H = x.shape
        q, k, v = (self.split_heads(proj(x)) for proj in (self.query, self.key, self.value))  # [B, nh, T, hd]
        p = self.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # [B, nh, T, hd]
        return self.attn_out(out.transpose(1, 2).reshape(B, T, H))  # [B, T, H]

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        x = self.attn_norm(x + self.dropout(self.attention(x, keep)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))  # erf GELU


class BertEncoder(nn.Module):
    """Embeddings and a stack of post-norm layers; returns the last hidden states."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] (1 = real token, 0 = padding) -> hidden [B, T, H]."""
        keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]: every query sees only real keys
        x = self.embeddings(input_ids)  # [B, T, H]
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], source: str) -> None:
        """Load a Hugging Face `BertModel` state dict (keys `embeddings.*`, `encoder.layer.N.*`)."""
        load_checked(self, sd, source)


# Hugging Face / original CheXbert parameter names -> ours. Applied in order, so the
# longer "attention.output.*" names are rewritten before the plain "output.*" ones.
_RENAMES = (
    ("embeddings.word_embeddings.", "embeddings.word."),
    ("embeddings.position_embeddings.", "embeddings.position."),
    ("embeddings.token_type_embeddings.", "embeddings.token_type."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
    ("encoder.layer.", "layers."),
    ("attention.self.query.", "query."),
    ("attention.self.key.", "key."),
    ("attention.self.value.", "value."),
    ("attention.output.dense.", "attn_out."),
    ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "ffn_in."),
    ("output.dense.", "ffn_out."),
    ("output.LayerNorm.", "ffn_norm."),
    ("linear_heads.", "heads."),
)
# Present in published checkpoints, not used by the labeler: BERT's pooler (CheXbert reads
# the [CLS] hidden state directly) and the position-ids buffer of newer transformers versions.
_UNUSED = re.compile(r"(^|\.)(pooler\.dense\.(weight|bias)|embeddings\.position_ids)$")


def _to_ours(key: str) -> str:
    for theirs, ours in _RENAMES:
        key = key.replace(theirs, ours)
    return key


def _to_theirs(key: str) -> str:
    for theirs, ours in reversed(_RENAMES):
        key = key.replace(ours, theirs)
    return key


def load_checked(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load Hugging Face-named tensors into `module`; every parameter must be there, nothing else.

    A silent strict=False load would leave random weights behind and label garbage, so
    missing and unexpected keys are listed (in the checkpoint's naming) and refused.
    """
    sd = {k: v for k, v in sd.items() if not _UNUSED.search(k)}
    expected = {_to_theirs(k) for k in module.state_dict()}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheXbertFileError(f"{source}: the checkpoint does not match the model.\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}\n"
                         "Is it a CheXbert / BERT checkpoint, and is the config (layers, heads) right?")
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[_to_ours(k)].shape)})" for k, v in sd.items()
             if tuple(v.shape) != tuple(own[_to_ours(k)].shape)]
    if wrong:
        raise CheXbertFileError(f"{source}: {len(wrong)} tensor(s) of the checkpoint have other shapes than the "
                                f"model it describes: {'; '.join(wrong[:3])}. The file is damaged or not CheXbert: "
                                f"download it again")
    module.load_state_dict({_to_ours(k): v for k, v in sd.items()}, strict=True)


# ----------------------------------------------------------------------------- checkpoint files

def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a CheXbert checkpoint, keys `bert.*` and `linear_heads.*`, and its file metadata.

    `.safetensors`: a copy written by `convert_to_safetensors`. Anything else: the original
    `chexbert.pth`, read with torch.load(weights_only=True), never unpickled freely.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CheXbert weights not found: {path}")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            return load_file(path), metadata
        except Exception as err:
            raise CheXbertFileError(f"{path}: not a readable safetensors file ({err}). "
                             "Re-create it with convert_to_safetensors.") from err
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise CheXbertFileError(f"{path}: not a plain state dict; it holds objects that unpickling would "
                             "execute, and it must not be unpickled. Use the original chexbert.pth "
                             "or a safetensors copy.") from err
        raise CheXbertFileError(f"{path}: not a readable PyTorch checkpoint ({err}).") from err
    except Exception as err:  # truncated zip, empty file, some other file type
        raise CheXbertFileError(f"{path}: not a readable PyTorch checkpoint; is it truncated or the wrong file? "
                         f"({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state_dict"), dict):
        what = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheXbertFileError(f"{path}: expected CheXbert's checkpoint layout, a dict with 'model_state_dict'; "
                         f"found {what}.")
    # The release was saved from nn.DataParallel: every key starts with "module.".
    sd = {k.removeprefix("module."): v for k, v in checkpoint["model_state_dict"].items()}
    return sd, {}


def convert_to_safetensors(pth_path: str, out_path: str, num_heads: int | None = None) -> None:
    """Write the model tensors of `chexbert.pth` (keys without "module.") and the config to safetensors.

    The optimizer state and epoch are dropped; the file is about a third of the original.
    """
    sd, _ = read_checkpoint(pth_path)
    cfg = BertConfig.from_state_dict(_encoder_part(sd), num_heads)
    tmp = out_path + ".tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp,
              metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(asdict(cfg))})
    os.replace(tmp, out_path)  # a crash never leaves half a file under the final name


def _encoder_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")}


# ----------------------------------------------------------------------------- text

def clean_report(text: str) -> str:
    """As the original: strip, newlines to spaces, runs of whitespace to one space."""
    return re.sub(r"\s+", " ", text).strip()


def wordpiece_tokenizer(vocab_path: str, max_tokens: int = MAX_TOKENS) -> BertWordPieceTokenizer:
    """bert-base-uncased WordPiece: clean control chars, split CJK chars, lowercase, strip accents,
    split on whitespace and punctuation, greedy longest-match WordPiece, then [CLS] ... [SEP].

    Truncation keeps [CLS], the first max_tokens - 2 word pieces and [SEP]: the original's
    `ids[:511] + [SEP]` rule. An empty report becomes [CLS][SEP], as in the original.
    """
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"WordPiece vocabulary not found: {vocab_path} (bert-base-uncased vocab.txt)")
    read_text(vocab_path, "download bert-base-uncased-vocab again", error=CheXbertFileError)  # UTF-8 text
    try:
        tok = BertWordPieceTokenizer(vocab_path, lowercase=True, strip_accents=None,
                                     clean_text=True, handle_chinese_chars=True)
    except Exception as e:  # tokenizers raises a bare Exception for a vocabulary it cannot use
        raise CheXbertFileError(f"{vocab_path} is not a WordPiece vocabulary ({' '.join(str(e).split())[:200]}); "
                                f"download bert-base-uncased-vocab again") from None
    tok.enable_truncation(max_tokens)
    return tok


def encode_reports(tokenizer: BertWordPieceTokenizer, reports: list[str]) -> list[list[int]]:
    """Clean and tokenize a batch of reports at once; each is [CLS] pieces [SEP]."""
    for i, r in enumerate(reports):
        if not isinstance(r, str):
            raise TypeError(f"report {i} is {type(r).__name__}, not str: {r!r}")
    return [e.ids for e in tokenizer.encode_batch([clean_report(r) for r in reports])]


def pad_batch(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: input_ids, attention_mask [B, T_max]."""
    lengths = torch.tensor([len(x) for x in ids])  # [B]
    input_ids = nn.utils.rnn.pad_sequence([torch.tensor(x) for x in ids], batch_first=True,
                                          padding_value=PAD_ID)  # [B, T_max]
    mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]  # [B, T_max]
    return input_ids, mask.long()


# ----------------------------------------------------------------------------- the labeler

class CheXbert(nn.Module):
    """BERT encoder, dropout, and one linear head per observation on the [CLS] hidden state."""

    def __init__(self, cfg: BertConfig, tokenizer: BertWordPieceTokenizer | None = None):
        super().__init__()
        self.bert = BertEncoder(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        # 13 observations x {blank, positive, negative, uncertain}; "No Finding" x {blank, positive}.
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden_size, 2 if i == NO_FINDING else 4)
                                   for i in range(len(CONDITIONS)))
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, weights_path: str, vocab_path: str, device: str | torch.device | None = None,
                        num_heads: int | None = None) -> "CheXbert":
        """Load `chexbert.pth` (the original release) or its safetensors copy, on `device` (default CPU).

        num_heads: only for non-BERT-base checkpoints without stored config (default hidden // 64).
        """
        sd, metadata = read_checkpoint(weights_path)
        if CONFIG_METADATA_KEY in metadata and num_heads is None:
            try:
                cfg = BertConfig(**json.loads(metadata[CONFIG_METADATA_KEY]))
            except (ValueError, TypeError) as e:  # not JSON, or other fields than BertConfig's
                raise CheXbertFileError(f"{weights_path}: its stored config is damaged ({e}); re-create it with "
                                        f"convert_to_safetensors") from None
        else:
            if "bert.embeddings.word_embeddings.weight" not in sd:
                raise CheXbertFileError(f"{weights_path}: no 'bert.embeddings.word_embeddings.weight'; keys start with "
                                 f"{sorted(sd)[:5]}. Is this a CheXbert checkpoint?")
            try:
                cfg = BertConfig.from_state_dict(_encoder_part(sd), num_heads)
            except (KeyError, ValueError, IndexError) as e:
                raise CheXbertFileError(f"{weights_path}: not a complete BERT encoder (no {e}); download it "
                                        f"again") from None
        model = cls(cfg, wordpiece_tokenizer(vocab_path, min(MAX_TOKENS, cfg.max_positions)))
        load_checked(model, sd, weights_path)
        return model.to(device or "cpu").eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """input_ids, attention_mask [B, T] -> 14 logits tensors, [B, 4] (x13) and [B, 2] (No Finding)."""
        cls_hidden = self.dropout(self.bert(input_ids, attention_mask)[:, 0])  # [B, H]
        return [head(cls_hidden) for head in self.heads]

    @torch.inference_mode()
    def logits(self, reports: list[str], batch_size: int = 32) -> list[torch.Tensor]:
        """Per-head logits for `reports`, in input order: 13 x [N, 4] and 1 x [N, 2], on the model's device.

        Reports are sorted by length so each batch pads little; results are put back in order.
        """
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer: build CheXbert with from_pretrained(weights, vocab)")
        ids = encode_reports(self.tokenizer, reports)
        device = self.heads[0].weight.device
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first
        out = [torch.empty(len(ids), head.out_features, device=device) for head in self.heads]
        for start in range(0, len(ids), batch_size):
            rows = order[start:start + batch_size]
            input_ids, mask = pad_batch([ids[i] for i in rows])  # [b, T_max]
            batch_logits = self(input_ids.to(device), mask.to(device))
            index = torch.tensor(rows, device=device)
            for o, lg in zip(out, batch_logits):
                o[index] = lg.float()
        return out

    def label(self, reports: list[str], batch_size: int = 32) -> torch.Tensor:
        """CheXbert labels [N, 14] (long, on CPU) in mrgr1.labels.CONDITIONS order:
        0 blank, 1 positive, 2 negative, 3 uncertain ("No Finding": 0 or 1)."""
        if not reports:
            return torch.zeros(0, len(CONDITIONS), dtype=torch.long)
        return torch.stack([lg.argmax(dim=1) for lg in self.logits(reports, batch_size)], dim=1).cpu()
