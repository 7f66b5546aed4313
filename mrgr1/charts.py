"""The charts of a run, drawn with matplotlib (optional: `pip install -e ".[plot]"`).

One renderer for every chart the project draws; the HTML pages show these PNG files as they are:

    <run>/curves.png                  the training curves of metrics.jsonl (plot_curves), shown by
                                      the rollout index (mrgr1/rollout_viewer.py)
    <eval>/per_observation.png        precision / recall / F1 per observation (plot_observations),
                                      shown by the evaluation report (mrgr1/eval_report.py)
    <ablation>/ablation.png           drawn by mrgr1/ablation.py with pyplot()

Without matplotlib every function here returns None and draws nothing; the numbers stay in
metrics.jsonl / metrics.json, and the pages say how to get the charts.

Example:
    charts.plot_curves("runs/demo/metrics.jsonl", "runs/demo/curves.png")
"""
from __future__ import annotations

import json
import math
import os
import textwrap

from .timing import PHASES

PART_NAMES = {"mccs": "MCCS", "ce_f1": "CE-F1", "bleu": "BLEU", "format": "format"}
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
PHASE_COLOURS = {"prompts": "#8c564b", "rollout": "#1f77b4", "reward": "#ff7f0e", "inputs": "#9467bd",
                 "reference": "#7f7f7f", "update": "#2ca02c"}
INSTALL_HINT = "pip install -e \".[plot]\""  # what a page without charts tells the user


def pyplot():
    """matplotlib.pyplot drawing to files, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ----------------------------------------------------------------------------- training curves

def read_metrics(log_path: str) -> list[dict]:
    """The rows of a metrics.jsonl (one dict per logged step); [] when there is no such file."""
    if not os.path.isfile(log_path):
        return []
    with open(log_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start).

    >>> moving_average([1.0, 3.0, 5.0, 7.0], 2)
    [1.0, 2.0, 4.0, 6.0]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n: int) -> int:
    """Moving-average window for n logged steps (ours): an eighth of them, from 2 to 25 steps."""
    return max(2, min(25, n // 8))


def _series(rows: list[dict], key: str, label: str):
    points = [(r["step"], float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return label, [p[0] for p in points], [p[1] for p in points]


def curve_panels(rows: list[dict]) -> list[tuple[str, list, str | None]]:
    """The six panels of the curves: (title, [(label, steps, values)], why it is empty or None)."""
    kind = next((k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and "/format/" not in k),
                "mccs")

    def panel(title, keys, missing, zero=None):
        series = [s for s in (_series(rows, k, label) for k, label in keys) if s[1]]
        if not series:
            return title, [], missing
        if zero and all(v == 0 for s in series for v in s[2]):
            return title, [], zero
        return title, series, None
    none = "no steps logged yet"
    return [
        panel("reward and its parts", [("reward", "total"), (f"rewards/{kind}/mean", PART_NAMES.get(kind, kind)),
                                       ("rewards/format/mean", "format")], none),
        panel("reward spread", [("reward_std", "std within a group"),
                                ("frac_reward_zero_std", "share of zero-spread groups")], none),
        panel("KL to the reference", [("kl", "kl")], "no KL term: the run has beta = 0 (no reference policy)",
              "kl is 0 at every step: the policy has not left the reference"),
        panel("clipped tokens", [("clip_ratio/region_mean", "either side"), ("clip_ratio/low_mean", "low"),
                                 ("clip_ratio/high_mean", "high")], "clip ratio not logged",
              "no token was clipped at any step (with one update per batch, --num-iterations 1, "
              "the ratio is exactly 1 and nothing can be clipped)"),
        panel("completion length (tokens)", [("completions/mean_length", "mean length")], none),
        panel("truncated completions", [("completions/clipped_ratio", "share without EOS")], none,
              "no completion was truncated: every one ended with EOS"),
    ]


def ce_summary(results: dict | None) -> str:
    """'test CE-F1 (micro) before GRPO 0.3100 -> after GRPO 0.4200' from train_grpo's results, or ''."""
    parts = [f"{when} GRPO {results[when]['ce_micro/f1']:.4f}" for when in ("before", "after")
             if results and "ce_micro/f1" in results.get(when, {})]
    return "test CE-F1 (micro) " + " -> ".join(parts) if parts else ""


