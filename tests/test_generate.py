"""Specification of mrgr1.generate: the batched KV-cache sampler (GRPO's rollout engine).

Oracles: transformers' Qwen2_5_VLForConditionalGeneration.generate on the same tiny random
weights (loaded from a save_pretrained folder), and our own model's full, uncached forward.
"""
import pytest
import torch

from mrgr1.generate import generate, keep_top_p
from mrgr1.vlm import Qwen2_5_VL

transformers = pytest.importorskip("transformers")

VOCAB, IMAGE, VSTART, VEND = 300, 295, 297, 298
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch
GRIDS = [(1, 4, 4), (1, 6, 4), (1, 4, 8)]  # one image per prompt: 4, 6 and 8 merged tokens
TEXT_LENGTHS = [(3, 2), (7, 5), (1, 1)]  # text tokens before / after each prompt's image


def build_hf_model(seed: int = 0):
    """A tiny random transformers Qwen2.5-VL: our "tiny" preset with a 300-token vocabulary and
    an untied lm_head (tied random embeddings make every token predict itself)."""
    from mrgr1.config import preset

    cfg = preset("tiny", vocab_size=VOCAB, image_token_id=IMAGE, video_token_id=296,
                 vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=False)
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())
    hf_cfg.text_config.bos_token_id = hf_cfg.text_config.eos_token_id = None
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    # Spread the random logits (std ~2 instead of ~0.2): greedy gets clear winners that
    # round-off cannot flip, sampling still has several likely tokens.
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model) with identical weights, via a save_pretrained folder."""
    hf = build_hf_model()
    folder = tmp_path_factory.mktemp("tiny_qwen")
    hf.save_pretrained(folder)
    ours = Qwen2_5_VL.from_pretrained(str(folder)).eval()
    return hf, ours


def make_prompt(index: int, gen: torch.Generator):
    """Token ids 'text <vision_start> <image>*n <vision_end> text' and the image's patches."""
    t, h, w = GRIDS[index]
    before, after = TEXT_LENGTHS[index]
    n_image = t * h * w // 4
    text = lambda n: torch.randint(1, 290, (n,), generator=gen)  # noqa: E731
    ids = torch.cat([text(before), torch.tensor([VSTART] + [IMAGE] * n_image + [VEND]), text(after)])
    pixels = torch.randn(t * h * w, PATCH_DIM, generator=gen)
    return ids, pixels, torch.tensor([[t, h, w]])


