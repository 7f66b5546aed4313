"""Rollout throughput: mrgr1.generate vs transformers' generate on the same weights.

GRPO spends most of its time sampling G completions per prompt, so this is the number that
matters for training speed. Both generators get the same random Qwen2.5-VL weights (ours
shares the transformers model's tensors: no second copy), the same left-padded prompts with
one image each, the same max_new_tokens and G samples per prompt, and decode greedily
(transformers: do_sample=True, top_k=1, num_return_sequences=G, which is greedy and the only
way it accepts G > 1 greedy rows; ours: temperature 0, num_samples=G). No EOS, so every row
generates exactly max_new_tokens (and the batch is never compacted). Tokens/s = B * G *
max_new_tokens / wall time; the median of --repeats runs, after one short warm-up run.

Each path (transformers, then our decode steps: eager, static, and on CUDA the static step
replayed as a CUDA graph) is warmed up, timed and printed before the next starts, so a
timeout still leaves the lines already done; a path that raises prints a one-line FAILED and
the others still run (the exit status is then 1). Each line gives the share of tokens equal to
transformers', to our eager step's and (graph) to our static step's. In fp32 every path must
match all of them (a mismatch prints MISMATCH and sets exit status 1). In bf16 greedy paths
part at the first rounding flip: transformers and ours round differently, and the eager step
attends over the filled cache columns where the static one attends over all of them under a
mask (another summation order), so those shares are information; the graph replays the static
step's kernels and must match it. For ours, the time of one decode step is
(time of the run - time of a run with max_new_tokens=1, i.e. prefill and first token) /
(max_new_tokens - 1); the roofline beside it is the least a step must read (the decoder's
weights + the KV cache at the run's mean length, `decode_bytes`) divided by the memory
bandwidth (--bandwidth-tbs: a number from the card's data sheet, or 'measure' for a device
copy; required on CUDA).

--draw-only times the sampling draw alone instead, at --draw-rows rows (default 32 = 4 studies x
8 samples) over the vocabulary (default 151,936): `generate.draw` (a two-level inverse CDF) against
the exponential race it replaced (argmax p_i / E_i, E_i ~ Exp(1): one exponential per id, kept
here as `exponential_race`), both on the same float32 probabilities, in ms per call (median of
--draw-calls calls after 5 warm-up calls) and their ratio:
    PYTHONPATH=. python benchmarks/bench_generate.py --draw-only --threads 1

Run from the repository root (CPU, the default config: 4 layers, hidden 256, vocab 151936,
2 prompts x 8 samples x 64 tokens, one 224x224 image per prompt, fp32):
    PYTHONPATH=. python benchmarks/bench_generate.py --threads 1
(On a CPU shared with other jobs, --threads 1 avoids OpenMP threads spinning against each
other, which slowed both generators ~7x here; --vocab 2048 shows the overhead-bound case.)
A GPU with the 7B shapes (random weights) at 16, 64 and 128 rows:
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset huatuogpt-vision-7b \
        --prompts 2 8 16 --image-size 448 --new-tokens 256 --repeats 1 --bandwidth-tbs measure
"""
import argparse
import statistics
import time

import torch
import transformers

from mrgr1.config import preset
from mrgr1.generate import draw, generate
from mrgr1.vlm import Qwen2_5_VL

# The default benchmark model: the "tiny" preset widened to 4 layers x hidden 256 (ours).
# mrope_section keeps the real 16:24:24 split of the rotary pairs for head_dim 64.
BENCH_OVERRIDES = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=1024,
                       num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12),
                       vision_out_hidden_size=256)


def build_models(preset_name: str, vocab: int | None, device: str, dtype: torch.dtype, seed: int):
    """A random transformers Qwen2.5-VL and our Qwen2_5_VL sharing its weight tensors."""
    overrides = dict(BENCH_OVERRIDES) if preset_name == "tiny" else {}
    if vocab:  # a small vocabulary moves the special tokens to its end
        overrides.update(vocab_size=vocab, vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
                         image_token_id=vocab - 2, video_token_id=vocab - 1)
    cfg = preset(preset_name, **overrides)
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    hf_cfg.text_config.bos_token_id = hf_cfg.text_config.eos_token_id = None
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.device("meta"):
        ours = Qwen2_5_VL(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)  # same tensors, same names
    ours.tie_weights()
    return hf, ours.eval(), cfg


