"""Fusing iCD LoRA files into a UNet: W <- W + (alpha / rank) * B @ A, for linear and conv layers.

Three key formats are read:
- peft, as the official iCD files are written: `unet.base_model.model.<module>.lora_A.weight`;
- diffusers: `unet.<module>.lora_A.weight`, or the older `unet.<module>.lora.down.weight`;
- kohya: `lora_unet_<module with _ for .>.lora_down.weight` (+ `.alpha`).
Alpha comes from `.alpha` tensors, else from the manifest: the official files hold none and were trained at
peft's default alpha 8, rank 64; generic loaders' alpha = rank makes them eight times too strong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelError, first_line

_PATTERNS = [
    (re.compile(r"^(?:unet\.)?base_model\.model\.(.+)\.lora_([AB])\.weight$"), "peft"),
    (re.compile(r"^unet\.(.+)\.lora_([AB])\.weight$"), "diffusers"),
    (re.compile(r"^unet\.(.+)\.lora\.(down|up)\.weight$"), "diffusers"),
    (re.compile(r"^lora_unet_(.+)\.lora_(down|up)\.weight$"), "kohya"),
]
_ALPHA = re.compile(r"^(?:lora_unet_|unet\.|unet\.base_model\.model\.)?(.+)\.alpha$")
_SIDE = {"A": "down", "B": "up", "down": "down", "up": "up"}


@dataclass
class LoraLayer:
    down: torch.Tensor | None = None  # A: (rank, in[, k, k])
    up: torch.Tensor | None = None  # B: (out, rank[, 1, 1])
    alpha: float | None = None


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None when all are finite."""
    return next((name for name, tensor in tensors.items()
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)


def read_lora(path: Path, module_names: set[str],
              check: Callable[[Path, Mapping[str, torch.Tensor]], None] | None = None) -> dict[str, LoraLayer]:
    """Group a LoRA file's tensors by the UNet module they adapt (names checked against the UNet); `check`
    sees the file's tensors first (loading's once-per-model NaN/inf check)."""
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise ModelError(f"{path}: not a readable safetensors LoRA file ({first_line(err)})") from None
    if check is not None:
        check(path, tensors)
    kohya_names = {name.replace(".", "_"): name for name in module_names}
    layers: dict[str, LoraLayer] = {}

    def module_for(raw: str, style: str) -> str:
        name = kohya_names.get(raw) if style == "kohya" else raw
        if name not in module_names:
            raise ModelError(f"{path}: LoRA key for unknown UNet module '{raw}'")
        return name

    alphas = {}
    for key, tensor in tensors.items():
        for pattern, style in _PATTERNS:
            match = pattern.match(key)
            if match:
                layer = layers.setdefault(module_for(match[1], style), LoraLayer())
                setattr(layer, _SIDE[match[2]], tensor)
                break
        else:
            alpha = _ALPHA.match(key)
            if not alpha:
                raise ModelError(f"{path}: unrecognised LoRA key '{key}'")
            if tensor.numel() != 1:
                raise ModelError(f"{path}: '{key}' must hold one number, not a tensor of shape {tuple(tensor.shape)}")
            value = float(tensor.float().item())
            if not (math.isfinite(value) and value > 0):
                raise ModelError(f"{path}: '{key}' must be a positive finite number, not {value}")
            alphas[alpha[1]] = value
    for raw, value in alphas.items():
        name = raw if raw in module_names else kohya_names.get(raw, raw)
        if name in layers:
            layers[name].alpha = value
    if not layers:
        raise ModelError(f"{path}: holds no LoRA weights")
    for name, layer in layers.items():
        if layer.down is None or layer.up is None:
            raise ModelError(f"{path}: LoRA for '{name}' lacks its {'A/down' if layer.down is None else 'B/up'} matrix")
        if layer.down.ndim not in (2, 4) or layer.up.ndim != layer.down.ndim:
            raise ModelError(f"{path}: LoRA for '{name}': A is {tuple(layer.down.shape)} and B "
                             f"{tuple(layer.up.shape)}, not two matrices (2-D) or two conv kernels (4-D)")
        if layer.down.shape[0] != layer.up.shape[1]:
            raise ModelError(f"{path}: LoRA for '{name}' has A of rank {layer.down.shape[0]} but B of rank {layer.up.shape[1]}")
        if layer.down.shape[0] == 0:  # its scale, alpha / rank, would divide by zero
            raise ModelError(f"{path}: LoRA for '{name}' has rank 0 (A is {tuple(layer.down.shape)}): it holds no "
                             "update, so the file is not a trained LoRA")
    return layers


def lora_delta(layer: LoraLayer, default_alpha: float) -> torch.Tensor:
    """The weight update (alpha / rank) * B @ A, shaped like the adapted layer's weight."""
    down, up = layer.down.float(), layer.up.float()
    rank = down.shape[0]
    scale = (layer.alpha if layer.alpha is not None else default_alpha) / rank
    delta = up.flatten(1) @ down.flatten(1)  # (out, in * k * k)
    return scale * delta.reshape(up.shape[0], *down.shape[1:])


def _misfit(layer: LoraLayer, module: nn.Module) -> str | None:
    """How a LoRA's A and B fail to fit the module they adapt, or None."""
    weight = module.weight
    rank, kernel = layer.down.shape[0], tuple(weight.shape[2:])
    takes = f"in={weight.shape[1]}" + (f" with a {kernel[0]}x{kernel[1]} kernel" if kernel else "")
    want_down, want_up = (rank, *weight.shape[1:]), (weight.shape[0], rank, *(1 for _ in kernel))
    if tuple(layer.down.shape) != want_down:
        return f"A is {tuple(layer.down.shape)} but the {type(module).__name__} takes {takes}: A should be {want_down}"
    if tuple(layer.up.shape) != want_up:
        return f"B is {tuple(layer.up.shape)} but the {type(module).__name__} gives out={weight.shape[0]}: " \
               f"B should be {want_up}"
    return None


@torch.no_grad()
def fuse_lora(unet: nn.Module, path: Path, default_alpha: float,
              check: Callable[[Path, Mapping[str, torch.Tensor]], None] | None = None) -> int:
    """Add a LoRA file's updates into the UNet's weights in place; returns the number of layers fused. Every
    layer is checked before any weight changes, so a bad file leaves the UNet as it was."""
    modules = dict(unet.named_modules())
    layers = read_lora(path, set(modules), check)
    for name, layer in layers.items():
        module = modules[name]
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ModelError(f"{path}: '{name}' is a {type(module).__name__}, not a linear or conv layer")
        if why := _misfit(layer, module):
            raise ModelError(f"{path}: LoRA for '{name}': {why}")
    for name, layer in layers.items():
        module = modules[name]
        module.weight += lora_delta(layer, default_alpha).to(module.weight.device, module.weight.dtype)
    return len(layers)
