"""Where a GRPO step's time goes: wall seconds per phase, and tokens per second.

`grpo_step` marks the end of each phase with `timer.lap(name)`; the seconds since the previous
mark go to that phase (added up when a phase runs more than once in a step, as the rollout does
with --dynamic-sampling). On CUDA the kernels run asynchronously, so each mark first waits for
the device once (`torch.cuda.synchronize`): without it the seconds would land on whichever later
phase first reads a value on the host. Nothing else is synchronised for timing.

The step's metrics carry the result under the prefix `timing/` (like verl's `timing_s/`):

    timing/prompts    1 prompts: chat template, views, tokens (cached after first use)
    timing/rollout    2 sampling the G completions per study (generate)
    timing/reward     3 decoding and scoring them (the labeler)
    timing/inputs     4 advantages and the update's inputs (the vision tower, once per study)
    timing/reference  5 the reference policy's log-probs (0 with beta = 0)
    timing/update     6 the mu updates: forward, backward, optimizer
    timing/rollout_tokens_per_s   completion tokens generated / rollout seconds
    timing/update_tokens_per_s    tokens through the model in the updates (prompt + completion,
                                  times mu) / update seconds

Example:
    timer = PhaseTimer(device)
    prompts = encoder(studies, device); timer.lap("prompts")
    ...
    stats.update(timer.stats())            # {"timing/prompts": 0.01, ...}
"""
from __future__ import annotations

import time

import torch

PHASES = ("prompts", "rollout", "reward", "inputs", "reference", "update")  # grpo_step's order


class PhaseTimer:
    """Wall seconds per phase of one step, each phase ended by `lap(name)`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.last = time.perf_counter()

    def lap(self, phase: str) -> float:
        """End `phase` now (after the device's queued work, on CUDA); returns its seconds this lap."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        return seconds

    def stats(self, rollout_tokens: float, update_tokens: float) -> dict:
        """The `timing/` metrics: seconds per phase and the two throughputs (0 when a phase took no time)."""
        out = {f"timing/{name}": s for name, s in self.seconds.items()}
        for name, tokens in (("rollout", rollout_tokens), ("update", update_tokens)):
            seconds = self.seconds[name]
            out[f"timing/{name}_tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
        return out
