"""IU X-Ray as Open-i releases it: XML reports + PNGs -> studies by R2Gen's rule, a seeded split,
annotation.json written once and reused, clear refusals naming the file.

Every XML file and PNG here is written by the test (no real report is in the repository); the
elements are the ones the Open-i release uses: AbstractText Label="FINDINGS", parentImage id.
"""
import json
import re
import os

import pytest
from PIL import Image

from mrgr1 import data, iu_xml
from mrgr1.data import DataError, load_split


def xml_report(findings, image_ids, impression="No acute disease."):
    sections = [("COMPARISON", "None."), ("INDICATION", "XXXX-year-old with cough."),
                ("FINDINGS", findings), ("IMPRESSION", impression)]
    abstract = "".join(f'<AbstractText Label="{label}">{text}</AbstractText>' if text is not None
                       else f'<AbstractText Label="{label}"/>' for label, text in sections)
    images = "".join(f'<parentImage id="{i}"><figureId>F{n}</figureId><caption>Xray Chest</caption>'
                     f"<panel type=\"single\"><url>/x/{i}.jpg</url></panel></parentImage>"
                     for n, i in enumerate(image_ids, start=1))
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><uId id="CXR"/><MedlineCitation>'
            f"<Article><Abstract>{abstract}</Abstract></Article></MedlineCitation>{images}</eCitation>")


def write_release(root, reports, png=True):
    """reports: {file number: xml text}; a 16x16 PNG for every parentImage id found."""
    os.makedirs(root / iu_xml.XML_DIR, exist_ok=True)
    os.makedirs(root / iu_xml.PNG_DIR, exist_ok=True)
    for number, text in reports.items():
        (root / iu_xml.XML_DIR / f"{number}.xml").write_text(text, encoding="utf-8")
        if png:
            for image_id in re.findall(r'parentImage id="([^"]+)"', text):
                Image.new("L", (16, 16), 128).save(root / iu_xml.PNG_DIR / f"{image_id}.png")
    return str(root)


def normal_release(root, n=20):
    """n studies that pass the rule, CXR<k>_IM-<k> with a frontal and a lateral PNG."""
    return write_release(root, {k: xml_report(f"Study {k}: the heart is normal.",
                                              [f"CXR{k}_IM-{k:04d}-1001", f"CXR{k}_IM-{k:04d}-2001"])
                                for k in range(1, n + 1)})


# ----------------------------------------------------------------------------- R2Gen's rule

def test_parse_report_reads_findings_and_image_ids_in_file_order(tmp_path):
    path = tmp_path / "7.xml"
    path.write_text(xml_report("  Heart size is\n normal.  XXXX are intact. ",
                               ["CXR7_IM-2263-1001", "CXR7_IM-2263-2001", "CXR7_IM-2263-3001"]))
    findings, images = iu_xml.parse_report(str(path))
    assert findings == "Heart size is normal. XXXX are intact."  # whitespace normalised, XXXX kept
    assert images == ["CXR7_IM-2263-1001", "CXR7_IM-2263-2001", "CXR7_IM-2263-3001"]


def test_study_id_is_the_first_image_id_without_its_suffix():
    assert iu_xml.study_id("CXR1_1_IM-0001-3001") == "CXR1_1_IM-0001"
    assert iu_xml.study_id("CXR2384_IM-0942-1001") == "CXR2384_IM-0942"


