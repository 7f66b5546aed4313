"""Public weights: the manifest, verified resumable downloads, and where training finds them.

weights_manifest.json (repository root) lists each artefact: its files, their URLs
(base_url + path), sizes and sha256 where published, license and purpose. Shard files of
a sharded checkpoint are not listed: they are read from the downloaded
model.safetensors.index.json ("shards_from"). A file whose hash the manifest does not give
is hashed on first download and recorded in <weights>/<name>/mrgr1.lock.json; later checks
compare against that record (trust on first use) and say so.

Each file comes through mrgr1/download.py (standard library only: a `.part` file that a rerun
continues with an HTTP Range request, size and sha256 checks, then a rename, so a file under its
real name is always whole). Hugging Face URLs follow HF_ENDPOINT (a mirror; default
https://huggingface.co).

    python -m mrgr1.weights list
    python -m mrgr1.weights download qwen2.5-vl-3b chexbert bert-base-uncased-vocab --dir weights
    python -m mrgr1.weights verify
    python -m mrgr1.weights add chexbert --from /media/usb/chexbert     # fetched by other means
    python -m mrgr1.weights convert-chexbert                            # .pth -> .safetensors

In code: `resolve_policy("huatuogpt-vision-7b")` -> weights/huatuogpt-vision-7b;
`resolve_chexbert()` -> (weights path, vocab path). Both raise WeightsError with the
download command when something is missing.
"""
import argparse
import json
import os
import re
import shutil
import sys

from .download import DownloadError, download_file, sha256_file
from .files import read_json

MANIFEST_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights_manifest.json")
LOCK_NAME = "mrgr1.lock.json"
HF_DEFAULT = "https://huggingface.co"


class WeightsError(RuntimeError):
    """Something about the weights is missing or wrong; the message says what to do."""


# ----------------------------------------------------------------------------- manifest

def load_manifest(path=None):
    """Read and check the manifest; return {name: entry}. `path` may also be a dict (tests)."""
    if isinstance(path, dict):
        data, where = path, "<dict>"
    else:
        where = path or MANIFEST_PATH
        if not os.path.isfile(where):
            raise WeightsError(f"weights manifest not found: {where} (pass --manifest PATH)")
        data = read_json(where, "restore it from the repository (git checkout weights_manifest.json)",
                         error=WeightsError)
    entries = {}
    for entry in data["artefacts"]:
        name = entry["name"]
        if name in entries:
            raise WeightsError(f"{where}: artefact {name!r} is listed twice")
        for spec in entry["files"]:
            _check_file_spec(where, name, spec)
        entries[name] = entry
    return entries


def _check_file_spec(where, name, spec):
    sha, size, what = spec.get("sha256"), spec.get("size"), f"{where}: {name}/{spec['path']}"
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise WeightsError(f"{what}: sha256 must be 64 lowercase hex digits or null")
    if size is not None and (type(size) is not int or size < 0):
        raise WeightsError(f"{what}: size must be a non-negative integer or null")
    _check_relative(spec["path"], f"{where}: {name}")


def _check_relative(path, where):
    """A file name from a manifest or an index must stay inside the artefact's folder."""
    parts = path.replace("\\", "/").split("/")
    if os.path.isabs(path) or ".." in parts or "" in parts:
        raise WeightsError(f"{where}: file name {path!r} is not a plain relative path")


def file_url(entry, path):
    """URL of one file of an artefact; Hugging Face URLs move to $HF_ENDPOINT (a mirror) if set."""
    base = entry["base_url"]
    if base.startswith(HF_DEFAULT + "/"):
        base = os.environ.get("HF_ENDPOINT", HF_DEFAULT).rstrip("/") + base[len(HF_DEFAULT):]
    return base + path


def download_command(names, weights_dir):
    return f"python -m mrgr1.weights download {' '.join(names)} --dir {weights_dir}"


# ----------------------------------------------------------------------------- hashing and the lock

def read_lock(folder):
    path = os.path.join(folder, LOCK_NAME)
    if not os.path.isfile(path):
        return {}
    files = read_json(path, "delete it and run `python -m mrgr1.weights verify` to hash the files again",
                      error=WeightsError).get("files")
    if not isinstance(files, dict):
        raise WeightsError(f"{path} has no 'files' record; delete it and run `python -m mrgr1.weights verify`")
    return files


