"""The Qwen2 text decoder of Qwen2.5-VL: GQA attention with M-RoPE, SwiGLU, RMSNorm, KV cache.

References: Qwen2 technical report (arXiv 2407.10671); Qwen2-VL (arXiv 2409.12191) for
multimodal rotary position embedding (M-RoPE); Qwen2.5-VL (arXiv 2502.13923).

M-RoPE: every token has three position ids (t, h, w). Text tokens have t = h = w, so for
pure text it is ordinary RoPE. The head_dim/2 rotary frequencies are split into
`mrope_section` = (16, 24, 24) consecutive groups; group i rotates by the position on axis i.

Module names mirror the Hugging Face checkpoint (`embed_tokens`, `layers.N.self_attn.q_proj`,
...), so weights load without renaming. Norms and rotary run in fp32 (bf16-safe).

Example:
    >>> from mrgr1.config import preset
    >>> dec = TextModel(preset("tiny", vocab_size=100).text)
    >>> x = dec.embed_tokens(torch.tensor([[1, 2, 3]]))          # [1, 3, 64]
    >>> pos = torch.arange(3).view(1, 1, 3).expand(3, 1, 3)       # [3, B, T]
    >>> dec(x, pos, torch.ones(1, 3)).shape
    torch.Size([1, 3, 64])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mrgr1.config import TextConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32, cast back before the weight (as Qwen)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by the angles whose cos/sin are given (broadcastable), in fp32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE frequencies theta^(-2i/dim), i = 0 .. dim/2-1."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


def mrope_cos_sin(position_ids: torch.Tensor, cfg: TextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of M-RoPE angles: position_ids [3, B, T] -> two [B, 1, T, head_dim] fp32 tensors.

    Frequency j (of head_dim/2) is rotated by the t, h or w position depending on which
    of the `mrope_section` groups it falls in; the halves are duplicated as in rotate_half."""
    inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, position_ids.device)  # [hd/2]
    angles = position_ids.float()[..., None] * inv_freq  # [3, B, T, hd/2]
    # Axis of each frequency: 0 for the first section, 1 for the second, 2 for the third. Built
    # from arange and comparisons (no host-to-device copy), so a CUDA graph can record it.
    freq = torch.arange(inv_freq.shape[0], device=angles.device)  # [hd/2]
    t_end, h_end = cfg.mrope_section[0], cfg.mrope_section[0] + cfg.mrope_section[1]
    axis = (freq >= t_end).long() + (freq >= h_end).long()  # [hd/2] in {0,1,2}
    angles = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:]))[0]  # [B, T, hd/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, hd]
    return angles.cos(), angles.sin()


class KVCache:
    """Preallocated keys/values: k[l], v[l] of shape [rows, kv_heads, max_len, head_dim].

    `length` = number of columns already filled (the same for all rows: batches are left padded);
    each layer writes its new keys/values at columns [length, length + T) and attends over
    columns [0, length + T). `Qwen2_5_VL.hidden_states` advances `length` once all layers have
    run; the decoder does not. (The static decode step writes these tensors at a device-side
    column instead: `mrgr1.fast_decode.ColumnCache`.)"""

    def __init__(self, num_layers, rows, kv_heads, max_len, head_dim, *, dtype, device):
        shape = (rows, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, rows, max_len, dtype=None, device=None) -> "KVCache":
        """A cache sized for `model` (a Qwen2_5_VL or TextModel); dtype/device default to its weights."""
        text = model.model.language_model if hasattr(model, "model") else model
        weight = text.embed_tokens.weight
        cfg = text.cfg
        return cls(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim,
                   dtype=dtype or weight.dtype, device=device or weight.device)

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    def repeat_rows(self, n: int) -> "KVCache":
        """A new cache with row i copied to rows i*n .. i*n+n-1 (prompt-grouped, like generate's output)."""
        return self.take_rows(torch.arange(self.rows, device=self.k[0].device).repeat_interleave(n))

    def take_rows(self, index: torch.Tensor) -> "KVCache":
        """A new cache whose row j is a copy of row index[j]; index [R'] long."""
        new = KVCache.__new__(KVCache)
        new.k = [k.index_select(0, index) for k in self.k]
        new.v = [v.index_select(0, index) for v in self.v]
        new.length, new.max_len = self.length, self.max_len
        return new

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [rows, kv_heads, T, hd]; return the keys/values to attend over: columns
        [0, length + T)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache is full: {self.length} + {k.shape[2]} new tokens > max_len {self.max_len}; "
                             "allocate a larger cache (prompt length + max_new_tokens)")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attention_mask_4d(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, L] mask (True = attend): causal over the last T of L columns, no padded keys.

    attention_mask [B, L]: 1 real, 0 (left) padding. A query may always see itself, so that
    padding rows are never fully masked (their outputs are ignored; SDPA would give NaN)."""
    B, L = attention_mask.shape
    device = attention_mask.device
    q_col = torch.arange(L - q_len, L, device=device)  # column of each query  [T]
    k_col = torch.arange(L, device=device)  # [L]
    causal = k_col[None, :] <= q_col[:, None]  # [T, L]
    mask = causal[None] & attention_mask.bool()[:, None, :]  # [B, T, L]
    mask = mask | (k_col[None, :] == q_col[:, None])[None]
    return mask[:, None]


def padded_on_the_right_only(attention_mask: torch.Tensor) -> bool:
    """Every row is 1 ... 1 0 ... 0 (no left padding): then a causal mask alone gives every real
    position exactly its keys (the padding after it is in its future), and only padding positions,
    whose outputs are never used, see other padding. attention_mask [B, L] (one host sync)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


