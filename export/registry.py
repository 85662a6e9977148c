"""`--backend auto|torch|onnx|tensorrt`: which engine supplies the UNets' epsilon functions.

Each engine supplies only an epsilon function (core.denoiser's contract); the session wraps it in the one
guidance wrapper. auto takes the fastest engine that can run here and whose artifacts already exist, and
never builds anything: TensorRT (an engine for this GPU), then ONNX Runtime (graphs of the model's
precision), then PyTorch. A named engine whose artifacts are missing is reported as such, and the app
announces and runs the export. On the development CPU ONNX Runtime ran UNet calls 2.2x (tiny) to 2.3-4.8x
(SD1.5 at 128 px) faster than PyTorch, one thread each (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from icd.core.denoiser import EpsFn
from icd.errors import ICDError, first_line
from icd.models.loading import DIRECTIONS, PRECISIONS, Model, ready_unet, unet_eps
from icd.models.manifest import Manifest
from icd.p2p import SteeredUNet, steered_eps

from .artifacts import Index, fused_unets

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
        precision = PRECISIONS[dtype]
        return all(index.find(kind="onnx", direction=d, precision=precision) for d in DIRECTIONS) and \
            bool(index.find(kind="onnx-p2p", direction="reverse", precision=precision))
    from .tensorrt import find_engine

    return all(find_engine(index, d, device) for d in DIRECTIONS) and bool(find_engine(index, "reverse", device, True))


@dataclass(frozen=True)
class Choice:
    """The engine to run, whether its artifacts must be built first, and why it was chosen."""

    backend: str
    needs_export: bool = False
    reason: str = ""


def choose_backend(requested: str, manifest: Manifest, device: torch.device, dtype: torch.dtype) -> Choice:
    """The concrete backend for `requested`. Nothing is built here: `needs_export` says what is missing."""
    if requested not in BACKENDS:
        raise ICDError(f"unknown backend '{requested}': choose {', '.join(BACKENDS)}")
    if requested == "auto":
        for backend in ENGINES:
            if problem(backend, device, dtype) is None and exported(backend, manifest, device, dtype):
                return Choice(backend, reason="auto: the fastest with artifacts for this model")
        return Choice("torch", reason="auto: no ONNX graphs or engines for this model yet; `icd export` makes them")
    if requested == "torch":
        return Choice("torch")
    if why := problem(requested, device, dtype):
        raise ICDError(f"--backend {requested}: {why}")
    return Choice(requested, needs_export=not exported(requested, manifest, device, dtype))


def engine_eps(backend: str, model: Model, direction: str) -> EpsFn:
    """The ONNX Runtime or TensorRT epsilon function of one UNet of `model`. An engine file that fails to load
    (damaged in place) is forgotten with one warning line, and this UNet runs on PyTorch instead."""
    index = Index.open(model.manifest)
    if backend == "tensorrt":
        from .tensorrt import TensorRTEps, find_engine

        name = find_engine(index, direction, model.device)
        try:
            return TensorRTEps(index, direction, model.device)
        except Exception as err:  # noqa: BLE001 - TensorRT and CUDA raise many types on a bad engine file
            if name is None:  # no engine at all: TensorRTEps said what to run
                raise
            return _torch_instead(index, name, err, model, direction)
    from .onnx import OnnxEps

    name = index.find(kind="onnx", direction=direction, precision=PRECISIONS[model.dtype])
    if name is None:
        raise ICDError(f"the ONNX graph of the {direction} UNet is gone: run `icd export -m {model.manifest.name}`")
    try:
        return OnnxEps(_session(index, name, model.device), model.device, model.dtype)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail...)
        return _torch_instead(index, name, err, model, direction)


def engine_steered(backend: str, model: Model):
    """The ONNX Runtime or TensorRT run of the reverse UNet's Prompt-to-Prompt graph, (x, t, cond,
    timestep_cond, control) -> (eps, blend maps); a file that fails to load is forgotten as in `engine_eps`."""
    index = Index.open(model.manifest)
    if backend == "tensorrt":
        from .tensorrt import TensorRTEps, find_engine

        name = find_engine(index, "reverse", model.device, True)
        try:
            return TensorRTEps(index, "reverse", model.device, steered=True)
        except Exception as err:  # noqa: BLE001 - as in engine_eps
            if name is None:
                raise
            return _torch_instead(index, name, err, model, "reverse", steered=True)
    from .onnx import OnnxSteered

    name = index.find(kind="onnx-p2p", direction="reverse", precision=PRECISIONS[model.dtype])
    if name is None:
        raise ICDError(f"the prompt-to-prompt ONNX graph of the reverse UNet is gone: run `icd export -m "
                       f"{model.manifest.name}`")
    try:
        return OnnxSteered(_session(index, name, model.device), model.device, model.dtype, model.unet_config)
    except Exception as err:  # noqa: BLE001 - as in engine_eps
        return _torch_instead(index, name, err, model, "reverse", steered=True)


def _session(index: Index, graph: str, device: torch.device):
    """The ONNX Runtime session of the graph `graph`: on the CPU its version optimised for this CPU, when built."""
    from .onnx import find_cpu_optimized, onnx_session

    optimized = find_cpu_optimized(index, graph) if device.type == "cpu" else None
    return onnx_session(index.folder / graph, device, optimized)


def _torch_instead(index: Index, name: str, err: Exception, model: Model, direction: str, steered: bool = False):
    """The PyTorch epsilon function (or steered run) of a UNet whose engine file `name` would not load (it is
    forgotten)."""
    why = first_line(err)
    index.forget_damaged(name, why, f"running the {direction} UNet on PyTorch")
    (unet,) = fused_unets(model.manifest, model.unet_config, (direction,), model.dtype, model.device)
    unet = ready_unet(unet, model.device, model.dtype)
    return steered_eps(SteeredUNet(unet), model.dtype) if steered else unet_eps(unet, model.dtype)
