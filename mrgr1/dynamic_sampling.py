"""Informative groups only: DAPO's dynamic sampling (`--dynamic-sampling`).

A group whose G rewards are all equal has advantages A_i = 0 for every completion, so its update is
spent on the KL term alone. DAPO (Yu et al., arXiv 2503.14476, "dynamic sampling") drops such
groups and samples further prompts until the batch is full of groups whose rewards differ. Here,
for `grpo_step` with `--dynamic-sampling`:

    round 0       the step's B studies, rolled out and scored (grpo_step's phases 1-3)
    while fewer than B groups are informative and fewer than --dynamic-sampling-rounds extra rounds
                  were taken: roll out and score the next B studies of the training stream
    keep          the first B informative groups, in the order drawn (`keep_informative`)

Several ranks (torchrun): the count that decides is the smallest over the ranks, so every rank
keeps the same number of groups and the update stays the one of a single process on all of them.
The advantages are per group, so dropping a group changes no other group's advantages;
`--scale-rewards batch` divides by the std of the kept groups' rewards (grpo_step computes it
after the selection).

Example (rounds hold `rewards` [n*G]):
    rounds, kept = sample_until_informative(first, draw_more, B=4, G=8, max_rounds=3)
    merged = take_groups(rounds, kept, G=8, pad_token_id=0)      # the kept groups' rows, in order
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import distributed


def informative_groups(rewards: torch.Tensor, G: int) -> list[int]:
    """The groups whose G rewards are not all equal: the ones DAPO's dynamic sampling keeps
    (arXiv 2503.14476, "dynamic sampling": 0 < |{correct outputs}| < G, here for a graded reward).
    rewards [n*G], group b = rows b*G .. b*G + G - 1.

    >>> informative_groups(torch.tensor([1.0, 1.0, 0.0, 0.5, 0.25, 0.25]), 2)
    [1]
    """
    grouped = rewards.view(-1, G)                                                          # [n, G]
    return (grouped != grouped[:, :1]).any(1).nonzero().flatten().tolist()


def sample_until_informative(first, draw_more: Callable[[], object], B: int, G: int, max_rounds: int):
    """Rounds of rolled-out studies until B of their groups are informative or `max_rounds` extra
    rounds were drawn -> (rounds, kept): kept lists (round, group) of the first min(B, found)
    informative groups, where `found` is the smallest count over the ranks."""
    rounds, found = [first], [(0, g) for g in informative_groups(first.rewards, G)]
    while True:
        enough = distributed.min_across_ranks(len(found))  # ranks: every rank keeps as many groups
        if enough >= B or len(rounds) > max_rounds:
            return rounds, found[:min(B, enough)]
        rounds.append(draw_more())
        found += [(len(rounds) - 1, g) for g in informative_groups(rounds[-1].rewards, G)]


def _fit(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """[n, C] -> [n, width]: cut, or padded on the right with `value`."""
    return F.pad(t[:, :width], (0, max(width - t.shape[1], 0)), value=value)


def take_groups(rounds: list, groups: list[tuple[int, int]], G: int, pad_token_id: int = 0):
    """The rows of `groups` ((round, group) pairs) of these rounds, as one round of their type
    (grpo_step's Sampled) with prompts None (the caller encodes the studies again, padded together):
    completions padded to the longest kept completion, every per-row tensor in the order given."""
    parts = [(rounds[r], slice(g * G, (g + 1) * G)) for r, g in groups]
    width = max(max(int(s.completion_mask[rows].sum(1).max()) for s, rows in parts), 1)

    def cat(get):
        return torch.cat([get(s)[rows] for s, rows in parts])
    kind = type(rounds[0])
    return kind(studies=[rounds[r].studies[g] for r, g in groups], prompts=None,
                completions=cat(lambda s: _fit(s.completions, width, pad_token_id)),                # [k*G, C]
                completion_mask=cat(lambda s: _fit(s.completion_mask, width, 0)),                   # [k*G, C]
                truncated=cat(lambda s: s.truncated), texts=[s.texts[i] for s, rows in parts for i in range(
                    rows.start, rows.stop)], rewards=cat(lambda s: s.rewards),
                reward_terms={k: cat(lambda s: s.reward_terms[k]) for k in rounds[0].reward_terms},
                details={k: cat(lambda s: s.details[k]) for k in rounds[0].details})


def keep_informative(first, draw_more: Callable[[], object] | None, G: int, max_rounds: int,
                     pad_token_id: int = 0):
    """grpo_step's --dynamic-sampling -> (kept, everything, stats).

    kept: the first B informative groups (B = len(first.studies)) as one Sampled, `first` itself
    when that is all of it, None when no group is informative after the extra rounds (the step
    then makes no update); everything: every group sampled, for the step's reward statistics;
    stats: dynamic/groups (kept per rank), dynamic/dropped_share (of the groups sampled),
    dynamic/rounds (extra rounds taken). Without draw_more no extra round is drawn."""
    B = len(first.studies)
    rounds, kept = sample_until_informative(first, draw_more, B, G, max_rounds if draw_more else 0)
    sampled = sum(len(r.studies) for r in rounds)
    everything = first if len(rounds) == 1 else take_groups(
        rounds, [(r, g) for r, s in enumerate(rounds) for g in range(len(s.studies))], G, pad_token_id)
    stats = {"dynamic/groups": float(len(kept)), "dynamic/dropped_share": 1 - len(kept) / sampled,
             "dynamic/rounds": float(len(rounds) - 1)}
    if not kept:
        return None, everything, stats
    if kept == [(0, g) for g in range(B)]:
        return first, everything, stats
    return take_groups(rounds, kept, G, pad_token_id), everything, stats
