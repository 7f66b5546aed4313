"""Train a report generator with GRPO on a clinical reward: MRG-R1 (arXiv 2512.16145), top to bottom.

    python train_grpo.py --dataset demo                 # the demo: SFT warm start, then GRPO, CPU, minutes
    python train_grpo.py --dataset iu_xray --policy huatuogpt-vision-7b --labeler chexbert \
        --dtype bfloat16 --grad-checkpointing --output-dir runs/iu_xray
    torchrun --nproc_per_node 4 train_grpo.py ...       # one process per GPU (mrgr1/distributed.py)
    python -m mrgr1.train ...                           # the same command line

The run, part by part: (1) the run configuration (mrgr1/run_config.py: every flag, its default and
its bounds) and the checks that need the data; (2) the policy: a pretrained one, or the demo model
after the SFT warm start (mrgr1/sft.py); (3) CE-F1 on the test split before GRPO
(mrgr1/evaluation.py); (4) the GRPO loop: one `trainer.grpo_step` per batch of studies, metrics,
checkpoints; (5) the adapter saved and CE-F1 after GRPO.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time

import torch
from tqdm import tqdm

from . import (baselines, charts, checkpoint, distributed, lora, pipeline, rollout_viewer, run_config, timing,
               tracking, trainer)
from .evaluation import before_after, evaluate_policy
from .metrics import format_table
from .prompts import PromptEncoder
from .run_config import RunConfig, UsageError
from .sft import make_optimizer, next_batch, run_sft


# ----------------------------------------------------------------------------- 1. configuration

def parse_args(argv=None) -> RunConfig:
    """The run configuration the command line asks for (flags grouped as in `--help`), checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_config.add_flags(p)
    cfg = run_config.from_args(p.parse_args(argv))
    cfg.output_dir = cfg.output_dir or os.path.join("runs", cfg.dataset)
    missing = tracking.missing_package(cfg.report_to)
    if missing:  # before any work
        p.error(missing)
    run_config.check(cfg)
    return cfg


# What a run writes in its --output-dir; a fresh run refuses a folder holding the first group.
RUN_STATE = ("sft", "init", "final", checkpoint.LATEST_FILE)
RUN_OUTPUTS = ("metrics.jsonl", "curves.png", "sft.tmp", checkpoint.LATEST_FILE + ".tmp")


