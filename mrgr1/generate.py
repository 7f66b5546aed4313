"""Batched sampling with a KV cache: the rollout engine of GRPO.

Every GRPO step samples G completions for each of B prompts, and that sampling is
most of the wall time. This generator

1. prefills each prompt (its images included) ONCE into a preallocated KV cache
   (`mrgr1.language.KVCache`, sized prompt + max_new_tokens), asking the model for the
   logits of the last position only;
2. copies each prompt's cache row G times (`KVCache.repeat_rows`): the vision tower and
   the prompt never run G times;
3. decodes one token per step for all B*G rows at once, each row at its own M-RoPE
   position (1 + the largest position of its prompt, + the step), sampling with
   temperature / top-k / top-p from an optional `torch.Generator` (`draw`: a two-level inverse
   CDF, one pair of uniforms per row, exact, no host sync). The step read here is the
   eager one (`eager_step`: the cache sliced to its filled columns); `decode="static"` and
   `decode="graph"` swap in a static-shape step, recorded as a CUDA graph on CUDA, from
   `mrgr1/fast_decode.py`: a module of its own, not needed to follow this one. All give the
   same tokens;
4. stops a row at any of `eos_token_ids` (the EOS token is kept and masked 1, later
   columns are `pad_token_id` and masked 0), goes on with the running rows only once at
   most half of the batch runs (`keep_rows`), and stops once every row is done.

Batches are left padded (as `mrgr1.processing.Processor` makes them): every row's last
prompt token sits in the same column, so one cache length serves all rows, and a prompt
gives the same completion inside a padded batch as alone.

The function vocabulary (`prefill`, `decode_one_token`, `logits_to_probs`, `sample`)
follows gpt-fast (github.com/pytorch-labs/gpt-fast, generate.py); the code is ours. The decode
paths and what is measured of them: docs/generation.md.
The position rule is the one of Qwen2.5-VL (arXiv 2502.13923): text after the last image
continues from the largest position used so far, on all three M-RoPE axes.

Example:
    >>> batch = processor(prompts, images)                     # left padded
    >>> completions, mask = generate(model, batch["input_ids"], batch["attention_mask"],
    ...     batch["pixel_values"], batch["image_grid_thw"], max_new_tokens=256,
    ...     num_samples=8, temperature=1.0, eos_token_ids=(151645,), pad_token_id=151643,
    ...     generator=torch.Generator().manual_seed(0))
    >>> completions.shape, mask.shape                           # row i is from prompt i // 8
    (torch.Size([B * 8, 256]), torch.Size([B * 8, 256]))
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial

import torch

from mrgr1.language import KVCache

# How often (in decode steps) the loop asks "is every row done?". Asking is a host-device
# sync, which on a GPU stalls the queue of kernels the CPU has launched ahead; on the CPU it
# costs nothing. A few wasted steps at the end are cheaper than a sync per step on a GPU.
STOP_CHECK_EVERY_ON_ACCELERATOR = 8

# The decode steps `generate` offers (its `decode` argument); all give the same tokens.
#   eager:  the cache sliced to its filled columns, the mask one column longer each step (here).
#   static: static shapes: whole cache, a mask, the step's column and positions on the device.
#   graph:  the static step recorded once as a CUDA graph and replayed every token (CUDA only).
#   (static and graph live in mrgr1/fast_decode.py.)
DECODE_MODES = ("auto", "eager", "static", "graph")
# Compact the batch (go on with the running rows only) once at most this share of its rows runs:
# the finished rows then cost nothing; copying the running rows' cache costs one read of it.
COMPACT_AT = 0.5
# draw's first level: the vocabulary is cut into blocks of this many ids, a block chosen by its
# mass, then an id inside it: at V = 151,936 both levels are small (149 blocks, 1,024 ids).
DRAW_BLOCK = 1024


# ----------------------------------------------------------------------------- sampling

def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. [R, V] -> [R, V]."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[:, -1:]   # [R, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches p.

    A token is dropped when the tokens ranked above it already hold >= p of the mass, so
    the most likely token always stays. Example, probs [0.5, 0.3, 0.2], p = 0.7: masses
    above = [0, 0.5, 0.8] -> keep the first two. [R, V] -> [R, V].
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)         # [R, V]
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs                    # [R, V]
    drop_sorted = mass_above >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)      # vocab order
    return logits.masked_fill(drop, float("-inf"))


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """pi(. | context) = softmax(filter(logits / T)) in float32; filter = top-k then top-p
    (the order transformers uses). temperature > 0. [R, V] -> [R, V]."""
    logits = logits.float() / temperature
    if top_k > 0:
        logits = keep_top_k(logits, top_k)
    if top_p < 1.0:
        logits = keep_top_p(logits, top_p)
    return torch.softmax(logits, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None, block: int = DRAW_BLOCK) -> torch.Tensor:
    """One categorical draw per row, P(i) = probs[i] / sum(probs): a two-level inverse CDF.
    probs [R, V] >= 0, any row total (renormalised here) -> [R] long.

    The vocabulary is cut into blocks of `block` ids (the last one shorter); one uniform picks a
    block with probability proportional to its mass m_b, a second one an id inside it in
    proportion to its weight: P(i) = m_b / M * p_i / m_b = p_i / M, exact in distribution.
    Why two levels: a float32 running sum over 151,936 ids rounds each small weight after a
    large one to the running sum's ulp (ids of p < 3e-8 after a 0.99 id get no interval at all),
    and a float64 cumsum of the whole row costs a float64 copy of [R, V]. Here the only pass over
    the row is the float32 sum of each block (1,024 ids, reduced pairwise: relative error ~1e-7,
    the precision of the float32 probabilities themselves); the block CDF [R, V / block] and the
    chosen block's CDF [R, block] are float64. One pair of uniforms per row, where an exponential
    race (argmax p_i / E_i) takes V exponentials (the two timed: benchmarks/bench_generate.py
    --draw-only); no host sync (unlike torch.multinomial on a GPU) and static shapes, so a CUDA
    graph replays it. An id of weight 0 (suppressed, filtered) is never drawn: `first_above`.
    """
    uniforms = torch.rand(probs.shape[0], 2, dtype=torch.float64, device=probs.device,
                          generator=generator)                                   # [R, 2]
    return inverse_cdf(probs, uniforms, block)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, block: int = DRAW_BLOCK) -> torch.Tensor:
    """The id of each row that uniforms [R, 2] in [0, 1) choose (column 0 picks the block,
    column 1 the id inside it), as `draw` describes. probs [R, V] -> [R] long."""
    rows, vocab = probs.shape
    block = min(block, vocab)
    whole = vocab // block * block                                               # ids in full blocks
    sums = probs[:, :whole].reshape(rows, -1, block).sum(-1)                     # [R, n]
    if whole < vocab:
        sums = torch.cat([sums, probs[:, whole:].sum(-1, keepdim=True)], dim=1)  # [R, n+1]
    chosen = first_above(sums.double(), uniforms[:, :1])                         # [R, 1]
    ids = chosen * block + torch.arange(block, device=probs.device)              # [R, block]
    inside = probs.gather(1, ids.clamp(max=vocab - 1)).double().masked_fill(ids >= vocab, 0.0)
    return ids.gather(1, first_above(inside, uniforms[:, 1:])).squeeze(1)


def first_above(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of each row of weights [R, N] >= 0 at the fraction u [R, 1] in [0, 1) of its
    total: the first i with cdf[i] > u * total, cdf = cumsum(weights) -> [R, 1].

    right=True is what keeps weight-0 ids out: adding 0 leaves a sum unchanged, so such an id has
    cdf[i] == cdf[i-1] and owns no interval. A target rounded up to the total (u near 1) is moved
    just below it, where the last positive id takes it; and whatever a parallel scan's rounding
    does on a GPU, an index whose weight is 0 is replaced by the row's heaviest id."""
    cdf = weights.cumsum(-1)                                                     # [R, N]
    total = cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, target, right=True).clamp_(max=weights.shape[1] - 1)
    positive = weights.gather(1, index) > 0
    return torch.where(positive, index, weights.argmax(-1, keepdim=True))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token of each row: argmax when temperature == 0, else a draw from
    logits_to_probs. [R, V] -> [R]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return draw(logits_to_probs(logits, temperature, top_k, top_p), generator)


