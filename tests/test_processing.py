"""Processor against transformers (image processor, preprocessor files, image modes, tokenizer, full
Qwen2.5-VL processor) and the real Qwen tokenizer.json."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mrgr1.processing import (QWEN25_VL_CHAT_TEMPLATE as QWEN25VL_TEMPLATE, Processor, image_patches,
                              read_preprocessor_config, smart_resize, to_rgb, train_demo_tokenizer)

def random_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def hf_image_processor(min_pixels, max_pixels):
    # In transformers 5 the PIL/numpy ("slow") backend is Qwen2VLImageProcessorPil.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_tokenizer(folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json")


def test_smart_resize_worked_examples():
    # 100x150: round to multiples of 28 -> 112x140 = 15,680 px, inside [3136, 200704].
    assert smart_resize(100, 150) == (112, 140)
    # 1000x800 = 800,000 px > 200,704: beta = sqrt(800000/200704) = 1.9965; 1000/1.9965/28 = 17.9 -> 17*28 = 476,
    # 800/1.9965/28 = 14.3 -> 14*28 = 392.
    assert smart_resize(1000, 800) == (476, 392)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)


@pytest.mark.parametrize("h, w, mode", [(61, 97, "RGB"), (123, 45, "L"), (301, 257, "RGB")])
def test_image_patches_equal_transformers_pil_processor(h, w, mode):
    image = random_image(h, w, mode, seed=h)
    ref = hf_image_processor(56 * 56, 150 * 150)(images=[image], return_tensors="np")
    patches, grid = image_patches(image, min_pixels=56 * 56, max_pixels=150 * 150)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert patches.shape == ref["pixel_values"].shape
    assert np.abs(patches - ref["pixel_values"]).max() <= 1e-5


def test_real_qwen_tokenizer_special_token_ids(qwen_tokenizer_dir):
    proc = Processor.from_pretrained(qwen_tokenizer_dir)
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
                "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert proc.ids == expected
    tok = hf_tokenizer(qwen_tokenizer_dir)
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected


def test_chat_prompt_with_image_matches_transformers_processor(qwen_tokenizer_dir):
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = hf_tokenizer(qwen_tokenizer_dir)
    hf = Qwen2_5_VLProcessor(image_processor=hf_image_processor(56 * 56, 200704), tokenizer=tok,
                             video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN25VL_TEMPLATE)
    img_a, img_b = random_image(90, 130, "L", seed=1), random_image(70, 60, seed=2)
    convs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Findings? Café, 12 mm."}]}],
        [{"role": "system", "content": "You are a radiologist."},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write the report."}]}],
    ]
    texts = [tok.apply_chat_template(c, chat_template=QWEN25VL_TEMPLATE, tokenize=False, add_generation_prompt=True)
             for c in convs]
    tok.padding_side = "left"
    tok.pad_token = "<|endoftext|>"
    ref = hf(text=texts, images=[img_a, img_b], padding=True, return_tensors="pt")

    proc = Processor.from_pretrained(qwen_tokenizer_dir, max_pixels=200704)
    out = proc(convs, images=[[img_a], [img_b]])
    assert proc.apply_chat_template(convs[0]) == texts[0]
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert (out["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5
    # the template's frame: system prompt first, generation prompt last
    assert out["input_ids"][0, -3:].tolist() == tok.encode("<|im_start|>assistant\n")


def test_decode_strips_special_tokens(qwen_tokenizer_dir):
    proc = Processor.from_pretrained(qwen_tokenizer_dir)
    ids = proc.encode("<think>ok</think><report>No acute disease.</report><|im_end|><|endoftext|>")
    assert proc.decode(ids) == "<think>ok</think><report>No acute disease.</report>"
    assert proc.batch_decode(torch.tensor([ids, ids])) == ["<think>ok</think><report>No acute disease.</report>"] * 2


def test_image_slot_count_mismatch_is_a_clear_error(qwen_tokenizer_dir):
    proc = Processor.from_pretrained(qwen_tokenizer_dir)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> slots but 2 images"):
        proc([conv], images=[[random_image(56, 56), random_image(56, 56)]])


REPORTS = ["The heart is normal in size. The lungs are clear.",
           "Mild cardiomegaly. Small left pleural effusion. No pneumothorax.",
           "No acute cardiopulmonary abnormality. Lungs are clear bilaterally."] * 5


def test_demo_tokenizer_round_trips_and_keeps_qwen_special_order(tmp_path):
    train_demo_tokenizer(REPORTS, vocab_size=320, path=str(tmp_path))
    loaded = Processor.from_pretrained(str(tmp_path))
    ids = loaded.ids
    assert [ids[t] for t in ids] == sorted(ids.values())  # same relative order as Qwen's 151643..151656
    assert ids["<|endoftext|>"] == loaded.tokenizer.get_vocab_size() - 18  # 14 specials + 4 format tokens at the end
    text = "<think>small effusion</think><report>Mild cardiomegaly. Small left pleural effusion.</report>"
    enc = loaded.encode(text + "<|im_end|>")
    assert loaded.tokenizer.token_to_id("<think>") in enc and enc[-1] == ids["<|im_end|>"]
    assert loaded.decode(enc) == text
    # transformers reads the same file to the same ids
    assert hf_tokenizer(str(tmp_path)).encode(text) == loaded.encode(text)


def test_tiny_model_folder_runs_from_pretrained(tmp_path):
    from mrgr1.config import preset
    from mrgr1.vlm import Qwen2_5_VL

    proc = train_demo_tokenizer(REPORTS, vocab_size=320, path=str(tmp_path))
    Qwen2_5_VL.from_config(preset("tiny", **proc.model_overrides()), seed=0).save_pretrained(str(tmp_path))
    model, proc = Qwen2_5_VL.from_pretrained(str(tmp_path)), Processor.from_pretrained(str(tmp_path))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Report?"}]}]
    batch = proc([conv, conv[:0] + [{"role": "user", "content": "Text only."}]],
                 images=[[random_image(120, 100, "L")], []])
    with torch.no_grad():
        logits = model(**batch)
    assert logits.shape == (2, batch["input_ids"].shape[1], proc.tokenizer.get_vocab_size())
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- preprocessor files and image modes
# Qwen2.5-VL's published preprocessor range: min_pixels 3136, max_pixels 12845056.
@pytest.mark.parametrize("fields", [
    {"min_pixels": 3136, "max_pixels": 12845056},
    {"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 56 * 56, "longest_edge": 200704}},
    {"max_pixels": 12845056, "size": {"shortest_edge": 28 * 28, "longest_edge": 200704}},
    {"size": {"shortest_edge": 3136, "longest_edge": 12845056}},
    {},
], ids=["min-max", "min-max-over-size", "max-over-size", "size-only", "neither"])
def test_preprocessor_pixel_range_follows_transformers_precedence(tmp_path, fields):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", **fields}, f)
    hf = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path)).size
    ours = read_preprocessor_config(str(tmp_path / "preprocessor_config.json"))
    assert (ours["min_pixels"], ours["max_pixels"]) == (hf.shortest_edge, hf.longest_edge)


def test_preprocessor_size_without_both_edges_is_a_clear_error(tmp_path):
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": 3136}}, f)
    with pytest.raises(ValueError, match="preprocessor_config.json: 'size' must hold both"):
        read_preprocessor_config(str(tmp_path / "preprocessor_config.json"))


def _transparent_images():
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 61, 4), dtype=np.uint8), mode="RGBA")
    la = Image.fromarray(rng.integers(0, 256, (40, 33, 2), dtype=np.uint8), mode="LA")
    palette = Image.fromarray(rng.integers(0, 4, (50, 50), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10, 90, 90, 90])
    palette.info["transparency"] = 2  # palette index 2 is see-through
    return {"RGBA": rgba, "LA": la, "P+transparency": palette}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency"])
def test_transparency_is_composited_on_white_as_transformers(mode):
    image = _transparent_images()[mode]
    ref = hf_image_processor(56 * 56, 150 * 150)(images=[image], return_tensors="np")
    patches, _ = image_patches(image, min_pixels=56 * 56, max_pixels=150 * 150)
    assert np.abs(patches - ref["pixel_values"]).max() <= 1e-5
    assert to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grayscale_is_converted_as_transformers_with_a_warning():
    values = np.random.default_rng(4).integers(0, 65536, (70, 90), dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    ref = hf_image_processor(56 * 56, 150 * 150)(images=[image], return_tensors="np")
    with pytest.warns(UserWarning, match="values above 255 become white"):
        patches, _ = image_patches(image, min_pixels=56 * 56, max_pixels=150 * 150)
    assert np.abs(patches - ref["pixel_values"]).max() <= 1e-5


def test_a_loaded_rgba_file_with_exif_rotation_reaches_the_model_as_in_transformers(tmp_path):
    from PIL import ImageOps

    from mrgr1.data import Study, load_images

    image = _transparent_images()["RGBA"]
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "view.png", exif=exif)
    ours, = load_images(Study(id="s", report="r", image_paths=[str(tmp_path / "view.png")], split="test"))
    with Image.open(tmp_path / "view.png") as f:
        upright = ImageOps.exif_transpose(f)  # transformers' load_image turns images upright like this
    assert ours.size == (45, 61)
    ref = hf_image_processor(56 * 56, 150 * 150)(images=[upright], return_tensors="np")
    assert np.abs(image_patches(ours, min_pixels=56 * 56, max_pixels=150 * 150)[0] - ref["pixel_values"]).max() <= 1e-5
