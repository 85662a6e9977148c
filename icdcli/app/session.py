"""A session: one model opened for running, the only place where engines are wired to the pipeline.

It loads the text encoders and VAE, settles the backend (announcing an export when a named engine lacks its
files), and hands the pipeline a denoiser per direction (any engine's epsilon function behind the one
guidance wrapper) and, for Prompt-to-Prompt, the reverse UNet with its control as inputs on the same engine
(eager, compiled, ONNX Runtime or TensorRT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from icd.core.schedule import ddim_grid
from icd.core.denoiser import Denoiser, Guided
from icd.models.hub import resolve_model
from icd.models.loading import (PRECISIONS, Model, claim_device, load_teacher, ready_unet, resolve_device,
                                resolve_dtype, unet_eps)
from icd.models.manifest import Manifest
from icd.p2p import AttentionHost, Steered, SteeredUNet, steered_eps
from icd_export.artifacts import fused_unets
from icd_export.compiled import choose_compile_mode, compiled_eps, compiled_steered
from icd_export.graphs import LoopGraphs, captures_loops
from icd_export.registry import choose_backend, engine_eps, engine_steered

log = logging.getLogger("icd")


@dataclass
class Session:
    """A model ready to run on one backend: what `icd.pipeline`'s functions take as their runtime."""

    model: Model
    backend: str = "torch"
    compile_mode: str | None = None
    graphs: LoopGraphs | None = None  # set: each loop replays as one captured CUDA graph
    _unets: dict = field(default_factory=dict)
    _denoisers: dict = field(default_factory=dict)
    _host: AttentionHost | None = None

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    def unets(self, *directions: str) -> list:
        """The eager PyTorch UNets, loaded once (the teacher is read once for all directions)."""
        missing = tuple(d for d in directions if d not in self._unets)
        model = self.model
        for direction, unet in zip(missing, fused_unets(model.manifest, model.unet_config, missing, model.dtype,
                                                        model.device)):
            self._unets[direction] = ready_unet(unet, model.device, model.dtype)
        return [self._unets[d] for d in directions]

    def _guided(self, eps) -> Denoiser:
        model = self.model
        return Guided(eps, model.guidance_embed_dim, model.unconditional(), model.device, model.dtype)

    def denoiser(self, direction: str) -> Denoiser:
        """The denoiser of the session's backend for one UNet, made once."""
        if direction not in self._denoisers:
            if self.backend != "torch":
                eps = engine_eps(self.backend, self.model, direction)
            else:
                (unet,) = self.unets(direction)
                eps = compiled_eps(unet, self.model.dtype, self.compile_mode) if self.compile_mode else \
                    unet_eps(unet, self.model.dtype)
            self._denoisers[direction] = self._guided(eps)
        return self._denoisers[direction]

    def attention_host(self) -> AttentionHost:
        """Prompt-to-Prompt's steered reverse UNet on the session's backend, made once: the processors are
        set on the PyTorch UNet once, and engines run the graph that takes the control as inputs."""
        if self._host is None:
            if self.backend != "torch":
                run = engine_steered(self.backend, self.model)
            else:
                (unet,) = self.unets("reverse")
                module = SteeredUNet(unet)
                run = compiled_steered(module, self.model.dtype, self.compile_mode) if self.compile_mode else \
                    steered_eps(module, self.model.dtype)
            steered = Steered(run)
            self._host = AttentionHost(steered, self._guided(steered), self.model.device)
        return self._host

    def run_loop(self, key: tuple, loop, *inputs):
        """`loop(*inputs)`, replayed from a captured graph when the session captures loops."""
        if self.graphs is None:
            return loop(*inputs)
        guided = [*self._denoisers.values(), *([self._host.denoiser] if self._host else [])]
        return self.graphs.run(key, loop, *inputs, keep=lambda: [t for g in guided for t in g.kept_tensors()])

    def teacher_solver(self, steps: int = 50) -> Session:
        """This model with its teacher in both students' places, on the `steps`-step DDIM grid: the slow
        multi-step inversion that the paper compares iCD with. Text encoders and VAE are shared."""
        grid = ddim_grid(steps)
        manifest = replace(self.manifest, name=f"{self.manifest.name} (teacher DDIM-{steps})",
                           forward_timesteps=tuple(grid[:-1]), reverse_timesteps=tuple(grid))
        teacher = ready_unet(load_teacher(self.manifest, self.model.unet_config), self.model.device, self.model.dtype)
        return Session(replace(self.model, manifest=manifest), _unets={"forward": teacher, "reverse": teacher})


def _settle_backend(requested: str, model: Model) -> str:
    """The backend to run; a named engine whose files are missing is exported here, and said so."""
    from icd_export.build import export_model

    choice = choose_backend(requested, model.manifest, model.device, model.dtype)
    if choice.reason:
        log.info("backend: %s (%s)", choice.backend, choice.reason)
    if choice.needs_export:
        log.info("no %s artifacts for model '%s' yet: building them once (`icd export` does it ahead)",
                 choice.backend, model.manifest.name)
        export_model(model.manifest, (PRECISIONS[model.dtype],), tensorrt=choice.backend == "tensorrt",
                     device=model.device)
    return choice.backend


_OPEN: dict = {}


def open_session(model_ref: str | Manifest, device: str = "auto", dtype: str = "auto", backend: str = "auto",
                 compile: bool = False, static_shapes: bool = False, directions: tuple[str, ...] = ()) -> Session:
    """Open a model once per process and settings, with the denoisers of `directions` ready, so that a broken
    model fails before any item. On CUDA the PyTorch backend replays each loop as one captured graph from its
    second run (icd_export.graphs). `compile` applies torch.compile to the UNets, autotuned when
    `static_shapes` (every item has the same size)."""
    manifest = model_ref if isinstance(model_ref, Manifest) else resolve_model(model_ref)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    static_shapes = static_shapes and compile and torch_device.type == "cuda"  # only then does it change anything
    key = (manifest, torch_device, torch_dtype, backend, compile, static_shapes)
    claim_device(torch_device)
    if key not in _OPEN:
        model = Model.load(manifest, torch_device, torch_dtype)
        chosen = _settle_backend(backend, model)
        loops = captures_loops(torch_device, chosen)
        mode = choose_compile_mode(torch_device, static_shapes, loops) if compile else None
        _OPEN[key] = Session(model, chosen, mode, LoopGraphs(torch_device) if loops else None)
    session = _OPEN[key]
    if session.backend == "torch":
        session.unets(*directions)  # the teacher is read once for both
    for direction in directions:
        session.denoiser(direction)
    return session

