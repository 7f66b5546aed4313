"""Train a report generator with GRPO on a clinical reward: MRG-R1 (arXiv 2512.16145).

    python train_grpo.py --dataset demo                 # the embedded demo, CPU, a few minutes
    python train_grpo.py --dataset iu_xray --policy huatuogpt-vision-7b --labeler chexbert \
        --dtype bfloat16 --grad-checkpointing --output-dir runs/iu_xray
    torchrun --nproc_per_node 4 train_grpo.py ...       # one process per GPU (mrgr1/distributed.py)

One step, top to bottom (see mrgr1/trainer.py for each piece):
    B studies -> G completions each (KV-cache sampler) -> reward 0.75 MCCS + 0.25 format
    -> group-relative advantages -> clipped policy-gradient loss + beta * KL to the reference
    (the same network with its LoRA adapters off) -> AdamW.
The demo first warm-starts the untrained demo model with teacher-forced SFT (`--sft-steps`), then
prints the clinical efficacy (CE-F1) on the demo test split before and after GRPO.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
from tqdm import tqdm

from mrgr1 import checkpoint, data, distributed, lora, pipeline, processing, tracking, trainer, viewer
from mrgr1.metrics import format_table

# Defaults that differ between the demo (demo model, CPU, minutes) and a real run. None of the real
# values below is published by the paper except the reward weights; they are ours (see README).
DEMO = dict(policy="demo", labeler="rules", num_generations=8, max_new_tokens=72, temperature=1.0,
            lr=2e-3, beta=0.04, num_iterations=2, batch_size=8, steps=40, lora_rank=16, lora_alpha=32,
            sft_steps=1000, sft_lr=3e-3, sft_batch_size=16, save_every=20, eval_limit=100, eval_samples=8,
            min_pixels=pipeline.DEMO_PIXELS, max_pixels=pipeline.DEMO_PIXELS)
REAL = dict(policy="huatuogpt-vision-7b", labeler="chexbert", num_generations=8, max_new_tokens=256,
            temperature=1.0, lr=1e-5, beta=0.04, num_iterations=1, batch_size=4, steps=1000, lora_rank=64,
            lora_alpha=128, sft_steps=0, sft_lr=1e-5, sft_batch_size=4, save_every=100, eval_limit=200,
            eval_samples=0, min_pixels=processing.DEFAULT_MIN_PIXELS, max_pixels=processing.DEFAULT_MAX_PIXELS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="demo", choices=data.DATASETS)
    a("--data-root", default=None, help="default data/<dataset>")
    a("--all-images", action="store_true", help="MIMIC-CXR: every image of a study, not the first")
    a("--policy", default=None, help="demo (the untrained demo model, preset 'demo') | a preset in weights_manifest.json | an HF model folder")
    a("--weights-dir", default="weights")
    a("--labeler", default=None, choices=("chexbert", "rules"), help="reward/eval labeler")
    a("--chexbert-weights", default=None, help="chexbert.pth or .safetensors (default: weights/chexbert)")
    a("--reward", default="mccs", choices=("mccs", "ce_f1", "bleu"), help="content reward (paper: mccs)")
    a("--reward-weights", default="0.75,0.25", help="content,format weights (paper: 0.75,0.25)")
    a("--mccs-margin", type=float, default=0.5, help="m in MCCS (ours: 0.5)")
    a("--mccs-mapping", default="0,1,-1,1", help="signed value of CheXbert codes blank,positive,negative,"
      "uncertain in the MCCS vectors (paper: 0,1,-1,1)")
    a("--num-generations", type=int, default=None, help="G completions per study")
    a("--max-new-tokens", type=int, default=None)
    a("--temperature", type=float, default=None, help="sampling temperature T > 0 (log-probs use the same T)")
    a("--top-p", type=float, default=1.0)
    a("--lr", type=float, default=None)
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-ratio", type=float, default=0.05)
    a("--max-grad-norm", type=float, default=1.0)
    a("--beta", type=float, default=None, help="KL weight; 0 skips the reference policy")
    a("--epsilon", type=float, default=0.2, help="clip range: r >= 1 - epsilon")
    a("--epsilon-high", type=float, default=None, help="clip range: r <= 1 + epsilon_high (default epsilon)")
    a("--loss-type", default="grpo", choices=("grpo", "bnpo", "dapo", "dr_grpo"))
    a("--scale-rewards", default="group", choices=("group", "batch", "none"))
    a("--mask-truncated", action="store_true", help="drop completions without EOS from the loss")
    a("--num-iterations", type=int, default=None, help="updates per batch of rollouts (mu; demo 2, "
      "so that the ratio moves and clipping acts; real data 1)")
    a("--batch-size", type=int, default=None, help="studies per step (B); rollouts per step = B*G")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: the B*G rollouts of a "
      "step (per rank) split into exactly this many, sizes differing by at most one")
    a("--steps", type=int, default=None, help="GRPO steps (overrides --epochs)")
    a("--epochs", type=float, default=None, help="passes over the training split")
    a("--lora-rank", type=int, default=None, help="0 = full fine-tuning (demo model only)")
    a("--lora-alpha", type=float, default=None)
    a("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input while training SFT; "
      "GRPO computes every log-prob without dropout, so that r = 1 before the first update (TRL: "
      "disable_dropout)")
    a("--sft-steps", type=int, default=None, help="teacher-forced warm-start steps before GRPO")
    a("--sft-lr", type=float, default=None)
    a("--sft-batch-size", type=int, default=None)
    a("--eval-limit", type=int, default=None, help="test studies scored before/after GRPO (0 = skip)")
    a("--eval-samples", type=int, default=None, help="sampled completions per test study whose mean "
      "reward is printed before/after GRPO (0 = skip; default: demo 8, real data 0)")
    a("--max-pixels", type=int, default=None, help="most pixels per view after resizing (default "
      f"{processing.DEFAULT_MAX_PIXELS} = 448x448, at most 256 image tokens; demo {pipeline.DEMO_PIXELS} = 84x84); "
      "overrides the checkpoint's preprocessor_config.json, and is written with the run")
    a("--min-pixels", type=int, default=None, help=f"fewest pixels per view (default {processing.DEFAULT_MIN_PIXELS} "
      f"= 56x56; demo {pipeline.DEMO_PIXELS})")
    a("--dtype", default="float32", choices=tuple(pipeline.DTYPES))
    a("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward (SFT and GRPO)")
    a("--prompt-cache-gb", type=float, default=2.0, help="keep each study's encoded prompt and image patches "
      "after first use, up to this many GB (ours; 0 = encode every time, same results)")
    a("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    a("--seed", type=int, default=0)
    a("--output-dir", default=None, help="default runs/<dataset>")
    a("--save-every", type=int, default=None)
    a("--sample-every", type=int, default=10, help="every N steps and at the last: print a sample completion "
      "and write the rollout page <output-dir>/rollouts/step-N.html (docs/viewer.md; 0 = never)")
    a("--report-to", default="none", choices=tracking.REPORT_TO, help="also log the metrics to TensorBoard "
      "in <output-dir>/runs (pip install -e '.[tensorboard]')")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir (the "
      "flags that change the run must be the checkpoint's)")
    a("--overwrite", action="store_true", help="start afresh in an --output-dir that holds an earlier run "
      "(its sft/, init/, checkpoints, final/ and metrics are deleted)")
    args = p.parse_args(argv)
    for key, value in (DEMO if args.dataset == "demo" else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    missing = tracking.missing_package(args.report_to)
    if missing:  # before any work
        p.error(missing)
    args.output_dir = args.output_dir or os.path.join("runs", args.dataset)
    return args


class UsageError(ValueError):
    """A flag value that cannot work, or an output folder that holds another run; the message
    names the flag or folder and what to do. The command line shows it as one `error:` line."""


def _floats(text: str, n: int, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise UsageError(f"{flag} {text!r}: expected {n} comma-separated numbers")
    return values


def check_flags(args) -> None:
    """Every flag value that cannot work, refused at once before any work."""
    _floats(args.reward_weights, 2, "--reward-weights")
    _floats(args.mccs_mapping, 4, "--mccs-mapping")
    checks = [
        ("--temperature", args.temperature, args.temperature <= 0, "above 0: training samples completions "
         "and scores them with log-probs at this temperature; greedy decoding (0) has none"),
        ("--top-p", args.top_p, not 0 < args.top_p <= 1, "in (0, 1]"),
        ("--num-generations", args.num_generations, args.num_generations < 2,
         "at least 2: advantages compare the completions of one study"),
        ("--batch-size", args.batch_size, args.batch_size < 1, "at least 1"),
        ("--steps", args.steps, args.epochs is None and args.steps < 1, "at least 1"),
        ("--epochs", args.epochs, args.epochs is not None and args.epochs <= 0, "above 0"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens < 1, "at least 1"),
        ("--lr", args.lr, args.lr <= 0, "above 0"),
        ("--sft-lr", args.sft_lr, args.sft_steps > 0 and args.sft_lr <= 0, "above 0"),
        ("--sft-steps", args.sft_steps, args.sft_steps < 0, "0 or more"),
        ("--sft-batch-size", args.sft_batch_size, args.sft_batch_size < 1, "at least 1"),
        ("--grad-accum", args.grad_accum, args.grad_accum < 1, "at least 1"),
        ("--num-iterations", args.num_iterations, args.num_iterations < 1, "at least 1"),
        ("--beta", args.beta, args.beta < 0, "0 or more"),
        ("--epsilon", args.epsilon, not 0 <= args.epsilon < 1, "in [0, 1)"),
        ("--epsilon-high", args.epsilon_high, args.epsilon_high < 0, "0 or more"),
        ("--warmup-ratio", args.warmup_ratio, not 0 <= args.warmup_ratio <= 1, "in [0, 1]"),
        ("--lora-rank", args.lora_rank, args.lora_rank < 0, "0 (full fine-tuning) or more"),
        ("--lora-dropout", args.lora_dropout, not 0 <= args.lora_dropout < 1, "in [0, 1)"),
        ("--save-every", args.save_every, args.save_every < 1, "at least 1"),
        ("--eval-limit", args.eval_limit, args.eval_limit < 0, "0 (skip) or more"),
        ("--eval-samples", args.eval_samples, args.eval_samples < 0, "0 (skip) or more"),
        ("--prompt-cache-gb", args.prompt_cache_gb, args.prompt_cache_gb < 0, "0 or more"),
        ("--threads", args.threads, args.threads is not None and args.threads < 1, "at least 1"),
        ("--min-pixels", args.min_pixels, args.min_pixels < 1, "at least 1"),
        ("--max-pixels", args.max_pixels, args.max_pixels < args.min_pixels, f"at least --min-pixels ({args.min_pixels})"),
    ]
    problems = [f"{flag} {value} ({need})" for flag, value, bad, need in checks if bad]
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite together (continue the run, or delete it: choose one)")
    if problems:
        raise UsageError("invalid " + "; ".join(problems))


def check_ranks(args) -> None:
    """Batch sizes that must split evenly over the ranks (torchrun), checked before any rank waits."""
    sizes = [(args.batch_size, "--batch-size")] + ([(args.sft_batch_size, "--sft-batch-size")] if args.sft_steps else [])
    for n, flag in sizes:
        try:
            distributed.check_divisible(n, flag)
        except ValueError as e:
            raise UsageError(str(e)) from None


def check_sizes(args, n_train: int) -> None:
    """Flags that must fit the data."""
    if args.batch_size > n_train:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {n_train} training studies of "
                         f"{args.dataset}; choose at most {n_train}")
    rows = args.batch_size // distributed.world_size() * args.num_generations
    if args.grad_accum > rows:
        raise UsageError(f"--grad-accum {args.grad_accum} is more than the {rows} completions a step gives "
                         f"each process (--batch-size x --num-generations / ranks); choose at most {rows}")


# What a run writes in its --output-dir; a fresh run refuses a folder holding the first group.
RUN_STATE = ("sft", "init", "final", checkpoint.LATEST_FILE)
RUN_OUTPUTS = ("metrics.jsonl", "curves.png", "sft.tmp", checkpoint.LATEST_FILE + ".tmp")


def earlier_run(output_dir: str) -> list[str]:
    """The names in output_dir that an earlier run left and a fresh run would reuse or mix with."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(n for n in names if n in RUN_STATE or n.startswith("checkpoint-"))


