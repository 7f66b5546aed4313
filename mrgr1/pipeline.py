"""What both command lines (train_grpo.py, evaluate.py) build before any work: data, labeler, policy.

Everything here fails early and says what to do: a real data set that is not on disk, CheXbert
weights that are missing, a policy preset whose weights are not downloaded. The demo needs none of
that: its data is drawn (mrgr1.synthetic), its labeler is the rule-based one (exact on its
templated reports), and its policy is the `demo` preset of Qwen2.5-VL (4 layers, hidden 128) with
a BPE tokenizer trained on the demo reports.

Example:
    studies = load_studies("demo", None, "train")
    labeler = build_labeler("rules")
    model, processor = load_policy("runs/demo/sft")     # an HF-format folder
"""
from __future__ import annotations

import os

import torch

from . import data, labels, synthetic, weights
from .processing import Processor, train_demo_tokenizer
from .trainer import INSTRUCTION, SFT_THINK, SYSTEM_PROMPT
from .vlm import Qwen2_5_VL
from .config import preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_studies(dataset: str, root: str | None, split: str, **kwargs) -> list[data.Study]:
    """One split; the demo set is drawn on first use (a few seconds), real sets must exist."""
    if dataset == "demo":
        synthetic.ensure_demo(root or data.DEFAULT_ROOTS["demo"])
    studies = data.load_split(dataset, root, split, **kwargs)
    if not studies:
        raise data.DataError(f"the {split} split of {dataset} ({root or data.DEFAULT_ROOTS[dataset]}) is empty")
    return studies


def build_labeler(kind: str, chexbert_weights: str | None = None, weights_dir: str = "weights",
                  device=None):
    """The reward / evaluation labeler: CheXbert (the paper's) or the rule-based one (opt-in).

    CheXbert weights that are missing stop the run with the download command: the rule-based
    labeler is never chosen silently for a real data set."""
    if kind == "rules":
        return labels.RuleLabeler()
    if kind != "chexbert":
        raise ValueError(f"--labeler must be 'chexbert' or 'rules', got {kind!r}")
    from .chexbert import CheXbert

    weights_path, vocab_path = weights.resolve_chexbert(chexbert_weights, weights_dir)
    return CheXbert.from_pretrained(weights_path, vocab_path, device=device)


DEMO_VOCAB = 1024  # BPE vocabulary trained on the demo reports (ours): short sequences, fast steps
DEMO_PIXELS = 84 * 84  # the demo's 112 px views are resized to 84 px: 6x6 patches, 9 tokens (ours)


def demo_policy_folder(folder: str, train_reports: list[str], seed: int = 0, vocab_size: int = DEMO_VOCAB) -> str:
    """Write the untrained demo policy (preset "demo") with a demo tokenizer to `folder` (HF layout)."""
    os.makedirs(folder, exist_ok=True)
    # the fixed prompt texts are repeated so that BPE merges them into few tokens: shorter prompts
    texts = train_reports + [SYSTEM_PROMPT, INSTRUCTION, SFT_THINK] * 50
    tokenizer = train_demo_tokenizer(texts, vocab_size=vocab_size).tokenizer
    processor = Processor(tokenizer, min_pixels=DEMO_PIXELS, max_pixels=DEMO_PIXELS)
    processor.save_pretrained(folder)
    cfg = preset("demo", **processor.model_overrides())
    Qwen2_5_VL.from_config(cfg, seed=seed).save_pretrained(folder)
    return folder


def load_policy(name_or_path: str, *, weights_dir: str = "weights", dtype: str = "float32",
                device=None):
    """A preset name from weights_manifest.json or an HF-format folder -> (model, processor)."""
    folder = weights.resolve_policy(name_or_path, weights_dir)
    model = Qwen2_5_VL.from_pretrained(folder, dtype=DTYPES[dtype], device=device)
    return model, Processor.from_pretrained(folder)


def special_ids(processor) -> dict:
    """Generation's token ids: <|im_end|> (end of the assistant turn) and <|endoftext|> stop a
    completion, <|endoftext|> pads it, and the vision tokens are never sampled (an
    <|image_pad|> in a completion would need an image it does not have)."""
    im_end, eot = processor.token_id("<|im_end|>"), processor.token_id("<|endoftext|>")
    vision = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    return {"eos_token_ids": (im_end, eot), "pad_token_id": eot,
            "suppress_token_ids": tuple(processor.token_id(t) for t in vision)}