def time_panel(rows: list[dict]) -> tuple[list[int], list[tuple[str, list[float]]], str | None]:
    """Where each step's time went: (steps, [(phase, seconds per step)] in grpo_step's order, why
    it is empty or None), from the `timing/<phase>` metrics (mrgr1/timing.py)."""
    timed = [r for r in rows if any(f"timing/{p}" in r for p in PHASES)]
    if not timed:
        return [], [], "no timing/ metrics in this metrics.jsonl"
    phases = [(p, [float(r.get(f"timing/{p}", 0.0)) for r in timed]) for p in PHASES
              if any(r.get(f"timing/{p}", 0.0) > 0 for r in timed)]
    return [r["step"] for r in timed], phases, None


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, textwrap.fill(why, 42), ha="center", va="center", fontsize=9, color="#555",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_time_panel(ax, rows: list[dict]) -> None:
    """Seconds per phase per step, stacked (bottom to top in grpo_step's order), and the whole
    step's time as a line above them (what lies between: logging, checkpoints, the ranks' wait)."""
    ax.set_title("where the time went (seconds per step)", fontsize=10)
    steps, phases, empty = time_panel(rows)
    if empty:
        _empty(ax, empty)
        return
    ax.stackplot(steps, *[v for _, v in phases], labels=[p for p, _ in phases],
                 colors=[PHASE_COLOURS[p] for p, _ in phases], alpha=0.85)
    label, line_steps, step_time = _series(rows, "step_time", "whole step")
    if line_steps:
        ax.plot(line_steps, step_time, color="black", linewidth=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    top = max(step_time + [sum(v) for v in zip(*[v for _, v in phases])])
    ax.set_ylim(0, 1.4 * top)  # room for the legend above the stack
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", ncol=2)  # top of the stack first


def curves_figure(rows: list[dict], results: dict | None = None):
    """The figure of plot_curves: the six curve panels (2 x 3) and, on the right over both rows,
    where the time went."""
    plt = pyplot()
    window = smoothing_window(len(rows))
    fig = plt.figure(figsize=(18, 6.5))
    grid = fig.add_gridspec(2, 4)
    axes = [fig.add_subplot(grid[i // 3, i % 3]) for i in range(6)]
    for ax, (title, series, empty) in zip(axes, curve_panels(rows)):
        ax.set_title(title, fontsize=10)
        if empty:
            _empty(ax, empty)
            continue
        for colour, (label, steps, values) in zip(COLOURS, series):
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, moving_average(values, window), color=colour, linewidth=2, label=label)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    draw_time_panel(fig.add_subplot(grid[:, 3]), rows)
    note = f"faint: each step; bold: mean of the last {window} steps"
    fig.suptitle("   ".join(s for s in (ce_summary(results), note) if s), fontsize=11)
    fig.tight_layout()
    return fig


def plot_curves(log_path: str, out: str, results: dict | None = None) -> str | None:
    """The curves of a run's metrics.jsonl as a PNG at `out`: raw values faint, their moving
    average bold, a panel with nothing to show says why; where the time went, stacked; the
    before/after test CE-F1 (train_grpo's results) in the title. Returns `out`, or None when
    matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    fig = curves_figure(read_metrics(log_path), results)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- per-observation bars

def plot_observations(per_observation: dict, out: str) -> str | None:
    """Precision / recall / F1 per observation (evaluate.py's per_observation: {name: {precision,
    recall, f1, support}}) as grouped bars in a PNG at `out`; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    names = list(per_observation)
    fig, ax = plt.subplots(figsize=(12, 3.6))
    for k, metric in enumerate(("precision", "recall", "f1")):
        ax.bar([i + (k - 1) * 0.27 for i in range(len(names))], [per_observation[n][metric] for n in names],
               width=0.27, color=COLOURS[k], label=metric)
    ax.set_xticks(range(len(names)), [f"{n} ({per_observation[n]['support']})" for n in names],
                  rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("per observation, positive only (in brackets: reference positives)", fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