def claim_output_dir(cfg: RunConfig) -> None:
    """A fresh run needs an --output-dir without an earlier run in it (or --overwrite, which deletes
    that run); the error names the folder and the ways out."""
    names = os.listdir(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []
    found = sorted(n for n in names if n in RUN_STATE or n.startswith("checkpoint-"))
    if cfg.resume or not found:
        return
    if not cfg.overwrite:
        raise UsageError(f"{cfg.output_dir} holds an earlier run ({', '.join(found)}); continue it with "
                         f"--resume, start in a new --output-dir, or pass --overwrite to delete it")
    with distributed.rank0_first():
        if distributed.is_main():
            for name in names:
                if name in RUN_STATE + RUN_OUTPUTS or name.startswith(("checkpoint-", ".checkpoint-")):
                    path = os.path.join(cfg.output_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def check_ranks(cfg: RunConfig) -> None:
    """Batch sizes that must split evenly over the ranks (torchrun), checked before any rank waits."""
    sizes = [(cfg.batch_size, "--batch-size")] + ([(cfg.sft_batch_size, "--sft-batch-size")] if cfg.sft_steps else [])
    for n, name in sizes:
        try:
            distributed.check_divisible(n, name)
        except ValueError as e:
            raise UsageError(str(e)) from None


def find_resume_point(cfg: RunConfig) -> str | None:
    """The checkpoint --resume continues from (None for a fresh run); refuses flags that change the run."""
    if not cfg.resume:
        return None
    folder = checkpoint.find_latest(cfg.output_dir)
    if folder is None:
        raise checkpoint.CheckpointError(f"--resume: no checkpoint in {cfg.output_dir} (its `latest` file is "
                                         f"missing); run without --resume to start")
    for note in checkpoint.check_config(folder, vars(cfg)):
        if distributed.is_main():
            print(note)
    return folder


# ----------------------------------------------------------------------------- 2. the policy

def prepare_policy(cfg: RunConfig, train_studies, device):
    """The policy GRPO starts from -> (model, processor, encoder): a pretrained one, or (demo) the
    demo model after SFT. The SFT result is saved as an HF folder (<output_dir>/sft) and becomes the
    base: GRPO's reference policy is that SFT model, and a resumed run reloads it."""
    sft_dir, init_dir = os.path.join(cfg.output_dir, "sft"), os.path.join(cfg.output_dir, "init")
    load = dict(dtype=cfg.dtype, device=device, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    resumed = cfg.sft_steps > 0 and os.path.isfile(os.path.join(sft_dir, "config.json"))
    start = sft_dir if resumed else cfg.policy
    if not resumed and cfg.policy == "demo":
        with distributed.rank0_first():  # rank 0 writes the folder, the other ranks then read it
            if not os.path.isfile(os.path.join(init_dir, "model.safetensors")):  # written last
                wording = (cfg.system_prompt, cfg.instruction, cfg.sft_think)
                pipeline.demo_policy_folder(init_dir, [s.report for s in train_studies], wording, seed=cfg.seed)
        start = init_dir
    model, processor = pipeline.load_policy(start, weights_dir=cfg.weights_dir, **load)
    model.gradient_checkpointing = cfg.grad_checkpointing  # SFT too: its backward is GRPO's size
    encoder = PromptEncoder(processor, cfg.system_prompt, cfg.instruction, int(cfg.prompt_cache_gb * 2**30))
    if cfg.sft_steps > 0 and not resumed:
        run_sft(cfg, model, processor, encoder, train_studies, pipeline.special_ids(processor)["eos_token_ids"][0])
        if distributed.is_main():  # every rank holds the same SFT weights; one writes them
            shutil.rmtree(sft_dir + ".tmp", ignore_errors=True)
            model.save_pretrained(sft_dir + ".tmp")
            processor.save_pretrained(sft_dir + ".tmp")  # with the run's image resolution
            run_config.save(cfg, sft_dir + ".tmp")
            checkpoint.durable_rename(sft_dir + ".tmp", sft_dir)  # a crash leaves no half SFT model
    return model, processor, encoder


def adapter_base(cfg: RunConfig) -> str:
    """The model the saved adapter sits on: the SFT model when there is one."""
    if cfg.sft_steps:
        return os.path.join(cfg.output_dir, "sft")
    return os.path.join(cfg.output_dir, "init") if cfg.policy == "demo" else cfg.policy


# ----------------------------------------------------------------------------- the run

def main(argv=None) -> dict:
    return train(parse_args(argv))


def train(cfg: RunConfig) -> dict:
    """Run the configured training: SFT (if any), CE before, GRPO, CE after -> {"before", "after"}."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.init(cfg.device)  # several ranks (torchrun): join them, cuda:LOCAL_RANK
    check_ranks(cfg)
    claim_output_dir(cfg)  # a fresh run never reuses another run's SFT model or checkpoints
    os.makedirs(cfg.output_dir, exist_ok=True)
    resume_from = find_resume_point(cfg)

    # ---- everything that can be missing or too small is checked before any work
    with distributed.rank0_first():  # the demo set is drawn on first use, by rank 0
        train_studies = pipeline.load_studies(cfg.dataset, cfg.data_root, "train", all_images=cfg.all_images)
        test_studies = pipeline.load_studies(cfg.dataset, cfg.data_root, "test",
                                             all_images=cfg.all_images)[:cfg.eval_limit]
    run_config.check_sizes(cfg, len(train_studies), distributed.world_size())
    labeler = pipeline.build_labeler(cfg.labeler, cfg.chexbert_weights, cfg.weights_dir, device)
    if cfg.policy != "demo":
        pipeline.weights.resolve_policy(cfg.policy, cfg.weights_dir)

    model, processor, encoder = prepare_policy(cfg, train_studies, device)
    special = pipeline.special_ids(processor)
    results = {}
    if cfg.eval_limit and resume_from is None:
        results["before"] = evaluate_policy(cfg, model, processor, encoder, labeler, test_studies,
                                            "before GRPO", special)
    if cfg.steps == 0:  # SFT alone (the ablation's SFT row)
        return results

    # ---- GRPO: adapters on the (SFT) policy; the reference is the same network, adapters off
    ref_model = None
    if cfg.lora_rank > 0:
        lora.apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    elif cfg.beta != 0:
        ref_model = lora.frozen_copy(model)
    distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])  # same start
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.steps * cfg.num_iterations,
                                          cfg.warmup_ratio)
    rollout_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if resume_from:
        state = checkpoint.load_checkpoint(resume_from, model, optimizer, scheduler)
        checkpoint.restore_rng_states(state["rng"], rollout_gen)
        if distributed.is_main():
            print(f"resumed from {resume_from} at step {state['step']}")
    reward_cache = {}
    log_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if distributed.is_main():  # rows a crashed run logged after its checkpoint are logged again
        checkpoint.drop_metrics_after(log_path, state["step"])
    log_to = tracking.start(cfg.report_to, cfg.output_dir) if distributed.is_main() else None

    def save(step):
        return checkpoint.save_checkpoint(
            cfg.output_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
            trainer_state={"epoch": state["epoch"], "batch": state["batch"],
                           "rng": checkpoint.rng_states(rollout_gen)}, config=vars(cfg))

    def more_studies():  # --dynamic-sampling's extra rounds: the next batches of the same seeded stream,
        batch = next_batch(len(train_studies), cfg.batch_size, cfg.seed, state)  # saved with the checkpoint
        return [train_studies[i] for i in distributed.shard(batch)]

    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        if distributed.is_main():
            print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping")
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    bar = tqdm(range(state["step"], cfg.steps), desc="GRPO", dynamic_ncols=True, initial=state["step"],
               total=cfg.steps, disable=not distributed.is_main())
    try:
        for step in bar:
            batch = next_batch(len(train_studies), cfg.batch_size, cfg.seed, state)
            studies = [train_studies[i] for i in distributed.shard(batch)]  # this rank's part of it
            if distributed.world_size() > 1:  # per-rank samples and dropout masks, from nothing saved:
                rank = distributed.rank()     # a run resumes with any number of ranks
                rollout_gen.manual_seed(distributed.rank_seed(cfg.seed, rank, step, "rollout"))
                torch.manual_seed(distributed.rank_seed(cfg.seed, rank, step, "dropout"))
            t0 = time.perf_counter()  # the clock the step's timing/ phases use
            stats, rollout = trainer.grpo_step(model, processor, encoder, studies, labeler, optimizer, scheduler,
                                               cfg, rollout_gen, ref_model=ref_model, reward_cache=reward_cache,
                                               more_studies=more_studies, **special)
            stats = {"step": step + 1, **distributed.mean_across_ranks(stats),
                     "lr": scheduler.get_last_lr()[0], "step_time": time.perf_counter() - t0}
            interrupted = distributed.any_rank(interrupted)  # every rank stops at the same step
            sample = cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.steps)
            if distributed.is_main():
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(stats) + "\n")
                if log_to:
                    log_to(stats, sample=rollout.texts[0] if sample else None)
            bar.set_postfix(progress_fields(cfg, stats))
            if stats.get("dynamic/groups", 1) == 0 and distributed.is_main():
                tqdm.write(f"[step {step + 1}] no group's rewards differ after {stats['dynamic/rounds']:.0f} extra "
                           f"rounds (--dynamic-sampling-rounds): no update; the learning-rate schedule advanced")
            if sample and distributed.is_main():
                tqdm.write(f"[step {step + 1}] reward {rollout.rewards[0]:.3f}: {rollout.texts[0][:300]}")
                rollout_viewer.write_rollout_page(cfg.output_dir, step + 1, rollout, rollout.studies, stats)
            if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or interrupted) and distributed.is_main():
                save(step + 1)
            if interrupted:
                if distributed.is_main():
                    print(f"stopped at step {step + 1}; continue with --resume")
                return results
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    if lora.lora_layers(model) and distributed.is_main():
        lora.save_adapter(model, os.path.join(cfg.output_dir, "final"), base_model_name_or_path=adapter_base(cfg))
        run_config.save(cfg, os.path.join(cfg.output_dir, "final"))
    if cfg.eval_limit:
        results["after"] = evaluate_policy(cfg, model, processor, encoder, labeler, test_studies, "after GRPO", special)
        if distributed.is_main():
            print(format_table(results["after"], labeler=cfg.labeler))
            if "before" in results:
                trivial = baselines.trivial_baselines(labeler.label([s.report for s in test_studies]), labeler,
                                                      [s.report for s in train_studies], seed=cfg.seed)
                print(before_after(results["before"], results["after"], baselines.trivial_sentence(trivial)))
    if distributed.is_main():
        if cfg.sample_every:  # the index of the rollout pages, with the curves and the CE-F1
            rollout_viewer.write_index(cfg.output_dir, results)
        else:
            charts.plot_curves(log_path, os.path.join(cfg.output_dir, "curves.png"), results)
    return results


def progress_fields(cfg: RunConfig, stats: dict) -> dict:
    """The progress bar's fields: reward, length, the content reward, kl (beta != 0, as in TRL's
    logs), with mu > 1 the share of clipped tokens (on-policy the ratio is 1: nothing clips), and
    the step's seconds with the share of its two largest phases (`time_split`)."""
    shown = {"reward": f"{stats['reward']:.3f}", "len": f"{stats['completions/mean_length']:.0f}"}
    shown.update({name: f"{stats[key]:.{digits}f}" for name, key, digits in (
        (cfg.reward, f"rewards/{cfg.reward}/mean", 3), ("kl", "kl", 4)) if key in stats})
    if cfg.num_iterations > 1 and "clip_ratio/region_mean" in stats:
        shown["clip"] = f"{stats['clip_ratio/region_mean']:.3f}"
    shown["time"] = time_split(stats)
    return shown


def time_split(stats: dict, shown: int = 2) -> str:
    """The step's seconds and the share of its largest phases (the `timing/` metrics).
    >>> time_split({"step_time": 10.0, "timing/rollout": 6.0, "timing/update": 3.0, "timing/reward": 0.5})
    '10.0s rollout 60% update 30%'
    """
    total = stats["step_time"]
    phases = sorted(((stats[f"timing/{p}"], p) for p in timing.PHASES if f"timing/{p}" in stats), reverse=True)
    return " ".join([f"{total:.1f}s"] + [f"{p} {s / total:.0%}" for s, p in phases[:shown] if total > 0])


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
