"""Specification of mrgr1.baselines: the reports that need no model, and counting failed reports.

A labeler written for the test maps a few texts to fixed codes, so every expected score is worked
by hand (and the empty baseline's by sklearn, where installed).
"""
import numpy as np
import pytest
import torch

from mrgr1.baselines import (most_common_report, random_reports, report_counts, report_warning,
                             trivial_baselines, trivial_sentence)
from mrgr1.labels import CONDITIONS, RuleLabeler
from mrgr1.metrics import format_table

NF, CARD, EFF = CONDITIONS.index("No Finding"), CONDITIONS.index("Cardiomegaly"), CONDITIONS.index("Pleural Effusion")


class TableLabeler:
    """"" and "normal" -> No Finding; "cardio" -> Cardiomegaly; "effusion" -> Pleural Effusion.
    Records every call, to check that each distinct text is labelled once."""

    def __init__(self):
        self.calls = []

    def label(self, reports):
        self.calls.append(list(reports))
        rows = torch.zeros(len(reports), 14, dtype=torch.long)
        for i, text in enumerate(reports):
            col = {"": NF, "normal": NF, "cardio": CARD, "effusion": EFF}[text]
            rows[i, col] = 1
        return rows


def references():
    """Four studies: normal, normal, cardiomegaly, effusion (codes [4, 14])."""
    ref = torch.zeros(4, 14, dtype=torch.long)
    ref[[0, 1], NF] = 1
    ref[2, CARD] = 1
    ref[3, EFF] = 1
    return ref


def test_the_empty_report_is_labelled_and_scored_like_any_report():
    base = trivial_baselines(references(), TableLabeler())
    # prediction: No Finding in all 4 rows; tp 2, fp 2, fn 2 (Card, Eff) -> P = R = F1 = 1/2
    assert base["baseline/empty/ce_micro/precision"] == pytest.approx(1 / 2)
    assert base["baseline/empty/ce_micro/f1"] == pytest.approx(1 / 2)
    assert base["baseline/empty/ce_micro_13/f1"] == 0.0
    # per report: rows 0 and 1 score 1, rows 2 and 3 score 0 -> 1/2
    assert base["baseline/empty/ce_example/f1"] == pytest.approx(1 / 2)
    # without training reports there is nothing else to compare with
    assert not any(k.startswith(("baseline/most_common", "baseline/random")) for k in base)


def test_empty_baseline_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    base = trivial_baselines(references(), TableLabeler())
    yr = references().numpy() == 1
    yp = np.zeros_like(yr)
    yp[:, NF] = True
    for avg in ("micro", "macro"):
        assert base[f"baseline/empty/ce_{avg}/f1"] == pytest.approx(
            metrics.f1_score(yr, yp, average=avg, zero_division=0))


def test_most_common_training_report_is_the_modal_text_first_seen_on_ties():
    assert most_common_report(["cardio", "normal", "normal", "effusion"]) == "normal"
    assert most_common_report(["effusion", "cardio", "cardio", "effusion"]) == "effusion"
    with pytest.raises(ValueError, match="at least one training report"):
        most_common_report([])


def test_most_common_baseline_scores_that_report_for_every_study():
    labeler = TableLabeler()
    base = trivial_baselines(references(), labeler, ["cardio", "cardio", "normal"])
    assert base["baseline/most_common/report"] == "cardio"
    # prediction Cardiomegaly everywhere: tp 1, fp 3, fn 3 (NF, NF, Eff) -> F1 = 2/(2+3+3) = 1/4
    assert base["baseline/most_common/ce_micro/f1"] == pytest.approx(1 / 4)
    # over 13 observations: tp 1, fp 3, fn 1 (Eff) -> F1 = 2/(2+3+1) = 1/3
    assert base["baseline/most_common/ce_micro_13/f1"] == pytest.approx(1 / 3)
    # each distinct text went to the labeler once, however many studies it is scored for
    assert all(len(call) == len(set(call)) for call in labeler.calls)


def test_random_baseline_draws_training_reports_reproducibly_by_seed():
    train = ["normal", "cardio", "effusion"]
    a, b = random_reports(train, 200, seed=3), random_reports(train, 200, seed=3)
    assert a == b and set(a) == set(train)  # 200 draws from 3: every one comes up
    assert random_reports(train, 200, seed=4) != a
    base = trivial_baselines(references(), TableLabeler(), train, seed=3)
    assert base["baseline/random/seed"] == 3


