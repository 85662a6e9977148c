"""TensorRT engines of the fp16 ONNX graphs, their cache, and the TensorRT denoiser (with CUDA graphs).

TensorRT is imported only here and only when asked for, so the CLI and the CPU paths never need it. Engines
are built strongly typed (`build_engine`). An engine runs only on the TensorRT version and GPU it was built for,
so its cache key holds those, the graph's hash (the LoRAs are fused into the graph, so a new LoRA is a new
hash), the precision, the optimisation profile and the builder level.

Nothing in this file has run here: the development machines have no GPU and no TensorRT.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import torch

from icd.core.consistency import Timesteps
from icd.core.denoiser import Conditioning
from icd.errors import ICDError
from icd.files import open_regular
from icd.latents import VAE_FACTOR
from icd.models.cache import icd_home
from icd.models.loading import DTYPES
from icd.p2p import CONTROL_NAMES

from .artifacts import Built, Index, graph_kind, key_hash, onnx_name
from .graphs import device_guard
from .onnx import control_shapes, graph_inputs, input_shapes

log = logging.getLogger("icd")

PRECISION = "fp16"
DTYPE = DTYPES[PRECISION]
OPTIMIZATION_LEVEL = 3
WORKSPACE_BYTES = 8 << 30


def tensorrt_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why TensorRT cannot run here, in one line, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'icd[tensorrt]' on a machine with an NVIDIA GPU)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU, and this run is on the CPU (use --device cuda on a GPU machine)"
    if dtype != DTYPE:
        return f"TensorRT engines are built in {PRECISION}: use --dtype {PRECISION} (the default on a GPU)"
    return None


def _tensorrt():
    if problem := tensorrt_problem(torch.device("cuda"), DTYPE):
        raise ICDError(problem)
    import tensorrt

    return tensorrt


def runtime_identity(trt, device: torch.device) -> dict:
    """What an engine must have been built with to run here: the TensorRT version and the GPU."""
    props = torch.cuda.get_device_properties(device)
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def profile_shapes(config, sizes: tuple[tuple[int, int], ...], max_batch: int,
                   steered: bool = False) -> dict[str, list]:
    """(min, opt, max) shape of each input: batches 1..max_batch (opt 1), latents spanning `sizes` (opt the
    first); the Prompt-to-Prompt graph runs pairs of rows (2, and 4 for two-pass guidance) and has the
    control inputs, of fixed shapes."""
    latents = [(height // VAE_FACTOR, width // VAE_FACTOR) for width, height in sizes]
    low = (min(h for h, _ in latents), min(w for _, w in latents))
    high = (max(h for h, _ in latents), max(w for _, w in latents))
    batches = (2, 2, max(4, max_batch)) if steered else (1, 1, max_batch)
    ends = [input_shapes(config, batch, latent) for batch, latent in zip(batches, (low, latents[0], high))]
    if steered:
        ends = [shapes | control_shapes() for shapes in ends]
    return {name: [list(shapes[name]) for shapes in ends] for name in ends[0]}


def _engine_kind(steered: bool) -> str:
    """The index kind of an engine built from the plain or the Prompt-to-Prompt graph (`graph_kind`)."""
    return "engine-p2p" if steered else "engine"


def engine_key(index: Index, direction: str, config, sizes, max_batch: int, identity: dict,
               steered: bool = False) -> dict:
    graph = index.find(kind=graph_kind(steered), direction=direction, precision=PRECISION)
    if graph is None:
        raise ICDError(f"no {PRECISION} ONNX graph of the {direction} UNet to build an engine from: run `icd export`")
    return {**identity, "graph_sha256": index.entries[graph]["sha256"], "precision": PRECISION,
            "profile": profile_shapes(config, sizes, max_batch, steered), "optimization_level": OPTIMIZATION_LEVEL}


def timing_cache_path(identity: dict) -> Path:
    """One timing cache per TensorRT version and GPU model, shared by all models (same layer shapes)."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", identity["gpu"]).strip("-")
    return icd_home() / "tensorrt" / f"timing-{identity['tensorrt']}-{gpu}.cache"


def build_engine(trt, onnx_path: Path, profile: dict[str, list], timing_cache: Path) -> bytes:
    """Parse the graph and build a serialized engine, reading and updating the timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: the only way under TensorRT 11 (no precision flags); TensorRT 10 must be asked.
    major = int(trt.__version__.split(".")[0])
    network = builder.create_network(0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ICDError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.builder_optimization_level = OPTIMIZATION_LEVEL
    optimization_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ICDError(f"TensorRT could not build an engine from {onnx_path.name} (see its messages above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def ensure_engine(index: Index, direction: str, config, sizes, max_batch: int, force: bool,
                  steered: bool = False) -> Built:
    """The engine for this GPU, TensorRT, graph and profile: reused from the cache, else built; `steered`:
    from the reverse UNet's Prompt-to-Prompt graph."""
    trt = _tensorrt()
    identity = runtime_identity(trt, torch.device("cuda"))
    key = engine_key(index, direction, config, sizes, max_batch, identity, steered)
    kind = _engine_kind(steered)
    name = f"unet-{direction}{'-p2p' if steered else ''}-{key_hash(key)}.plan"
    if not force and index.find(kind=kind, direction=direction, key=key_hash(key)) == name:
        return Built(name, True)
    log.info("building the TensorRT engine of the %s UNet (minutes, once per GPU and TensorRT version)", direction)
    plan = build_engine(trt, index.folder / onnx_name(direction, PRECISION, steered), key["profile"],
                        timing_cache_path(key))
    with index.staged() as scratch:
        (scratch / name).write_bytes(plan)
        # One engine per UNet and GPU: the one just built replaces any other profile's, so that it is the one used.
        for older in index.matching(kind=kind, direction=direction, **identity):
            index.remove(older)
        index.record(name, [scratch / name], kind=kind, direction=direction, key=key_hash(key), **key)
    return Built(name, False)


