"""The static decode step and its CUDA graph: `generate(..., decode="static" | "graph")`.

`mrgr1/generate.py` decodes eagerly: each step slices the KV cache to its filled columns, so the
shapes grow by one column per token. That is the readable path, and the one to read first. This
module offers the same step with static shapes, so that on CUDA it can be recorded once as a
`torch.cuda.CUDAGraph` and replayed for every token (one launch instead of hundreds of small
kernels per token):

- the cache is written at a column held in a device tensor (`ColumnCache`, over the KVCache's own
  tensors), and every step attends over all max_len columns under a mask that hides the columns
  not yet written (`decode_one_token_static`);
- the step's column and M-RoPE positions are computed on the device from `rows.step`, which
  `take_token` increments in place (`static_step`): no shape and no Python value depends on the
  step, and sampling needs no host sync (generate.draw);
- `graph_step` runs the static step GRAPH_WARMUP_STEPS times for real on a side stream, then
  records one call (`record_graph`) and replays it for every later token.

Every path gives the same tokens as the eager step (tests/test_static_decode.py). The idea of a
static-shape step replayed as a CUDA graph follows gpt-fast (github.com/pytorch-labs/gpt-fast,
generate.py); the code is ours. What is measured, and where: docs/generation.md.

Example:
    >>> completions, mask = generate(model, ids, attention_mask, pixels, grid, max_new_tokens=256,
    ...                              num_samples=8, decode="graph")          # CUDA inputs
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mrgr1.generate import Rows, Sampling, take_token
from mrgr1.language import KVCache

# Real steps run before recording the graph (cuBLAS handles, allocator pools settle).
GRAPH_WARMUP_STEPS = 2


class ColumnCache:
    """A KVCache's tensors k[l], v[l] [rows, kv_heads, max_len, head_dim], written one column at a
    time at `column` (a [1] long tensor on the cache's device, moved in place by the caller):
    each layer writes its new key/value there and attends over ALL max_len columns, the caller's
    mask hiding the unfilled ones. Shapes never change and the column is read on the device,
    which is what a CUDA graph needs. The decoder calls `write` as it calls KVCache.write."""

    def __init__(self, cache: KVCache):
        self.k, self.v, self.max_len = cache.k, cache.v, cache.max_len   # shared, not copied
        self.column = torch.zeros(1, dtype=torch.long, device=cache.k[0].device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [rows, kv_heads, 1, hd] at `column`; return the whole cache of `layer`."""
        self.k[layer].index_copy_(2, self.column, k)
        self.v[layer].index_copy_(2, self.column, v)
        return self.k[layer], self.v[layer]


def decode_one_token_static(model, tokens: torch.Tensor, positions: torch.Tensor,
                            key_mask: torch.Tensor, cache: ColumnCache) -> torch.Tensor:
    """One cached step with static shapes: tokens [R] at positions [R] are written at cache
    column `cache.column` and attend over all cache.max_len columns through key_mask
    [R, 1, 1, max_len] (True = attend) -> next-token logits [R, V].
    Calls the decoder directly: a text token needs no image features and no rope index."""
    text = model.model.language_model
    position_ids = positions.view(1, -1, 1).expand(3, -1, 1)                    # [3, R, 1]
    hidden = text(text.embed_tokens(tokens[:, None]), position_ids, key_mask, cache)  # [R, 1, D]
    return model.lm_head(hidden[:, -1])                                          # [R, V]


def static_step(model, rows: Rows, how: Sampling, cache: ColumnCache, prompt_len: int) -> None:
    """Feed each row's last token, take the next, with static shapes: the step's cache column
    and positions are computed on the device from rows.step, the mask hides the columns not
    yet written. The same kernels on the same memory every step (what a CUDA graph needs)."""
    fed = rows.step - 1                                                          # [1]
    torch.add(fed, prompt_len, out=cache.column)                                 # [1]
    written = torch.arange(cache.max_len, device=fed.device) <= cache.column     # [L]
    key_mask = (rows.key_mask & written)[:, None, None]                          # [R, 1, 1, L]
    logits = decode_one_token_static(model, rows.tokens, rows.first_positions + fed,
                                     key_mask, cache)                            # [R, V]
    take_token(rows, logits, how)


def record_graph(step: Callable[[], None], generator: torch.Generator | None,
                 stream: torch.cuda.Stream) -> Callable[[], None]:
    """Record one call of `step` as a torch.cuda.CUDAGraph on `stream` (a side stream of the
    inputs' device) and return its replay: the recorded kernels, launched as one unit on the same
    memory. Recording runs nothing; the caller replays. A generator is registered so every replay
    draws fresh numbers from it."""
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, stream=stream):
        step()
    return graph.replay


def on_side_stream(step: Callable[[], None], stream: torch.cuda.Stream) -> None:
    """Run `step` on `stream`, ordered after and before the device's current stream."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        step()
    current.wait_stream(stream)


def graph_step(step: Callable[[], None], generator: torch.Generator | None,
               device: torch.device) -> Callable[[], None]:
    """`step` (one token per call) as a CUDA graph: the first GRAPH_WARMUP_STEPS calls run it for
    real on a side stream (lazy initialisations, the allocator); the next records it and replays
    the recording, and every later call replays it. Each call takes one token, as `step` does.
    The side stream (and the graph's capture) are on `device`, the inputs' device, whatever the
    current device is."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
    warmups, replay = 0, None

    def run() -> None:
        nonlocal warmups, replay
        with torch.cuda.device(device):
            if replay is None and warmups < GRAPH_WARMUP_STEPS:
                on_side_stream(step, side)
                warmups += 1
                return
            if replay is None:
                side.wait_stream(torch.cuda.current_stream(device))
                replay = record_graph(step, generator, side)
                torch.cuda.current_stream(device).wait_stream(side)
            replay()
    return run


def bind_fast_step(model, rows: Rows, how: Sampling, cache: KVCache, prompt_len: int, *,
                   graph: bool) -> Callable[[], None]:
    """generate's `make_step` for decode="static" (graph False) or "graph" (graph True): a function
    of no arguments that takes one token for these rows from this cache."""
    columns = ColumnCache(cache)
    step = lambda: static_step(model, rows, how, columns, prompt_len)  # noqa: E731
    return graph_step(step, how.generator, rows.tokens.device) if graph else step
