"""Prompts: the run's wording, each study's chat, its encoding (cached), and the SFT targets.

A study's prompt is a chat (Qwen2.5-VL template): a system turn, then a user turn with every view
of the study and the instruction to answer as `<think>...</think><report>...</report>`. The wording
is the run's (`RunConfig.system_prompt`, `.instruction`; the paper does not publish its own).

    encoder = PromptEncoder(processor, system_prompt, instruction, cache_bytes=2 * 2**30)
    prompts = encoder(studies, device)     # input_ids, attention_mask [B, P] (left padded),
                                           # pixel_values, image_grid_thw, images_per_prompt [B]
"""
from __future__ import annotations

import torch

from .data import Study, load_images


def study_messages(study: Study, system_prompt: str, instruction: str) -> list[dict]:
    """The chat of one study: a system turn, then the user turn with every view and the instruction."""
    images = [{"type": "image"} for _ in study.image_paths]
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": images + [{"type": "text", "text": instruction}]}]


class PromptEncoder:
    """Encodes studies into left-padded prompt batches, keeping each study's encoding after first use.

    The chat template, the tokenizer and the image decoding and resizing give the same result every
    time a study comes back (the demo's SFT sees each training study ~27 times), so a study is
    encoded once. Patches are float32: a 448 px view takes ~4.8 MB, so the cache stops taking studies
    at `cache_bytes` and encodes the rest afresh (slower, never different)."""

    def __init__(self, processor, system_prompt: str, instruction: str, cache_bytes: int = 0):
        self.processor, self.system_prompt, self.instruction = processor, system_prompt, instruction
        self.cache_bytes, self.bytes, self.samples = cache_bytes, 0, {}

    def sample(self, study: Study) -> dict:
        """One study's token ids, image patches and grids (processing.Processor.encode_sample)."""
        key = (study.id, tuple(study.image_paths))
        if key not in self.samples:
            messages = study_messages(study, self.system_prompt, self.instruction)
            sample = self.processor.encode_sample(messages, load_images(study))
            size = sum(p.nbytes for p in sample["patches"])
            if self.bytes + size > self.cache_bytes:
                return sample
            self.samples[key], self.bytes = sample, self.bytes + size
        return self.samples[key]

    def __call__(self, studies: list[Study], device=None) -> dict:
        """Left-padded prompts of B studies: input_ids, attention_mask [B, P], pixel_values,
        image_grid_thw, and images_per_prompt [B] (to find each prompt's images again)."""
        batch = self.processor.collate([self.sample(s) for s in studies])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["images_per_prompt"] = torch.tensor([len(s.image_paths) for s in studies])
        return batch


def sft_targets(processor, studies: list[Study], think: str, eos_token_id: int):
    """Reference reports in the target format `<think>think</think><report>report</report><eos>`,
    tokenised and right padded: ids, mask [B, C]."""
    encoded = [processor.encode(f"<think>{think}</think><report>{s.report}</report>") + [eos_token_id]
               for s in studies]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), eos_token_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
    return ids, mask
