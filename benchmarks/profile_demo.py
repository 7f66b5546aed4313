"""Where the demo's time goes: train_grpo.py under cProfile, the top items per call.

    python benchmarks/profile_demo.py                          # 100 SFT steps + 3 GRPO steps
    python benchmarks/profile_demo.py --prompt-cache-gb 0      # every prompt encoded afresh

Runs `train_grpo.py --dataset demo` with a short schedule and no evaluation, then prints, for the
functions a step is made of, how often each ran and its time per call (cumulative: a function's
time includes what it calls). cProfile adds its own overhead to every Python call (the model's
arithmetic runs in C and is not slowed), so compare rows with each other and runs of this script
with each other, not with a plain run's wall time. Run it on an idle machine: on 2 cores any other
process inflates every figure.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile

from mrgr1 import train

# (file, function, what it is) in the order a reader meets them
ITEMS = (
    ("sft.py", "run_sft", "SFT, all steps"),
    ("sft.py", "sft_step", "one SFT step"),
    ("trainer.py", "grpo_step", "one GRPO step"),
    ("prompts.py", "__call__", "1 prompts: template, tokens, image patches"),
    ("data.py", "load_images", "   of which: read the study's PNGs"),
    ("processing.py", "image_patches", "   of which: resize + patchify one view"),
    ("trainer.py", "sample_completions", "2 rollout: G samples per study"),
    ("trainer.py", "score_completions", "3 reward: label and score B*G reports"),
    ("trainer.py", "rollout_logps", "5 log-probs without grad (reference)"),
    ("vlm.py", "token_logps", "forward to log-probs (SFT; steps 5, 6 with --no-shared-prompt)"),
    ("shared_prompt.py", "completion_logps", "forward to log-probs, each prompt once (steps 5, 6)"),
    ("_tensor.py", "backward", "backward (SFT, step 6)"),
    ("vlm.py", "from_pretrained", "load a model folder"),
    ("synthetic.py", "generate", "draw the demo set (first run only)"),
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompt-cache-gb", type=float, default=None, help="passed to train_grpo.py")
    p.add_argument("--save", default=None, help="also write the raw profile here (pstats format)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        run = ["--dataset", "demo", "--sft-steps", str(args.sft_steps), "--steps", str(args.steps),
               "--eval-limit", "0", "--sample-every", "0", "--output-dir", out]
        if args.prompt_cache_gb is not None:
            run += ["--prompt-cache-gb", str(args.prompt_cache_gb)]
        profiler = cProfile.Profile()
        profiler.runcall(train.main, run)
    stats = pstats.Stats(profiler)
    if args.save:
        stats.dump_stats(args.save)
    print(f"\n{'item':<72}{'calls':>7}{'ms per call':>13}{'total s':>9}")
    for file, name, what in ITEMS:
        hits = [v for k, v in stats.stats.items() if k[0].endswith(os.sep + file) and k[2] == name]
        calls, total = sum(h[1] for h in hits), sum(h[3] for h in hits)
        if calls:
            print(f"{what + ' (' + name + ')':<72}{calls:>7}{1000 * total / calls:>13.1f}{total:>9.2f}")
    print(f"{'whole run under the profiler':<72}{'':>7}{'':>13}{stats.total_tt:>9.2f}")


if __name__ == "__main__":
    main()
