"""Manifest, downloads and weight resolution, against a local HTTP server (never the internet).

The server stands in for Hugging Face: HF_ENDPOINT points the real manifest's URLs at it.
It honours Range requests, can cut a transfer off midway, and answers 404 for unknown paths.
"""
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from mrgr1 import weights
from mrgr1.weights import WeightsError

VOCAB_URL_PATH = "/google-bert/bert-base-uncased/resolve/main/vocab.txt"
QWEN3B = "/Qwen/Qwen2.5-VL-3B-Instruct/resolve/main/"


class FakeHub:
    """Shared state of the server: files by URL path, one-shot cut-offs, and a request log."""

    def __init__(self):
        self.files = {}  # URL path -> bytes
        self.cut_after = {}  # URL path -> bytes to send before dropping the connection (once)
        self.log = []  # (path, Range header or None, bytes sent)
        self.redirects = {}  # URL path -> the path it redirects to


def _handler(hub):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in hub.redirects:  # like Hugging Face sending large files to its CDN
                self.send_response(302)
                self.send_header("Location", hub.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = hub.files.get(self.path)
            if body is None:
                hub.log.append((self.path, self.headers.get("Range"), 0))
                self.send_error(404)
                return
            etag = '"' + hashlib.sha256(body).hexdigest() + '"'
            start, status = 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and self.headers.get("If-Range", etag) == etag:
                start, status = int(match.group(1)), 206
            rest = body[start:]
            self.send_response(status)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(rest)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            cut = hub.cut_after.pop(self.path, None)
            sent = rest if cut is None else rest[:cut]
            hub.log.append((self.path, self.headers.get("Range"), len(sent)))  # before the client can return
            self.wfile.write(sent)
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True  # Content-Length promised more: the client sees a cut-off

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def hub(monkeypatch):
    state = FakeHub()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def vocab_bytes(minilm_dir):
    """The real bert-base-uncased vocab.txt (byte-identical copy shipped in a PyPI package)."""
    with open(os.path.join(minilm_dir, "vocab.txt"), "rb") as f:
        return f.read()


def _quiet(*args):
    pass


def _fake_qwen(hub, shards=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    """Serve small stand-ins for the qwen2.5-vl-3b files; the index names `shards`."""
    index = {"metadata": {}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}}
    for name in ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]:
        hub.files[QWEN3B + name] = f"stand-in for {name}".encode()
    hub.files[QWEN3B + "model.safetensors.index.json"] = json.dumps(index).encode()
    for shard in shards:
        hub.files[QWEN3B + shard] = f"bytes of {shard}".encode() * 100


# ----------------------------------------------------------------------------- the real manifest

