"""Damaged files a user hands us end both command lines in one `error:` line, never a traceback.

Each test damages one file the way it happens in practice (a copy cut short, a file saved in
another encoding, a hand edit that breaks the JSON, weights of another model), runs the real
command line (`train_grpo.command_line`, `evaluate.main`) and checks: a non-zero exit, one
`error: ...` line naming the file or value, no traceback, and every file the user gave unchanged.
Duplicate study ids are refused the same way (they would score studies against each other's
reports).

Runs are the smallest that reach the file: the drawn demo set (56 px, a handful of studies), the
untrained demo policy, no SFT, 2 studies x 2 completions x 4 tokens.
"""
import hashlib
import json
import os
import shutil
import struct
import zlib

import pytest
import torch
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

import train_grpo
from mrgr1 import evaluate, pipeline, synthetic
from mrgr1.run_config import RunConfig
from mrgr1.chexbert import BertConfig, CheXbert, _to_theirs


# ----------------------------------------------------------------------------- helpers

def snapshot(*roots) -> dict:
    """sha256 of every file under the given folders (or of the files themselves)."""
    digests = {}
    for root in map(str, roots):
        paths = [root] if os.path.isfile(root) else [os.path.join(d, n) for d, _, names in os.walk(root)
                                                     for n in names]
        for path in paths:
            with open(path, "rb") as f:
                digests[path] = hashlib.sha256(f.read()).hexdigest()
    return digests


def train_error(capsys, argv) -> str:
    """The one line train_grpo.py's command line ends with; exit status non-zero, no traceback."""
    with pytest.raises(SystemExit) as info:
        train_grpo.command_line(argv)
    message = str(info.value.code)  # sys.exit("error: ...") prints it and exits with status 1
    assert info.value.code not in (0, None)
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    assert "Traceback" not in capsys.readouterr().err
    return message


def eval_error(capsys, argv) -> str:
    """The one `error:` line evaluate.py prints; exit status 2, no traceback."""
    with pytest.raises(SystemExit) as info:
        evaluate.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("error: ") == 1, err
    message = "error: " + err.split("error: ")[1]  # after a progress bar, if one was on screen
    assert "\n" not in message.strip(), err
    return message.strip()


def copy_of(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def train_args(data_root, out, *extra):
    return ["--dataset", "demo", "--data-root", str(data_root), "--output-dir", str(out), "--sft-steps", "0",
            "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "4", "--eval-limit", "0",
            "--sample-every", "0", "--lora-rank", "2", "--steps", "1", "--num-iterations", "1", "--beta", "0",
            "--device", "cpu", *extra]


def eval_args(data_root, policy, out, *extra):
    return ["--dataset", "demo", "--data-root", str(data_root), "--policy", str(policy), "--labeler", "rules",
            "--eval-batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--output-dir", str(out), *extra]


def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:int(len(raw) * keep)])


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("bad") / "demo"), n_train=4, n_val=0, n_test=2,
                              image_size=56, seed=1)


@pytest.fixture
def data(demo_root, tmp_path):
    """A copy of the demo set this test may damage."""
    return copy_of(demo_root, tmp_path / "data")


@pytest.fixture(scope="module")
def policy(demo_root, tmp_path_factory):
    reports = [s.report for s in pipeline.load_studies("demo", demo_root, "train")]
    wording = (RunConfig.system_prompt, RunConfig.instruction, RunConfig.sft_think)
    return pipeline.demo_policy_folder(str(tmp_path_factory.mktemp("bad") / "policy"), reports, wording)


# ----------------------------------------------------------------------------- data

def _damage_annotation(path, how):
    with open(path, encoding="utf-8") as f:
        ann = json.load(f)
    if how == "not UTF-8":  # saved in Latin-1 by an editor: é is one byte 0xe9
        ann["train"][0]["report"] += " Heart size normal, no pleural effusion (café)."
        raw = json.dumps(ann, ensure_ascii=False).encode("latin-1")
    elif how == "not JSON":  # a hand edit that left a trailing comma
        raw = json.dumps(ann).replace("]}", "],}", 1).encode()
    elif how == "a list":
        raw = json.dumps(ann["train"]).encode()
    else:  # the train split is not a list of studies
        raw = json.dumps({**ann, "train": {"studies": ann["train"]}}).encode()
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("how, said", [("not UTF-8", "is not UTF-8 text (byte"),
                                       ("not JSON", "is not valid JSON (line 1"),
                                       ("a list", "must be a JSON object with 'train'/'val'/'test'"),
                                       ("train not a list", "has no 'train' list of studies")])
