"""Train a report generator with GRPO on a clinical reward: MRG-R1 (arXiv 2512.16145).

    python train_grpo.py --dataset demo                 # the demo: SFT warm start, then GRPO, CPU, minutes
    python train_grpo.py --dataset iu_xray --policy huatuogpt-vision-7b --labeler chexbert \
        --dtype bfloat16 --grad-checkpointing --output-dir runs/iu_xray
    python train_grpo.py --help                         # every flag, grouped, with its default

The run itself is mrgr1/train.py (read it top to bottom); its flags and defaults are
mrgr1/run_config.py; one GRPO step is mrgr1/trainer.py.
"""
import sys

from mrgr1.train import command_line, main, parse_args  # noqa: F401 (main, parse_args: for callers)

if __name__ == "__main__":
    command_line(sys.argv[1:])
