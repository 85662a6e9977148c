"""Loading an iCD model's parts, and the glue that differs between SD1.5 and SDXL: `Model` (text encoders, VAE
and UNet config), the UNets (`load_teacher`, `fuse_unets`: teacher + LoRA), and `unet_eps`, a PyTorch UNet as an
epsilon function of the core's contract."""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.consistency import Timesteps
from ..core.denoiser import Conditioning, EpsFn
from ..errors import ModelError, UsageError, first_line
from .cache import already_checked, remember_checked
from .lora import first_non_finite, fuse_lora
from .geometry import multiple_of
from .hub import SDXL_FP16_VAE
from .manifest import Manifest
from .official import PRECISION_NAMES

log = logging.getLogger("icd")

DTYPES = dict(zip(PRECISION_NAMES, (torch.float32, torch.float16, torch.bfloat16)))
PRECISIONS = {dtype: name for name, dtype in DTYPES.items()}


def resolve_device(name: str = "auto") -> torch.device:
    """`--device`: auto, cpu, cuda or cuda:N of a visible GPU; anything else is one UsageError line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        why = "not a device icd runs on"
    elif device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        why = f"only {torch.cuda.device_count()} CUDA GPU(s) are visible"
    else:
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    choices = ", ".join(["auto", "cpu", *(["cuda"] if count else []), *(f"cuda:{i}" for i in range(count))])
    raise UsageError(f"--device {name}: {why}; choose one of: {choices}")


def claim_device(device: torch.device) -> None:
    """Make a CUDA `device` the current one (where work that names no device goes, e.g. TensorRT's allocations:
    cuda:0 unless set), and let fp32 matmuls use TF32 there, as cuDNN's fp32 convolutions already do (it speeds
    up the fp32 layers of a half-precision run, such as SDXL's VAE under fp16). A CPU device changes nothing."""
    if device.type != "cuda":
        return
    if device.index is not None:
        torch.cuda.set_device(device.index)
    torch.backends.cuda.matmul.allow_tf32 = True  # the CUDA-only switch (set_float32_matmul_precision: CPU too)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = fp16 on a GPU, fp32 on a CPU (CPU fp16 kernels are missing or slow)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name}: unknown precision; choose one of: auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "fp16":
        raise UsageError(f"--dtype {name}: not supported on the CPU; choose one of: auto, "
                         f"{', '.join(other for other in DTYPES if other != name)}")
    return DTYPES[name]


def _missing_base(base: str, part: str, err: Exception, whose: str = "base model") -> ModelError:
    """Loading never touches the network (so it cannot hang): a base model not on disk says how to get it."""
    hint = "" if Path(base).is_dir() else f" (not in the Hugging Face cache: `icd pull` a preset, or `hf download {base}`)"
    return ModelError(f"cannot load {part} of {whose} {base}{hint}: {first_line(err)}")