def test_rule_keeps_findings_with_two_or_more_views_and_the_first_two_views(tmp_path):
    root = write_release(tmp_path, {
        1: xml_report("Normal heart.", ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
        2: xml_report(None, ["CXR2_IM-0652-1001", "CXR2_IM-0652-2001"]),       # no findings
        3: xml_report("   ", ["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"]),      # blank findings
        4: xml_report("One view only.", ["CXR4_IM-2050-1001"]),                 # one view
        5: xml_report("Three views.", ["CXR5_IM-2117-1003", "CXR5_IM-2117-2001", "CXR5_IM-2117-4004"]),
    })
    studies, skipped = iu_xml.read_studies(root)
    assert [s["id"] for s in studies] == ["CXR1_1_IM-0001", "CXR5_IM-2117"]
    assert studies[1] == {"id": "CXR5_IM-2117", "report": "Three views.",
                          "image_path": ["CXR5_IM-2117-1003.png", "CXR5_IM-2117-2001.png"]}
    assert skipped == {"no FINDINGS": 2, "fewer than two images": 1, "repeated study id": 0}


def test_files_are_read_in_numeric_order(tmp_path):
    root = write_release(tmp_path, {k: xml_report(f"Report {k}.", [f"CXR{k}_IM-1-1001", f"CXR{k}_IM-1-2001"])
                                    for k in (10, 2, 1)})
    assert [s["report"] for s in iu_xml.read_studies(root)[0]] == ["Report 1.", "Report 2.", "Report 10."]


# ----------------------------------------------------------------------------- the split

def test_split_sizes_are_r2gens_for_2955_studies_and_proportional_otherwise():
    assert iu_xml.split_sizes(2955) == iu_xml.R2GEN_SIZES == (2069, 296, 590)
    assert iu_xml.split_sizes(100) == (70, 10, 20)
    assert iu_xml.split_sizes(20) == (14, 2, 4)
    assert sum(iu_xml.split_sizes(7)) == 7


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    root = normal_release(tmp_path, n=20)
    a, b = iu_xml.derive_annotation(root, seed=0), iu_xml.derive_annotation(root, seed=0)
    assert a == b
    ids = {s: [e["id"] for e in a[s]] for s in data.SPLITS}
    assert [len(ids[s]) for s in data.SPLITS] == [14, 2, 4]
    assert sorted(sum(ids.values(), [])) == sorted(f"CXR{k}_IM-{k:04d}" for k in range(1, 21))
    assert all(e["split"] == s for s in data.SPLITS for e in a[s])
    other = iu_xml.derive_annotation(root, seed=1)
    assert [e["id"] for e in other["test"]] != ids["test"]
    assert a["derived_from"]["seed"] == 0 and "differs from R2Gen" in a["derived_from"]["note"]


# ----------------------------------------------------------------------------- loading

def test_load_split_reads_the_xml_release_and_writes_annotation_json_once(tmp_path, capsys):
    root = normal_release(tmp_path, n=20)
    test = load_split("iu_xray", root, "test")
    out = capsys.readouterr().out
    assert "20 studies from ecgen-radiology/" in out and "differs from R2Gen" in out
    assert len(test) == 4 and all(len(s.image_paths) == 2 for s in test)
    assert all(os.path.isfile(p) and os.path.dirname(p) == os.path.join(os.path.abspath(root), "NLMCXR_png")
               for s in test for p in s.image_paths)
    assert test[0].report.startswith("Study ")
    ann_path = os.path.join(root, "annotation.json")
    with open(ann_path, encoding="utf-8") as f:
        written = json.load(f)
    assert [e["id"] for e in written["test"]] == [s.id for s in test]
    # reused, not derived again: an edit of the file (a user's own split) is what loads next time
    written["test"] = written["test"][:1]
    with open(ann_path, "w", encoding="utf-8") as f:
        json.dump(written, f)
    assert [s.id for s in load_split("iu_xray", root, "test")] == [test[0].id]
    assert len(load_split("iu_xray", root, "train")) == 14


def test_r2gen_layout_wins_when_images_folder_exists(tmp_path):
    root = normal_release(tmp_path, n=3)
    os.makedirs(tmp_path / "images" / "a")
    Image.new("L", (8, 8)).save(tmp_path / "images" / "a" / "0.png")
    with open(tmp_path / "annotation.json", "w") as f:
        json.dump({"train": [{"id": "a", "report": "R2Gen report.", "image_path": ["a/0.png"], "split": "train"}],
                   "val": [], "test": []}, f)
    assert [s.report for s in load_split("iu_xray", root, "train")] == ["R2Gen report."]


def test_missing_png_is_one_error_naming_it(tmp_path):
    root = normal_release(tmp_path, n=10)
    os.remove(tmp_path / "NLMCXR_png" / "CXR3_IM-0003-2001.png")
    with pytest.raises(DataError, match="CXR3_IM-0003-2001.png"):
        for split in data.SPLITS:
            load_split("iu_xray", root, split)


def test_missing_png_folder_says_what_to_unpack(tmp_path):
    root = normal_release(tmp_path, n=3)
    os.rename(tmp_path / "NLMCXR_png", tmp_path / "elsewhere")
    with pytest.raises(DataError, match="no NLMCXR_png/.*NLMCXR_png.tgz"):
        load_split("iu_xray", root, "train")


# ----------------------------------------------------------------------------- refusals

def test_malformed_xml_is_refused_naming_the_file(tmp_path):
    root = normal_release(tmp_path, n=3)
    (tmp_path / "ecgen-radiology" / "2.xml").write_text("<eCitation><AbstractText Label='FINDINGS'>cut off")
    with pytest.raises(DataError, match=r"2\.xml: not well-formed XML"):
        load_split("iu_xray", root, "train")
    assert not os.path.exists(tmp_path / "annotation.json")  # nothing half-derived is left


def test_a_parent_image_without_id_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "5.xml"
    path.write_text(xml_report("Normal.", ["CXR5_IM-1-1001"]).replace('<parentImage id="CXR5_IM-1-1001">',
                                                                        "<parentImage>"))
    with pytest.raises(DataError, match=r"5\.xml: a <parentImage> without an id"):
        iu_xml.parse_report(str(path))


def test_entity_declarations_are_refused_before_parsing(tmp_path):
    bomb = ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
            '<eCitation><AbstractText Label="FINDINGS">&b;</AbstractText></eCitation>')
    path = tmp_path / "9.xml"
    path.write_text(bomb)
    with pytest.raises(DataError, match=r"9\.xml: declares XML entities"):
        iu_xml.parse_report(str(path))
    path.write_bytes(bomb.replace('encoding="utf-8"', "").encode("utf-16"))  # the same in UTF-16
    with pytest.raises(DataError, match="declares XML entities"):
        iu_xml.parse_report(str(path))


