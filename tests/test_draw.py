"""Specification of generate.draw: one categorical draw per row, by a two-level inverse CDF.

Oracles: the probabilities themselves (a chi-square test of the frequencies, binomial bounds
at the real vocabulary), ids that must never come out (weight 0), and the uniforms at the ends of
[0, 1) fed by hand to `inverse_cdf`.
"""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from mrgr1.generate import draw, inverse_cdf, keep_top_p, sample

QWEN_VOCAB = 151_936


def counts(tokens: torch.Tensor, vocab: int) -> np.ndarray:
    return torch.bincount(tokens, minlength=vocab).numpy()


# ----------------------------------------------------------------------------- distribution

@pytest.mark.parametrize("block", [3, 1024])      # 3: four blocks over 10 ids, the last one short
@pytest.mark.parametrize("total", [1.0, 37.5])    # weights need not sum to 1
def test_frequencies_match_the_probabilities_chi_square(block, total):
    weights = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.01, 0.14, 0.25, 0.0, 0.15, 0.1]) * total
    n = 40_000
    tokens = draw(weights.expand(n, -1).contiguous(), torch.Generator().manual_seed(0), block)
    observed = counts(tokens, 10)
    positive = (weights > 0).numpy()
    assert observed[~positive].sum() == 0
    expected = n * (weights / weights.sum()).numpy()[positive]
    assert chisquare(observed[positive], expected).pvalue > 1e-3


def peaked_real_vocabulary_probs() -> torch.Tensor:
    """float32 softmax over 151,936 ids: id 0 holds ~0.997, every other id ~2e-8, less than half
    an ulp (3e-8) of a running sum near 1. [V]"""
    logits = torch.randn(QWEN_VOCAB, generator=torch.Generator().manual_seed(1)) * 0.05  # float32
    logits[0] = 17.7
    return torch.softmax(logits, dim=0)


def test_real_vocabulary_peaked_float32_frequencies_match():
    probs = peaked_real_vocabulary_probs()
    tail = probs[1:].double().sum().item()            # ~0.003, spread over 151,935 ids
    assert 0.002 < tail < 0.01 and probs[1:].max() < 3e-8
    # The case is one a float32 running sum gets wrong: after id 0 it adds nothing, so an inverse
    # CDF over it would never draw the tail.
    running = np.cumsum(probs.numpy(), dtype=np.float32)
    assert running[-1] == running[0]
    rows, calls = 200, 40
    batch, gen = probs.expand(rows, -1).contiguous(), torch.Generator().manual_seed(2)
    tokens = torch.cat([draw(batch, gen) for _ in range(calls)])    # [8000]
    n = rows * calls
    hits = int((tokens > 0).sum())
    assert abs(hits - n * tail) <= 5 * (n * tail * (1 - tail)) ** 0.5   # binomial, 5 sigma
    drawn_tail = tokens[tokens > 0]
    assert (drawn_tail < QWEN_VOCAB // 2).any() and (drawn_tail >= QWEN_VOCAB // 2).any()


def test_same_seed_gives_the_same_tokens_and_another_seed_others():
    probs = torch.softmax(torch.randn(32, QWEN_VOCAB, generator=torch.Generator().manual_seed(3)), -1)
    tokens = lambda seed: draw(probs, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(tokens(0), tokens(0))
    assert not torch.equal(tokens(0), tokens(1))


# ----------------------------------------------------------------------------- ids of weight 0

@pytest.mark.parametrize("positive_ids", [[0], [QWEN_VOCAB - 1], [0, QWEN_VOCAB - 1], [1023, 1024],
                                          [QWEN_VOCAB - 385, QWEN_VOCAB - 384]])
def test_only_ids_of_positive_weight_are_drawn_at_the_edges_of_the_vocabulary_and_of_blocks(positive_ids):
    """The mass at the very first id, the very last, both, and on both sides of a block border
    (1024; and of the short last block, which starts at 148 * 1024 = V - 384)."""
    probs = torch.zeros(64, QWEN_VOCAB)
    probs[:, positive_ids] = 1.0 / len(positive_ids)
    tokens = draw(probs, torch.Generator().manual_seed(4))
    assert set(tokens.tolist()) <= set(positive_ids)
    assert set(tokens.tolist()) == set(positive_ids)  # 64 rows: each id turns up


@pytest.mark.parametrize("u, expected", [(0.0, "first"), (1 - 2 ** -53, "last"), (1.0, "last")])
def test_uniforms_at_the_ends_of_the_interval_take_the_first_and_last_positive_ids(u, expected):
    """u = 0 and u -> 1 at both levels: zeros before the first positive id and after the last one,
    in their blocks and in whole blocks. (1.0 is outside [0, 1): it must still land on weight.)"""
    weights = torch.zeros(1, QWEN_VOCAB)
    weights[0, [2050, 2060, 150_000, 150_010]] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    token = inverse_cdf(weights, torch.full((1, 2), u, dtype=torch.float64))
    assert token.item() == {"first": 2050, "last": 150_010}[expected]


def test_suppressed_and_top_p_filtered_tokens_are_never_sampled():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 300, generator=gen) * 2
    logits[0, [0, 299, 17, 150]] = float("-inf")         # suppressed, as take_token does
    kept = keep_top_p(logits, 0.6).isfinite()[0]          # the nucleus: a few ids
    assert 1 < kept.sum() < 50 and not kept[[0, 17, 150, 299]].any()
    tokens = sample(logits.expand(5000, -1), temperature=1.0, top_k=0, top_p=0.6, generator=gen)
    assert kept[tokens].all()
    assert set(tokens.tolist()) == set(kept.nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("peak", [0, QWEN_VOCAB - 1])
def test_top_p_keeping_only_the_first_or_last_id_always_samples_it(peak):
    logits = torch.randn(16, QWEN_VOCAB, generator=torch.Generator().manual_seed(6))
    logits[:, peak] = 30.0
    tokens = sample(logits, temperature=1.0, top_k=0, top_p=0.5, generator=torch.Generator().manual_seed(7))
    assert (tokens == peak).all()
