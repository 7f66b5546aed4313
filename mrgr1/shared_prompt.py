"""Each study's prompt through the decoder once for all its G completions: exact, and G times less
prompt work in the reference pass and in every update (`--shared-prompt`, the default).

The idea is Prefix Grouper's (arXiv 2506.05433); the code is ours, for this decoder. A GRPO row is
[prompt of study b | completion i]. Attention is causal, so no prompt position sees a completion:
the prompt's hidden states, keys and values are the same in all G rows of its study. So

  1. prompt pass: the studies' prompts [b, P] (images included) run through the decoder once; each
     layer's keys and values [b, Hkv, P, hd] are kept (`PromptKV`), and so is the last prompt
     position's hidden state [b, D], which predicts completion token 0;
  2. completion pass: the n completions [n, C] run through the decoder, each row attending to its
     study's prompt keys/values (gathered by `index`, not recomputed: `RowsKV`) and causally to its
     own tokens, at the M-RoPE positions the whole row would give them.

Every completion position then sees exactly the keys and values it sees in the row
[prompt | completion], so the log-probs are the unshared ones up to float rounding. The gradient:
backward through the gather sums the G rows' gradients into their shared prompt, which is what the
G copies of the prompt receive in the unshared rows, summed in the weights. Work saved in the
linear layers: G (P + C) positions per study become P + G C (about 3.2x at P = 578, C = 150,
G = 8; benchmarks/bench_grpo_step.py measures it).

Example:
    prompt_ids, prompt_mask = ...                                  # [b, P] left padded, b studies
    index = torch.tensor([0, 0, 1, 1])                             # row -> its study: G = 2
    logps = completion_logps(model, prompt_ids, prompt_mask, completions, completion_mask, index,
                             pixel_values=pv, image_grid_thw=grid)  # [n, C], as model.token_logps
"""
from __future__ import annotations

import torch

from mrgr1.vlm import chunked_logps, decode_position_ids


class PromptKV:
    """Records each layer's keys/values of the prompt pass: k[layer], v[layer] [b, Hkv, P, hd].

    Stands in for a KVCache (`write`, `length`). With gradient checkpointing a layer runs again in
    backward and writes again: the first write is kept, the one the completion pass attended to."""

    def __init__(self):
        self.k, self.v, self.length = {}, {}, 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k.setdefault(layer, k)
        self.v.setdefault(layer, v)
        return k, v


class RowsKV:
    """Serves the completion pass: row j attends to the prompt keys/values of study index[j],
    then to its own: write(layer, k [n, Hkv, C, hd]) -> keys, values [n, Hkv, P + C, hd]."""

    def __init__(self, prompt: PromptKV, index: torch.Tensor):
        self.prompt, self.index, self.length = prompt, index, prompt.length

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys = torch.cat([self.prompt.k[layer].index_select(0, self.index), k], dim=2)
        values = torch.cat([self.prompt.v[layer].index_select(0, self.index), v], dim=2)
        return keys, values


def completion_logps(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                     completion_mask: torch.Tensor, index: torch.Tensor, pixel_values=None, image_grid_thw=None, *,
                     image_features=None, temperature: float = 1.0, chunk_size: int = 256) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of every completion token, each prompt encoded once -> [n, C].

    prompt_ids, prompt_mask [b, P]: b left-padded prompts with their images (pixel_values, or the
    frozen tower's image_features, and image_grid_thw, as `Qwen2_5_VL.hidden_states` takes them);
    completions, completion_mask [n, C]: right padded; index [n] long: row j continues prompt
    index[j]. Equals `model.token_logps` of the rows [prompt_ids[index] | completions] with
    logits_to_keep=C, in value and in gradient."""
    P, C = prompt_ids.shape[1], completions.shape[1]
    position_ids, rope_deltas = model.rope_index(prompt_ids, prompt_mask, image_grid_thw)  # [3, b, P], [b, 1]
    prompt_kv = PromptKV()
    prompt_hidden = model.hidden_states(prompt_ids, prompt_mask, pixel_values, image_grid_thw,          # [b, P, D]
                                        image_features=image_features, position_ids=position_ids,
                                        kv_cache=prompt_kv)
    rows_mask = torch.cat([prompt_mask.index_select(0, index), completion_mask], dim=1)               # [n, P+C]
    hidden = model.hidden_states(completions, rows_mask, kv_cache=RowsKV(prompt_kv, index),          # [n, C, D]
                                 position_ids=decode_position_ids(rope_deltas.index_select(0, index), P, C))
    # position t-1 predicts token t; the prompt's last position predicts token 0
    h = torch.cat([prompt_hidden[:, -1].index_select(0, index)[:, None], hidden[:, :-1]], dim=1)      # [n, C, D]
    return chunked_logps(h.reshape(-1, h.shape[-1]), model.lm_head.weight, completions.reshape(-1),
                         temperature, chunk_size).view(-1, C)