def claim_output_dir(args) -> None:
    """A fresh run needs an --output-dir without an earlier run in it (or --overwrite, which deletes
    that run); the error names the folder and the ways out."""
    found = earlier_run(args.output_dir)
    if args.resume or not found:
        return
    if not args.overwrite:
        raise UsageError(f"{args.output_dir} holds an earlier run ({', '.join(found)}); continue it with "
                         f"--resume, start in a new --output-dir, or pass --overwrite to delete it")
    with distributed.rank0_first():
        if distributed.is_main():
            for name in os.listdir(args.output_dir):
                if name in RUN_STATE + RUN_OUTPUTS or name.startswith(("checkpoint-", ".checkpoint-")):
                    path = os.path.join(args.output_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def grpo_config(args) -> trainer.GRPOConfig:
    content, fmt = _floats(args.reward_weights, 2, "--reward-weights")
    return trainer.GRPOConfig(
        num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, beta=args.beta, epsilon=args.epsilon,
        epsilon_high=args.epsilon_high, loss_type=args.loss_type, scale_rewards=args.scale_rewards,
        num_iterations=args.num_iterations, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
        mask_truncated=args.mask_truncated, reward_kind=args.reward,
        reward_weights={args.reward: content, "format": fmt}, mccs_margin=args.mccs_margin,
        mccs_mapping=_floats(args.mccs_mapping, 4, "--mccs-mapping"))


def warmup_cosine(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup then cosine decay to 0, per optimizer step."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, lr, weight_decay, total_steps, warmup_ratio):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, warmup_cosine(optimizer, total_steps, warmup_ratio)


# ----------------------------------------------------------------------------- phases

def prepare_policy(args, train_studies, device, prompt_cache=None):
    """The policy GRPO starts from: a pretrained one, or (demo) the demo model after SFT.

    The SFT result is saved as an HF folder (<output_dir>/sft) and becomes the base: GRPO's
    reference policy is that SFT model, and a resumed run reloads it instead of training again."""
    sft_dir, init_dir = os.path.join(args.output_dir, "sft"), os.path.join(args.output_dir, "init")
    load = dict(dtype=args.dtype, device=device, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if args.sft_steps > 0 and os.path.isfile(os.path.join(sft_dir, "config.json")):  # a resumed run
        model, processor = pipeline.load_policy(sft_dir, **load)
        model.gradient_checkpointing = args.grad_checkpointing
        return model, processor
    start = args.policy
    if args.policy == "demo":
        with distributed.rank0_first():  # rank 0 writes the folder, the other ranks then read it
            if not os.path.isfile(os.path.join(init_dir, "model.safetensors")):  # written last
                pipeline.demo_policy_folder(init_dir, [s.report for s in train_studies], seed=args.seed)
        start = init_dir
    model, processor = pipeline.load_policy(start, weights_dir=args.weights_dir, **load)
    model.gradient_checkpointing = args.grad_checkpointing  # SFT too: its backward is GRPO's size
    if args.sft_steps > 0:
        run_sft(args, model, processor, train_studies, prompt_cache)
        if distributed.is_main():  # every rank holds the same SFT weights; one writes them
            shutil.rmtree(sft_dir + ".tmp", ignore_errors=True)
            model.save_pretrained(sft_dir + ".tmp")
            processor.save_pretrained(sft_dir + ".tmp")  # with the run's image resolution
            write_config(sft_dir + ".tmp", args)
            checkpoint.durable_rename(sft_dir + ".tmp", sft_dir)  # a crash leaves no half SFT model
    return model, processor


def write_config(folder: str, args) -> None:
    """The run's flags (image resolution included) beside a model it wrote: evaluate.py reads them."""
    with open(os.path.join(folder, checkpoint.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(vars(args), f, indent=2, default=str)


def run_sft(args, model, processor, studies, prompt_cache=None):
    """Teacher-forced MLE on the reference reports in the target format (full fine-tuning for
    the demo model, LoRA merged back into the weights for a pretrained one). Several ranks: each
    takes its slice of every batch and the gradients are summed, as in GRPO."""
    use_lora = args.policy != "demo"
    if use_lora:
        lora.apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
        distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    optimizer, scheduler = make_optimizer(model, args.sft_lr, args.weight_decay, args.sft_steps, args.warmup_ratio)
    eos = pipeline.special_ids(processor)["eos_token_ids"]
    bar = tqdm(range(args.sft_steps), desc="SFT", dynamic_ncols=True, disable=not distributed.is_main())
    position = {"epoch": 0, "batch": 0}
    for _ in bar:
        indices = next_batch(len(studies), args.sft_batch_size, args.seed + 1000, position)
        batch = [studies[i] for i in distributed.shard(indices, "--sft-batch-size")]
        loss = trainer.sft_step(model, processor, batch, optimizer, scheduler, eos_token_id=eos[0],
                                max_grad_norm=args.max_grad_norm, prompt_cache=prompt_cache)
        bar.set_postfix(loss=f"{loss:.3f}")
    if use_lora:
        lora.merge_lora(model)
    model.requires_grad_(True)


def evaluate(args, model, processor, labeler, studies, cfg, title, prompt_cache=None) -> dict:
    """CE-F1 of greedy reports, and the mean reward of --eval-samples sampled completions per study
    (GRPO's own objective; the same random draws before and after GRPO). Several ranks: each
    writes its part, every rank scores them all."""
    special = pipeline.special_ids(processor)
    mine = distributed.split_evenly(studies)
    texts = trainer.generate_reports(model, processor, mine, max_new_tokens=args.max_new_tokens,
                                     prompt_cache=prompt_cache, **special)
    scores = trainer.ce_of_texts(distributed.gather_lists(texts), studies, labeler)
    line = (f"\n{title}: CE-F1 (micro, R2GenCMN convention) {scores['ce_micro/f1']:.4f} | "
            f"CE-F1 (example, PromptMRG) {scores['ce_example/f1']:.4f} on {len(studies)} studies")
    if args.eval_samples:
        generator = torch.Generator(device=next(model.parameters()).device)
        generator.manual_seed(args.seed + 2 + 1000 * distributed.rank())
        sampled = trainer.sampled_rewards(model, processor, mine, labeler,
                                          dataclasses.replace(cfg, num_generations=args.eval_samples),
                                          generator, prompt_cache=prompt_cache, **special)
        for name in ("reward", args.reward, "format"):  # every rank gathers, even one with no studies
            everyone = distributed.gather_lists(sampled[name].tolist() if sampled else [])
            scores[f"sampled/{name}"] = sum(everyone) / len(everyone)
        line += (f"\n{title}: reward of {args.eval_samples} sampled completions per study "
                 f"(T={args.temperature}) {scores['sampled/reward']:.4f}, "
                 f"{args.reward} part {scores[f'sampled/{args.reward}']:.4f}")
    if distributed.is_main():
        print(line)
    return scores


def next_batch(n_studies: int, batch_size: int, seed: int, state: dict) -> list[int]:
    """The next batch of study indices in the (seed, epoch) order; advances state's epoch/batch,
    which checkpoints store, so a resumed run draws the same next batch."""
    batches = data.batch_indices(n_studies, batch_size, seed, state["epoch"], drop_last=True)
    if state["batch"] >= len(batches):
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
        batches = data.batch_indices(n_studies, batch_size, seed, state["epoch"], drop_last=True)
    state["batch"] += 1
    return batches[state["batch"] - 1]


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_flags(args)
    device = distributed.init(args.device)  # several ranks (torchrun): join them, cuda:LOCAL_RANK
    check_ranks(args)
    claim_output_dir(args)  # a fresh run never reuses another run's SFT model or checkpoints
    os.makedirs(args.output_dir, exist_ok=True)
    resume_from = checkpoint.find_latest(args.output_dir) if args.resume else None
    if args.resume and resume_from is None:
        raise checkpoint.CheckpointError(f"--resume: no checkpoint in {args.output_dir} (its `latest` "
                                         f"file is missing); run without --resume to start")
    if resume_from:
        for note in checkpoint.check_config(resume_from, vars(args)):  # refuses flags that change the run
            if distributed.is_main():
                print(note)

    # Everything that can be missing is checked before any work.
    with distributed.rank0_first():  # the demo set is drawn on first use, by rank 0
        train_studies = pipeline.load_studies(args.dataset, args.data_root, "train", all_images=args.all_images)
        test_studies = pipeline.load_studies(args.dataset, args.data_root, "test",
                                             all_images=args.all_images)[:args.eval_limit]
    check_sizes(args, len(train_studies))
    labeler = pipeline.build_labeler(args.labeler, args.chexbert_weights, args.weights_dir, device)
    if args.policy != "demo":
        pipeline.weights.resolve_policy(args.policy, args.weights_dir)

    prompt_cache = trainer.PromptCache(int(args.prompt_cache_gb * 2**30))  # SFT, GRPO and evaluation
    model, processor = prepare_policy(args, train_studies, device, prompt_cache)
    cfg = grpo_config(args)
    results = {}
    if args.eval_limit and resume_from is None:
        results["before"] = evaluate(args, model, processor, labeler, test_studies, cfg, "before GRPO",
                                     prompt_cache)

    # ---- GRPO: adapters on the (SFT) policy; the reference is the same network, adapters off
    ref_model = None
    if args.lora_rank > 0:
        lora.apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
    elif args.beta != 0:
        ref_model = lora.frozen_copy(model)
    distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])  # same start
    steps = args.steps if args.epochs is None else int(args.epochs * len(train_studies) // args.batch_size)
    optimizer, scheduler = make_optimizer(model, args.lr, args.weight_decay, steps * args.num_iterations,
                                          args.warmup_ratio)
    rollout_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if resume_from:
        state = checkpoint.load_checkpoint(resume_from, model, optimizer, scheduler)
        checkpoint.restore_rng_states(state["rng"], rollout_gen)
        if distributed.is_main():
            print(f"resumed from {resume_from} at step {state['step']}")
    special = pipeline.special_ids(processor)
    reward_cache = {}
    log_path = os.path.join(args.output_dir, "metrics.jsonl")
    if distributed.is_main():  # rows a crashed run logged after its checkpoint are logged again
        checkpoint.drop_metrics_after(log_path, state["step"])
    log_to = tracking.start(args.report_to, args.output_dir) if distributed.is_main() else None

    def save(step):
        return checkpoint.save_checkpoint(
            args.output_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
            trainer_state={"epoch": state["epoch"], "batch": state["batch"],
                           "rng": checkpoint.rng_states(rollout_gen)}, config=vars(args))

    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        if distributed.is_main():
            print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping")
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    bar = tqdm(range(state["step"], steps), desc="GRPO", dynamic_ncols=True, initial=state["step"], total=steps,
               disable=not distributed.is_main())
    try:
        for step in bar:
            batch = next_batch(len(train_studies), args.batch_size, args.seed, state)
            studies = [train_studies[i] for i in distributed.shard(batch)]  # this rank's part of it
            if distributed.world_size() > 1:  # per-rank samples and dropout masks, from nothing saved:
                rank = distributed.rank()     # a run resumes with any number of ranks
                rollout_gen.manual_seed(distributed.rank_seed(args.seed, rank, step, "rollout"))
                torch.manual_seed(distributed.rank_seed(args.seed, rank, step, "dropout"))
            t0 = time.time()
            stats, rollout = trainer.grpo_step(model, processor, studies, labeler, optimizer, scheduler, cfg,
                                               rollout_gen, ref_model=ref_model, reward_cache=reward_cache,
                                               prompt_cache=prompt_cache, **special)
            stats = {"step": step + 1, **distributed.mean_across_ranks(stats),
                     "lr": scheduler.get_last_lr()[0], "step_time": time.time() - t0}
            interrupted = distributed.any_rank(interrupted)  # every rank stops at the same step
            sample = args.sample_every and ((step + 1) % args.sample_every == 0 or step + 1 == steps)
            if distributed.is_main():
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(stats) + "\n")
                if log_to:
                    log_to(stats, sample=rollout.texts[0] if sample else None)
            shown = {"reward": f"{stats['reward']:.3f}", "len": f"{stats['completions/mean_length']:.0f}"}
            shown.update({name: f"{stats[key]:.{digits}f}" for name, key, digits in (
                (args.reward, f"rewards/{args.reward}/mean", 3), ("kl", "kl", 4)) if key in stats})
            if args.num_iterations > 1:  # on-policy (mu = 1) the ratio is 1 and nothing is clipped
                shown["clip"] = f"{stats['clip_ratio/region_mean']:.3f}"
            bar.set_postfix(shown)  # kl only with a KL term (beta != 0), as in TRL's logs
            if sample and distributed.is_main():
                tqdm.write(f"[step {step + 1}] reward {rollout.rewards[0]:.3f}: {rollout.texts[0][:300]}")
                viewer.write_rollout_page(args.output_dir, step + 1, rollout, studies, stats)
            if ((step + 1) % args.save_every == 0 or step + 1 == steps or interrupted) and distributed.is_main():
                save(step + 1)
            if interrupted:
                if distributed.is_main():
                    print(f"stopped at step {step + 1}; continue with --resume")
                return results
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    if lora.lora_layers(model) and distributed.is_main():  # the adapter sits on the SFT model when there is one
        base = os.path.join(args.output_dir, "sft") if args.sft_steps else (
            os.path.join(args.output_dir, "init") if args.policy == "demo" else args.policy)
        lora.save_adapter(model, os.path.join(args.output_dir, "final"), base_model_name_or_path=base)
        write_config(os.path.join(args.output_dir, "final"), args)
    if args.eval_limit:
        results["after"] = evaluate(args, model, processor, labeler, test_studies, cfg, "after GRPO",
                                    prompt_cache)
        if distributed.is_main():
            print(format_table(results["after"], labeler=args.labeler))
            if "before" in results:
                print(before_after(results["before"], results["after"]))
    if distributed.is_main():
        viewer.plot_curves(log_path, os.path.join(args.output_dir, "curves.png"), results)
        if args.sample_every:  # the index of the rollout pages, with the curves and the CE-F1
            viewer.write_index(args.output_dir, results)
    return results


def before_after(before: dict, after: dict) -> str:
    """The run's outcome in one line: test CE-F1 (and the sampled reward, if measured) before -> after GRPO."""
    line = f"\nGRPO moved test CE-F1 (micro) {before['ce_micro/f1']:.4f} -> {after['ce_micro/f1']:.4f}"
    if "sampled/reward" in before:
        line += f", the sampled reward {before['sampled/reward']:.4f} -> {after['sampled/reward']:.4f}"
    return line


def command_line(argv: list[str]) -> None:
    """main() for a person at a terminal: an error caused by a flag, a file or the data they gave
    ends with one `error: ...` line and exit code 1 (OSError included: a path that cannot be read
    or written); anything else is a bug and keeps its traceback."""
    finished = False
    try:
        main(argv)
        finished = True
    except (UsageError, OSError, *pipeline.USER_ERRORS) as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.cleanup(all_finished=finished)


if __name__ == "__main__":
    command_line(sys.argv[1:])