def _from_base(cls, base: str, subfolder: str | None, whose: str = "base model"):
    """One component of the base pipeline from disk (full-precision files, else the fp16 variant `icd pull`
    fetches for SDXL; `subfolder` None: the whole repository, a VAE named apart); missing: one ModelError line."""
    try:
        return cls.from_pretrained(base, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as err:
        try:
            return cls.from_pretrained(base, subfolder=subfolder, local_files_only=True, variant="fp16")
        except (OSError, ValueError):
            raise _missing_base(base, f"'{subfolder}'" if subfolder else "the weights", err, whose) from None


def unet_config(manifest: Manifest) -> dict:
    """The base UNet's config, plus the guidance embedding when a CFG-distilled teacher is used."""
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(manifest.base, subfolder="unet", local_files_only=True)
    except (OSError, ValueError) as err:
        raise _missing_base(manifest.base, "the UNet config", err) from None
    if manifest.teacher is not None:
        config = {**config, "time_cond_proj_dim": manifest.guidance_embed_dim}
    return config


def unet_from_state(config: dict, state: Mapping, where: str, kind: str | None = None):
    """A UNet of `config` holding exactly `state` (built on the meta device: no random init, no copy)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        lines = str(err).splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise ModelError(f"{where}: does not fit the {kind + ' ' if kind else ''}UNet ({detail})") from None
    return unet


def _load_state_dict(path: Path) -> Mapping:
    """A teacher's weights; `.pt` files are unpickled with weights_only=True (no code runs). Anything but a
    non-empty mapping of parameter names to tensors is one ModelError line."""
    if path.stat().st_size == 0:  # torch.load would say only "EOFError"
        raise ModelError(f"{path}: an empty file (0 bytes), not a teacher state dict")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors come in many types
        raise ModelError(f"{path}: not a loadable teacher state dict ({first_line(err)})") from None
    if not isinstance(state, Mapping):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a UNet state dict")
    if not state:
        raise ModelError(f"{path}: holds an empty state dict, not the UNet's weights")
    for key, value in state.items():
        if not isinstance(key, str):
            raise ModelError(f"{path}: key {key!r} ({type(key).__name__}) is not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{path}: '{key}' holds a {type(value).__name__}, not a tensor")
    return state


def _finite_once(manifest: Manifest, part: str, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN or inf weights, checked once per model: the verdict is kept in the cache, keyed by the
    model's fingerprint, so later starts skip the pass over every weight."""
    key = f"{manifest.fingerprint}-{part}"
    if already_checked(key):
        return
    if (bad := first_non_finite(tensors)) is not None:
        raise ModelError(f"{path}: tensor '{bad}' holds NaN or infinite values")
    remember_checked(key)


def load_teacher(manifest: Manifest, config: dict):
    """A fresh fp32 teacher UNet on the CPU: the CFG-distilled one when the manifest names it, else the base's."""
    from diffusers import UNet2DConditionModel

    if manifest.teacher is None:
        return _from_base(UNet2DConditionModel, manifest.base, "unet")
    state = _load_state_dict(manifest.teacher)
    _finite_once(manifest, "teacher", manifest.teacher, state)
    return unet_from_state(config, state, str(manifest.teacher), manifest.kind).float()


def fuse_unets(manifest: Manifest, config: dict, directions: tuple[str, ...]) -> list:
    """Fresh fp32 UNets on the CPU, teacher + each direction's LoRA; the teacher is read once for all."""
    if not directions:
        return []
    teacher = load_teacher(manifest, config)
    fused = []
    for i, direction in enumerate(directions):
        unet = teacher if i == len(directions) - 1 else copy.deepcopy(teacher)
        lora = getattr(manifest, f"{direction}_lora")
        if lora is None:
            raise ModelError(f"model '{manifest.name}' has no {direction} LoRA")
        fuse_lora(unet, lora, manifest.lora_alpha,
                  check=lambda path, tensors, part=direction: _finite_once(manifest, part, path, tensors))
        fused.append(unet)
    return fused


def ready_unet(unet, device: torch.device, dtype: torch.dtype):
    """On the run's device and dtype, for inference; channels-last on a GPU, the layout that cuDNN's fp16
    tensor-core convolutions use (the gain is not measured yet: no GPU in development)."""
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    return unet.to(memory_format=torch.channels_last) if device.type == "cuda" else unet


def vae_dtype(kind: str, vae_config, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype for a run in `dtype`: the run's, except fp32 for SDXL's VAE under fp16 when its config
    says it overflows (`force_upcast`, as diffusers' SDXL pipelines read it; false in an fp16-safe VAE). SD1.5's
    runs in fp16 whatever the flag, as in diffusers' pipeline; bf16 has fp32's range, so nothing is upcast."""
    upcast = dtype == torch.float16 and kind == "sdxl" and vae_config.force_upcast
    return torch.float32 if upcast else dtype


def load_vae(manifest: Manifest, device: torch.device, dtype: torch.dtype):
    """The base's VAE, or the one the manifest names instead, on `device` in the dtype `vae_dtype` gives it."""
    from diffusers import AutoencoderKL

    if manifest.vae is None:
        vae = _from_base(AutoencoderKL, manifest.base, "vae")
    else:
        vae = _from_base(AutoencoderKL, manifest.vae, None, whose="VAE")
    chosen = vae_dtype(manifest.kind, vae.config, dtype)
    if chosen != dtype:
        log.info("SDXL's VAE runs in fp32 under fp16 (its config forces it: it overflows in fp16); an fp16-safe "
                 "VAE saves that time (`icd pull sdxl --vae %s`), as does --dtype bf16", SDXL_FP16_VAE)
    return vae.to(device, chosen).eval()


def unet_inputs(x: torch.Tensor, t: Timesteps, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample and timesteps a diffusers UNet takes for latents `x` at `t` (one for all rows, or a tensor of
    one per row); `dtype` casts the latents (None leaves them to autocast)."""
    timestep = t.to(x.device) if isinstance(t, torch.Tensor) else \
        torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return (x if dtype is None else x.to(dtype)), timestep


def unet_eps(unet, dtype: torch.dtype | None = None) -> EpsFn:
    """A diffusers UNet as an epsilon function (`unet_inputs` says what `dtype` does)."""

    def eps(x: torch.Tensor, t: Timesteps, cond: Conditioning, timestep_cond: torch.Tensor | None) -> torch.Tensor:
        return unet(*unet_inputs(x, t, dtype), timestep_cond=timestep_cond, return_dict=False, **cond.unet_kwargs())[0]

    return eps


@dataclass
class Model:
    """An iCD model's text encoders and VAE on a device, with its manifest and UNet config. The last
    `PROMPTS_KEPT` prompts' conditionings are kept (per size for SDXL): an edit inverts and edits under one."""

    manifest: Manifest
    device: torch.device
    dtype: torch.dtype
    unet_config: dict
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    vae: object = None
    _prompts: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)

    PROMPTS_KEPT = 64

    @classmethod
    def load(cls, manifest: Manifest, device: torch.device, dtype: torch.dtype) -> Model:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers, encoders = [], []
        for i, suffix in enumerate(["", "_2"] if manifest.kind == "sdxl" else [""]):
            tokenizer = _from_base(CLIPTokenizer, manifest.base, "tokenizer" + suffix)
            if len(tokenizer) <= len(tokenizer.all_special_tokens):  # transformers builds an empty one from nothing
                raise _missing_base(manifest.base, f"'tokenizer{suffix}'", OSError("no vocabulary files found"))
            tokenizers.append(tokenizer)
            encoder_cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            encoders.append(_from_base(encoder_cls, manifest.base, "text_encoder" + suffix).to(device, dtype).eval())
        return cls(manifest, device, dtype, unet_config(manifest), tokenizers, encoders,
                   load_vae(manifest, device, dtype))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        return multiple_of(self.vae.config, self.unet_config)

    def latent_shape(self, width: int, height: int, batch: int = 1) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (batch, self.vae.config.latent_channels, height // f, width // f)

    def image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """(width, height) in pixels of latents."""
        f = self.vae_scale_factor
        return latents.shape[-1] * f, latents.shape[-2] * f

    @property
    def guidance_embed_dim(self) -> int | None:
        return self.unet_config.get("time_cond_proj_dim")

    def unconditional(self) -> Conditioning | None:
        """The empty prompt's conditioning for classical two-pass guidance; None with a guidance embedding."""
        return None if self.guidance_embed_dim else self.encode_text([""], (self.manifest.resolution,) * 2)

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """CLIP conditioning (SDXL: both encoders' penultimate states, the pooled vector and size ids), the prompts
        not kept yet encoded in one batch; a fresh copy, so a caller writing into it changes no later call's."""
        keys = [(prompt, size if self.manifest.kind == "sdxl" else None) for prompt in prompts]
        missing = list(dict.fromkeys(key for key in keys if key not in self._prompts))
        if missing:
            encoded = self.encode_prompts([prompt for prompt, _ in missing], size)
            for i, key in enumerate(missing):
                self._prompts[key] = encoded.rows(slice(i, i + 1))
        for key in keys:
            self._prompts.move_to_end(key)
        rows = Conditioning.cat([self._prompts[key] for key in keys])
        while len(self._prompts) > self.PROMPTS_KEPT:
            self._prompts.popitem(last=False)
        return rows

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str], size: tuple[int, int]) -> Conditioning:
        """The encoders' work, uncached: what `encode_text` runs for prompts it has not kept (and a benchmark times)."""
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
