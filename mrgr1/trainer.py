"""One GRPO step, one SFT step, and the CE evaluation: the pieces train_grpo.py strings together.

A GRPO step for B studies (MRG-R1, arXiv 2512.16145; GRPO from DeepSeekMath, arXiv 2402.03300):

    studies --prompt--> input_ids [B, P] + images
            --generate (G samples each, KV cache)--> completions [B*G, C]
            --decode, extract <report>, label--> rewards R [B*G] = 0.75 MCCS + 0.25 format
            --group_advantages--> A [B*G]
            --token_logps (old: when num_iterations > 1; ref: adapters off)--> [B*G, C]
            --policy_loss over micro-batches, AdamW--> updated adapters

Sequences for the update are `[left-padded prompt | completion, right-padded]`, so the completion
is always the last C columns and `model.token_logps(..., logits_to_keep=C)` scores it. The same
layout serves the SFT warm start, whose "completion" is the reference report in the target format.

Example:
    rollout = collect_rollout(model, processor, studies, reward_fn, cfg, generator)
    stats = grpo_update(model, rollout, optimizer, scheduler, cfg)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import distributed, grpo, lora
from .data import Study, load_images
from .generate import generate
from .metrics import ce_scores
from .rewards import compute_rewards, extract_report

# Our wording: the paper does not publish its prompt. Flags override both.
SYSTEM_PROMPT = "You are an expert radiologist who writes accurate chest X-ray reports."
INSTRUCTION = ("Write the radiology report for this chest X-ray study. First reason about the "
               "findings inside <think> </think>, then give the final report inside "
               "<report> </report>.")
# The SFT warm start teaches the output format; the reference reports carry no reasoning, so the
# think section of the SFT target is this fixed sentence (ours).
SFT_THINK = "I check the heart, mediastinum, lungs, pleura, bones and devices on each view."


@dataclass
class GRPOConfig:
    """The knobs of one GRPO step. Defaults marked (ours) are not published by the paper."""
    num_generations: int = 8          # G rollouts per study (ours; TRL's default)
    max_new_tokens: int = 256         # completion budget (ours)
    temperature: float = 1.0          # sampling temperature; log-probs use the same T (ours)
    top_p: float = 1.0                # nucleus sampling (ours: off)
    beta: float = 0.04                # KL weight to the reference policy (ours; TRL's old default)
    epsilon: float = 0.2              # clip range low: r >= 1 - epsilon (ours; PPO's default)
    epsilon_high: float = 0.2         # clip range high (DAPO's clip-higher when > epsilon)
    loss_type: str = "grpo"           # grpo | bnpo | dapo | dr_grpo
    scale_rewards: str = "group"      # group | batch | none (Dr. GRPO)
    num_iterations: int = 1           # PPO epochs over one batch of rollouts (mu in the GRPO paper)
    grad_accum: int = 1               # micro-batches per optimizer step (memory, not maths)
    max_grad_norm: float = 1.0        # gradient-norm clipping
    mask_truncated: bool = False      # drop completions without EOS from the loss (DAPO)
    reward_kind: str = "mccs"         # mccs (the paper) | ce_f1 | bleu (the paper's ablations)
    reward_weights: dict = field(default_factory=lambda: {"mccs": 0.75, "format": 0.25})  # paper
    mccs_margin: float = 0.5          # m in MCCS = max((CCS - m) / (1 - m), 0) (ours)
    mccs_mapping: tuple = (0.0, 1.0, -1.0, 1.0)  # value of codes blank, positive, negative, uncertain (paper)


# ----------------------------------------------------------------------------- prompts

def study_messages(study: Study, system: str = SYSTEM_PROMPT, instruction: str = INSTRUCTION) -> list[dict]:
    """The chat of one study: a system turn, then the user turn with every view and the instruction."""
    images = [{"type": "image"} for _ in study.image_paths]
    return [{"role": "system", "content": system},
            {"role": "user", "content": images + [{"type": "text", "text": instruction}]}]


def encode_prompts(processor, studies: list[Study], device=None) -> dict:
    """Left-padded prompts of B studies: input_ids, attention_mask [B, P], pixel_values,
    image_grid_thw, and images_per_prompt [B] (to find each prompt's images again)."""
    batch = processor([study_messages(s) for s in studies], [load_images(s) for s in studies])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["images_per_prompt"] = torch.tensor([len(s.image_paths) for s in studies])
    return batch


def repeat_prompts(prompts: dict, num_repeats: int, pixels: bool = True) -> dict:
    """Each prompt row (and its images) repeated G times, rows grouped by prompt like generate's.
    pixels=False leaves pixel_values out (the rows will get precomputed image features)."""
    ids, grid = prompts["input_ids"], prompts.get("image_grid_thw")
    out = {"input_ids": ids.repeat_interleave(num_repeats, 0),
           "attention_mask": prompts["attention_mask"].repeat_interleave(num_repeats, 0),
           "pixel_values": None, "image_grid_thw": None}
    if grid is not None:
        per_prompt = prompts["images_per_prompt"].tolist()                              # images of prompt b
        grids = torch.split(grid, per_prompt)                                           # consecutive per prompt
        out["image_grid_thw"] = torch.cat([g for g in grids for _ in range(num_repeats)])
        if pixels:
            patches = [int(g.prod(-1).sum()) for g in grids]                            # patches of prompt b
            blocks = torch.split(prompts["pixel_values"], patches)
            out["pixel_values"] = torch.cat([b for b in blocks for _ in range(num_repeats)])
    return out


def join_completions(prompts: dict, completions: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """[left-padded prompt | completion] rows for token_logps. prompts already repeated to N rows."""
    return {**prompts,
            "input_ids": torch.cat([prompts["input_ids"], completions], 1),                 # [N, P+C]
            "attention_mask": torch.cat([prompts["attention_mask"], completion_mask], 1)}  # [N, P+C]


# ----------------------------------------------------------------------------- rollout

@dataclass
class Rollout:
    """B studies x G completions and everything the update needs; row i is from study i // G."""
    sequences: dict                  # input_ids / attention_mask [N, P+C], pixel_values, image_grid_thw
    completion_mask: torch.Tensor    # [N, C] 1 on completion tokens (EOS included)
    advantages: torch.Tensor         # [N]
    rewards: torch.Tensor            # [N]
    reward_parts: dict               # name -> [N]
    old_logps: torch.Tensor | None   # [N, C]; None when num_iterations == 1 (on-policy)
    ref_logps: torch.Tensor | None   # [N, C]; None when beta == 0
    texts: list[str]                 # decoded completions [N]
    truncated: torch.Tensor          # [N] bool: hit max_new_tokens without EOS


def _logps(model, seqs: dict, width: int, temperature: float, micro: int) -> torch.Tensor:
    """token_logps over row chunks of size `micro`: [N, width]."""
    n = seqs["input_ids"].shape[0]
    return torch.cat([model.token_logps(**select_rows(seqs, s, s + micro), logits_to_keep=width,
                                        temperature=temperature) for s in range(0, n, micro)])


def select_rows(seqs: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of a sequence batch, with their images (or their image features)."""
    out = {"input_ids": seqs["input_ids"][start:stop], "attention_mask": seqs["attention_mask"][start:stop],
           "pixel_values": None, "image_grid_thw": None}
    if seqs.get("image_grid_thw") is None:
        return out
    per_row = seqs["images_per_row"]                                   # [N] images of each row
    first_img, last_img = int(per_row[:start].sum()), int(per_row[:stop].sum())
    out["image_grid_thw"] = seqs["image_grid_thw"][first_img:last_img]
    if seqs.get("image_features") is not None:                         # [n_tokens, D], rows in order
        tokens = seqs["image_tokens_per_row"]
        out["image_features"] = seqs["image_features"][int(tokens[:start].sum()):int(tokens[:stop].sum())]
    else:
        patches = seqs["image_grid_thw"].prod(-1)
        out["pixel_values"] = seqs["pixel_values"][int(patches[:first_img].sum()):int(patches[:last_img].sum())]
    return out


def shared_image_features(model, prompts: dict, num_repeats: int) -> dict:
    """With a frozen vision tower (LoRA on the decoder), encode each prompt's images once and give
    the G rows of that prompt the same features, instead of running the tower B*G times.
    Returns {} when the tower trains (or there are no images): the rows then carry pixels."""
    if prompts.get("pixel_values") is None or any(p.requires_grad for p in model.model.visual.parameters()):
        return {}
    features = model.image_features(prompts["pixel_values"], prompts["image_grid_thw"])   # [tokens, D]
    per_prompt = (prompts["input_ids"] == model.cfg.image_token_id).sum(1)                # [B]
    blocks = features.split(per_prompt.tolist())
    return {"image_features": torch.cat([b for b in blocks for _ in range(num_repeats)]),
            "image_tokens_per_row": per_prompt.repeat_interleave(num_repeats).cpu()}


def micro_batch_size(n: int, grad_accum: int) -> int:
    """Rows per micro-batch when n rows are split into grad_accum micro-batches."""
    return max(1, -(-n // grad_accum))


@torch.no_grad()
def sample_and_score(model, processor, studies: list[Study], labeler, cfg: GRPOConfig,
                     generator: torch.Generator | None, *, reward_cache: dict | None = None,
                     eos_token_ids=(), pad_token_id: int = 0, suppress_token_ids=()) -> dict:
    """G sampled completions per study and their rewards: the first half of a rollout.

    Returns prompts (encode_prompts), completions / completion_mask [B*G, C] (columns no row used
    dropped), truncated [B*G] (no EOS), texts [B*G], rewards [B*G] and reward_parts {name: [B*G]}."""
    device = next(model.parameters()).device
    G = cfg.num_generations
    prompts = encode_prompts(processor, studies, device)
    completions, cmask = generate(model, prompts["input_ids"], prompts["attention_mask"],
                                  prompts.get("pixel_values"), prompts.get("image_grid_thw"),
                                  max_new_tokens=cfg.max_new_tokens, num_samples=G,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                                  suppress_token_ids=suppress_token_ids, generator=generator)  # [N, C]
    width = int(cmask.sum(1).max())              # drop columns no row used
    completions, cmask = completions[:, :width], cmask[:, :width]
    truncated = ~torch.isin(completions.gather(1, (cmask.sum(1, keepdim=True) - 1).clamp_min(0)),
                            torch.tensor(list(eos_token_ids), device=device)).squeeze(1)
    texts = processor.batch_decode(completions * cmask + pad_token_id * (1 - cmask))
    rewards, parts = compute_rewards(texts, [s.id for s in studies for _ in range(G)],
                                     [s.report for s in studies for _ in range(G)], labeler,
                                     weights=cfg.reward_weights, margin=cfg.mccs_margin,
                                     mapping=cfg.mccs_mapping, kind=cfg.reward_kind, cache=reward_cache)
    return {"prompts": prompts, "completions": completions, "completion_mask": cmask,
            "truncated": truncated, "texts": texts, "rewards": rewards, "reward_parts": parts}


@torch.no_grad()
def collect_rollout(model, processor, studies: list[Study], labeler, cfg: GRPOConfig,
                    generator: torch.Generator | None, *, ref_model=None, reward_cache: dict | None = None,
                    eos_token_ids=(), pad_token_id: int = 0, suppress_token_ids=()) -> Rollout:
    """Sample G completions per study, score them and precompute the log-probs the loss needs.

    eos_token_ids / pad_token_id / suppress_token_ids: see pipeline.special_ids."""
    G = cfg.num_generations
    scored = sample_and_score(model, processor, studies, labeler, cfg, generator, reward_cache=reward_cache,
                              eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                              suppress_token_ids=suppress_token_ids)
    prompts, completions, cmask = scored["prompts"], scored["completions"], scored["completion_mask"]
    rewards, device, width = scored["rewards"], completions.device, completions.shape[1]
    if cfg.scale_rewards == "batch" and distributed.world_size() > 1:  # the std of every rank's rewards
        batch_std = distributed.gather_rows(rewards.to(device)).float().std().cpu()
        advantages = grpo.group_advantages(rewards, G, scale="none") / (batch_std + 1e-4)  # [N]
    else:
        advantages = grpo.group_advantages(rewards, G, scale=cfg.scale_rewards)    # [N]

    features = shared_image_features(model, prompts, G)
    sequences = join_completions(repeat_prompts(prompts, G, pixels=not features), completions, cmask)
    sequences.update(features, images_per_row=prompts["images_per_prompt"].repeat_interleave(G))
    micro = micro_batch_size(len(rewards), cfg.grad_accum)
    old = _logps(model, sequences, width, cfg.temperature, micro) if cfg.num_iterations > 1 else None
    ref = None
    if cfg.beta != 0:
        with lora.reference_policy(model, ref_model) as ref_net:
            ref = _logps(ref_net, sequences, width, cfg.temperature, micro)
    return Rollout(sequences, cmask, advantages.to(device), rewards, scored["reward_parts"], old, ref,
                   scored["texts"], scored["truncated"])


# ----------------------------------------------------------------------------- update

def grpo_update(model, rollout: Rollout, optimizer, scheduler, cfg: GRPOConfig) -> dict:
    """num_iterations optimizer steps on one rollout, each over grad_accum micro-batches.

    The micro-batch losses use the whole batch's normaliser and are summed, so the gradient is
    the full-batch gradient whatever grad_accum is (see grpo.loss_normalizer).
    """
    mask = rollout.completion_mask.float()
    if cfg.mask_truncated:
        mask = grpo.mask_truncated(mask, rollout.truncated)
    n, width = mask.shape
    # several ranks: the whole (global) batch's normaliser, and the gradients summed over ranks
    normalizer = distributed.global_loss_normalizer(mask, cfg.loss_type,
                                                    cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else None)
    micro = micro_batch_size(n, cfg.grad_accum)
    model.train()
    history = []
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        totals, loss_sum = {}, 0.0
        for s in range(0, n, micro):
            rows = slice(s, s + micro)
            logps = model.token_logps(**select_rows(rollout.sequences, s, s + micro), logits_to_keep=width,
                                      temperature=cfg.temperature)                  # [n_mb, C]
            loss, stats = grpo.policy_loss(
                logps, None if rollout.old_logps is None else rollout.old_logps[rows],
                None if rollout.ref_logps is None else rollout.ref_logps[rows],
                rollout.advantages[rows], mask[rows], eps_low=cfg.epsilon, eps_high=cfg.epsilon_high,
                beta=cfg.beta, loss_type=cfg.loss_type,
                max_len=cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else None, normalizer=normalizer)
            loss.backward()
            loss_sum += float(loss.detach())
            weight = float(mask[rows].sum()) / max(float(mask.sum()), 1.0)  # token-weighted stats
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * weight
        params = [p for p in model.parameters() if p.requires_grad]
        distributed.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        history.append({"loss": distributed.sum_across_ranks(loss_sum), "grad_norm": float(grad_norm), **totals})
    return {k: sum(h[k] for h in history) / len(history) for k in history[0]}


def rollout_stats(rollout: Rollout, cfg: GRPOConfig) -> dict:
    """Per-step metrics under TRL's names."""
    G = cfg.num_generations
    grouped = rollout.rewards.view(-1, G)
    lengths = rollout.completion_mask.sum(1).float()
    stats = {"reward": float(rollout.rewards.mean()),
             "reward_std": float(grouped.std(1).mean()) if G > 1 else 0.0,
             "frac_reward_zero_std": float((grouped.std(1) == 0).float().mean()) if G > 1 else 1.0,
             "completions/mean_length": float(lengths.mean()),
             "completions/clipped_ratio": float(rollout.truncated.float().mean())}
    for name, values in rollout.reward_parts.items():
        stats[f"rewards/{name}/mean"] = float(values.mean())
    return stats


# ----------------------------------------------------------------------------- SFT

def report_start(think: str = SFT_THINK) -> str:
    """What an SFT target says before its report: `<think>think</think><report>`."""
    return f"<think>{think}</think><report>"


def sft_targets(processor, studies: list[Study], eos_token_id: int, think: str = SFT_THINK):
    """Reference reports in the target format, tokenised and right padded: ids, mask [B, C]."""
    texts = [f"{report_start(think)}{s.report}</report>" for s in studies]
    encoded = [processor.encode(t) + [eos_token_id] for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), eos_token_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
    return ids, mask


def sft_step(model, processor, studies: list[Study], optimizer, scheduler, *, eos_token_id: int,
             max_grad_norm: float = 1.0) -> float:
    """One teacher-forced MLE step on the reference reports: the token-level baseline."""
    device = next(model.parameters()).device
    model.train()
    prompts = encode_prompts(processor, studies, device)
    ids, mask = (t.to(device) for t in sft_targets(processor, studies, eos_token_id))
    seqs = join_completions(prompts, ids, mask)
    logps = model.token_logps(seqs["input_ids"], seqs["attention_mask"], seqs.get("pixel_values"),
                              seqs.get("image_grid_thw"), logits_to_keep=ids.shape[1])  # [B, C]
    loss = -(logps * mask).sum() / distributed.global_token_count(mask)  # several ranks: all their tokens
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.sum_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    return distributed.sum_across_ranks(float(loss.detach()))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def generate_reports(model, processor, studies: list[Study], *, batch_size: int = 16,
                     max_new_tokens: int = 256, eos_token_ids=(), pad_token_id: int = 0,
                     suppress_token_ids=(), temperature: float = 0.0, generator=None) -> list[str]:
    """Greedy (by default) completions for every study, in order."""
    device = next(model.parameters()).device
    texts = []
    for s in range(0, len(studies), batch_size):
        prompts = encode_prompts(processor, studies[s:s + batch_size], device)
        out, mask = generate(model, prompts["input_ids"], prompts["attention_mask"],
                             prompts.get("pixel_values"), prompts.get("image_grid_thw"),
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                             suppress_token_ids=suppress_token_ids, generator=generator)
        texts += processor.batch_decode(out * mask + pad_token_id * (1 - mask))
    return texts


def sampled_rewards(model, processor, studies: list[Study], labeler, cfg: GRPOConfig,
                    generator: torch.Generator | None, *, batch_size: int = 8, **special) -> dict:
    """The rewards of G sampled completions per study, drawn and scored as a rollout draws and
    scores them, without any update: GRPO's own objective, measured on held-out studies.

    special: eos_token_ids / pad_token_id / suppress_token_ids (pipeline.special_ids).
    Returns {"reward": [len(studies) * G], cfg.reward_kind: [...], "format": [...]}."""
    parts = []
    for s in range(0, len(studies), batch_size):
        scored = sample_and_score(model, processor, studies[s:s + batch_size], labeler, cfg, generator,
                                  **special)
        parts.append({"reward": scored["rewards"], **scored["reward_parts"]})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def ce_of_texts(texts: list[str], studies: list[Study], labeler) -> dict:
    """Clinical efficacy of generated completions against the studies' reference reports."""
    pred = labeler.label([extract_report(t) for t in texts])
    ref = labeler.label([s.report for s in studies])
    return ce_scores(pred, ref)
