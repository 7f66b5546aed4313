"""The SFT warm start: teacher-forced MLE on the reference reports, in the target format.

The demo's policy starts untrained, so it first learns to write `<think>...</think><report>...
</report>` and the demo's report language from the reference reports (the token-level baseline
MRG-R1 compares against); GRPO then starts from it. The target's think section is one fixed
sentence (`RunConfig.sft_think`): the reference reports carry no reasoning.

    run_sft(cfg, model, processor, encoder, train_studies)   # cfg.sft_steps steps, in place
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from . import distributed, lora
from .data import Study, batch_indices
from .prompts import sft_targets
from .run_config import RunConfig


def warmup_cosine(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup then cosine decay to 0, per optimizer step."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model, lr: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW over the trainable parameters, with `warmup_cosine`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, warmup_cosine(optimizer, total_steps, warmup_ratio)


def next_batch(n_studies: int, batch_size: int, seed: int, state: dict) -> list[int]:
    """The next batch of study indices in the (seed, epoch) order; advances state's epoch/batch,
    which checkpoints store, so a resumed run draws the same next batch."""
    batches = batch_indices(n_studies, batch_size, seed, state["epoch"], drop_last=True)
    if state["batch"] >= len(batches):
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
        batches = batch_indices(n_studies, batch_size, seed, state["epoch"], drop_last=True)
    state["batch"] += 1
    return batches[state["batch"] - 1]


def sft_step(model, processor, encoder, studies: list[Study], optimizer, scheduler, *, think: str,
             eos_token_id: int, max_grad_norm: float) -> float:
    """One teacher-forced MLE step on the reference reports -> the loss (mean over target tokens)."""
    device = next(model.parameters()).device
    model.train()
    prompts = encoder(studies, device)
    ids, mask = (t.to(device) for t in sft_targets(processor, studies, think, eos_token_id))    # [B, C]
    logps = model.token_logps(torch.cat([prompts["input_ids"], ids], 1),
                              torch.cat([prompts["attention_mask"], mask], 1), prompts.get("pixel_values"),
                              prompts.get("image_grid_thw"), logits_to_keep=ids.shape[1])        # [B, C]
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


def run_sft(cfg: RunConfig, model, processor, encoder, studies: list[Study], eos_token_id: int) -> None:
    """cfg.sft_steps SFT steps: full fine-tuning for the demo model, LoRA merged back into the
    weights for a pretrained one. Several ranks: each takes its slice of every batch and the
    gradients are summed, as in GRPO."""
    use_lora = cfg.policy != "demo"
    if use_lora:
        lora.apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    optimizer, scheduler = make_optimizer(model, cfg.sft_lr, cfg.weight_decay, cfg.sft_steps, cfg.warmup_ratio)
    bar = tqdm(range(cfg.sft_steps), desc="SFT", dynamic_ncols=True, disable=not distributed.is_main())
    position = {"epoch": 0, "batch": 0}
    for _ in bar:
        indices = next_batch(len(studies), cfg.sft_batch_size, cfg.seed + 1000, position)
        batch = [studies[i] for i in distributed.shard(indices, "--sft-batch-size")]
        loss = sft_step(model, processor, encoder, batch, optimizer, scheduler, think=cfg.sft_think,
                        eos_token_id=eos_token_id, max_grad_norm=cfg.max_grad_norm)
        bar.set_postfix(loss=f"{loss:.3f}")
    if use_lora:
        lora.merge_lora(model)
    model.requires_grad_(True)
