"""`--backend auto|torch|onnx|tensorrt`: the one place engine names are looked up (and compared).

Torch-free, so that a command served by `icd serve` checks its options without loading torch. `auto` takes the
fastest engine that can run here and whose artifacts already exist, and never builds anything: TensorRT, then
ONNX Runtime, then PyTorch. A named engine whose artifacts are missing is reported as such, and the session
announces and runs the export. On the development CPU ONNX Runtime ran UNet calls 2.2x (tiny) to 2.3-4.8x (SD1.5
at 128 px) faster than PyTorch, one thread each (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from icd.errors import ICDError, UsageError

if TYPE_CHECKING:
    import torch

    from icd.models.manifest import Manifest

    from .engines import Engine


@dataclass(frozen=True)
class Registered:
    """An engine as the command line knows it."""

    name: str
    cls: str  # its class in icd_export.engines
    package: str | None = None  # the module it needs
    compiles: bool = False  # whether --compile applies


ENGINES = {entry.name: entry for entry in (Registered("torch", "TorchEngine", compiles=True),
                                            Registered("onnx", "OnnxEngine", "onnxruntime"),
                                            Registered("tensorrt", "TensorRTEngine", "tensorrt"))}
BACKENDS = ("auto", *ENGINES)  # what --backend takes
FASTEST_FIRST = ("tensorrt", "onnx")
MAX_BATCH = 2  # the largest batch an exported graph or engine takes unless `icd export --max-batch` says


def engine_class(name: str) -> type[Engine]:
    from . import engines

    return getattr(engines, ENGINES[name].cls)


@dataclass(frozen=True)
class Choice:
    """The engine to run (its name), whether its artifacts must be built first, and why it was chosen."""

    backend: str
    needs_export: bool = False
    reason: str = ""

    @property
    def engine(self) -> type[Engine]:
        return engine_class(self.backend)

    @property
    def compiles(self) -> bool:
        return ENGINES[self.backend].compiles


def check_options(backend: str, compile: bool) -> None:
    """The backend options fit together: `--compile` applies to the engines that compile."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}': choose {', '.join(BACKENDS)}")
    if compile and backend != "auto" and not ENGINES[backend].compiles:
        raise UsageError(f"--compile applies to the torch backend, not --backend {backend}")


def choose_backend(requested: str, manifest: Manifest, device: torch.device, dtype: torch.dtype) -> Choice:
    """The engine for `requested`. Nothing is built here: `needs_export` says what is missing."""
    if requested not in BACKENDS:
        raise ICDError(f"unknown backend '{requested}': choose {', '.join(BACKENDS)}")
    if requested == "auto":
        for name in FASTEST_FIRST:
            engine = engine_class(name)
            if engine.problem(device, dtype) is None and engine.has_files(manifest, device, dtype):
                return Choice(name, reason="auto: the fastest with artifacts for this model")
        return Choice("torch", reason="auto: no ONNX graphs or engines for this model yet; `icd export` makes them")
    engine = engine_class(requested)
    if why := engine.problem(device, dtype):
        raise ICDError(f"--backend {requested}: {why}")
    return Choice(requested, needs_export=not engine.has_files(manifest, device, dtype))


def export_options(backend: str) -> dict[str, bool]:
    """What `icd_export.build.export_model` must build for `--backend backend` (nothing for auto: it only
    takes what exists)."""
    if backend == "auto":
        return {"onnx": False, "tensorrt": False}
    return engine_class(backend).export_options()


def satisfies(requested: str, running: str) -> bool:
    """Whether a model running on the engine `running` (a server's) does what `--backend requested` asks."""
    return requested == "auto" or requested == running


def installed_backends() -> list[str]:
    """The engines whose packages are installed (for `icd info`)."""
    return [name for name, entry in ENGINES.items()
            if entry.package is None or importlib.util.find_spec(entry.package) is not None]
