"""The run configuration: every knob of a training run, its default, its help and its bounds, once.

Both command lines derive their flags from `RunConfig` (as TRL derives its CLI from GRPOConfig):
`train_grpo.py` exposes every field, `evaluate.py` the ones that decide how a policy is run and
scored (data, model, pixels, prompt wording, new-token budget, labeler). A field's default is the
real-data value; the `demo` preset overrides a few (a tiny model on a CPU, minutes). A run folder
records its configuration (`train_config.json`, `save`), and evaluating a run reads it back
(`load_recorded`), so the two command lines cannot disagree.

None of the defaults is published by the paper except the reward (0.75 MCCS + 0.25 format, the
signed mapping of CheXbert codes); every other value marked "ours" is our choice.

Example:
    cfg = preset("demo", steps=10)             # the demo with 10 GRPO steps
    check(cfg)                                 # UsageError naming every flag out of bounds
    parser = build_parser(...); cfg = from_args(parser.parse_args(argv))
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

from . import data, generate, processing
from .files import read_json

GROUPS = ("data", "model", "prompt", "reward", "GRPO", "SFT", "evaluation", "run")
DEMO_PIXELS = 84 * 84  # the demo's 112 px views are resized to 84 px: 6x6 patches, 9 tokens (ours)


class UsageError(ValueError):
    """A flag value that cannot work, or an output folder that holds another run; the message
    names the flag or folder and what to do. The command lines show it as one `error:` line."""


def knob(default, group: str, help: str, *, demo=dataclasses.MISSING, choices=None, check=None):
    """A field of RunConfig: its real-data default, the demo's (when it differs), the --help
    group and text, the allowed choices, and `check`: (is_ok(value), what is needed) or None."""
    return field(default=default, metadata={"group": group, "help": help, "demo": demo,
                                            "choices": choices, "check": check})


AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
ABOVE_0 = (lambda v: v > 0, "above 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")


@dataclass
class RunConfig:
    # ---- data
    dataset: str = knob("demo", "data", "demo (drawn on first use) | iu_xray | mimic_cxr", choices=data.DATASETS)
    data_root: str | None = knob(None, "data", "default data/<dataset>")
    all_images: bool = knob(False, "data", "MIMIC-CXR: every image of a study, not the first")
    # ---- model
    policy: str = knob("huatuogpt-vision-7b", "model", "demo (an untrained 4-layer model, trained by SFT "
                       "first) | a preset of weights_manifest.json | a Hugging Face model folder", demo="demo")
    weights_dir: str = knob("weights", "model", "where presets and CheXbert are downloaded")
    lora_rank: int = knob(64, "model", "LoRA rank r (ours); 0 = full fine-tuning (demo model only)",
                          demo=16, check=AT_LEAST_0)
    lora_alpha: float = knob(128.0, "model", "LoRA alpha (ours)", demo=32.0, check=ABOVE_0)
    lora_dropout: float = knob(0.0, "model", "dropout on the LoRA input while training SFT (ours); GRPO "
                               "computes every log-prob without dropout, so that r = 1 before the first update",
                               check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    min_pixels: int = knob(processing.DEFAULT_MIN_PIXELS, "model", "fewest pixels per view after resizing "
                           "(ours: 56x56; demo 84x84)", demo=DEMO_PIXELS, check=AT_LEAST_1)
    max_pixels: int = knob(processing.DEFAULT_MAX_PIXELS, "model", "most pixels per view after resizing (ours: "
                           "448x448 = 256 image tokens; demo 84x84); overrides the checkpoint's "
                           "preprocessor_config.json", demo=DEMO_PIXELS, check=AT_LEAST_1)
    dtype: str = knob("float32", "model", "parameter dtype", choices=("float32", "bfloat16", "float16"))
    grad_checkpointing: bool = knob(False, "model", "recompute activations in backward (SFT and GRPO)")
    # ---- prompt (ours: the paper does not publish its prompt)
    system_prompt: str = knob("You are an expert radiologist who writes accurate chest X-ray reports.",
                              "prompt", "the system turn (ours)")
    instruction: str = knob("Write the radiology report for this chest X-ray study. First reason about the "
                            "findings inside <think> </think>, then give the final report inside "
                            "<report> </report>.", "prompt", "the user turn after the views (ours)")
    sft_think: str = knob("I check the heart, mediastinum, lungs, pleura, bones and devices on each view.",
                          "prompt", "the <think> text of every SFT target: reference reports carry no "
                          "reasoning (ours)")
    # ---- reward
    labeler: str = knob("chexbert", "reward", "reward and evaluation labeler: chexbert (the paper's) or "
                        "rules (no download; exact on the demo's templated reports)", demo="rules",
                        choices=("chexbert", "rules"))
    chexbert_weights: str | None = knob(None, "reward", "chexbert.pth or .safetensors (default: weights/chexbert)")
    reward: str = knob("mccs", "reward", "content reward: mccs (the paper's) | ce_f1 | bleu (its ablations)",
                       choices=("mccs", "ce_f1", "bleu"))
    reward_weights: tuple = knob((0.75, 0.25), "reward", "content,format weights (the paper's: 0.75,0.25)",
                                 check=(lambda v: len(v) == 2, "2 comma-separated numbers"))
    mccs_margin: float = knob(0.5, "reward", "m in MCCS = max((CCS - m) / (1 - m), 0) (ours)",
                              check=(lambda v: -1 <= v < 1, "in [-1, 1)"))
    mccs_mapping: tuple = knob((0.0, 1.0, -1.0, 1.0), "reward", "signed value of CheXbert codes blank,"
                               "positive,negative,uncertain in the MCCS vectors (the paper's: 0,1,-1,1)",
                               check=(lambda v: len(v) == 4, "4 comma-separated numbers"))
    # ---- GRPO
    steps: int = knob(1000, "GRPO", "GRPO steps (0: SFT only)", demo=40, check=AT_LEAST_0)
    batch_size: int = knob(4, "GRPO", "studies per step (B); rollouts per step = B x G", demo=8, check=AT_LEAST_1)
    num_generations: int = knob(8, "GRPO", "G completions per study (ours)",
                                check=(lambda v: v >= 2, "at least 2: advantages compare the completions of one study"))
    max_new_tokens: int = knob(256, "GRPO", "completion budget, for rollouts and evaluation (ours)", demo=72,
                               check=AT_LEAST_1)
    temperature: float = knob(1.0, "GRPO", "rollout temperature T; log-probs use the same T (ours)",
                              check=(lambda v: v > 0, "above 0: rollouts are sampled and scored at this "
                                     "temperature; greedy decoding (0) has no log-probs"))
    top_p: float = knob(1.0, "GRPO", "nucleus sampling for rollouts (ours: off)", check=(lambda v: 0 < v <= 1, "in (0, 1]"))
    lr: float = knob(1e-5, "GRPO", "AdamW learning rate (ours)", demo=2e-3, check=ABOVE_0)
    weight_decay: float = knob(0.0, "GRPO", "AdamW weight decay", check=AT_LEAST_0)
    warmup_ratio: float = knob(0.05, "GRPO", "linear warmup share of the steps, then cosine decay", check=UNIT)
    max_grad_norm: float = knob(1.0, "GRPO", "gradient-norm clipping", check=ABOVE_0)
    beta: float = knob(0.04, "GRPO", "KL weight to the reference policy; 0 skips the reference (ours)", check=AT_LEAST_0)
    epsilon: float = knob(0.2, "GRPO", "clip range: r >= 1 - epsilon", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    epsilon_high: float | None = knob(None, "GRPO", "clip range: r <= 1 + epsilon_high (default: epsilon; "
                                      "DAPO's clip-higher when larger)", check=AT_LEAST_0)
    loss_type: str = knob("grpo", "GRPO", "token aggregation of the loss (grpo.py)",
                          choices=("grpo", "bnpo", "dapo", "dr_grpo"))
    scale_rewards: str = knob("group", "GRPO", "advantage scaling: group std | batch std | none (Dr. GRPO)",
                              choices=("group", "batch", "none"))
    mask_truncated: bool = knob(False, "GRPO", "drop completions without EOS from the loss (DAPO)")
    num_iterations: int = knob(1, "GRPO", "updates per batch of rollouts (mu; demo 2, so that the ratio moves "
                               "and clipping acts)", demo=2, check=AT_LEAST_1)
    dynamic_sampling: bool = knob(False, "GRPO", "drop the groups whose G rewards are all equal (their advantages "
                                  "are 0) and roll out further studies until B groups differ: DAPO's dynamic "
                                  "sampling (ours: off until the ablation measures it)")
    dynamic_sampling_rounds: int = knob(3, "GRPO", "with --dynamic-sampling, the most extra rounds of B studies a "
                                        "step draws (ours); a step with no informative group after them makes "
                                        "no update", check=AT_LEAST_0)
    grad_accum: int = knob(1, "GRPO", "micro-batches per optimizer step: a step's B x G rollouts (per rank) "
                           "split into this many", check=AT_LEAST_1)
    shared_prompt: bool = knob(True, "GRPO", "run each study's prompt through the decoder once for its G "
                               "completions in the reference pass and the updates (exact; shared_prompt.py)")
    # ---- SFT warm start
    sft_steps: int = knob(0, "SFT", "teacher-forced warm-start steps before GRPO", demo=1000, check=AT_LEAST_0)
    sft_lr: float = knob(1e-5, "SFT", "SFT learning rate", demo=3e-3, check=ABOVE_0)
    sft_batch_size: int = knob(4, "SFT", "studies per SFT step", demo=16, check=AT_LEAST_1)
    # ---- evaluation (before and after GRPO, and evaluate.py)
    eval_limit: int = knob(200, "evaluation", "test studies scored before/after GRPO (0 = skip)", demo=100,
                           check=AT_LEAST_0)
    eval_samples: int = knob(0, "evaluation", "sampled completions per test study whose mean reward is "
                             "printed before/after GRPO (0 = skip)", demo=8, check=AT_LEAST_0)
    eval_batch_size: int = knob(16, "evaluation", "studies decoded together when evaluating (greedy)", check=AT_LEAST_1)
    eval_sample_batch_size: int = knob(8, "evaluation", "studies per batch when drawing --eval-samples "
                                       "completions each", check=AT_LEAST_1)
    # ---- run
    seed: int = knob(0, "run", "seed of the model init (demo), batches, rollouts and dropout")
    output_dir: str | None = knob(None, "run", "default runs/<dataset>")
    save_every: int = knob(100, "run", "checkpoint every N steps (and at the last)", demo=20, check=AT_LEAST_1)
    sample_every: int = knob(10, "run", "every N steps and at the last: print a sample and write the rollout "
                             "page <output-dir>/rollouts/step-N.html (0 = never)", check=AT_LEAST_0)
    report_to: str = knob("none", "run", "also log the metrics to TensorBoard in <output-dir>/runs",
                          choices=("none", "tensorboard"))
    resume: bool = knob(False, "run", "continue from the newest checkpoint in --output-dir")
    overwrite: bool = knob(False, "run", "start afresh in an --output-dir that holds an earlier run (deletes it)")
    prompt_cache_gb: float = knob(2.0, "run", "keep each study's encoded prompt after first use, up to this "
                                  "many GB (ours; 0 = encode every time, same results)", check=AT_LEAST_0)
    device: str | None = knob(None, "run", "cpu | cuda | cuda:N (default: cuda when available)")
    decode: str = knob("auto", "run", "decode step of the rollouts and the evaluation (mrgr1/generate.py; all "
                       "give the same tokens): eager | static (static shapes) | graph (the static step "
                       "replayed as a CUDA graph; CUDA only) | auto (eager until a GPU measures graph faster; "
                       "docs/generation.md)", choices=generate.DECODE_MODES)
    threads: int | None = knob(None, "run", "CPU threads for torch (default: torch's own choice)", check=AT_LEAST_1)

    @property
    def clip_high(self) -> float:
        """epsilon_high, or epsilon when it is not given (symmetric clipping)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def reward_weight_map(self) -> dict:
        """{content kind: w, "format": w}: what rewards.compute_rewards takes."""
        return {self.reward: self.reward_weights[0], "format": self.reward_weights[1]}


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def preset(name: str, **overrides) -> RunConfig:
    """The `demo` or `real` configuration, with overrides (field names) applied."""
    if name not in ("demo", "real"):
        raise ValueError(f"preset must be 'demo' or 'real', got {name!r}")
    values = {n: f.metadata["demo"] for n, f in FIELDS.items()
              if name == "demo" and f.metadata["demo"] is not dataclasses.MISSING}
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown RunConfig fields {unknown}")
    return RunConfig(**{**values, **overrides})