def test_real_manifest_is_well_formed():
    with open(weights.MANIFEST_PATH, encoding="utf-8") as f:
        data = json.load(f)
    names = [a["name"] for a in data["artefacts"]]
    assert len(names) == len(set(names))
    assert {"qwen2.5-vl-3b", "qwen2.5-vl-7b", "huatuogpt-vision-7b", "chexbert", "bert-base-uncased-vocab"} <= set(names)
    for artefact in data["artefacts"]:
        assert artefact["base_url"].startswith("https://") and artefact["base_url"].endswith("/")
        assert artefact["license"] and artefact["purpose"]
        for spec in artefact["files"]:
            assert spec["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])
            assert spec["size"] is None or (type(spec["size"]) is int and spec["size"] > 0)
    assert weights.load_manifest()["chexbert"]["files"][0]["size"] == 1314414442


def test_manifest_rejects_duplicates_and_bad_checksums():
    entry = {"name": "a", "base_url": "http://x/", "files": [{"path": "f", "size": 1, "sha256": None}]}
    with pytest.raises(WeightsError, match="listed twice"):
        weights.load_manifest({"artefacts": [entry, entry]})
    bad = dict(entry, files=[{"path": "f", "size": 1, "sha256": "abc"}])
    with pytest.raises(WeightsError, match="64 lowercase hex"):
        weights.load_manifest({"artefacts": [bad]})


def test_hf_endpoint_moves_hugging_face_urls(monkeypatch):
    entry = weights.load_manifest()["bert-base-uncased-vocab"]
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert weights.file_url(entry, "vocab.txt") == "https://huggingface.co" + VOCAB_URL_PATH
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert weights.file_url(entry, "vocab.txt") == "https://mirror.example" + VOCAB_URL_PATH


# ----------------------------------------------------------------------------- downloads

def test_download_checks_the_published_hash(hub, vocab_bytes, tmp_path):
    hub.files[VOCAB_URL_PATH] = vocab_bytes
    folder = weights.download("bert-base-uncased-vocab", str(tmp_path), progress=False, log=_quiet)
    with open(os.path.join(folder, "vocab.txt"), "rb") as f:
        assert f.read() == vocab_bytes
    assert not os.path.exists(os.path.join(folder, "vocab.txt.part"))
    assert hub.log == [(VOCAB_URL_PATH, None, len(vocab_bytes))]


def test_cut_off_transfer_resumes_with_a_range_request(hub, vocab_bytes, tmp_path):
    hub.files[VOCAB_URL_PATH] = vocab_bytes
    hub.cut_after[VOCAB_URL_PATH] = 100_000
    with pytest.raises(WeightsError, match="cut off") as err:
        weights.download("bert-base-uncased-vocab", str(tmp_path), retries=0, progress=False, log=_quiet)
    part = tmp_path / "bert-base-uncased-vocab" / "vocab.txt.part"
    assert "run the same command again to resume" in str(err.value)
    assert part.stat().st_size == 100_000
    weights.download("bert-base-uncased-vocab", str(tmp_path), retries=0, progress=False, log=_quiet)
    assert hub.log[1] == (VOCAB_URL_PATH, "bytes=100000-", len(vocab_bytes) - 100_000)
    assert (tmp_path / "bert-base-uncased-vocab" / "vocab.txt").read_bytes() == vocab_bytes


def test_cut_off_transfer_is_retried_within_one_call(hub, vocab_bytes, tmp_path):
    hub.files[VOCAB_URL_PATH] = vocab_bytes
    hub.cut_after[VOCAB_URL_PATH] = 5_000
    weights.download("bert-base-uncased-vocab", str(tmp_path), retries=1, progress=False, log=_quiet)
    assert [r for _, r, _ in hub.log] == [None, "bytes=5000-"]
    assert (tmp_path / "bert-base-uncased-vocab" / "vocab.txt").read_bytes() == vocab_bytes


def test_resume_follows_a_redirect(hub, vocab_bytes, tmp_path):
    hub.files["/cdn/vocab"] = vocab_bytes
    hub.redirects[VOCAB_URL_PATH] = "/cdn/vocab"
    hub.cut_after["/cdn/vocab"] = 50_000
    weights.download("bert-base-uncased-vocab", str(tmp_path), retries=1, progress=False, log=_quiet)
    assert [(p, r) for p, r, _ in hub.log if p == "/cdn/vocab"] == [("/cdn/vocab", None), ("/cdn/vocab", "bytes=50000-")]
    assert (tmp_path / "bert-base-uncased-vocab" / "vocab.txt").read_bytes() == vocab_bytes


def test_a_file_changed_on_the_server_is_fetched_whole_not_spliced(hub, vocab_bytes, tmp_path):
    hub.files[VOCAB_URL_PATH] = b"an older version " * 10_000
    hub.cut_after[VOCAB_URL_PATH] = 1_000
    with pytest.raises(WeightsError, match="cut off"):
        weights.download("bert-base-uncased-vocab", str(tmp_path), retries=0, progress=False, log=_quiet)
    hub.files[VOCAB_URL_PATH] = vocab_bytes  # the repository was updated meanwhile
    weights.download("bert-base-uncased-vocab", str(tmp_path), retries=0, progress=False, log=_quiet)
    assert hub.log[1] == (VOCAB_URL_PATH, "bytes=1000-", len(vocab_bytes))  # If-Range failed: whole file
    assert (tmp_path / "bert-base-uncased-vocab" / "vocab.txt").read_bytes() == vocab_bytes
    assert sorted(os.listdir(tmp_path / "bert-base-uncased-vocab")) == [weights.LOCK_NAME, "vocab.txt"]


def test_checksum_mismatch_deletes_the_file_and_names_it(hub, vocab_bytes, tmp_path):
    hub.files[VOCAB_URL_PATH] = vocab_bytes[:-1] + b"!"  # right size, one byte changed
    with pytest.raises(WeightsError) as err:
        weights.download("bert-base-uncased-vocab", str(tmp_path), progress=False, log=_quiet)
    target = os.path.join(str(tmp_path), "bert-base-uncased-vocab", "vocab.txt")
    assert target in str(err.value) and "sha256" in str(err.value)
    assert not os.path.exists(target) and not os.path.exists(target + ".part")


def test_404_names_the_url_and_how_to_download_by_hand(hub, tmp_path):
    with pytest.raises(WeightsError) as err:
        weights.download("chexbert", str(tmp_path), progress=False, log=_quiet)
    url = os.environ["HF_ENDPOINT"] + "/StanfordAIMI/RRG_scorers/resolve/main/chexbert.pth"
    message = str(err.value)
    assert "HTTP 404" in message and url in message
    assert "by hand" in message and os.path.join(str(tmp_path), "chexbert", "chexbert.pth") in message


def test_no_network_says_what_failed(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(WeightsError, match="cannot reach .*127.0.0.1:9.*vocab.txt") as err:
        weights.download("bert-base-uncased-vocab", str(tmp_path), timeout=2, progress=False, log=_quiet)
    assert "curl -L -C -" in str(err.value)


def test_shards_are_read_from_the_downloaded_index(hub, tmp_path):
    shards = ("model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
              "model-00003-of-00003.safetensors")
    _fake_qwen(hub, shards)
    folder = weights.download("qwen2.5-vl-3b", str(tmp_path), progress=False, log=_quiet)
    for shard in shards:
        assert (tmp_path / "qwen2.5-vl-3b" / shard).read_bytes() == hub.files[QWEN3B + shard]
    fetched = [p for p, _, _ in hub.log]
    assert fetched.index(QWEN3B + "model.safetensors.index.json") < fetched.index(QWEN3B + shards[0])
    assert QWEN3B + "generation_config.json" in fetched  # optional: tried, 404, skipped
    assert not os.path.exists(os.path.join(folder, "generation_config.json"))
    assert weights.resolve_policy("qwen2.5-vl-3b", str(tmp_path)) == folder


def test_index_with_a_path_outside_the_folder_is_refused(hub, tmp_path):
    _fake_qwen(hub, shards=("../../evil.safetensors",))
    with pytest.raises(WeightsError, match="not a plain relative path"):
        weights.download("qwen2.5-vl-3b", str(tmp_path), progress=False, log=_quiet)
    assert not (tmp_path.parent / "evil.safetensors").exists()


def test_lock_records_first_hash_and_catches_a_changed_file(hub, tmp_path):
    _fake_qwen(hub)
    weights.download("qwen2.5-vl-3b", str(tmp_path), progress=False, log=_quiet)
    lock = json.loads((tmp_path / "qwen2.5-vl-3b" / weights.LOCK_NAME).read_text())["files"]
    shard = "model-00002-of-00002.safetensors"
    assert lock[shard]["sha256"] == hashlib.sha256(hub.files[QWEN3B + shard]).hexdigest()
    messages = []
    weights.verify("qwen2.5-vl-3b", str(tmp_path), log=messages.append)
    assert any(shard in m and "recorded in mrgr1.lock.json on first download" in m for m in messages)
    path = tmp_path / "qwen2.5-vl-3b" / shard
    data = bytearray(path.read_bytes())
    data[10] ^= 1  # same size, one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        weights.verify("qwen2.5-vl-3b", str(tmp_path), log=_quiet)


def test_download_again_skips_files_already_here(hub, vocab_bytes, tmp_path):
    hub.files[VOCAB_URL_PATH] = vocab_bytes
    weights.download("bert-base-uncased-vocab", str(tmp_path), progress=False, log=_quiet)
    weights.download("bert-base-uncased-vocab", str(tmp_path), progress=False, log=_quiet)
    assert len(hub.log) == 1


# ----------------------------------------------------------------------------- add --from

def test_add_registers_files_fetched_by_other_means(minilm_dir, tmp_path):
    # minilm_dir holds vocab.txt among other files: the published hash must match.
    assert weights.main(["add", "bert-base-uncased-vocab", "--from", minilm_dir, "--dir", str(tmp_path)]) == 0
    folder = tmp_path / "bert-base-uncased-vocab"
    assert sorted(os.listdir(folder)) == [weights.LOCK_NAME, "vocab.txt"]
    any_file = os.path.join(minilm_dir, "config.json")  # an explicit weights path is returned as given
    assert weights.resolve_chexbert(any_file, str(tmp_path)) == (any_file, str(folder / "vocab.txt"))


def test_add_rejects_a_wrong_file_and_a_missing_shard(tmp_path):
    wrong = tmp_path / "src" / "vocab.txt"
    wrong.parent.mkdir()
    wrong.write_text("not the vocabulary")
    with pytest.raises(WeightsError, match="size 18 bytes, expected 231508"):
        weights.add("bert-base-uncased-vocab", str(wrong), str(tmp_path / "w"), log=_quiet)
    assert not (tmp_path / "w" / "bert-base-uncased-vocab" / "vocab.txt").exists()  # not left in place
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    for name in ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]:
        (qwen / name).write_text("{}")
    (qwen / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(WeightsError, match="not found in .*model-1.safetensors"):
        weights.add("qwen2.5-vl-3b", str(qwen), str(tmp_path / "w"), log=_quiet)
    (qwen / "model-1.safetensors").write_bytes(b"x" * 10)
    weights.add("qwen2.5-vl-3b", str(qwen), str(tmp_path / "w"), log=_quiet)
    lock = json.loads((tmp_path / "w" / "qwen2.5-vl-3b" / weights.LOCK_NAME).read_text())["files"]
    assert lock["model-1.safetensors"] == {"size": 10, "sha256": hashlib.sha256(b"x" * 10).hexdigest()}


# ----------------------------------------------------------------------------- resolving for training

def test_resolve_policy_errors_carry_the_download_command(tmp_path):
    with pytest.raises(WeightsError) as err:
        weights.resolve_policy("huatuogpt-vision-7b", str(tmp_path / "w"))
    assert f"python -m mrgr1.weights download huatuogpt-vision-7b --dir {tmp_path / 'w'}" in str(err.value)
    with pytest.raises(WeightsError, match="neither an existing folder nor a preset"):
        weights.resolve_policy("chexbert", str(tmp_path))
    assert weights.resolve_policy("demo") is None
    assert weights.resolve_policy(str(tmp_path)) == str(tmp_path)


def test_resolve_chexbert_errors_carry_the_download_command(minilm_dir, tmp_path):
    command = f"python -m mrgr1.weights download chexbert bert-base-uncased-vocab --dir {tmp_path}"
    with pytest.raises(WeightsError, match=re.escape(command)):
        weights.resolve_chexbert(None, str(tmp_path))
    weights.add("bert-base-uncased-vocab", minilm_dir, str(tmp_path), log=_quiet)
    with pytest.raises(WeightsError, match=re.escape(command)):
        weights.resolve_chexbert(None, str(tmp_path))  # vocab present, weights not
    with pytest.raises(WeightsError, match="not found: /no/such.pth"):
        weights.resolve_chexbert("/no/such.pth", str(tmp_path))
    converted = tmp_path / "chexbert" / "chexbert.safetensors"
    converted.parent.mkdir()
    converted.write_bytes(b"")
    assert weights.resolve_chexbert(None, str(tmp_path))[0] == str(converted)


# ----------------------------------------------------------------------------- command line

def test_convert_chexbert_calls_the_converter(monkeypatch, tmp_path):
    calls = []
    fake = type(sys)("mrgr1.chexbert")
    fake.convert_to_safetensors = lambda src, out: calls.append((src, out))
    monkeypatch.setitem(sys.modules, "mrgr1.chexbert", fake)
    src = tmp_path / "chexbert.pth"
    src.write_bytes(b"")
    assert weights.main(["convert-chexbert", "--src", str(src)]) == 0
    assert calls == [(str(src), str(tmp_path / "chexbert.safetensors"))]
    assert weights.main(["convert-chexbert", "--src", str(tmp_path / "missing.pth")]) == 1


def test_cli_list_and_verify_exit_codes(hub, vocab_bytes, tmp_path):
    hub.files[VOCAB_URL_PATH] = vocab_bytes
    out = subprocess.run([sys.executable, "-m", "mrgr1.weights", "list", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "huatuogpt-vision-7b" in out and "not downloaded" in out
    assert weights.main(["verify", "--dir", str(tmp_path)]) == 1  # nothing there yet
    assert weights.main(["download", "bert-base-uncased-vocab", "--dir", str(tmp_path)]) == 0
    assert weights.main(["verify", "--dir", str(tmp_path)]) == 0
    (tmp_path / "bert-base-uncased-vocab" / "vocab.txt").write_bytes(vocab_bytes[::-1])
    assert weights.main(["verify", "bert-base-uncased-vocab", "--dir", str(tmp_path)]) == 1
