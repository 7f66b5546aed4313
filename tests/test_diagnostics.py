"""benchmarks/finding_mentions.py: the majority vote behind the README's demo diagnosis."""
import importlib.util
import os

import torch

from mrgr1.labels import CONDITIONS, NEGATIVE, NO_FINDING, POSITIVE

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("finding_mentions",
                                              os.path.join(HERE, "..", "benchmarks", "finding_mentions.py"))
finding_mentions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finding_mentions)

EDEMA, DEVICES = CONDITIONS.index("Edema"), CONDITIONS.index("Support Devices")


def codes(**stated) -> list[int]:
    row = [0] * len(CONDITIONS)
    for index, code in stated.items():
        row[int(index[1:])] = code
    return row


def test_a_finding_is_voted_when_more_than_half_of_the_samples_state_it():
    # study 0: edema in 2 of 3 samples -> voted; study 1: edema in 1 of 3, devices in 3 of 3
    e, d = f"i{EDEMA}", f"i{DEVICES}"
    samples = torch.tensor([codes(**{e: POSITIVE}), codes(**{e: POSITIVE}), codes(**{e: NEGATIVE}),
                            codes(**{e: POSITIVE, d: POSITIVE}), codes(**{d: POSITIVE}), codes(**{d: POSITIVE})])
    vote = finding_mentions.majority_vote(samples, samples=3)                   # [2, 14]
    assert vote[0, EDEMA] == POSITIVE and vote[0, NO_FINDING] == 0
    assert vote[1, EDEMA] == 0 and vote[1, DEVICES] == POSITIVE
    assert vote[1, NO_FINDING] == POSITIVE  # devices alone leave a study normal (CheXpert's rule)
    assert int((vote == POSITIVE).sum()) == 3


def test_a_lower_share_states_a_finding_fewer_samples_agree_on():
    # edema in 1 of 3 samples: not a majority, but more than a share 0.25
    e = f"i{EDEMA}"
    samples = torch.tensor([codes(**{e: POSITIVE}), codes(), codes(**{e: NEGATIVE})])
    assert finding_mentions.majority_vote(samples, samples=3)[0, EDEMA] == 0
    vote = finding_mentions.majority_vote(samples, samples=3, more_than=0.25)
    assert vote[0, EDEMA] == POSITIVE and vote[0, NO_FINDING] == 0
    assert finding_mentions.majority_vote(samples, samples=3, more_than=1 / 3)[0, EDEMA] == 0  # strictly more


def test_first_token_table_ranks_tokens_by_mean_probability_and_counts_greedy_picks():
    # 3 studies, 4 tokens: token 0 has the largest mean probability (1/3) yet is no study's greedy
    # choice; token 3 (mean 0.30) wins one study, token 1 (mean 0.85/3) two
    probs = torch.tensor([[0.30, 0.40, 0.00, 0.30],
                          [0.35, 0.45, 0.10, 0.10],
                          [0.35, 0.00, 0.15, 0.50]])
    table = finding_mentions.token_table(probs, top=3)
    assert [t for t, _, _ in table] == [0, 3, 1]
    assert [round(p, 4) for _, p, _ in table] == [0.3333, 0.3, 0.2833]
    assert [n for _, _, n in table] == [0, 1, 2]
