"""Which timesteps the samplers visit (of Stable Diffusion's 1000; t = 0 is the clean latent) and which guidance
each step uses: the iCD math that is plain numbers, torch-free so that a command can plan a job without torch."""

from __future__ import annotations

from dataclasses import dataclass

NUM_TRAIN_TIMESTEPS = 1000
DDIM_STEPS = 50  # the teacher's multi-step baseline, as the paper compares with


def guided(t: int, tau: float) -> bool:
    """Whether time t is guided: at low noise (t/1000 <= tau), not above."""
    return t / NUM_TRAIN_TIMESTEPS <= tau


def dynamic_guidance(w: float, t: int, tau: float) -> float:
    """The guidance actually used at time t: w where guided, 0 above."""
    return w if guided(t, tau) else 0.0


@dataclass(frozen=True)
class Jump:
    """One consistency step: evaluate the model at `t` and jump to `s`."""

    t: int
    s: int


def reverse_jumps(reverse_timesteps: list[int]) -> list[Jump]:
    """Decoding: visit the boundaries from the top, each jumping to the next lower one, the last to 0."""
    starts = sorted(reverse_timesteps, reverse=True)
    return [Jump(t, s) for t, s in zip(starts, starts[1:] + [0])]


def forward_jumps(forward_timesteps: list[int]) -> list[Jump]:
    """Encoding: from the first forward timestep (19) up, each jumping to the next, the last to 999."""
    starts = sorted(forward_timesteps)
    return [Jump(t, s) for t, s in zip(starts, starts[1:] + [NUM_TRAIN_TIMESTEPS - 1])]


def ddim_grid(steps: int = DDIM_STEPS) -> list[int]:
    """The teacher's DDIM timesteps: 19, 39, ..., 999 for 50 steps (encoding starts at the first)."""
    stride = NUM_TRAIN_TIMESTEPS // steps
    return [stride * (i + 1) - 1 for i in range(steps)]
