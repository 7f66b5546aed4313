"""What a CE figure must be read against: reports that need no model, and how many reports failed.

A CE-F1 means little on its own. No Finding is positive in most references of IU X-Ray and of
the demo set, and a labeler gives an empty report No Finding too, so an empty report already
scores well under the 14-observation conventions. `trivial_baselines` scores, on the same
studies with the same labeler and under every convention `mrgr1.metrics.ce_scores` computes,
three reports that need no model:

  empty        ""                                  for every study
  most_common  the most frequent training report   for every study (ties: the first in file order)
  random       a training report drawn uniformly   per study, numpy default_rng(seed)

Keys are flat, as in metrics.json: "baseline/empty/ce_micro/f1", "baseline/random/ce_macro_13/f1",
..., plus "baseline/most_common/report" (its text) and "baseline/random/seed".

`report_counts` counts generated reports that are empty or had no <report> section (the report
was then guessed from the rest of the completion); `report_warning` is the one line to print
when those are more than 10 % of the studies.

Example:
    >>> base = trivial_baselines(ref_labels, RuleLabeler(), [s.report for s in train], seed=0)
    >>> print(trivial_sentence(base))
    an empty report scores CE-F1 micro 0.4953; the most common training report 0.4953; ...
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .metrics import BASELINES, ce_scores

WARN_SHARE = 0.10  # warn when more than this share of generated reports is empty or unparseable


def _scores_of(report_labels, ref_labels, name: str) -> dict:
    """ce_scores under "baseline/<name>/" (per_observation and num_reports left out)."""
    scores = ce_scores(report_labels, ref_labels)
    return {f"baseline/{name}/{k}": v for k, v in scores.items() if k not in ("per_observation", "num_reports")}


def most_common_report(train_reports: list[str]) -> str:
    """The most frequent text; among equally frequent ones, the first in `train_reports`."""
    if not train_reports:
        raise ValueError("most_common_report needs at least one training report")
    return Counter(train_reports).most_common(1)[0][0]  # Counter keeps first-seen order among ties


def random_reports(train_reports: list[str], n: int, seed: int) -> list[str]:
    """n training reports drawn uniformly with replacement, numpy default_rng(seed)."""
    if not train_reports:
        raise ValueError("random_reports needs at least one training report")
    picks = np.random.default_rng(seed).integers(0, len(train_reports), size=n)
    return [train_reports[i] for i in picks]


def _label(labeler, reports: list[str]):
    """Label each distinct text once (CheXbert on 590 copies of one report is 590 forward passes)."""
    distinct = list(dict.fromkeys(reports))
    codes = labeler.label(distinct).long().cpu()  # [D, 14]
    row = {text: i for i, text in enumerate(distinct)}
    return codes[[row[t] for t in reports]]  # [N, 14]


def trivial_baselines(ref_labels, labeler, train_reports: list[str] | None = None, seed: int = 0) -> dict:
    """CE scores of the empty, most common and random training reports against `ref_labels`.

    Args:
        ref_labels: [N, 14] CheXbert codes of the scored studies' references, from `labeler`.
        labeler: anything with `.label(list[str]) -> LongTensor [n, 14]` (CheXbert, RuleLabeler).
        train_reports: the training split's reports; None or empty -> the empty baseline only.
        seed: draws the random baseline's reports.
    Returns a flat dict (keys in the module docstring).
    """
    n = len(ref_labels)
    out = _scores_of(_label(labeler, [""] * n), ref_labels, "empty")
    if train_reports:
        common = most_common_report(train_reports)
        out.update(_scores_of(_label(labeler, [common] * n), ref_labels, "most_common"))
        out["baseline/most_common/report"] = common
        out.update(_scores_of(_label(labeler, random_reports(train_reports, n, seed)), ref_labels, "random"))
        out["baseline/random/seed"] = seed
    return out


def trivial_sentence(scores: dict, key: str = "ce_micro/f1") -> str:
    """'an empty report scores CE-F1 micro 0.4953; the most common training report 0.4953; a random
    training report 0.3120' from the baseline keys in `scores` ('' when there are none)."""
    what = {"ce_micro/f1": "CE-F1 micro", "ce_micro_13/f1": "CE-F1 micro over 13 observations",
            "ce_example/f1": "CE-F1 per report", "ce_macro/f1": "CE-F1 macro"}.get(key, key)
    parts = [(label, scores[f"baseline/{name}/{key}"]) for name, label in BASELINES
             if f"baseline/{name}/{key}" in scores]
    if not parts:
        return ""
    (first, value), rest = parts[0], parts[1:]
    return "; ".join([f"{first} scores {what} {value:.4f}"] + [f"{label} {v:.4f}" for label, v in rest])


