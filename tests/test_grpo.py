"""Specification of the GRPO math (mrgr1/grpo.py), with every number worked out by hand.

Read top to bottom: advantages, log-probs, the clipped surrogate, the KL term, aggregation,
gradients, and gradient accumulation.
"""
import math

import pytest
import torch

from mrgr1.grpo import (aggregate, clipped_surrogate, group_advantages, importance_ratio, k3_kl, loss_normalizer,
                        mask_truncated, micro_batch_normalizers, part_normalizer, policy_loss)

close = dict(rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_hand_worked_group_of_four():
    # rewards [1, 0, 0.5, 0.5]: mean 0.5, deviations [0.5, -0.5, 0, 0]
    # unbiased std = sqrt((0.25 + 0.25 + 0 + 0) / 3) = sqrt(1/6) = 0.408248
    # A = deviation / (0.408248 + 1e-4)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=4)
    a = 0.5 / (math.sqrt(1 / 6) + 1e-4)  # 1.224445
    assert adv.tolist() == pytest.approx([a, -a, 0.0, 0.0], **close)


def test_group_advantages_two_groups_are_normalised_separately():
    # group 0: [0, 1] -> mean 0.5, std = sqrt((0.25 + 0.25) / 1) = 0.7071 -> A = +-0.5 / 0.7072
    # group 1: [0.2, 0.8] -> mean 0.5, std = sqrt((0.09 + 0.09) / 1) = 0.4243 -> A = +-0.3 / 0.4244
    adv = group_advantages(torch.tensor([0.0, 1.0, 0.2, 0.8]), group_size=2)
    a0 = 0.5 / (math.sqrt(0.5) + 1e-4)
    a1 = 0.3 / (math.sqrt(0.18) + 1e-4)
    assert adv.tolist() == pytest.approx([-a0, a0, -a1, a1], **close)


def test_group_advantages_have_zero_mean_in_every_group():
    rewards = torch.rand(6 * 8, generator=torch.Generator().manual_seed(0))
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, group_size=8, scale=scale).view(6, 8)
        assert adv.mean(dim=1).abs().max() < 1e-6, scale


def test_group_with_equal_rewards_gets_exactly_zero_advantages():
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point; the flat group must still give exact zeros
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0]), group_size=3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3] > 0 > adv[4]


def test_batch_scale_divides_by_the_std_of_the_whole_batch():
    # rewards [1, 0 | 1, 1]: group means 0.5 and 1 -> deviations [0.5, -0.5, 0, 0]
    # batch: mean 0.75, squared deviations 0.0625 * 3 + 0.5625 = 0.75, std = sqrt(0.75 / 3) = 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, scale="batch")
    a = 0.5 / (0.5 + 1e-4)
    assert adv.tolist() == pytest.approx([a, -a, 0.0, 0.0], **close)


def test_scale_none_only_subtracts_the_group_mean():
    # Dr. GRPO: [1, 0, 0.5, 0.5] - 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=4, scale="none")
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]


def test_nan_reward_error_names_the_rollout_and_its_group():
    rewards = torch.tensor([0.0, 1.0, 0.5, float("nan")])
    with pytest.raises(ValueError, match=r"rollout 3 \(group 1, member 1\)"):
        group_advantages(rewards, group_size=2)


def test_rewards_that_do_not_fill_whole_groups_are_rejected():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), group_size=2)


# ----------------------------------------------------------------------------- surrogate and KL

def test_ratio_is_exp_of_logp_difference():
    r = importance_ratio(torch.tensor([[math.log(0.6)]]), torch.tensor([[math.log(0.4)]]))
    assert r.item() == pytest.approx(1.5, **close)


