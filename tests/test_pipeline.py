"""mrgr1.pipeline.load_policy on real-checkpoint-like folders: the run's image resolution whatever the
preprocessor file says, and one line for each file mrgr1 reads differently from transformers.

The folders are the demo policy (pipeline.demo_policy_folder) plus the files a downloaded Qwen2.5-VL
folder carries, written by the tests."""
import json

import numpy as np
import pytest
from PIL import Image

from mrgr1 import pipeline
from mrgr1.processing import DEFAULT_MAX_PIXELS, QWEN25_VL_CHAT_TEMPLATE

REPORTS = ["The heart is normal in size. The lungs are clear.",
           "Mild cardiomegaly. Small left pleural effusion. No pneumothorax."] * 5
# Qwen2.5-VL's published preprocessor range (up to 12.8 M pixels per image).
QWEN_PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
                     "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}


@pytest.fixture
def folder(tmp_path):
    path = pipeline.demo_policy_folder(str(tmp_path / "policy"), REPORTS, ("system", "instruction", "think"), vocab_size=300)
    with open(tmp_path / "policy" / "preprocessor_config.json", "w") as f:
        json.dump(QWEN_PREPROCESSOR, f)
    return path


def _image_tokens(processor, height, width):
    view = Image.fromarray(np.zeros((height, width), np.uint8))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Report?"}]}]
    return int((processor([conv], images=[[view]])["input_ids"] == processor.image_token_id).sum())


def test_real_preprocessor_range_is_replaced_by_the_default_resolution(folder):
    _, processor = pipeline.load_policy(folder)
    assert processor.image_kwargs["max_pixels"] == DEFAULT_MAX_PIXELS == 448 * 448
    # a 2500x2048 view: 6,497 tokens under the file's range; at most 448x448 px = 256 tokens here
    assert _image_tokens(processor, 2500, 2048) <= 256


def test_given_resolution_wins_over_the_preprocessor_file(folder):
    _, processor = pipeline.load_policy(folder, min_pixels=28 * 28, max_pixels=84 * 84)
    assert (processor.image_kwargs["min_pixels"], processor.image_kwargs["max_pixels"]) == (784, 7056)
    assert _image_tokens(processor, 2500, 2048) <= 9


@pytest.mark.parametrize("name", ["chat_template.json", "chat_template.jinja"])
def test_a_chat_template_other_than_qwens_is_named_in_one_line(folder, name, capsys):
    other = QWEN25_VL_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You are a doctor.")
    with open(f"{folder}/{name}", "w") as f:
        f.write(json.dumps({"chat_template": other}) if name.endswith(".json") else other)
    pipeline.load_policy(folder)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"{folder}/{name}" in lines[0] and "built-in Qwen2.5-VL template" in lines[0]


@pytest.mark.parametrize("name", ["chat_template.json", "chat_template.jinja"])
def test_the_published_qwen_chat_template_gives_no_note(folder, name, capsys):
    with open(f"{folder}/{name}", "w") as f:
        f.write(json.dumps({"chat_template": QWEN25_VL_CHAT_TEMPLATE}) if name.endswith(".json")
                else QWEN25_VL_CHAT_TEMPLATE + "\n")
    pipeline.load_policy(folder)
    assert capsys.readouterr().out == ""


def test_generation_settings_the_sampler_does_not_apply_are_named(folder, capsys):
    with open(f"{folder}/generation_config.json", "w") as f:
        json.dump({"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                   "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}, f)
    pipeline.load_policy(folder)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"{folder}/generation_config.json" in lines[0]
    assert "repetition_penalty=1.05" in lines[0] and "temperature=0.1" in lines[0]


def test_plain_generation_settings_give_no_note(folder, capsys):
    with open(f"{folder}/generation_config.json", "w") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "repetition_penalty": 1.0,
                   "num_beams": 1}, f)
    pipeline.load_policy(folder)
    assert capsys.readouterr().out == ""
