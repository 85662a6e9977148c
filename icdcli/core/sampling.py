"""Samplers: short loops of consistency jumps over a denoiser (see `denoiser.py`).

Encoding (forward model, 19 -> ... -> 999) and decoding (reverse model, 999 -> ... -> 0) are one loop over
different jumps. `jump` is the one step of both the samplers and training's losses, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .consistency import Timesteps, add_noise, consistency_jump
from .schedule import Jump, dynamic_guidance, forward_jumps, reverse_jumps
from .denoiser import Conditioning, Denoiser, Guidance


def jump(denoiser: Denoiser, x: torch.Tensor, t: Timesteps, s: Timesteps, cond: Conditioning,
         w: Guidance) -> torch.Tensor:
    """One consistency step: the denoiser's epsilon at t, then the jump to s (per row when t, s are tensors)."""
    return consistency_jump(x, denoiser(x, t, cond, w), t, s)


@dataclass(frozen=True)
class Step:
    """One UNet call: the jump, the conditioning rows and each row's w (Python floats: the loop never syncs)."""

    jump: Jump
    cond: Conditioning
    w: Guidance


def run_steps(denoiser: Denoiser, x: torch.Tensor, steps: list[Step],
              after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Apply the jumps in order; `after_step(i, x)` may adjust the latents (Prompt-to-Prompt's blend)."""
    for i, step in enumerate(steps):
        x = jump(denoiser, x, step.jump.t, step.jump.s, step.cond, step.w)
        if after_step is not None:
            x = after_step(i, x)
    return x


def encode(denoiser: Denoiser, z0: torch.Tensor, cond: Conditioning, forward_timesteps,
           noise: torch.Tensor) -> torch.Tensor:
    """Image latents -> x_T: noise to the first forward timestep, then the forward jumps with w = 0. The noise
    (drawn on the CPU for seeds that hold on every device) moves to the device once, before the loop."""
    jumps = forward_jumps(list(forward_timesteps))
    x = add_noise(z0, noise.to(z0.device), jumps[0].t)
    unguided = (0.0,) * z0.shape[0]
    return run_steps(denoiser, x, [Step(j, cond, unguided) for j in jumps])


def guidance_schedule(reverse_timesteps, guidance: float, tau: float) -> list[tuple[Jump, float]]:
    """Each decoding jump with its dynamic guidance value (0 above tau, `guidance` below)."""
    return [(j, dynamic_guidance(guidance, j.t, tau)) for j in reverse_jumps(list(reverse_timesteps))]


def decode(denoiser: Denoiser, x_T: torch.Tensor, cond: Conditioning, reverse_timesteps, guidance: float = 0.0,
           tau: float = 1.0) -> torch.Tensor:
    """x_T -> latents with one prompt for every row and dynamic guidance."""
    rows = x_T.shape[0]
    steps = [Step(j, cond, (w,) * rows) for j, w in guidance_schedule(reverse_timesteps, guidance, tau)]
    return run_steps(denoiser, x_T, steps)
