"""The paper's ablation table on one data set, over training seeds: one command, resumable.

    python -m mrgr1.ablation --dataset demo                  # 3 seeds x 8 rows, CPU
    python -m mrgr1.ablation --dataset demo --seeds 1        # the quick version
    python -m mrgr1.ablation --dataset iu_xray --policy huatuogpt-vision-7b --labeler chexbert

MRG-R1 (arXiv 2512.16145) argues by comparison: GRPO on 0.75 MCCS + 0.25 format beats token-level
MLE, removing either reward hurts, and MCCS beats a plain CE-F1 reward and lexical (NLG) rewards.
This command trains and scores those rows with the package's own command lines (`python -m
mrgr1.train`, `python -m mrgr1.evaluate`: what train_grpo.py and evaluate.py run), each job a
subprocess with its own folder (<output-dir>/seed<s>/<row>/), so every row is the exact run a user
would get:

    sft          train --steps 0                          the SFT start (MLE): its sft/ folder; every
                                                          other row of the seed starts from it
    sft_more     train --policy START --sft-steps E --steps 0              (its sft/ folder likewise)
                 E extra SFT steps with LoRA (the parameters GRPO trains), E matched to GRPO's compute
    grpo_*       train --policy START --sft-steps 0 --reward R --reward-weights W
    every row    evaluate --policy START|<row>/sft [--adapter <row>/final] on the same test studies

Compute (ours, stated plainly): sequences passed forward and backward. A GRPO step passes
B x G x num_iterations (prompt + completion) sequences, an SFT step sft_batch_size (prompt +
reference report) sequences, so E = ceil(steps x B x G x num_iterations / sft_batch_size). GRPO's
sampling and reference passes are forward only and not counted.

Resumable: a row whose <row>/eval/metrics.json exists is never run again; a row whose training
finished is only scored; an interrupted GRPO run continues from its last checkpoint (--resume).
Outputs: <output-dir>/ablation.md (mean +- sample std over seeds), ablation.json, ablation.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

from . import charts, checkpoint, train, weights
from .processing import Processor

# (name, label, train_grpo.py flags). The CE-F1 and BLEU rows keep the 0.25 format weight, so that
# only the content reward changes against the paper's row (ours: the paper does not say).
GRPO_ROWS = (
    ("grpo_mccs_format", "GRPO: MCCS + format (0.75/0.25, the paper's)", ("--reward", "mccs", "--reward-weights", "0.75,0.25")),
    ("grpo_mccs", "GRPO: MCCS only", ("--reward", "mccs", "--reward-weights", "1,0")),
    ("grpo_format", "GRPO: format only", ("--reward", "mccs", "--reward-weights", "0,1")),
    ("grpo_ce_f1", "GRPO: CE-F1 per report + format", ("--reward", "ce_f1", "--reward-weights", "0.75,0.25")),
    ("grpo_bleu", "GRPO: BLEU + format", ("--reward", "bleu", "--reward-weights", "0.75,0.25")),
    ("grpo_dynamic", "GRPO: MCCS + format, dynamic sampling (DAPO)",
     ("--reward", "mccs", "--reward-weights", "0.75,0.25", "--dynamic-sampling")),
)
ROWS = (("sft", "SFT only (MLE)", ()), ("sft_more", "SFT + extra SFT (GRPO's compute)", ())) + GRPO_ROWS
# (key, column title, digits): evaluate.py's metrics.json keys, and mean_length computed here
COLUMNS = (("ce_micro/f1", "CE-F1 micro", 4), ("ce_example/f1", "CE-F1 per report", 4),
           ("ce_macro/f1", "CE macro-F1", 4), ("format_reward/mean", "well-formed", 4),
           ("bleu_4", "BLEU-4", 4), ("rouge_l", "ROUGE-L", 4), ("mean_length", "length (tokens)", 1))
# train_grpo.py flags the ablation passes through when given
TRAIN_KNOBS = ("sft_steps", "steps", "batch_size", "num_generations", "max_new_tokens", "sft_batch_size",
               "lr", "sft_lr", "beta", "lora_rank", "threads", "dtype", "device", "decode")


class AblationError(RuntimeError):
    """A problem the user can fix; the message says what to do."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="demo", choices=("demo", "iu_xray", "mimic_cxr"))
    a("--data-root", default=None, help="default data/<dataset>")
    a("--policy", default=None, help="train_grpo.py's default: demo (demo), huatuogpt-vision-7b (real)")
    a("--labeler", default=None, choices=("chexbert", "rules"), help="default: rules (demo), chexbert (real)")
    a("--chexbert-weights", default=None)
    a("--weights-dir", default="weights")
    a("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3; 1 is the quick version)")
    a("--rows", default=",".join(r[0] for r in ROWS), help="comma-separated subset of the rows")
    a("--output-dir", default=None, help="default runs/ablation-<dataset>")
    a("--eval-limit", type=int, default=None, help="test studies scored (default train_grpo.py's --eval-limit)")
    a("--eval-batch-size", type=int, default=8, help="studies decoded together by evaluate.py")
    for knob in TRAIN_KNOBS:
        a("--" + knob.replace("_", "-"), default=None, type=str, help="passed to the training command line")
    a("--train-args", default="", help="more training flags for every training job, one string")
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or os.path.join("runs", f"ablation-{args.dataset}")
    names = [r[0] for r in ROWS]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in names]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