@pytest.mark.parametrize("ratio, adv, loss, clipped", [
    (1.5, 1.0, -1.2, True),    # good token already made likelier than 1 + eps: capped, no push
    (0.5, -1.0, 0.8, True),    # bad token already made rarer than 1 - eps: capped, no push
    (1.5, -1.0, 1.5, False),   # bad token made likelier: -min(-1.5, -1.2) = 1.5, always pushed down
    (0.5, 1.0, -0.5, False),   # good token made rarer: -min(0.5, 0.8) = -0.5, always pushed up
    (1.1, 1.0, -1.1, False),   # inside the trust region: plain -r A
])
def test_clipped_surrogate_branches_and_their_gradients(ratio, adv, loss, clipped):
    r = torch.tensor([[ratio]], requires_grad=True)
    out = clipped_surrogate(r, torch.tensor([adv]), eps_low=0.2, eps_high=0.2)
    assert out.item() == pytest.approx(loss, **close)
    (grad,) = torch.autograd.grad(out.sum(), r)
    assert grad.item() == (0.0 if clipped else pytest.approx(-adv))


def test_asymmetric_clip_uses_eps_high_above_and_eps_low_below():
    # DAPO clip-higher, eps_low 0.2, eps_high 0.28, A = 1:
    # r = 1.25 is inside, 1.3 is capped at 1.28, 0.7 is below 1 - 0.2 but A > 0: not clipped
    out = clipped_surrogate(torch.tensor([[1.25, 1.3, 0.7]]), torch.tensor([1.0]), 0.2, 0.28)
    assert out.tolist()[0] == pytest.approx([-1.25, -1.28, -0.7], **close)


def test_k3_kl_hand_example_both_directions():
    # pi = 0.5, ref = 0.25: d = ref - logp = log 0.5 -> 0.5 - log 0.5 - 1 = 0.193147
    # pi = 0.25, ref = 0.5: d = log 2 -> 2 - log 2 - 1 = 0.306853
    kl = k3_kl(torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.5]])))
    assert kl.tolist()[0] == pytest.approx([0.5 + math.log(2) - 1, 1 - math.log(2)], **close)


def test_k3_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logps = torch.log(torch.tensor([[0.1, 0.7, 0.2]]))
    assert k3_kl(logps, logps).abs().max().item() == 0.0
    assert (k3_kl(logps, logps + 0.3) > 0).all() and (k3_kl(logps, logps - 0.3) > 0).all()


def test_k3_kl_expectation_under_the_policy_is_the_exact_kl():
    # E_{o ~ pi}[k3] = sum_o pi(o) (ref/pi - log(ref/pi) - 1) = sum ref - 1 + KL(pi || ref) = KL
    pi, ref = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    exact = (pi * (pi / ref).log()).sum()  # 0.5 ln 2.5 + 0.3 ln 1.5 + 0.2 ln(1/3) = 0.360086
    expected_k3 = (pi * k3_kl(pi.log()[None], ref.log()[None])[0]).sum()
    assert expected_k3.item() == pytest.approx(exact.item(), **close)
    assert exact.item() == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(1.5)
                                         + 0.2 * math.log(1 / 3), **close)


# ----------------------------------------------------------------------------- the loss, by hand

def two_sequences():
    """Sequence 0 has 2 tokens with r = (1, 1.5) and A = +1; sequence 1 has 1 token with r = 0.5
    and A = -1 (its second column is padding, given an absurd ratio of 10 to prove it is ignored).
    Per-token losses with eps = 0.2:
        seq 0: r = 1   -> -min(1, 1) = -1;  r = 1.5 -> -min(1.5, 1.2) = -1.2 (high clip)
        seq 1: r = 0.5 -> -min(-0.5, -0.8) = 0.8 (low clip)
    """
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ratios = torch.tensor([[1.0, 1.5], [0.5, 10.0]])
    logps = (old + ratios.log()).requires_grad_()
    return logps, old, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]])


