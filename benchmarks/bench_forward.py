"""Forward+backward of our Qwen2_5_VL vs transformers', and memory of the chunked log-prob path.

    python benchmarks/bench_forward.py            # all cases, each in a fresh process
    python benchmarks/bench_forward.py --steps 3  # fewer timed steps

Part 1: same small random config (vision depth 4 x 128, text 4 layers x 256, vocab 8192),
batch of 2 prompts with one image each (112x168 and 140x140 px) + text, fp32, train mode,
loss = mean of logits^2. Time: both models in one process, passes alternating (the machine may be
shared), median and min of `--steps` passes after one warm-up.

Part 2: GRPO's log-prob step at the real vocabulary (151,936): a tiny decoder, B=4 sequences of
256 tokens with 192 completion tokens; `token_logps` (chunked, recomputed in backward) vs
log_softmax(full logits).gather(...), forward+backward.

Memory, measured honestly on CPU: every case runs in its own Python process; peak = growth of
the process's resident-set high-water mark (resource.getrusage ru_maxrss) from just before the
first forward to the end. It counts everything the step allocates (activations, logits,
gradients), not only tensors, and is only meaningful when the step's peak exceeds the setup's.
On a GPU the script reports torch.cuda.max_memory_allocated instead.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mrgr1.config import ModelConfig, TextConfig, VisionConfig, preset  # noqa: E402
from mrgr1.vlm import Qwen2_5_VL  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench_config() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                            fullatt_block_indexes=(1, 3)),
        text=TextConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, mrope_section=(4, 6, 6)),
        image_token_id=8000, video_token_id=8001, vision_start_token_id=8002, vision_end_token_id=8003,
    )


def hf_model(cfg: ModelConfig):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = cfg.to_hf_dict()
    d["bos_token_id"] = d["eos_token_id"] = None
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**d))


def image_batch(cfg: ModelConfig):
    """Two left-padded prompts, one image each: (8, 12) and (10, 10) patches -> 24 and 25 tokens."""
    g = torch.Generator().manual_seed(0)
    grids = torch.tensor([[1, 8, 12], [1, 10, 10]])
    rows = []
    for n_img, n_text in [(24, 120), (25, 90)]:
        text = torch.randint(0, 7000, (n_text,), generator=g).tolist()
        rows.append(text[:10] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                    + [cfg.vision_end_token_id] + text[10:])
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    pv = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    return [t.to(DEVICE) for t in (ids, mask, pv, grids)]


def peak_bytes_start():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes_end(start):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start


def vlm_step(case: str):
    """(model, loss function) for one forward+backward of ours or transformers' on the bench config."""
    cfg = bench_config()
    ids, mask, pv, grid = image_batch(cfg)
    if case == "ours":
        model = Qwen2_5_VL.from_config(cfg, seed=0).to(DEVICE).train()
        return model, lambda: model(ids, mask, pv, grid).float().square().mean()
    model = hf_model(cfg).to(DEVICE).train()
    mm = (ids == cfg.image_token_id).int()
    return model, lambda: model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                                mm_token_type_ids=mm).logits.float().square().mean()


def logps_step(case: str):
    """(model, loss) for GRPO's log-prob step at vocab 151,936: chunked token_logps or full logits."""
    model = Qwen2_5_VL.from_config(preset("tiny"), seed=0).to(DEVICE).train()  # tiny decoder, vocab 151,936
    B, T, k = 4, 256, 192
    ids = torch.randint(0, 150000, (B, T), device=DEVICE)
    mask = torch.ones_like(ids)
    if case == "logps_chunked":
        return model, lambda: model.token_logps(ids, mask, logits_to_keep=k).sum()

    def full():  # the straightforward way: logits of the k+1 last positions, log_softmax, gather
        logits = model(ids, mask, logits_to_keep=k + 1)[:, :-1].float()  # [B, k, V]
        return torch.log_softmax(logits, -1).gather(-1, ids[:, -k:, None]).sum()
    return model, full


def fwd_bwd(model, loss_fn) -> float:
    t0 = time.perf_counter()
    loss_fn().backward()
    model.zero_grad(set_to_none=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_case(case: str, steps: int) -> dict:
    """Memory case: peak growth over one warm-up + `steps` passes, and their median time."""
    torch.manual_seed(0)
    model, loss_fn = vlm_step(case) if case in ("ours", "transformers") else logps_step(case)
    start = peak_bytes_start()
    times = [fwd_bwd(model, loss_fn) for _ in range(steps + 1)][1:]
    return {"case": case, "time_s": statistics.median(times), "peak_mb": peak_bytes_end(start) / 2**20}


def run_timing(steps: int) -> dict:
    """Ours and transformers' in one process, alternating, so machine load hits both alike."""
    torch.manual_seed(0)
    pairs = {case: vlm_step(case) for case in ("ours", "transformers")}
    times = {case: [] for case in pairs}
    for i in range(steps + 1):
        for case, (model, loss_fn) in pairs.items():
            t = fwd_bwd(model, loss_fn)
            if i > 0:
                times[case].append(t)
    return {case: {"median_s": statistics.median(t), "min_s": min(t)} for case, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--case", help="internal: run one case in this process and print JSON")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_timing(args.steps) if args.case == "timing" else run_case(args.case, args.steps)))
        return
    def subprocess_case(case):
        out = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    timing = subprocess_case("timing")
    mem = {case: subprocess_case(case) for case in ("ours", "transformers", "logps_chunked", "logps_full")}
    o, t = timing["ours"], timing["transformers"]
    c, f = mem["logps_chunked"], mem["logps_full"]
    what = "cuda max_memory_allocated" if DEVICE == "cuda" else "peak RSS growth, one process per case"
    print(f"device: {DEVICE}, torch threads: {torch.get_num_threads()}, memory = {what}")
    print(f"forward+backward, small VLM config ({args.steps} alternating steps):")
    print(f"  ours          median {o['median_s'] * 1e3:7.1f} ms  min {o['min_s'] * 1e3:7.1f} ms   "
          f"peak {mem['ours']['peak_mb']:7.1f} MB")
    print(f"  transformers  median {t['median_s'] * 1e3:7.1f} ms  min {t['min_s'] * 1e3:7.1f} ms   "
          f"peak {mem['transformers']['peak_mb']:7.1f} MB")
    print(f"  ratio ours/transformers: time (median) {o['median_s'] / t['median_s']:.2f}x, "
          f"time (min) {o['min_s'] / t['min_s']:.2f}x, memory {mem['ours']['peak_mb'] / max(mem['transformers']['peak_mb'], 1e-9):.2f}x")
    print("log-probs of 4 x 192 completion tokens, vocab 151,936, forward+backward:")
    print(f"  token_logps (chunks of 256)      {c['time_s'] * 1e3:8.1f} ms   peak {c['peak_mb']:8.1f} MB")
    print(f"  log_softmax(full logits).gather  {f['time_s'] * 1e3:8.1f} ms   peak {f['peak_mb']:8.1f} MB")
    print(f"  memory ratio chunked/full: {c['peak_mb'] / max(f['peak_mb'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