def for_dataset(dataset: str, **overrides) -> RunConfig:
    """The demo preset for the demo data set, the real one otherwise."""
    return preset("demo" if dataset == "demo" else "real", dataset=dataset, **overrides)


# ----------------------------------------------------------------------------- checks

def check(cfg: RunConfig) -> None:
    """Every value that cannot work, refused at once (one UsageError naming each flag)."""
    problems = []
    for name, f in FIELDS.items():
        value, rule = getattr(cfg, name), f.metadata["check"]
        if rule is not None and value is not None and not rule[0](value):
            problems.append(f"{flag(name)} {format_value(value)} ({rule[1]})")
        choices = f.metadata["choices"]
        if choices and value is not None and value not in choices:
            problems.append(f"{flag(name)} {value!r} (one of {', '.join(choices)})")
    if cfg.max_pixels < cfg.min_pixels:
        problems.append(f"--max-pixels {cfg.max_pixels} (at least --min-pixels, {cfg.min_pixels})")
    if cfg.lora_rank == 0 and cfg.policy != "demo" and cfg.steps > 0:
        problems.append("--lora-rank 0 (full fine-tuning) with a pretrained --policy (only the demo model: "
                        "a 7B model needs LoRA)")
    if cfg.decode == "graph" and not runs_on_cuda(cfg.device):
        why = f"this run has --device {cfg.device}" if cfg.device and not cfg.device.startswith("cuda") \
            else "no CUDA device is found"
        problems.append(f"--decode graph (it records a CUDA graph, which needs CUDA, and {why}; use --decode auto, "
                        f"eager or static)")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume and --overwrite together (continue the run, or delete it: choose one)")
    if problems:
        raise UsageError("invalid " + "; ".join(problems))


