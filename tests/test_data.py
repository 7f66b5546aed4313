"""mrgr1.data: the R2Gen-format loader, its errors, and the resumable batch order."""
import json
import os

import pytest
import torch
from PIL import Image

from mrgr1.data import DataError, Study, batch_indices, load_images, load_split, normalize_report
from mrgr1.synthetic import generate


def _png(path, value=100, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", size, value).save(path)


def _iu_folder(root, entries=None):
    """A tiny IU X-Ray-style folder: two views per study."""
    if entries is None:
        entries = {
            "train": [{"id": "CXR1_IM-0001", "report": "The heart is normal.\n  No effusion. ",
                       "image_path": ["CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png"], "split": "train"},
                      {"id": "CXR2_IM-0002", "report": "Mild cardiomegaly.",
                       "image_path": ["CXR2_IM-0002/0.png", "CXR2_IM-0002/1.png"], "split": "train"}],
            "val": [], "test": [{"id": "CXR3_IM-0003", "report": "No acute disease.",
                                 "image_path": ["CXR3_IM-0003/0.png", "CXR3_IM-0003/1.png"], "split": "test"}],
        }
    os.makedirs(root, exist_ok=True)
    for split in entries.values():
        for e in split:
            for p in e.get("image_path") or []:
                _png(os.path.join(root, "images", p))
    with open(os.path.join(root, "annotation.json"), "w") as f:
        json.dump(entries, f)
    return str(root)


def _mimic_folder(root):
    entry = {"id": "02aa804e-bde0afdd", "study_id": 50414267, "subject_id": 10000032,
             "report": "No pneumothorax.", "split": "train",
             "image_path": ["p10/p10000032/s50414267/02aa804e-bde0afdd.jpg",
                            "p10/p10000032/s50414267/174413ec-4ec4c1f7.jpg"]}
    return _iu_folder(root, {"train": [entry], "val": [], "test": []})


# ---------------------------------------------------------------- round trips
def test_iu_xray_round_trip_keeps_both_views_with_absolute_paths(tmp_path):
    root = _iu_folder(tmp_path / "iu")
    studies = load_split("iu_xray", root, "train")
    assert [s.id for s in studies] == ["CXR1_IM-0001", "CXR2_IM-0002"]
    s = studies[0]
    assert isinstance(s, Study) and s.split == "train" and s.meta == {}
    assert s.report == "The heart is normal. No effusion."
    assert s.image_paths == [os.path.join(os.path.abspath(root), "images", "CXR1_IM-0001", f"{v}.png")
                             for v in (0, 1)]
    assert [t.id for t in load_split("iu_xray", root, "test")] == ["CXR3_IM-0003"]
    assert load_split("iu_xray", root, "val") == []


def test_load_images_gives_loaded_copies_in_the_files_own_mode(tmp_path):
    # RGB conversion is the processor's (processing.to_rgb, as transformers' convert_to_rgb)
    root = _iu_folder(tmp_path / "iu")
    images = load_images(load_split("iu_xray", root, "train")[0])
    assert len(images) == 2
    assert all(im.mode == "L" and im.size == (20, 16) for im in images)
    assert images[0].getpixel((3, 3)) == 100


def test_mimic_uses_first_image_by_default_all_with_flag_and_keeps_ids(tmp_path):
    root = _mimic_folder(tmp_path / "mimic")
    one = load_split("mimic_cxr", root, "train")[0]
    every = load_split("mimic_cxr", root, "train", all_images=True)[0]
    assert len(one.image_paths) == 1 and one.image_paths[0].endswith("02aa804e-bde0afdd.jpg")
    assert len(every.image_paths) == 2
    assert one.meta == {"study_id": 50414267, "subject_id": 10000032}


def test_normalize_report_collapses_whitespace_and_keeps_case_and_punctuation():
    assert normalize_report("  Heart: NORMAL.\n\n\tNo  effusion;  stable. ") == "Heart: NORMAL. No effusion; stable."


def test_default_root_is_used_when_root_is_none(tmp_path, monkeypatch):
    _iu_folder(tmp_path / "data" / "iu_xray")
    monkeypatch.chdir(tmp_path)
    assert len(load_split("iu_xray", None, "train")) == 2


def test_demo_set_loads_with_the_same_loader(tmp_path):
    root = generate(str(tmp_path / "demo"), n_train=3, n_val=1, n_test=2, image_size=28, seed=0)
    studies = load_split("demo", root, "test")
    assert [s.id for s in studies] == ["demo_test_00000", "demo_test_00001"]
    assert [im.size for im in load_images(studies[0])] == [(28, 28), (28, 28)]


# ---------------------------------------------------------------- bad input
def test_missing_folder_names_it_and_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match="data folder not found.*nowhere") as e:
        load_split("iu_xray", str(tmp_path / "nowhere"), "train")
    assert "annotation.json" in str(e.value) and "zhjohnchan/R2Gen" in str(e.value)