def write_lock(folder, name, files):
    tmp = os.path.join(folder, LOCK_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"name": name, "files": files}, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, LOCK_NAME))


def shard_names(index_path):
    """Shard files named by a safetensors index (its weight_map values), sorted, each checked."""
    weight_map = read_json(index_path, "delete it and download again", error=WeightsError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path}: no weight_map; the index is damaged: delete it and download again")
    names = sorted(set(weight_map.values()))
    for shard in names:
        _check_relative(shard, index_path)
    return names


def expected_files(entry, folder):
    """[(path, spec)] the artefact needs: manifest files plus, once the index is here, its shards."""
    files = [(spec["path"], spec) for spec in entry["files"]]
    index = entry.get("shards_from")
    if index and os.path.isfile(os.path.join(folder, index)):
        files += [(s, {"path": s, "size": None, "sha256": None}) for s in shard_names(os.path.join(folder, index))]
    return files


def _known(spec, lock, key):
    """The manifest's size/sha256 of a file, else the one recorded in the lock, else None."""
    return spec[key] if spec.get(key) is not None else lock.get(spec["path"], {}).get(key)


def missing_files(entry, folder):
    """Required files absent (or of the wrong known size) in `folder`; [] when complete.

    Sizes only, no hashing, so it is cheap enough to call before every run; `verify` hashes.
    """
    index = entry.get("shards_from")
    if index and not os.path.isfile(os.path.join(folder, index)):
        return [index]
    lock = read_lock(folder) if os.path.isdir(folder) else {}
    missing = []
    for path, spec in expected_files(entry, folder):
        target, size = os.path.join(folder, path), _known(spec, lock, "size")
        if not os.path.isfile(target):
            if not spec.get("optional"):
                missing.append(path)
        elif size is not None and os.path.getsize(target) != size:
            missing.append(f"{path} (size {os.path.getsize(target)}, expected {size})")
    return missing


def check_file(target, spec, lock):
    """Check size and sha256 of one file; return (sha256, how it was checked). Raise on mismatch."""
    _check_size(target, spec, lock)
    digest, expected = sha256_file(target), _known(spec, lock, "sha256")
    if expected is None:
        return digest, f"no published sha256: recorded {digest[:12]}... in {LOCK_NAME}"
    how = "sha256 from the manifest" if spec.get("sha256") else f"sha256 recorded in {LOCK_NAME} on first download"
    if digest != expected:
        raise WeightsError(f"{target}: sha256 {digest} does not match the expected {expected} ({how}). "
                           "The file is damaged or was changed: delete it and download it again.")
    return digest, how


def _check_size(target, spec, lock):
    size = _known(spec, lock, "size")
    if size is not None and os.path.getsize(target) != size:
        raise WeightsError(f"{target}: size {os.path.getsize(target)} bytes, expected {size}: "
                           "delete it and download it again")


# ----------------------------------------------------------------------------- whole artefacts

def download(name, weights_dir="weights", *, manifest=None, timeout=60.0, retries=3, progress=True, log=print):
    """Download every file of artefact `name` into weights_dir/name; return that folder."""
    entry = _entry(name, manifest)
    folder = os.path.join(weights_dir, name)
    os.makedirs(folder, exist_ok=True)
    lock, done = read_lock(folder), set()
    while True:  # a sharded model takes two rounds: the index first, then the shards it names
        todo = [(p, s) for p, s in expected_files(entry, folder) if p not in done]
        if not todo:
            return folder
        for path, spec in todo:
            done.add(path)
            how = _fetch_one(entry, folder, path, spec, lock, timeout, retries, progress)
            if how:
                write_lock(folder, name, lock)
            log(f"{name}/{path}: {how or 'already here (run `verify` to hash it again)'}")


