"""Inversion, reconstruction, editing and generation on tensors (the library API under the CLI), on a `Runtime`
(the app's session is one, whatever engine runs its UNets). Guidance follows the paper: w is the classical
scale minus one, so w = 0 is the conditional prediction alone."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from .core.denoiser import Conditioning, Denoiser
from .core.sampling import Step, decode, encode, guidance_schedule, run_steps
from .core.schedule import guided
from .editing import GENERATE_GUIDANCE, GENERATE_TAU, EditPlan
from .models.loading import Model
from .p2p import AttentionHost


class Runtime(Protocol):
    """What the functions below run on."""

    model: Model

    def denoiser(self, direction: str) -> Denoiser: ...

    def attention_host(self) -> AttentionHost:
        """The reverse UNet with Prompt-to-Prompt's control as inputs, on the runtime's own engine."""

    def run_loop(self, key: tuple, loop, *inputs):
        """`loop(*inputs)`, which a runtime may replay as one captured graph: `key` names every host value
        the loop reads (timesteps, guidance), `inputs` are its tensors (see icd_export.graphs)."""


def on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A loop's starting latents on the device, made inside inference mode like every later step's: a tensor
    from outside it has other dispatch keys, which would make torch.compile compile the first call apart."""
    return x.to(device, copy=True)


def _per_row(value, rows: int) -> list:
    """One value for every row, or a list of one per row (a server batches several jobs as rows)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a CPU generator: identical on every device for a given seed."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def row_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """Each row's noise from its own seed, so a row is the same alone or batched with others."""
    return torch.cat([seeded_noise((1, *shape[1:]), seed) for seed in seeds])


@torch.inference_mode()
def invert(runtime: Runtime, pixels: torch.Tensor, prompt: str | list[str], seed: int | list[int]) -> torch.Tensor:
    """Image pixels (B, 3, H, W) in [-1, 1] -> x_T (fp32, on the model's device: an edit goes on there; a
    caller that saves it moves it), encoded under `prompt` with w = 0; a prompt and seed per row, or one for all."""
    model = runtime.model
    height, width = pixels.shape[-2:]
    z0 = model.encode_image(pixels)
    cond = model.encode_text(_per_row(prompt, z0.shape[0]), (width, height))
    noise = row_noise(tuple(z0.shape), _per_row(seed, z0.shape[0])).to(model.device)
    forward, timesteps = runtime.denoiser("forward"), tuple(model.manifest.forward_timesteps)
    return runtime.run_loop(("invert", timesteps), lambda z0, noise, cond: encode(forward, z0, cond, timesteps, noise),
                            z0, noise, cond).float()


def _decoded_loop(runtime: Runtime, x: torch.Tensor, cond: Conditioning, guidance: float, tau: float) -> torch.Tensor:
    """The reverse loop of reconstruction and generation: one prompt per row, dynamic guidance."""
    reverse, timesteps = runtime.denoiser("reverse"), tuple(runtime.model.manifest.reverse_timesteps)
    return runtime.run_loop(("decode", timesteps, guidance, tau),
                            lambda x, cond: decode(reverse, x, cond, timesteps, guidance, tau), x, cond)


@torch.inference_mode()
def reconstruct(runtime: Runtime, x_T: torch.Tensor, prompt: str | list[str], guidance: float = 0.0,
                tau: float = 1.0) -> torch.Tensor:
    """x_T -> pixels (B, 3, H, W) in [-1, 1]; with w = 0 this is the faithful inversion."""
    model = runtime.model
    cond = model.encode_text(_per_row(prompt, x_T.shape[0]), model.image_size(x_T))
    return model.decode_latents(_decoded_loop(runtime, on_device(x_T, model.device), cond, guidance, tau))


@dataclass
class EditResult:
    edited: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    reconstruction: torch.Tensor | None  # the source row, decoded beside the edit unless with_reconstruction=False
    notes: list[str] = field(default_factory=list)  # e.g. attention windows that map to no step
    mask: torch.Tensor | None = None  # (1, 1, h, w) on the latent grid: where the edit could act (mask, blend)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (1, 1, H, W) mask in [0, 1] at any resolution on the latent grid `size`, each cell the mean of what it
    covers: cells on the mask's edge change partly (feathering), an all-black one stays exactly the source."""
    if mask.ndim != 4 or mask.shape[:2] != (1, 1):
        raise ValueError(f"a mask is (1, 1, H, W), got {tuple(mask.shape)}")
    grid = mask.float()
    if grid.shape[-2] < size[0] or grid.shape[-1] < size[1]:
        grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(grid, size).clamp(0.0, 1.0)


