"""Qwen2.5-VL: the vision tower's image tokens placed into the text stream of the Qwen2 decoder.

Reference: Qwen2.5-VL technical report (arXiv 2502.13923); Qwen2-VL (arXiv 2409.12191) for
M-RoPE and the rope index.

Parameter names equal the transformers-5 checkpoint keys (`model.visual.*`,
`model.language_model.*`, `lm_head.weight`); the older hub layout (`visual.*`,
`model.layers.*`) is renamed on load.

Rope index (Qwen2-VL section 2.1): text tokens get t = h = w = running position. An image of
(t, h, w) patches gives (h/2) x (w/2) tokens with positions (start + frame, start + row,
start + col); the text after it continues at start + max(h, w) / 2. Left padding is skipped.
`rope_deltas[b]` = (largest position + 1) - T (padded width), so the position of cache column
c during decoding is c + rope_deltas[b] on all three axes.

Example:
    >>> model = Qwen2_5_VL.from_pretrained("path/to/Qwen2.5-VL-3B-Instruct", dtype=torch.bfloat16)
    >>> logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)   # [B, T, V]
    >>> logps = model.token_logps(ids, mask, pv, grid, logits_to_keep=64)       # [B, 64]
    >>> with torch.no_grad():                                  # frozen vision tower: once per prompt
    ...     feats = model.image_features(pv, grid)                             # [n_image_tokens, D]
    >>> logps = model.token_logps(ids, mask, None, grid, image_features=feats, logits_to_keep=64)
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from mrgr1.config import ModelConfig
from mrgr1.files import ModelFolderError, read_json, read_safetensors
from mrgr1.language import KVCache, TextModel
from mrgr1.vision import VisionTransformer

__all__ = ["Qwen2_5_VL", "KVCache", "chunked_logps", "decode_position_ids"]


def decode_position_ids(rope_deltas: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Positions [3, B, T] of cache columns start .. start+T-1: column + rope_deltas[b] on each axis."""
    cols = torch.arange(start, start + T, device=rope_deltas.device)  # [T]
    return (cols[None] + rope_deltas.view(-1, 1)).unsqueeze(0).expand(3, -1, -1)  # [3, B, T]


