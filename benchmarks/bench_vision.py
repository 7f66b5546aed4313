"""Vision tower: attention by length-grouped segments (mrgr1) vs the earlier masked paths.

    python benchmarks/bench_vision.py                      # 32 images of 224x224, forward, no grad
    python benchmarks/bench_vision.py --images 64 --backward

Three ways to keep attention inside windows / frames, all in the same tower and weights:
  segments     mrgr1.vision.segment_attention: equal-length segments batched, no mask (current)
  per-frame    one SDPA call per frame, window mask [n_frame, n_frame] inside it (commit ab25e97)
  global-mask  one SDPA call over the whole batch with a block-diagonal [N, N] mask (the first version)
The old paths live only here: they replace `segment_attention` in mrgr1.vision for the run.

Config: a small tower of the real shape (head_dim 80, full attention every 8th block; hidden 320,
depth 8) so that a CPU run takes seconds. Each variant runs in its own Python process; time =
median of `--steps` passes after a warm-up; peak = growth of the resident-set high-water mark
(ru_maxrss) from after the setup to the end, or torch.cuda.max_memory_allocated on a GPU. Before timing, the
three variants are checked to give the same tokens on a few images.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mrgr1.vision as vision  # noqa: E402
from mrgr1.config import VisionConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEW_ATTENTION = vision.segment_attention


def bench_config() -> VisionConfig:
    return VisionConfig(depth=8, hidden_size=320, intermediate_size=864, num_heads=4, out_hidden_size=512,
                        fullatt_block_indexes=(7,))


def segment_ids(segments: vision.Segments) -> torch.Tensor:
    """Segment number of every token [N], recovered from the length groups."""
    ids = torch.empty(len(segments.inverse), dtype=torch.long, device=segments.inverse.device)
    first = 0
    for index in segments.groups:  # [n_seg, L]
        ids[index] = torch.arange(first, first + len(index), device=index.device)[:, None]
        first += len(index)
    return ids


def global_mask_attention(q, k, v, segments):
    """SDPA over all N patches of the batch with a block-diagonal boolean [N, N] mask."""
    seg = segment_ids(segments)
    mask = seg[:, None] == seg[None, :]  # [N, N]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)  # [N, H, hd]


def per_frame_attention(frame_sizes):
    """One SDPA call per frame; in window blocks a [n, n] window mask inside the frame."""
    def attention(q, k, v, segments):
        seg, outs, s = segment_ids(segments), [], 0
        for n in frame_sizes:
            mask = seg[s:s + n, None] == seg[None, s:s + n]  # [n, n]
            mask = None if bool(mask.all()) else mask  # a full-attention block: the frame is one segment
            outs.append(F.scaled_dot_product_attention(*(t[s:s + n].transpose(0, 1) for t in (q, k, v)),
                                                       attn_mask=mask).transpose(0, 1))
            s += n
        return torch.cat(outs)
    return attention


def use_variant(variant: str, grid: torch.Tensor) -> None:
    frame_sizes = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).tolist()
    vision.segment_attention = {"segments": NEW_ATTENTION, "global-mask": global_mask_attention,
                                "per-frame": per_frame_attention(frame_sizes)}[variant]


def make_inputs(cfg: VisionConfig, images: int, side: int, seed: int = 0):
    p = side // cfg.patch_size
    grid = torch.tensor([[1, p, p]] * images)
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(images * p * p, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2, generator=g)
    return pv.to(DEVICE), grid


def make_tower(cfg: VisionConfig) -> vision.VisionTransformer:
    torch.manual_seed(0)  # PyTorch's default init: the timing does not depend on the values
    return vision.VisionTransformer(cfg).to(DEVICE)


def check_variants_agree(cfg: VisionConfig) -> float:
    """Largest difference between the variants' tokens on 3 images of 224x224 + one of 168x112
    (partial windows at its edges)."""
    tower = make_tower(cfg)
    pv, grid = make_inputs(cfg, 3, 224)
    pv, grid = torch.cat([pv, torch.randn(12 * 8, pv.shape[1], device=DEVICE)]), torch.cat([grid, torch.tensor([[1, 12, 8]])])
    outs = {}
    with torch.no_grad():
        for variant in ("segments", "per-frame", "global-mask"):
            use_variant(variant, grid)
            outs[variant] = tower(pv, grid)
    use_variant("segments", grid)
    return max((outs[v] - outs["segments"]).abs().max().item() for v in ("per-frame", "global-mask"))


def run_variant(variant: str, images: int, side: int, steps: int, backward: bool) -> dict:
    cfg = bench_config()
    tower = make_tower(cfg)
    pv, grid = make_inputs(cfg, images, side)
    use_variant(variant, grid)

    def step():
        if backward:
            tower(pv, grid).square().mean().backward()
        else:
            with torch.no_grad():
                tower(pv, grid)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # setup done: weights, inputs
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if DEVICE == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss)
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_mib": peak / 2 ** 20,
            "patches": int(grid.prod(-1).sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--side", type=int, default=224, help="image side in pixels (a multiple of 28)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    ap.add_argument("--variants", default="segments,per-frame,global-mask")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.images, args.side, args.steps, args.backward)))
        return
    print(f"device {DEVICE}, threads {torch.get_num_threads()}, {args.images} images of {args.side}x{args.side}, "
          f"{'forward+backward' if args.backward else 'forward (no grad)'}, config {bench_config()}")
    print(f"variants agree: max |difference| = {check_variants_agree(bench_config()):.2e}")
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--images", str(args.images), "--side",
               str(args.side), "--steps", str(args.steps)] + (["--backward"] if args.backward else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{variant:12s} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        results[variant] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:12s} N={r['patches']:6d}  median {r['median_s'] * 1e3:9.1f} ms  min {r['min_s'] * 1e3:9.1f} ms"
              f"  peak +{r['peak_mib']:8.1f} MiB")
    if "segments" in results:
        for variant, r in results.items():
            if variant != "segments":
                print(f"{variant} / segments time ratio: {r['median_s'] / results['segments']['median_s']:.2f}x")


if __name__ == "__main__":
    main()
