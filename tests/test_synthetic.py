"""mrgr1.synthetic: the demo set is deterministic, its pictures show what its reports say."""
import json
import os

import numpy as np
import pytest

from mrgr1 import synthetic_draw as draw
from mrgr1.data import DataError
from mrgr1.labels import CONDITIONS, NEGATIVE, NO_FINDING, POSITIVE, UNCERTAIN
from mrgr1.synthetic import Finding, ensure_demo, generate, main, make_study, sample_findings, write_report

S = 112
CARD, EFF = CONDITIONS.index("Cardiomegaly"), CONDITIONS.index("Pleural Effusion")


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def _frontal(findings, seed=0):
    return draw.frontal(findings, np.random.default_rng(seed), S).astype(float)  # [S, S] in 0..255


def _region(img, y0, y1, x0, x1):
    """Mean of a box given in normalised coordinates."""
    return img[int(y0 * S):int(y1 * S), int(x0 * S):int(x1 * S)].mean()


def _bright_width(img, y, lo=0.25, hi=0.85, threshold=0.45 * 255):
    """Pixels brighter than `threshold` on row y between x=lo and x=hi: the heart/mediastinum shadow."""
    return int((img[int(y * S), int(lo * S):int(hi * S)] > threshold).sum())


# ---------------------------------------------------------------- the folder
def test_same_seed_gives_byte_identical_folders_and_another_seed_differs(tmp_path):
    kw = dict(n_train=4, n_val=1, n_test=2, image_size=56)
    a, b = _files(generate(str(tmp_path / "a"), seed=1, **kw)), _files(generate(str(tmp_path / "b"), seed=1, **kw))
    c = _files(generate(str(tmp_path / "c"), seed=2, **kw))
    assert a == b
    assert set(a) == set(c) and a["annotation.json"] != c["annotation.json"]
    assert a["images/demo_train_00000/0.png"] != c["images/demo_train_00000/0.png"]


def test_folder_is_in_r2gen_format_with_findings_beside_it(tmp_path):
    root = generate(str(tmp_path / "demo"), n_train=5, n_val=2, n_test=3, image_size=56, seed=0)
    ann = json.load(open(os.path.join(root, "annotation.json")))
    findings = json.load(open(os.path.join(root, "findings.json")))
    assert {k: len(v) for k, v in ann.items()} == {"train": 5, "val": 2, "test": 3}
    e = ann["val"][1]
    assert e == {"id": "demo_val_00001", "report": e["report"], "split": "val",
                 "image_path": ["demo_val_00001/0.png", "demo_val_00001/1.png"]}
    assert set(findings) == {e["id"] for split in ann.values() for e in split}
    assert all(len(codes) == 14 and set(codes) <= {0, 1, 2, 3} for codes in findings.values())


