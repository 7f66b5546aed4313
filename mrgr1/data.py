"""Chest X-ray report data sets in R2Gen's release format, and a resumable batch order.

One loader serves IU X-Ray, MIMIC-CXR and the embedded demo set (mrgr1/synthetic.py),
because all three use the layout of the R2Gen releases (Chen et al., EMNLP 2020,
github.com/zhjohnchan/R2Gen):

    <root>/annotation.json      {"train": [...], "val": [...], "test": [...]}
    <root>/images/<image_path>  each entry's image paths are relative to images/

An entry is {"id": str, "report": str, "image_path": [str, ...], "split": str}.
MIMIC-CXR entries also carry "subject_id" and "study_id"; they go into Study.meta.

Example:
    studies = load_split("demo", None, "train")          # data/demo
    images = load_images(studies[0])                      # [frontal, lateral] PIL images
    for batch in batch_indices(len(studies), 8, seed=0, epoch=0): ...
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps

from .files import read_json

DATASETS = ("iu_xray", "mimic_cxr", "demo")
SPLITS = ("train", "val", "test")
DEFAULT_ROOTS = {"iu_xray": "data/iu_xray", "mimic_cxr": "data/mimic_cxr", "demo": "data/demo"}

WHERE_TO_GET_DATA = """\
Where to get the data (mrgr1 downloads none of it):
  demo       written by `python -m mrgr1.synthetic --out data/demo` (no download).
  iu_xray    IU X-Ray (Demner-Fushman et al., 2016) as preprocessed by R2Gen: the README of
             github.com/zhjohnchan/R2Gen links the archive; unpack it to data/iu_xray. Or the
             Open-i release (NLMCXR_reports.tgz + NLMCXR_png.tgz from openi.nlm.nih.gov) unpacked
             there as ecgen-radiology/ + NLMCXR_png/ (annotation.json is derived: mrgr1/iu_xml.py).
  mimic_cxr  MIMIC-CXR (Johnson et al., 2019) as preprocessed by R2Gen: the same README links it;
             unpack it to data/mimic_cxr. MIMIC-CXR in any form needs a credentialed PhysioNet
             account and the signed data use agreement; the original images (MIMIC-CXR-JPG) are on
             physionet.org. Image paths look like p10/p10000032/s50414267/<dicom_id>.jpg.
Expected layout of every data set:
  <root>/annotation.json   {"train": [...], "val": [...], "test": [...]}, entries
                           {"id", "report", "image_path": [paths relative to images/], "split"}
  <root>/images/...        the image files
"""


class DataError(ValueError):
    """A data set folder, annotation file or image that does not match the expected layout."""


@dataclass
class Study:
    """One imaging study and its reference report."""
    id: str
    report: str               # whitespace-normalised reference report
    image_paths: list[str]    # absolute paths; IU X-Ray/demo: [frontal, lateral]
    split: str
    meta: dict = field(default_factory=dict)  # extra annotation fields (MIMIC: subject_id, study_id)


def normalize_report(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends.

    Case and punctuation are kept: the generator is a chat LLM that writes ordinary prose.
    >>> normalize_report("  The heart is  normal.\\n\\nNo effusion. ")
    'The heart is normal. No effusion.'
    """
    return re.sub(r"\s+", " ", text).strip()


def _read_annotation(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path}\n{WHERE_TO_GET_DATA}")
    ann = read_json(path, "re-download or re-generate it (R2Gen's annotation.json is UTF-8 JSON)",
                    error=DataError, expect=None)
    if not isinstance(ann, dict) or not any(s in ann for s in SPLITS):
        raise DataError(f"{path} must be a JSON object with 'train'/'val'/'test' lists of studies, as in "
                        f"R2Gen's release (docs/real-data.md); re-download or re-generate it")
    return ann