class Attention(nn.Module):
    """Grouped-query self-attention with biased q/k/v projections and M-RoPE."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None):
        B, T, _ = x.shape  # x: [B, T, D]
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.write(self.layer_idx, k, v)  # [B, Hkv, L, hd]
        if T == 1:  # decoding: the query heads of a KV group become that group's queries
            out = grouped_query_step(q, k, v, mask)  # [B, H, 1, hd]
        else:
            out = attend(q, k, v, mask)  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask):
    """Attention of q [B, H, T, hd] over k, v [B, Hkv, L, hd] (GQA) on a fused kernel that never holds
    the [B, H, T, L] scores. mask None: plain causal, T == L (no padding to hide) -> the flash kernel,
    which takes GQA but no mask. A boolean mask [B, 1, T, L]: on CUDA the KV heads are repeated first,
    as the memory-efficient kernel takes a mask but not GQA (with both, SDPA falls back to the math
    kernel, which materialises the scores in fp32); the CPU's flash kernel takes both as they are."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.is_cuda and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))  # [B, H, L, hd]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def grouped_query_step(q, k, v, mask):
    """GQA for one query per row without copying keys/values: q [B, H, 1, hd] is viewed as
    [B, Hkv, H/Hkv, hd] (query head h uses KV head h // (H/Hkv)), so plain multi-head SDPA
    applies; mask [B, 1, 1, L] covers every query of the row. k, v [B, Hkv, L, hd] -> [B, H, 1, hd]."""
    B, H, _, hd = q.shape
    grouped = q.reshape(B, k.shape[1], H // k.shape[1], hd)  # [B, Hkv, H/Hkv, hd]
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).reshape(B, H, 1, hd)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embedding, decoder layers and the final norm; the lm_head lives in Qwen2_5_VL."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, attention_mask, kv_cache=None, checkpoint_layers=False):
        """inputs_embeds [B, T, D], position_ids [3, B, T], attention_mask [B, L] (L = cached + T;
        made causal here) or a ready boolean [B, 1, T, L] mask (True = attend, used as given)
        -> normed hidden states [B, T, D]. Writes kv_cache but does not advance its `length`:
        Qwen2_5_VL.hidden_states does that."""
        cos, sin = mrope_cos_sin(position_ids, self.cfg)  # [B, 1, T, hd] each
        T = inputs_embeds.shape[1]
        if attention_mask.dim() == 4:
            mask = attention_mask
        elif T > 1 and attention_mask.shape[1] == T and padded_on_the_right_only(attention_mask):
            mask = None  # causal alone hides nothing a real position could see: a fast kernel serves it
        else:
            mask = attention_mask_4d(attention_mask, T)  # [B, 1, T, L]
        x = inputs_embeds
        for layer in self.layers:
            if checkpoint_layers:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        return self.norm(x)
