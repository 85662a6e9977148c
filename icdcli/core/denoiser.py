"""The denoiser contract: what samplers and training call, whatever runs the UNet.

An *epsilon function* makes one UNet pass: `eps_fn(x_t, t, cond, timestep_cond) -> eps`, where
`timestep_cond` is the guidance embedding e(w) (or None for a UNet without one). PyTorch, ONNX Runtime,
TensorRT and torch.compile each supply one. `Guided` turns any of them into a *denoiser*
`denoiser(x_t, t, cond, w) -> eps` with one guidance value per row, in the spirit of k-diffusion's
CFGDenoiser: one pass fed e(w) for a guidance-embedded UNet, else the classical two passes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .consistency import Timesteps, guidance_embedding, guided_eps


@dataclass
class Conditioning:
    """Text conditioning for a batch of rows; SDXL adds a pooled embedding and size ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def rows(self, index) -> Conditioning:
        pick = lambda tensor: None if tensor is None else tensor[index]  # noqa: E731
        return Conditioning(pick(self.embeds), pick(self.pooled), pick(self.time_ids))

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
    def __call__(self, x: torch.Tensor, t: Timesteps, cond: Conditioning, w: torch.Tensor) -> torch.Tensor: ...


class Guided:
    """A denoiser around one-pass `eps_fn`.

    With a guidance-embedded UNet (`embed_dim`) a guided prediction costs one pass fed e(w). Without one,
    the rows that ask for w != 0 get eps_c + w (eps_c - eps_u), with `uncond` the empty prompt's rows.
    e(w) is cached per guidance value on the device, so the loop never waits on a host-to-device copy;
    `dtype` is the embedding's dtype (None: fp32, for mixed-precision training).
    """

    def __init__(self, eps_fn: EpsFn, embed_dim: int | None, uncond: Conditioning | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        if not embed_dim and uncond is None:
            raise ValueError("Guided needs a guidance embedding size or the unconditional rows for CFG")
        self.eps_fn, self.embed_dim, self.uncond = eps_fn, embed_dim, uncond
        self.device, self.dtype = torch.device(device), dtype
        self._embeddings: dict[float, torch.Tensor] = {}
        self._batches: dict[tuple[float, ...], torch.Tensor] = {}

    def embedding(self, w: torch.Tensor) -> torch.Tensor:
        """e(w) for the rows, on the device; batches of values seen before cost nothing."""
        values = tuple(w.tolist())
        batch = self._batches.get(values)
        if batch is None:
            for value in set(values) - self._embeddings.keys():
                row = guidance_embedding(torch.tensor([value]), self.embed_dim)[0]
                self._embeddings[value] = row.to(self.device, self.dtype or torch.float32)
            batch = torch.stack([self._embeddings[v] for v in values])
            if len(self._batches) < 64:  # inference repeats a few; training draws many
                self._batches[values] = batch
        return batch

    def __call__(self, x: torch.Tensor, t: Timesteps, cond: Conditioning, w: torch.Tensor) -> torch.Tensor:
        if self.embed_dim:
            return self.eps_fn(x, t, cond, self.embedding(w))
        eps = self.eps_fn(x, t, cond, None)
        if bool((w != 0).any()):
            uncond = replace(self.uncond.rows([0] * x.shape[0]), time_ids=cond.time_ids)
            eps = guided_eps(eps, self.eps_fn(x, t, uncond, None), w)
        return eps

