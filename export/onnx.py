"""ONNX graphs of the fused UNets, their check against PyTorch, and the ONNX Runtime denoiser.

A graph takes the sample, the timestep (fp32, one per row), the text states, the guidance embedding e(w)
(`timestep_cond`) and, for SDXL, the pooled text embedding and size ids; it returns eps. Batch and latent size
are dynamic. The timestep and e(w) stay inputs: all they feed is 0.007% of an SD1.5 UNet call's FLOPs at
512x512 (counted), so baking them per boundary timestep would multiply the graphs for nothing. The reverse UNet's
second graph, for Prompt-to-Prompt, takes the control tensors of `icd.p2p` as further inputs (`CONTROL_NAMES`)
and returns LocalBlend's blend-word attention too: one graph per model, the prompts, windows and steps all inputs.

diffusers' UNet picks a Python branch on whether the latent divides by 2**upsamplers, and a trace keeps only its
example's branch: the example is an "odd" size, whose branch (explicit upsample sizes) is right for every size,
and each graph is checked in ONNX Runtime at another size and batch. The TorchScript exporter is used: the
dynamo one took 50 s instead of 1.4 s for the tiny UNet on the development CPU, and its tests must stay fast.
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from icd.core.consistency import Timesteps
from icd.core.denoiser import Conditioning
from icd.core.schedule import NUM_TRAIN_TIMESTEPS
from icd.errors import ICDError, first_line
from icd.latents import VAE_FACTOR
from icd.models.loading import DTYPES
from icd.p2p import CONTROL_NAMES, LEVELS, SteeredUNet, blend_level, level_grid

from .artifacts import Index, key_hash

log = logging.getLogger("icd")

OPSET = 17
TEXT_TOKENS = 77
# Largest |onnx - torch| allowed, relative to the reference's largest |eps|.
TOLERANCE = {"fp32": 2e-3, "fp16": 5e-2}


class ExportError(ICDError):
    """An export that failed or produced a graph that does not match PyTorch."""


class UNetGraph(torch.nn.Module):
    """The UNet with flat tensor inputs, as the graph sees it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    outputs = ("eps",)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **self._kwargs(extra))[0]

    def _kwargs(self, extra) -> dict:
        kwargs = dict(zip(input_names(self.unet.config)[3:], extra))
        added = {k: kwargs.pop(k) for k in ("text_embeds", "time_ids") if k in kwargs}
        return {"added_cond_kwargs": added or None, **kwargs}


class SteeredGraph(UNetGraph):
    """The reverse UNet steered by Prompt-to-Prompt: the control tensors follow the UNet's inputs, and the
    blend-word attention of the blend level comes out beside eps."""

    outputs = ("eps", "blend_maps")

    def __init__(self, unet):
        super().__init__(unet)
        self.steered = SteeredUNet(unet)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        split = len(extra) - len(CONTROL_NAMES)
        return self.steered(sample, timestep, extra[split:], encoder_hidden_states=encoder_hidden_states,
                            **self._kwargs(extra[:split]))


def graph_class(steered: bool) -> type[UNetGraph]:
    return SteeredGraph if steered else UNetGraph


def input_names(config) -> list[str]:
    return list(input_shapes(config, batch=1, latent=(1, 1)))


def control_shapes() -> dict[str, tuple[int, ...]]:
    """The Prompt-to-Prompt control inputs' shapes: fixed, whatever the batch and latent."""
    return {"p2p_cross": (1,), "p2p_self": (LEVELS,), "p2p_weights": (TEXT_TOKENS, TEXT_TOKENS),
            "p2p_keep": (TEXT_TOKENS,), "p2p_equalizer": (TEXT_TOKENS,), "p2p_blend": (2, TEXT_TOKENS)}


def random_control(seed: int = 0) -> dict[str, torch.Tensor]:
    """Control inputs that edit: some self-attention levels and cross-attention on, a few kept tokens."""
    generator = torch.Generator().manual_seed(seed)
    uniform = {name: torch.rand(shape, generator=generator) for name, shape in control_shapes().items()}
    return {"p2p_cross": torch.tensor([True]), "p2p_self": torch.arange(LEVELS) % 2 == 1,
            "p2p_weights": uniform["p2p_weights"].softmax(-1), "p2p_keep": uniform["p2p_keep"] > 0.8,
            "p2p_equalizer": 1 + uniform["p2p_equalizer"], "p2p_blend": (uniform["p2p_blend"] > 0.8).float()}