class Qwen2_5_VL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # container: names mirror the checkpoint's `model.` prefix
        self.model.visual = VisionTransformer(cfg.vision)
        self.model.language_model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.gradient_checkpointing = False  # checkpoint each decoder layer (and vision block) in training
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int | None = None) -> "Qwen2_5_VL":
        """Random init: normal(0, 0.02) weights, zero biases, unit norms (as the reference)."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(cfg)
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        return model

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None) -> "Qwen2_5_VL":
        """Load a Hugging Face folder (config.json + model.safetensors or sharded with
        model.safetensors.index.json). dtype None keeps the checkpoint's dtype."""
        cfg = model_config(path)
        with torch.device("meta"):  # no memory for the random init that the checkpoint replaces
            model = cls(cfg)
        state = load_state(path, device=device or "cpu", dtype=dtype)
        check_keys(model, state, path)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        return model.eval()

    def save_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors (no lm_head.weight when tied), loadable by
        `from_pretrained` and by transformers."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.cfg.to_hf_dict(), f, indent=2)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (self.cfg.tie_word_embeddings and k == "lm_head.weight")}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    # ------------------------------------------------------------ positions

    def rope_index(self, input_ids, attention_mask=None, image_grid_thw=None):
        """M-RoPE position ids [3, B, T] and rope_deltas [B, 1] for a (left-padded) batch.

        Images are matched to runs of <|image_pad|> in reading order, row after row, so
        image_grid_thw lists the images of row 0 first. Padding columns get position 0."""
        B, T = input_ids.shape
        merge = self.cfg.vision.spatial_merge_size
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
        position_ids = torch.zeros(3, B, T, dtype=torch.long)
        deltas = torch.zeros(B, 1, dtype=torch.long)
        for b in range(B):
            real = attention_mask[b].bool().cpu()
            is_image = (input_ids[b].cpu() == self.cfg.image_token_id)[real].tolist()
            pieces, pos, i = [], 0, 0
            while i < len(is_image):
                j = i
                while j < len(is_image) and is_image[j] == is_image[i]:
                    j += 1  # [i, j) is a run of text or of image tokens
                if not is_image[i]:
                    pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
                    pos += j - i
                else:
                    t, h, w = next(grids, (0, 0, 0))
                    h, w = h // merge, w // merge
                    if t * h * w != j - i:
                        raise ValueError(f"row {b}: a run of {j - i} <|image_pad|> tokens does not match the next "
                                         f"image_grid_thw entry ({t}, {h * merge}, {w * merge}) = {t * h * w} tokens")
                    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w),
                                                      indexing="ij")).flatten(1)  # [3, t*h*w]
                    pieces.append(grid + pos)
                    pos += max(h, w)
                i = j
            if pieces:
                row = torch.cat(pieces, dim=1)  # [3, n_real]
                position_ids[:, b, real] = row
                deltas[b] = row.max() + 1 - T
            else:
                deltas[b] = -T
        return position_ids.to(input_ids.device), deltas.to(input_ids.device)

    # ------------------------------------------------------------ forward

    def image_features(self, pixel_values, image_grid_thw) -> torch.Tensor:
        """The vision tower's image tokens [n_image_tokens, D] for these images, in order.

        GRPO scores G rows per prompt with the same images: with a frozen vision tower, compute
        this once per prompt under torch.no_grad(), repeat it per row, and pass it as
        `image_features=` to forward / hidden_states / token_logps instead of pixel_values."""
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw (one (t, h, w) row per image)")
        return self.model.visual(pixel_values, image_grid_thw)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, image_features=None) -> torch.Tensor:
        """Token embeddings [B, T, D] with image features written over the <|image_pad|> tokens.

        The features come from `image_features` [n_image_tokens, D] when given, else from
        running the vision tower on pixel_values; give one or the other, not both."""
        embeds = self.model.language_model.embed_tokens(input_ids)  # [B, T, D]
        is_image = input_ids == self.cfg.image_token_id  # [B, T]
        if image_features is not None and pixel_values is not None:
            raise ValueError("pass either pixel_values or image_features (computed from them), not both")
        if image_features is not None and image_grid_thw is None:
            raise ValueError("image_features given without image_grid_thw: the M-RoPE positions need each "
                             "image's (t, h, w)")
        if image_features is None and pixel_values is None:
            if input_ids.shape[1] > 1 and is_image.any():  # (not per decode step: a host sync; generate
                                                           # never samples <|image_pad|>)
                raise ValueError(f"input_ids contain {int(is_image.sum())} <|image_pad|> tokens but neither "
                                 "pixel_values nor image_features")
            return embeds
        if image_features is None:
            image_features = self.image_features(pixel_values, image_grid_thw)
        features = image_features.to(embeds.dtype)  # [n_tokens, D]
        if int(is_image.sum()) != features.shape[0]:
            raise ValueError(f"input_ids contain {int(is_image.sum())} <|image_pad|> tokens (id "
                             f"{self.cfg.image_token_id}) but the images give {features.shape[0]} features; "
                             "the prompt needs t*h*w/4 pad tokens per image (use mrgr1.processing.Processor)")
        return embeds.masked_scatter(is_image[..., None], features)

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                      image_features=None, position_ids=None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D]; with a cache, writes it and advances its length.

        image_features [n_image_tokens, D] (from `image_features`) replaces pixel_values;
        image_grid_thw is still needed for the M-RoPE positions."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, past + T)} "
                             f"(cached {past} + new {T} columns)")
        if position_ids is None:
            if past > 0:
                raise ValueError("decoding with a filled KVCache needs position_ids: pass "
                                 "decode_position_ids(rope_deltas, kv_cache.length, T) (rope_deltas from rope_index)")
            position_ids, _ = self.rope_index(input_ids, attention_mask, image_grid_thw)
        embeds = self.embed(input_ids, pixel_values, image_grid_thw, image_features)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        self.model.visual.gradient_checkpointing = self.gradient_checkpointing
        hidden = self.model.language_model(embeds, position_ids, attention_mask, kv_cache, checkpoint_layers=ckpt)
        if kv_cache is not None:
            kv_cache.length += T
        return hidden

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                image_features=None, position_ids=None, kv_cache: KVCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, V], or [B, logits_to_keep, V] for the last positions only."""
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                    image_features=image_features, position_ids=position_ids, kv_cache=kv_cache)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def token_logps(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
                    image_features=None, logits_to_keep: int, temperature: float = 1.0,
                    chunk_size: int = 256) -> torch.Tensor:
        """log p(input_ids[:, t] | input_ids[:, :t]) for the last `logits_to_keep` tokens -> [B, k].

        Logits are divided by `temperature`. The lm_head and log-softmax run on `chunk_size`
        positions at a time and are recomputed in backward (`ChunkLogps`), so no [B, k, V]
        logits tensor is ever held: peak extra memory ~ 2 x chunk_size x V fp32 values."""
        k = logits_to_keep
        if not 0 < k < input_ids.shape[1]:
            raise ValueError(f"logits_to_keep={k} must be in [1, T-1] for T={input_ids.shape[1]}")
        hidden = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                    image_features=image_features)  # [B, T, D]
        h = hidden[:, -k - 1:-1].reshape(-1, hidden.shape[-1])  # position t-1 predicts token t  [B*k, D]
        targets = input_ids[:, -k:].reshape(-1)  # [B*k]
        return chunked_logps(h, self.lm_head.weight, targets, temperature, chunk_size).view(input_ids.shape[0], k)


def chunked_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                  chunk_size: int) -> torch.Tensor:
    """log_softmax(h W^T / temperature)[targets], `chunk_size` positions at a time (`ChunkLogps`):
    h [M, D], weight [V, D], targets [M] -> [M] fp32."""
    return torch.cat([ChunkLogps.apply(h[s:s + chunk_size], weight, targets[s:s + chunk_size], temperature)
                      for s in range(0, h.shape[0], chunk_size)])


class ChunkLogps(torch.autograd.Function):
    """log_softmax(h W^T / tau)[target] for one chunk of positions: h [c, D], W [V, D] -> [c] (fp32).

    Backward recomputes the [c, V] logits instead of saving them and uses
    d logp / d logits = (onehot(target) - softmax(logits)) / tau, so at most about two
    [c, V] fp32 buffers exist at any time, in forward and in backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature):
        logits = (h @ weight.T).float() / temperature  # [c, V]
        lse = torch.logsumexp(logits, dim=-1)  # [c]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature = temperature
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [c]
        h, weight, targets, lse = ctx.saved_tensors
        tau = ctx.temperature
        grad = (h @ weight.T).float().div_(tau).sub_(lse[:, None]).exp_()  # softmax  [c, V]
        grad.mul_(-grad_out[:, None] / tau)  # - g * softmax / tau
        grad.scatter_add_(-1, targets[:, None], (grad_out / tau)[:, None])  # + g * onehot / tau
        grad = grad.to(h.dtype)
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None  # [c, D]
        grad_w = grad.T @ h if ctx.needs_input_grad[1] else None  # [V, D]; skipped when lm_head is frozen
        return grad_h, grad_w, None, None