def runs_on_cuda(device: str | None) -> bool:
    """Whether a run with this --device runs on CUDA (None: CUDA when available, as distributed.pick_device)."""
    if device is None:
        return torch.cuda.is_available()
    return device.startswith("cuda") and torch.cuda.is_available()


def check_sizes(cfg: RunConfig, n_train: int, world_size: int = 1) -> None:
    """Values that must fit the training split (and the ranks), checked once it is loaded,
    before any work."""
    problems = []
    if cfg.steps and cfg.batch_size > n_train:
        problems.append(f"--batch-size {cfg.batch_size} is larger than the {n_train} training studies of "
                        f"{cfg.dataset}; choose at most {n_train}")
    if cfg.sft_steps and cfg.sft_batch_size > n_train:
        problems.append(f"--sft-batch-size {cfg.sft_batch_size} is larger than the {n_train} training studies "
                        f"of {cfg.dataset}; choose at most {n_train}")
    rows = cfg.batch_size // world_size * cfg.num_generations
    if cfg.steps and cfg.grad_accum > rows:
        problems.append(f"--grad-accum {cfg.grad_accum} is more than the {rows} completions a step gives each "
                        f"process (--batch-size x --num-generations / ranks); choose at most {rows}")
    if problems:
        raise UsageError("; ".join(problems))


