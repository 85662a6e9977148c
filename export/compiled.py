"""torch.compile as an engine: the PyTorch UNet compiled, supplying the same epsilon function."""

from __future__ import annotations

import torch

from icd.core.denoiser import EpsFn
from icd.models.loading import unet_eps


def choose_compile_mode(device: torch.device, static_shapes: bool) -> str:
    """torch.compile's mode: CUDA graphs and autotuning (max-autotune) pay off only when every call has the
    same shapes (they are recorded per shape); otherwise, and on a CPU, the default mode."""
    return "max-autotune" if device.type == "cuda" and static_shapes else "default"


def compiled_eps(unet, dtype: torch.dtype, mode: str) -> EpsFn:
    return unet_eps(torch.compile(unet, mode=mode, fullgraph=True), dtype)
