"""The engines that run the UNets behind one protocol (`Engine`), named for `--backend` by `icd_export.registry`.

An engine supplies only epsilon functions (core.denoiser's contract): each UNet's plain one and the reverse UNet
steered by Prompt-to-Prompt's control; the session adds guidance and captures whole loops where the engine says
so. An engine whose file fails to load runs that UNet on PyTorch instead, with one warning line.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from icd.core.denoiser import EpsFn
from icd.errors import ICDError, first_line
from icd.models.loading import PRECISIONS, Model, ready_unet, unet_eps
from icd.models.manifest import Manifest
from icd.models.official import DIRECTIONS
from icd.p2p import SteeredUNet, steered_eps

from .artifacts import Index, fused_unets, graph_kind
from .compiled import INDUCTOR, compiled_eps, compiled_steered


class Engine(ABC):
    """One way to run a model's UNets."""

    name: ClassVar[str]  # its --backend name (icd_export.registry)

    @classmethod
    def problem(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this engine cannot run here (a missing package, device or precision), in one line, or None."""
        return None

    @classmethod
    def has_files(cls, manifest: Manifest, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the artifacts it runs are built and valid."""
        return True

    @classmethod
    def export_options(cls) -> dict[str, bool]:
        """What `icd_export.build.export_model` must build for it."""
        return {"onnx": False, "tensorrt": False}

    def captures_loops(self, device: torch.device) -> bool:
        """Whether a session replays this engine's loops as captured CUDA graphs (icd_export.graphs)."""
        return False

    def prepare(self, model: Model, directions: tuple[str, ...]) -> None:
        """Load what `directions` need now, so that a broken model fails before any item."""

    @abstractmethod
    def eps(self, model: Model, direction: str) -> EpsFn:
        """The epsilon function of one UNet."""

    @abstractmethod
    def steered(self, model: Model):
        """The reverse UNet steered by Prompt-to-Prompt: (x, t, cond, timestep_cond, control) -> (eps, maps)."""


class TorchEngine(Engine):
    """PyTorch, eager or compiled (`compile_mode`; `compiler`, torch.compile's backend: inductor, or one that only
    traces, for debugging). It holds the fused UNets (from `icd export`'s weights when valid, else teacher + LoRA, the
    teacher read once), or the `unets` it is given (the teacher in both places for the multi-step baseline)."""

    name = "torch"

    def __init__(self, compile_mode: str | None = None, compiler=INDUCTOR, unets: dict | None = None):
        self.compile_mode, self.compiler = compile_mode, compiler
        self._unets: dict = dict(unets or {})

    def captures_loops(self, device: torch.device) -> bool:
        """On CUDA, unless ICD_CUDA_GRAPHS=0 (ONNX Runtime and TensorRT run on their own streams; TensorRT
        records its own graphs)."""
        return torch.device(device).type == "cuda" and os.environ.get("ICD_CUDA_GRAPHS", "1") != "0"

    def prepare(self, model: Model, directions: tuple[str, ...]) -> None:
        self.unets(model, *directions)

    def unets(self, model: Model, *directions: str) -> list:
        """The eager UNets of `directions`, loaded once."""
        missing = tuple(d for d in directions if d not in self._unets)
        for direction, unet in zip(missing, fused_unets(model.manifest, model.unet_config, missing, model.dtype,
                                                        model.device)):
            self._unets[direction] = ready_unet(unet, model.device, model.dtype)
        return [self._unets[d] for d in directions]

    def eps(self, model: Model, direction: str) -> EpsFn:
        (unet,) = self.unets(model, direction)
        if self.compile_mode:
            return compiled_eps(unet, model.dtype, self.compile_mode, self.compiler)
        return unet_eps(unet, model.dtype)

    def steered(self, model: Model):
        (unet,) = self.unets(model, "reverse")
        module = SteeredUNet(unet)
        if self.compile_mode:
            return compiled_steered(module, model.dtype, self.compile_mode, self.compiler)
        return steered_eps(module, model.dtype)


class _BuiltEngine(Engine):
    """An engine over files `icd export` builds: each epsilon function runs one file, opened by `_open`."""

    def eps(self, model, direction):
        return self._open(model, direction, steered=False)

    def steered(self, model):
        return self._open(model, "reverse", steered=True)

    @staticmethod
    @abstractmethod
    def _open(model: Model, direction: str, steered: bool):
        """The run of the file of one UNet (`steered`: the reverse UNet's Prompt-to-Prompt one)."""


class OnnxEngine(_BuiltEngine):
    """ONNX Runtime over `icd export`'s graphs (fp32 or fp16), on the CPU or with its CUDA provider."""

    name = "onnx"

    @classmethod
    def problem(cls, device, dtype):
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'icd[onnx]')"
        if dtype == torch.bfloat16:
            return "ONNX graphs are fp32 or fp16, not bf16"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime has no CUDA provider (pip install onnxruntime-gpu, or use --device cpu)"
        return None

    @classmethod
    def has_files(cls, manifest, device, dtype):
        index, precision = Index.open(manifest), PRECISIONS[dtype]
        return all(index.find(kind="onnx", direction=d, precision=precision) for d in DIRECTIONS) and \
            bool(index.find(kind="onnx-p2p", direction="reverse", precision=precision))

    @classmethod
    def export_options(cls):
        return {"onnx": True, "tensorrt": False}

    @staticmethod
    def _open(model: Model, direction: str, steered: bool):
        """The ONNX Runtime run of the graph (on the CPU its version optimised for this CPU, when built); a graph that
        fails to load (damaged in place) is forgotten with one warning line, and this UNet runs on PyTorch instead."""
        from .onnx import OnnxEps, OnnxSteered, find_cpu_optimized, onnx_session

        index = Index.open(model.manifest)
        name = index.find(kind=graph_kind(steered), direction=direction, precision=PRECISIONS[model.dtype])
        if name is None:
            what = "prompt-to-prompt ONNX graph" if steered else "ONNX graph"
            raise ICDError(f"the {what} of the {direction} UNet is gone: run `icd export -m {model.manifest.name}`")
        try:
            optimized = find_cpu_optimized(index, name) if model.device.type == "cpu" else None
            session = onnx_session(index.folder / name, model.device, optimized)
            if steered:
                return OnnxSteered(session, model.device, model.dtype, model.unet_config)
            return OnnxEps(session, model.device, model.dtype)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail...)
            return _torch_instead(index, name, err, model, direction, steered)