def make_batch(cfg, num_prompts: int, image_size: int, device: str, dtype: torch.dtype, seed: int):
    """Left-padded prompts 'text <vision_start> <image_pad>*n <vision_end> text' of different
    lengths, one image_size x image_size image each (random patches, as the processor's)."""
    gen = torch.Generator().manual_seed(seed)
    v = cfg.vision
    side = image_size // v.patch_size
    n_patches, n_tokens = side * side, side * side // v.spatial_merge_size ** 2
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    prompts = []
    for i in range(num_prompts):
        text = lambda n: torch.randint(10, min(1000, cfg.text.vocab_size - 4), (n,), generator=gen)  # noqa: E731
        prompts.append(torch.cat([text(12 + 5 * i), torch.tensor([cfg.vision_start_token_id]),
                                  torch.full((n_tokens,), cfg.image_token_id),
                                  torch.tensor([cfg.vision_end_token_id]), text(8)]))
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(num_prompts, width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    pixel_values = torch.randn(num_prompts * n_patches, patch_dim, generator=gen)
    grid = torch.tensor([[1, side, side]] * num_prompts)
    return dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                pixel_values=pixel_values.to(device, dtype), image_grid_thw=grid.to(device))


def timed(fn, device: str):
    """(result, seconds) of fn(), synchronising the GPU around it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def measure_bandwidth(device: str, gib: float = 2.0) -> float:
    """The card's achieved memory bandwidth in TB/s: a device-to-device copy of `gib` GiB reads
    and writes each byte once (median of 5 copies after one warm-up)."""
    src = torch.empty(int(gib * 2 ** 30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device)[1] for _ in range(6)][1:]
    return 2 * src.numel() / statistics.median(times) / 1e12


def decode_bytes(model, rows: int, cache_len: float, dtype: torch.dtype) -> float:
    """Bytes a decode step must read at least: the decoder's weights and the lm_head (the
    vision tower does not run; of the embedding table only R rows are read) and the keys and
    values of `cache_len` columns for every row and layer."""
    text = model.model.language_model
    weights = sum(p.numel() * p.element_size() for p in text.layers.parameters())
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    cfg = text.cfg
    kv = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * cfg.head_dim * cache_len
    return weights + kv * torch.finfo(dtype).bits / 8


def call_path(hf, ours, cfg, batch, args, path: str, new_tokens: int) -> torch.Tensor:
    """The greedy completions [R, new_tokens] of one generator on `batch`."""
    if path == "transformers":
        prompt_len = batch["input_ids"].shape[1]
        return hf.generate(**batch, mm_token_type_ids=(batch["input_ids"] == cfg.image_token_id).int(),
                           max_new_tokens=new_tokens, do_sample=True, top_k=1,
                           num_return_sequences=args.samples, pad_token_id=0)[:, prompt_len:]
    return generate(ours, **batch, max_new_tokens=new_tokens, num_samples=args.samples, temperature=0,
                    decode=path)[0]


def measure_path(hf, ours, cfg, batch, args, path: str) -> dict:
    """One generator: a short warm-up run (kernels, allocator, a graph recording), then --repeats
    timed runs of --new-tokens -> {tokens: [R, N] of the first, seconds: [...], prefill: [...]}
    (prefill: runs with max_new_tokens=1, ours only)."""
    run = lambda n: timed(lambda: call_path(hf, ours, cfg, batch, args, path, n), args.device)  # noqa: E731
    run(min(args.new_tokens, 8))
    result = {"tokens": None, "seconds": [], "prefill": []}
    for _ in range(args.repeats):
        tokens, seconds = run(args.new_tokens)
        result["tokens"] = tokens if result["tokens"] is None else result["tokens"]
        result["seconds"].append(seconds)
        if path != "transformers":
            result["prefill"].append(run(1)[1])
    return result


def path_line(path: str, result: dict, done: dict, rows: int, args, ours, prompt_len: int,
              dtype: torch.dtype, bandwidth: float | None) -> tuple[str, bool]:
    """(the printed line of one path, whether its tokens disagree where they must agree)."""
    n, tokens = args.new_tokens, result["tokens"]
    median = statistics.median(result["seconds"])
    line = (f"{path:>12}: {rows * n / median:8.1f} tok/s  (median of {args.repeats}: "
            f"{', '.join(f'{s:.2f}' for s in result['seconds'])} s)")
    mismatch = False
    for other in ("transformers", "eager", "static"):
        if other in done and other != path and (other != "static" or path == "graph"):
            share = (done[other]["tokens"] == tokens).float().mean().item()
            line += f"; tokens equal to {other}: {share:.1%}"
            must = dtype == torch.float32 or other == "static"  # the graph replays the static step
            if must and share < 1.0:
                line, mismatch = line + " MISMATCH", True
    if "transformers" in done and path != "transformers":
        line += f"; {statistics.median(done['transformers']['seconds']) / median:.2f}x transformers"
    if path != "transformers":
        step_ms = (median - statistics.median(result["prefill"])) / max(n - 1, 1) * 1e3
        line += f"; decode step {step_ms:.2f} ms"
        if bandwidth:
            roof_ms = decode_bytes(ours, rows, prompt_len + n / 2, dtype) / (bandwidth * 1e12) * 1e3
            line += f", roofline {roof_ms:.2f} ms ({step_ms / roof_ms:.2f}x)"
    return line, mismatch


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The draw generate used before: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with
    probability p_i, at the cost of one exponential per id. [R, V] -> [R]."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race.clamp_min_(1e-20)).argmax(dim=-1)


def measure_draw(args, vocab: int) -> None:
    """Print ms per call of `generate.draw` and of `exponential_race` on the same [rows, vocab]
    float32 probabilities (a softmax of N(0, 3^2) logits), and the ratio."""
    generator = torch.Generator(device=args.device).manual_seed(0)
    logits = torch.randn(args.draw_rows, vocab, device=args.device, generator=generator) * 3
    probs = torch.softmax(logits, dim=-1)                                        # [R, V] float32
    print(f"draw alone: {args.draw_rows} rows x {vocab} ids, float32 probabilities, {args.device}, "
          f"{torch.get_num_threads()} threads; median of {args.draw_calls} calls", flush=True)
    medians = {}
    for name, fn in (("exponential race", exponential_race), ("generate.draw", draw)):
        for _ in range(5):
            fn(probs, generator)
        times = [timed(lambda: fn(probs, generator), args.device)[1] for _ in range(args.draw_calls)]
        medians[name] = statistics.median(times)
        print(f"{name:>18}: {medians[name] * 1e3:8.3f} ms a call", flush=True)
    print(f"generate.draw is {medians['exponential race'] / medians['generate.draw']:.1f}x faster "
          f"than the exponential race")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="tiny (widened as BENCH_OVERRIDES) or a real preset")
    ap.add_argument("--vocab", type=int, default=None, help="override vocab_size (default: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, nargs="+", default=[2],
                    help="studies per batch; one measurement per value (rows = prompts x samples)")
    ap.add_argument("--samples", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", nargs="+", default=None, choices=["transformers", "eager", "static", "graph"],
                    help="generators to time, in this order (default: transformers, eager, static, and "
                         "graph on CUDA)")
    ap.add_argument("--bandwidth-tbs", default=None,
                    help="memory bandwidth for the roofline, TB/s, or 'measure' (a device copy); "
                         "required on CUDA, optional on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--draw-only", action="store_true",
                    help="time the sampling draw alone (generate.draw vs the exponential race), no model")
    ap.add_argument("--draw-rows", type=int, default=32, help="rows of the draw-only measurement")
    ap.add_argument("--draw-calls", type=int, default=50, help="timed calls of each draw (--draw-only)")
    return ap


def main():
    ap = build_parser()
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.draw_only:
        return measure_draw(args, args.vocab or preset(args.preset).text.vocab_size)
    cuda = args.device.startswith("cuda")
    if cuda and args.bandwidth_tbs is None:
        ap.error("--bandwidth-tbs is required on CUDA: the card's memory bandwidth in TB/s (from its "
                 "data sheet), or 'measure' to time a device copy")
    paths = args.paths or ["transformers", "eager", "static"] + (["graph"] if cuda else [])
    dtype = getattr(torch, args.dtype)

    hf, ours, cfg = build_models(args.preset, args.vocab, args.device, dtype, seed=0)
    bandwidth = None
    if args.bandwidth_tbs is not None:
        measured = args.bandwidth_tbs == "measure"
        bandwidth = measure_bandwidth(args.device) if measured else float(args.bandwidth_tbs)
        print(f"memory bandwidth for the roofline: {bandwidth:.2f} TB/s "
              f"({'measured: device copy' if measured else 'given'})")
    t = cfg.text
    print(f"model: preset {args.preset}, {t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab "
          f"{t.vocab_size}, vision depth {cfg.vision.depth}; {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads" + (f" ({torch.cuda.get_device_name(args.device)})" if cuda else ""),
          flush=True)
    failed = False
    for prompts in args.prompts:
        batch = make_batch(cfg, prompts, args.image_size, args.device, dtype, seed=1)
        n, prompt_len, rows = args.new_tokens, batch["input_ids"].shape[1], prompts * args.samples
        print(f"\n{rows} rows: {prompts} prompts ({prompt_len} tokens padded, one {args.image_size}px image) x "
              f"{args.samples} samples x {n} new tokens = {rows * n} tokens", flush=True)
        done = {}
        for path in paths:
            try:
                with torch.no_grad():
                    done[path] = measure_path(hf, ours, cfg, batch, args, path)
            except Exception as e:  # noqa: BLE001 (one path's failure must not hide the others' lines)
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                print(f"{path:>12}: FAILED: {type(e).__name__}: {message[:300]}", flush=True)
                failed = True
                if cuda:
                    try:  # free what the failed path held; a broken CUDA context fails the next path too
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception:  # noqa: BLE001
                        pass
                continue
            line, mismatch = path_line(path, done[path], done, rows, args, ours, prompt_len, dtype, bandwidth)
            print(line, flush=True)
            failed |= mismatch
    if failed:
        raise SystemExit("some path failed or disagreed where it must agree (FAILED / MISMATCH lines above)")


if __name__ == "__main__":
    main()
