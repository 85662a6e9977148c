"""The operations file jobs need from a model, behind one interface, so that the same job code runs on a
model opened in this process (`LocalRunner`) or on one held by `icd serve` (`icd.app.client.RemoteRunner`).

Every operation takes and returns float32 numpy arrays, so that the job code (and with it every command
served by `icd serve`) never imports torch; `LocalRunner` turns them into tensors where its model runs. The
facts a job records (fingerprint, backend, dtype) and the size multiple it needs come with the runner.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Protocol

import numpy as np

from icd.editing import P2PConfig
from icd.images import as_array
from icd.models.manifest import Manifest

if TYPE_CHECKING:
    from .session import Session


class Runner(Protocol):
    """A model ready to run the jobs' operations."""

    manifest: Manifest
    backend: str
    dtype: str  # fp32, fp16 or bf16
    size_multiple: int

    def invert(self, pixels: np.ndarray, prompt: str, seed: int) -> np.ndarray:
        """Pixels (1, 3, H, W) in [-1, 1] -> x_T."""

    def edit(self, x_T: np.ndarray, source: str, target: str, method: str, guidance: float, tau: float,
             p2p: P2PConfig | None, mask: np.ndarray | None = None) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        """x_T -> the edited pixels (1, 3, H, W), notes (e.g. empty Prompt-to-Prompt windows) and the map the
        edit was confined to on the latent grid (1, 1, h, w), None when neither `mask` nor a blend confined it;
        `mask` (1, 1, H, W) in [0, 1]: where the edit may act."""

    def reconstruct(self, x_T: np.ndarray, prompt: str) -> np.ndarray:
        """x_T -> pixels decoded with `prompt` and w = 0."""

    def generate(self, prompt: str, seed: int, width: int, height: int, guidance: float,
                 tau: float) -> np.ndarray:
        """Text -> pixels."""


class LocalRunner:
    """The runner over a session opened in this process (and inside `icd serve`): arrays become tensors here."""

    def __init__(self, session: Session):
        from icd.models.loading import PRECISIONS

        self.session = session
        self.manifest = session.manifest
        self.backend = session.backend
        self.dtype = PRECISIONS[session.model.dtype]
        self.size_multiple = session.model.size_multiple

    def invert(self, pixels, prompt, seed):
        from icd.pipeline import invert

        return as_array(invert(self.session, _tensor(pixels), prompt, seed))

    def edit(self, x_T, source, target, method, guidance, tau, p2p, mask=None):
        from icd.pipeline import edit

        result = edit(self.session, _tensor(x_T), source, target, method=method, guidance=guidance, tau=tau,
                      p2p=p2p, mask=None if mask is None else _tensor(mask), with_reconstruction=False)
        used = None if result.mask is None else as_array(result.mask)
        return as_array(result.edited), list(result.notes), used

    def reconstruct(self, x_T, prompt):
        from icd.pipeline import reconstruct

        return as_array(reconstruct(self.session, _tensor(x_T), prompt))

    def generate(self, prompt, seed, width, height, guidance, tau):
        from icd.pipeline import generate

        return as_array(generate(self.session, prompt, seed, width, height, guidance, tau))

    # Several jobs of one operation and size as one model call, rows stacked (`icd serve` batches the jobs its
    # clients queue): row i is what the one-job operation gives for the i-th arguments.

    def invert_rows(self, pixels: list[np.ndarray], prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        from icd.pipeline import invert

        return _rows(invert(self.session, _tensor(np.concatenate(pixels)), prompts, seeds))

    def reconstruct_rows(self, x_Ts: list[np.ndarray], prompts: list[str]) -> list[np.ndarray]:
        from icd.pipeline import reconstruct

        return _rows(reconstruct(self.session, _tensor(np.concatenate(x_Ts)), prompts))

    def generate_rows(self, prompts: list[str], seeds: list[int], width: int, height: int, guidance: float,
                      tau: float) -> list[np.ndarray]:
        from icd.pipeline import generate

        return _rows(generate(self.session, prompts, seeds, width, height, guidance, tau))


def _rows(batch) -> list[np.ndarray]:
    """A batch's rows as arrays of one row each, the shape the one-job operations return."""
    values = as_array(batch)
    return [values[i:i + 1] for i in range(values.shape[0])]


def _tensor(array: np.ndarray):
    """An array as a CPU torch tensor, sharing its memory (copied only when read-only or not contiguous: torch
    takes writable arrays); the pipeline copies it to the model's device."""
    import torch

    return torch.from_numpy(np.require(array, np.float32, ["C", "W"]))


def p2p_to_json(config: P2PConfig | None) -> dict | None:
    return None if config is None else asdict(config)


def p2p_from_json(fields: dict | None) -> P2PConfig | None:
    """The inverse of `p2p_to_json` (JSON turns the blend's tuples into lists)."""
    if fields is None:
        return None
    blend = fields.get("blend")
    return P2PConfig(**{**fields, "blend": None if blend is None else (tuple(blend[0]), tuple(blend[1]))})