def test_missing_demo_folder_says_how_to_generate_it(tmp_path):
    with pytest.raises(DataError, match="python -m mrgr1.synthetic"):
        load_split("demo", str(tmp_path / "demo"), "train")


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(DataError, match="annotation file not found: .*annotation.json"):
        load_split("iu_xray", str(tmp_path), "train")


def test_malformed_json_reports_file_line_and_column(tmp_path):
    (tmp_path / "annotation.json").write_text('{"train": [\n  {"id": "a",,}\n]}')
    with pytest.raises(DataError, match=r"annotation.json is not valid JSON \(line 2, column 14"):
        load_split("iu_xray", str(tmp_path), "train")


def test_annotation_without_split_lists_is_rejected(tmp_path):
    (tmp_path / "annotation.json").write_text('[1, 2]')
    with pytest.raises(DataError, match="'train'/'val'/'test'"):
        load_split("iu_xray", str(tmp_path), "train")


@pytest.mark.parametrize("field, message", [("report", "has no report"), ("image_path", "has no images")])
def test_entry_without_report_or_images_names_the_study(tmp_path, field, message):
    entry = {"id": "CXR9_IM-0009", "report": "No effusion.", "image_path": ["CXR9_IM-0009/0.png"],
             "split": "train"}
    entry[field] = "" if field == "report" else []
    root = _iu_folder(tmp_path, {"train": [entry], "val": [], "test": []})
    with pytest.raises(DataError, match=f"annotation.json: study CXR9_IM-0009 {message}"):
        load_split("iu_xray", root, "train")


def test_missing_image_names_the_file_and_the_study(tmp_path):
    root = _iu_folder(tmp_path)
    os.remove(os.path.join(root, "images", "CXR2_IM-0002", "1.png"))
    with pytest.raises(DataError, match=r"image not found: .*CXR2_IM-0002/1.png \(study CXR2_IM-0002"):
        load_split("iu_xray", root, "train")


def test_skip_missing_images_drops_those_studies_with_a_counted_warning(tmp_path):
    root = _iu_folder(tmp_path)
    os.remove(os.path.join(root, "images", "CXR1_IM-0001", "0.png"))
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 studies .* \(e.g. study CXR1_IM-0001\)"):
        studies = load_split("iu_xray", root, "train", skip_missing_images=True)
    assert [s.id for s in studies] == ["CXR2_IM-0002"]


def test_unreadable_image_names_the_file_and_the_study_at_load_time(tmp_path):
    root = _iu_folder(tmp_path)
    with open(os.path.join(root, "images", "CXR1_IM-0001", "1.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*CXR1_IM-0001/1.png of study CXR1_IM-0001"):
        load_split("iu_xray", root, "train")


def test_an_image_cut_short_is_named_where_it_is_decoded(tmp_path):
    root = _iu_folder(tmp_path)
    study = load_split("iu_xray", root, "train")[0]
    path = os.path.join(root, "images", "CXR1_IM-0001", "1.png")
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:  # the header survives, the pixel data does not
        f.write(head[:len(head) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*CXR1_IM-0001/1.png of study CXR1_IM-0001"):
        load_images(study)


def test_an_image_too_narrow_for_the_processor_names_the_file_and_the_study(tmp_path):
    root = _iu_folder(tmp_path)
    _png(os.path.join(root, "images", "CXR1_IM-0001", "0.png"), size=(402, 2))  # 201:1
    with pytest.raises(DataError, match=r"image .*CXR1_IM-0001/0.png of study CXR1_IM-0001 is 402x2 px"):
        load_split("iu_xray", root, "train")


def test_unknown_dataset_and_split_are_rejected(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'chexpert'"):
        load_split("chexpert", str(tmp_path), "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split("iu_xray", str(tmp_path), "dev")


# ---------------------------------------------------------------- batch order
def test_batch_indices_is_a_permutation_split_into_batches():
    batches = batch_indices(10, 4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert [len(b) for b in batch_indices(10, 4, seed=3, epoch=0, drop_last=True)] == [4, 4]


def test_batch_indices_is_deterministic_and_follows_torch_generator_seed_plus_epoch():
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + 2)).tolist()
    assert [i for b in batch_indices(10, 3, seed=7, epoch=2) for i in b] == expected
    assert batch_indices(10, 3, seed=7, epoch=2) == batch_indices(10, 3, seed=7, epoch=2)
    assert batch_indices(10, 3, seed=7, epoch=2) != batch_indices(10, 3, seed=7, epoch=3)


def test_resuming_mid_epoch_continues_with_the_remaining_batches():
    full = batch_indices(50, 8, seed=0, epoch=1)
    done = 3  # a trainer saved (epoch=1, batch=3)
    assert batch_indices(50, 8, seed=0, epoch=1)[done:] == full[done:]
    assert {i for b in full[:done] for i in b}.isdisjoint(i for b in full[done:] for i in b)