def _fetch_one(entry, folder, path, spec, lock, timeout, retries, progress):
    """Bring one file into place and record it in `lock`; return how it was checked (None: skipped)."""
    target, url = os.path.join(folder, path), file_url(entry, path)
    if os.path.isfile(target):
        _check_size(target, spec, lock)
        if path in lock or spec.get("sha256"):
            return None
        digest, how = check_file(target, spec, lock)  # placed by hand: hash it once now
    else:
        try:
            digest = download_file(url, target, size=spec.get("size"), sha256=spec.get("sha256"),
                                   timeout=timeout, retries=retries, progress=progress)
        except DownloadError as err:
            if spec.get("optional") and err.status == 404:
                return "optional, not on the server: skipped"
            raise WeightsError(str(err)) from None
        how = "sha256 from the manifest" if spec.get("sha256") else \
            f"no published sha256: recorded {digest[:12]}... in {LOCK_NAME}"
    lock[path] = {"size": os.path.getsize(target), "sha256": digest}
    return "ok (" + how + ")"


def verify(name, weights_dir="weights", *, manifest=None, log=print):
    """Hash every file of `name` against the manifest or the lock; raise WeightsError listing failures."""
    entry = _entry(name, manifest)
    folder = os.path.join(weights_dir, name)
    lock, problems = read_lock(folder), []
    for path, spec in expected_files(entry, folder):
        target = os.path.join(folder, path)
        if not os.path.isfile(target):
            if not spec.get("optional"):
                problems.append(f"{target}: missing")
            continue
        try:
            digest, how = check_file(target, spec, lock)
        except WeightsError as err:
            problems.append(str(err))
            continue
        if path not in lock:
            lock[path] = {"size": os.path.getsize(target), "sha256": digest}
            write_lock(folder, name, lock)
        log(f"{name}/{path}: ok ({how})")
    if problems:
        raise WeightsError(f"{name}: verification failed:\n  " + "\n  ".join(problems)
                           + f"\nDelete the bad files and run: {download_command([name], weights_dir)}")


def add(name, source, weights_dir="weights", *, manifest=None, log=print):
    """Register files fetched by other means: link or copy them from `source` (a folder, or the
    file itself for a one-file artefact) into weights_dir/name, check them, write the lock."""
    entry = _entry(name, manifest)
    folder = os.path.join(weights_dir, name)
    if os.path.isfile(source) and len(entry["files"]) == 1 and not entry.get("shards_from"):
        wanted = {entry["files"][0]["path"]: (source, entry["files"][0])}
    elif os.path.isdir(source):
        wanted = {p: (os.path.join(source, p), s) for p, s in expected_files(entry, source)}
    else:
        raise WeightsError(f"add {name}: {source} is not a folder (nor the single file of {name})")
    missing = [p for p, (src, s) in wanted.items() if not s.get("optional") and not os.path.isfile(src)]
    if missing:
        raise WeightsError(f"add {name}: not found in {source}: {', '.join(missing)}")
    placed = []
    for path, (src, _) in wanted.items():
        target = os.path.join(folder, path)
        if os.path.isfile(src) and not (os.path.exists(target) and os.path.samefile(src, target)):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _link_or_copy(src, target)
            placed.append(target)
    write_lock(folder, name, {})  # new files: forget any earlier record, then hash them all
    try:
        verify(name, weights_dir, manifest=manifest, log=log)
    except WeightsError as err:
        for target in placed:
            os.remove(target)
        raise WeightsError(f"add {name} from {source} failed; removed the {len(placed)} file(s) it had "
                           f"placed in {folder}.\n{err}") from None
    return folder


def _link_or_copy(src, target):
    if os.path.exists(target):
        os.remove(target)
    try:
        os.link(src, target)  # no second copy of 16 GB when both are on one disk
    except OSError:
        shutil.copy2(src, target)


def _entry(name, manifest):
    entries = load_manifest(manifest)
    if name not in entries:
        raise WeightsError(f"unknown artefact {name!r}; the manifest lists: {', '.join(entries)}")
    return entries[name]


# ----------------------------------------------------------------------------- for training and evaluation

def resolve_policy(name_or_path, weights_dir="weights", *, manifest=None):
    """Folder of a policy checkpoint, or None for "demo".

    "demo" is the demo's untrained policy (mrgr1.config preset "demo"): nothing to load, the caller builds it
    from its config. A manifest name of kind "policy" returns weights_dir/name if complete
    (sizes checked, not hashes; `verify` hashes), else raises WeightsError with the download
    command. Anything else must be an existing folder, returned as is.
    """
    if name_or_path == "demo":
        return None
    entries = load_manifest(manifest)
    policies = [n for n, e in entries.items() if e.get("kind") == "policy"]
    if name_or_path not in policies:
        if os.path.isdir(name_or_path):
            return name_or_path
        raise WeightsError(f"policy {name_or_path!r} is neither an existing folder nor a preset "
                           f"(demo, {', '.join(policies)})")
    folder = os.path.join(weights_dir, name_or_path)
    missing = missing_files(entries[name_or_path], folder)
    if missing:
        raise WeightsError(f"policy weights {name_or_path!r} are not complete in {folder} (missing: "
                           f"{', '.join(missing)}). Download them with:\n  "
                           + download_command([name_or_path], weights_dir))
    return folder