def left_pad(prompts):
    """Left-pad a list of (ids, pixels, grid) into one batch dict (pad id 0, mask 0)."""
    width = max(len(ids) for ids, _, _ in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, (ids, _, _) in enumerate(prompts):
        input_ids[row, width - len(ids):] = ids
        mask[row, width - len(ids):] = 1
    return dict(input_ids=input_ids, attention_mask=mask,
                pixel_values=torch.cat([p for _, p, _ in prompts]),
                image_grid_thw=torch.cat([g for _, _, g in prompts]))


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    return left_pad([make_prompt(i, gen) for i in range(3)])


def hf_generate(hf, batch, max_new_tokens, **kwargs):
    """transformers' completions only (the prompt columns cut off)."""
    out = hf.generate(**batch, mm_token_type_ids=(batch["input_ids"] == IMAGE).int(),
                      max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


def ours(model, batch, max_new_tokens, **kwargs):
    return generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                    batch["image_grid_thw"], max_new_tokens=max_new_tokens, **kwargs)


def count_calls(model):
    """A list that grows by one entry (the logits) per forward call of `model`."""
    calls = []
    handle = model.register_forward_hook(lambda mod, args, out: calls.append(out))
    return calls, handle


# ----------------------------------------------------------------------------- vs transformers

def test_greedy_equals_transformers_generate_token_for_token_and_logit_for_logit(models, batch):
    hf, model = models
    out = hf.generate(**batch, mm_token_type_ids=(batch["input_ids"] == IMAGE).int(), max_new_tokens=12,
                      do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    calls, handle = count_calls(model)
    try:
        completions, mask = ours(model, batch, 12, temperature=0)
    finally:
        handle.remove()
    assert torch.equal(completions, out.sequences[:, batch["input_ids"].shape[1]:])
    assert mask.all()
    for step, logits in enumerate(calls):  # the next-token logits of every step, prefill included
        torch.testing.assert_close(logits[:, -1], out.logits[step], atol=1e-4, rtol=1e-4)


def test_greedy_samples_equal_transformers_top_k_1_sampling(models, batch):
    hf, model = models
    expected = hf_generate(hf, batch, 6, do_sample=True, top_k=1, num_return_sequences=3)
    completions, _ = ours(model, batch, 6, temperature=0, num_samples=3)
    assert torch.equal(completions, expected)  # both grouped by prompt: row i from prompt i // 3


# ----------------------------------------------------------------------------- padding, caching

def test_prompt_in_padded_batch_equals_prompt_alone(models, batch):
    _, model = models
    together, _ = ours(model, batch, 10, temperature=0)
    gen = torch.Generator().manual_seed(1)
    for row, prompt in enumerate([make_prompt(i, gen) for i in range(3)]):
        alone, _ = ours(model, left_pad([prompt]), 10, temperature=0)
        assert torch.equal(alone[0], together[row])


def cached_and_full_logits(model, batch, new_tokens):
    """Greedy decoding with the KV cache, recording each forward call's logits, and one uncached
    forward over prompt + completion: (calls, full logits [B, P+new_tokens, V], P)."""
    calls, handle = count_calls(model)
    try:
        completions, mask = ours(model, batch, new_tokens, temperature=0)
    finally:
        handle.remove()
    full_ids = torch.cat([batch["input_ids"], completions], dim=1)
    full_mask = torch.cat([batch["attention_mask"], mask], dim=1)
    with torch.no_grad():
        full = model(full_ids, full_mask, batch["pixel_values"], batch["image_grid_thw"])
    return calls, full, batch["input_ids"].shape[1]


def test_cached_decoding_logits_equal_full_forward(models, batch):
    _, model = models
    calls, full, prompt_len = cached_and_full_logits(model, batch, 8)
    assert len(calls) == 8  # prefill + 7 decode steps (the 8th token needs no forward)
    for step, logits in enumerate(calls):
        torch.testing.assert_close(logits[:, -1], full[:, prompt_len - 1 + step], atol=1e-4, rtol=1e-4)


def test_logps_are_log_softmax_of_temperature_scaled_logits(models, batch):
    _, model = models
    gen = torch.Generator().manual_seed(3)
    # The vision ids are suppressed: an <|image_pad|> in a completion would need an image.
    completions, mask, logps = ours(model, batch, 6, num_samples=2, temperature=0.7, top_k=20,
                                    generator=gen, return_logps=True,
                                    suppress_token_ids=(IMAGE, IMAGE + 1, VSTART, VEND))
    rows = lambda x: x.repeat_interleave(2, dim=0)  # noqa: E731
    full_ids = torch.cat([rows(batch["input_ids"]), completions], dim=1)
    full_mask = torch.cat([rows(batch["attention_mask"]), mask], dim=1)
    pixels = torch.cat([batch["pixel_values"][a:b] for a, b in patch_spans(batch) for _ in range(2)])
    with torch.no_grad():
        logits = model(full_ids, full_mask, pixels, rows(batch["image_grid_thw"]))[:, -7:-1]  # [6, 6, V]
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, completions[..., None])[..., 0]
    torch.testing.assert_close(logps, expected * mask, atol=1e-4, rtol=1e-4)


def patch_spans(batch):
    """(start, end) row ranges of each image's patches in pixel_values."""
    sizes = batch["image_grid_thw"].prod(dim=-1).tolist()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes)]


# ----------------------------------------------------------------------------- sampling

def test_greedy_samples_are_identical(models, batch):
    _, model = models
    completions, _ = ours(model, batch, 6, temperature=0, num_samples=4)
    for prompt in range(3):
        group = completions[prompt * 4:(prompt + 1) * 4]
        assert (group == group[0]).all()


def test_sampling_is_reproducible_with_a_generator_and_varies_with_the_seed(models, batch):
    _, model = models
    draw = lambda seed: ours(model, batch, 8, num_samples=2, temperature=1.0,  # noqa: E731
                             generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_sample_the_greedy_tokens(models, batch, filters):
    _, model = models
    greedy, _ = ours(model, batch, 8, num_samples=2, temperature=0)
    sampled, _ = ours(model, batch, 8, num_samples=2, temperature=1.5, generator=torch.Generator().manual_seed(0),
                      **filters)
    assert torch.equal(sampled, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.3]])
    # sorted 0.5, 0.3, 0.2: mass above = 0, 0.5, 0.8; p = 0.7 keeps 0.5 and 0.3, drops 0.2
    kept = keep_top_p(probs.log(), 0.7).isfinite()
    assert kept.tolist() == [[True, False, True]]


