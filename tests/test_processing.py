"""Processor against transformers (image processor, tokenizer, full Qwen2.5-VL processor) and the
real Qwen tokenizer.json."""
import numpy as np
import pytest
import torch
from PIL import Image

from mrgr1.processing import Processor, image_patches, smart_resize, train_demo_tokenizer

# The Qwen2.5-VL chat template as published in the model's chat_template.json: the oracle for ours.
QWEN25VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


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
