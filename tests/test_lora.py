"""LoRA: the equation, adapters on/off, freezing, merge, and PEFT-format files checked against peft itself.

The stand-in base is transformers' tiny random Qwen2ForCausalLM: its decoder has the same leaf names
(q_proj .. down_proj) as ours, at paths `model.layers.N.self_attn.q_proj`, hence only_under="model".
"""
import copy
import json
import re

import pytest
import torch
import torch.nn as nn

from mrgr1.lora import (
    LORA_TARGETS,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    count_parameters,
    frozen_copy,
    load_adapter,
    lora_layers,
    merge_lora,
    reference_policy,
    save_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0
LAYERS = 2


def tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


def input_ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def randomize_b(model, seed: int = 2):
    """B starts at zero (the update is 0); give it values so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)


@pytest.fixture
def base_and_lora():
    """(untouched base, a copy with LoRA on its 7 decoder projections and random non-zero B)."""
    base = tiny_qwen2()
    model = copy.deepcopy(base)
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, only_under="model")
    randomize_b(model)
    return base, model


# ---------------------------------------------------------------------------- the layer


def test_lora_linear_computes_w_x_plus_b_plus_scaled_b_a_x():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    layer = LoRALinear(linear, rank=2, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 5)
    W, b, A, B = linear.weight, linear.bias, layer.lora_A.weight, layer.lora_B.weight
    expected = x @ W.T + b + (6.0 / 2) * (x @ A.T @ B.T)  # y = W x + b + (alpha / r) B A x
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_fresh_adapter_starts_at_zero_with_kaiming_uniform_a():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 16), rank=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    # kaiming_uniform(a=sqrt(5)) on fan_in=64: bound = sqrt(6 / ((1 + 5) * 64)) = 1/8
    bound = 1 / 8
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.8 * bound  # 512 uniform draws come close to the bound
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    expected = nn.functional.linear(x, layer.weight, layer.bias) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer(x), layer(x))


def test_bf16_base_keeps_float32_adapter_and_bf16_output():
    layer = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), rank=2, alpha=2)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- wrapping and freezing


def test_apply_lora_wraps_the_seven_projections_of_every_layer(base_and_lora):
    _, model = base_and_lora
    wrapped = sorted(lora_layers(model))
    expected = sorted(f"model.layers.{i}.{part}.{leaf}" for i in range(LAYERS) for part, leaf in
                      [("self_attn", t) if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else ("mlp", t)
                       for t in LORA_TARGETS])
    assert wrapped == expected


def test_default_only_under_leaves_the_vision_tower_alone():
    # A module tree with the Qwen2.5-VL names: the vision MLP also has gate/up/down_proj.
    def block():
        return nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(4, 12), "proj": nn.Linear(4, 4)}),
                              "mlp": nn.ModuleDict({k: nn.Linear(4, 4) for k in ("gate_proj", "up_proj", "down_proj")})})

    def layer():
        return nn.ModuleDict({"self_attn": nn.ModuleDict({k: nn.Linear(4, 4) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}),
                              "mlp": nn.ModuleDict({k: nn.Linear(4, 4) for k in ("gate_proj", "up_proj", "down_proj")})})

    model = nn.Module()
    model.model = nn.ModuleDict({"visual": nn.ModuleDict({"blocks": nn.ModuleList([block(), block()])}),
                                 "language_model": nn.ModuleDict({"layers": nn.ModuleList([layer(), layer(), layer()])})})
    names = apply_lora(model, rank=16, alpha=32, dropout=0.05)
    assert len(names) == 3 * 7
    assert all(n.startswith("model.language_model.layers.") for n in names)
    assert not any(isinstance(m, LoRALinear) for m in model.model["visual"].modules())


def test_only_lora_parameters_require_grad(base_and_lora):
    _, model = base_and_lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert len(trainable) == 2 * 7 * LAYERS
    n_trainable, n_total = count_parameters(model)
    # per layer: r * (in + out) for q(32->32) k(32->16) v(32->16) o(32->32) gate/up(32->64) down(64->32)
    per_layer = RANK * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))
    assert n_trainable == LAYERS * per_layer
    assert n_total > n_trainable


def test_base_state_dict_keys_are_unchanged_by_wrapping(base_and_lora):
    base, model = base_and_lora
    keys = {k for k in model.state_dict() if ".lora_" not in k}
    assert keys == set(base.state_dict())


def test_one_optimizer_step_changes_only_lora_weights(base_and_lora):
    _, model = base_and_lora
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(input_ids=input_ids()).logits.logsumexp(-1).mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".lora_" in name), name


def test_apply_lora_twice_or_on_nothing_is_a_clear_error(base_and_lora):
    _, model = base_and_lora
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, only_under="model", rank=16, alpha=32, dropout=0.05)
    with pytest.raises(ValueError, match="found no nn.Linear"):
        apply_lora(tiny_qwen2(), rank=16, alpha=32, dropout=0.05)  # default only_under="model.language_model" is absent in Qwen2ForCausalLM


# ---------------------------------------------------------------------------- reference policy


def test_adapters_disabled_equals_base_model_exactly(base_and_lora):
    base, model = base_and_lora
    assert not torch.equal(logits(model), logits(base))
    with adapters_disabled(model):
        assert torch.equal(logits(model), logits(base))
    assert not torch.equal(logits(model), logits(base))  # switched back on


def test_adapters_disabled_restores_state_after_an_exception(base_and_lora):
    _, model = base_and_lora
    with pytest.raises(RuntimeError):
        with adapters_disabled(model):
            raise RuntimeError("boom")
    assert all(layer.enabled for layer in lora_layers(model).values())


def test_reference_policy_with_lora_and_with_a_frozen_copy(base_and_lora):
    base, model = base_and_lora
    with reference_policy(model) as ref:
        assert ref is model and torch.equal(logits(ref), logits(base))
    full = tiny_qwen2()
    ref_model = frozen_copy(full)
    assert count_parameters(ref_model)[0] == 0 and not ref_model.training
    with torch.no_grad():
        full.lm_head.weight.add_(1.0)  # training moves the policy; the reference must not move
    with reference_policy(full, ref_model) as ref:
        assert ref is ref_model and torch.equal(logits(ref), logits(tiny_qwen2()))
    with pytest.raises(ValueError, match="no LoRA layers"):
        with reference_policy(full):
            pass


# ---------------------------------------------------------------------------- merge


def test_merge_gives_the_same_logits_and_plain_linear_layers(base_and_lora):
    base, model = base_and_lora
    before = logits(model)
    merged = merge_lora(model)
    assert len(merged) == 7 * LAYERS and not lora_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in merged)
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- PEFT-format files


def test_saved_files_use_peft_key_names_and_config(base_and_lora, tmp_path):
    _, model = base_and_lora
    save_adapter(model, str(tmp_path), base_model_name_or_path="tiny-qwen2")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * LAYERS and not any("default" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (RANK, ALPHA, "tiny-qwen2")
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)


def test_our_adapter_loads_in_peft_with_the_same_logits(base_and_lora, tmp_path):
    base, model = base_and_lora
    save_adapter(model, str(tmp_path), base_model_name_or_path="tiny-qwen2")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0}
    assert peft_wrapped == set(lora_layers(model))
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_ours_with_the_same_logits(tmp_path):
    base = tiny_qwen2()
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                             task_type="CAUSAL_LM", init_lora_weights=False)  # False: B random, not zero
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(base)
    loaded = load_adapter(ours, str(tmp_path))
    assert len(loaded) == 7 * LAYERS
    assert not torch.equal(logits(ours), logits(base))
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=1e-5, atol=1e-5)
    # loading into a model that apply_lora already wrapped (the training path) gives the same
    again = copy.deepcopy(base)
    apply_lora(again, rank=RANK, alpha=ALPHA, only_under="model", dropout=0.05)
    load_adapter(again, str(tmp_path))
    torch.testing.assert_close(logits(again.eval()), logits(peft_model), rtol=1e-5, atol=1e-5)


def test_round_trip_through_our_own_files(base_and_lora, tmp_path):
    base, model = base_and_lora
    save_adapter(model, str(tmp_path))
    fresh = copy.deepcopy(base)
    load_adapter(fresh, str(tmp_path))
    assert torch.equal(logits(fresh), logits(model))


def test_wrong_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_qwen2(), str(tmp_path / "nowhere"))


def test_rank_mismatch_is_a_clear_error(base_and_lora, tmp_path):
    base, model = base_and_lora
    save_adapter(model, str(tmp_path))
    other = copy.deepcopy(base)
    apply_lora(other, rank=2 * RANK, alpha=ALPHA, only_under="model", dropout=0.05)
    with pytest.raises(ValueError, match="rank mismatch"):
        load_adapter(other, str(tmp_path))


def test_missing_and_unexpected_modules_are_clear_errors(base_and_lora, tmp_path):
    base, model = base_and_lora
    save_adapter(model, str(tmp_path))
    fewer = copy.deepcopy(base)
    apply_lora(fewer, rank=RANK, alpha=ALPHA, targets=("q_proj", "v_proj"), only_under="model", dropout=0.05)
    with pytest.raises(ValueError, match=r"unexpected keys for \['model.layers.0.mlp.down_proj'"):
        load_adapter(fewer, str(tmp_path))
    more = copy.deepcopy(base)
    apply_lora(more, rank=RANK, alpha=ALPHA, only_under="model", dropout=0.05)
    save_adapter(fewer, str(tmp_path / "qv"))
    with pytest.raises(ValueError, match="missing keys for"):
        load_adapter(more, str(tmp_path / "qv"))


def test_adapter_for_another_model_is_a_clear_error(tmp_path):
    small = nn.Module()
    small.model = nn.ModuleDict({"proj": nn.ModuleDict({"q_proj": nn.Linear(4, 4)})})
    apply_lora(small, rank=2, alpha=2, only_under="model", dropout=0.05)
    save_adapter(small, str(tmp_path))
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(tiny_qwen2(), str(tmp_path))


def test_adapter_on_part_of_the_model_saves_a_target_regex_peft_follows(tmp_path):
    # Like the vision tower left out of Qwen2.5-VL: leaf names alone would also select layer 1.
    base = tiny_qwen2()
    model = copy.deepcopy(base)
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, only_under="model.layers.0")
    randomize_b(model)
    save_adapter(model, str(tmp_path))
    assert isinstance(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"], str)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if len(getattr(m, "lora_A", {})) > 0}
    assert peft_wrapped == set(lora_layers(model)) and len(peft_wrapped) == 7
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- our Qwen2.5-VL


def test_apply_lora_on_our_qwen2_5_vl_wraps_seven_per_decoder_layer_and_no_vision(tmp_path):
    vlm = pytest.importorskip("mrgr1.vlm", exc_type=ModuleNotFoundError)
    from mrgr1.config import preset

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = vlm.Qwen2_5_VL.from_config(cfg).eval()
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = model(ids)
    names = apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.05)  # defaults: the 7 targets under model.language_model
    expected = {f"model.language_model.layers.{i}.{part}.{leaf}"
                for i in range(cfg.text.num_hidden_layers)
                for part, leaves in [("self_attn", LORA_TARGETS[:4]), ("mlp", LORA_TARGETS[4:])] for leaf in leaves}
    assert set(names) == expected and len(names) == 7 * cfg.text.num_hidden_layers
    assert not any(isinstance(m, LoRALinear) for m in model.model.visual.modules())
    randomize_b(model)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(model(ids), base_logits)
    # the vision MLP shares leaf names with the decoder, so the saved target_modules is a path regex
    save_adapter(model, str(tmp_path))
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(pattern, str)
    assert {n for n, _ in model.named_modules() if re.fullmatch(pattern, n)} == expected  # as PEFT matches


def test_adapter_saved_on_the_older_hub_layout_loads_into_the_new_one(tmp_path):
    def q_only():
        return nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(4, 4)})})])})

    old, new = nn.Module(), nn.Module()
    old.model = q_only()  # model.layers.0.self_attn.q_proj
    new.model = nn.ModuleDict({"language_model": q_only()})  # model.language_model.layers.0.self_attn.q_proj
    apply_lora(old, rank=2, alpha=2, only_under="model", dropout=0.05)
    randomize_b(old)
    save_adapter(old, str(tmp_path))
    assert load_adapter(new, str(tmp_path)) == ["model.language_model.layers.0.self_attn.q_proj"]
    assert torch.equal(new.model.language_model.layers[0].self_attn.q_proj.lora_B.weight,
                       old.model.layers[0].self_attn.q_proj.lora_B.weight)
