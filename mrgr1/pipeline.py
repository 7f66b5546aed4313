"""What both command lines (train_grpo.py, evaluate.py) build before any work: data, labeler, policy.

Everything here fails early and says what to do: a real data set that is not on disk, CheXbert
weights that are missing, a policy preset whose weights are not downloaded. The demo needs none of
that: its data is drawn (mrgr1.synthetic), its labeler is the rule-based one (exact on its
templated reports), and its policy is the `demo` preset of Qwen2.5-VL (4 layers, hidden 128) with
a BPE tokenizer trained on the demo reports.

A real checkpoint folder is read for its weights and tokenizer only: the image resolution is the
run's (`load_policy`'s min_pixels / max_pixels, default at most 448x448 px per view), prompts use
the built-in Qwen2.5-VL chat template, and sampling the run's flags; a file of the folder that
asks for something else is named before any work (`folder_notes`).

Example:
    studies = load_studies("demo", None, "train")
    labeler = build_labeler("rules")
    model, processor = load_policy("runs/demo/sft", max_pixels=84 * 84)     # an HF-format folder
"""
from __future__ import annotations

import os

import torch

from . import checkpoint, data, files, labels, synthetic, weights
from .processing import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, QWEN25_VL_CHAT_TEMPLATE, Processor,
                         train_demo_tokenizer)
from .run_config import DEMO_PIXELS
from . import vlm
from .vlm import Qwen2_5_VL
from .config import preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Errors caused by the data, weights or checkpoints a user supplied: both CLIs print them as one
# `error: ...` line (their messages say what to do); anything else keeps its traceback.
USER_ERRORS = (data.DataError, weights.WeightsError, checkpoint.CheckpointError, files.FileError)


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
    from .chexbert import CheXbert, CheXbertFileError

    weights_path, vocab_path = weights.resolve_chexbert(chexbert_weights, weights_dir)
    try:
        return CheXbert.from_pretrained(weights_path, vocab_path, device=device)
    except CheXbertFileError as e:  # the user's file (e.g. a pickle that would run code): one line
        raise weights.WeightsError(f"{e} (--chexbert-weights)") from e


DEMO_VOCAB = 1024  # BPE vocabulary trained on the demo reports (ours): short sequences, fast steps


def demo_policy_folder(folder: str, train_reports: list[str], wording: tuple[str, ...], seed: int = 0,
                       vocab_size: int = DEMO_VOCAB) -> str:
    """Write the untrained demo policy (preset "demo") with a demo tokenizer to `folder` (HF layout).

    wording: the run's fixed prompt texts (system prompt, instruction, SFT think sentence), repeated
    in the tokenizer's training text so that BPE merges them into few tokens: shorter prompts."""
    os.makedirs(folder, exist_ok=True)
    texts = train_reports + list(wording) * 50
    tokenizer = train_demo_tokenizer(texts, vocab_size=vocab_size).tokenizer
    processor = Processor(tokenizer, min_pixels=DEMO_PIXELS, max_pixels=DEMO_PIXELS)
    processor.save_pretrained(folder)
    cfg = preset("demo", **processor.model_overrides())
    Qwen2_5_VL.from_config(cfg, seed=seed).save_pretrained(folder)
    return folder


def load_policy(name_or_path: str, *, weights_dir: str = "weights", dtype: str = "float32",
                device=None, min_pixels: int | None = None, max_pixels: int | None = None):
    """A preset name from weights_manifest.json or an HF-format folder -> (model, processor).

    The image resolution is the run's, whatever the folder's preprocessor_config.json says (Qwen's
    own file allows up to 12.8 M pixels, ~16k tokens, per image): min_pixels / max_pixels when
    given, else processing.DEFAULT_MIN_PIXELS / DEFAULT_MAX_PIXELS (at most 448x448 px per view).
    Files of the folder that mrgr1 does not follow (another chat template, generation settings the
    sampler does not apply) are named, one line each, before any work (`folder_notes`)."""
    folder = weights.resolve_policy(name_or_path, weights_dir)
    for note in folder_notes(folder):
        print(note)
    model = Qwen2_5_VL.from_pretrained(folder, dtype=DTYPES[dtype], device=device)
    pixels = {"min_pixels": DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
              "max_pixels": DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels}
    return model, Processor.from_pretrained(folder, **pixels)


# generation_config.json keys whose value asks the sampler for something it does not do, with the
# value that asks for nothing. Sampling itself comes from the run's --temperature and --top-p.
NEUTRAL_GENERATION = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                      "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1,
                      "num_beam_groups": 1, "diversity_penalty": 0.0, "min_length": 0, "min_new_tokens": None,
                      "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                      "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                      "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                      "exponential_decay_length_penalty": None, "guidance_scale": None, "penalty_alpha": None}
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")


def folder_notes(folder: str) -> list[str]:
    """One line per file of a model folder that mrgr1 reads differently from transformers:
    a chat template other than the built-in Qwen2.5-VL one, and generation settings the sampler
    does not apply."""
    notes = []
    for name in ("chat_template.json", "chat_template.jinja"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            text = files.read_text(path, vlm.MODEL_FOLDER_ADVICE, error=files.ModelFolderError)
            template = files.read_json(path, vlm.MODEL_FOLDER_ADVICE, error=files.ModelFolderError).get(
                "chat_template") if name.endswith(".json") else text
            if (template or "").strip() != QWEN25_VL_CHAT_TEMPLATE:
                notes.append(f"note: {path} holds another chat template than Qwen2.5-VL's; mrgr1 writes "
                             f"prompts with the built-in Qwen2.5-VL template (processing.chat_prompt), not this file")
    path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(path):
        gen = files.read_json(path, vlm.MODEL_FOLDER_ADVICE, error=files.ModelFolderError)
        unsupported = [f"{k}={gen[k]}" for k, neutral in NEUTRAL_GENERATION.items()
                       if gen.get(k) not in (neutral, None, [], {})]
        ignored = [f"{k}={gen[k]}" for k in SAMPLING_KEYS if k in gen]
        if unsupported:
            notes.append(f"note: {path} asks for {', '.join(unsupported)}, which mrgr1's sampler does not do "
                         f"(plain temperature / top-p sampling); its {', '.join(ignored) or 'sampling settings'} "
                         f"are not used either: --temperature and --top-p decide")
    return notes


def special_ids(processor) -> dict:
    """Generation's token ids: <|im_end|> (end of the assistant turn) and <|endoftext|> stop a
    completion, <|endoftext|> pads it, and the vision tokens are never sampled (an
    <|image_pad|> in a completion would need an image it does not have)."""
    im_end, eot = processor.token_id("<|im_end|>"), processor.token_id("<|endoftext|>")
    vision = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    return {"eos_token_ids": (im_end, eot), "pad_token_id": eot,
            "suppress_token_ids": tuple(processor.token_id(t) for t in vision)}
