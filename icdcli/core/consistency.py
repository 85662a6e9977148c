"""The iCD equations, to be read beside the paper (Starodubcev et al., NeurIPS 2024).

- Noise schedule: Stable Diffusion's "scaled linear" betas, 0.00085 -> 0.012 over 1000 steps;
  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), and t = 0 is the clean latent (alpha = 1, sigma = 0):
  one rule for noising, for the jump and for training alike.
- Guidance embedding e(w): the teacher was distilled to produce eps_c + w (eps_c - eps_u) from one pass
  fed e(w), where w is the classical guidance scale minus one (w = 0 is conditional-only, not unguided).
  `guided_eps` is that formula, for the two-pass fallback and for the distillation target.
- Consistency jump (a DDIM step with the model's own epsilon): from time t to boundary s,
  x0 = (x_t - sigma_t eps) / alpha_t and x_s = alpha_s x0 + sigma_s eps.
  The reverse model jumps down (s < t), the forward model up (s > t): one formula for both.
- Dynamic guidance and the jumps' timesteps: `schedule.py` (torch-free, so commands can plan with it).

Timesteps are a Python int (one for the batch, as in sampling) or a tensor with one per row (training).
"""

from __future__ import annotations

import math

import torch

from .schedule import NUM_TRAIN_TIMESTEPS

BETA_START, BETA_END = 0.00085, 0.012

Timesteps = int | torch.Tensor


def alphas_cumprod() -> torch.Tensor:
    """abar_t for t = 0..999 (float32, as diffusers' DDIM/DDPM schedulers compute it)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# abar with the clean boundary folded in: index 0 holds 1.0 (alpha = 1, sigma = 0).
_ABAR = torch.cat([torch.ones(1), alphas_cumprod()[1:]]).double()
_ABAR_ON: dict[torch.device, torch.Tensor] = {}
# (alpha_t, sigma_t) as Python floats for an int t: a sampling step reads no tensor back to the host.
_ALPHA, _SIGMA = _ABAR.sqrt().tolist(), (1.0 - _ABAR).sqrt().tolist()


def _abar_on(device: torch.device) -> torch.Tensor:
    """The abar table on `device`, copied there once, so indexing it by a device tensor never syncs."""
    table = _ABAR_ON.get(device)
    if table is None:
        table = _ABAR_ON[device] = _ABAR.to(device)
    return table


def alpha_sigma(t: Timesteps) -> tuple[float, float] | tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t): floats for an int t, (B, 1, 1, 1) float32 tensors for one timestep per row."""
    if isinstance(t, torch.Tensor):
        abar = _abar_on(t.device)[t.long()].view(-1, 1, 1, 1)
        return abar.sqrt().float(), (1.0 - abar).sqrt().float()
    return _ALPHA[t], _SIGMA[t]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t noise (x0 itself at t = 0)."""
    alpha, sigma = alpha_sigma(t)
    return alpha * x0 + sigma * noise


def consistency_jump(x_t: torch.Tensor, eps: torch.Tensor, t: Timesteps, s: Timesteps) -> torch.Tensor:
    """Jump from time t to boundary s with the model's epsilon (computed in fp32)."""
    alpha_t, sigma_t = alpha_sigma(t)
    alpha_s, sigma_s = alpha_sigma(s)
    x_t, eps = x_t.float(), eps.float()
    x0 = (x_t - sigma_t * eps) / alpha_t
    return alpha_s * x0 + sigma_s * eps


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """e(w) for a 1-D tensor of guidance values: [sin(1000 w f_k), cos(1000 w f_k)], f_k = 1e4^(-k/(dim/2-1)).
    Computed on w's device, so a w made there costs no host-to-device copy."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    angles = 1000.0 * w.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def guided_eps(eps_c: torch.Tensor, eps_u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the paper's convention: eps_c + w (eps_c - eps_u), one w per row."""
    return eps_c + w.to(eps_c.device, eps_c.dtype).view(-1, 1, 1, 1) * (eps_c - eps_u)