@pytest.mark.parametrize("loss_type, max_len, expected", [
    ("grpo", None, (-1.1 + 0.8) / 2),      # seq means -1.1 and 0.8, then their mean: -0.15
    ("bnpo", None, (-1 - 1.2 + 0.8) / 3),  # token sum -1.4 over 3 tokens: -0.4667
    ("dapo", None, (-1 - 1.2 + 0.8) / 3),  # same as bnpo on one process
    ("dr_grpo", None, -1.4 / (2 * 2)),     # N = 2, max_len = T = 2: -0.35
    ("dr_grpo", 4, -1.4 / (2 * 4)),        # max_len = 4 (max_new_tokens): -0.175
])
def test_policy_loss_hand_worked_for_each_loss_type(loss_type, max_len, expected):
    logps, old, adv, mask = two_sequences()
    loss, stats = policy_loss(logps, old, None, adv, mask, beta=0.0, loss_type=loss_type,
                              max_len=max_len)
    assert loss.item() == pytest.approx(expected, **close)
    assert stats["clip_ratio/high_mean"] == pytest.approx(1 / 3)   # seq 0, token 1
    assert stats["clip_ratio/low_mean"] == pytest.approx(1 / 3)    # seq 1, token 0
    assert stats["clip_ratio/region_mean"] == pytest.approx(2 / 3)
    assert stats["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5) / 3, **close)
    assert "kl" not in stats  # no reference given


def test_policy_loss_adds_beta_times_k3_kl_per_token():
    # ref - logp = log 0.5 on every token -> KL_t = 0.5 + ln 2 - 1 = 0.193147 everywhere
    # grpo with beta = 0.1: -0.15 + 0.1 * 0.193147 (a constant per token survives both means)
    logps, old, adv, mask = two_sequences()
    ref = logps.detach() + math.log(0.5)
    loss, stats = policy_loss(logps, old, ref, adv, mask, beta=0.1)
    kl = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(-0.15 + 0.1 * kl, **close)
    assert stats["kl"] == pytest.approx(kl, **close)


def test_beta_zero_needs_no_reference_and_beta_nonzero_does():
    logps, old, adv, mask = two_sequences()
    policy_loss(logps, old, None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="needs ref_logps"):
        policy_loss(logps, old, None, adv, mask, beta=0.04)


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    # old_logps None -> r = 1 everywhere -> grpo loss = -(A_0 + A_1) / 2 = -(0.7 - 0.3) / 2 = -0.2
    logps = torch.randn(2, 3, requires_grad=True)
    loss, stats = policy_loss(logps, None, None, torch.tensor([0.7, -0.3]), torch.ones(2, 3),
                              beta=0.0)
    assert loss.item() == pytest.approx(-0.2, **close)
    assert stats["ratio_mean"] == 1.0 and stats["clip_ratio/region_mean"] == 0.0


def test_on_policy_gradient_is_minus_advantage_times_grad_logp_over_length():
    # d loss / d logits = -(1/N) sum_i A_i / |o_i| sum_t d logp_i,t / d logits   (grpo, beta = 0)
    # and d logp / d logits = onehot(token) - softmax(logits)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([0.8, -1.5])
    logps = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]             # [N, T]
    loss, _ = policy_loss(logps, None, None, adv, mask, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logits)

    lengths = mask.sum(1, keepdim=True).float()                                   # [[3], [2]]
    weight = -adv[:, None] / lengths / 2 * mask                                   # [N, T]
    onehot = torch.nn.functional.one_hot(tokens, 5).float()
    expected = weight[..., None] * (onehot - torch.softmax(logits.detach(), -1))  # [N, T, V]
    torch.testing.assert_close(grad, expected)


def test_padding_gets_no_gradient():
    logps, old, adv, mask = two_sequences()
    loss, _ = policy_loss(logps, old, logps.detach() - 0.3, adv, mask, beta=0.04, loss_type="bnpo")
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad[1, 1].item() == 0.0


# ----------------------------------------------------------------------------- micro-batches

@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batch_losses_with_whole_batch_normalizer_sum_to_the_full_loss(loss_type):
    g = torch.Generator().manual_seed(2)
    logps = torch.randn(4, 6, generator=g).requires_grad_()
    old, ref = logps.detach() + 0.1 * torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    adv = torch.randn(4, generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1] * 3 + [0] * 3, [1] * 5 + [0]])
    kw = dict(beta=0.04, loss_type=loss_type, max_len=8)
    full, _ = policy_loss(logps, old, ref, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, logps)

    norm = loss_normalizer(mask, loss_type, max_len=8)
    parts = [policy_loss(logps[s], old[s], ref[s], adv[s], mask[s], normalizer=norm, **kw)[0]
             for s in (slice(0, 1), slice(1, 4))]  # uneven micro-batches: 6 tokens, then 10
    (acc_grad,) = torch.autograd.grad(sum(parts), logps)
    assert sum(parts).item() == pytest.approx(full.item(), **close)
    torch.testing.assert_close(acc_grad, full_grad)