def _entry_to_study(entry, ann_path: str, images_dir: str, split: str, index: int,
                    all_images: bool) -> Study:
    """Check one annotation entry and turn it into a Study (image existence is checked later)."""
    if not isinstance(entry, dict):
        raise DataError(f"{ann_path}: entry {index} of '{split}' is not an object")
    if "id" not in entry:
        raise DataError(f"{ann_path}: entry {index} of '{split}' has no 'id'")
    sid = str(entry["id"])
    report = entry.get("report")
    if not isinstance(report, str) or not report.strip():
        raise DataError(f"{ann_path}: study {sid} has no report (expected a non-empty 'report' string)")
    rel_paths = entry.get("image_path")
    if isinstance(rel_paths, str):
        rel_paths = [rel_paths]
    if not rel_paths or not all(isinstance(p, str) and p for p in rel_paths):
        raise DataError(f"{ann_path}: study {sid} has no images (expected 'image_path': "
                        "[paths relative to images/])")
    if not all_images:
        rel_paths = rel_paths[:1] if _one_image_default(entry) else rel_paths
    meta = {k: v for k, v in entry.items() if k not in ("id", "report", "image_path", "split")}
    return Study(id=sid, report=normalize_report(report),
                 image_paths=[os.path.abspath(os.path.join(images_dir, p)) for p in rel_paths],
                 split=str(entry.get("split", split)), meta=meta)


def _one_image_default(entry: dict) -> bool:
    """MIMIC-CXR entries (they carry study_id) use their first image unless all_images=True,
    as R2Gen does; IU X-Ray and demo studies always use both views."""
    return "study_id" in entry


def load_split(dataset: str, root: str | None, split: str, *, all_images: bool = False,
               skip_missing_images: bool = False, check_images: bool = True) -> list[Study]:
    """Load one split of `dataset` ("iu_xray" | "mimic_cxr" | "demo") from `root`.

    root None -> DEFAULT_ROOTS[dataset]. MIMIC-CXR studies use one image unless all_images.
    Every image file must exist, or DataError names it; skip_missing_images=True drops such
    studies instead and warns with their count and an example id. check_images=False, for a
    caller that reads the reports alone, opens no image (nor checks that it exists).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = root or DEFAULT_ROOTS[dataset]
    if not os.path.isdir(root):
        hint = ("; write it with `python -m mrgr1.synthetic --out " + root + "`"
                if dataset == "demo" else "")
        raise DataError(f"data folder not found: {root}{hint}\n{WHERE_TO_GET_DATA}")
    ann_path, images_dir = os.path.join(root, "annotation.json"), os.path.join(root, "images")
    if dataset == "iu_xray":
        from . import iu_xml  # the Open-i XML release: annotation.json derived on first use
        if iu_xml.is_xml_release(root):
            ann_path, images_dir = iu_xml.prepare(root)
    ann = _read_annotation(ann_path)
    entries = ann.get(split)
    if not isinstance(entries, list):
        raise DataError(f"{ann_path} has no '{split}' list of studies")
    studies = [_entry_to_study(e, ann_path, images_dir, split, i, all_images)
               for i, e in enumerate(entries)]
    _check_unique_ids(studies, ann_path, split)
    return _check_images(studies, ann_path, skip_missing_images) if check_images else studies


def _check_unique_ids(studies: list[Study], ann_path: str, split: str) -> None:
    """An id names one study: rewards, prompts and predictions are found again by it, so two
    studies sharing one would be scored against each other's reports."""
    entries: dict[str, list[int]] = {}
    for i, s in enumerate(studies):
        entries.setdefault(s.id, []).append(i)
    repeated = [(sid, where) for sid, where in entries.items() if len(where) > 1]
    if repeated:
        named = "; ".join(f"{sid!r} (entries {', '.join(map(str, where))})" for sid, where in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise DataError(f"{ann_path}: the '{split}' split uses {len(repeated)} study id(s) more than once: "
                        f"{named}{more}; give every study its own id")


def _check_images(studies: list[Study], ann_path: str, skip_missing: bool) -> list[Study]:
    """Every image of every study exists and has a readable header of a size the processor takes
    (nothing is decoded: that is a header read per image, before any work)."""
    kept, skipped = [], []
    for s in studies:
        missing = [p for p in s.image_paths if not os.path.isfile(p)]
        if not missing:
            for path in s.image_paths:
                open_image(path, s.id).close()
            kept.append(s)
        elif skip_missing:
            skipped.append(s.id)
        else:
            raise DataError(f"image not found: {missing[0]} (study {s.id} in {ann_path}); image paths "
                            "are relative to the images/ folder beside annotation.json. Pass "
                            "skip_missing_images=True to skip such studies.")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(studies)} studies in {ann_path} with missing "
                      f"images (e.g. study {skipped[0]})", stacklevel=3)
    return kept


