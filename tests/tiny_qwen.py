"""Tiny random transformers Qwen2.5-VL models: the oracle for parity tests (tests only).

    hf_model, path = make_tiny_hf_model(tmp_path / "tiny", tie=False)
    ours = Qwen2_5_VL.from_pretrained(path)

Vision: depth 4 with full attention at blocks 1 and 3 (the others windowed), merge 2,
window 112 px. Text: 2 layers, hidden 64, 4 heads / 2 KV heads, mrope_section (2, 3, 3).
Token ids: the real Qwen special ids when vocab_size > 151656, else the last ids of the
vocabulary (image 5 below the end; see `tiny_token_ids`).
"""
from __future__ import annotations

import torch


def tiny_token_ids(vocab_size: int) -> dict:
    """image/video/vision_start/vision_end ids that fit in `vocab_size`."""
    if vocab_size > 151656:
        return dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)
    return dict(image_token_id=vocab_size - 5, video_token_id=vocab_size - 4,
                vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 2)


def tiny_hf_config(vocab_size: int = 300, tie: bool = False, **token_ids):
    from transformers import Qwen2_5_VLConfig

    ids = tiny_token_ids(vocab_size) | token_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
            bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3],
        ),
        tie_word_embeddings=tie,
        **ids,
    )


def make_tiny_hf_model(path=None, *, vocab_size: int = 300, tie: bool = False, seed: int = 0, **token_ids):
    """A random fp32 transformers Qwen2_5_VLForConditionalGeneration (eval mode, SDPA attention);
    saved with save_pretrained to `path` when given. Returns (model, path)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(vocab_size, tie, **token_ids)).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0; perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    if path is not None:
        model.save_pretrained(str(path))
    return model, path