def resolve_chexbert(weights_path=None, weights_dir="weights", *, manifest=None):
    """(CheXbert weights path, vocab.txt path).

    With `weights_path` given, that file must exist. Otherwise weights_dir/chexbert/
    chexbert.safetensors (from convert-chexbert) is preferred to chexbert.pth (size checked).
    """
    entries = load_manifest(manifest)
    command = download_command(["chexbert", "bert-base-uncased-vocab"], weights_dir)
    vocab_dir = os.path.join(weights_dir, "bert-base-uncased-vocab")
    if missing_files(entries["bert-base-uncased-vocab"], vocab_dir):
        raise WeightsError(f"CheXbert's vocabulary is not in {vocab_dir}. Download it with:\n  {command}")
    vocab = os.path.join(vocab_dir, "vocab.txt")
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise WeightsError(f"CheXbert weights not found: {weights_path}. Download them with:\n  {command}")
        return weights_path, vocab
    folder = os.path.join(weights_dir, "chexbert")
    converted = os.path.join(folder, "chexbert.safetensors")
    if os.path.isfile(converted):
        return converted, vocab
    if missing_files(entries["chexbert"], folder):
        raise WeightsError(f"CheXbert weights are not in {folder}. Download them with:\n  {command}")
    return os.path.join(folder, "chexbert.pth"), vocab


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mrgr1.weights", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", default=None, help="manifest path (default: weights_manifest.json)")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default="weights", help="weights folder (default: weights)")
    sub.add_parser("list", parents=[common])
    p = sub.add_parser("download", parents=[common])
    p.add_argument("names", nargs="+")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    p = sub.add_parser("verify", parents=[common])
    p.add_argument("names", nargs="*", help="default: every artefact with a folder in --dir")
    p = sub.add_parser("add", parents=[common])
    p.add_argument("name")
    p.add_argument("--from", dest="source", required=True, help="folder holding the files (or the one file)")
    p = sub.add_parser("convert-chexbert")
    p.add_argument("--src", default=os.path.join("weights", "chexbert", "chexbert.pth"))
    p.add_argument("--out", default=None, help="default: chexbert.safetensors beside --src")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args):
    if args.command == "list":
        for name, entry in load_manifest(args.manifest).items():
            folder = os.path.join(args.dir, name)
            state = "not downloaded" if not os.path.isdir(folder) else \
                ("complete" if not missing_files(entry, folder) else "incomplete")
            known = sum(s["size"] for s in entry["files"] if s.get("size"))
            size = f"{known / 1e9:.2f} GB" if not entry.get("shards_from") else "shards listed by the index"
            print(f"{name:26s} {state:15s} {size:28s} {entry['page']}\n{'':26s} license: {entry['license']}")
    elif args.command == "download":
        for name in args.names:
            download(name, args.dir, manifest=args.manifest, timeout=args.timeout)
    elif args.command == "verify":
        names = args.names or [n for n in load_manifest(args.manifest) if os.path.isdir(os.path.join(args.dir, n))]
        if not names:
            raise WeightsError(f"nothing to verify in {args.dir}")
        for name in names:
            verify(name, args.dir, manifest=args.manifest)
    elif args.command == "add":
        add(args.name, args.source, args.dir, manifest=args.manifest)
    elif args.command == "convert-chexbert":
        if not os.path.isfile(args.src):
            raise WeightsError(f"{args.src} not found. Download it with:\n  "
                               + download_command(["chexbert"], os.path.dirname(os.path.dirname(args.src)) or "."))
        out = args.out or os.path.join(os.path.dirname(args.src), "chexbert.safetensors")
        from mrgr1.chexbert import convert_to_safetensors  # lazy: torch is loaded only for this command
        convert_to_safetensors(args.src, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