def test_generate_refuses_a_non_empty_folder_and_ensure_demo_reuses_an_existing_set(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy"):
        generate(str(tmp_path / "busy"))
    root = str(tmp_path / "demo")
    assert ensure_demo(root, n_train=2, n_val=1, n_test=1, image_size=28) == root
    before = _files(root)
    assert ensure_demo(root) == root and ensure_demo(root, n_train=2, image_size=28) == root  # reused
    assert _files(root) == before and len(before) == 3 + 2 * 4


def test_ensure_demo_refuses_a_set_drawn_with_other_settings_or_an_older_generator(tmp_path):
    root = generate(str(tmp_path / "demo"), n_train=2, n_val=1, n_test=1, image_size=28)
    with pytest.raises(DataError, match=r"stated_share: 0\.7 here, 1\.0 asked.*rm -r .*demo"):
        ensure_demo(root, stated_share=1.0)
    os.remove(os.path.join(root, "demo.json"))  # as written by generator version 1
    with pytest.raises(DataError, match=r"version: 1 here, 2 asked.*rm -r"):
        ensure_demo(root)


def test_generate_rejects_settings_it_cannot_draw(tmp_path):
    with pytest.raises(ValueError, match="probability"):
        generate(str(tmp_path / "a"), stated_share=1.5)
    with pytest.raises(ValueError, match="normal_wordings"):
        generate(str(tmp_path / "b"), normal_wordings="many")


def test_cli_writes_the_requested_sizes(tmp_path, capsys):
    main(["--out", str(tmp_path / "d"), "--train", "3", "--val", "1", "--test", "1", "--image-size", "28",
          "--seed", "4"])
    ann = json.load(open(tmp_path / "d" / "annotation.json"))
    assert [len(ann[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert "wrote 3/1/1" in capsys.readouterr().out
    main(["--out", str(tmp_path / "e"), "--train", "1", "--val", "1", "--test", "1", "--image-size", "28",
          "--stated-share", "1", "--normal-wordings", "varied"])
    settings = json.load(open(tmp_path / "e" / "demo.json"))
    assert settings["stated_share"] == 1.0 and settings["normal_wordings"] == "varied"
    assert settings["version"] == 2 and settings["n_train"] == 1 and settings["image_size"] == 28


# ---------------------------------------------------------------- the reports
def _sampled(n, seed=0, **kw):
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        findings = sample_findings(rng)
        out.append((findings, *write_report(findings, rng, **kw)))
    return out


def test_reports_are_short_and_mostly_normal_with_enough_common_positives():
    sampled = _sampled(2000)
    sentences = [r.count(". ") + 1 for _, r, _ in sampled]
    assert min(sentences) >= 1 and max(sentences) <= 5
    codes = np.array([c for _, _, c in sampled])
    assert 0.45 < (codes[:, NO_FINDING] == POSITIVE).mean() < 0.62
    assert (codes[:, CARD] == POSITIVE).mean() > 0.07 and (codes[:, EFF] == POSITIVE).mean() > 0.06
    assert (codes == UNCERTAIN).any(1).mean() > 0.05 and (codes == NEGATIVE).any(1).mean() > 0.5
    assert len({r for _, r, _ in sampled}) > 400  # abnormal reports vary; normal ones are stock text


def test_a_report_states_each_drawn_finding_with_the_stated_share_and_never_negates_it():
    for share, lo, hi in ((0.7, 0.66, 0.76), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)):
        drawn = stated = 0
        for findings, report, codes in _sampled(3000, seed=3, stated_share=share):
            for f in findings:
                code = codes[CONDITIONS.index(f.obs)]
                assert code in (f.status, 0), report  # stated as drawn, or left blank: never negated
                drawn, stated = drawn + 1, stated + (code == f.status)
            pathology = any(codes[CONDITIONS.index(f.obs)] and f.obs != "Support Devices" for f in findings)
            assert codes[NO_FINDING] == (0 if pathology else POSITIVE), report
        assert lo <= stated / drawn <= hi, (share, stated / drawn)


def test_normal_statements_have_one_wording_unless_varied_and_findings_have_several():
    def heart_sentences(**kw):
        return {r.split(". ")[0] for f, r, _ in _sampled(600, **kw) if not f}
    assert heart_sentences() == {"The heart is normal in size"}
    assert len(heart_sentences(normal_wordings="varied")) == 3
    cardiomegaly = {r for f, r, c in _sampled(3000, stated_share=1.0) if c[CARD] == POSITIVE
                    and len(f) == 1}
    assert len({r.split(". ")[0] for r in cardiomegaly}) >= 6


def test_make_study_is_deterministic_per_study():
    a, b = make_study(0, "val", 7, 56), make_study(0, "val", 7, 56)
    assert a[:2] == b[:2] and all(np.array_equal(x, y) for x, y in zip(a[2:], b[2:]))
    assert a[2].shape == a[3].shape == (56, 56) and a[2].dtype == np.uint8


# ---------------------------------------------------------------- the pictures (measured, not assumed)
def test_cardiomegaly_widens_the_heart_shadow_in_generated_studies():
    """Label from findings (the generator's parameters), measurement from pixels only."""
    widths = {True: [], False: []}
    for i in range(400):
        rng = np.random.default_rng([11, i])
        findings = sample_findings(rng)
        obs = {f.obs: f for f in findings}
        if "Enlarged Cardiomediastinum" in obs or ("Cardiomegaly" in obs and obs["Cardiomegaly"].status != POSITIVE):
            continue
        img = draw.frontal(findings, rng, S).astype(float)
        widths["Cardiomegaly" in obs].append(_bright_width(img, draw.HEART_CY))
    enlarged, normal = np.array(widths[True]), np.array(widths[False])
    assert len(enlarged) > 20 and len(normal) > 100
    assert enlarged.min() > np.percentile(normal, 95), (enlarged.min(), normal.max())


def test_effusion_brightens_its_own_lung_base_and_uncertain_is_fainter():
    base = dict(y0=0.6, y1=0.7, x0=0.2, x1=0.36)  # the patient's right base is on the image's left
    normal = _region(_frontal([]), **base)
    faint = _region(_frontal([Finding("Pleural Effusion", UNCERTAIN, side="right", size="small")]), **base)
    pos = _region(_frontal([Finding("Pleural Effusion", POSITIVE, side="right", size="small")]), **base)
    other_side = _region(_frontal([Finding("Pleural Effusion", POSITIVE, side="left", size="small")]), **base)
    assert normal + 10 < faint < pos - 10
    assert abs(other_side - normal) < 3


@pytest.mark.parametrize("size, darker_by", [("small", 10), ("moderate", 20)])
def test_pneumothorax_darkens_the_apex_of_its_lung(size, darker_by):
    apex = dict(y0=0.16, y1=0.22, x0=0.25, x1=0.37)  # top of the right lung (image left)
    normal, ptx = _frontal([]), _frontal([Finding("Pneumothorax", POSITIVE, side="right", size=size)])
    assert _region(ptx, **apex) < _region(normal, **apex) - darker_by
    other = _frontal([Finding("Pneumothorax", POSITIVE, side="left", size=size)])
    assert abs(_region(other, **apex) - _region(normal, **apex)) < 3


def test_wide_mediastinum_widens_the_upper_central_shadow():
    normal = _bright_width(_frontal([]), 0.3)
    wide = _bright_width(_frontal([Finding("Enlarged Cardiomediastinum", POSITIVE)]), 0.3)
    assert wide >= normal + 10


@pytest.mark.parametrize("finding, box", [
    (Finding("Consolidation", POSITIVE, side="left", zone="lower"), (0.52, 0.64, 0.66, 0.78)),
    (Finding("Lung Lesion", POSITIVE, side="right", zone="upper", cm=1.5), (0.28, 0.32, 0.23, 0.27)),
    (Finding("Lung Opacity", POSITIVE, side="right", zone="middle"), (0.42, 0.48, 0.28, 0.34)),
    (Finding("Edema", POSITIVE, size="mild"), (0.4, 0.5, 0.36, 0.42)),
    (Finding("Atelectasis", POSITIVE, side="left"), (0.57, 0.63, 0.6, 0.78)),
    (Finding("Pleural Other", POSITIVE, side="right", kind="apical"), (0.15, 0.22, 0.22, 0.40)),
])
def test_lung_findings_brighten_their_region(finding, box):
    y0, y1, x0, x1 = box
    assert _region(_frontal([finding]), y0, y1, x0, x1) > _region(_frontal([]), y0, y1, x0, x1) + 8


@pytest.mark.parametrize("kind", ["ett", "cvc", "pacemaker"])
def test_support_devices_add_pixels_brighter_than_any_anatomy(kind):
    normal = _frontal([])
    device = _frontal([Finding("Support Devices", POSITIVE, kind=kind)])
    assert (device > normal.max() + 20).sum() > 15


def test_rib_fracture_breaks_the_rib_at_the_fracture_site():
    """Along the sixth right rib's centre line, a fracture leaves a dark gap lateral in the lung."""
    k = 6 - 3
    xs = np.arange(int(0.2 * S), int(0.3 * S))
    ys = (0.16 + 0.08 * k + 0.10 * (((xs + 0.5) / S - 0.5) / 0.4) ** 2) * S
    profile = lambda img: img[ys.astype(int), xs]
    normal, broken = profile(_frontal([])), profile(_frontal([Finding("Fracture", POSITIVE, side="right", rib=6)]))
    assert broken.min() < normal.min() - 10