def test_random_baseline_from_one_training_report_equals_the_most_common_one():
    base = trivial_baselines(references(), TableLabeler(), ["effusion"], seed=0)
    random_keys = [k for k in base if k.startswith("baseline/random/") and k != "baseline/random/seed"]
    assert random_keys
    for key in random_keys:
        assert base[key] == base[key.replace("random", "most_common")]


def test_rule_labeler_gives_an_empty_report_no_finding_only():
    codes = trivial_baselines(RuleLabeler().label(["Normal heart size. Small left effusion."]),
                              RuleLabeler())
    # the reference has Cardiomegaly negative, Effusion positive; the empty report No Finding 1:
    # tp 0, fp 1 (NF), fn 1 (Eff) -> 0
    assert codes["baseline/empty/ce_micro/f1"] == 0.0


def test_trivial_sentence_names_each_baseline_with_its_figure():
    base = trivial_baselines(references(), TableLabeler(), ["cardio", "cardio", "normal"], seed=0)
    sentence = trivial_sentence(base)
    assert sentence.startswith("an empty report scores CE-F1 micro 0.5000; the most common training report "
                               "0.2500; a random training report ")
    assert trivial_sentence(base, "ce_micro_13/f1").startswith(
        "an empty report scores CE-F1 micro over 13 observations 0.0000")
    assert trivial_sentence({"ce_micro/f1": 0.5}) == ""


def test_format_table_puts_the_baselines_beside_the_scored_reports():
    from mrgr1.metrics import ce_scores
    ref = references()
    scores = ce_scores(ref, ref)  # a perfect system
    scores.update(trivial_baselines(ref, TableLabeler(), ["cardio"], seed=0))
    table = format_table(scores)
    lines = {line[:34].strip(): line[34:].split() for line in table.splitlines()}
    assert lines["the scored reports"][0] == "1.0000"
    assert lines["an empty report"][0] == "0.5000"
    assert lines["the most common training report"][0] == "0.2500"
    assert lines["a random training report"][0] == "0.2500"  # one training report: the same one


def test_report_counts_empty_and_unparseable_reports():
    reports = ["", "Normal.", "  ", "Effusion."]
    completions = ["<think>x</think><report></report>", "<think>x</think><report>Normal.</report>",
                   "<think>x", "Effusion."]
    assert report_counts(reports, completions) == {"num_empty_reports": 2, "num_unparseable_reports": 2,
                                                   "num_failed_reports": 3}
    assert report_counts(reports) == {"num_empty_reports": 2}  # reports alone: no format to judge


def test_warning_only_above_ten_percent_of_studies():
    assert report_warning({"num_empty_reports": 1, "num_failed_reports": 1}, 10) == ""  # exactly 10 %
    line = report_warning({"num_empty_reports": 1, "num_failed_reports": 2}, 10)
    assert line.startswith("warning: 2 of 10 generated reports (20%)") and "\n" not in line
    assert report_warning({"num_empty_reports": 3}, 10).startswith("warning: 3 of 10")


def test_command_line_prints_the_baselines_of_a_demo_split(tmp_path, capsys):
    from mrgr1 import baselines, synthetic
    root = synthetic.generate(str(tmp_path / "demo"), n_train=8, n_val=0, n_test=6, image_size=28)
    scores = baselines.main(["--dataset", "demo", "--data-root", root])
    out = capsys.readouterr().out
    assert "demo test: 6 studies" in out and trivial_sentence(scores) in out
    assert scores["ce_micro/f1"] == 1.0  # the first row: the references scored against themselves


def test_training_reports_are_read_without_opening_a_training_image(tmp_path):
    """The baselines need the training split's reports only: no image of it is opened (a training
    split of MIMIC-CXR has hundreds of thousands), so one that is missing does not stop them."""
    import os

    from mrgr1 import baselines, data, synthetic
    root = synthetic.generate(str(tmp_path / "demo"), n_train=8, n_val=0, n_test=2, image_size=28)
    studies = data.load_split("demo", root, "train")
    os.remove(studies[3].image_paths[0])
    assert baselines.training_reports("demo", root) == [s.report for s in studies]
    with pytest.raises(data.DataError, match="image not found"):
        data.load_split("demo", root, "train")  # what training reads still checks every image