def test_a_folder_with_no_usable_report_says_so(tmp_path):
    root = write_release(tmp_path, {1: xml_report(None, ["CXR1_IM-1-1001", "CXR1_IM-1-2001"])})
    with pytest.raises(DataError, match="no report with a FINDINGS section and two images among 1 XML"):
        load_split("iu_xray", root, "train")


def test_command_line_writes_the_annotation_and_refuses_to_overwrite(tmp_path, capsys):
    root = normal_release(tmp_path, n=10)
    iu_xml.main([root, "--seed", "2"])
    assert "7 train / 1 val / 2 test" in capsys.readouterr().out
    with open(tmp_path / "annotation.json") as f:
        assert json.load(f)["derived_from"]["seed"] == 2
    with pytest.raises(SystemExit, match="exists"):
        iu_xml.main([root])


def test_the_xml_release_trains_and_evaluates_end_to_end(tmp_path):
    """--dataset iu_xray --data-root <the Open-i folders>: the studies derived from the XML train the
    demo model (SFT and one GRPO step) and evaluate.py scores them, without an annotation.json given."""
    from mrgr1 import evaluate, train

    root = normal_release(tmp_path / "iu", n=20)
    out = tmp_path / "run"
    common = ["--dataset", "iu_xray", "--data-root", root, "--labeler", "rules", "--min-pixels", "784",
              "--max-pixels", "784", "--max-new-tokens", "6"]
    results = train.main(common + ["--policy", "demo", "--output-dir", str(out), "--sft-steps", "2",
                                   "--sft-batch-size", "2", "--steps", "1", "--batch-size", "2",
                                   "--num-generations", "2", "--lora-rank", "4", "--eval-limit", "2",
                                   "--sample-every", "0"])
    assert set(results) == {"before", "after"}
    assert os.path.isfile(os.path.join(root, "annotation.json"))  # derived once, reusable
    scores = evaluate.main(common + ["--policy", str(out / "sft"), "--adapter", str(out / "final"),
                                     "--limit", "2", "--output-dir", str(tmp_path / "eval")])
    assert scores["ce_micro/f1"] == results["after"]["ce_micro/f1"]
    assert "baseline/empty/ce_micro/f1" in scores
