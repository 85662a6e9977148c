"""Loading an iCD model and the model-specific glue: SD1.5 vs SDXL text conditioning, VAE, devices.

Everything that differs between SD1.5 and SDXL lives here; samplers only see latents, a `Conditioning`
and a denoiser.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from functools import cached_property
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from .consistency import ddim_grid, guidance_embedding
from .errors import ICDError, ModelError
from .lora import fuse_lora
from .manifest import Manifest

log = logging.getLogger("icd")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIRECTIONS = ("forward", "reverse")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ICDError(f"--device {name} requested but {why}: use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = fp16 on a GPU, fp32 on a CPU (CPU fp16 kernels are missing or slow)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ICDError(f"unknown dtype '{name}': choose auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "fp16":
        raise ICDError("fp16 is not supported on the CPU: use --dtype fp32 or bf16")
    return DTYPES[name]


@dataclass
class Conditioning:
    """Text conditioning for a batch of rows; SDXL adds a pooled embedding and size ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def rows(self, index) -> Conditioning:
        pick = lambda tensor: None if tensor is None else tensor[index]  # noqa: E731
        return Conditioning(pick(self.embeds), pick(self.pooled), pick(self.time_ids))

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


class Denoiser:
    """eps = model(x_t, t, text, e(w)), one row per sample, whatever runs the UNet (subclasses run one pass).

    With a guidance-embedded UNet a guided prediction costs one pass. A UNet without the embedding falls
    back to classical two-pass guidance, eps_c + w (eps_c - eps_u), on the rows that ask for w != 0.
    The embeddings are cached per guidance row values: computing them on the CPU and copying them to a GPU
    every step would make the host wait for the GPU inside the loop.
    """

    def __init__(self, embed_dim: int | None, uncond: Conditioning | None, device: torch.device, dtype: torch.dtype):
        self.embed_dim, self.uncond, self.device, self.dtype = embed_dim, uncond, device, dtype
        self._embeddings: dict[tuple[float, ...], torch.Tensor] = {}

    def _eps(self, x: torch.Tensor, t: int, cond: Conditioning, timestep_cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _embedding(self, w: torch.Tensor) -> torch.Tensor:
        key = tuple(w.tolist())
        if key not in self._embeddings:
            self._embeddings[key] = guidance_embedding(w, self.embed_dim).to(self.device, self.dtype)
        return self._embeddings[key]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, w: torch.Tensor) -> torch.Tensor:
        if self.embed_dim:
            return self._eps(x, t, cond, self._embedding(w))
        eps = self._eps(x, t, cond, None)
        if bool((w != 0).any()):
            uncond = replace(self.uncond.rows([0] * x.shape[0]), time_ids=cond.time_ids)
            eps_u = self._eps(x, t, uncond, None)
            eps = eps + w.to(eps.device, eps.dtype).view(-1, 1, 1, 1) * (eps - eps_u)
        return eps


class UNetDenoiser(Denoiser):
    """The PyTorch backend; `unet` may be a torch.compile'd module."""

    def __init__(self, unet, embed_dim: int | None, uncond: Conditioning | None = None):
        super().__init__(embed_dim, uncond, unet.device, unet.dtype)
        self.unet = unet

    def _eps(self, x: torch.Tensor, t: int, cond: Conditioning, timestep_cond) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.unet(x.to(self.dtype), timestep, timestep_cond=timestep_cond, return_dict=False,
                         **cond.unet_kwargs())[0]


def _missing_base(base: str, part: str, err: Exception) -> ModelError:
    """Loading never touches the network (so it cannot hang): a base model not on disk says how to get it."""
    hint = "" if Path(base).is_dir() else f" (not in the Hugging Face cache: `icd pull` a preset, or `hf download {base}`)"
    return ModelError(f"cannot load {part} of base model {base}{hint}: {str(err).splitlines()[0]}")


