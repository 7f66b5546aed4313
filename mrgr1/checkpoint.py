"""Training checkpoints: atomic on disk, exact on resume, safe to load.

A checkpoint is a folder `<output_dir>/checkpoint-<step>/` holding
    adapter_config.json + adapter_model.safetensors   (LoRA, PEFT's layout: peft loads it)
    or model.safetensors                              (full fine-tuning)
    trainer_state.pt    optimizer, scheduler, step, data position, RNG states: tensors and plain
                        Python values only, so it loads with torch.load(weights_only=True)
    train_config.json   the flags of the run, for a human and for the resume check
It is first written as `.checkpoint-<step>.tmp/` and then renamed, and `<output_dir>/latest`
(written the same way) names the newest complete one: a crash while saving leaves the previous
checkpoint and the `latest` pointer intact. Every file is fsync'ed before the rename and the
parent folder after it (`durable_rename`), so that after a power cut too `latest` never names a
checkpoint whose files the disk has not kept.

On resume, `config_differences` lists the flags that change the run (batch size, G, seed, lr,
loss type, LoRA shape, data set, ...) and differ from the checkpoint's train_config.json; where
it runs, how often it saves or reports, and what it evaluates do not count (`NOT_RUN_KEYS`), and
the run's length (--steps) may change with a note.
`drop_metrics_after` cuts the rows a crashed run logged after its last checkpoint.

Example:
    save_checkpoint("runs/x", step=10, model=model, optimizer=opt, scheduler=sched,
                    trainer_state={"epoch": 0, "batch": 10, "rng": rng_states(gen)}, config=vars(args))
    ckpt = find_latest("runs/x")
    check_config(ckpt, vars(args))          # CheckpointError listing every difference
    state = load_checkpoint(ckpt, model, opt, sched)
    drop_metrics_after("runs/x/metrics.jsonl", state["step"])
"""
import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from . import lora
from .files import read_json, read_safetensors, read_text
from .run_config import CONFIG_FILE  # the run's recorded configuration, in every checkpoint

STATE_FILE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing, partial or from another run."""


def rng_states(generator: torch.Generator | None = None) -> dict:
    """Every random state a resumed run needs to draw the same numbers again."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["rollout"] = generator.get_state()
    return states


def restore_rng_states(states: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "rollout" in states:
        generator.set_state(states["rollout"])


def _write_weights(model: torch.nn.Module, folder: str) -> None:
    if lora.lora_layers(model):
        lora.save_adapter(model, folder)
    else:  # full fine-tuning: every parameter (clone: tied embeddings share storage)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(folder, MODEL_FILE))


def _fsync(path: str) -> None:
    """Ask the disk to keep a file's data, or a folder's list of names."""
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a folder for fsync; NTFS journals the rename itself
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_rename(tmp: str, final: str) -> None:
    """Give a finished folder its final name so that a power cut leaves the old state or the whole
    new folder: each file fsync'ed, then the folder itself, the rename, then the parent folder
    (which holds the new name)."""
    for root, _, files in os.walk(tmp):
        for name in sorted(files):
            _fsync(os.path.join(root, name))
        _fsync(root)
    os.replace(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(output_dir: str, *, step: int, model, optimizer, scheduler,
                    trainer_state: dict, config: dict) -> str:
    """Write `<output_dir>/checkpoint-<step>/` atomically and point `latest` at it; returns its path."""
    name = f"checkpoint-{step:06d}"
    final, tmp = os.path.join(output_dir, name), os.path.join(output_dir, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_weights(model, tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             **trainer_state}
    torch.save(state, os.path.join(tmp, STATE_FILE))
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, default=str)
    if os.path.exists(final):  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    durable_rename(tmp, final)
    _atomic_write_text(os.path.join(output_dir, LATEST_FILE), name + "\n")
    return final


def find_latest(output_dir: str) -> str | None:
    """The newest complete checkpoint of a run, or None when it has none yet."""
    pointer = os.path.join(output_dir, LATEST_FILE)
    if not os.path.exists(pointer):
        return None
    name = read_text(pointer, "write the name of a checkpoint-* folder of the run into it",
                     error=CheckpointError).strip()
    folder = os.path.join(output_dir, name)
    if not name or not os.path.isdir(folder):
        raise CheckpointError(f"{pointer} names {folder}, which does not exist: the run folder was "
                              f"edited by hand; point it at an existing checkpoint-* folder")
    return folder


def checkpoint_problem(folder: str) -> str | None:
    """What is wrong with the files of a checkpoint, in one line naming the file; None when every
    file `--resume` reads is there and readable (the weights and the trainer state are read whole:
    a file cut short by a full disk or a copy is found here, before any work)."""
    state_path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_path):
        return f"{folder} is not a complete mrgr1 checkpoint ({STATE_FILE} is missing)"
    try:
        torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or holding objects that weights_only refuses
        return f"cannot read {state_path} ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    try:
        read_json(os.path.join(folder, CONFIG_FILE), "", error=CheckpointError)
        if os.path.isfile(os.path.join(folder, lora.CONFIG_FILE)):
            read_json(os.path.join(folder, lora.CONFIG_FILE), "", error=CheckpointError)
            read_safetensors(os.path.join(folder, lora.WEIGHTS_FILE), "", error=CheckpointError)
        elif os.path.isfile(os.path.join(folder, MODEL_FILE)):
            read_safetensors(os.path.join(folder, MODEL_FILE), "", error=CheckpointError)
        else:
            return f"{folder} holds no weights (neither {lora.CONFIG_FILE} nor {MODEL_FILE})"
    except CheckpointError as e:
        return str(e).removesuffix("; ")
    return None


def intact_before(folder: str) -> str | None:
    """The newest checkpoint of the same run older than `folder` whose files are all readable."""
    output_dir, name = os.path.split(os.path.abspath(folder))
    steps = [n for n in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", n)
             and os.path.isdir(os.path.join(output_dir, n))]
    older = sorted((n for n in steps if int(n.split("-")[1]) < int(name.split("-")[1])), reverse=True) \
        if re.fullmatch(r"checkpoint-\d+", name) else []
    return next((os.path.join(output_dir, n) for n in older
                 if checkpoint_problem(os.path.join(output_dir, n)) is None), None)


def _ways_out(folder: str) -> str:
    output_dir = os.path.dirname(os.path.abspath(folder))
    earlier = intact_before(folder)
    if earlier is None:
        return ("no earlier checkpoint of this run is intact: start again with --overwrite, or in "
                "another --output-dir")
    name = os.path.basename(earlier)
    return (f"{earlier} is intact: resume from it by writing its name into {os.path.join(output_dir, LATEST_FILE)} "
            f"(echo {name} > {os.path.join(output_dir, LATEST_FILE)}), then --resume again")


def check_files(folder: str) -> None:
    """Refuse to resume from a checkpoint with a missing or damaged file: CheckpointError naming
    the file and the newest earlier checkpoint that is intact."""
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(f"{problem}; {_ways_out(folder)}")


def load_checkpoint(folder: str, model, optimizer=None, scheduler=None) -> dict:
    """Restore weights (and optimizer / scheduler when given) from `folder`; return its trainer state."""
    check_files(folder)
    state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    if lora.lora_layers(model):
        if not os.path.exists(os.path.join(folder, lora.CONFIG_FILE)):
            raise CheckpointError(f"{folder} holds no LoRA adapter but the model has LoRA layers: "
                                  f"resume with the same --lora-rank as the run that wrote it")
        try:
            lora.load_adapter(model, folder)
        except (ValueError, OSError) as e:  # the adapter does not fit the model (rank, modules)
            raise CheckpointError(f"{folder}: {e}; resume with the LoRA flags of the run that wrote it") from None
    else:
        path = os.path.join(folder, MODEL_FILE)
        if not os.path.exists(path):
            raise CheckpointError(f"{folder} holds a LoRA adapter, not {MODEL_FILE}: resume with "
                                  f"LoRA enabled, as in the run that wrote it")
        tensors = read_safetensors(path, "resume from an intact checkpoint", error=CheckpointError)
        _check_shapes(model, tensors, path)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def _check_shapes(model, tensors: dict, path: str) -> None:
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in tensors.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} tensor(s) do not fit the model: {'; '.join(wrong[:3])}; "
                              f"resume with the model flags of the run that wrote it")