def test_a_damaged_annotation_file_is_one_line_in_train(how, said, data, tmp_path, capsys):
    path = os.path.join(data, "annotation.json")
    _damage_annotation(path, how)
    before = snapshot(data)
    message = train_error(capsys, train_args(data, tmp_path / "run"))
    assert path in message and said in message
    assert snapshot(data) == before


def test_an_annotation_file_not_in_utf8_is_one_line_in_evaluate(data, policy, tmp_path, capsys):
    path = os.path.join(data, "annotation.json")
    _damage_annotation(path, "not UTF-8")
    before = snapshot(data, policy)
    message = eval_error(capsys, eval_args(data, policy, tmp_path / "eval"))
    assert path in message and "is not UTF-8 text" in message
    assert snapshot(data, policy) == before


def test_a_damaged_demo_settings_file_is_one_line(data, tmp_path, capsys):
    path = os.path.join(data, "demo.json")
    truncate(path)
    before = snapshot(data)
    message = train_error(capsys, train_args(data, tmp_path / "run"))
    assert path in message and "is not valid JSON" in message and f"rm -r {data}" in message
    assert snapshot(data) == before


def test_duplicate_study_ids_are_refused_naming_them(data, tmp_path, capsys):
    path = os.path.join(data, "annotation.json")
    with open(path, encoding="utf-8") as f:
        ann = json.load(f)
    first, third = ann["train"][0]["id"], ann["train"][2]["id"]
    ann["train"][1]["id"] = first  # two different studies (images, reports) under one id
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ann, f)
    before = snapshot(data)
    message = train_error(capsys, train_args(data, tmp_path / "run"))
    assert path in message and f"'{first}' (entries 0, 1)" in message and third not in message
    assert "give every study its own id" in message
    assert snapshot(data) == before


