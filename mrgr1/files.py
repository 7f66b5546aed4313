"""Reading the files a user hands us: every way one can be damaged becomes one line naming it.

mrgr1 reads four kinds of user files, each through one place that says what to do in its own
words: data sets (`data.load_split`, `data.load_images`: DataError), model folders
(`vlm.Qwen2_5_VL.from_pretrained`, `processing.Processor.from_pretrained`: ModelFolderError),
CheXbert weights (`chexbert.read_checkpoint`: CheXbertFileError) and training checkpoints
(`checkpoint.check_files`: CheckpointError). They share the mechanics below: a JSON or text file
that is missing, not UTF-8, not JSON or of the wrong JSON type, and a safetensors file that is
missing, truncated or not safetensors at all, each raise `error(message)` where the message
names the file, what is wrong with it and `advice` (what to do).

Example:
    config = read_json("weights/qwen/config.json", "download the model again", error=ModelFolderError)
    tensors = read_safetensors("runs/x/checkpoint-000010/adapter_model.safetensors", "resume from an earlier checkpoint")
"""
from __future__ import annotations

import json
import os


class FileError(ValueError):
    """A file the user gave that exists but cannot be read as what it should be; the message names
    it and says what to do. Both command lines show it as one `error: ...` line."""


class ModelFolderError(FileError):
    """A model folder (config.json, weights, tokenizer, preprocessor) that is damaged or does not
    match its own config.json."""


def read_text(path: str, advice: str, *, error: type[Exception] = FileError) -> str:
    """The file's text, decoded as UTF-8 (a byte-order mark is dropped)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise error(f"{path} not found; {advice}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a file; {advice}") from None
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror}); {advice}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r}); "
                    f"{advice}") from None


def read_json(path: str, advice: str, *, error: type[Exception] = FileError, expect: type | None = dict):
    """The JSON value of a file; `expect` (default a JSON object) is the type it must have."""
    text = read_text(path, advice, error=error)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {advice}") from None
    if expect is not None and not isinstance(value, expect):
        names = {dict: "an object", list: "a list", str: "a string"}
        raise error(f"{path} holds a JSON {type(value).__name__}, expected {names.get(expect, expect.__name__)}; "
                    f"{advice}")
    return value


def read_safetensors(path: str, advice: str, *, error: type[Exception] = FileError,
                     device: str = "cpu") -> dict:
    """Every tensor of a safetensors file; a missing, truncated or foreign file raises `error`."""
    from safetensors import SafetensorError  # here: `python -m mrgr1.weights` runs without torch
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise error(f"{path} not found; {advice}")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:  # a cut-off file: MetadataIncompleteBuffer
        raise error(f"{path} is not a readable safetensors file ({_short(e)}): truncated or damaged "
                    f"({os.path.getsize(path)} bytes); {advice}") from None


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
