"""One GRPO step (`grpo_step`) and the `Rollout` it trains on; helpers in the order the step calls them.

A GRPO step for B studies and G completions each (MRG-R1, arXiv 2512.16145; GRPO from
DeepSeekMath, arXiv 2402.03300), `grpo_step` line for line:

    1 prompts      studies --chat template + views--> input_ids [B, P], pixel_values   (prompts.py)
    2 rollout      --generate: G samples each, KV cache--> completions [B*G, C]          (generate.py)
    3 reward       --decode, extract <report>, label--> R [B*G] = 0.75 MCCS + 0.25 format (rewards.py)
    4 advantages   --group_advantages--> A [B*G]                                         (grpo.py)
       rollout     the vision tower encodes each study's views once here, for every later pass
                   (reference, mu updates) of its G rows (`encode_views`)
    5 reference    --log-probs with the adapters off--> pi_ref [B*G, C]                  (lora.py)
                   (`completion_logps`: each study's prompt through the decoder once for its G
                   completions, shared_prompt.py; exact, as the rows [prompt | completion])
    6 update       mu times: log-probs (the first pass is pi_old), `policy_loss` per micro-batch,
                   backward; sum the gradients over ranks; clip; AdamW                   (grpo.py)

Each phase ends with `timer.lap(phase)`: its wall seconds go to the step's metrics as
`timing/<phase>` (prompts, rollout, reward, inputs = step 4, reference, update), with the rollout's
and the update's tokens per second (mrgr1/timing.py).

Names used throughout: G completions per study (`RunConfig.num_generations`; generate's
`num_samples`, group_advantages' `group_size`); N = B * G rows; C completion columns;
`completion_mask` [N, C] is 1 on completion tokens (EOS included), `loss_mask` is the float mask
the loss uses (completion_mask, less truncated rows with --mask-truncated); `slices` are the
micro-batches of rows (--grad-accum); `reward_terms` are the reward's parts (content, format).

Example:
    special = pipeline.special_ids(processor)   # EOS ids (without them nothing stops), pad, suppressed
    encoder = PromptEncoder(processor, cfg.system_prompt, cfg.instruction)
    stats, rollout = grpo_step(model, processor, encoder, studies, labeler, optimizer, scheduler, cfg,
                               torch.Generator().manual_seed(0), **special)
    stats["reward"], stats["kl"], rollout.texts[0], rollout.advantages   # [B*G]
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import distributed, dynamic_sampling, grpo, lora, shared_prompt
from .data import Study
from .generate import generate
from .rewards import compute_rewards
from .run_config import RunConfig
from .timing import PhaseTimer


@dataclass
class Rollout:
    """B studies x G completions: what one GRPO step sampled, scored and trains on.

    Row i is completion i % G of study i // G (generate's order). `prompts` holds each study's
    prompt once; a forward takes the rows it scores as `inputs(rows)` (each prompt repeated for its
    rows: `[left-padded prompt | completion, right padded]`, scored by `model.token_logps(...,
    logits_to_keep=C)`) or as `prompts_of(rows)` (each prompt once, for shared_prompt.py).
    """
    prompts: dict                           # the B prompts as encoded (prompts.py): input_ids,
                                            # attention_mask [B, P], images_per_prompt [B], image_grid_thw
                                            # [n_images, 3], and pixel_values [n_patches, D_patch] (the
                                            # tower trains) or image_features [n_image_tokens, D] with
                                            # image_tokens_per_prompt [B] (frozen tower, encoded once)
    completions: torch.Tensor               # [N, C] sampled token ids, right padded
    completion_mask: torch.Tensor           # [N, C] 1 on completion tokens, EOS included
    group_size: int                         # G
    texts: list[str]                        # [N] decoded completions
    truncated: torch.Tensor                 # [N] bool: hit max_new_tokens without EOS
    rewards: torch.Tensor                   # [N] R_i = w * content + w_f * format
    reward_terms: dict                      # name ("mccs" | "ce_f1" | "bleu", "format") -> [N]
    advantages: torch.Tensor                # [N] A_i
    labels: torch.Tensor | None = None      # [N, 14] CheXbert codes of each generated report
    ref_labels: torch.Tensor | None = None  # [N, 14] codes of each row's reference report
    ccs: torch.Tensor | None = None         # [N] CCS before the margin (reward "mccs")
    old_logps: torch.Tensor | None = None   # [N, C] pi_old: the first update's log-probs (step 6)
    ref_logps: torch.Tensor | None = None   # [N, C] pi_ref (adapters off); None when beta == 0
    studies: list[Study] | None = None      # [B] the studies of the rows (differ from grpo_step's with --dynamic-sampling)

    def prompts_of(self, rows: slice) -> tuple[dict, torch.Tensor]:
        """The prompts of the studies that a contiguous slice of rows belongs to, each once (model
        inputs), and index [n]: row -> its study among them. Rows may start and end inside a group."""
        G, p = self.group_size, self.prompts
        first, last = rows.start // G, (rows.stop - 1) // G + 1
        index = torch.arange(rows.start, rows.stop, device=self.completions.device) // G - first    # [n]
        out = {"input_ids": p["input_ids"][first:last], "attention_mask": p["attention_mask"][first:last],
               "pixel_values": None, "image_grid_thw": None, "image_features": None}
        if p.get("image_grid_thw") is None:
            return out, index
        images = span(p["images_per_prompt"], first, last)
        out["image_grid_thw"] = p["image_grid_thw"][images]
        if p.get("image_features") is not None:
            out["image_features"] = p["image_features"][span(p["image_tokens_per_prompt"], first, last)]
        else:
            out["pixel_values"] = p["pixel_values"][span(p["image_grid_thw"].prod(-1), images.start, images.stop)]
        return out, index

    def row_tokens(self) -> float:
        """Tokens of the N rows [prompt | completion]: what one pass over the rollout scores."""
        return float(self.prompts["attention_mask"].sum()) * self.group_size + float(self.completion_mask.sum())

    def inputs(self, rows: slice) -> dict:
        """Model inputs of a contiguous slice of rows: each row's prompt (and views) repeated, joined to
        its completion -> input_ids, attention_mask [n, P+C] and the images, in row order."""
        study, index = self.prompts_of(rows)
        out = {"input_ids": torch.cat([study["input_ids"][index], self.completions[rows]], 1),
               "attention_mask": torch.cat([study["attention_mask"][index], self.completion_mask[rows]], 1),
               "pixel_values": None, "image_grid_thw": None}
        if study["image_grid_thw"] is None:
            return out
        rows_of = torch.bincount(index).tolist()                              # rows of each study here
        first = rows.start // self.group_size
        views = self.prompts["images_per_prompt"][first:first + len(rows_of)].tolist()
        grids = study["image_grid_thw"].split(views)                          # each study's views
        out["image_grid_thw"] = torch.cat([g for g, n in zip(grids, rows_of) for _ in range(n)])
        if study["image_features"] is not None:
            tokens = self.prompts["image_tokens_per_prompt"][first:first + len(rows_of)].tolist()
            blocks = study["image_features"].split(tokens)
            out["image_features"] = torch.cat([f for f, n in zip(blocks, rows_of) for _ in range(n)])
        else:
            blocks = study["pixel_values"].split([int(g.prod(-1).sum()) for g in grids])
            out["pixel_values"] = torch.cat([b for b, n in zip(blocks, rows_of) for _ in range(n)])
        return out


def span(counts: torch.Tensor, first: int, last: int) -> slice:
    """Where items first .. last-1 sit when item i holds counts[i] consecutive entries."""
    return slice(int(counts[:first].sum()), int(counts[:last].sum()))


# ----------------------------------------------------------------------------- 1-3. prompts, rollout, reward

@dataclass
class Sampled:
    """What phases 1-3 made of some studies (one round of `roll_out`): n studies x G completions,
    scored. Row i is completion i % G of studies[i // G]."""
    studies: list[Study]
    prompts: dict | None                    # the encoder's batch, [n, P]; None: to be encoded again
    completions: torch.Tensor               # [n*G, C]
    completion_mask: torch.Tensor           # [n*G, C]
    truncated: torch.Tensor                 # [n*G] bool
    texts: list[str]                        # [n*G]
    rewards: torch.Tensor                   # [n*G]
    reward_terms: dict                      # name -> [n*G]
    details: dict                           # what the reward saw: "labels", "ref_labels" [n*G, 14], "ccs" [n*G]


def roll_out(model, processor, encoder, studies: list[Study], labeler, cfg: RunConfig, generator, timer: PhaseTimer,
             *, reward_cache: dict | None = None, eos_token_ids=(), pad_token_id: int = 0,
             suppress_token_ids=()) -> Sampled:
    """Lines 1-3 of the diagram for some studies: their prompts, G completions each, the rewards."""
    device = next(model.parameters()).device

    # ---- 1. prompts: system turn, the study's views, the instruction; left padded        [B, P]
    prompts = encoder(studies, device)
    timer.lap("prompts")

    # ---- 2. rollout: G samples per study (KV cache; the prompt is encoded once)         [B*G, C]
    completions, completion_mask, truncated = sample_completions(
        model, prompts, cfg, generator, cfg.num_generations, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
        suppress_token_ids=suppress_token_ids)
    timer.lap("rollout")

    # ---- 3. reward: decode, extract <report>, label, R = 0.75 MCCS + 0.25 format        [B*G]
    texts = decode_completions(processor, completions, completion_mask, pad_token_id)
    rewards, reward_terms, details = score_completions(texts, studies, labeler, cfg, reward_cache)
    timer.lap("reward")
    return Sampled(studies, prompts, completions, completion_mask, truncated, texts, rewards, reward_terms, details)


# ----------------------------------------------------------------------------- 2. rollout

def sample_completions(model, prompts: dict, cfg: RunConfig, generator, num_samples: int, *,
                       eos_token_ids=(), pad_token_id: int = 0, suppress_token_ids=()):
    """num_samples completions per prompt, sampled at the run's temperature and top-p with its
    decode step (--decode) -> completions, completion_mask [B*G, C], truncated [B*G].

    Columns that no row used are dropped (C <= max_new_tokens); truncated: no EOS within budget."""
    with torch.no_grad():
        completions, completion_mask = generate(
            model, prompts["input_ids"], prompts["attention_mask"], prompts.get("pixel_values"),
            prompts.get("image_grid_thw"), max_new_tokens=cfg.max_new_tokens, num_samples=num_samples,
            temperature=cfg.temperature, top_p=cfg.top_p, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id, suppress_token_ids=suppress_token_ids, generator=generator,
            decode=cfg.decode)
    width = max(int(completion_mask.sum(1).max()), 1)
    completions, completion_mask = completions[:, :width], completion_mask[:, :width]        # [N, C]
    last = completions.gather(1, (completion_mask.sum(1, keepdim=True) - 1).clamp_min(0))   # [N, 1]
    truncated = ~torch.isin(last, torch.tensor(list(eos_token_ids), device=last.device)).squeeze(1)
    return completions, completion_mask, truncated


# ----------------------------------------------------------------------------- 3. reward

def decode_completions(processor, completions: torch.Tensor, completion_mask: torch.Tensor,
                       pad_token_id: int = 0) -> list[str]:
    """Token ids [N, C] -> N texts (EOS and padding dropped)."""
    return processor.batch_decode(completions * completion_mask + pad_token_id * (1 - completion_mask))


def score_completions(texts: list[str], studies: list[Study], labeler, cfg: RunConfig,
                      reward_cache: dict | None = None):
    """Rewards of N = B * G completions (G per study, in order) -> (R [N], reward_terms, details).

    details holds what the reward saw: "labels" / "ref_labels" [N, 14] and "ccs" [N] (MCCS)."""
    G, details = len(texts) // max(len(studies), 1), {}
    rewards, reward_terms = compute_rewards(
        texts, [s.report for s in studies for _ in range(G)], labeler, weights=cfg.reward_weight_map,
        margin=cfg.mccs_margin, mapping=cfg.mccs_mapping, kind=cfg.reward, cache=reward_cache, details=details)
    return rewards, reward_terms, details


# ----------------------------------------------------------------------------- 4. the update's inputs

def encode_views(model, prompts: dict) -> dict:
    """The prompts as the Rollout keeps them: with a frozen vision tower (LoRA on the decoder) each
    study's views are encoded once here, and every later forward (reference, mu updates) takes
    these features instead of running the tower again for each of the study's G rows. A tower that
    trains keeps the pixels (it must run with grad)."""
    frozen = not any(p.requires_grad for p in model.model.visual.parameters())
    if prompts.get("pixel_values") is None or not frozen:
        return dict(prompts)
    with torch.no_grad():
        features = model.image_features(prompts["pixel_values"], prompts["image_grid_thw"])    # [tokens, D]
    tokens = (prompts["input_ids"] == model.cfg.image_token_id).sum(1).cpu()                      # [B]
    return {**prompts, "pixel_values": None, "image_features": features, "image_tokens_per_prompt": tokens}


def micro_batches(n: int, grad_accum: int) -> list[slice]:
    """Rows 0..n-1 in `grad_accum` contiguous micro-batches whose sizes differ by at most one.
    >>> micro_batches(12, 5)  # 5 micro-batches of 2, 2, 3, 2, 3 rows
    [slice(0, 2), slice(2, 4), slice(4, 7), slice(7, 9), slice(9, 12)]
    """
    bounds = [n * i // grad_accum for i in range(grad_accum + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# ----------------------------------------------------------------------------- 5. reference

def completion_logps(model, rollout: Rollout, rows: slice, temperature: float, shared: bool) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of the completions of a slice of rows, at the sampling temperature -> [n, C].
    shared: each study's prompt runs through the decoder once for its rows (shared_prompt.py, exact);
    else every row is the whole [prompt | completion]."""
    if not shared:
        return model.token_logps(**rollout.inputs(rows), logits_to_keep=rollout.completions.shape[1],
                                 temperature=temperature)
    study, index = rollout.prompts_of(rows)
    return shared_prompt.completion_logps(
        model, study["input_ids"], study["attention_mask"], rollout.completions[rows], rollout.completion_mask[rows],
        index, study["pixel_values"], study["image_grid_thw"], image_features=study["image_features"],
        temperature=temperature)


def rollout_logps(model, rollout: Rollout, slices: list[slice], temperature: float, shared: bool) -> torch.Tensor:
    """log pi(o_t) of every completion token under `model`, without grad -> [N, C]."""
    with torch.no_grad():
        return torch.cat([completion_logps(model, rollout, rows, temperature, shared) for rows in slices])


# ----------------------------------------------------------------------------- one GRPO step

def grpo_step(model, processor, encoder, studies: list[Study], labeler, optimizer, scheduler, cfg: RunConfig,
              generator: torch.Generator | None, *, ref_model=None, reward_cache: dict | None = None,
              eos_token_ids=(), pad_token_id: int = 0, suppress_token_ids=(),
              more_studies: Callable[[], list[Study]] | None = None) -> tuple[dict, Rollout]:
    """One GRPO step on B studies, the module docstring's diagram line for line -> (stats, rollout).

    encoder: a prompts.PromptEncoder (the run's wording, cached encodings). stats: the step's
    metrics under TRL's names (reward, kl, clip_ratio/*, loss, ...), floats. Several ranks
    (torchrun): each rank passes its own studies; the two calls marked `ranks:` in step 6 (and
    the batch std of step 4) make the update equal to one process's update on the whole batch.
    more_studies: with --dynamic-sampling, draws the next B studies of the training stream (this
    rank's part) for an extra round; the rollout then holds the groups kept (`rollout.studies`).
    """
    G = cfg.num_generations
    device = next(model.parameters()).device
    model.eval()  # no dropout while sampling and while computing the reference log-probs
    timer = PhaseTimer(device)  # timer.lap(phase) ends each phase: the step's `timing/` metrics

    # ---- 1-3. prompts, rollout (G samples per study), reward: `roll_out`               [B*G]
    roll = partial(roll_out, model, processor, encoder, labeler=labeler, cfg=cfg, generator=generator, timer=timer,
                   reward_cache=reward_cache, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                   suppress_token_ids=suppress_token_ids)
    sampled = everything = roll(studies)        # everything: all groups sampled, for the logged stats
    dynamic, informative = {}, True
    if cfg.dynamic_sampling:  # DAPO: only the groups whose rewards differ; more rounds until B of them
        kept, everything, dynamic = dynamic_sampling.keep_informative(
            sampled, more_studies and (lambda: roll(more_studies())), G, cfg.dynamic_sampling_rounds, pad_token_id)
        informative = kept is not None
        if informative and kept.prompts is None:  # groups of several rounds: their prompts padded together
            kept.prompts = encoder(kept.studies, device)
            timer.lap("prompts")
        sampled = kept if informative else sampled  # none informative: the first round, no update (below)
    rewards = sampled.rewards

    # ---- 4. group-relative advantages A_i = (R_i - mean_g R) / (std_g R + eps)           [B*G]
    batch_std = None
    if cfg.scale_rewards == "batch":  # ranks: the std of every rank's rewards
        batch_std = float(distributed.gather_rows(rewards.to(device)).float().std())
    advantages = grpo.group_advantages(rewards, G, scale=cfg.scale_rewards, batch_std=batch_std)
    rollout = Rollout(encode_views(model, sampled.prompts), sampled.completions, sampled.completion_mask, G,
                      texts=sampled.texts, truncated=sampled.truncated, rewards=rewards,
                      reward_terms=sampled.reward_terms, advantages=advantages.to(device), studies=sampled.studies,
                      **sampled.details)
    timer.lap("inputs")
    if not informative:  # --dynamic-sampling: no group's rewards differ, nothing to learn this step
        skip_update(scheduler, cfg.num_iterations)
        return {**rollout_stats(everything, G), **dynamic,
                **timer.stats(float(everything.completion_mask.sum()), 0.0)}, rollout

    # ---- 5. the reference's log-probs (beta != 0: adapters off)                          [B*G, C]
    #         (pi_old needs no pass of its own: it is the first update's log-probs, step 6)
    slices = micro_batches(len(rewards), cfg.grad_accum)
    if cfg.beta != 0:
        with lora.reference_policy(model, ref_model) as ref_net:
            rollout.ref_logps = rollout_logps(ref_net, rollout, slices, cfg.temperature, cfg.shared_prompt)
    timer.lap("reference")

    # ---- 6. mu updates: policy_loss over micro-batches, backward; sum gradients; clip; AdamW
    loss_mask = rollout.completion_mask.float()                                        # [B*G, C]
    if cfg.mask_truncated:
        loss_mask = grpo.mask_truncated(loss_mask, rollout.truncated.to(device))
    normalizers = grpo.micro_batch_normalizers(  # ranks: the whole batch's denominator
        loss_mask, slices, cfg.loss_type, cfg.max_new_tokens,
        world_size=distributed.world_size(), sum_over_ranks=distributed.sum_across_ranks)
    params = [p for p in model.parameters() if p.requires_grad]
    lora.train_without_dropout(model)  # train mode (gradient checkpointing), dropout off as when
                                       # sampling: the first pass gives pi_old
    history, old_logps = [], []
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        update = {"loss": 0.0}
        for k, rows in enumerate(slices):
            logps = completion_logps(model, rollout, rows, cfg.temperature, cfg.shared_prompt)  # [n, C], grad
            if iteration == 0:  # no optimizer step yet: these are pi_old (so r = 1 in this update)
                old_logps.append(logps.detach())
            loss, stats = grpo.policy_loss(
                logps, old_logps[k], None if rollout.ref_logps is None else rollout.ref_logps[rows],
                rollout.advantages[rows], loss_mask[rows], eps_low=cfg.epsilon, eps_high=cfg.clip_high,
                beta=cfg.beta, loss_type=cfg.loss_type, max_len=cfg.max_new_tokens, normalizer=normalizers[k])
            loss.backward()
            share = float(loss_mask[rows].sum()) / max(float(loss_mask.sum()), 1.0)  # of the step's tokens
            accumulate(update, float(loss.detach()), stats, share)
        distributed.sum_gradients(params)                                              # ranks
        update["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        history.append(update)
    rollout.old_logps = torch.cat(old_logps)
    timer.lap("update")
    timing = timer.stats(rollout_tokens=float(everything.completion_mask.sum()),
                         update_tokens=rollout.row_tokens() * cfg.num_iterations)
    return {**rollout_stats(everything, G), **update_stats(history), **dynamic, **timing}, rollout


def skip_update(scheduler, num_iterations: int) -> None:
    """A step without an update (--dynamic-sampling found no group whose rewards differ): the
    optimizer does not step (no gradient; AdamW would still move the weights by its momentum and
    weight decay), the learning-rate schedule does, mu times as an update would, so that the
    schedule stays a function of the step: --steps N spans it whether or not each step updated."""
    with warnings.catch_warnings():  # torch warns when the schedule steps before the first optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for _ in range(num_iterations):
            scheduler.step()


def accumulate(update: dict, loss: float, stats: dict, share: float) -> None:
    """Add one micro-batch: its loss (the micro-batch losses sum to the step's) and its statistics,
    weighted by its share of the step's completion tokens."""
    update["loss"] += loss
    for k, v in stats.items():
        update[k] = update.get(k, 0.0) + v * share


def update_stats(history: list[dict]) -> dict:
    """The mean over the mu updates; the loss summed over ranks (each rank holds its share)."""
    means = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    means["loss"] = distributed.sum_across_ranks(means["loss"])
    return means


def rollout_stats(rollout: Rollout | Sampled, G: int) -> dict:
    """What the rollout looked like, under TRL's metric names (with --dynamic-sampling: every group
    sampled, the dropped ones included)."""
    grouped = rollout.rewards.view(-1, G)                                               # [B, G]
    stats = {"reward": float(rollout.rewards.mean()),
             "reward_std": float(grouped.std(1).mean()),
             "frac_reward_zero_std": float((grouped.std(1) == 0).float().mean()),
             "completions/mean_length": float(rollout.completion_mask.sum(1).float().mean()),
             "completions/clipped_ratio": float(rollout.truncated.float().mean())}
    for name, values in rollout.reward_terms.items():
        stats[f"rewards/{name}/mean"] = float(values.mean())
    return stats
