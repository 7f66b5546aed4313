"""Rollout throughput: mrgr1.generate vs transformers' generate on the same weights.

GRPO spends most of its time sampling G completions per prompt, so this is the number that
matters for training speed. Both generators get the same random Qwen2.5-VL weights (ours
shares the transformers model's tensors: no second copy), the same left-padded prompts with
one image each, the same max_new_tokens and G samples per prompt, and decode greedily
(transformers: do_sample=True, top_k=1, num_return_sequences=G, which is greedy and the only
way it accepts G > 1 greedy rows; ours: temperature 0, num_samples=G). No EOS, so every row
generates exactly max_new_tokens. Outputs are compared token for token (asserted equal in
fp32; in bf16 the two stacks round differently and greedy paths may part, so the match
fraction is printed instead). Tokens/s = B * G * max_new_tokens / wall time; the median of
--repeats runs of each, interleaved, after one warm-up run of each.

Our generator is timed with each decode step (generate's `decode`): eager, static, and on
CUDA the static step replayed as a CUDA graph. For ours, the time of one decode step is
(time of the run - time of a run with max_new_tokens=1, i.e. prefill and first token) /
(max_new_tokens - 1); the roofline beside it is the least a step must read (the decoder's
weights + the KV cache at the run's mean length, `decode_bytes`) divided by the memory
bandwidth (--bandwidth-tbs: a number from the card's data sheet, or 'measure' for a device
copy; required on CUDA).

Run from the repository root (CPU, the default config: 4 layers, hidden 256, vocab 151936,
2 prompts x 8 samples x 64 tokens, one 224x224 image per prompt, fp32):
    PYTHONPATH=. python benchmarks/bench_generate.py --threads 1
(On a CPU shared with other jobs, --threads 1 avoids OpenMP threads spinning against each
other, which slowed both generators ~7x here; --vocab 2048 shows the overhead-bound case.)
A GPU with the 7B shapes (random weights) at 16, 64 and 128 rows, as issue 18 asks:
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset huatuogpt-vision-7b \
        --prompts 2 8 16 --image-size 448 --new-tokens 256 --repeats 1 --bandwidth-tbs measure
"""
import argparse
import statistics
import time

import torch
import transformers

from mrgr1.config import preset
from mrgr1.generate import generate
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


def run_paths(hf, ours, cfg, batch, args, paths):
    """({path: tokens [R, N] of its first timed run}, {path: [seconds of each run]}): each generator
    warmed up by a short run (kernels, allocator), then --repeats runs, interleaved; ours also
    {path + ' prefill': seconds of runs with max_new_tokens=1}."""
    n, prompt_len = args.new_tokens, batch["input_ids"].shape[1]

    def call(path, new_tokens):
        if path == "transformers":
            return hf.generate(**batch, mm_token_type_ids=(batch["input_ids"] == cfg.image_token_id).int(),
                               max_new_tokens=new_tokens, do_sample=True, top_k=1,
                               num_return_sequences=args.samples, pad_token_id=0)[:, prompt_len:]
        return generate(ours, **batch, max_new_tokens=new_tokens, num_samples=args.samples, temperature=0,
                        decode=path)[0]

    out, times = {}, {}
    with torch.no_grad():
        for path in paths:
            timed(lambda: call(path, min(n, 8)), args.device)
        for _ in range(args.repeats):
            for path in paths:
                tokens, seconds = timed(lambda: call(path, n), args.device)
                out.setdefault(path, tokens)
                times.setdefault(path, []).append(seconds)
                if path != "transformers":
                    times.setdefault(path + " prefill", []).append(timed(lambda: call(path, 1), args.device)[1])
    return out, times


def main():
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
                    help="generators to time (default: transformers, eager, static, and graph on CUDA)")
    ap.add_argument("--bandwidth-tbs", default=None,
                    help="memory bandwidth for the roofline, TB/s, or 'measure' (a device copy); "
                         "required on CUDA, optional on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
          f"{torch.get_num_threads()} threads" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    for prompts in args.prompts:
        batch = make_batch(cfg, prompts, args.image_size, args.device, dtype, seed=1)
        n, prompt_len, rows = args.new_tokens, batch["input_ids"].shape[1], prompts * args.samples
        out, times = run_paths(hf, ours, cfg, batch, args, paths)
        reference = out[paths[0]]
        match = {p: (reference == out[p]).float().mean().item() for p in paths}
        if dtype == torch.float32:
            assert all(m == 1.0 for m in match.values()), f"outputs differ from {paths[0]}: {match}"
        tokens = rows * n
        print(f"\n{rows} rows: {prompts} prompts ({prompt_len} tokens padded, one {args.image_size}px image) x "
              f"{args.samples} samples x {n} new tokens = {tokens} tokens")
        median = {k: statistics.median(v) for k, v in times.items()}
        for p in paths:
            line = (f"{p:>12}: {tokens / median[p]:8.1f} tok/s  (median of {args.repeats}: "
                    f"{', '.join(f'{s:.2f}' for s in times[p])} s; tokens equal to {paths[0]}: {match[p]:.1%})")
            if "transformers" in paths and p != "transformers":
                line += f"  {median['transformers'] / median[p]:.2f}x transformers"
            if p != "transformers":
                step_ms = (median[p] - median[p + " prefill"]) / (n - 1) * 1e3
                line += f"; decode step {step_ms:.2f} ms"
                if bandwidth:
                    roof_ms = decode_bytes(ours, rows, prompt_len + n / 2, dtype) / (bandwidth * 1e12) * 1e3
                    line += f", roofline {roof_ms:.2f} ms ({step_ms / roof_ms:.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