# ----------------------------------------------------------------------------- resume checks

# Flags that do not change what a run computes: where it runs, how often it saves or reports, what
# it evaluates before/after (--eval-*), memory savers, the decode step (every --decode gives the same
# tokens). Every other flag in train_config.json must match.
NOT_RUN_KEYS = ("resume", "overwrite", "output_dir", "weights_dir", "device", "threads",
                "save_every", "sample_every", "grad_checkpointing", "prompt_cache_gb", "decode")
# The run's length may change on resume (train longer or stop earlier); the caller says so, since
# the learning-rate schedule then spans the new length.
LENGTH_KEYS = ("steps",)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_differences(stored: dict, current: dict) -> list[str]:
    """'--flag: <checkpoint's value> in the checkpoint, <value> now' for each flag that changes the
    run and differs. Flags the checkpoint does not record (added to mrgr1 later) are not compared;
    NOT_RUN_KEYS, LENGTH_KEYS and --eval-* never are."""
    current = json.loads(json.dumps(current, default=str))  # the form train_config.json stores
    return [f"{_flag(k)}: {stored[k]!r} in the checkpoint, {current[k]!r} now" for k in sorted(current)
            if k in stored and k not in NOT_RUN_KEYS + LENGTH_KEYS and not k.startswith("eval_")
            and stored[k] != current[k]]


def check_config(folder: str, current: dict) -> list[str]:
    """Refuse to resume `folder` when a file of it is damaged (`check_files`) or with flags that
    change the run; the error lists each difference.
    Returns a note for each LENGTH_KEYS flag that differs (allowed: the run gets longer or shorter)."""
    check_files(folder)
    stored = read_json(os.path.join(folder, CONFIG_FILE), "resume from an intact checkpoint", error=CheckpointError)
    differences = config_differences(stored, current)
    if differences:
        raise CheckpointError(f"--resume: {folder} was trained with other settings ({'; '.join(differences)}); "
                              f"resume with the checkpoint's values, or start a new run in another --output-dir")
    current = json.loads(json.dumps(current, default=str))
    return [f"note: {_flag(k)} {current[k]} (the checkpoint's run had {stored[k]}): the learning-rate "
            f"schedule now spans the new length" for k in LENGTH_KEYS
            if k in stored and k in current and stored[k] != current[k]]


def drop_metrics_after(path: str, step: int) -> int:
    """Cut the rows of a metrics .jsonl past `step` (logged after the checkpoint a run resumes
    from, and logged again by the resumed run), and a last line cut short by a crash; returns how
    many rows were dropped. The file is rewritten atomically."""
    if not os.path.exists(path):
        return 0
    lines = read_text(path, "it is the run's log, written by train_grpo.py: move it aside to start a new log",
                      error=CheckpointError).splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the partial last line of a killed run
        if row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        _atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