def input_shapes(config, batch: int, latent: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape for a batch and a latent (height, width)."""
    shapes = {"sample": (batch, config["in_channels"], *latent), "timestep": (batch,),
              "encoder_hidden_states": (batch, TEXT_TOKENS, config["cross_attention_dim"])}
    if config.get("time_cond_proj_dim"):
        shapes["timestep_cond"] = (batch, config["time_cond_proj_dim"])
    if config.get("addition_embed_type") == "text_time":
        time_ids = 6
        shapes["text_embeds"] = (batch, config["projection_class_embeddings_input_dim"]
                                 - time_ids * config["addition_time_embed_dim"])
        shapes["time_ids"] = (batch, time_ids)
    return shapes


def graph_inputs(x: torch.Tensor, t: Timesteps, cond: Conditioning, timestep_cond, dtype: torch.dtype) -> dict:
    """An epsilon call's tensors by graph input name (floats in the graph's dtype, the timestep fp32)."""
    if not isinstance(t, torch.Tensor):
        t = torch.full((x.shape[0],), float(t), device=x.device)
    feeds = {"sample": x.to(dtype), "timestep": t.to(x.device).float(),
             "encoder_hidden_states": cond.embeds.to(x.device, dtype)}
    if timestep_cond is not None:
        feeds["timestep_cond"] = timestep_cond
    if cond.pooled is not None:
        feeds["text_embeds"] = cond.pooled.to(x.device, dtype)
        feeds["time_ids"] = cond.time_ids.to(x.device, dtype)
    return {name: tensor.contiguous() for name, tensor in feeds.items()}


def _upsampling(config) -> int:
    return 2 ** (len(config["up_block_types"]) - 1)


def example_latent(config) -> tuple[int, int]:
    """An odd latent size (neither side divides by 2**upsamplers), so the general branch is traced."""
    return 2 * _upsampling(config) + 1, 2 * _upsampling(config) - 1


def verify_latent(config) -> tuple[int, int]:
    """Where a graph is checked: off the example, on the other branch, and small enough for a CPU (SDXL)."""
    return 4 * _upsampling(config), 4 * _upsampling(config)


def random_inputs(config, batch: int, latent: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    feeds = {name: torch.randn(shape, generator=generator).to(dtype)
             for name, shape in input_shapes(config, batch, latent).items()}
    feeds["timestep"] = torch.randint(1, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator).float()
    if "time_ids" in feeds:
        height, width = latent[0] * VAE_FACTOR, latent[1] * VAE_FACTOR
        feeds["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).repeat(batch, 1)
    return feeds


def graph_feeds(config, batch: int, latent: tuple[int, int], precision: str, steered: bool, seed: int) -> dict:
    """Random inputs of a graph by name: floats in the precision, the timestep and the control as they are."""
    dtype = DTYPES[precision]
    feeds = {name: t if name == "timestep" else t.to(dtype)
             for name, t in random_inputs(config, batch, latent, torch.float32, seed).items()}
    return feeds | (random_control(seed) if steered else {})


def export_unet(unet, path: Path, precision: str, device: torch.device, steered: bool = False) -> list[Path]:
    """Trace the UNet (any dtype, any device) into `path` (+ `path.data` for the weights) in `precision`;
    `steered`: the Prompt-to-Prompt graph (its processors are set on the UNet)."""
    import onnx

    dtype = DTYPES[precision]
    same = unet.dtype == dtype and unet.device == device
    graph = graph_class(steered)(unet if same else copy.deepcopy(unet).to(device, dtype)).eval()
    example = graph_feeds(unet.config, 2, example_latent(unet.config), precision, steered, seed=0)
    names = list(example)
    example = tuple(example[name].to(device) for name in names)
    axes = {name: {0: "batch"} for name in input_names(unet.config)} | {
        "sample": {0: "batch", 2: "height", 3: "width"}, "eps": {0: "batch", 2: "height", 3: "width"},
        "blend_maps": {1: "blend_tokens"}}
    axes = {name: axis for name, axis in axes.items() if name in names or name in graph.outputs}
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings(), torch.inference_mode(False):
        # The legacy exporter's deprecation notice and the tracer's notes on Python branches (see above).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = Path(scratch) / "unet.onnx"
        try:
            torch.onnx.export(graph, example, str(traced), dynamo=False, input_names=names,
                              output_names=list(graph.outputs), dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True)
        except Exception as err:  # the exporter raises many types
            raise ExportError(f"ONNX export failed: {first_line(err)}") from None
        # One weights file beside the graph (the exporter writes one per tensor when over 2 GB).
        model = onnx.load(str(traced))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


@functools.cache
def ort_stream(device: torch.device) -> torch.cuda.Stream:
    """The one CUDA stream that ONNX Runtime runs on and binds its I/O on, per device. Not torch's default
    stream: its handle is 0, which ONNX Runtime reads as "no stream given" and then runs on a stream of its own
    that nothing orders against torch's work. This one is given to the session, and each run makes it wait for
    torch's current stream (the inputs are written) and that stream wait for it (the outputs are written), so
    ORT's end-of-run host sync can stay off."""
    return torch.cuda.Stream(device)