def sampled_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token], T = 1 when greedy, over the whole vocabulary: the
    model's raw logits, before suppression and top-k / top-p, so it equals
    `model.token_logps(..., temperature=T)` of the finished sequence. [R, V] -> [R]."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------- the model

def prefill(model, input_ids, attention_mask, pixel_values, image_grid_thw,
            position_ids, cache: KVCache) -> torch.Tensor:
    """Run the prompts (images included) through the model once, filling `cache`.
    input_ids [B, P] -> logits of each prompt's last position [B, V]."""
    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw,
                   position_ids=position_ids, kv_cache=cache, logits_to_keep=1)  # [B, 1, V]
    return logits[:, -1]


def decode_one_token(model, tokens: torch.Tensor, attention_mask: torch.Tensor,
                     positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One cached step for every row: tokens [R] at M-RoPE positions [R] (a text token has
    t = h = w), attention_mask [R, cache.length + 1] -> next-token logits [R, V].
    The shapes grow by one column per step (the cache's filled part is sliced)."""
    position_ids = positions.view(1, -1, 1).expand(3, -1, 1)                    # [3, R, 1]
    logits = model(tokens[:, None], attention_mask, position_ids=position_ids,
                   kv_cache=cache, logits_to_keep=1)                             # [R, 1, V]
    return logits[:, -1]


def first_new_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each prompt's first generated token: 1 + the largest M-RoPE position of
    its real (unpadded) tokens, on any axis. position_ids [3, B, P] -> [B].
    Example: 'a <img 2x2 merged> b' has positions t/h/w a=0, img=1..2, b=3 -> next is 4."""
    real = attention_mask.bool()[None]                                           # [1, B, P]
    return position_ids.masked_fill(~real, 0).amax(dim=(0, 2)) + 1


# ----------------------------------------------------------------------------- one step

@dataclass
class Sampling:
    """How the next token is chosen: generate's arguments, the id lists as device tensors."""
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    suppress: torch.Tensor   # [S] ids never sampled
    eos: torch.Tensor        # [E] ids that end a row
    pad_token_id: int
    return_logps: bool


@dataclass
class Rows:
    """The R = B*G rows being decoded. Every tensor is allocated once and updated in place (so the
    CUDA graph of fast_decode.py, which replays on fixed memory, sees each step's values)."""
    tokens: torch.Tensor           # [R] long, the last token taken
    step: torch.Tensor             # [1] long, tokens taken so far = the next completion column
    done: torch.Tensor             # [R] bool, the row has taken an EOS
    completions: torch.Tensor      # [R, C] long, C = max_new_tokens columns
    mask: torch.Tensor             # [R, C] long
    logps: torch.Tensor            # [R, C] float32
    first_positions: torch.Tensor  # [R] long, M-RoPE position of the first new token
    key_mask: torch.Tensor         # [R, P+C] bool, False at the prompt's left padding
    ids: torch.Tensor              # [R] long, each row's index in generate's output


def take_token(rows: Rows, logits: torch.Tensor, how: Sampling) -> None:
    """Choose every row's next token from logits [R, V] and record it in column rows.step; a
    finished row takes pad_token_id, masked 0. Device work only: no host sync."""
    allowed = logits.index_fill(-1, how.suppress, float("-inf")) if len(how.suppress) else logits
    tokens = sample(allowed, how.temperature, how.top_k, how.top_p, how.generator)   # [R]
    tokens = tokens.masked_fill(rows.done, how.pad_token_id)
    rows.completions.index_copy_(1, rows.step, tokens[:, None])
    rows.mask.index_copy_(1, rows.step, (~rows.done).long()[:, None])
    if how.return_logps:
        logps = sampled_logps(logits, tokens, how.temperature).masked_fill(rows.done, 0.0)
        rows.logps.index_copy_(1, rows.step, logps[:, None])
    rows.done |= (tokens[:, None] == how.eos).any(dim=-1)   # isin, written to need no sync
    rows.tokens.copy_(tokens)
    rows.step += 1


def eager_step(model, rows: Rows, how: Sampling, cache: KVCache, prompt_len: int) -> None:
    """Feed each row's last token, take the next: the cache sliced to its filled columns."""
    fed = cache.length - prompt_len                  # completion column of the token fed
    logits = decode_one_token(model, rows.tokens, rows.key_mask[:, :cache.length + 1],
                              rows.first_positions + fed, cache)                 # [R, V]
    take_token(rows, logits, how)


# ----------------------------------------------------------------------------- the loop

StepMaker = Callable[..., Callable[[], None]]   # (model, rows, how, cache, prompt_len) -> step()


def bind_eager_step(model, rows: Rows, how: Sampling, cache: KVCache, prompt_len: int) -> Callable[[], None]:
    """The eager step as a function of no arguments, bound to these rows and this cache."""
    return lambda: eager_step(model, rows, how, cache, prompt_len)


def decode_rest(model, rows: Rows, how: Sampling, cache: KVCache, prompt_len: int, max_new_tokens: int,
                check_every: int, make_step: StepMaker = bind_eager_step) -> Rows:
    """Take tokens 1 .. max_new_tokens-1 of every row (rows.step is 1), one per call of the step
    `make_step` binds to the rows and the cache; returns the rows, all of them, with their
    completions. Every `check_every` tokens, one host sync asks which rows still run: none -> stop;
    at most COMPACT_AT of the batch -> go on with those rows only (their cache rows copied out, a
    step bound to them)."""
    out, taken = rows, 1
    step = make_step(model, rows, how, cache, prompt_len)
    while taken < max_new_tokens:
        if taken % check_every == 0:
            running = (~rows.done).nonzero().squeeze(1)                          # [R'] (sync)
            if len(running) == 0:
                break
            if len(running) <= COMPACT_AT * len(rows.done):
                rows, cache = keep_rows(out, rows, running), cache.take_rows(running)
                step = make_step(model, rows, how, cache, prompt_len)
        step()
        taken += 1
    store(out, rows)
    return out


def step_maker(decode: str) -> StepMaker:
    """How decode_rest takes a token: the eager step of this file, or the static step / its CUDA
    graph from mrgr1/fast_decode.py (imported only when asked for)."""
    if decode == "eager":
        return bind_eager_step
    from mrgr1.fast_decode import bind_fast_step
    return partial(bind_fast_step, graph=decode == "graph")


def keep_rows(out: Rows, rows: Rows, running: torch.Tensor) -> Rows:
    """New Rows holding only rows[running] (running [R'] long); what the others took so far is
    stored in `out` first."""
    store(out, rows)
    return Rows(**{f.name: getattr(rows, f.name).clone() if f.name == "step"
                   else getattr(rows, f.name).index_select(0, running) for f in fields(Rows)})


def store(out: Rows, rows: Rows) -> None:
    """Copy the record of `rows` (a compacted subset) into the full-size `out`, at rows.ids."""
    if rows is not out:
        for name in ("completions", "mask", "logps"):
            getattr(out, name).index_copy_(0, rows.ids, getattr(rows, name))


def check_inputs(input_ids, attention_mask, max_new_tokens, num_samples, temperature,
                 top_p, top_k, generator, decode) -> None:
    """Errors that say what was wrong and what to do, before any compute."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must both be [batch, prompt_len]")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate: the prompts must be LEFT padded (attention_mask[:, -1] "
                         "must be 1 in every row); build the batch with Processor, which "
                         "left pads")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"generate: max_new_tokens ({max_new_tokens}) and num_samples "
                         f"({num_samples}) must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"generate: need temperature >= 0 (0 = greedy), 0 < top_p <= 1, "
                         f"top_k >= 0 (0 = off); got {temperature}, {top_p}, {top_k}")
    if generator is not None and generator.device.type != input_ids.device.type:
        raise ValueError(f"generate: the generator is on {generator.device} but the inputs "
                         f"are on {input_ids.device}; make it with torch.Generator("
                         f"device={str(input_ids.device)!r})")
    if decode not in DECODE_MODES:
        raise ValueError(f"generate: decode={decode!r}; choose one of {DECODE_MODES}")
    if decode == "graph" and input_ids.device.type != "cuda":
        raise ValueError(f"generate: decode='graph' records a CUDA graph, but the inputs are on "
                         f"{input_ids.device}; use decode='static' or 'eager' there")


def resolve_decode(decode: str, device: torch.device) -> str:
    """'auto' is 'eager' on every device: the graphed step becomes the default on CUDA only once a
    GPU has measured it faster there (benchmarks/gpu_check.sh; docs/generation.md)."""
    if decode != "auto":
        return decode
    return "eager"


@torch.no_grad()  # not inference_mode: the completions feed the training forward later
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
             *, max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_token_ids: Sequence[int] = (),
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             return_logps: bool = False, suppress_token_ids: Sequence[int] = (),
             decode: str = "auto"):
    """Sample `num_samples` (G) completions for each of the B left-padded prompts.

    input_ids, attention_mask [B, P]; pixel_values [n_patches, 1176] (3 channels x 2 frames x 14 x 14) and image_grid_thw
    [N_images, 3] as the model takes them. temperature 0 is greedy; top_k 0 and top_p 1
    are off. pad_token_id fills the columns after EOS (default: the first EOS id, else 0).
    suppress_token_ids are never sampled (their logits are set to -inf), e.g. <|image_pad|>,
    which would need an image the completion does not have.
    decode chooses the decode step (DECODE_MODES): "eager" (this file), "static" or "graph" (CUDA
    only; both in mrgr1/fast_decode.py), or "auto" (= "eager" until "graph" is measured faster on a
    GPU). All give the same tokens (docs/generation.md).

    Returns the tuple (completions, mask), or (completions, mask, logps) with return_logps:
      completions [B*G, max_new_tokens] long, row i belongs to prompt i // G;
      mask        [B*G, max_new_tokens] long, 1 for generated tokens up to and including EOS;
      logps       [B*G, max_new_tokens] float32, log softmax(logits / T) of each sampled
                  token (T = 1 when greedy) over the WHOLE vocabulary, i.e. computed before
                  suppress_token_ids, top-k and top-p act: the same quantity as
                  `model.token_logps(..., temperature=T)`; 0 where mask is 0. (The
                  distribution actually sampled from is renormalised without the suppressed
                  and filtered tokens, so its log-prob of a token is >= this value.)
    """
    check_inputs(input_ids, attention_mask, max_new_tokens, num_samples, temperature,
                 top_p, top_k, generator, decode)
    device, (batch, prompt_len) = input_ids.device, input_ids.shape
    rows_n, total_len = batch * num_samples, prompt_len + max_new_tokens
    decode = resolve_decode(decode, device)
    if pad_token_id is None:
        pad_token_id = eos_token_ids[0] if len(eos_token_ids) else 0
    how = Sampling(temperature, top_k, top_p, generator,
                   suppress=torch.tensor(list(suppress_token_ids), dtype=torch.long, device=device),
                   eos=torch.tensor(list(eos_token_ids), dtype=torch.long, device=device),
                   pad_token_id=pad_token_id, return_logps=return_logps)
    check_every = 1 if device.type == "cpu" else STOP_CHECK_EVERY_ON_ACCELERATOR

    was_training = model.training
    model.eval()
    try:
        # Prefill the B prompts once, then give each prompt's cache row to its G samples.
        position_ids, _ = model.rope_index(input_ids, attention_mask, image_grid_thw)  # [3, B, P]
        cache = KVCache.for_model(model, batch, total_len, device=device)
        logits = prefill(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                         position_ids, cache)                                   # [B, V]
        cache = cache.repeat_rows(num_samples)
        first_positions = first_new_positions(position_ids, attention_mask)     # [B]
        prompt_mask = attention_mask.bool().repeat_interleave(num_samples, dim=0)  # [B*G, P]
        rows = Rows(
            tokens=torch.zeros(rows_n, dtype=torch.long, device=device),
            step=torch.zeros(1, dtype=torch.long, device=device),
            done=torch.zeros(rows_n, dtype=torch.bool, device=device),
            completions=torch.full((rows_n, max_new_tokens), pad_token_id, dtype=torch.long,
                                   device=device),
            mask=torch.zeros(rows_n, max_new_tokens, dtype=torch.long, device=device),
            logps=torch.zeros(rows_n, max_new_tokens, dtype=torch.float32, device=device),
            first_positions=first_positions.repeat_interleave(num_samples),       # [B*G]
            key_mask=torch.cat([prompt_mask, prompt_mask.new_ones(rows_n, max_new_tokens)], dim=1),
            ids=torch.arange(rows_n, device=device))
        take_token(rows, logits.repeat_interleave(num_samples, dim=0), how)     # token 0
        rows = decode_rest(model, rows, how, cache, prompt_len, max_new_tokens, check_every,
                           step_maker(decode))
    finally:
        model.train(was_training)
    completions, mask = rows.completions, rows.mask
    return (completions, mask, rows.logps) if return_logps else (completions, mask)
