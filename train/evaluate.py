"""The measurements that show training works, on a fixed batch with fixed noise (latent-space MSE):

- decode_gap: the reverse student's few-step decode against the teacher's DDIM solution (the 50-step grid
  plus the boundaries) from the same noise, at guidance w;
- jump_gap: the same one jump at a time, each from the teacher's own solution at its start: how well each
  jump learned its segment of the ODE, without the drift of the earlier jumps;
- reconstruction: encode with the forward student (noise at t = 19, w = 0), decode with the reverse one
  (w = 0), against the clean latents; teacher_reconstruction, the same with the teacher's DDIM steps.

The teacher's answers are computed once. The samplers are icd's own (those `icd edit` runs), so the numbers
describe what users get.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from icd.core.schedule import Jump, reverse_jumps
from icd.core.denoiser import Conditioning, Guided
from icd.core.sampling import Step, decode, encode, run_steps
from icd.models.loading import unet_eps

from .losses import Schedule


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.mse_loss(a.float(), b.float()).item()


def _solve(denoiser, x: torch.Tensor, cond: Conditioning, w: float, path: list[int]) -> torch.Tensor:
    """Jumps along `path` (e.g. 999, 979, ..., 779) with the denoiser's epsilon: DDIM for the teacher."""
    steps = [Step(Jump(t, s), cond, torch.full((x.shape[0],), w)) for t, s in zip(path, path[1:])]
    return run_steps(denoiser, x, steps)


class ICDProbe:
    def __init__(self, teacher, embed_dim: int, z0: torch.Tensor, cond: Conditioning, schedule: Schedule,
                 forward_timesteps, reverse_timesteps, guidance: float, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn(z0.shape, generator=generator).to(z0.device)
        self.encode_noise = torch.randn(z0.shape, generator=generator)
        self.z0, self.cond, self.embed_dim, self.guidance = z0, cond, embed_dim, guidance
        self.forward_timesteps, self.reverse_timesteps = forward_timesteps, reverse_timesteps
        solver = self._denoiser(teacher)
        self.jumps = reverse_jumps(list(reverse_timesteps))
        self.path = {self.jumps[0].t: x_T}  # the teacher's solution at each reverse timestep, down to 0
        for jump in self.jumps:
            inner = [g for g in reversed(schedule.grid) if jump.s < g < jump.t]
            self.path[jump.s] = _solve(solver, self.path[jump.t], cond, guidance, [jump.t, *inner, jump.s])
        inverted = encode(solver, z0, cond, schedule.grid[:-1], self.encode_noise)
        self.teacher_reconstruction = _mse(decode(solver, inverted, cond, schedule.grid), z0)

    def _denoiser(self, unet) -> Guided:
        return Guided(unet_eps(unet), self.embed_dim, device=self.z0.device)

    def __call__(self, forward, reverse) -> dict[str, float]:
        fwd, rev = self._denoiser(forward), self._denoiser(reverse)
        decoded = decode(rev, self.path[self.jumps[0].t], self.cond, self.reverse_timesteps, self.guidance)
        jump_gaps = [_mse(_solve(rev, self.path[j.t], self.cond, self.guidance, [j.t, j.s]), self.path[j.s])
                     for j in self.jumps]
        inverted = encode(fwd, self.z0, self.cond, self.forward_timesteps, self.encode_noise)
        return {"decode_gap": _mse(decoded, self.path[0]), "jump_gap": sum(jump_gaps) / len(jump_gaps),
                "reconstruction": _mse(decode(rev, inverted, self.cond, self.reverse_timesteps), self.z0),
                "teacher_reconstruction": self.teacher_reconstruction}
