"""Qwen2.5-VL processor: tokenizer (tokenizers library), chat template, image preprocessing.

References: Qwen2-VL (arXiv 2409.12191) naive dynamic resolution; the Qwen2.5-VL chat template
and the Qwen2-VL image processor, reimplemented here and tested against transformers.

Images (Qwen2-VL "smart resize"): each image is resized (bicubic) so both sides are multiples
of 28 = patch 14 x merge 2 and its area lies in [min_pixels, max_pixels], rescaled by 1/255,
normalised with the CLIP mean/std, and cut into 14x14 patches, each repeated over the 2
temporal slots. Patches are listed merge-block by merge-block (2x2 neighbours consecutive):
pixel_values [sum of h*w, 3*2*14*14], image_grid_thw [n_images, 3] = (1, h, w) in patches.
An image gives h*w/4 text tokens: the prompt carries that many <|image_pad|>.

Our default resolution (the paper gives none): max_pixels = 448*448 = 200,704 pixels, i.e. at
most 256 image tokens per view; a chest X-ray at 448 px keeps the structures CheXbert's
observations name while a two-view IU X-Ray prompt stays near 520 tokens. min_pixels = 56*56
as Qwen. Both are parameters.

Example:
    >>> proc = Processor.from_pretrained("path/to/Qwen2.5-VL-7B-Instruct")
    >>> msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    >>> batch = proc([msgs], images=[[xray]])          # input_ids [1, T] (left padded), pixel_values ...
    >>> proc.batch_decode(completions)                  # special tokens stripped
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image

from .files import ModelFolderError, read_json, read_text

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 448 * 448  # ours, see the module docstring

# Qwen2.5's special tokens, in id order 151643 .. 151656 of the real vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Output-format tags: single tokens, but ordinary text (kept by decode), for the demo tokenizer.
FORMAT_TOKENS = ["<think>", "</think>", "<report>", "</report>"]
# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------- images

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width} px: aspect ratio above 200 is not supported")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as transformers' `convert_to_rgb` (so a model sees here what it sees there).

    Transparency (an alpha band, or a palette / `transparency` entry) is composited on white.
    Every other mode goes through PIL's convert, which CLIPS 16- and 32-bit grey values at 255:
    a 16-bit X-ray whose values go above 255 turns mostly white, in transformers as here. Such
    images are to be rescaled to 8 bits before (a warning says so)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if image.mode.startswith("I") and image.getextrema()[1] > 255:
        warnings.warn(f"a {image.mode} (16/32-bit) image with values up to {image.getextrema()[1]}: values "
                      f"above 255 become white, as in transformers; rescale such images to 8 bits first",
                      stacklevel=2)
    return image.convert("RGB")


def image_patches(image: Image.Image, *, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS,
                  patch_size=14, merge_size=2, temporal_patch_size=2, mean=CLIP_MEAN, std=CLIP_STD):
    """One image -> (patches [h*w, 3*T*P*P] float32 numpy, (1, h, w) grid in patches)."""
    image = to_rgb(image)
    H, W = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    image = image.resize((W, H), resample=Image.BICUBIC)
    x = (np.asarray(image).astype(np.float64) / 255.0).astype(np.float32)  # [H, W, C]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = x.transpose(2, 0, 1)  # [C, H, W]
    C, gh, gw, m, P = 3, H // patch_size, W // patch_size, merge_size, patch_size
    x = x.reshape(C, gh // m, m, P, gw // m, m, P)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]: merge blocks, then patches
    x = np.repeat(x[:, :, :, :, :, None], temporal_patch_size, axis=5)  # a still image fills both frames
    return x.reshape(gh * gw, C * temporal_patch_size * P * P), (1, gh, gw)


# ---------------------------------------------------------------- chat template

# The Qwen2.5-VL chat template as published with the model (chat_template.json); `chat_prompt`
# writes what it renders (tests/test_processing.py checks that against transformers). A checkpoint
# whose template differs gets a note before training (pipeline.folder_notes): mrgr1 uses this one.
QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def chat_prompt(messages: list[dict], add_generation_prompt: bool = True,
                system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The Qwen2.5-VL chat template; each image is <|vision_start|><|image_pad|><|vision_end|>
    (one pad, expanded later to the image's token count).

    messages: [{"role": "user", "content": "text" or [{"type": "image"}, {"type": "text", "text": ...}]}]
    A system message is added first unless the conversation starts with one."""
    out = []
    if messages and messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
    for msg in messages:
        content = msg["content"]
        if not isinstance(content, str):
            parts = []
            for item in content:
                if item.get("type") == "image" or "image" in item or "image_url" in item:
                    parts.append("<|vision_start|><|image_pad|><|vision_end|>")
                elif "text" in item:
                    parts.append(item["text"])
                else:
                    raise ValueError(f"message content item {item!r}: expected an image or a text item")
            content = "".join(parts)
        out.append(f"<|im_start|>{msg['role']}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def message_images(messages: list[dict]) -> list:
    """Image objects embedded in message content items ({"type": "image", "image": PIL.Image})."""
    return [item["image"] for msg in messages if not isinstance(msg["content"], str)
            for item in msg["content"] if isinstance(item, dict) and isinstance(item.get("image"), Image.Image)]


# ---------------------------------------------------------------- preprocessor file

FOLDER_ADVICE = "download the model again, or point --policy at a complete Hugging Face model folder"
# transformers' Qwen2-VL image processor defaults, for a preprocessor file that names no pixel range
HF_DEFAULT_MIN_PIXELS = 56 * 56
HF_DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def read_preprocessor_config(file: str) -> dict:
    """Processor keyword arguments from a Qwen2-VL `preprocessor_config.json`, with transformers'
    precedence for the pixel range: its `size` dict ({"shortest_edge", "longest_edge"} in pixels)
    replaces the class default, then top-level `min_pixels` / `max_pixels` override `size`.

    Real Qwen2.5-VL file: min_pixels 3136, max_pixels 12845056 (up to 16,384 tokens per image);
    `load_policy` replaces that range by the run's own (see mrgr1/pipeline.py)."""
    p = read_json(file, FOLDER_ADVICE, error=ModelFolderError)
    size = dict(p["size"]) if isinstance(p.get("size"), dict) else {}
    lo = p.get("min_pixels", size.get("shortest_edge", HF_DEFAULT_MIN_PIXELS if not size else None))
    hi = p.get("max_pixels", size.get("longest_edge", HF_DEFAULT_MAX_PIXELS if not size else None))
    if lo is None or hi is None:
        raise ModelFolderError(f"{file}: 'size' must hold both 'shortest_edge' and 'longest_edge' (pixels), "
                         f"or give 'min_pixels' and 'max_pixels'; found size={p['size']}")
    kwargs = {"min_pixels": lo, "max_pixels": hi}
    for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"):
        if p.get(key) is not None:
            kwargs[key] = p[key]
    return kwargs


# ---------------------------------------------------------------- processor

class Processor:
    """Tokenizer + chat template + image preprocessing for Qwen2.5-VL."""

    def __init__(self, tokenizer, *, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS,
                 patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 system_prompt=DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.image_kwargs = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                 merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                                 mean=tuple(image_mean), std=tuple(image_std))
        self.system_prompt = system_prompt
        self.ids = {t: self.token_id(t) for t in SPECIAL_TOKENS}
        self.pad_token_id = self.ids["<|endoftext|>"]
        self.image_token_id = self.ids["<|image_pad|>"]
        self.eos_token_ids = (self.ids["<|im_end|>"], self.ids["<|endoftext|>"])

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no token {token!r}: a Qwen2.5-VL tokenizer.json is required")
        return i

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "Processor":
        """Read tokenizer.json (required) and preprocessor_config.json (optional) from a folder.

        The preprocessor file is read as transformers reads it (`read_preprocessor_config`);
        `overrides` (e.g. min_pixels=..., max_pixels=...) win over the file."""
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: a Qwen2.5-VL model folder has tokenizer.json")
        pre = os.path.join(path, "preprocessor_config.json")
        kwargs = read_preprocessor_config(pre) if os.path.isfile(pre) else {}
        kwargs.update(overrides)
        text = read_text(file, FOLDER_ADVICE, error=ModelFolderError)
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for JSON it cannot use
            raise ModelFolderError(f"{file} is not a tokenizers file ({' '.join(str(e).split())[:200]}); "
                                   f"{FOLDER_ADVICE}") from None
        try:
            return cls(tokenizer, **kwargs)
        except ValueError as e:  # a tokenizer without Qwen2.5-VL's special tokens
            raise ModelFolderError(f"{file}: {e}") from None

    def save_pretrained(self, path: str) -> None:
        """Write tokenizer.json and preprocessor_config.json (transformers-readable)."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        k = self.image_kwargs
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": k["min_pixels"],
                       "max_pixels": k["max_pixels"], "patch_size": k["patch_size"], "merge_size": k["merge_size"],
                       "temporal_patch_size": k["temporal_patch_size"], "image_mean": list(k["mean"]),
                       "image_std": list(k["std"])}, f, indent=2)

    def model_overrides(self) -> dict:
        """Config values that must agree with this tokenizer: preset("tiny", **proc.model_overrides())."""
        return dict(vocab_size=self.tokenizer.get_vocab_size(with_added_tokens=True),
                    image_token_id=self.image_token_id, video_token_id=self.ids["<|video_pad|>"],
                    vision_start_token_id=self.ids["<|vision_start|>"],
                    vision_end_token_id=self.ids["<|vision_end|>"])

    # ------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in ids]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return chat_prompt(messages, add_generation_prompt, self.system_prompt)

    # ------------------------------------------------------------ batch

    def __call__(self, conversations, images=None, *, add_generation_prompt: bool = True) -> dict:
        """Encode a batch -> dict(input_ids [B, T], attention_mask [B, T] (left padded),
        pixel_values [N, 1176] float32 or None, image_grid_thw [n_images, 3] or None).

        conversations: a list with one entry per sample, each either a message list (chat
        template applied) or a string already in chat format with one <|image_pad|> per image.
        images: one list of PIL images per sample (or None: images inside the messages are used)."""
        if isinstance(conversations, str) or (conversations and isinstance(conversations[0], dict)):
            conversations, images = [conversations], (None if images is None else [images])
        if images is None:
            images = [[] if isinstance(c, str) else message_images(c) for c in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} samples but {len(images)} image lists; give one list per sample")
        return self.collate([self.encode_sample(conv, imgs, add_generation_prompt=add_generation_prompt)
                             for conv, imgs in zip(conversations, images)])

    def encode_sample(self, conversation, images=(), *, add_generation_prompt: bool = True) -> dict:
        """One sample (a message list or a chat-format string, and its PIL images) -> {"ids":
        token ids with one <|image_pad|> per merged patch, "patches": one [h*w, 1176] float32
        array per image, "grids": one (1, h, w) per image}; `collate` batches such samples."""
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        text = (conversation if isinstance(conversation, str)
                else self.apply_chat_template(conversation, add_generation_prompt))
        n_slots = text.count("<|image_pad|>")
        if n_slots != len(images):
            raise ValueError(f"prompt has {n_slots} <|image_pad|> slots but {len(images)} images were given")
        patches, grids = [], []
        for img in images:
            p, grid = image_patches(img, **self.image_kwargs)
            patches.append(p)
            grids.append(grid)
        counts = [t * h * w // self.image_kwargs["merge_size"] ** 2 for t, h, w in grids]  # tokens per image
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * n + piece for n, piece in zip(counts, pieces[1:]))
        return {"ids": self.encode(text), "patches": patches, "grids": grids}

    def collate(self, samples: list[dict]) -> dict:
        """Samples from `encode_sample` -> the batch `__call__` returns (left padded)."""
        T = max(len(s["ids"]) for s in samples)
        input_ids = torch.full((len(samples), T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(samples), T, dtype=torch.long)
        for b, s in enumerate(samples):
            input_ids[b, T - len(s["ids"]):] = torch.tensor(s["ids"], dtype=torch.long)
            attention_mask[b, T - len(s["ids"]):] = 1
        patches = [p for s in samples for p in s["patches"]]
        grids = [g for s in samples for g in s["grids"]]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.from_numpy(np.concatenate(patches)) if patches else None,
            "image_grid_thw": torch.tensor(grids, dtype=torch.long) if grids else None,
        }


# ---------------------------------------------------------------- demo tokenizer

def train_demo_tokenizer(texts, vocab_size: int = 512, path: str | None = None) -> Processor:
    """A small byte-level BPE trained on `texts`, built like Qwen's (NFC, Qwen split regex,
    byte-level), with Qwen's 14 special tokens appended after the learned vocabulary (same
    order as ids 151643..151656) and <think>, </think>, <report>, </report> as ordinary
    single tokens. Saved (tokenizer.json + preprocessor_config.json) to `path` when given.

    A tiny model folder that from_pretrained reads, with no downloads:
        proc = train_demo_tokenizer(reports, vocab_size=512, path=folder)
        Qwen2_5_VL.from_config(preset("tiny", **proc.model_overrides()), seed=0).save_pretrained(folder)
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_added = len(SPECIAL_TOKENS) + len(FORMAT_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size {vocab_size} too small: byte-level BPE needs 256 bytes + {n_added} added tokens")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(FORMAT_TOKENS)
    proc = Processor(tok)
    if path is not None:
        proc.save_pretrained(path)
    return proc
