"""Our Qwen2.5-VL against transformers' at a real size: one forward's logits, same random weights.

The unit tests check parity on small configs on the CPU; this checks the real shapes (7B: 28
decoder layers, head_dim 128, the 32-block vision tower with window attention) on a GPU, where
the kernels differ. Both models share the same weight tensors (bench_generate.build_models), get
the same left-padded prompts with one image each, and the logits of every real (non-pad) position
are compared: max |difference| relative to the logits' spread, and how often the top token agrees.
A top token whose lead over the second is within the rounding noise may flip on rounding alone;
the smallest top-2 gap among the flips and the median gap are printed to show it. The vision
tower's output tokens are compared the same way, to tell where a difference starts. In bf16 the two
stacks round differently, so each is compared with the float32 run: ours should be about as far
from it as transformers' own bf16 run is. transformers' rotary `inv_freq` buffers stay float32 in
its bf16 run (`to_bf16_keeping_rotary_fp32`): `.to(torch.bfloat16)` would round them too, which
turns some frequency pairs by up to 0.35 rad at position 300, and the "bf16 rounding alone" line
would then measure that error of the cast rather than bf16 arithmetic (ours computes the
frequencies in float32 from the config).

TF32 is switched off (`--tf32` keeps PyTorch's defaults): cuDNN's default allows it, so
transformers' Conv3d patch embedding would run in TF32 on an Ampere-or-newer GPU while ours (the
same map as a matmul) runs in fp32, and that first-layer rounding grows through 60 layers.

    PYTHONPATH=. python benchmarks/parity_real_size.py --device cuda --preset huatuogpt-vision-7b
    PYTHONPATH=. python benchmarks/parity_real_size.py --device cpu --preset tiny --image-size 112
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import build_models, make_batch  # noqa: E402


def relative(expected: torch.Tensor, got: torch.Tensor) -> str:
    diff, spread = (expected - got).abs(), expected.std()
    return (f"max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e} "
            f"(std of the reference {spread.item():.3e}, max ratio {(diff.max() / spread).item():.2e})")


def top_tokens(expected: torch.Tensor, got: torch.Tensor) -> str:
    flips = expected.argmax(-1) != got.argmax(-1)
    top2 = expected.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1])[flips]
    gap_text = f", smallest top-2 gap among the others {gaps.min().item():.2e}" if flips.any() else ""
    return (f"top token equal at {(~flips).float().mean().item():.2%} of {len(flips)} positions{gap_text} "
            f"(median top-2 gap {(top2[:, 0] - top2[:, 1]).median().item():.2e})")


def to_bf16_keeping_rotary_fp32(model) -> dict:
    """model.to(torch.bfloat16) with every `...inv_freq` buffer (transformers' rotary embeddings,
    text and vision) put back in float32, as the model computes it."""
    kept = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model.to(torch.bfloat16)
    for name, buf in kept.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buf)  # a registered buffer stays one
    return kept


@torch.no_grad()
def outputs(model, batch, cfg, is_hf: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(vision tokens [tokens, D], logits of the real positions [n, V]), both float32."""
    if is_hf:
        vision = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        logits = model(**batch, mm_token_type_ids=(batch["input_ids"] == cfg.image_token_id).int()).logits
    else:
        vision = model.image_features(batch["pixel_values"], batch["image_grid_thw"])
        logits = model(**batch)
    return vision.float(), logits[batch["attention_mask"].bool()].float()


def report(name: str, expected, got) -> None:
    print(f"  {name}\n    vision tokens: {relative(expected[0], got[0])}\n"
          f"    logits: {relative(expected[1], got[1])}\n    {top_tokens(expected[1], got[1])}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="huatuogpt-vision-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--tf32", action="store_true", help="keep PyTorch's TF32 defaults (cuDNN: on)")
    return ap


def main():
    args = build_parser().parse_args()
    if not args.tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    hf, ours, cfg = build_models(args.preset, None, args.device, torch.float32, seed=0)
    batch = make_batch(cfg, args.prompts, args.image_size, args.device, torch.float32, seed=1)
    print(f"{args.preset} on {args.device}, {'TF32 defaults' if args.tf32 else 'no TF32'}")
    reference = outputs(hf, batch, cfg, is_hf=True)
    report("float32: ours vs transformers", reference, outputs(ours, batch, cfg, is_hf=False))
    kept = to_bf16_keeping_rotary_fp32(hf)   # new bf16 tensors; ours still holds the float32 ones
    print(f"  transformers' bf16 run keeps {len(kept)} rotary inv_freq buffers in float32", flush=True)
    ours.to(torch.bfloat16)
    batch_bf16 = {**batch, "pixel_values": batch["pixel_values"].bfloat16()}
    hf_bf16, ours_bf16 = outputs(hf, batch_bf16, cfg, is_hf=True), outputs(ours, batch_bf16, cfg, is_hf=False)
    report("bfloat16 transformers vs the float32 run (bf16 rounding alone)", reference, hf_bf16)
    report("bfloat16 ours vs the float32 run", reference, ours_bf16)
    report("bfloat16: ours vs transformers", hf_bf16, ours_bf16)


if __name__ == "__main__":
    main()
