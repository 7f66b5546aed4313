"""mrgr1: MRG-R1 (arXiv 2512.16145) in plain PyTorch.

Data flows one way:
data -> processing -> vlm -> generate -> rewards (labels, chexbert) -> grpo -> train.
"""

__version__ = "0.1.0"
