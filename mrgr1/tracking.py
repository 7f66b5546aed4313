"""Send a run's metrics to an experiment tracker: `train_grpo.py --report-to tensorboard|none`.

The tracker gets the same scalars as metrics.jsonl, under the same names, plus a text sample per
logged step. `none` (the default) imports nothing. Each tracker is one function returning
`log(stats, sample=None)`; another one (wandb, ...) is one more function and one more line in
`start`.

Example:
    log = tracking.start("tensorboard", "runs/demo")     # events in runs/demo/runs/
    log({"step": 1, "reward": 0.42, "kl": 0.001}, sample="<think>...</think><report>...</report>")
    # then: tensorboard --logdir runs/demo/runs
"""
from __future__ import annotations

import importlib.util
import os

REPORT_TO = ("none", "tensorboard")


def tensorboard(log_dir: str):
    """Scalars and text samples as TensorBoard event files in log_dir (pip install tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RuntimeError("--report-to tensorboard needs the tensorboard package: "
                           "pip install -e '.[tensorboard]' (or pip install tensorboard)") from e
    writer = SummaryWriter(log_dir)

    def log(stats: dict, sample: str | None = None) -> None:
        step = int(stats["step"])
        for name, value in stats.items():
            if name != "step" and isinstance(value, (int, float)):
                writer.add_scalar(name, value, step)
        if sample is not None:  # indented: a Markdown code block, so <think>/<report> show as written
            writer.add_text("sample", "    " + sample.replace("\n", "\n    "), step)
        writer.flush()  # a crashed run keeps what was logged
    return log


def missing_package(report_to: str) -> str | None:
    """What to install before logging to report_to; None when nothing is missing."""
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return "--report-to tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
    return None


def start(report_to: str, output_dir: str):
    """The `log(stats, sample=None)` function of the chosen tracker, or None for "none"."""
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        return tensorboard(os.path.join(output_dir, "runs"))
    raise ValueError(f"--report-to must be one of {REPORT_TO}, got {report_to!r}")