# ----------------------------------------------------------------------------- command line

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def format_value(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _numbers(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def _parse_type(f: dataclasses.Field):
    kind = str(f.type)
    if kind.startswith("tuple"):
        return _numbers
    for name, parse in (("int", int), ("float", float)):
        if kind.startswith(name):
            return parse
    return str


def add_flags(parser: argparse.ArgumentParser, names=None, help_overrides: dict | None = None) -> None:
    """One flag per field (all, or `names`), in --help groups. Every default is None on the command
    line: `from_args` fills in the preset's value, so a flag a user did not give is known."""
    names = list(FIELDS) if names is None else names
    groups = {}
    for name in names:
        f = FIELDS[name]
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        shown = (help_overrides or {}).get(name, f.metadata["help"])
        default = f"default {format_value(f.default)}" if f.default is not None else ""
        if f.metadata["demo"] is not dataclasses.MISSING:
            default += f"; demo {format_value(f.metadata['demo'])}"
        text = f"{shown} ({default})" if default and f.type != "bool" else shown
        if f.type == "bool" and f.default:  # on unless --no-<name> (None = not given: the preset decides)
            groups[group].add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.type == "bool":  # a switch: off unless given
            groups[group].add_argument(flag(name), action="store_const", const=True, default=None, help=text)
        else:
            groups[group].add_argument(flag(name), type=_parse_type(f), default=None, help=text.replace("%", "%%"),
                                       choices=f.metadata["choices"])


def given(args: argparse.Namespace, names=None) -> dict:
    """The fields a user set on the command line."""
    names = list(FIELDS) if names is None else names
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def from_args(args: argparse.Namespace) -> RunConfig:
    """The configuration a command line asks for: its dataset's preset, then every flag given."""
    values = given(args)
    return for_dataset(values.pop("dataset", "demo"), **values)


# ----------------------------------------------------------------------------- a run folder's record

CONFIG_FILE = "train_config.json"


def save(cfg: RunConfig, folder: str) -> str:
    """Write the configuration beside what a run wrote (sft/, final/, checkpoints)."""
    path = os.path.join(folder, CONFIG_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    return path


def load_recorded(folder: str) -> dict | None:
    """The recorded configuration of a run folder (a dict of field values), or None when the
    folder holds none (a preset, another tool's folder)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    stored = read_json(path, "fix or delete it, or give the settings as flags", error=UsageError)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in FIELDS}
