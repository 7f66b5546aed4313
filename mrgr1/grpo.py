"""GRPO math: group-relative advantages and the clipped loss with a KL term (log-probs: vlm.token_logps).

GRPO (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300), as used by MRG-R1 (arXiv 2512.16145):
for each prompt sample G completions o_1..o_G, score them R_i, and
    A_i   = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps)              group_advantages
    r_i,t = exp(log pi_theta(o_i,t) - log pi_old(o_i,t))                 importance_ratio
    L_i,t = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)          clipped_surrogate
            + beta * KL_i,t,  KL = exp(ref - logp) - (ref - logp) - 1    k3_kl
    L     = mean over tokens, by one of four conventions                 aggregate
Variants: "batch" advantage scaling, no scaling and the "dr_grpo" length normaliser (Dr. GRPO,
Liu et al., 2025, arXiv 2503.20783), token-level "bnpo"/"dapo" normalisation (DAPO, Yu et al., 2025,
arXiv 2503.14476; also its asymmetric clip eps_high > eps_low).

With the defaults (grpo, one micro-batch, one rank) the loss is the mean over completions of each
completion's token mean; the four aggregations side by side, with micro-batches and ranks, are
described above `loss_normalizer` at the end of this file.

Example (one update on a batch of N = B * G completions, C completion tokens):
    >>> adv = group_advantages(rewards, group_size=G)                      # [N]
    >>> logps = model.token_logps(..., logits_to_keep=C, temperature=temp)  # [N, C], with grad
    >>> loss, stats = policy_loss(logps, old_logps, ref_logps, adv, mask, beta=0.04)
    >>> loss.backward()
"""
import torch

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


# ----------------------------------------------------------------------------- advantages

def _check_finite(rewards: torch.Tensor, group_size: int) -> None:
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"reward of rollout {i} (group {i // group_size}, member {i % group_size}) "
                         f"is {rewards[i].item()}; {len(bad)} rewards are not finite. Check the "
                         f"reward function on that completion.")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4, batch_std: float | None = None) -> torch.Tensor:
    """A_i = (R_i - mean_group R) / (std R + eps) for rewards [N] grouped by prompt -> [N].

    Rows i*G .. i*G+G-1 are the G completions of prompt i (generate's order).
    scale: "group" divides by the group's std (GRPO); "batch" by the std of the whole batch
    (the mean stays per group); "none" does not divide (Dr. GRPO). std is the unbiased one
    (divide by G - 1), as TRL does. batch_std: the batch's std when the batch is larger than
    `rewards` (several ranks: the std of every rank's rewards); default rewards.std(). A group whose rewards are all equal gets A = 0 exactly:
    it carries no signal about which completion is better.
    Worked example, G = 4, rewards [1, 0, 0.5, 0.5]:
        mean = 0.5, deviations [0.5, -0.5, 0, 0], std = sqrt((0.25 + 0.25) / 3) = 0.4082
        A = [0.5, -0.5, 0, 0] / (0.4082 + 1e-4) = [1.2244, -1.2244, 0, 0]
    """
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D [N] with N a multiple of group_size >= 2 "
                         f"(std of one sample is undefined); got shape {tuple(rewards.shape)}, "
                         f"group_size {group_size}")
    _check_finite(rewards, group_size)
    grouped = rewards.float().view(-1, group_size)                         # [B, G]
    deviations = grouped - grouped.mean(dim=1, keepdim=True)               # [B, G]
    flat = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    deviations = torch.where(flat, 0.0, deviations)  # no float noise from mean() on a flat group
    if scale == "group":
        deviations = deviations / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        std = rewards.float().std() if batch_std is None else batch_std
        deviations = deviations / (std + eps)
    return deviations.flatten()                                            # [N]


# ----------------------------------------------------------------------------- loss pieces