def cpu_optimized_spec(index: Index, graph: str) -> dict:
    """What the fully optimised CPU version of the graph `graph` is recorded as: its layout optimisations depend on the
    ONNX Runtime version and the CPU's instruction set, and it derives from one build of the graph (its hash)."""
    import onnxruntime as ort

    return {"kind": "onnx-cpu", "graph": graph, "graph_sha256": index.entries[graph]["sha256"],
            "onnxruntime": ort.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def find_cpu_optimized(index: Index, graph: str) -> Path | None:
    """The fully optimised CPU version of the graph `graph` for this ONNX Runtime and CPU, when built and intact."""
    name = index.find(**cpu_optimized_spec(index, graph))
    return None if name is None else index.folder / name


def ensure_cpu_optimized(index: Index, graph: str, force: bool = False) -> None:
    """Optimise the graph `graph` fully for this CPU once (ORT_ENABLE_ALL: for the SD1.5 P2P graph at 128 px,
    calls 12% faster than at the basic level, BENCHMARKS.md) and keep the result beside it, so that sessions
    open it without optimising (6.5 s for SD1.5, where optimising fully takes 20 s). Called by the export,
    under its lock; older versions are removed."""
    import onnxruntime as ort

    spec = cpu_optimized_spec(index, graph)
    if not force and index.find(**spec):
        return
    log.info("optimising %s for this CPU (once)", graph)
    name = f"{Path(graph).stem}.cpu-{key_hash(spec)[:12]}.ort.onnx"
    with index.staged() as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.optimized_model_filepath = str(scratch / name)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(index.folder / graph), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types (a full disk among them)
            raise ExportError(f"optimising {graph} for this CPU failed: {first_line(err)}") from None
        for older in index.matching(kind="onnx-cpu", graph=graph):
            index.remove(older)
        index.record(name, sorted(scratch.iterdir()), **spec)


def onnx_session(path: Path, device: torch.device, optimized: Path | None = None):
    """An ONNX Runtime session on the CPU or, for a CUDA device, the CUDA provider on `ort_stream`. On the CPU
    it opens `optimized` (`find_cpu_optimized`), when there is one, without optimising again; else it runs only
    the basic optimisations, which open SD1.5's graph in 6.6 s where optimising fully takes 20 s."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    levels = ort.GraphOptimizationLevel
    options.log_severity_level = 3
    if device.type == "cuda":  # OnnxEngine.problem has checked that onnxruntime has this provider
        options.graph_optimization_level = levels.ORT_ENABLE_ALL
        stream = ort_stream(device).cuda_stream
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0, "user_compute_stream": str(stream)})]
        return ort.InferenceSession(str(path), options, providers=providers)
    options.intra_op_num_threads = torch.get_num_threads()  # torch's, set as the session opened (models/threads.py)
    # ONNX Runtime's threads otherwise spin after each run, taking the cores from torch's work between UNet
    # calls (text encoder, VAE, the sampler's arithmetic).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.graph_optimization_level = levels.ORT_DISABLE_ALL
        path = optimized
    else:
        options.graph_optimization_level = levels.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_graph(path: Path, unet, precision: str, batch: int, latent: tuple[int, int], steered: bool = False) -> float:
    """Run the graph in ONNX Runtime (CPU) and the fp32 UNet on the same random inputs; returns the largest difference
    of any output relative to its largest magnitude, and raises if it is over the precision's tolerance."""
    session = onnx_session(path, torch.device("cpu"))
    graph = graph_class(steered)(unet)
    feeds = graph_feeds(unet.config, batch, latent, "fp32", steered, seed=1)
    with torch.inference_mode():
        references = graph(*feeds.values())
    references = references if steered else (references,)
    feeds = graph_feeds(unet.config, batch, latent, precision, steered, seed=1)
    outs = session.run(list(graph.outputs), {name: t.numpy() for name, t in feeds.items()})
    error = max(((torch.from_numpy(out).float() - reference.float()).abs().max() / reference.abs().max()).item()
                for out, reference in zip(outs, references, strict=True))
    if not error <= TOLERANCE[precision]:  # also catches NaN
        raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch at batch {batch}, latent "
                          f"{latent[0]}x{latent[1]} by {error:.3g} of the output's range (tolerance "
                          f"{TOLERANCE[precision]:g}){'; the model overflows fp16' if precision == 'fp16' else ''}")
    return error