def _bomb_png(path, width=20_000, height=10_000):
    """A real 1-bit PNG of width x height black pixels (200 M pixels, over twice PIL's default
    limit): ~25 MB of pixel rows that zlib squeezes into a few kB."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_by_name_and_never_decoded(data, policy, tmp_path, capsys, monkeypatch):
    with open(os.path.join(data, "annotation.json"), encoding="utf-8") as f:
        study = json.load(f)["test"][1]
    bomb = os.path.join(data, "images", study["image_path"][0])
    _bomb_png(bomb)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.filename) or real_load(im))
    before = snapshot(data, policy)
    for message in (train_error(capsys, train_args(data, tmp_path / "run")),
                    eval_error(capsys, eval_args(data, policy, tmp_path / "eval"))):
        assert bomb in message and study["id"] in message
        assert "more pixels than PIL allows" in message and "not decoded" in message
    assert bomb not in decoded
    assert snapshot(data, policy) == before


def test_an_image_that_is_not_an_image_is_refused_before_any_work(data, tmp_path, capsys):
    with open(os.path.join(data, "annotation.json"), encoding="utf-8") as f:
        study = json.load(f)["train"][3]
    path = os.path.join(data, "images", study["image_path"][1])
    with open(path, "wb") as f:
        f.write(b"<html>404 Not Found</html>")  # what a failed download leaves
    before = snapshot(data)
    message = train_error(capsys, train_args(data, tmp_path / "run"))
    assert f"cannot read image {path} of study {study['id']}" in message
    assert not os.path.exists(tmp_path / "run" / "init")  # stopped before the policy was written
    assert snapshot(data) == before


def test_an_image_cut_short_is_one_line_when_it_is_decoded(data, policy, tmp_path, capsys):
    with open(os.path.join(data, "annotation.json"), encoding="utf-8") as f:
        study = json.load(f)["test"][0]
    path = os.path.join(data, "images", study["image_path"][0])
    Image.effect_noise((56, 56), 64).save(path)  # noise: the pixel data is most of the file
    truncate(path, 0.6)
    before = snapshot(data, policy)
    message = eval_error(capsys, eval_args(data, policy, tmp_path / "eval"))
    assert f"cannot read image {path} of study {study['id']}" in message and "cut short" in message
    assert snapshot(data, policy) == before


# ----------------------------------------------------------------------------- model folders

def _damage_policy(folder, how):
    config = os.path.join(folder, "config.json")
    if how == "config.json not JSON":
        with open(config, "a", encoding="utf-8") as f:
            f.write("\n}")
        return config
    if how == "weights of other shapes":  # config.json of a wider model beside these weights
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["intermediate_size"] *= 2
        with open(config, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        return folder  # and config.json: the message says they come from different models
    if how == "model.safetensors cut short":
        truncate(os.path.join(folder, "model.safetensors"))
        return os.path.join(folder, "model.safetensors")
    if how == "tokenizer.json not JSON":
        truncate(os.path.join(folder, "tokenizer.json"))
        return os.path.join(folder, "tokenizer.json")
    if how == "index not JSON":  # a sharded folder whose index was cut short
        index = os.path.join(folder, "model.safetensors.index.json")
        with open(index, "w", encoding="utf-8") as f:
            f.write('{"weight_map": {"lm_head.weight": "model-00001-of-0000')
        return index
    name = {"preprocessor_config.json not UTF-8": "preprocessor_config.json",
            "generation_config.json not JSON": "generation_config.json"}[how]
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b'{"max_pixels": 200704, "note": "r\xe9solution"}' if "UTF-8" in how else b'{"top_p": 0.8,}')
    return path


FOLDER_DAMAGE = ["config.json not JSON", "weights of other shapes", "model.safetensors cut short",
                 "tokenizer.json not JSON", "index not JSON", "preprocessor_config.json not UTF-8",
                 "generation_config.json not JSON"]


@pytest.mark.parametrize("how", FOLDER_DAMAGE)
def test_a_damaged_policy_folder_is_one_line_in_train(how, demo_root, policy, tmp_path, capsys):
    folder = copy_of(policy, tmp_path / "policy")
    named = _damage_policy(folder, how)
    before = snapshot(demo_root, folder)
    message = train_error(capsys, train_args(demo_root, tmp_path / "run", "--policy", folder))
    assert named in message, message
    assert snapshot(demo_root, folder) == before


@pytest.mark.parametrize("how", ["config.json not JSON", "weights of other shapes", "model.safetensors cut short",
                                 "tokenizer.json not JSON"])
def test_a_damaged_policy_folder_is_one_line_in_evaluate(how, demo_root, policy, tmp_path, capsys):
    folder = copy_of(policy, tmp_path / "policy")
    named = _damage_policy(folder, how)
    before = snapshot(demo_root, folder)
    message = eval_error(capsys, eval_args(demo_root, folder, tmp_path / "eval"))
    assert named in message, message
    assert snapshot(demo_root, folder) == before


def test_weights_of_other_shapes_name_the_tensor_and_both_shapes(demo_root, policy, tmp_path, capsys):
    folder = copy_of(policy, tmp_path / "policy")
    _damage_policy(folder, "weights of other shapes")
    message = train_error(capsys, train_args(demo_root, tmp_path / "run", "--policy", folder))
    assert "mlp.up_proj.weight (256, 128), config.json gives (512, 128)" in message


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def two_checkpoints(demo_root, tmp_path_factory):
    """A finished run with checkpoint-000001 and checkpoint-000002 (latest)."""
    out = tmp_path_factory.mktemp("bad") / "run"
    train_grpo.main(train_args(demo_root, out, "--steps", "2", "--save-every", "1"))
    return out


def _damage_checkpoint(folder, name):
    path = os.path.join(folder, name)
    if name.endswith(".json"):
        with open(path, "a", encoding="utf-8") as f:
            f.write("{")
    else:
        truncate(path)
    return path


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "trainer_state.pt",
                                  "train_config.json"])
def test_a_damaged_checkpoint_file_names_it_and_the_intact_earlier_checkpoint(
        name, demo_root, two_checkpoints, tmp_path, capsys):
    run = copy_of(two_checkpoints, tmp_path / "run")
    damaged = _damage_checkpoint(os.path.join(run, "checkpoint-000002"), name)
    before = snapshot(run, demo_root)
    message = train_error(capsys, train_args(demo_root, run, "--steps", "3", "--save-every", "1", "--resume"))
    assert damaged in message
    assert f"{os.path.join(run, 'checkpoint-000001')} is intact" in message
    assert f"echo checkpoint-000001 > {os.path.join(run, 'latest')}" in message
    assert snapshot(run, demo_root) == before


def test_when_no_earlier_checkpoint_is_intact_the_error_says_so(demo_root, two_checkpoints, tmp_path, capsys):
    run = copy_of(two_checkpoints, tmp_path / "run")
    for step in ("000001", "000002"):
        _damage_checkpoint(os.path.join(run, f"checkpoint-{step}"), "adapter_model.safetensors")
    message = train_error(capsys, train_args(demo_root, run, "--steps", "3", "--resume"))
    assert "checkpoint-000002" in message and "no earlier checkpoint of this run is intact" in message


def test_following_the_advice_resumes_from_the_intact_checkpoint(demo_root, two_checkpoints, tmp_path):
    run = copy_of(two_checkpoints, tmp_path / "run")
    _damage_checkpoint(os.path.join(run, "checkpoint-000002"), "adapter_model.safetensors")
    with open(os.path.join(run, "latest"), "w") as f:
        f.write("checkpoint-000001\n")
    train_grpo.main(train_args(demo_root, run, "--steps", "2", "--save-every", "1", "--resume"))
    assert set(load_file(os.path.join(run, "checkpoint-000002", "adapter_model.safetensors")))  # whole again


@pytest.mark.parametrize("name, said", [("latest", "is not UTF-8 text"), ("metrics.jsonl", "is not UTF-8 text")])
def test_a_run_file_not_in_utf8_is_one_line_on_resume(name, said, demo_root, two_checkpoints, tmp_path, capsys):
    run = copy_of(two_checkpoints, tmp_path / "run")
    path = os.path.join(run, name)
    with open(path, "ab") as f:
        f.write(b"\xff\xfe")
    before = snapshot(run)
    message = train_error(capsys, train_args(demo_root, run, "--steps", "3", "--resume"))
    assert path in message and said in message
    assert snapshot(run) == before


def test_a_cut_short_adapter_is_one_line_in_evaluate(demo_root, two_checkpoints, tmp_path, capsys):
    run = copy_of(two_checkpoints, tmp_path / "run")
    adapter = _damage_checkpoint(os.path.join(run, "checkpoint-000002"), "adapter_model.safetensors")
    before = snapshot(run)
    message = eval_error(capsys, eval_args(demo_root, os.path.join(run, "init"), tmp_path / "eval",
                                           "--adapter", os.path.join(run, "checkpoint-000002")))
    assert adapter in message and "not a readable safetensors file" in message
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- CheXbert

@pytest.fixture
def chexbert_dir(tmp_path, minilm_dir):
    """A weights folder with the real bert-base-uncased vocab.txt and a tiny CheXbert in safetensors."""
    vocab_dir = tmp_path / "weights" / "bert-base-uncased-vocab"
    vocab_dir.mkdir(parents=True)
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), vocab_dir / "vocab.txt")
    torch.manual_seed(0)
    model = CheXbert(BertConfig(vocab_size=30522, hidden_size=64, num_layers=1, num_heads=1,
                                intermediate_size=128, max_positions=64))
    save_file({_to_theirs(k): v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "chexbert.safetensors"))
    return tmp_path


def _predictions(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"id": "a", "reference": "No effusion.", "report": "Small effusion."}) + "\n")
    return str(path)


def _chexbert_args(tmp_path, weights):
    return ["--predictions", _predictions(tmp_path), "--labeler", "chexbert", "--chexbert-weights", weights,
            "--weights-dir", str(tmp_path / "weights"), "--device", "cpu", "--output-dir", str(tmp_path / "eval")]


def test_the_tiny_chexbert_of_these_tests_loads(chexbert_dir):
    evaluate.main(_chexbert_args(chexbert_dir, str(chexbert_dir / "chexbert.safetensors")))


@pytest.mark.parametrize("how, said", [("cut short", "not a readable safetensors file"),
                                       ("other shapes", "linear_heads.0.weight (5, 64) (expected (4, 64))")])
def test_damaged_chexbert_weights_are_one_line(how, said, chexbert_dir, capsys):
    weights = str(chexbert_dir / "chexbert.safetensors")
    if how == "cut short":
        truncate(weights)
    else:
        tensors = load_file(weights)
        tensors["linear_heads.0.weight"] = torch.zeros(5, 64)
        save_file(tensors, weights)
    before = snapshot(weights)
    message = eval_error(capsys, _chexbert_args(chexbert_dir, weights))
    assert weights in message and said in message
    assert snapshot(weights) == before


# ----------------------------------------------------------------------------- the weights tool

def test_a_damaged_lock_file_is_one_line_in_the_weights_tool(tmp_path, capsys):
    from mrgr1 import weights

    lock = tmp_path / "bert-base-uncased-vocab" / weights.LOCK_NAME
    lock.parent.mkdir()
    lock.write_bytes(b'{"files": {"vocab.txt": {"size": 23')  # cut short while being written
    assert weights.main(["verify", "bert-base-uncased-vocab", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(lock) in err and "is not valid JSON" in err and "mrgr1.weights verify" in err
    assert lock.read_bytes() == b'{"files": {"vocab.txt": {"size": 23'
