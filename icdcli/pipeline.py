"""Inversion, reconstruction, editing and generation on tensors (the library API under the CLI).

Each function takes a `Runtime`: the model's text encoders and VAE, a denoiser per direction, and the
attention host Prompt-to-Prompt needs. The app's session is one; whatever engine runs the UNets is its
business. Guidance values follow the paper: w is the classical guidance scale minus one, so w = 0 is the
conditional prediction alone. The noise for encoding (at t = 19) and for generation is drawn on the CPU
from a seeded generator, so a seed gives the same result on every device.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Protocol

import torch

from .core.denoiser import Denoiser
from .core.sampling import Step, decode, encode, guidance_schedule, run_steps
from .editing import GENERATE_GUIDANCE, GENERATE_TAU, P2PConfig, edit_settings
from .models.loading import Model
from .p2p import AttentionHost


class Runtime(Protocol):
    """What the functions below run on."""

    model: Model

    def denoiser(self, direction: str) -> Denoiser: ...

    def attention_host(self) -> AttentionHost:
        """The reverse UNet with Prompt-to-Prompt's control as inputs, on the runtime's own engine."""


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a CPU generator: identical on every device for a given seed."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loop's starting latents on the device, made inside inference mode like every later step's: a tensor
    from outside it has other dispatch keys, which would make torch.compile compile the first call apart."""
    return x.to(device, copy=True)


@torch.inference_mode()
def invert(runtime: Runtime, pixels: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
    """Image pixels (1, 3, H, W) in [-1, 1] -> x_T (fp32, on the model's device: an edit goes on there; a
    caller that saves it moves it), encoded under `prompt` with w = 0."""
    model = runtime.model
    height, width = pixels.shape[-2:]
    z0 = model.encode_image(pixels)
    cond = model.encode_text([prompt], (width, height))
    noise = seeded_noise(tuple(z0.shape), seed)
    return encode(runtime.denoiser("forward"), z0, cond, model.manifest.forward_timesteps, noise).float()


@torch.inference_mode()
def reconstruct(runtime: Runtime, x_T: torch.Tensor, prompt: str, guidance: float = 0.0,
                tau: float = 1.0) -> torch.Tensor:
    """x_T -> pixels (B, 3, H, W) in [-1, 1]; with w = 0 this is the faithful inversion."""
    model = runtime.model
    cond = model.encode_text([prompt] * x_T.shape[0], model.image_size(x_T))
    latents = decode(runtime.denoiser("reverse"), on_device(x_T, model.device), cond, model.manifest.reverse_timesteps,
                     guidance, tau)
    return model.decode_latents(latents)


@dataclass
class EditResult:
    edited: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    reconstruction: torch.Tensor | None  # the source row, decoded alongside with p2p
    notes: list[str] = field(default_factory=list)  # e.g. attention windows that map to no step


@torch.inference_mode()
def edit(runtime: Runtime, x_T: torch.Tensor, source: str, target: str, *, method: str | None = None,
         guidance: float | None = None, tau: float | None = None, p2p: P2PConfig | None = None,
         with_reconstruction: bool = True) -> EditResult:
    """Decode an inverted latent under the target prompt.

    p2p: rows [source, target] decoded together (source unguided), the target's attention maps taken
         from the source's inside the Prompt-to-Prompt windows. The source row's pixels come back as the
         reconstruction unless `with_reconstruction` is False: its VAE decode costs more than 3 UNet calls.
    swap: one row; the source prompt on the unguided high-noise steps (t/1000 > tau), the target on the rest.
    none: one row; the target prompt on every step.
    """
    model = runtime.model
    method, guidance, tau = astuple(edit_settings(model.manifest, method, guidance, tau))
    x_T = on_device(x_T, model.device)
    cond_both = model.encode_text([source, target], model.image_size(x_T))
    cond_src, cond_tgt = cond_both.rows(slice(0, 1)), cond_both.rows(slice(1, 2))
    schedule = guidance_schedule(model.manifest.reverse_timesteps, guidance, tau)
    if method == "p2p":
        host = runtime.attention_host()
        controller = host.controller(model.tokenizers[0], source, target, len(schedule), p2p,
                                     latent_size=tuple(x_T.shape[-2:]))
        steps = [Step(jump, cond_both, (0.0, w)) for jump, w in schedule]
        with host.attached(controller):  # both rows in memory (not a stride-0 view: one compiled graph)
            latents = run_steps(host.denoiser, x_T.expand(2, -1, -1, -1).contiguous(), steps, controller.after_step)
        if not with_reconstruction:
            return EditResult(model.decode_latents(latents[1:]), None, list(controller.warnings))
        pixels = model.decode_latents(latents)
        return EditResult(pixels[1:], pixels[:1], list(controller.warnings))
    if method == "swap":
        steps = [Step(jump, cond_src if jump.t / 1000 > tau else cond_tgt, (w,)) for jump, w in schedule]
    else:
        steps = [Step(jump, cond_tgt, (w,)) for jump, w in schedule]
    return EditResult(model.decode_latents(run_steps(runtime.denoiser("reverse"), x_T, steps)), None)


@torch.inference_mode()
def generate(runtime: Runtime, prompt: str, seed: int, width: int, height: int,
             guidance: float = GENERATE_GUIDANCE, tau: float = GENERATE_TAU) -> torch.Tensor:
    """Text -> pixels (1, 3, H, W) in [-1, 1] in the reverse model's 3-4 steps."""
    model = runtime.model
    noise = seeded_noise(model.latent_shape(width, height), seed).to(model.device)
    cond = model.encode_text([prompt], (width, height))
    latents = decode(runtime.denoiser("reverse"), noise, cond, model.manifest.reverse_timesteps, guidance, tau)
    return model.decode_latents(latents)