class OnnxEps:
    """The ONNX Runtime engine: one session per UNet, an epsilon function of core.denoiser's contract."""

    def __init__(self, session, device: torch.device, dtype: torch.dtype):
        self.session, self.device, self.dtype = session, device, dtype
        self.outputs = [output.name for output in session.get_outputs()]
        if device.type == "cuda":
            import onnxruntime as ort

            self._run_options = ort.RunOptions()
            # The outputs are consumed on the same stream: no need for ORT to wait for the GPU after each call.
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def __call__(self, x: torch.Tensor, t: Timesteps, cond: Conditioning, timestep_cond) -> torch.Tensor:
        return self._run(graph_inputs(x, t, cond, timestep_cond, self.dtype))[0]

    def _run(self, feeds: dict) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            outs = self.session.run(self.outputs, {name: tensor.numpy() for name, tensor in feeds.items()})
            return [torch.from_numpy(out) for out in outs]
        return self._run_on_gpu(feeds)

    def _output_shapes(self, feeds: dict) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [(tuple(feeds["sample"].shape), self.dtype)]

    def _run_on_gpu(self, feeds: dict) -> list[torch.Tensor]:
        """Bind torch's CUDA buffers directly (no copies through the host), ordered with torch's work through
        `ort_stream` (see there)."""
        import numpy as np

        numpy_type = {torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_}
        binding = self.session.io_binding()
        index = self.device.index or 0
        current, stream = torch.cuda.current_stream(self.device), ort_stream(self.device)
        stream.wait_stream(current)
        for name, tensor in feeds.items():
            binding.bind_input(name, "cuda", index, numpy_type[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        # Allocated on torch's stream, which waits for ORT's before anything reads or reuses them.
        outs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self._output_shapes(feeds)]
        for name, out in zip(self.outputs, outs, strict=True):
            binding.bind_output(name, "cuda", index, numpy_type[out.dtype], tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding, self._run_options)
        current.wait_stream(stream)
        return outs


class OnnxSteered(OnnxEps):
    """The steered reverse graph: (x, t, cond, timestep_cond, control) -> (eps, blend maps), what
    `icd.p2p.AttentionHost` runs."""

    def __init__(self, session, device: torch.device, dtype: torch.dtype, config):
        super().__init__(session, device, dtype)
        self.blend_level = blend_level(config)

    def __call__(self, x, t, cond, timestep_cond, control) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = graph_inputs(x, t, cond, timestep_cond, self.dtype) | dict(zip(CONTROL_NAMES, control, strict=True))
        eps, maps = self._run(feeds)
        return eps, maps

    def _output_shapes(self, feeds: dict) -> list[tuple[tuple[int, ...], torch.dtype]]:
        grid = level_grid(tuple(feeds["sample"].shape[-2:]), self.blend_level)
        return [*super()._output_shapes(feeds), ((2, grid[0] * grid[1]), torch.float32)]