def _from_base(cls, base: str, subfolder: str):
    """Load one component of the base pipeline from disk (full-precision files, else the fp16 variant
    that `icd pull` fetches for SDXL); a missing one is a one-line ModelError."""
    try:
        return cls.from_pretrained(base, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as err:
        try:
            return cls.from_pretrained(base, subfolder=subfolder, local_files_only=True, variant="fp16")
        except (OSError, ValueError):
            raise _missing_base(base, f"'{subfolder}'", err) from None


def _load_state_dict(path: Path) -> dict:
    """A teacher's weights; `.pt` files are unpickled with weights_only=True (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors come in many types
        raise ModelError(f"{path}: not a loadable teacher state dict ({str(err).splitlines()[0]})") from None
    if not isinstance(state, Mapping):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a UNet state dict")
    return state


@dataclass
class ICDModel:
    """A loaded iCD model: text encoders, VAE, and the forward/reverse UNets (built on first use).

    `backend` runs the UNet calls: torch (these modules, optionally torch.compile'd with `compile_mode`),
    onnx or tensorrt (engines exported by `icd export`).
    """

    manifest: Manifest
    device: torch.device
    dtype: torch.dtype
    backend: str = "torch"
    compile_mode: str | None = None
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    vae: object = None
    _unets: dict = field(default_factory=dict)
    _denoisers: dict = field(default_factory=dict)

    @classmethod
    def load(cls, manifest: Manifest, device: torch.device, dtype: torch.dtype,
             compile_mode: str | None = None) -> ICDModel:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        model = cls(manifest, device, dtype, compile_mode=compile_mode)
        suffixes = ["", "_2"] if manifest.kind == "sdxl" else [""]
        for i, suffix in enumerate(suffixes):
            tokenizer = _from_base(CLIPTokenizer, manifest.base, "tokenizer" + suffix)
            if len(tokenizer) <= len(tokenizer.all_special_tokens):  # transformers builds an empty one from nothing
                raise _missing_base(manifest.base, f"'tokenizer{suffix}'", OSError("no vocabulary files found"))
            model.tokenizers.append(tokenizer)
            encoder_cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            encoder = _from_base(encoder_cls, manifest.base, "text_encoder" + suffix)
            model.text_encoders.append(encoder.to(device, dtype).eval())
        vae = _from_base(AutoencoderKL, manifest.base, "vae")
        # The SDXL VAE overflows in fp16 (its config says force_upcast): keep it in fp32 then.
        vae_dtype = torch.float32 if vae.config.force_upcast else dtype
        model.vae = vae.to(device, vae_dtype).eval()
        return model

    # --- sizes -------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must divide by this so every UNet downsampling stays exact (64 SD1.5, 32 SDXL)."""
        return self.vae_scale_factor * 2 ** (len(self.unet_config["up_block_types"]) - 1)

    def latent_shape(self, width: int, height: int, batch: int = 1) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (batch, self.vae.config.latent_channels, height // f, width // f)

    # --- UNets -------------------------------------------------------------------------------------
    @cached_property
    def unet_config(self) -> dict:
        """The base UNet's config, plus the guidance embedding when a CFG-distilled teacher is used."""
        from diffusers import UNet2DConditionModel

        base = self.manifest.base
        try:
            config = UNet2DConditionModel.load_config(base, subfolder="unet", local_files_only=True)
        except (OSError, ValueError) as err:
            raise _missing_base(base, "the UNet config", err) from None
        if self.manifest.teacher is not None:
            config = {**config, "time_cond_proj_dim": self.manifest.guidance_embed_dim}
        return config

    def load_teacher(self):
        """A fresh fp32 copy of the teacher UNet (the CFG-distilled one when the manifest names it), on the CPU."""
        from diffusers import UNet2DConditionModel

        manifest = self.manifest
        if manifest.teacher is None:
            return _from_base(UNet2DConditionModel, manifest.base, "unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(self.unet_config)
        state = _load_state_dict(manifest.teacher)
        try:
            unet.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise ModelError(f"{manifest.teacher}: does not fit the {manifest.kind} UNet ({str(err).splitlines()[1].strip()})") from None
        return unet.float()

    def unets(self, *directions: str) -> list:
        """The fused UNets for the given directions: read from `icd export`'s artifacts when they are valid
        (a fast start: no teacher, no LoRA work), else fused here, reading the teacher once for all."""
        from export.artifacts import load_fused_unet

        missing = [d for d in directions if d not in self._unets]
        to_fuse = []
        for direction in missing:
            unet = load_fused_unet(self.manifest, self.unet_config, direction, self.dtype, self.device)
            if unet is None:
                to_fuse.append(direction)
            else:
                self._unets[direction] = self._ready(unet)
        for direction, unet in zip(to_fuse, self.fuse(*to_fuse)):
            self._unets[direction] = self._ready(unet)
        return [self._unets[d] for d in directions]

    def fuse(self, *directions: str) -> list:
        """Fresh fp32 UNets on the CPU, teacher + each direction's LoRA; the teacher is read once for all."""
        if not directions:
            return []
        teacher = self.load_teacher()
        fused = []
        for i, direction in enumerate(directions):
            unet = teacher if i == len(directions) - 1 else copy.deepcopy(teacher)
            lora = getattr(self.manifest, f"{direction}_lora")
            if lora is None:
                raise ModelError(f"model '{self.manifest.name}' has no {direction} LoRA")
            fuse_lora(unet, lora, self.manifest.lora_alpha)
            fused.append(unet)
        return fused

    def teacher_solver(self, steps: int = 50) -> ICDModel:
        """This model with its teacher in both students' places, on the `steps`-step DDIM grid: the slow
        multi-step inversion that the paper compares iCD with. Text encoders and VAE are shared."""
        grid = ddim_grid(steps)
        manifest = replace(self.manifest, name=f"{self.manifest.name} (teacher DDIM-{steps})",
                           forward_timesteps=tuple(grid[:-1]), reverse_timesteps=tuple(grid))
        solver = replace(self, manifest=manifest, backend="torch", compile_mode=None, _unets={}, _denoisers={})
        teacher = self._ready(self.load_teacher())
        solver._unets.update(forward=teacher, reverse=teacher)
        return solver

    def _ready(self, unet):
        """On the model's device and dtype, for inference; channels-last on a GPU, the layout that cuDNN's
        fp16 tensor-core convolutions use (the gain is not measured yet: no GPU in development)."""
        unet = unet.to(self.device, self.dtype).eval().requires_grad_(False)
        return unet.to(memory_format=torch.channels_last) if self.device.type == "cuda" else unet

    @property
    def guidance_embed_dim(self) -> int | None:
        return self.unet_config.get("time_cond_proj_dim")

    def unconditional(self) -> Conditioning | None:
        """The empty prompt's conditioning for classical two-pass guidance; None with a guidance embedding."""
        return None if self.guidance_embed_dim else self.encode_text([""], (self.manifest.resolution,) * 2)

    def denoiser(self, direction: str, attention_control: bool = False) -> Denoiser:
        """The denoiser of the model's backend, made once. Attention control (Prompt-to-Prompt's hooks)
        needs the eager PyTorch UNet, whatever the backend."""
        key = (direction, attention_control)
        if key not in self._denoisers:
            self._denoisers[key] = self._make_denoiser(direction, attention_control)
        return self._denoisers[key]

    def _make_denoiser(self, direction: str, attention_control: bool) -> Denoiser:
        if self.backend != "torch":
            if not attention_control:
                from export.backends import engine_denoiser

                return engine_denoiser(self, direction)
            log.info("prompt-to-prompt edits attention maps: its decoding runs on torch, not %s", self.backend)
        (unet,) = self.unets(direction)
        if self.compile_mode and not attention_control:
            unet = torch.compile(unet, mode=self.compile_mode, fullgraph=True)
        return UNetDenoiser(unet, self.guidance_embed_dim, self.unconditional())

    # --- text --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """CLIP conditioning; SDXL: both encoders' penultimate states, the pooled vector and size ids."""
        for prompt in set(prompts):
            count = len(self.tokenizers[0](prompt).input_ids)
            limit = self.tokenizers[0].model_max_length
            if count > limit:
                log.warning("prompt is %d tokens, over CLIP's %d: the end is cut off: %r", count, limit, prompt)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            if self.manifest.kind == "sd15":
                hidden.append(encoder(ids)[0])
            else:
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # text_embeds of the projection model (the last encoder)
        embeds = torch.cat(hidden, dim=-1)
        if self.manifest.kind == "sd15":
            return Conditioning(embeds)
        width, height = size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=embeds.dtype)
        return Conditioning(embeds, pooled, time_ids.repeat(len(prompts), 1))

    # --- VAE ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled posterior mean (fp32)."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return posterior.mean.float() * self.vae.config.scaling_factor

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] (fp32, on the CPU)."""
        scaled = (latents / self.vae.config.scaling_factor).to(self.device, self.vae.dtype)
        return self.vae.decode(scaled, return_dict=False)[0].float().clamp(-1, 1).cpu()


def choose_compile_mode(device: torch.device, static_shapes: bool) -> str:
    """torch.compile's mode: CUDA graphs and autotuning (max-autotune) pay off only when every call has the
    same shapes (they are recorded per shape); otherwise, and on a CPU, the default mode."""
    return "max-autotune" if device.type == "cuda" and static_shapes else "default"


_LOADED: dict = {}


def get_model(manifest: Manifest, device: str = "auto", dtype: str = "auto", backend: str = "torch",
              compile_mode: str | None = None) -> ICDModel:
    """Load a model once per process (per backend) and reuse it. A backend other than torch (auto included)
    is settled after loading, so that a broken model is reported before any backend message."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    key = (manifest, torch_device, torch_dtype, backend, compile_mode)
    if key not in _LOADED:
        model = ICDModel.load(manifest, torch_device, torch_dtype, compile_mode=compile_mode)
        if backend != "torch":
            from export.backends import select_backend

            model.backend = select_backend(backend, manifest, torch_device, torch_dtype)
        _LOADED[key] = model
    return _LOADED[key]
