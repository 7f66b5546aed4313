"""LoRA: low-rank adapters on chosen linear layers, switchable off, saved in PEFT's layout.

LoRA (Hu et al., 2021, arXiv 2106.09685) freezes a pretrained weight W [out, in] and learns a
low-rank update next to it:

    y = W x + b + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r]

A starts Kaiming-uniform (as PEFT's default), B starts at zero, so a freshly wrapped model computes
exactly what the base model computes. MRG-R1 fine-tunes its policy this way; GRPO's KL term needs
the *reference* policy, which is the same network with the adapters switched off
(`adapters_disabled`), so no second copy of the 7B weights is kept. For full fine-tuning of a small
model, `frozen_copy` makes that second copy instead, and `reference_policy` hides the difference.

Adapters are saved as PEFT saves them (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads ours and
`load_adapter` loads PEFT's.

Example:
    names = apply_lora(model, rank=16, alpha=32, dropout=0.05)     # decoder q/k/v/o/gate/up/down
    ...train...
    with reference_policy(model) as ref:                          # adapters off, bit-exact base
        ref_logps = ref.token_logps(...)
    save_adapter(model, "out/adapter", base_model_name_or_path="FreedomIntelligence/...")
    load_adapter(other_model, "out/adapter"); merge_lora(other_model)   # plain nn.Linear again
"""
import contextlib
import copy
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from .files import read_json, read_safetensors

# The decoder's attention and MLP projections (leaf names shared by Qwen2 and Qwen2.5-VL).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
# Adapters trained on the older hub layout of Qwen2.5-VL name decoder/vision modules differently;
# used only when a saved module path is absent from the model.
_LEGACY_PREFIXES = {"model.layers.": "model.language_model.layers.", "visual.": "model.visual."}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (alpha / r) * B A.

    Keeps the wrapped layer's own `weight` and `bias` Parameters under the same names, so the base
    model's state_dict keys do not change. The adapter is kept in float32 (as PEFT does by
    default), whatever the base dtype: its updates are small and bf16 would round them away.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # [out, in], frozen
        self.bias = linear.bias  # [out] or None, frozen
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device = linear.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: exactly the base layer (the reference policy)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) (PEFT's and nn.Linear's default), B = 0: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * B A dropout(x), in float32: [..., in] -> [..., out]."""
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(x)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y  # nothing added, not even a zero: bit-exact base output
        return y + self.lora_delta(x).to(y.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) * B A folded in (shares the bias)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scale  # [out, in], float32
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}"


# ---------------------------------------------------------------------------- finding and wrapping


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _is_under(name: str, prefix: str | None) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, module)


def _wrap(model: nn.Module, path: str, rank: int, alpha: float, dropout: float) -> None:
    layer = model.get_submodule(path)
    if isinstance(layer, LoRALinear):
        raise ValueError(f"{path} already has a LoRA adapter; use merge_lora() first or load into it")
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{path} is a {type(layer).__name__}, LoRA wraps only nn.Linear layers")
    _set_submodule(model, path, LoRALinear(layer, rank, alpha, dropout))


def _freeze_all_but_lora(model: nn.Module) -> None:
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    targets: tuple[str, ...] = LORA_TARGETS,
    only_under: str | None = "model.language_model",
    verbose: bool = False,
) -> list[str]:
    """Wrap every nn.Linear whose leaf name is in `targets` and whose path is under `only_under`.

    rank r, alpha and dropout are ours (the paper does not publish them); only_under keeps the
    vision tower (`model.visual`, whose MLP also has gate/up/down_proj) frozen and adapter-free.
    Everything except lora_A / lora_B gets requires_grad False. Returns the wrapped module paths.
    """
    names = [
        name for name, m in model.named_modules()
        if name.rpartition(".")[2] in targets and _is_under(name, only_under) and isinstance(m, (nn.Linear, LoRALinear))
    ]
    if not names:
        raise ValueError(f"apply_lora found no nn.Linear named {list(targets)} under '{only_under}'; "
                         "check the module names (print(model)) or pass targets=/only_under=")
    for name in names:
        _wrap(model, name, rank, alpha, dropout)
    _freeze_all_but_lora(model)
    if verbose:
        trainable, total = count_parameters(model)
        print(f"LoRA r={rank} alpha={alpha}: {len(names)} layers, "
              f"trainable {trainable:,} / {total:,} params ({100 * trainable / total:.2f}%)")
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Fold (alpha / r) * B A into each wrapped weight and put plain nn.Linear layers back (for export)."""
    layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            _set_submodule(model, name, layer.merged_linear())
    return list(layers)


# ---------------------------------------------------------------------------- reference policy


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every adapter is off: the output equals the base model's bit for bit."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("adapters_disabled: the model has no LoRA layers (call apply_lora or load_adapter first)")
    was = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, enabled in zip(layers, was):
            layer.enabled = enabled


