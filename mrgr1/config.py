"""Model configuration for Qwen2.5-VL: vision tower, text decoder, and the presets mrgr1 uses.

`ModelConfig.from_hf_dict` reads a Hugging Face `config.json` in either layout:
the flat hub layout (text fields at the top level, `rope_scaling`, `vision_config`)
and the transformers-5 layout (`text_config` / `vision_config`, `rope_parameters`).

Presets (values and where each came from):
  - "qwen2.5-vl-7b" / "huatuogpt-vision-7b": every shape (hidden 3584, 28 layers,
    28 heads, 4 KV heads, MLP 18944, vocab 152064, vision 32 x 1280, MLP 3420,
    16 heads, out 3584) is read off a public printout of the 7B model's modules;
    rope theta 1e6, RMSNorm eps 1e-6 and the untied lm_head are those of the Qwen2-7B
    family config.json. HuatuoGPT-Vision-7B-Qwen2.5VL is a fine-tune of the 7B and
    shares its architecture; always prefer the config.json shipped with the weights.
  - "qwen2.5-vl-3b": from a public copy of the hub config.json of
    Qwen/Qwen2.5-VL-3B-Instruct (hidden 2048, 36 layers, 16 heads, 2 KV heads, MLP 11008,
    vocab 151936, tied embeddings, vision out 2048); not checked against the hub itself.
  - "tiny": ours, for tests and benchmarks (2 layers, hidden 64): Qwen's vocabulary size and
    special-token ids, so it runs with the real Qwen tokenizer.
  - "demo": ours, the demo's policy (`--policy demo`): "tiny" widened to 4 layers, hidden 128,
    so that SFT + GRPO learn the drawn findings within minutes on a CPU; with the demo
    tokenizer pass `preset("demo", **processor.model_overrides())`.
`from_pretrained` always reads the checkpoint's own config.json; presets serve
random-init runs and documentation.

Example:
    >>> cfg = preset("tiny", vocab_size=512)
    >>> cfg.text.head_dim
    16
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    depth: int = 32  # number of vision transformer blocks
    hidden_size: int = 1280  # width of the vision tower
    intermediate_size: int = 3420  # SwiGLU width in each block
    num_heads: int = 16  # attention heads in the vision tower
    out_hidden_size: int = 3584  # merger output = text hidden size
    patch_size: int = 14  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch (an image is repeated twice)
    spatial_merge_size: int = 2  # 2x2 patches merge into one text token
    window_size: int = 112  # window attention span in pixels (= 4x4 merged tokens)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # blocks with full attention
    in_channels: int = 3  # RGB
    rope_theta: float = 10000.0  # base of the 2D rotary embedding
    rms_norm_eps: float = 1e-6  # fixed in the reference implementation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    vocab_size: int = 152064  # rows of embed_tokens / lm_head
    hidden_size: int = 3584  # decoder width
    intermediate_size: int = 18944  # SwiGLU width
    num_hidden_layers: int = 28  # decoder layers
    num_attention_heads: int = 28  # query heads
    num_key_value_heads: int = 4  # GQA: key/value heads shared by groups of query heads
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 1000000.0  # rotary base
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # rotary pairs for t, h, w (sum = head_dim / 2)
    max_position_embeddings: int = 128000  # informational; rotary has no table to size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655  # <|image_pad|>: replaced by image features
    video_token_id: int = 151656  # <|video_pad|>: videos are not used in mrgr1
    vision_start_token_id: int = 151652  # <|vision_start|>
    vision_end_token_id: int = 151653  # <|vision_end|>
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight (3B: True)

    def __post_init__(self):
        check_config(self)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (flat hub layout or transformers-5 nested)."""
        text_d = d.get("text_config") or d  # hub configs keep text fields at the top level
        vis_d = d.get("vision_config") or {}
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only default/mrope M-RoPE)")
        text = TextConfig(
            vocab_size=text_d["vocab_size"],
            hidden_size=text_d["hidden_size"],
            intermediate_size=text_d["intermediate_size"],
            num_hidden_layers=text_d["num_hidden_layers"],
            num_attention_heads=text_d["num_attention_heads"],
            num_key_value_heads=text_d.get("num_key_value_heads") or text_d["num_attention_heads"],
            rms_norm_eps=text_d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text_d.get("rope_theta", d.get("rope_theta", 1000000.0))),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=text_d.get("max_position_embeddings", 128000),
        )
        vis_rope = vis_d.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=vis_d.get("depth", 32),
            hidden_size=vis_d.get("hidden_size", 1280),
            intermediate_size=vis_d.get("intermediate_size", 3420),
            num_heads=vis_d.get("num_heads", 16),
            out_hidden_size=vis_d.get("out_hidden_size", text.hidden_size),
            patch_size=vis_d.get("patch_size", 14),
            temporal_patch_size=vis_d.get("temporal_patch_size", 2),
            spatial_merge_size=vis_d.get("spatial_merge_size", 2),
            window_size=vis_d.get("window_size", 112),
            fullatt_block_indexes=tuple(vis_d.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=vis_d.get("in_channels", vis_d.get("in_chans", 3)),
            rope_theta=vis_rope.get("rope_theta", 10000.0),
        )
        tie = bool(d.get("tie_word_embeddings", False) or text_d.get("tie_word_embeddings", False))
        return cls(
            vision=vision,
            text=text,
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            tie_word_embeddings=tie,
        )

    def to_hf_dict(self) -> dict:
        """A config.json dict in the flat hub layout (readable by transformers and by `from_hf_dict`)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "in_channels": v.in_channels,
                "hidden_act": "silu",
            },
        }


def check_config(cfg: ModelConfig) -> None:
    """Raise a clear error for shapes the model cannot build."""
    t, v = cfg.text, cfg.vision
    if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
        raise ValueError(f"text: hidden_size {t.hidden_size}, heads {t.num_attention_heads}, kv heads "
                         f"{t.num_key_value_heads}: heads must divide hidden_size and kv heads must divide heads")
    if 2 * sum(t.mrope_section) != t.head_dim:
        raise ValueError(f"text: mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads or v.head_dim % 4:
        raise ValueError(f"vision: hidden_size {v.hidden_size} / heads {v.num_heads} must give a head_dim divisible by 4")
    if v.out_hidden_size != t.hidden_size:
        raise ValueError(f"vision out_hidden_size {v.out_hidden_size} must equal text hidden_size {t.hidden_size}")


_7B = ModelConfig()  # the dataclass defaults are the 7B
_3B = ModelConfig(
    vision=VisionConfig(out_hidden_size=2048),
    text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2),
    tie_word_embeddings=True,
)
_TINY = ModelConfig(
    vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        fullatt_block_indexes=(1, 3)),
    text=TextConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
    tie_word_embeddings=True,
)

_DEMO = dataclasses.replace(
    _TINY,
    vision=dataclasses.replace(_TINY.vision, out_hidden_size=128),
    text=dataclasses.replace(_TINY.text, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6)),
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": _TINY,
    "demo": _DEMO,
    "qwen2.5-vl-3b": _3B,
    "qwen2.5-vl-7b": _7B,
    "huatuogpt-vision-7b": _7B,
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of PRESETS[name]; overrides may name ModelConfig, TextConfig or VisionConfig fields.

    Example: preset("tiny", vocab_size=600, image_token_id=597)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
    top, text, vision = {}, {}, {}
    text_fields = {f.name for f in dataclasses.fields(TextConfig)}
    vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
    for key, value in overrides.items():
        if key in {f.name for f in dataclasses.fields(ModelConfig)}:
            top[key] = value
        elif key in text_fields:
            text[key] = value
        elif key.startswith("vision_") and key[7:] in vision_fields:
            vision[key[7:]] = value
        else:
            raise KeyError(f"preset override {key!r} is not a ModelConfig/TextConfig field "
                           f"(vision fields take a 'vision_' prefix)")
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, **text),
        vision=dataclasses.replace(base.vision, **vision),
        **top,
    )