def edit_regions(mask: torch.Tensor | None, mix: float, x_T: torch.Tensor,
                 steps: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where the edit may act on x_T's latent grid (`latent_mask`; None without a mask), and the share of its own
    latent the target keeps in each cell after each step, times mix^(1/steps) so that about `mix` of the edit is
    left at the end; None where it keeps all of it everywhere (then swap and none decode one row)."""
    where = None if mask is None else latent_mask(mask.to(x_T.device), tuple(x_T.shape[-2:])).to(x_T.dtype)
    share = mix ** (1.0 / steps)
    if share == 1.0:
        return where, where
    return where, share * (torch.ones_like(x_T[:1, :1]) if where is None else where)


def confined(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Rows (source, target): the target's own latent where `region` is 1, the source's where 0, a mix between."""
    return torch.stack([x[0], torch.lerp(x[0], x[1], region[0])])


@torch.inference_mode()
def edit(runtime: Runtime, x_T: torch.Tensor, plan: EditPlan, *, mask: torch.Tensor | None = None,
         with_reconstruction: bool = True) -> EditResult:
    """Decode an inverted latent under the plan's target prompt, with the plan's settings as they are (made by
    `icd.editing.resolve_edit` or `edit_plan`; nothing is decided here).

    p2p: rows [source, target] decoded together (source unguided), the target's attention maps taken from the
         source's inside the windows; the source row's pixels are the reconstruction unless `with_reconstruction`
         is False (its VAE decode costs more than 3 UNet calls).
    swap: one row; the source prompt on the unguided steps (t/1000 > tau), the target on the rest, swapping only
         the per-token embeddings as the official SDXL code does (the pooled embedding and size ids stay).
    none: one row; the target prompt on every step.

    mask: (1, 1, H, W) in [0, 1], any resolution, 1 where the edit may act; plan.mix < 1 acts as a grey one
    (`edit_regions`). After every step the target's latent outside them is the source's (p2p's source row, or one
    decoded beside swap's and none's in the same UNet calls): at mix 0, the reconstruction.
    """
    model = runtime.model
    method, tau = plan.method, plan.tau
    x_T = on_device(x_T, model.device)
    cond_both = model.encode_text([plan.source, plan.target], model.image_size(x_T))
    cond_src, cond_tgt = cond_both.rows(slice(0, 1)), cond_both.rows(slice(1, 2))
    schedule = guidance_schedule(model.manifest.reverse_timesteps, plan.guidance, tau)
    where, region = edit_regions(mask, plan.mix, x_T, len(schedule))
    both_rows = x_T.expand(2, -1, -1, -1).contiguous()  # in memory, not a stride-0 view: one compiled graph
    if method == "p2p":
        host = runtime.attention_host()
        controller = host.controller(model.tokenizers[0], plan.source, plan.target, len(schedule), plan.p2p,
                                     latent_size=tuple(x_T.shape[-2:]))

        def steered(x, cond, control, region):
            view = controller.bound(control, model.device)
            after_step = view.after_step if region is None else (lambda i, x: confined(view.after_step(i, x), region))
            with host.attached(view):
                latents = run_steps(host.denoiser, x, [Step(jump, cond, (0.0, w)) for jump, w in schedule], after_step)
            return latents, view.outcome()

        latents, outcome = runtime.run_loop(("p2p", tuple(schedule), controller.graph_key), steered, both_rows,
                                            cond_both, controller.device_tensors(model.device), region)
        notes = [*controller.warnings, *controller.blend_notes(outcome)]
        used = where if outcome is None else outcome[0] if where is None else outcome[0] * where
        return _decoded(model, latents, with_reconstruction, notes, used)

    def unsteered(x, source, target, region):  # swap and none
        if method == "swap":  # source tokens with the target's pooled embedding (SDXL) on the unguided steps
            swapped = replace(source, pooled=target.pooled, time_ids=target.time_ids)
            steps = [Step(jump, target if guided(jump.t, tau) else swapped, (w,)) for jump, w in schedule]
        else:
            steps = [Step(jump, target, (w,)) for jump, w in schedule]
        if region is None:
            return run_steps(runtime.denoiser("reverse"), x, steps)
        steps = [Step(step.jump, Conditioning.cat([source, step.cond]), (0.0, *step.w)) for step in steps]
        return run_steps(runtime.denoiser("reverse"), x, steps, lambda i, x: confined(x, region))

    key = (method, tuple(schedule), tau)
    if region is None:
        return EditResult(model.decode_latents(runtime.run_loop(key, unsteered, x_T, cond_src, cond_tgt, None)), None)
    latents = runtime.run_loop(key, unsteered, both_rows, cond_src, cond_tgt, region)
    return _decoded(model, latents, with_reconstruction, [], where)


def _decoded(model: Model, latents: torch.Tensor, with_reconstruction: bool, notes: list[str],
             mask: torch.Tensor | None) -> EditResult:
    """The result of a two-row (source, target) decoding; the source row's VAE decode only when asked for."""
    if not with_reconstruction:
        return EditResult(model.decode_latents(latents[1:]), None, notes, mask)
    pixels = model.decode_latents(latents)
    return EditResult(pixels[1:], pixels[:1], notes, mask)


@torch.inference_mode()
def generate(runtime: Runtime, prompt: str | list[str], seed: int | list[int], width: int, height: int,
             guidance: float = GENERATE_GUIDANCE, tau: float = GENERATE_TAU) -> torch.Tensor:
    """Text -> pixels (B, 3, H, W) in [-1, 1] in the reverse model's 3-4 steps; B is the number of prompts
    or seeds given as lists (one row when both are single)."""
    model = runtime.model
    rows = max(len(v) if isinstance(v, (list, tuple)) else 1 for v in (prompt, seed))
    noise = row_noise(model.latent_shape(width, height), _per_row(seed, rows)).to(model.device)
    cond = model.encode_text(_per_row(prompt, rows), (width, height))
    return model.decode_latents(_decoded_loop(runtime, noise, cond, guidance, tau))
