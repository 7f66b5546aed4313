"""One GRPO step (`grpo_step`), one SFT step, and the CE evaluation: what train_grpo.py strings together.

A GRPO step for B studies (MRG-R1, arXiv 2512.16145; GRPO from DeepSeekMath, arXiv 2402.03300),
`grpo_step` line for line:

    1 prompts      studies --chat template + views--> input_ids [B, P], pixel_values
    2 rollout      --generate (G samples each, KV cache)--> completions [B*G, C]
    3 reward       --decode, extract <report>, label--> R [B*G] = 0.75 MCCS + 0.25 format
    4 advantages   --group_advantages--> A [B*G]
    5 log-probs    --token_logps: reference (adapters off)--> [B*G, C]; pi_old = the first update's
    6 update       --policy_loss over micro-batches, backward, (ranks: sum), clip, AdamW

Sequences for the update are `[left-padded prompt | completion, right-padded]` (a `Rollout`), so
the completion is always the last C columns and `model.token_logps(..., logits_to_keep=C)`
scores it. The same layout serves the SFT warm start, whose "completion" is the reference report
in the target format.

Example:
    special = pipeline.special_ids(processor)       # EOS ids (without them nothing stops), pad, suppressed
    stats, rollout = grpo_step(model, processor, studies, labeler, optimizer, scheduler,
                               GRPOConfig(), torch.Generator().manual_seed(0), **special)
    stats["reward"], stats["kl"], rollout.texts[0], rollout.advantages   # [B*G]
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
    grad_accum: int = 1               # micro-batches per optimizer step (memory, not maths; bnpo aside)
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


class PromptCache:
    """Each study's encoded prompt (token ids, image patches, grids), kept after its first use.

    The chat template, the tokenizer and the image decoding and resizing give the same result
    every time a study comes back (the demo's SFT sees each training study ~27 times), so a study
    is encoded once. Patches are float32: a 448 px view takes ~4.8 MB, so the cache stops taking
    studies at `max_bytes` and encodes the rest afresh (slower, never different). One cache per
    processor: its image resolution is part of what is kept."""

    def __init__(self, max_bytes: int = 2 * 2**30):
        self.max_bytes, self.bytes, self.samples = max_bytes, 0, {}

    def sample(self, processor, study: Study) -> dict:
        key = (study.id, tuple(study.image_paths))
        if key not in self.samples:
            sample = processor.encode_sample(study_messages(study), load_images(study))
            size = sum(p.nbytes for p in sample["patches"])
            if self.bytes + size > self.max_bytes:
                return sample
            self.samples[key], self.bytes = sample, self.bytes + size
        return self.samples[key]


def encode_prompts(processor, studies: list[Study], device=None, cache: PromptCache | None = None) -> dict:
    """Left-padded prompts of B studies: input_ids, attention_mask [B, P], pixel_values,
    image_grid_thw, and images_per_prompt [B] (to find each prompt's images again)."""
    samples = [cache.sample(processor, s) if cache is not None
               else processor.encode_sample(study_messages(s), load_images(s)) for s in studies]
    batch = processor.collate(samples)
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


# ----------------------------------------------------------------------------- the rollout

@dataclass
class Rollout:
    """B studies x G completions: what one GRPO step sampled, scored and trains on.

    Row i is completion i % G of study i // G (generate's order); N = B * G rows. The update's
    inputs are the rows `[left-padded prompt | completion, right padded]`, so every completion is
    the last C columns and `model.token_logps(**rollout.rows(a, b), logits_to_keep=C)` scores it.
    """
    input_ids: torch.Tensor                 # [N, P+C]
    attention_mask: torch.Tensor            # [N, P+C] 0 on left padding and after EOS
    completion_mask: torch.Tensor           # [N, C] 1 on completion tokens, EOS included
    image_grid_thw: torch.Tensor | None     # [n_images, 3] (t, h, w) patches, images in row order
    images_per_row: torch.Tensor | None     # [N] views of row i's study
    pixel_values: torch.Tensor | None       # [n_patches, D_patch]: when the vision tower trains
    image_features: torch.Tensor | None     # [n_image_tokens, D]: frozen tower, encoded once per study
    image_tokens_per_row: torch.Tensor | None  # [N] image tokens of row i (with image_features)
    texts: list[str]                        # [N] decoded completions
    truncated: torch.Tensor                 # [N] bool: hit max_new_tokens without EOS
    rewards: torch.Tensor                   # [N] R_i = w * clinical + w_f * format
    reward_parts: dict                      # name ("mccs" | "ce_f1" | "bleu", "format") -> [N]
    advantages: torch.Tensor                # [N] A_i
    labels: torch.Tensor | None = None      # [N, 14] CheXbert codes of each generated report
    ref_labels: torch.Tensor | None = None  # [N, 14] codes of each row's reference report
    ccs: torch.Tensor | None = None         # [N] CCS before the margin (reward kind "mccs")
    old_logps: torch.Tensor | None = None   # [N, C] pi_old: the first update's log-probs (step 6)
    ref_logps: torch.Tensor | None = None   # [N, C] pi_ref (adapters off); None when beta == 0

    def rows(self, start: int, stop: int) -> dict:
        """Model inputs (input_ids, attention_mask and the images) of rows [start, stop)."""
        out = {"input_ids": self.input_ids[start:stop], "attention_mask": self.attention_mask[start:stop],
               "pixel_values": None, "image_grid_thw": None}
        if self.image_grid_thw is None:
            return out
        first, last = int(self.images_per_row[:start].sum()), int(self.images_per_row[:stop].sum())
        out["image_grid_thw"] = self.image_grid_thw[first:last]
        if self.image_features is not None:
            tokens = self.image_tokens_per_row
            out["image_features"] = self.image_features[int(tokens[:start].sum()):int(tokens[:stop].sum())]
        else:
            patches = self.image_grid_thw.prod(-1)
            out["pixel_values"] = self.pixel_values[int(patches[:first].sum()):int(patches[:last].sum())]
        return out


def sample_completions(model, prompts: dict, cfg: GRPOConfig, generator, *, eos_token_ids=(),
                       pad_token_id: int = 0, suppress_token_ids=()):
    """G sampled completions per prompt -> completions, completion_mask [B*G, C], truncated [B*G].

    Columns that no row used are dropped (C <= max_new_tokens); truncated: no EOS within budget."""
    with torch.no_grad():
        completions, cmask = generate(model, prompts["input_ids"], prompts["attention_mask"],
                                      prompts.get("pixel_values"), prompts.get("image_grid_thw"),
                                      max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_generations,
                                      temperature=cfg.temperature, top_p=cfg.top_p,
                                      eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                                      suppress_token_ids=suppress_token_ids, generator=generator)
    width = max(int(cmask.sum(1).max()), 1)
    completions, cmask = completions[:, :width], cmask[:, :width]                   # [N, C]
    last = completions.gather(1, (cmask.sum(1, keepdim=True) - 1).clamp_min(0))     # [N, 1]
    truncated = ~torch.isin(last, torch.tensor(list(eos_token_ids), device=last.device)).squeeze(1)
    return completions, cmask, truncated


def decode_completions(processor, completions: torch.Tensor, completion_mask: torch.Tensor,
                       pad_token_id: int = 0) -> list[str]:
    """Token ids [N, C] -> N texts (EOS and padding dropped)."""
    return processor.batch_decode(completions * completion_mask + pad_token_id * (1 - completion_mask))


def score_completions(texts: list[str], studies: list[Study], labeler, cfg: GRPOConfig,
                      reward_cache: dict | None = None):
    """Rewards of N = B * G completions (G per study, in order) -> (R [N], parts, details).

    details holds what the reward saw: "labels" / "ref_labels" [N, 14] and "ccs" [N] (MCCS)."""
    G, details = len(texts) // max(len(studies), 1), {}
    rewards, parts = compute_rewards(texts, [s.id for s in studies for _ in range(G)],
                                     [s.report for s in studies for _ in range(G)], labeler,
                                     weights=cfg.reward_weights, margin=cfg.mccs_margin,
                                     mapping=cfg.mccs_mapping, kind=cfg.reward_kind, cache=reward_cache,
                                     details=details)
    return rewards, parts, details


def update_inputs(model, prompts: dict, completions: torch.Tensor, completion_mask: torch.Tensor,
                  num_repeats: int) -> dict:
    """The Rollout's model inputs: each prompt repeated G times, joined to its completions.

    With a frozen vision tower (LoRA on the decoder) each study's views are encoded once here and
    its G rows share the features, instead of running the tower B*G times in every forward."""
    G = num_repeats
    frozen = not any(p.requires_grad for p in model.model.visual.parameters())
    features = {"image_features": None, "image_tokens_per_row": None}
    if frozen and prompts.get("pixel_values") is not None:
        with torch.no_grad():
            feats = model.image_features(prompts["pixel_values"], prompts["image_grid_thw"])  # [tokens, D]
        per_prompt = (prompts["input_ids"] == model.cfg.image_token_id).sum(1)                # [B]
        blocks = feats.split(per_prompt.tolist())
        features = {"image_features": torch.cat([b for b in blocks for _ in range(G)]),
                    "image_tokens_per_row": per_prompt.repeat_interleave(G).cpu()}
    rows = repeat_prompts(prompts, G, pixels=features["image_features"] is None)
    has_images = rows["image_grid_thw"] is not None
    return {"input_ids": torch.cat([rows["input_ids"], completions], 1),                    # [N, P+C]
            "attention_mask": torch.cat([rows["attention_mask"], completion_mask], 1),     # [N, P+C]
            "completion_mask": completion_mask, "image_grid_thw": rows["image_grid_thw"],
            "images_per_row": prompts["images_per_prompt"].repeat_interleave(G) if has_images else None,
            "pixel_values": rows["pixel_values"], **features}


def micro_batches(n: int, grad_accum: int) -> list[slice]:
    """Rows 0..n-1 in `grad_accum` contiguous micro-batches whose sizes differ by at most one.
    >>> micro_batches(12, 5)  # 5 micro-batches of 2, 2, 3, 2, 3 rows
    [slice(0, 2), slice(2, 4), slice(4, 7), slice(7, 9), slice(9, 12)]
    """
    bounds = [n * i // grad_accum for i in range(grad_accum + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def rollout_logps(model, rollout: Rollout, parts: list[slice], temperature: float) -> torch.Tensor:
    """log pi(o_t) of every completion token under `model`, without grad -> [N, C]."""
    width = rollout.completion_mask.shape[1]
    with torch.no_grad():
        return torch.cat([model.token_logps(**rollout.rows(r.start, r.stop), logits_to_keep=width,
                                            temperature=temperature) for r in parts])


def _rows(t: torch.Tensor | None, rows: slice):
    return None if t is None else t[rows]


# ----------------------------------------------------------------------------- one GRPO step

def grpo_step(model, processor, studies: list[Study], labeler, optimizer, scheduler, cfg: GRPOConfig,
              generator: torch.Generator | None, *, ref_model=None, reward_cache: dict | None = None,
              prompt_cache: PromptCache | None = None, eos_token_ids=(), pad_token_id: int = 0,
              suppress_token_ids=()) -> tuple[dict, Rollout]:
    """One GRPO step on B studies, the README's step diagram line for line -> (stats, rollout).

    stats: the step's metrics under TRL's names (reward, kl, clip_ratio/*, loss, ...), floats.
    Several ranks (torchrun): each rank passes its own studies; the lines marked `ranks:` make
    the update equal to one process's update on the whole batch (see distributed.py).
    """
    G, special = cfg.num_generations, dict(eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    model.eval()  # no dropout while sampling and while computing the reference log-probs

    # ---- 1. prompts: system turn, the study's views, the instruction; left padded     [B, P]
    prompts = encode_prompts(processor, studies, device, prompt_cache)

    # ---- 2. rollout: G samples per study (KV cache; the prompt is encoded once)      [B*G, C]
    completions, cmask, truncated = sample_completions(model, prompts, cfg, generator, **special,
                                                       suppress_token_ids=suppress_token_ids)

    # ---- 3. reward: decode, extract <report>, label, R = 0.75 MCCS + 0.25 format     [B*G]
    texts = decode_completions(processor, completions, cmask, pad_token_id)
    rewards, parts, details = score_completions(texts, studies, labeler, cfg, reward_cache)

    # ---- 4. group-relative advantages A_i = (R_i - mean_g R) / (std_g R + eps)        [B*G]
    batch_std = None
    if cfg.scale_rewards == "batch":  # ranks: the std of every rank's rewards
        batch_std = float(distributed.gather_rows(rewards.to(device)).float().std())
    advantages = grpo.group_advantages(rewards, G, scale=cfg.scale_rewards, batch_std=batch_std)
    rollout = Rollout(**update_inputs(model, prompts, completions, cmask, G), texts=texts,
                      truncated=truncated, rewards=rewards, reward_parts=parts,
                      advantages=advantages.to(device), **details)

    # ---- 5. the reference's log-probs (beta != 0: adapters off)                       [B*G, C]
    #         (pi_old needs no pass of its own: it is the first update's log-probs, step 6)
    parts_of_batch = micro_batches(len(rewards), cfg.grad_accum)
    if cfg.beta != 0:
        with lora.reference_policy(model, ref_model) as ref_net:
            rollout.ref_logps = rollout_logps(ref_net, rollout, parts_of_batch, cfg.temperature)

    # ---- 6. mu updates: loss over micro-batches, backward; ranks: sum gradients; clip; AdamW
    mask = rollout.completion_mask.float()                                          # [B*G, C]
    if cfg.mask_truncated:
        mask = grpo.mask_truncated(mask, truncated.to(device))
    # ranks: the whole batch's normaliser, so the micro-batch (and rank) losses sum to its loss
    normalizer = distributed.sum_across_ranks(grpo.loss_normalizer(mask, cfg.loss_type, cfg.max_new_tokens))
    num_parts = len(parts_of_batch) * distributed.world_size()                      # bnpo: per micro-batch
    params = [p for p in model.parameters() if p.requires_grad]
    lora.train_without_dropout(model)  # dropout off, as when sampling: the first pass gives pi_old
    history, old_logps = [], []
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        update = {"loss": 0.0}
        for part, rows in enumerate(parts_of_batch):
            logps = model.token_logps(**rollout.rows(rows.start, rows.stop), logits_to_keep=mask.shape[1],
                                      temperature=cfg.temperature)                  # [n, C], with grad
            if iteration == 0:  # no optimizer step yet: these are pi_old (so r = 1 in this update)
                old_logps.append(logps.detach())
            loss, stats = grpo.policy_loss(
                logps, old_logps[part], _rows(rollout.ref_logps, rows),
                rollout.advantages[rows], mask[rows], eps_low=cfg.epsilon, eps_high=cfg.epsilon_high,
                beta=cfg.beta, loss_type=cfg.loss_type, max_len=cfg.max_new_tokens,
                normalizer=grpo.part_normalizer(cfg.loss_type, normalizer, mask[rows], num_parts))
            loss.backward()
            update["loss"] += float(loss.detach())
            share = float(mask[rows].sum()) / max(float(mask.sum()), 1.0)  # token-weighted mean
            for k, v in stats.items():
                update[k] = update.get(k, 0.0) + v * share
        distributed.sum_gradients(params)                                           # ranks
        update["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        update["loss"] = distributed.sum_across_ranks(update["loss"])               # ranks
        history.append(update)
    rollout.old_logps = torch.cat(old_logps)
    means = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    return {**rollout_stats(rollout, G), **means}, rollout


def rollout_stats(rollout: Rollout, group_size: int) -> dict:
    """What the rollout looked like, under TRL's metric names."""
    grouped = rollout.rewards.view(-1, group_size)                                  # [B, G]
    stats = {"reward": float(rollout.rewards.mean()),
             "reward_std": float(grouped.std(1).mean()),
             "frac_reward_zero_std": float((grouped.std(1) == 0).float().mean()),
             "completions/mean_length": float(rollout.completion_mask.sum(1).float().mean()),
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
             max_grad_norm: float = 1.0, prompt_cache: PromptCache | None = None) -> float:
    """One teacher-forced MLE step on the reference reports: the token-level baseline."""
    device = next(model.parameters()).device
    model.train()
    prompts = encode_prompts(processor, studies, device, prompt_cache)
    ids, mask = (t.to(device) for t in sft_targets(processor, studies, eos_token_id))
    seqs = join_completions(prompts, ids, mask)
    logps = model.token_logps(seqs["input_ids"], seqs["attention_mask"], seqs.get("pixel_values"),
                              seqs.get("image_grid_thw"), logits_to_keep=ids.shape[1])  # [B, C]
    tokens = distributed.sum_across_ranks(float(mask.sum()))  # ranks: every rank's target tokens
    loss = -(logps * mask).sum() / tokens
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
                     suppress_token_ids=(), temperature: float = 0.0, top_p: float = 1.0, generator=None,
                     prompt_cache: PromptCache | None = None) -> list[str]:
    """Greedy (by default) completions for every study, in order; temperature > 0 samples
    (with top_p < 1: from the nucleus)."""
    device = next(model.parameters()).device
    texts = []
    for s in range(0, len(studies), batch_size):
        prompts = encode_prompts(processor, studies[s:s + batch_size], device, prompt_cache)
        out, mask = generate(model, prompts["input_ids"], prompts["attention_mask"],
                             prompts.get("pixel_values"), prompts.get("image_grid_thw"),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                             suppress_token_ids=suppress_token_ids, generator=generator)
        texts += decode_completions(processor, out, mask, pad_token_id)
    return texts


def sampled_rewards(model, processor, studies: list[Study], labeler, cfg: GRPOConfig,
                    generator: torch.Generator | None, *, batch_size: int = 8, eos_token_ids=(),
                    pad_token_id: int = 0, suppress_token_ids=(), prompt_cache: PromptCache | None = None) -> dict:
    """The rewards of G sampled completions per study, drawn and scored as grpo_step draws and
    scores them, without any update: GRPO's own objective, measured on held-out studies.

    Returns {"reward": [len(studies) * G], cfg.reward_kind: [...], "format": [...]}."""
    device = next(model.parameters()).device
    parts = []
    for s in range(0, len(studies), batch_size):
        batch = studies[s:s + batch_size]
        prompts = encode_prompts(processor, batch, device, prompt_cache)
        completions, cmask, _ = sample_completions(model, prompts, cfg, generator, eos_token_ids=eos_token_ids,
                                                   pad_token_id=pad_token_id, suppress_token_ids=suppress_token_ids)
        texts = decode_completions(processor, completions, cmask, pad_token_id)
        rewards, reward_parts, _ = score_completions(texts, batch, labeler, cfg)
        parts.append({"reward": rewards, **reward_parts})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


def ce_of_texts(texts: list[str], studies: list[Study], labeler) -> dict:
    """Clinical efficacy of generated completions against the studies' reference reports."""
    pred = labeler.label([extract_report(t) for t in texts])
    ref = labeler.label([s.report for s in studies])
    return ce_scores(pred, ref)