def report_counts(reports: list[str], completions: list[str] | None = None) -> dict:
    """{"num_empty_reports": reports that are empty or whitespace, "num_unparseable_reports":
    completions without a "<report>" tag, "num_failed_reports": studies with either} (the last two
    only when completions are given: a predictions file of another system may hold reports alone)."""
    empty = [not r.strip() for r in reports]
    counts = {"num_empty_reports": sum(empty)}
    if completions is not None:
        unparseable = ["<report>" not in c for c in completions]
        counts["num_unparseable_reports"] = sum(unparseable)
        counts["num_failed_reports"] = sum(e or u for e, u in zip(empty, unparseable))  # either or both
    return counts


def report_warning(counts: dict, num_studies: int, share: float = WARN_SHARE) -> str:
    """One warning line when more than `share` of the studies got an empty or unparseable report
    (`report_counts`'s dict), else ''."""
    bad = counts.get("num_failed_reports", counts.get("num_empty_reports", 0))
    if num_studies <= 0 or bad <= share * num_studies:
        return ""
    return (f"warning: {bad} of {num_studies} generated reports ({bad / num_studies:.0%}) are empty or have no "
            f"<report> section; the CE figures above largely measure that, not the model's findings")


def training_reports(dataset: str, data_root: str | None) -> list[str]:
    """The reports of `dataset`'s training split; a DataError when it cannot be read (nothing is
    drawn or downloaded here, and no image is opened: only the reports are needed)."""
    from .data import load_split  # here, not at the top: data imports torch and PIL
    return [s.report for s in load_split(dataset, data_root, "train", check_images=False)]


def main(argv=None) -> dict:
    """Print the trivial baselines of one split: what an empty / the most common / a random
    training report scores there, under every CE convention. Needs the data set and labeler only."""
    import argparse

    from . import data, pipeline
    from .metrics import format_table

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--dataset", default="demo", choices=data.DATASETS)
    p.add_argument("--data-root", default=None, help="default data/<dataset>")
    p.add_argument("--split", default="test", choices=data.SPLITS)
    p.add_argument("--labeler", default=None, choices=("chexbert", "rules"),
                   help="default: rules for the demo, chexbert otherwise")
    p.add_argument("--chexbert-weights", default=None)
    p.add_argument("--weights-dir", default="weights")
    p.add_argument("--seed", type=int, default=0, help="the random baseline's draws (evaluate.py: its --seed)")
    args = p.parse_args(argv)
    kind = args.labeler or ("rules" if args.dataset == "demo" else "chexbert")
    try:
        studies = pipeline.load_studies(args.dataset, args.data_root, args.split)  # draws the demo if missing
        labeler = pipeline.build_labeler(kind, args.chexbert_weights, args.weights_dir)
        train = training_reports(args.dataset, args.data_root)
    except pipeline.USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    ref = _label(labeler, [s.report for s in studies])  # [N, 14]
    scores = trivial_baselines(ref, labeler, train, seed=args.seed)
    scores.update({k: v for k, v in ce_scores(ref, ref).items() if k != "per_observation"})  # first row
    no_finding = int((ref[:, -1] == 1).sum())
    print(f"{args.dataset} {args.split}: {len(studies)} studies, {no_finding} of them No Finding by the "
          f"{kind} labeler; the first row scores the references against themselves")
    table = format_table(scores, labeler=kind).splitlines()
    print("\n".join(table[table.index("") + 1:] if "" in table else table))
    print(trivial_sentence(scores))
    print(f"the most common training report: {scores['baseline/most_common/report']!r}")
    print(nlg_line([s.report for s in studies], train, args.seed))
    return scores


def nlg_line(references: list[str], train_reports: list[str] | None, seed: int) -> str:
    """BLEU-4 and ROUGE-L of the training-report baselines (an empty report scores 0 on both)."""
    from .metrics import nlg_scores

    if not train_reports:
        return ""
    shown = []
    for label, reports in (("the most common training report", [most_common_report(train_reports)] * len(references)),
                           ("a random training report", random_reports(train_reports, len(references), seed))):
        nlg = nlg_scores(reports, references)
        shown.append(f"{label}: BLEU-4 {nlg['bleu_4']:.4f}, ROUGE-L {nlg['rouge_l']:.4f}")
    return "; ".join(shown)


if __name__ == "__main__":
    main()