def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """r_t = pi_theta(o_t) / pi_old(o_t) = exp(logp - old_logp) -> [N, C]. old_logps carry no grad."""
    return torch.exp(logps - old_logps.detach())


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.2) -> torch.Tensor:
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) -> [N, C].

    ratio [N, C], advantages [N] (one per completion, shared by its tokens).
    Worked example, eps = 0.2: r = 1.5, A = 1 -> -min(1.5, 1.2) = -1.2 (clipped: no gradient);
    r = 0.5, A = -1 -> -min(-0.5, -0.8) = 0.8 (clipped); r = 1.5, A = -1 -> -min(-1.5, -1.2) = 1.5
    (not clipped: a too-likely bad token is always pushed down).
    """
    a = advantages.unsqueeze(1)                                            # [N, 1]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return -torch.minimum(ratio * a, clipped * a)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KL_t = exp(ref - logp) - (ref - logp) - 1 >= 0 (Schulman's k3 estimator) -> [N, C].

    Unbiased for KL(pi_theta || pi_ref) when o_t ~ pi_theta, zero when the policies agree.
    Worked example: pi_theta(o) = 0.5, pi_ref(o) = 0.25 -> ref - logp = log 0.5 = -0.6931,
    KL = 0.5 + 0.6931 - 1 = 0.1931.
    """
    delta = ref_logps.detach() - logps
    return torch.exp(delta) - delta - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo",
              max_len: int | None = None, normalizer: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [N, C] over completion tokens (mask 1) to a scalar.

    "grpo":          (1/N) sum_i (1/|o_i|) sum_t L_i,t   (long completions weigh less per token)
    "bnpo" / "dapo": sum_i,t L_i,t / sum_i |o_i|          (every token weighs the same)
    "dr_grpo":       sum_i,t L_i,t / (N * max_len)        (a constant: no length bias)
    These are the formulas for one (micro-)batch on its own. When it is one micro-batch of several,
    `normalizer` replaces the denominator: `micro_batch_normalizers` gives each one (the whole step's
    for grpo, dapo and dr_grpo; for bnpo its own token count times the number of micro-batches).
    Worked example, L = [[-1, -1.2], [0.8, pad]], |o| = [2, 1]:
        grpo (-1.1 + 0.8) / 2 = -0.15;  bnpo (-1.4) / 3 = -0.4667;  dr_grpo (-1.4) / (2 * 2) = -0.35
    """
    mask = mask.to(per_token.dtype)
    per_token = torch.where(mask > 0, per_token, 0.0)  # padding, whatever its value, adds nothing
    if normalizer is None:
        normalizer = loss_normalizer(mask, loss_type, max_len)
    elif loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    normalizer = max(normalizer, 1.0)  # no completion token at all: the loss is 0, not 0 / 0
    if loss_type == "grpo":
        per_seq = per_token.sum(-1) / mask.sum(-1).clamp_min(1.0)          # [N]
        return per_seq.sum() / normalizer
    return per_token.sum() / normalizer


# ----------------------------------------------------------------------------- the loss

def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp_min(1.0))


def policy_loss(logps, old_logps, ref_logps, advantages, mask, *, eps_low=0.2, eps_high=0.2,
                beta=0.04, loss_type="grpo", max_len=None, normalizer=None):
    """The GRPO loss and its statistics for one (micro-)batch.

    logps [N, C] (with grad), old_logps [N, C] or None (on-policy: old = logps.detach(), so
    r = 1 exactly and only its gradient, A * grad log p, remains),
    ref_logps [N, C] or None (only when beta = 0), advantages [N], mask [N, C] (1 = completion
    token). loss_type and max_len: see `aggregate`; normalizer: see `loss_normalizer`.
    Returns (loss, stats) with stats as floats: "kl" (mean k3 over tokens, when ref_logps is
    given), "clip_ratio/low_mean" (share of tokens with r < 1 - eps_low and A < 0),
    "clip_ratio/high_mean" (r > 1 + eps_high and A > 0), "clip_ratio/region_mean" (either),
    "ratio_mean" (mean r). Entropy is not computable from log-probs alone and is not reported.
    """
    if logps.dim() != 2 or mask.shape != logps.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(f"expected logps and mask [N, C] and advantages [N]; got logps "
                         f"{tuple(logps.shape)}, mask {tuple(mask.shape)}, advantages "
                         f"{tuple(advantages.shape)}")
    for name, other in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if other is not None and other.shape != logps.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must match logps {tuple(logps.shape)}")
    if beta != 0 and ref_logps is None:
        raise ValueError(f"beta = {beta} needs ref_logps (the reference policy's log-probs); "
                         f"pass them or set beta = 0")
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = importance_ratio(logps, old_logps)                             # [N, C]
    per_token = clipped_surrogate(ratio, advantages, eps_low, eps_high)    # [N, C]
    stats = {}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)                                       # [N, C]
        if beta != 0:
            per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, loss_type, max_len, normalizer)

    r, a = ratio.detach(), advantages.unsqueeze(1)
    low = ((r < 1 - eps_low) & (a < 0)).to(mask.dtype)
    high = ((r > 1 + eps_high) & (a > 0)).to(mask.dtype)
    stats["clip_ratio/low_mean"] = _masked_mean(low, mask)
    stats["clip_ratio/high_mean"] = _masked_mean(high, mask)
    stats["clip_ratio/region_mean"] = _masked_mean(low + high, mask)
    stats["ratio_mean"] = _masked_mean(r, mask)
    return loss, stats


# ----------------------------------------------------------------------------- micro-batches, ranks, truncation
# What the variants need beyond `aggregate`: the default (grpo, one micro-batch, one rank, no
# truncation mask) needs none of it.
#
# The four aggregations, side by side, for the N = B * G completions of one step, |o_i| completion
# tokens of row i, split into K micro-batches (--grad-accum) on each of W ranks (M = K * W parts m):
#     grpo     (1/N) sum_i (1/|o_i|) sum_t L_i,t              each completion's token mean, then the mean
#     bnpo     (1/M) sum_m [sum_{i in m} sum_t L_i,t / sum_{i in m} |o_i|]
#                                                             token mean within each micro-batch, then
#                                                             the mean over micro-batches (TRL's bnpo)
#     dapo     sum_i sum_t L_i,t / sum_i |o_i|                token mean over the whole step (TRL's dapo:
#                                                             num_items_in_batch, all ranks)
#     dr_grpo  sum_i sum_t L_i,t / (N * max_new_tokens)       a constant denominator (Dr. GRPO)
# bnpo and dapo agree when M = 1; with several micro-batches or ranks, bnpo weighs a token of a
# micro-batch with few tokens more. grpo, dapo and dr_grpo do not depend on K or W (see
# `loss_normalizer`); bnpo does, by definition (`part_normalizer`).


def loss_normalizer(mask: torch.Tensor, loss_type: str = "grpo", max_len: int | None = None) -> float:
    """The denominator `aggregate` uses for a whole batch with completion mask [N, C].

    "grpo": N (sequences); "bnpo"/"dapo": number of completion tokens (may be 0 when every
    row is masked; `aggregate` then divides by 1); "dr_grpo": N * max_len. Several ranks: the
    sum of every rank's value is the whole batch's (what grpo_step passes on).
    Gradient accumulation: compute this once on the full batch, pass it as `normalizer` to
    `policy_loss` for each micro-batch and SUM the micro-batch losses: the sum then equals the
    full-batch loss (and so do the gradients). Averaging per micro-batch instead would weigh a
    token of a short micro-batch more than one of a long micro-batch, which is what bnpo does
    by definition (`part_normalizer`).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type in ("bnpo", "dapo"):
        return float(mask.sum())
    max_len = mask.shape[1] if max_len is None else max_len
    if max_len < mask.shape[1]:
        raise ValueError(f"dr_grpo max_len ({max_len}) is shorter than the completions "
                         f"({mask.shape[1]} tokens): pass max_new_tokens")
    return float(mask.shape[0] * max_len)