def _two_micro_batches(loss_type):
    """Per-token losses of 3 rows in micro-batches [row 0] (3 tokens) and [rows 1, 2] (1 + 3 tokens),
    aggregated as grpo_step does: each part's loss with its part_normalizer, summed."""
    per_token = torch.tensor([[-0.5, -0.3, -0.4, 9.0], [0.8, 9.0, 9.0, 9.0], [0.1, 0.5, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    whole = loss_normalizer(mask, loss_type, max_len=4)
    return sum(aggregate(per_token[s], mask[s], loss_type, max_len=4,
                         normalizer=part_normalizer(loss_type, whole, mask[s], num_parts=2)).item()
               for s in (slice(0, 1), slice(1, 3)))


def test_bnpo_is_a_token_mean_per_micro_batch_averaged_as_trls():
    # TRL's bnpo: each micro-batch's sum / its own token count, divided by the 2 accumulation steps
    trl = ((-0.5 - 0.3 - 0.4) / 3 + (0.8 + 0.1 + 0.5 + 0.3) / 4) / 2  # = 0.0125
    assert _two_micro_batches("bnpo") == pytest.approx(trl, **close)


def test_dapo_keeps_the_whole_steps_token_count():
    # TRL's dapo: the sum over every micro-batch / num_items_in_batch, the step's 7 tokens
    assert _two_micro_batches("dapo") == pytest.approx((-1.2 + 1.7) / 7, **close)
    assert _two_micro_batches("grpo") == pytest.approx((-0.4 + 0.8 + 0.3) / 3, **close)


def test_part_normalizer_worked_example_from_its_docstring():
    three, one = torch.tensor([1, 1, 1]), torch.tensor([1, 0, 0])
    bnpo = -1.2 / part_normalizer("bnpo", 4.0, three, 2) + 0.8 / part_normalizer("bnpo", 4.0, one, 2)
    assert bnpo == pytest.approx(0.2, **close)
    assert part_normalizer("dapo", 4.0, three, 2) == 4.0


def test_aggregate_worked_example_from_its_docstring():
    per_token, mask = torch.tensor([[-1.0, -1.2], [0.8, 99.0]]), torch.tensor([[1, 1], [1, 0]])
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(-0.15, **close)
    assert aggregate(per_token, mask, "bnpo").item() == pytest.approx(-1.4 / 3, **close)
    assert aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(-0.35, **close)


def test_mask_truncated_drops_whole_rows_without_eos():
    mask = torch.ones(3, 2, dtype=torch.long)
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1], [0, 0], [1, 1]]


def test_unknown_loss_type_is_rejected():
    logps, old, adv, mask = two_sequences()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        policy_loss(logps, old, None, adv, mask, beta=0.0, loss_type="ppo")


def test_micro_batch_normalizers_pick_each_loss_types_denominator_in_one_place():
    # 3 rows, 2 micro-batches: rows 0-1 hold 3 tokens, row 2 holds 1; max_new_tokens 4
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.float)
    slices = [slice(0, 2), slice(2, 3)]
    assert micro_batch_normalizers(mask, slices, "grpo", 4) == [3.0, 3.0]          # N rows
    assert micro_batch_normalizers(mask, slices, "dapo", 4) == [4.0, 4.0]          # all 4 tokens
    assert micro_batch_normalizers(mask, slices, "dr_grpo", 4) == [12.0, 12.0]     # N * max_new_tokens
    assert micro_batch_normalizers(mask, slices, "bnpo", 4) == [6.0, 2.0]          # own tokens x 2 parts
    # two ranks holding the same: the whole batch's denominators (the sum over ranks), bnpo x 4 parts
    both = dict(world_size=2, sum_over_ranks=lambda x: 2 * x)
    assert micro_batch_normalizers(mask, slices, "dapo", 4, **both) == [8.0, 8.0]
    assert micro_batch_normalizers(mask, slices, "bnpo", 4, **both) == [12.0, 4.0]