# ----------------------------------------------------------------------------- the command lines

def train_settings(argv: list[str]):
    """The run configuration the training command line builds from these flags (demo or real preset)."""
    return train.parse_args(argv)


def extra_sft_steps(settings: argparse.Namespace) -> int:
    """SFT steps that pass as many sequences forward and backward as GRPO's steps do."""
    grpo = settings.steps * settings.batch_size * settings.num_generations * settings.num_iterations
    return math.ceil(grpo / settings.sft_batch_size)


def run_job(cmd: list[str], log_path: str) -> float:
    """Run one command line, its output appended to log_path; returns its wall seconds."""
    t0 = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-5:])
        raise AblationError(f"`{shlex.join(cmd)}` failed (exit {done.returncode}); its log is {log_path}, "
                            f"ending:\n{tail}")
    return time.time() - t0


def common_train_flags(args) -> list[str]:
    flags = ["--dataset", args.dataset, "--weights-dir", args.weights_dir]
    for key in ("data_root", "labeler", "chexbert_weights") + TRAIN_KNOBS:
        if getattr(args, key) is not None:
            flags += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return flags + shlex.split(args.train_args)


def check_settings(args) -> None:
    """The output folder's rows must all come from the same flags (--seeds and --rows aside):
    written on the first run, compared on every later one."""
    path = os.path.join(args.output_dir, "ablation_config.json")
    now = {k: v for k, v in vars(args).items() if k not in ("seeds", "rows", "argv", "output_dir")}
    before = read_json(path)
    if before is None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(now, f, indent=2)
        return
    changed = [f"--{k.replace('_', '-')}: {before.get(k)!r} then, {now[k]!r} now" for k in now if before.get(k) != now[k]]
    if changed:
        raise AblationError(f"{args.output_dir} holds rows run with other settings ({'; '.join(changed)}); "
                            f"use another --output-dir, or delete that folder to start again")


# ----------------------------------------------------------------------------- one seed

def options(tokens) -> list[list[str]]:
    """Command-line tokens as options: [name, value] or [name] for a switch (no value follows).
    >>> options(["--steps", "2", "--dynamic-sampling", "--lr", "-1e-3"])
    [['--steps', '2'], ['--dynamic-sampling'], ['--lr', '-1e-3']]
    """
    out = []
    for token in tokens:
        if token.startswith("--") or not out:
            out.append([token])
        else:
            out[-1].append(token)
    return out


def with_flags(flags: list[str], *given: str) -> list[str]:
    """flags with each option of `given` set (name value, or a switch alone): earlier occurrences
    of its name removed."""
    names = {o[0] for o in options(given)}
    return [t for o in options(flags) if o[0] not in names for t in o] + list(given)


def read_json(path: str):
    """A JSON file's content, or None when absent or cut short (a crash while writing)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def train_row(name: str, flags: list[str], folder: str, done_file: str) -> float:
    """Train one row unless done_file exists; continue from its last checkpoint if it has one,
    else start it afresh (a job stopped before its first checkpoint)."""
    if os.path.exists(done_file):
        return 0.0
    os.makedirs(folder, exist_ok=True)
    # the rows are scored by evaluate.py: no evaluation inside the training job
    cmd = [sys.executable, "-m", "mrgr1.train", *with_flags(flags, "--eval-limit", "0", "--sample-every", "0"),
           "--output-dir", folder]
    if checkpoint.find_latest(folder):
        cmd.append("--resume")
    elif any(n in os.listdir(folder) for n in ("sft", "init", "final")):  # stopped before a checkpoint:
        cmd.append("--overwrite")                                          # start that job afresh
    print(f"  {name}: training (log {os.path.join(folder, 'train.log')})", flush=True)
    return run_job(cmd, os.path.join(folder, "train.log"))


def eval_limit(args, settings) -> int:
    """Test studies scored per row: --eval-limit, else train_grpo.py's default (demo 100, real 200)."""
    return settings.eval_limit if args.eval_limit is None else args.eval_limit


