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

Run from the repository root (CPU, the default config: 4 layers, hidden 256, vocab 151936,
2 prompts x 8 samples x 64 tokens, one 224x224 image per prompt, fp32):
    PYTHONPATH=. python benchmarks/bench_generate.py --threads 1
(On a CPU shared with other jobs, --threads 1 avoids OpenMP threads spinning against each
other, which slowed both generators ~7x here; --vocab 2048 shows the overhead-bound case.)
A GPU with the real 3B shapes (random weights):
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --preset qwen2.5-vl-3b
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="tiny (widened as BENCH_OVERRIDES) or a real preset")
    ap.add_argument("--vocab", type=int, default=None, help="override vocab_size (default: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    hf, ours, cfg = build_models(args.preset, args.vocab, args.device, dtype, seed=0)
    batch = make_batch(cfg, args.prompts, args.image_size, args.device, dtype, seed=1)
    n, prompt_len = args.new_tokens, batch["input_ids"].shape[1]
    run_hf = lambda: hf.generate(  # noqa: E731
        **batch, mm_token_type_ids=(batch["input_ids"] == cfg.image_token_id).int(),
        max_new_tokens=n, do_sample=True, top_k=1,
        num_return_sequences=args.samples, pad_token_id=0)[:, prompt_len:]
    run_ours = lambda: generate(  # noqa: E731
        ours, **batch, max_new_tokens=n, num_samples=args.samples, temperature=0)[0]

    with torch.no_grad():
        expected, _ = timed(run_hf, args.device)  # warm-up runs, and the output check
        got, _ = timed(run_ours, args.device)
    match = (expected == got).float().mean().item()
    if dtype == torch.float32:
        assert torch.equal(expected, got), f"outputs differ: {match:.1%} of tokens equal"

    times = {"transformers": [], "mrgr1": []}
    for _ in range(args.repeats):
        with torch.no_grad():
            times["transformers"].append(timed(run_hf, args.device)[1])
        times["mrgr1"].append(timed(run_ours, args.device)[1])
    tokens = args.prompts * args.samples * n
    t = cfg.text
    print(f"model: preset {args.preset}, {t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab "
          f"{t.vocab_size}, vision depth {cfg.vision.depth}; {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"work: {args.prompts} prompts ({prompt_len} tokens padded, one {args.image_size}px image) x "
          f"{args.samples} samples x {n} new tokens = {tokens} tokens; tokens equal: {match:.1%}")
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>12}: {tokens / median[k]:8.1f} tok/s  (median of {args.repeats}: "
              f"{', '.join(f'{s:.2f}' for s in v)} s)")
    print(f"speed-up mrgr1 / transformers: {median['transformers'] / median['mrgr1']:.2f}x")


if __name__ == "__main__":
    main()
