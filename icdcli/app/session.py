"""A session: one model opened on one engine, the only place where engines meet the pipeline: it hands the
pipeline a denoiser per direction (the engine's epsilon behind the one guidance wrapper), Prompt-to-Prompt's
steered reverse UNet, and where the engine says so, each loop replayed as one captured CUDA graph."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace

from icd.core.denoiser import Denoiser, Guided
from icd.core.schedule import ddim_grid
from icd.models.hub import resolve_model
from icd.models.loading import (PRECISIONS, Model, claim_device, load_teacher, ready_unet, resolve_device,
                                resolve_dtype)
from icd.models.manifest import Manifest
from icd.models.threads import use_cpu_threads, useful_threads
from icd.p2p import AttentionHost
from icd_export.compiled import choose_compile_mode
from icd_export.graphs import LoopGraphs
from icd_export.engines import Engine, TorchEngine
from icd_export.registry import choose_backend

log = logging.getLogger("icd")


@dataclass
class Session:
    """A model ready to run on one engine: what `icd.pipeline`'s functions take as their runtime."""

    model: Model
    engine: Engine = field(default_factory=TorchEngine)
    graphs: LoopGraphs | None = None  # set: each loop replays as one captured CUDA graph
    _denoisers: dict = field(default_factory=dict)
    _host: AttentionHost | None = None

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    def _guided(self, eps) -> Denoiser:
        model = self.model
        return Guided(eps, model.guidance_embed_dim, model.unconditional(), model.device, model.dtype)

    def denoiser(self, direction: str) -> Denoiser:
        """The denoiser of one UNet on the session's engine, made once."""
        if direction not in self._denoisers:
            self._denoisers[direction] = self._guided(self.engine.eps(self.model, direction))
        return self._denoisers[direction]

    def attention_host(self) -> AttentionHost:
        """Prompt-to-Prompt's steered reverse UNet on the session's engine, made once."""
        if self._host is None:
            self._host = AttentionHost(self.engine.steered(self.model), self.model.device, self._guided)
        return self._host

    def run_loop(self, key: tuple, loop, *inputs):
        """`loop(*inputs)`, replayed from a captured graph when the session captures loops."""
        if self.graphs is None:
            return loop(*inputs)
        guided = [*self._denoisers.values(), *([self._host.denoiser] if self._host else [])]
        return self.graphs.run(key, loop, *inputs, keep=lambda: [t for g in guided for t in g.kept_tensors()])


def teacher_session(session: Session, steps: int = 50) -> Session:
    """The session's model with its teacher in both students' places, on the `steps`-step DDIM grid: the slow
    multi-step inversion and editing that the paper compares iCD with. Text encoders and VAE are shared."""
    model = session.model
    grid = ddim_grid(steps)
    manifest = replace(model.manifest, name=f"{model.manifest.name} (teacher DDIM-{steps})",
                       forward_timesteps=tuple(grid[:-1]), reverse_timesteps=tuple(grid))
    teacher = ready_unet(load_teacher(model.manifest, model.unet_config), model.device, model.dtype)
    return Session(replace(model, manifest=manifest), TorchEngine(unets={"forward": teacher, "reverse": teacher}))


def _settle_engine(requested: str, model: Model, compile: bool, static_shapes: bool) -> Engine:
    """The engine to run, compiled where asked and possible; a named engine's missing files are exported here."""
    from icd_export.build import export_model

    choice = choose_backend(requested, model.manifest, model.device, model.dtype)
    if choice.reason:
        log.info("backend: %s (%s)", choice.backend, choice.reason)
    if choice.needs_export:
        log.info("no %s artifacts for model '%s' yet: building them once (`icd export` does it ahead)",
                 choice.backend, model.manifest.name)
        export_model(model.manifest, (PRECISIONS[model.dtype],), device=model.device, **choice.engine.export_options())
    engine = choice.engine()
    if compile and choice.compiles:
        engine.compile_mode = choose_compile_mode(model.device, static_shapes, engine.captures_loops(model.device))
    return engine


def quiet_libraries() -> None:
    """Keep stderr for icd's own lines: silence the libraries' bars, notices and warnings (shown with -v)."""
    if logging.getLogger("icd").isEnabledFor(logging.DEBUG):
        return
    import diffusers
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    disable_progress_bars()
    warnings.simplefilter("ignore")


_OPEN: dict = {}


def open_session(model_ref: str | Manifest, device: str = "auto", dtype: str = "auto", backend: str = "auto",
                 compile: bool = False, static_shapes: bool = False, directions: tuple[str, ...] = (),
                 threads: int | None = None) -> Session:
    """Open a model once per process and settings, with the denoiser of each of `directions` ready, so that a
    broken model fails before any item; the CPU threads (`threads`, else as many as the model keeps busy) are
    set before ONNX Runtime's sessions copy them. `static_shapes`: torch.compile autotunes."""
    manifest = model_ref if isinstance(model_ref, Manifest) else resolve_model(model_ref)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    static_shapes = static_shapes and compile and torch_device.type == "cuda"  # only then does it change anything
    key = (manifest, torch_device, torch_dtype, backend, compile, static_shapes)
    claim_device(torch_device)
    if key not in _OPEN:
        model = Model.load(manifest, torch_device, torch_dtype)
        use_cpu_threads(threads, useful_threads(model.unet_config))
        engine = _settle_engine(backend, model, compile, static_shapes)
        _OPEN[key] = Session(model, engine, LoopGraphs(torch_device) if engine.captures_loops(torch_device) else None)
    session = _OPEN[key]
    session.engine.prepare(session.model, directions)  # the teacher is read once for both
    for direction in directions:
        session.denoiser(direction)
    return session