def evaluate_row(args, settings, name: str, folder: str, policy: str, adapter: str | None) -> float:
    eval_dir = os.path.join(folder, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "mrgr1.evaluate", "--dataset", args.dataset, "--policy", policy,
           "--weights-dir", args.weights_dir, "--labeler", settings.labeler, "--split", "test",
           "--max-new-tokens", str(settings.max_new_tokens), "--limit", str(eval_limit(args, settings)),
           "--eval-batch-size", str(args.eval_batch_size), "--dtype", settings.dtype, "--output-dir", eval_dir]
    for key in ("data_root", "chexbert_weights", "device", "decode"):
        if getattr(args, key) is not None:
            cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    if adapter:
        cmd += ["--adapter", adapter]
    print(f"  {name}: scoring (log {os.path.join(folder, 'eval.log')})", flush=True)
    return run_job(cmd, os.path.join(folder, "eval.log"))


def start_folder(args, settings, seed: int) -> str:
    """The seed's SFT start: <seed>/sft/sft after SFT, the untrained demo model in <seed>/sft/init
    without it, or a pretrained policy as it is (real data's default: no SFT)."""
    if settings.sft_steps == 0 and settings.policy != "demo":
        return weights.resolve_policy(settings.policy, args.weights_dir)
    return os.path.join(args.output_dir, f"seed{seed}", "sft", "sft" if settings.sft_steps else "init")


def ensure_start(args, settings, base: list[str], seed: int) -> float:
    """Train the seed's SFT start (SFT alone: --steps 0) unless it exists or is a pretrained policy."""
    start = start_folder(args, settings, seed)
    if settings.sft_steps == 0 and settings.policy != "demo":
        return 0.0
    marker = os.path.join(start, "config.json" if settings.sft_steps else "model.safetensors")  # written last
    return train_row("sft", with_flags(base, "--steps", "0"), os.path.dirname(start), marker)


def run_seed(args, seed: int) -> None:
    """Every requested row of one seed not scored yet: the SFT start first, then the rows from it."""
    base = with_flags(common_train_flags(args), "--seed", str(seed))
    settings = train_settings(base)
    start = start_folder(args, settings, seed)
    print(f"seed {seed}:", flush=True)
    for name, _, reward_flags in ROWS:
        folder = os.path.join(args.output_dir, f"seed{seed}", name)
        if name not in args.rows or read_json(os.path.join(folder, "eval", "metrics.json")) is not None:
            continue
        seconds = ensure_start(args, settings, base, seed)
        from_start = with_flags(base, "--policy", start)
        if name == "sft":
            policy, adapter = start, None
        elif name == "sft_more":
            steps = extra_sft_steps(train_settings(with_flags(base, *GRPO_ROWS[0][2])))
            seconds += train_row(name, with_flags(from_start, "--sft-steps", str(steps), "--steps", "0"), folder,
                                 os.path.join(folder, "sft", "config.json"))
            policy, adapter = os.path.join(folder, "sft"), None
        else:
            seconds += train_row(name, with_flags(from_start, "--sft-steps", "0", *reward_flags), folder,
                                 os.path.join(folder, "final", "adapter_config.json"))
            policy, adapter = start, os.path.join(folder, "final")
        seconds += evaluate_row(args, settings, name, folder, policy, adapter)
        with open(os.path.join(folder, "timing.json"), "w", encoding="utf-8") as f:
            json.dump({"seconds": seconds}, f)
        print(f"  {name}: done in {seconds / 60:.1f} min", flush=True)


# ----------------------------------------------------------------------------- the table

def row_scores(folder: str, processor: Processor) -> dict:
    """The row's metrics.json scores, plus the mean completion length in the policy's tokens
    (re-encoded from predictions.jsonl: evaluate.py does not record it)."""
    scores = read_json(os.path.join(folder, "eval", "metrics.json"))
    with open(os.path.join(folder, "eval", "predictions.jsonl"), encoding="utf-8") as f:
        generated = [json.loads(line)["generated"] for line in f if line.strip()]
    scores["mean_length"] = sum(len(processor.encode(t)) for t in generated) / len(generated)
    return scores


def summarize(values: list[float], digits: int) -> str:
    """'mean +- sample std' over seeds (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def seed_scores(args) -> dict:
    """{row: [row_scores of seed 0, 1, ...]} for every requested row; each seed's tokenizer (its
    start's) loaded once."""
    settings = train_settings(common_train_flags(args))
    processors = [Processor.from_pretrained(start_folder(args, settings, seed)) for seed in range(args.seeds)]
    return {name: [row_scores(os.path.join(args.output_dir, f"seed{seed}", name), processors[seed])
                   for seed in range(args.seeds)] for name, _, _ in ROWS if name in args.rows}


def collect(scores: dict) -> dict:
    """{row: {column: [value per seed]}} from seed_scores."""
    return {name: {key: [s[key] for s in per_seed] for key, _, _ in COLUMNS} for name, per_seed in scores.items()}