class TensorRTEngine(_BuiltEngine):
    """TensorRT engines built from the fp16 graphs for this GPU, each shape replayed as a CUDA graph."""

    name = "tensorrt"

    @classmethod
    def problem(cls, device, dtype):
        from .tensorrt import tensorrt_problem

        return tensorrt_problem(device, dtype)

    @classmethod
    def has_files(cls, manifest, device, dtype):
        from .tensorrt import find_engine

        index = Index.open(manifest)
        return all(find_engine(index, d, device) for d in DIRECTIONS) and \
            bool(find_engine(index, "reverse", device, steered=True))

    @classmethod
    def export_options(cls):
        return {"onnx": True, "tensorrt": True}

    @staticmethod
    def _open(model: Model, direction: str, steered: bool):
        """The engine's run of one UNet; a file that fails to load is forgotten as in `OnnxEngine._open`."""
        from .tensorrt import TensorRTEps, find_engine

        index = Index.open(model.manifest)
        name = find_engine(index, direction, model.device, steered)
        if name is None:
            raise ICDError(f"no TensorRT engine of the {direction} UNet for this GPU: run `icd export --tensorrt`")
        try:
            return TensorRTEps(index, name, model.device, steered=steered)
        except Exception as err:  # noqa: BLE001 - TensorRT and CUDA raise many types on a bad engine file
            return _torch_instead(index, name, err, model, direction, steered)


def _torch_instead(index: Index, name: str, err: Exception, model: Model, direction: str, steered: bool):
    """The PyTorch epsilon function (or steered run) of a UNet whose engine file `name` would not load (it is
    forgotten)."""
    index.forget_damaged(name, first_line(err), f"running the {direction} UNet on PyTorch")
    (unet,) = fused_unets(model.manifest, model.unet_config, (direction,), model.dtype, model.device)
    unet = ready_unet(unet, model.device, model.dtype)
    return steered_eps(SteeredUNet(unet), model.dtype) if steered else unet_eps(unet, model.dtype)
