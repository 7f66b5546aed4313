"""mrgr1.labels.rule_labels: exact on the demo set, sensible on ordinary radiology sentences."""
import json
import os

import numpy as np
import pytest
import torch

from mrgr1.labels import BLANK, CONDITIONS, NEGATIVE, NO_FINDING, POSITIVE, UNCERTAIN, RuleLabeler, rule_labels
from mrgr1.synthetic import generate, sample_findings, write_report


def _codes(report: str) -> dict[str, int]:
    """Non-blank codes of one report, by observation name."""
    row = rule_labels([report])[0].tolist()
    return {name: c for name, c in zip(CONDITIONS, row) if c != BLANK}


# ---------------------------------------------------------------- the demo set
def test_agrees_exactly_with_findings_json_on_every_report_of_a_generated_demo_set(tmp_path):
    root = generate(str(tmp_path / "demo"), n_train=300, n_val=30, n_test=60, image_size=14, seed=0)
    ann = json.load(open(os.path.join(root, "annotation.json")))
    truth = json.load(open(os.path.join(root, "findings.json")))
    entries = [e for split in ann.values() for e in split]
    labels = rule_labels([e["report"] for e in entries])
    expected = torch.tensor([truth[e["id"]] for e in entries])
    wrong = [(e["report"], labels[i].tolist(), expected[i].tolist())
             for i, e in enumerate(entries) if not torch.equal(labels[i], expected[i])]
    assert not wrong, wrong[:3]


def test_agrees_exactly_with_the_templates_over_many_sampled_reports():
    reports, truth = [], []
    for i in range(4000):
        rng = np.random.default_rng([123, i])
        report, codes = write_report(sample_findings(rng), rng)
        reports.append(report)
        truth.append(codes)
    assert torch.equal(rule_labels(reports), torch.tensor(truth))


# ---------------------------------------------------------------- interface
def test_output_is_a_long_tensor_n_by_14_and_the_class_wraps_the_function():
    reports = ["No pneumothorax.", "Cardiomegaly."]
    out = RuleLabeler().label(reports)
    assert out.dtype == torch.long and out.shape == (2, 14)
    assert torch.equal(out, rule_labels(reports))
    assert rule_labels([]).shape == (0, 14)


# ---------------------------------------------------------------- general radiology text
@pytest.mark.parametrize("text, expected", [
    ("No pneumothorax.", {"Pneumothorax": NEGATIVE}),
    ("There is no evidence of pleural effusion.", {"Pleural Effusion": NEGATIVE}),
    ("Lungs are free of focal consolidation.", {"Consolidation": NEGATIVE}),
    ("Negative for pneumonia.", {"Pneumonia": NEGATIVE}),
    ("The previously seen effusion has resolved.", {"Pleural Effusion": NEGATIVE}),
    ("Pneumothorax is not seen.", {"Pneumothorax": NEGATIVE}),
    ("The heart is not enlarged.", {"Cardiomegaly": NEGATIVE}),
    ("Heart size is normal.", {"Cardiomegaly": NEGATIVE}),
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     {"Consolidation": NEGATIVE, "Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}),
])
def test_negation(text, expected):
    assert {k: v for k, v in _codes(text).items() if k != "No Finding"} == expected


@pytest.mark.parametrize("text, expected", [
    ("Opacity at the right base may represent atelectasis.", {"Lung Opacity": POSITIVE, "Atelectasis": UNCERTAIN}),
    ("Possible small left pleural effusion.", {"Pleural Effusion": UNCERTAIN}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": UNCERTAIN}),
    ("Findings suggest mild pulmonary edema.", {"Edema": UNCERTAIN}),
    ("Likely bibasilar atelectasis.", {"Atelectasis": UNCERTAIN}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": UNCERTAIN}),
    ("Right lower lobe consolidation, concerning for pneumonia.", {"Consolidation": POSITIVE, "Pneumonia": UNCERTAIN}),
])
def test_uncertainty(text, expected):
    assert {k: v for k, v in _codes(text).items() if k != "No Finding"} == expected


@pytest.mark.parametrize("text, expected", [
    ("Moderate cardiomegaly.", {"Cardiomegaly": POSITIVE}),
    ("The cardiac silhouette is enlarged.", {"Cardiomegaly": POSITIVE}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": POSITIVE}),
    ("A 1.5 cm nodule in the right upper lobe.", {"Lung Lesion": POSITIVE}),
    ("Left seventh rib fracture.", {"Fracture": POSITIVE}),
    ("Apical pleural thickening.", {"Pleural Other": POSITIVE}),
    ("Cardiomegaly without pleural effusion.", {"Cardiomegaly": POSITIVE, "Pleural Effusion": NEGATIVE}),
    ("No pneumothorax, but there is a small right effusion.", {"Pneumothorax": NEGATIVE, "Pleural Effusion": POSITIVE}),
    ("No change in the large left effusion.", {"Pleural Effusion": POSITIVE}),  # "no change" is not a negation
    ("Small pericardial effusion.", {}),  # not a pleural effusion
])
def test_positive_mentions_and_scope(text, expected):
    assert {k: v for k, v in _codes(text).items() if k != "No Finding"} == expected


def test_unrelated_text_leaves_every_observation_blank_and_no_finding_positive():
    row = rule_labels(["The patient is a 45-year-old man. Comparison: none."])[0].tolist()
    assert row[:NO_FINDING] == [BLANK] * NO_FINDING
    assert row[NO_FINDING] == POSITIVE  # CheXpert's rule: nothing positive or uncertain


def test_no_finding_is_off_for_positive_or_uncertain_findings_but_not_for_devices():
    nf = lambda t: rule_labels([t])[0, NO_FINDING].item()
    assert nf("Heart size is normal. No pleural effusion.") == POSITIVE
    assert nf("Small left pleural effusion.") == BLANK
    assert nf("Possible left basilar atelectasis.") == BLANK
    assert nf("Endotracheal tube in place. No acute cardiopulmonary abnormality.") == POSITIVE


def test_report_level_precedence_is_positive_then_uncertain_then_negative():
    assert _codes("No effusion. Small left effusion.")["Pleural Effusion"] == POSITIVE
    assert _codes("No effusion. Possible right effusion.")["Pleural Effusion"] == UNCERTAIN
    assert _codes("Possible effusion. There is a large effusion.")["Pleural Effusion"] == POSITIVE
