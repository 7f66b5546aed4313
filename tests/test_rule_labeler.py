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


# ---------------------------------------------------------------- real report language
# Sentences written for these tests in the style of IU X-Ray reports (which replace identifying
# words with XXXX); no real report is copied here.
DEVICE = "Support Devices"


@pytest.mark.parametrize("text", [
    "Median sternotomy XXXX are intact.",
    "Postoperative sternotomy XXXX and mediastinal clips.",
    "Stable right chest XXXX with its tip in the SVC.",
    "Left chest wall XXXX projects over the right atrium.",
    "Interval placement of a right internal jugular XXXX.",
    "Right-sided subclavian XXXX terminates in the distal SVC.",
])
def test_an_anonymised_device_noun_is_a_support_device_where_the_context_places_it(text):
    assert _codes(text).get(DEVICE) == POSITIVE


@pytest.mark.parametrize("text", [
    "Right chest XXXX.",                       # nothing says it is a device
    "XXXX XXXX are intact. Right lung XXXX.",  # anonymised words elsewhere
    "Right upper lobe XXXX opacity.",          # not a device site
])
def test_an_anonymised_word_without_device_context_is_not_a_device(text):
    assert DEVICE not in _codes(text)


def test_a_removed_anonymised_device_is_negative():
    assert _codes("Interval removal of the right chest XXXX with its tip no longer seen.")[DEVICE] == NEGATIVE
    assert _codes("The right chest XXXX has been removed.")[DEVICE] == NEGATIVE


@pytest.mark.parametrize("text", [
    "Borderline heart size.",
    "Heart size is borderline.",
    "The heart is borderline in size.",
    "Cardiac silhouette is borderline enlarged.",
    "Borderline cardiomegaly.",
])
def test_borderline_heart_size_is_uncertain_cardiomegaly(text):
    codes = _codes(text)
    assert codes["Cardiomegaly"] == UNCERTAIN
    assert "No Finding" not in codes  # uncertain counts as a finding for No Finding


def test_borderline_mediastinum_is_uncertain_enlarged_cardiomediastinum():
    assert _codes("The mediastinal contours are borderline widened.")["Enlarged Cardiomediastinum"] == UNCERTAIN


@pytest.mark.parametrize("text", [
    "Old granulomatous disease.",
    "Evidence of old granulomatous infection.",
    "Calcified lymph nodes from prior granulomatous disease.",
    "Findings consistent with sequelae of prior infection.",
    "Granulomatous changes in the right upper lobe.",
])
def test_old_granulomatous_disease_is_not_pneumonia(text):
    codes = _codes(text)
    assert "Pneumonia" not in codes
    assert codes["No Finding"] == POSITIVE


def test_a_current_infection_is_still_pneumonia():
    assert _codes("Right lower lobe opacity concerning for infection.")["Pneumonia"] == UNCERTAIN
    assert _codes("Old granulomatous disease. New right basilar infection.")["Pneumonia"] == POSITIVE


@pytest.mark.parametrize("text, expected", [
    ("Left-sided AICD with leads in the right ventricle.", POSITIVE),
    ("Implantable defibrillator in place.", POSITIVE),
    ("Sternal wires are intact.", POSITIVE),
])
def test_more_device_words(text, expected):
    assert _codes(text)[DEVICE] == expected


def test_suspicious_as_an_adjective_in_a_negated_list_stays_negative():
    codes = _codes("No focal consolidation, suspicious pulmonary opacity, large pleural effusion, "
                   "or pneumothorax is identified.")
    assert {codes[k] for k in ("Consolidation", "Lung Opacity", "Pleural Effusion", "Pneumothorax")} == {NEGATIVE}
