"""mrgr1: MRG-R1 (arXiv 2512.16145) in plain PyTorch.

Reading order for one GRPO step: run_config (every knob) -> train (the run, top to bottom) ->
trainer (one step) -> prompts, generate, rewards (labels, chexbert), grpo (the loss).
The model: config -> vision, language -> vlm; processing (tokens, images); lora.
"""

__version__ = "0.1.0"
