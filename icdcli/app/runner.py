"""What runs the jobs' requests: one interface over a model in this process (`LocalRunner`) or one held by
`icd serve` (`icd.app.serve.client.RemoteRunner`). Each operation is written once, over the requests of one
batch (a single job is a batch of one, bit for bit); in this process results stay torch tensors (x_T on the
model's device, so an inversion's edits never copy it to the host and back)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from icd.models.manifest import Manifest

from .requests import Edit, Edited, Generate, Invert, Reconstruct, Request

if TYPE_CHECKING:
    from .session import Session


class Runner(Protocol):
    """A model ready to run requests."""

    manifest: Manifest
    backend: str
    dtype: str  # fp32, fp16 or bf16
    size_multiple: int

    def run(self, request: Request):
        """The request's result: x_T (Invert), `Edited` (Edit), pixels (Reconstruct, Generate)."""


def _tensor(array):
    """A numpy array as a CPU tensor sharing its memory (copied only when read-only or not contiguous)."""
    import torch

    if isinstance(array, torch.Tensor):
        return array
    return torch.from_numpy(np.require(array, np.float32, ["C", "W"]))


def _stacked(arrays: list) -> tuple:
    """Requests' arrays as one batch, with each one's rows (a prompt and seed apply to all of a request's rows)."""
    import torch

    tensors = [_tensor(array) for array in arrays]
    return torch.cat(tensors), [tensor.shape[0] for tensor in tensors]


def _per_request(values: list, counts: list[int]) -> list:
    return [value for value, count in zip(values, counts) for _ in range(count)]


def invert_rows(session: Session, requests: list[Invert]) -> list:
    from icd.pipeline import invert

    pixels, counts = _stacked([r.pixels for r in requests])
    x_T = invert(session, pixels, _per_request([r.prompt for r in requests], counts),
                 _per_request([r.seed for r in requests], counts))
    return list(x_T.split(counts))


def reconstruct_rows(session: Session, requests: list[Reconstruct]) -> list:
    from icd.pipeline import reconstruct

    x_T, counts = _stacked([r.x_T for r in requests])
    return list(reconstruct(session, x_T, _per_request([r.prompt for r in requests], counts)).split(counts))


def generate_rows(session: Session, requests: list[Generate]) -> list:
    from icd.pipeline import generate

    first = requests[0]
    pixels = generate(session, [r.prompt for r in requests], [r.seed for r in requests], first.width, first.height,
                      first.guidance, first.tau)
    return list(pixels.split(1))


def edit_rows(session: Session, requests: list[Edit]) -> list[Edited]:
    from icd.pipeline import edit

    results = []
    for r in requests:
        result = edit(session, _tensor(r.x_T), r.plan, mask=None if r.mask is None else _tensor(r.mask),
                      with_reconstruction=r.with_reconstruction)
        results.append(Edited(result.edited, list(result.notes), result.mask, result.reconstruction))
    return results


OPERATIONS = {Invert: invert_rows, Edit: edit_rows, Reconstruct: reconstruct_rows, Generate: generate_rows}


class LocalRunner:
    """The runner over a session opened in this process (and inside `icd serve`)."""

    def __init__(self, session: Session):
        from icd.models.loading import PRECISIONS

        self.session = session
        self.manifest = session.manifest
        self.backend = session.engine.name
        self.dtype = PRECISIONS[session.model.dtype]
        self.size_multiple = session.model.size_multiple

    def run(self, request: Request):
        return self.run_batch([request])[0]

    def run_batch(self, requests: list[Request]) -> list:
        """Requests of one batch key (`Request.batch_key`) as one model call, rows stacked: result i is what
        `run(requests[i])` gives, within float rounding of the batched kernels."""
        return OPERATIONS[type(requests[0])](self.session, requests)
