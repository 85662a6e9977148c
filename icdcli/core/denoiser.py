"""The denoiser contract: what samplers and training call, whatever runs the UNet.

An *epsilon function* makes one UNet pass, `eps_fn(x_t, t, cond, timestep_cond) -> eps`, with the guidance
embedding e(w) as `timestep_cond` (None for a UNet without one); PyTorch, ONNX Runtime, TensorRT and
torch.compile each supply one. `Guided` makes any of them a *denoiser* `denoiser(x_t, t, cond, w) -> eps`, one w
per row, in the spirit of k-diffusion's CFGDenoiser. The samplers give w as Python floats fixed when the steps
are built, so a step never reads a device value back (a sync that stalls the GPU and rules out graph capture).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .consistency import Timesteps, guidance_embedding, guided_eps

# Each row's w: Python floats when sampling; a tensor where training draws them (read back to the host once).
Guidance = tuple[float, ...] | torch.Tensor


@dataclass
class Conditioning:
    """Text conditioning for a batch of rows; SDXL adds a pooled embedding and size ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def rows(self, index) -> Conditioning:
        pick = lambda tensor: None if tensor is None else tensor[index]  # noqa: E731
        return Conditioning(pick(self.embeds), pick(self.pooled), pick(self.time_ids))

    def expand(self, rows: int) -> Conditioning:
        """A one-row conditioning as `rows` rows, without copying (stride-0 views)."""
        spread = lambda tensor: None if tensor is None else tensor.expand(rows, *tensor.shape[1:])  # noqa: E731
        return Conditioning(spread(self.embeds), spread(self.pooled), spread(self.time_ids))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """The rows of several conditionings, stacked."""
        def join(name: str):
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])

        return Conditioning(join("embeds"), join("pooled"), join("time_ids"))

    def unet_kwargs(self) -> dict:
        """The keyword arguments a diffusers UNet takes for this conditioning."""
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


class EpsFn(Protocol):
    def __call__(self, x: torch.Tensor, t: Timesteps, cond: Conditioning,
                 timestep_cond: torch.Tensor | None) -> torch.Tensor: ...


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: Timesteps, cond: Conditioning, w: Guidance) -> torch.Tensor: ...


def host_guidance(w: Guidance) -> tuple[float, ...]:
    """Each row's w as Python floats. A tensor is read back here, a device sync on a GPU: training's
    randomly drawn w only, where a step is not latency bound; the samplers pass floats."""
    return tuple(w.tolist()) if isinstance(w, torch.Tensor) else tuple(w)


def _filled(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a 1-D tensor written by fills on the device: no host-to-device copy to wait on."""
    return torch.cat([torch.full((1,), value, device=device, dtype=dtype) for value in values])


class Guided:
    """A denoiser around one-pass `eps_fn`: with a guidance-embedded UNet (`embed_dim`) one pass fed e(w), else
    eps_c + w (eps_c - eps_u) for rows with w != 0, the conditional and the unconditional rows (`uncond`, the
    empty prompt's) in one batch. The device tensors of a tuple of w (e(w), or CFG's w column) are made once and
    kept; `dtype` is e(w)'s (None: fp32, for mixed-precision training)."""

    CACHED = 64  # tuples of guidance values kept: inference repeats a few, training draws many

    def __init__(self, eps_fn: EpsFn, embed_dim: int | None, uncond: Conditioning | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        if not embed_dim and uncond is None:
            raise ValueError("Guided needs a guidance embedding size or the unconditional rows for CFG")
        self.eps_fn, self.embed_dim, self.uncond = eps_fn, embed_dim, uncond
        self.device, self.dtype = torch.device(device), dtype
        self._tensors: dict[tuple, torch.Tensor] = {}

    def _kept(self, key: tuple, make) -> torch.Tensor:
        tensor = self._tensors.get(key)
        if tensor is None:
            if len(self._tensors) >= self.CACHED:
                del self._tensors[next(iter(self._tensors))]
            tensor = self._tensors[key] = make()
        return tensor

    def kept_tensors(self) -> list[torch.Tensor]:
        """The device tensors made so far (what a captured loop reads besides its inputs)."""
        return list(self._tensors.values())

    def embedding(self, w: Guidance) -> torch.Tensor:
        """e(w) for the rows, on the device; tuples of values seen before cost nothing."""
        values = host_guidance(w)
        return self._kept(("e(w)", values), lambda: guidance_embedding(
            _filled(values, self.device, torch.float32), self.embed_dim).to(self.dtype or torch.float32))

    def __call__(self, x: torch.Tensor, t: Timesteps, cond: Conditioning, w: Guidance) -> torch.Tensor:
        values = host_guidance(w)
        if self.embed_dim:
            return self.eps_fn(x, t, cond, self.embedding(values))
        if not any(values):
            return self.eps_fn(x, t, cond, None)
        rows = x.shape[0]
        uncond = replace(self.uncond.expand(rows), time_ids=cond.time_ids)
        both = torch.cat([t, t]) if isinstance(t, torch.Tensor) else t
        eps = self.eps_fn(torch.cat([x, x]), both, Conditioning.cat([cond, uncond]), None)
        scales = self._kept(("w", values, eps.dtype, eps.device), lambda: _filled(values, eps.device, eps.dtype))
        return guided_eps(eps[:rows], eps[rows:], scales)
