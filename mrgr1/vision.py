"""The Qwen2.5-VL vision tower: patch embedding, windowed ViT blocks with 2D RoPE, 2x2 merger.

Reference: Qwen2.5-VL technical report (arXiv 2502.13923), section 2.1.

Input: the processor's flattened patches, pixel_values [N, C * 2 * 14 * 14] for all images
of a batch, and image_grid_thw [n_images, 3] = (t, h, w) patches per image. Patches come in
"merge-block" order: each consecutive group of 2x2 = 4 patches forms one text token.

Pipeline:
  1. patch embed: a Conv3d with kernel = stride = (2, 14, 14), i.e. one linear map per patch.
  2. 2D RoPE: each patch has (row, col); half the rotary frequencies turn with the row,
     half with the column.
  3. window reordering: merged tokens are grouped into windows of window_size px
     (112 px = 8x8 patches = 4x4 merged tokens); windows at the right/bottom edge may be
     partial. Most blocks attend only inside a window; blocks in
     `fullatt_block_indexes` attend over the whole image. Attention never crosses images.
  4. merger: RMSNorm, concatenate each 2x2 group, MLP -> one token in the text width;
     then undo the window reordering.

Variable-length attention without a mask: the patches are cut into contiguous segments (windows,
or whole frames for the full-attention blocks); segments of equal length are gathered into one
batch [n_segments, heads, length, head_dim] and go through SDPA together (`segment_attention`).
Cost is sum(n_i^2) over segments, never N^2 over the batch. There are few calls: whatever the
image sizes, windows of 112 px take at most 9 lengths (a * b merged tokens, a, b <= 4), and
frames one length per distinct image size.

Example:
    >>> from mrgr1.config import preset
    >>> vt = VisionTransformer(preset("tiny").vision)
    >>> grid = torch.tensor([[1, 4, 6]])                        # 4x6 patches = 56x84 px
    >>> vt(torch.randn(24, 3 * 2 * 14 * 14), grid).shape         # 24 / 4 = 6 tokens
    torch.Size([6, 64])
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mrgr1.config import VisionConfig
from mrgr1.language import MLP, RMSNorm, apply_rotary, inverse_frequencies


# ---------------------------------------------------------------- index bookkeeping

def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's merge-block order -> [N, 2].

    For one frame of h x w patches the order is: merge blocks row-major, then the
    merge x merge patches inside a block row-major."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # [h/m, m, w/m, m] -> block-major [h/m, w/m, m, m]
        pos = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], -1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)  # [N, 2]


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder merged tokens window by window.

    Returns (order, window_id): `order` [M] lists merged-token indices (M = N / merge^2) so that
    each window's tokens are contiguous (windows row-major within a frame, tokens row-major
    within a window); window_id [M] is the window of each reordered token (unique across
    frames and images). `window` is the window side in merged tokens."""
    orders, ids = [], []
    offset, next_window = 0, 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge, w // merge
        r = torch.arange(lh).view(1, lh, 1).expand(t, lh, lw)
        c = torch.arange(lw).view(1, 1, lw).expand(t, lh, lw)
        f = torch.arange(t).view(t, 1, 1).expand(t, lh, lw)
        nwh, nww = -(-lh // window), -(-lw // window)  # windows per column / row (ceil)
        win = (f * nwh + r // window) * nww + c // window  # window id within this image  [t, lh, lw]
        inner = (r % window) * window + c % window  # position inside the window
        key = (win * window * window + inner).flatten()
        order = torch.argsort(key)
        orders.append(order + offset)
        ids.append(win.flatten()[order] + next_window)
        offset += t * lh * lw
        next_window += t * nwh * nww
    return torch.cat(orders), torch.cat(ids)


class Segments(NamedTuple):
    """Contiguous attention segments of a sequence, grouped by length (see `segments_by_length`)."""
    groups: list[torch.Tensor]  # one [n_seg, L] index tensor per distinct length L: row = one segment
    inverse: torch.Tensor  # [N]: concatenated group outputs -> original patch order


def segments_by_length(lengths: list[int], device=None) -> Segments:
    """Group contiguous segments of the given lengths (in sequence order) by length.

    Example: lengths [4, 2, 4] -> groups [[0, 1, 2, 3], [6, 7, 8, 9]] (L = 4) and [[4, 5]] (L = 2);
    inverse = argsort([0, 1, 2, 3, 6, 7, 8, 9, 4, 5])."""
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)  # [S]
    sizes = torch.tensor(lengths)  # [S]
    groups = [starts[sizes == L, None] + torch.arange(L) for L in sorted(set(lengths))]
    inverse = torch.argsort(torch.cat([g.flatten() for g in groups]))
    return Segments([g.to(device) for g in groups], inverse.to(device))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with each token attending only inside its own segment.

    q, k, v [N, H, hd] -> [N, H, hd]. Equals SDPA over the whole sequence with a block-diagonal
    mask, but each length group is one maskless batched SDPA call on [n_seg, H, L, hd]."""
    outs = []
    for index in segments.groups:  # [n_seg, L]
        qg, kg, vg = (t[index].transpose(1, 2) for t in (q, k, v))  # [n_seg, H, L, hd]
        out = F.scaled_dot_product_attention(qg, kg, vg)  # [n_seg, H, L, hd]
        outs.append(out.transpose(1, 2).flatten(0, 1))  # [n_seg * L, H, hd]
    return torch.cat(outs)[segments.inverse]  # [N, H, hd]


# ---------------------------------------------------------------- modules

class PatchEmbed(nn.Module):
    """Conv3d(kernel = stride = (2, 14, 14), no bias) on each flattened patch = one linear map."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Patches are flattened in (C, T, P, P) order, the order of Conv3d's weight, so the
        # convolution over a single patch-sized input equals a matmul with the flattened weight.
        weight = self.proj.weight.flatten(1)  # [D, C*T*P*P]
        return pixel_values.to(weight.dtype) @ weight.T  # [N, D]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, segments: Segments):
        """Attention inside each segment (a window, or a whole frame): x [N, D] -> [N, D]."""
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # 3 x [N, H, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj(segment_attention(q, k, v, segments).reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm each patch, concatenate 2x2 neighbours, MLP(GELU) to the text width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.out_hidden_size))
        self.width = width

    def forward(self, x):  # [N, D] -> [N / 4, out]
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.gradient_checkpointing = False

    def rotary(self, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE cos/sin [N, 1, hd] from (row, col) [N, 2]: head_dim/4 frequencies per axis."""
        inv_freq = inverse_frequencies(self.cfg.head_dim // 2, self.cfg.rope_theta, device)  # [hd/4]
        angles = positions.to(device).float()[..., None] * inv_freq  # [N, 2, hd/4]
        angles = angles.flatten(1)  # [N, hd/2]: row angles then column angles
        angles = torch.cat((angles, angles), dim=-1)  # [N, hd]
        return angles.cos()[:, None], angles.sin()[:, None]  # broadcast over heads

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P], grid_thw [n_images, 3] -> image tokens [N / merge^2, out_hidden]."""
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        if pixel_values.shape[0] != int(grid_thw.prod(-1).sum()):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                             f"{grid_thw.tolist()} describes {int(grid_thw.prod(-1).sum())}")
        grid_thw = grid_thw.cpu()
        order, window_id = window_order(grid_thw, cfg.spatial_merge_size,
                                        cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)

        def reorder(t):  # [N, ...] patch-level -> window order, keeping each 2x2 group together
            return t.view(-1, unit, *t.shape[1:])[order.to(t.device)].flatten(0, 1)

        x = reorder(self.patch_embed(pixel_values))  # [N, D]
        cos, sin = self.rotary(reorder(patch_positions(grid_thw, cfg.spatial_merge_size)), x.device)
        device = x.device
        # Windows and frames are both contiguous in window order; attention never crosses a frame.
        window_sizes = (torch.unique_consecutive(window_id, return_counts=True)[1] * unit).tolist()
        frame_sizes = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).tolist()
        windowed, full = segments_by_length(window_sizes, device), segments_by_length(frame_sizes, device)
        for i, block in enumerate(self.blocks):
            segments = full if i in cfg.fullatt_block_indexes else windowed
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, segments, use_reentrant=False)
            else:
                x = block(x, cos, sin, segments)
        merged = self.merger(x)  # [M, out], window order
        return merged[torch.argsort(order.to(device))]  # back to raster order
