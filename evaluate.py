"""Evaluate a report generator: generate on a split, label, score CE + NLG metrics (MRG-R1, arXiv 2512.16145).

    python evaluate.py --dataset demo --policy runs/demo/sft --adapter runs/demo/final
    python evaluate.py --predictions other_system.jsonl --labeler chexbert      # no model needed
    python evaluate.py --help                                                   # every flag, grouped

The command line is mrgr1/evaluate.py (`python -m mrgr1.evaluate` is the same); the settings it
shares with training come from mrgr1/run_config.py and, by default, from the run being evaluated.
"""
import sys

from mrgr1.evaluate import load_adapter, main  # noqa: F401 (for callers)

if __name__ == "__main__":
    main(sys.argv[1:])