MAX_ASPECT_RATIO = 200  # the longest side over the shortest that Qwen2-VL's smart resize accepts
# What PIL raises for a missing, truncated, foreign or damaged image file (a broken stream is an
# OSError; a damaged PNG chunk a SyntaxError; a few decoders raise ValueError or EOFError)
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError)


def open_image(path: str, study_id: str) -> Image.Image:
    """The image file opened lazily (PIL reads its header, no pixels), checked before anything
    decodes it: a size above PIL's Image.MAX_IMAGE_PIXELS (a decompression bomb: a small file that
    would decode to gigabytes) and an aspect ratio the processor cannot resize are refused by name.
    The one place an image file is opened; the caller closes it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL warns at 1x its limit
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} of study {study_id} would decode to more pixels than PIL allows "
                        f"({e}); it was not decoded: downscale it or leave the study out") from None
    except _UNREADABLE as e:
        raise DataError(f"cannot read image {path} of study {study_id}: {e}; replace the file or "
                        f"leave the study out") from None
    w, h = image.size
    limit = Image.MAX_IMAGE_PIXELS
    problem = None
    if limit is not None and w * h > limit:
        problem = (f"is {w}x{h} px ({w * h:,} pixels), more than PIL's limit of {limit:,} (a decompression "
                   f"bomb guard); it was not decoded: downscale it or leave the study out")
    elif max(w, h) > MAX_ASPECT_RATIO * min(w, h):  # Qwen2-VL's resize refuses these
        problem = (f"is {w}x{h} px: an aspect ratio above {MAX_ASPECT_RATIO} is not supported; crop it "
                   f"or leave the study out")
    if problem:
        image.close()
        raise DataError(f"image {path} of study {study_id} {problem}")
    return image


def load_images(study: Study) -> list[Image.Image]:
    """The study's images as PIL images, turned upright by their EXIF orientation (as transformers'
    load_image) and in their own mode: the processor converts them to RGB as transformers does
    (transparency on white; processing.to_rgb). A file cut short is found here, where it is decoded."""
    images = []
    for path in study.image_paths:
        with open_image(path, study.id) as im:
            try:
                images.append(ImageOps.exif_transpose(im))  # a loaded copy, valid after the file closes
            except _UNREADABLE as e:
                raise DataError(f"cannot read image {path} of study {study.id}: {e}; the file is "
                                f"damaged or cut short: replace it or leave the study out") from None
    return images


def batch_indices(n_studies: int, batch_size: int, seed: int, epoch: int,
                  drop_last: bool = False) -> list[list[int]]:
    """The shuffled batches of one epoch: a permutation drawn from torch.Generator(seed + epoch).

    Deterministic in (seed, epoch), so a trainer resumes mid-epoch by recomputing the list and
    skipping the batches it already did. The last batch may be short unless drop_last.
    >>> batch_indices(5, 2, seed=0, epoch=0) == batch_indices(5, 2, seed=0, epoch=0)
    True
    """
    if n_studies < 0 or batch_size < 1:
        raise ValueError(f"need n_studies >= 0 and batch_size >= 1, got {n_studies}, {batch_size}")
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_studies, generator=g).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n_studies, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
