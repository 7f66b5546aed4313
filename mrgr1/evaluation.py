"""Scoring a policy on held-out studies: greedy reports and their CE, and the sampled reward.

What train_grpo.py prints before and after GRPO (`evaluate_policy`) and what evaluate.py writes
predictions with (`generate_reports`) are the same code, so the two agree to the last digit on
the same studies with the same run configuration.

    texts = generate_reports(model, processor, encoder, studies, cfg, **special)    # greedy
    scores = ce_of_texts(texts, studies, labeler)          # every CE convention (metrics.ce_scores)
"""
from __future__ import annotations

import torch

from . import distributed
from .data import Study
from .generate import generate
from .metrics import ce_scores
from .rewards import extract_report
from .run_config import RunConfig
from .trainer import decode_completions, sample_completions, score_completions


@torch.no_grad()
def generate_reports(model, processor, encoder, studies: list[Study], cfg: RunConfig, *, eos_token_ids=(),
                     pad_token_id: int = 0, suppress_token_ids=(), temperature: float = 0.0,
                     top_p: float = 1.0, generator=None) -> list[str]:
    """Greedy (by default) completions of every study, in order, cfg.eval_batch_size at a time,
    at most cfg.max_new_tokens long, with cfg.decode's step; temperature > 0 samples (top_p < 1:
    from the nucleus)."""
    device = next(model.parameters()).device
    texts = []
    for s in range(0, len(studies), cfg.eval_batch_size):
        prompts = encoder(studies[s:s + cfg.eval_batch_size], device)
        out, completion_mask = generate(
            model, prompts["input_ids"], prompts["attention_mask"], prompts.get("pixel_values"),
            prompts.get("image_grid_thw"), max_new_tokens=cfg.max_new_tokens, temperature=temperature,
            top_p=top_p, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
            suppress_token_ids=suppress_token_ids, generator=generator, decode=cfg.decode)
        texts += decode_completions(processor, out, completion_mask, pad_token_id)
    return texts


def sampled_rewards(model, processor, encoder, studies: list[Study], labeler, cfg: RunConfig,
                    generator: torch.Generator | None, num_samples: int, *, eos_token_ids=(),
                    pad_token_id: int = 0, suppress_token_ids=()) -> dict:
    """The rewards of num_samples completions per study, drawn and scored as grpo_step draws and
    scores them, without any update: GRPO's own objective, measured on held-out studies.

    Returns {"reward": [len(studies) * num_samples], cfg.reward: [...], "format": [...]}."""
    device = next(model.parameters()).device
    batches = []
    for s in range(0, len(studies), cfg.eval_sample_batch_size):
        batch = studies[s:s + cfg.eval_sample_batch_size]
        prompts = encoder(batch, device)
        completions, completion_mask, _ = sample_completions(
            model, prompts, cfg, generator, num_samples, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id, suppress_token_ids=suppress_token_ids)
        texts = decode_completions(processor, completions, completion_mask, pad_token_id)
        rewards, reward_terms, _ = score_completions(texts, batch, labeler, cfg)
        batches.append({"reward": rewards, **reward_terms})
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]} if batches else {}


def ce_of_texts(texts: list[str], studies: list[Study], labeler) -> dict:
    """Clinical efficacy of generated completions against the studies' reference reports."""
    pred = labeler.label([extract_report(t) for t in texts])
    ref = labeler.label([s.report for s in studies])
    return ce_scores(pred, ref)


def evaluate_policy(cfg: RunConfig, model, processor, encoder, labeler, studies: list[Study], title: str,
                    special: dict) -> dict:
    """CE-F1 of greedy reports, and the mean reward of cfg.eval_samples sampled completions per
    study (GRPO's own objective; the same random draws before and after GRPO); prints one line
    each. Several ranks: each writes its part, every rank scores them all."""
    mine = distributed.split_evenly(studies)
    texts = generate_reports(model, processor, encoder, mine, cfg, **special)
    scores = ce_of_texts(distributed.gather_lists(texts), studies, labeler)
    line = (f"\n{title}: CE-F1 (micro, R2GenCMN convention) {scores['ce_micro/f1']:.4f} | "
            f"CE-F1 (example, PromptMRG) {scores['ce_example/f1']:.4f} on {len(studies)} studies")
    if cfg.eval_samples:
        generator = torch.Generator(device=next(model.parameters()).device)
        generator.manual_seed(cfg.seed + 2 + 1000 * distributed.rank())
        sampled = sampled_rewards(model, processor, encoder, mine, labeler, cfg, generator, cfg.eval_samples,
                                  **special)
        for name in ("reward", cfg.reward, "format"):  # every rank gathers, even one with no studies
            everyone = distributed.gather_lists(sampled[name].tolist() if sampled else [])
            scores[f"sampled/{name}"] = sum(everyone) / len(everyone)
        line += (f"\n{title}: reward of {cfg.eval_samples} sampled completions per study "
                 f"(T={cfg.temperature}) {scores['sampled/reward']:.4f}, "
                 f"{cfg.reward} part {scores[f'sampled/{cfg.reward}']:.4f}")
    if distributed.is_main():
        print(line)
    return scores


def before_after(before: dict, after: dict, trivial: str = "") -> str:
    """The run's outcome: test CE-F1 (and the sampled reward, if measured) before -> after GRPO, and
    on a line of its own where the trivial level is (`baselines.trivial_sentence`: reports that
    need no model, on the same studies with the same labeler)."""
    line = f"\nGRPO moved test CE-F1 (micro) {before['ce_micro/f1']:.4f} -> {after['ce_micro/f1']:.4f}"
    if "sampled/reward" in before:
        line += f", the sampled reward {before['sampled/reward']:.4f} -> {after['sampled/reward']:.4f}"
    return line + (f"\nthe trivial level, without a model: {trivial}" if trivial else "")
