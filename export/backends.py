"""`--backend auto|torch|onnx|tensorrt`: which runtime makes the UNet calls.

auto takes the fastest backend that can run here and whose artifacts already exist, and never builds
anything: TensorRT (an engine for this GPU), then ONNX Runtime (graphs of the model's precision), then
PyTorch. Naming a backend builds its missing artifacts first (once), or fails in one line when it cannot
run here. On the development CPU ONNX Runtime ran UNet calls 2.2x (tiny) to 2.3-4.8x (SD1.5 at 128 px)
faster than PyTorch, one thread each (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from icdcli.errors import ICDError
from icdcli.manifest import Manifest
from icdcli.models import DIRECTIONS, Denoiser, ICDModel

from .artifacts import PRECISIONS, Index

log = logging.getLogger("icd")

BACKENDS = ("auto", "torch", "onnx", "tensorrt")
ENGINES = ("tensorrt", "onnx")  # fastest first


def problem(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run here (a missing package, device or precision), in one line, or None."""
    if backend == "tensorrt":
        from .tensorrt import tensorrt_problem

        return tensorrt_problem(device, dtype)
    if backend == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'icd[onnx]')"
        if dtype == torch.bfloat16:
            return "ONNX graphs are fp32 or fp16, not bf16"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime has no CUDA provider (pip install onnxruntime-gpu, or use --device cpu)"
    return None


def exported(backend: str, manifest: Manifest, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether both UNets' artifacts for `backend` are built and valid."""
    index = Index.open(manifest)
    if backend == "onnx":
        return all(index.find(kind="onnx", direction=d, precision=PRECISIONS[dtype]) for d in DIRECTIONS)
    from .tensorrt import find_engine

    return all(find_engine(index, d, device) for d in DIRECTIONS)


def select_backend(requested: str, manifest: Manifest, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for `requested`; logs auto's choice, builds a named backend's missing artifacts."""
    if requested not in BACKENDS:
        raise ICDError(f"unknown backend '{requested}': choose {', '.join(BACKENDS)}")
    if requested == "auto":
        for backend in ENGINES:
            if problem(backend, device, dtype) is None and exported(backend, manifest, device, dtype):
                log.info("backend: %s (auto: the fastest with artifacts for this model)", backend)
                return backend
        log.info("backend: torch (auto: no ONNX graphs or engines for this model yet; `icd export` makes them)")
        return "torch"
    if requested == "torch":
        return requested
    if why := problem(requested, device, dtype):
        raise ICDError(f"--backend {requested}: {why}")
    if not exported(requested, manifest, device, dtype):
        from .build import export_model

        log.info("no %s artifacts for model '%s' yet: building them once (`icd export` does it ahead)",
                 requested, manifest.name)
        export_model(manifest, (PRECISIONS[dtype],), tensorrt=requested == "tensorrt", device=device)
    return requested


def engine_denoiser(model: ICDModel, direction: str) -> Denoiser:
    """The ONNX Runtime or TensorRT denoiser of one UNet of `model` (whose backend is one of those)."""
    index = Index.open(model.manifest)
    if model.backend == "tensorrt":
        from .tensorrt import TensorRTDenoiser

        return TensorRTDenoiser(index, direction, model.guidance_embed_dim, model.unconditional(), model.device)
    from .onnx import OnnxDenoiser, onnx_session

    name = index.find(kind="onnx", direction=direction, precision=PRECISIONS[model.dtype])
    if name is None:
        raise ICDError(f"the ONNX graph of the {direction} UNet is gone: run `icd export -m {model.manifest.name}`")
    return OnnxDenoiser(onnx_session(index.folder / name, model.device), model.guidance_embed_dim,
                        model.unconditional(), model.device, model.dtype)