# ---------------------------------------------------------------- checkpoint files

_OLD_LAYOUT = [  # hub layout (transformers 4.x) -> transformers-5 layout = our module names
    ("visual.", "model.visual."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
]


MODEL_FOLDER_ADVICE = "download the model again, or point --policy at a complete Hugging Face model folder"


def read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: from_pretrained needs a Hugging Face model folder "
                                "(config.json + model.safetensors or model.safetensors.index.json)")
    return read_json(file, MODEL_FOLDER_ADVICE, error=ModelFolderError)


def model_config(path: str) -> ModelConfig:
    """The architecture a folder's config.json describes; a field missing or of the wrong type is
    named with the file."""
    try:
        return ModelConfig.from_hf_dict(read_config(path))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ModelFolderError):
            raise
        what = f"has no {e}" if isinstance(e, KeyError) else f"does not describe a Qwen2.5-VL model ({e})"
        raise ModelFolderError(f"{os.path.join(path, 'config.json')} {what}; {MODEL_FOLDER_ADVICE}") from None


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a folder: model.safetensors, or the shards named by the index."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index, MODEL_FOLDER_ADVICE, error=ModelFolderError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index} has no weight_map; {MODEL_FOLDER_ADVICE}")
        return [os.path.join(path, s) for s in sorted(set(map(str, weight_map.values())))]
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def rename_key(key: str) -> str:
    """Map an old-layout checkpoint key to our parameter name (new-layout keys pass through)."""
    for old, new in _OLD_LAYOUT:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_state(path: str, device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, renamed to our names, optionally cast to dtype."""
    state = {}
    for file in checkpoint_files(path):
        for key, tensor in read_safetensors(file, MODEL_FOLDER_ADVICE, error=ModelFolderError,
                                            device=str(device)).items():
            state[rename_key(key)] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def check_keys(model: nn.Module, state: dict, path: str) -> None:
    """Raise listing missing/unexpected keys and tensors of the wrong shape; a tied model takes
    lm_head from embed_tokens."""
    expected = dict(model.state_dict())
    if model.cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some tied checkpoints store a copy; the tie wins
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFolderError(f"checkpoint {path} does not match the Qwen2.5-VL architecture of its config.json: "
                               f"missing ({len(missing)}): {missing[:20]}; unexpected ({len(unexpected)}): "
                               f"{unexpected[:20]}. Is this a Qwen2.5-VL checkpoint? (untied lm_head needs lm_head.weight)")
    wrong = [f"{k} {tuple(state[k].shape)}, config.json gives {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelFolderError(f"checkpoint {path}: {len(wrong)} tensor(s) have other shapes than its config.json "
                               f"gives ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}): the weights "
                               f"and config.json come from different models; {MODEL_FOLDER_ADVICE}")