# ----------------------------------------------------------------------------- stopping

def test_rows_stop_at_eos_and_are_padded_and_masked(models, batch):
    _, model = models
    free, _ = ours(model, batch, 10, temperature=0)
    eos = int(free[0, 3])
    first = (free[0] == eos).nonzero()[0].item()  # row 0 stops here (maybe before step 3)
    completions, mask = ours(model, batch, 10, temperature=0, eos_token_ids=(eos,), pad_token_id=7)
    assert completions.shape == mask.shape == (3, 10)
    assert torch.equal(completions[0, :first + 1], free[0, :first + 1])  # EOS itself is kept...
    assert mask[0].tolist() == [1] * (first + 1) + [0] * (9 - first)       # ...and masked 1
    assert (completions[0, first + 1:] == 7).all()
    for row in (1, 2):  # a row without that token runs to max_new_tokens, unchanged
        if eos not in free[row].tolist():
            assert torch.equal(completions[row], free[row]) and mask[row].all()


def test_generation_stops_once_every_row_is_done(models, batch):
    _, model = models
    free, _ = ours(model, batch, 10, temperature=0)
    eos = {int(free[row, 2]) for row in range(3)}  # every row hits one of these by step 2
    last = max(min(i for i, t in enumerate(free[row].tolist()) if t in eos) for row in range(3))
    calls, handle = count_calls(model)
    try:
        completions, mask = ours(model, batch, 10, temperature=0, eos_token_ids=tuple(eos))
    finally:
        handle.remove()
    assert len(calls) == last + 1  # the prefill + one decode per later step, then stop
    assert completions.shape == (3, 10) and not mask[:, last + 1:].any()


# ----------------------------------------------------------------------------- modes, dtypes, errors

def test_training_mode_is_restored(models, batch):
    _, model = models
    model.train()
    try:
        ours(model, batch, 2, temperature=0)
        assert model.training
    finally:
        model.eval()
    ours(model, batch, 2, temperature=0)
    assert not model.training


def test_bfloat16_cached_logits_match_bfloat16_full_forward(models, batch):
    _, model = models
    model_bf16 = Qwen2_5_VL.from_config(model.cfg).to(torch.bfloat16).eval()
    model_bf16.load_state_dict(model.state_dict())
    bf16_batch = dict(batch, pixel_values=batch["pixel_values"].bfloat16())
    calls, full, prompt_len = cached_and_full_logits(model_bf16, bf16_batch, 4)
    for step, logits in enumerate(calls):
        torch.testing.assert_close(logits[:, -1].float(), full[:, prompt_len - 1 + step].float(),
                                   atol=0.1, rtol=0.05)


def test_right_padded_prompts_are_rejected(models, batch):
    _, model = models
    right = dict(batch, attention_mask=batch["attention_mask"].flip(-1))
    with pytest.raises(ValueError, match="LEFT padded"):
        ours(model, right, 2, temperature=0)


def test_lora_model_in_training_mode_generates_like_its_merged_copy(models, batch):
    """Adapters on: the LoRA layers take part; dropout (0.5 here) is off during generation
    because generate switches to eval mode. Adapters off: the base model's completions."""
    import copy

    from mrgr1.lora import adapters_disabled, apply_lora, lora_layers, merge_lora

    _, base = models
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)  # B starts at zero: make the adapters matter
    merged_model = copy.deepcopy(model)
    merge_lora(merged_model)
    model.train()
    with_adapters, _ = ours(model, batch, 8, temperature=0)
    assert model.training
    assert torch.equal(with_adapters, ours(merged_model, batch, 8, temperature=0)[0])
    with adapters_disabled(model):
        assert torch.equal(ours(model, batch, 8, temperature=0)[0], ours(base, batch, 8, temperature=0)[0])
    assert not torch.equal(with_adapters, ours(base, batch, 8, temperature=0)[0])