def settings_line(settings: argparse.Namespace, extra_steps: int) -> str:
    """The training settings every row shares, as train_grpo.py resolved them."""
    return (f"SFT start: {settings.sft_steps} steps of {settings.sft_batch_size} studies (lr {settings.sft_lr}). "
            f"GRPO: {settings.steps} steps of {settings.batch_size} studies x {settings.num_generations} "
            f"completions, lr {settings.lr}, beta {settings.beta}, {settings.num_iterations} update(s) per "
            f"batch, LoRA rank {settings.lora_rank}, T {settings.temperature}, {settings.max_new_tokens} new "
            f"tokens. SFT + extra SFT: {extra_steps} LoRA SFT steps, the sequences GRPO passes forward and "
            f"backward.")


def markdown(args, table: dict, extra_steps: int, minutes: float) -> str:
    labels = {name: label for name, label, _ in ROWS}
    settings = train_settings(common_train_flags(args))
    head = "| row | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [f"# Ablation on {args.dataset}: {args.seeds} seed(s)" + (", mean ± sample std" if args.seeds > 1 else ""),
             "", f"Command: `python -m mrgr1.ablation {shlex.join(args.argv)}`", "",
             settings_line(settings, extra_steps), "",
             f"Test studies scored per row: {eval_limit(args, settings)} (greedy, "
             f"{settings.labeler} labeler). Training + scoring time summed over the rows' jobs: "
             f"{minutes:.1f} min.", "",
             head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, columns in table.items():
        cells = [summarize(columns[key], digits) for key, _, digits in COLUMNS]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def observation_table(scores: dict) -> str:
    """F1 per observation (positive only, evaluate.py's per_observation) of every row, mean over
    seeds: which findings each way of training gets into the greedy reports. scores: seed_scores."""
    rows = list(scores)
    seeds = len(scores[rows[0]])
    f1s = {name: [s["per_observation"] for s in per_seed] for name, per_seed in scores.items()}
    first = f1s[rows[0]][0]
    lines = ["F1 per observation (positive only), " + ("mean over seeds" if seeds > 1 else "seed 0")
             + "; support = test studies whose reference states it:", "",
             "| observation | support | " + " | ".join(rows) + " |", "|" + "---|" * (len(rows) + 2)]
    for obs, first_scores in first.items():
        cells = [f"{statistics.mean(s[obs]['f1'] for s in f1s[name]):.2f}" for name in rows]
        lines.append(f"| {obs} | {first_scores['support']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, out: str) -> bool:
    """CE-F1 micro per row, mean with sample-std error bars and each seed as a dot."""
    plt = charts.pyplot()
    if plt is None:
        return False
    labels = {name: label for name, label, _ in ROWS}
    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(names)))
    for i, name in enumerate(names):
        values = table[name]["ce_micro/f1"]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.barh(i, statistics.mean(values), xerr=std, color="tab:blue", alpha=0.6, capsize=3)
        ax.plot(values, [i] * len(values), "k.", markersize=4)
    ax.set_yticks(range(len(names)), [labels[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("test CE-F1 (micro)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    os.makedirs(args.output_dir, exist_ok=True)
    check_settings(args)
    settings = train_settings(common_train_flags(args))
    extra = extra_sft_steps(train_settings(with_flags(common_train_flags(args), *GRPO_ROWS[0][2])))
    print(f"ablation on {args.dataset}: {args.seeds} seed(s), rows {', '.join(args.rows)}; "
          f"GRPO {settings.steps} steps of {settings.batch_size} x {settings.num_generations}, "
          f"SFT start {settings.sft_steps} steps, extra SFT {extra} steps; output {args.output_dir}", flush=True)
    for seed in range(args.seeds):
        run_seed(args, seed)
    scores = seed_scores(args)
    table = collect(scores)
    minutes = sum((read_json(os.path.join(args.output_dir, f"seed{s}", n, "timing.json")) or {}).get("seconds", 0)
                  for s in range(args.seeds) for n in args.rows) / 60
    text = markdown(args, table, extra, minutes) + "\n" + observation_table(scores)
    with open(os.path.join(args.output_dir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.output_dir, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump({"seeds": args.seeds, "extra_sft_steps": extra, "rows": table}, f, indent=2)
    png = os.path.join(args.output_dir, "ablation.png")
    drawn = plot(table, png)
    print("\n" + text + f"wrote {os.path.join(args.output_dir, 'ablation.md')}"
          + (f", {png}" if drawn else " (no matplotlib: no ablation.png)"))
    return table


if __name__ == "__main__":
    try:
        main()
    except (AblationError, weights.WeightsError) as e:
        sys.exit(f"error: {e}")
