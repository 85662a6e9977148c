"""The operations file jobs need from a model, behind one interface, so that the same job code runs on a
model opened in this process (`LocalRunner`) or on one held by `icd serve` (`icd.app.client.RemoteRunner`).

Every operation takes and returns CPU tensors; the facts a job records (fingerprint, backend, dtype) and the
size multiple it needs come with the runner.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Protocol

import torch

from icd.models.loading import PRECISIONS
from icd.models.manifest import Manifest
from icd.p2p import P2PConfig
from icd.pipeline import edit, generate, invert, reconstruct

from .session import Session


class Runner(Protocol):
    """A model ready to run the jobs' operations."""

    manifest: Manifest
    backend: str
    dtype: str  # fp32, fp16 or bf16
    size_multiple: int

    def invert(self, pixels: torch.Tensor, prompt: str, seed: int) -> torch.Tensor:
        """Pixels (1, 3, H, W) in [-1, 1] -> x_T."""

    def edit(self, x_T: torch.Tensor, source: str, target: str, method: str, guidance: float, tau: float,
             p2p: P2PConfig | None) -> tuple[torch.Tensor, list[str]]:
        """x_T -> the edited pixels (1, 3, H, W) and notes (e.g. empty Prompt-to-Prompt windows)."""

    def reconstruct(self, x_T: torch.Tensor, prompt: str) -> torch.Tensor:
        """x_T -> pixels decoded with `prompt` and w = 0."""

    def generate(self, prompt: str, seed: int, width: int, height: int, guidance: float,
                 tau: float) -> torch.Tensor:
        """Text -> pixels."""


class LocalRunner:
    """The runner over a session opened in this process (and inside `icd serve`)."""

    def __init__(self, session: Session):
        self.session = session
        self.manifest = session.manifest
        self.backend = session.backend
        self.dtype = PRECISIONS[session.model.dtype]
        self.size_multiple = session.model.size_multiple

    def invert(self, pixels, prompt, seed):
        return invert(self.session, pixels, prompt, seed)

    def edit(self, x_T, source, target, method, guidance, tau, p2p):
        result = edit(self.session, x_T, source, target, method=method, guidance=guidance, tau=tau, p2p=p2p,
                      with_reconstruction=False)
        return result.edited.cpu(), list(result.notes)

    def reconstruct(self, x_T, prompt):
        return reconstruct(self.session, x_T, prompt).cpu()

    def generate(self, prompt, seed, width, height, guidance, tau):
        return generate(self.session, prompt, seed, width, height, guidance, tau).cpu()


def p2p_to_json(config: P2PConfig | None) -> dict | None:
    return None if config is None else asdict(config)


def p2p_from_json(fields: dict | None) -> P2PConfig | None:
    """The inverse of `p2p_to_json` (JSON turns the blend's tuples into lists)."""
    if fields is None:
        return None
    blend = fields.get("blend")
    return P2PConfig(**{**fields, "blend": None if blend is None else (tuple(blend[0]), tuple(blend[1]))})