def part_normalizer(loss_type: str, whole: float, part_mask: torch.Tensor, num_parts: int) -> float:
    """The denominator one micro-batch's loss uses when the step's loss is the SUM over its
    num_parts micro-batches (all ranks): the whole step's `loss_normalizer` for grpo, dapo and
    dr_grpo; for bnpo, as TRL, the micro-batch's own token count times num_parts (a token mean
    per micro-batch, averaged over the micro-batches).

    Worked example, 2 micro-batches with 3 and 1 tokens, token losses summing to -1.2 and 0.8:
        bnpo: -1.2 / (3 * 2) + 0.8 / (1 * 2) = 0.2  (mean of -0.4 and 0.8)
        dapo: (-1.2 + 0.8) / 4 = -0.1
    """
    if loss_type == "bnpo":
        return max(float(part_mask.sum()), 1.0) * num_parts
    return whole


def micro_batch_normalizers(mask: torch.Tensor, slices: list[slice], loss_type: str, max_len: int | None,
                            *, world_size: int = 1, sum_over_ranks=lambda x: x) -> list[float]:
    """The denominator of each micro-batch's loss, chosen by loss_type, so that the losses of the K
    micro-batches on every one of the W ranks SUM to the step's loss (and so do the gradients).

    mask [N, C] is this rank's completion mask, `slices` its K micro-batches. grpo, dapo and
    dr_grpo divide every micro-batch by the whole step's `loss_normalizer` (summed over ranks:
    `sum_over_ranks`, e.g. distributed.sum_across_ranks); bnpo by the micro-batch's own token count
    times K * W (`part_normalizer`). The one place where the loss type picks a normaliser.
    Worked example, dapo, one rank, 2 micro-batches with 3 and 1 tokens: [4.0, 4.0];
    bnpo: [3 * 2, 1 * 2] = [6.0, 2.0].
    """
    whole = sum_over_ranks(loss_normalizer(mask, loss_type, max_len))
    num_parts = len(slices) * world_size
    return [part_normalizer(loss_type, whole, mask[s], num_parts) for s in slices]


def mask_truncated(mask: torch.Tensor, is_truncated: torch.Tensor) -> torch.Tensor:
    """Zero the mask [N, C] of completions that hit max_new_tokens without EOS (is_truncated [N]).

    DAPO's "overlong filtering": a cut-off report is judged on an unfinished text, so its reward
    says little about its tokens. With loss_type "grpo" a masked row still counts in N.
    """
    return mask * (~is_truncated.bool()).unsqueeze(1).to(mask.dtype)