def find_engine(index: Index, direction: str, device: torch.device, steered: bool = False) -> str | None:
    """A cached engine of the current fp16 graph that runs on this GPU and TensorRT version (any profile)."""
    graph = index.find(kind=graph_kind(steered), direction=direction, precision=PRECISION)
    if graph is None:
        return None
    return index.find(kind=_engine_kind(steered), direction=direction,
                      graph_sha256=index.entries[graph]["sha256"], **runtime_identity(_tensorrt(), device))


class TensorRTEps:
    """The TensorRT engine, an epsilon function of core.denoiser's contract (`steered`: the run of the Prompt-to-Prompt
    engine, (x, t, cond, timestep_cond, control) -> (eps, blend maps)). Each input shape's call is captured once into a
    CUDA graph over fixed buffers, with an execution context of its own: a context holds the shapes and addresses it was
    last given, which a graph captured for another shape must not see changed under it. A call copies its inputs in,
    replays the graph and copies the outputs out. Loading, capture, copies and replay run under a guard of the engine's
    device: TensorRT allocates and CUDA graphs record and replay on the current device, which need not be this one."""

    def __init__(self, index: Index, name: str, device: torch.device, steered: bool = False):
        """`name`: the engine's file in `index` (`find_engine`)."""
        self.device = device
        trt = _tensorrt()
        self.entry = index.entries[name]
        logger = trt.Logger(trt.Logger.WARNING)
        with device_guard(device), open_regular(index.folder / name, follow_symlinks=False) as plan:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read())
            self.stream = torch.cuda.Stream(device)
        if self.engine is None:
            raise ICDError(f"TensorRT could not load {name}: run `icd export --tensorrt --force`")
        self.outputs = ("eps", "blend_maps") if steered else ("eps",)
        self._graphs: dict[tuple, tuple] = {}

    def _check_profile(self, feeds: dict) -> None:
        for name, tensor in feeds.items():
            low, _, high = self.entry["profile"][name]
            if not all(lo <= n <= hi for lo, n, hi in zip(low, tensor.shape, high)):
                raise ICDError(f"input {name} of shape {tuple(tensor.shape)} is outside the engine's profile "
                               f"({low} to {high}): rebuild with `icd export --tensorrt --size WxH --max-batch N`")

    def _enqueue(self, context, buffers: dict, outs: dict) -> None:
        for name, tensor in {**buffers, **outs}.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise ICDError("TensorRT failed to run the engine")

    def _capture(self, feeds: dict) -> tuple:
        """A context, fixed buffers for this shape and a CUDA graph of one engine run over them (under the
        device guard of `_replay`)."""
        self._check_profile(feeds)
        context = self.engine.create_execution_context()
        buffers = {name: tensor.clone() for name, tensor in feeds.items()}
        for name, tensor in buffers.items():
            context.set_input_shape(name, tuple(tensor.shape))
        # eps is in the graph's precision; the blend maps are computed in fp32 (icd.p2p)
        device = next(iter(buffers.values())).device
        outs = {name: torch.empty(tuple(context.get_tensor_shape(name)), device=device,
                                  dtype=DTYPE if name == "eps" else torch.float32) for name in self.outputs}
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._enqueue(context, buffers, outs)  # the first run allocates what it needs, outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(context, buffers, outs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return graph, context, buffers, outs

    def _replay(self, feeds: dict) -> list[torch.Tensor]:
        shape = tuple((name, tuple(tensor.shape)) for name, tensor in feeds.items())
        with device_guard(self.device):
            if shape not in self._graphs:
                self._graphs[shape] = self._capture(feeds)
            graph, _, buffers, outs = self._graphs[shape]
            for name, tensor in feeds.items():
                buffers[name].copy_(tensor)
            graph.replay()
            return [out.clone() for out in outs.values()]  # the next replay overwrites the buffers

    def __call__(self, x: torch.Tensor, t: Timesteps, cond: Conditioning, timestep_cond, control=()):
        feeds = graph_inputs(x, t, cond, timestep_cond, DTYPE)
        if control:
            feeds |= dict(zip(CONTROL_NAMES, control, strict=True))
        outs = self._replay(feeds)
        return tuple(outs) if control else outs[0]