def train_without_dropout(model: nn.Module) -> nn.Module:
    """Train mode (gradient checkpointing stays on) with every dropout layer off.

    GRPO's update computes pi_old as its own first pass and pi_ref in eval mode; with dropout on,
    the update's log-probs would be those of a thinned network, not of the policy that sampled the
    completions (and the reference's KL would compare unlike with like). TRL calls this
    disable_dropout. SFT keeps its dropout (plain model.train())."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no trainable parameters: the reference for full fine-tuning."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


@contextlib.contextmanager
def reference_policy(model: nn.Module, ref_model: nn.Module | None = None):
    """Yield the network that computes pi_ref, the KL term's reference policy.

    With LoRA (ref_model None): `model` itself with its adapters switched off.
    With full fine-tuning: `ref_model`, a `frozen_copy(model)` taken before training.
    Either way the caller writes:
        with torch.no_grad(), reference_policy(model, ref_model) as ref:
            ref_logps = ref.token_logps(...)
    """
    if ref_model is not None:
        yield ref_model
    else:
        with adapters_disabled(model):
            yield model


# ---------------------------------------------------------------------------- PEFT-format files


def _target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """PEFT's `target_modules`: the plain leaf names when they select exactly the wrapped layers,
    else a regex (PEFT full-matches a string against module paths) of exactly those paths' pattern."""
    leaves = sorted({name.rpartition(".")[2] for name in wrapped})
    matches = {name for name, m in model.named_modules()
               if name.rpartition(".")[2] in leaves and isinstance(m, (nn.Linear, LoRALinear))}
    if matches == set(wrapped):
        return leaves
    prefix = os.path.commonprefix(wrapped).rpartition(".")[0]  # e.g. "model.language_model.layers"
    pattern = rf"{re.escape(prefix)}\..*\.({'|'.join(leaves)})"
    if {name for name in matches if re.fullmatch(pattern, name)} != set(wrapped):
        pattern = "|".join(re.escape(name) for name in wrapped)  # fallback: every path spelled out
    return pattern


def save_adapter(model: nn.Module, folder: str, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors as peft's save_pretrained does."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    settings = {(m.rank, m.alpha, getattr(m.lora_dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"save_adapter needs one (rank, alpha, dropout) for all layers, found {sorted(settings)}")
    config = {  # only fields every PEFT version since 0.5 knows; the rest take PEFT's defaults
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": getattr(first.lora_dropout, "p", 0.0),
        "target_modules": _target_modules(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()  # [r, in]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()  # [out, r]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})


def read_adapter_config(folder: str) -> dict:
    """adapter_config.json, checked for the features this LoRA implements."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in '{folder}': expected a PEFT LoRA adapter folder "
                                f"({CONFIG_FILE} + {WEIGHTS_FILE}), as written by save_adapter or peft")
    config = read_json(path, "save the adapter again, or give a PEFT LoRA folder")  # FileError (a ValueError)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, only 'LORA' adapters are supported")
    unsupported = {"use_dora": False, "use_rslora": False, "lora_bias": False, "bias": "none",
                   "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    for key, plain in unsupported.items():
        if config.get(key) not in (plain, None):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported here (only plain LoRA: {key}={plain!r})")
    return config


def _model_path(model_paths: set[str], saved: str) -> str:
    if saved in model_paths:
        return saved
    for old, new in _LEGACY_PREFIXES.items():
        if saved.startswith(old) and new + saved[len(old):] in model_paths:
            return new + saved[len(old):]
    return saved


def _read_adapter_weights(folder: str, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path in model: (A [r, in], B [out, r])} from adapter_model.safetensors."""
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in '{folder}' (adapters saved as .bin are not supported)")
    tensors = read_safetensors(path, "save the adapter again, or give a PEFT LoRA folder")  # FileError: truncated
    key = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = key.fullmatch(name)
        if match is None:
            raise ValueError(f"{path}: unexpected key '{name}' (expected '{PEFT_PREFIX}<module>.lora_A.weight' "
                             "or '.lora_B.weight'; adapters with embedding/bias/DoRA weights are not supported)")
        parts.setdefault(match[1], {})[match[2]] = tensor
    model_paths = {name for name, _ in model.named_modules()}
    weights = {}
    for saved, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module '{saved}' has lora_{''.join(ab)} but not both lora_A and lora_B")
        weights[_model_path(model_paths, saved)] = (ab["A"], ab["B"])
    return weights


def load_adapter(model: nn.Module, folder: str) -> list[str]:
    """Load a PEFT-layout LoRA adapter into `model`; returns the adapted module paths.

    A model without LoRA layers gets exactly the layers named in the file (rank, alpha, dropout from
    the config). A model that already has LoRA layers (apply_lora) must match the file exactly:
    same modules, same rank (alpha is taken from the file); anything else is an error naming the keys.
    Paths of the older Qwen2.5-VL hub layout (`model.layers.*`, `visual.*`) are mapped when absent.
    """
    config = read_adapter_config(folder)
    weights = _read_adapter_weights(folder, model)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if not lora_layers(model):
        missing_in_model = [name for name in weights if name not in dict(model.named_modules())]
        if missing_in_model:
            raise ValueError(f"adapter in '{folder}' names modules this model does not have: {missing_in_model[:5]}"
                             f"{' ...' if len(missing_in_model) > 5 else ''} (wrong base model?)")
        for name in weights:
            _wrap(model, name, rank, alpha, float(config.get("lora_dropout") or 0.0))
        _freeze_all_but_lora(model)
    layers = lora_layers(model)
    missing, unexpected = sorted(set(layers) - set(weights)), sorted(set(weights) - set(layers))
    if missing or unexpected:
        raise ValueError(f"adapter in '{folder}' does not match the model's LoRA layers: "
                         f"missing keys for {missing[:5]}, unexpected keys for {unexpected[:5]} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    with torch.no_grad():
        for name, (a, b) in weights.items():
            layer = layers[name]
            want_a, want_b = tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"adapter in '{folder}', module '{name}': lora_A {tuple(a.shape)} / lora_B "
                                 f"{tuple(b.shape)} but the model's layer wants {want_a} / {want_b} "
                                 f"(rank mismatch: file r={a.shape[0]}, model r={layer.rank})")
            if a.shape[0] != rank:
                raise ValueError(f"adapter in '{folder}', module '{name}': weights have rank {a.shape[0]} "
                                 f"but {CONFIG_FILE} says r={rank}")
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            layer.alpha, layer.scale = alpha, alpha / layer.rank
    return list(weights)
