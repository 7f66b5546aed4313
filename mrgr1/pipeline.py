"""What both command lines (train_grpo.py, evaluate.py) build before any work: data, labeler, policy.

Everything here fails early and says what to do: a real data set that is not on disk, CheXbert
weights that are missing, a policy preset whose weights are not downloaded. The demo needs none of
that: its data is drawn (mrgr1.synthetic), its labeler is the rule-based one (exact on its
templated reports), and its policy is the `tiny` Qwen2.5-VL with a BPE tokenizer trained on the
demo reports.

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


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def tiny_policy_folder(folder: str, train_reports: list[str], seed: int = 0) -> str:
    """Write an untrained `tiny` Qwen2.5-VL with a demo tokenizer to `folder` (HF layout)."""
    os.makedirs(folder, exist_ok=True)
    texts = train_reports + [SYSTEM_PROMPT, INSTRUCTION, SFT_THINK, "<think></think><report></report>"]
    tok_path = os.path.join(folder, "tokenizer.json")
    tokenizer = train_demo_tokenizer(texts, path=tok_path)
    processor = Processor.from_pretrained(folder)
    cfg = preset("tiny", **processor.model_overrides())
    Qwen2_5_VL.from_config(cfg, seed=seed).save_pretrained(folder)
    del tokenizer
    return folder


def load_policy(name_or_path: str, *, weights_dir: str = "weights", dtype: str = "float32",
                device=None):
    """A preset name from weights_manifest.json or an HF-format folder -> (model, processor)."""
    folder = weights.resolve_policy(name_or_path, weights_dir)
    model = Qwen2_5_VL.from_pretrained(folder, dtype=DTYPES[dtype], device=device)
    return model, Processor.from_pretrained(folder)


def eos_and_pad(processor) -> tuple[tuple[int, ...], int]:
    """<|im_end|> ends an assistant turn; <|endoftext|> too. Pad with <|endoftext|>."""
    im_end, eot = processor.token_id("<|im_end|>"), processor.token_id("<|endoftext|>")
    return (im_end, eot), eot
