"""IU X-Ray as Indiana University released it (Open-i): XML reports -> an R2Gen-style annotation.json.

The Open-i download unpacks to one XML report per study and one PNG per image:

    <root>/ecgen-radiology/1.xml ... 3999.xml   (NLMCXR_reports.tgz)
    <root>/NLMCXR_png/CXR1_1_IM-0001-3001.png    (NLMCXR_png.tgz), named by image id

What is read from each XML file (the elements public parsers of this release read; nothing else
is relied on, neither the root element's name nor the nesting):
    <AbstractText Label="FINDINGS">...</AbstractText>   the findings section (also COMPARISON,
                                                        INDICATION, IMPRESSION: not used)
    <parentImage id="CXR1_1_IM-0001-3001">...</parentImage>   one per image, in file order

Studies follow R2Gen's rule (Chen et al., EMNLP 2020): a non-empty FINDINGS section and at least
two images; the id is the first image's id without its "-NNNN" suffix (CXR1_1_IM-0001); the report
is the findings text (whitespace normalised, case kept); the images are the first two in the
file's order. The split is ours: a seeded shuffle cut 70/10/20 with R2Gen's sizes (2,069 / 296 /
590 of 2,955 studies; proportional for other counts). Its membership differs from R2Gen's
split, so figures on it are not comparable study for study with papers that use R2Gen's
annotation.json; for that, use R2Gen's release (annotation.json + images/) instead.

The result is written to <root>/annotation.json (image paths relative to NLMCXR_png/) on first
use and read from there afterwards, so it can be kept, inspected, or replaced by another split in
the same format. Its top-level "derived_from" says how it was made.

XML safety: these are local files the user supplies, parsed with xml.etree (expat). Expat does
not fetch external entities (a reference to one is an "undefined entity" error), and a file that
declares entities at all (<!ENTITY, the "billion laughs" expansion) is refused before parsing:
the Open-i reports need none.

    python -m mrgr1.iu_xml data/iu_xray            # writes data/iu_xray/annotation.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np

from .data import DataError, normalize_report

XML_DIR, PNG_DIR, ANNOTATION = "ecgen-radiology", "NLMCXR_png", "annotation.json"
R2GEN_SIZES = (2069, 296, 590)  # R2Gen's train / val / test sizes of its 2,955 IU X-Ray studies
SPLIT_NOTE = ("split drawn by mrgr1 (seeded 70/10/20 with R2Gen's sizes); its membership differs from "
              "R2Gen's annotation.json, so results are not comparable study for study with papers using R2Gen's split")
_ENTITY_DECLARATIONS = tuple("<!ENTITY".encode(codec) for codec in ("utf-8", "utf-16-le", "utf-16-be"))
_noted: set[str] = set()  # roots whose split note was printed in this process


def is_xml_release(root: str) -> bool:
    """The Open-i layout: ecgen-radiology/ and no images/ folder (R2Gen's layout wins when both are there)."""
    return os.path.isdir(os.path.join(root, XML_DIR)) and not os.path.isdir(os.path.join(root, "images"))


def parse_report(path: str) -> tuple[str, list[str]]:
    """(findings text, image ids in file order) of one Open-i XML report; DataError names the file."""
    with open(path, "rb") as f:
        raw = f.read()
    if any(decl in raw for decl in _ENTITY_DECLARATIONS):
        raise DataError(f"{path}: declares XML entities (<!ENTITY), which Open-i reports never do; refused "
                        "(entity expansion can exhaust memory). Re-extract NLMCXR_reports.tgz or remove the file")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise DataError(f"{path}: not well-formed XML ({e}); re-extract NLMCXR_reports.tgz or remove "
                        "the file") from e
    findings = [" ".join(el.itertext()) for el in root.iter("AbstractText") if el.get("Label") == "FINDINGS"]
    images = []
    for el in root.iter("parentImage"):
        if not el.get("id"):
            raise DataError(f"{path}: a <parentImage> without an id attribute (expected e.g. "
                            "id=\"CXR1_1_IM-0001-3001\", the PNG's name); re-extract NLMCXR_reports.tgz")
        images.append(el.get("id"))
    return normalize_report(" ".join(findings)), images


def study_id(image_id: str) -> str:
    """R2Gen's study id: the first image id without its "-NNNN" suffix.

    >>> study_id("CXR1_1_IM-0001-3001")
    'CXR1_1_IM-0001'
    """
    return re.sub(r"-\d+$", "", image_id)


def split_sizes(n: int) -> tuple[int, int, int]:
    """70/10/20 rounded half up, the test split taking the rest: R2Gen's (2069, 296, 590) for 2,955.

    >>> split_sizes(2955)
    (2069, 296, 590)
    """
    train, val = (7 * n + 5) // 10, (n + 5) // 10
    return train, val, n - train - val


def _xml_files(xml_dir: str) -> list[str]:
    """*.xml in numeric order (1.xml, 2.xml, ..., 10.xml), the order every rule below uses."""
    names = [n for n in os.listdir(xml_dir) if n.lower().endswith(".xml")]
    return sorted(names, key=lambda n: (int(m.group()) if (m := re.match(r"\d+", n)) else float("inf"), n))


def read_studies(root: str) -> tuple[list[dict], dict]:
    """The studies R2Gen's rule keeps, in file order, and how many reports each rule left out."""
    xml_dir = os.path.join(root, XML_DIR)
    studies, seen = [], {}
    skipped = {"no FINDINGS": 0, "fewer than two images": 0, "repeated study id": 0}
    for name in _xml_files(xml_dir):
        path = os.path.join(xml_dir, name)
        findings, images = parse_report(path)
        if not findings:
            skipped["no FINDINGS"] += 1
        elif len(images) < 2:
            skipped["fewer than two images"] += 1
        elif study_id(images[0]) in seen:
            skipped["repeated study id"] += 1
        else:
            seen[study_id(images[0])] = path
            studies.append({"id": study_id(images[0]), "report": findings,
                            "image_path": [f"{i}.png" for i in images[:2]]})
    if not studies:
        raise DataError(f"{xml_dir}: no report with a FINDINGS section and two images among "
                        f"{sum(skipped.values())} XML files; is this the Open-i release (NLMCXR_reports.tgz)?")
    return studies, skipped


def derive_annotation(root: str, seed: int = 0) -> dict:
    """{"train", "val", "test": entries, "derived_from": how} from <root>/ecgen-radiology."""
    studies, skipped = read_studies(root)
    n_train, n_val, _ = split_sizes(len(studies))
    order = np.random.default_rng(seed).permutation(len(studies))
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    ann = {split: [{**studies[i], "split": split} for i in sorted(idx.tolist())] for split, idx in cuts.items()}
    ann["derived_from"] = {
        "source": f"{XML_DIR}/*.xml (Open-i release of IU X-Ray)", "images": f"{PNG_DIR}/",
        "rule": "non-empty FINDINGS and at least two images; id = first image id without -NNNN; "
                "report = findings; the first two images in file order",
        "seed": seed, "studies": len(studies), "skipped": skipped, "note": SPLIT_NOTE}
    return ann


def write_annotation(ann: dict, path: str) -> None:
    """Written to a temporary file and renamed: an interrupted write leaves no half file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(ann, f, indent=1)
    os.replace(tmp, path)


def prepare(root: str, seed: int = 0) -> tuple[str, str]:
    """(annotation.json path, images folder) of an Open-i folder, deriving annotation.json on first use."""
    ann_path, images_dir = os.path.join(root, ANNOTATION), os.path.join(root, PNG_DIR)
    if not os.path.isdir(images_dir):
        raise DataError(f"{root} holds {XML_DIR}/ but no {PNG_DIR}/: unpack NLMCXR_png.tgz there "
                        f"(PNG files named by image id, e.g. CXR1_1_IM-0001-3001.png)")
    if not os.path.isfile(ann_path):
        ann = derive_annotation(root, seed)
        try:
            write_annotation(ann, ann_path)
        except OSError as e:
            raise DataError(f"cannot write {ann_path} ({e.strerror}); copy {root} somewhere writable, or "
                            f"run `python -m mrgr1.iu_xml {root} --out FILE` and put FILE there") from e
        how = ann["derived_from"]
        print(f"{ann_path}: {how['studies']} studies from {XML_DIR}/ by R2Gen's rule (left out: "
              + ", ".join(f"{v} {k}" for k, v in how["skipped"].items()) + ")")
    if root not in _noted:
        _noted.add(root)
        with open(ann_path, encoding="utf-8") as f:
            derived = "derived_from" in json.load(f)
        if derived:
            print(f"note: {ann_path}: {SPLIT_NOTE}")
    return ann_path, images_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write annotation.json for the Open-i release of IU X-Ray "
                                            "(ecgen-radiology/ + NLMCXR_png/)")
    p.add_argument("root", help="the folder holding ecgen-radiology/ and NLMCXR_png/")
    p.add_argument("--seed", type=int, default=0, help="the split's shuffle (default 0)")
    p.add_argument("--out", default=None, help="default <root>/annotation.json (refused if it exists)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.root, ANNOTATION)
    if os.path.exists(out):
        raise SystemExit(f"error: {out} exists; delete it to derive it again, or give --out")
    try:
        ann = derive_annotation(args.root, args.seed)
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    write_annotation(ann, out)
    sizes = " / ".join(f"{len(ann[s])} {s}" for s in ("train", "val", "test"))
    print(f"wrote {out}: {sizes}\nnote: {SPLIT_NOTE}")


if __name__ == "__main__":
    main()
