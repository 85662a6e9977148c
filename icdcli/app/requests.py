"""The operations that file jobs ask of a model, one request type each, with their wire encoding (a JSON
header of its other fields and its named arrays). Torch-free, so that a served command never imports torch: an
array is numpy, or in-process a torch tensor, turned into numpy only where it crosses `icd serve`'s socket."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from icd.editing import EditPlan
from icd.images import as_array

Array = Any  # a numpy array, or a torch tensor in-process


@dataclass
class Request:
    op: ClassVar[str]
    arrays: ClassVar[tuple[str, ...]]  # the fields that are arrays (the rest is the JSON header)
    batched: ClassVar[str | None] = None  # the array whose shape lets single-row requests run as one batch

    def batch_key(self) -> tuple | None:
        """Requests with equal keys run as one model call, rows stacked; None: this one runs alone."""
        if self.batched is None:
            return None
        shape = tuple(getattr(self, self.batched).shape)
        return (self.op, shape) if len(shape) == 4 and shape[0] == 1 else None

    def encode(self) -> tuple[dict, dict[str, np.ndarray]]:
        header = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.arrays}
        arrays = {name: as_array(getattr(self, name)) for name in self.arrays if getattr(self, name) is not None}
        return {"op": self.op, **header}, arrays


@dataclass
class Invert(Request):
    """Pixels (1, 3, H, W) in [-1, 1] -> x_T, encoded under `prompt` from the noise of `seed`."""

    op = "invert"
    arrays, batched = ("pixels",), "pixels"
    pixels: Array
    prompt: str
    seed: int


@dataclass
class Edit(Request):
    """x_T -> `Edited` under `plan`; `mask` (1, 1, H, W) in [0, 1] is where the edit may act;
    `with_reconstruction`: the source row's pixels too (what keeps the photo's detail inside a mask). Edits run
    one at a time: their Prompt-to-Prompt control is per pair of prompts."""

    op = "edit"
    arrays = ("x_T", "mask")
    x_T: Array
    plan: EditPlan
    mask: Array | None = None
    with_reconstruction: bool = False

    def encode(self):
        header, arrays = super().encode()
        return {**header, "plan": self.plan.to_json()}, arrays


@dataclass
class Reconstruct(Request):
    """x_T -> pixels decoded under `prompt` with w = 0 (the faithful inversion)."""

    op = "reconstruct"
    arrays, batched = ("x_T",), "x_T"
    x_T: Array
    prompt: str


@dataclass
class Generate(Request):
    """Text -> pixels of `width` x `height` from the noise of `seed`."""

    op = "generate"
    arrays = ()
    prompt: str
    seed: int
    width: int
    height: int
    guidance: float
    tau: float

    def batch_key(self) -> tuple:
        return self.op, self.width, self.height, self.guidance, self.tau


@dataclass
class Edited:
    """An edit's result: the edited pixels (1, 3, H, W), notes, the map that confined it on the latent grid
    (1, 1, h, w) if any, and the reconstruction decoded beside it (1, 3, H, W) if asked for."""

    pixels: Array
    notes: list[str] = field(default_factory=list)
    mask: Array | None = None
    reconstruction: Array | None = None


REQUESTS: dict[str, type[Request]] = {kind.op: kind for kind in (Invert, Edit, Reconstruct, Generate)}
# The one array each operation returns, by name on the wire (an edit's come as `Edited`).
RESULT_NAMES = {"invert": "x_T", "reconstruct": "pixels", "generate": "pixels"}


def decode_request(header: dict, arrays: dict) -> Request:
    """The request of a message; a malformed one raises KeyError, TypeError or ValueError."""
    values = {name: value for name, value in header.items() if name != "op"}
    if header["op"] == "edit":
        values["plan"] = EditPlan.from_json(values["plan"])
    return REQUESTS[header["op"]](**values, **arrays)


def encode_result(op: str, result) -> tuple[dict, dict[str, np.ndarray]]:
    if op == "edit":
        arrays = {name: as_array(getattr(result, name)) for name in ("pixels", "mask", "reconstruction")
                  if getattr(result, name) is not None}
        return {"notes": list(result.notes)}, arrays
    return {}, {RESULT_NAMES[op]: as_array(result)}


def decode_result(op: str, header: dict, arrays: dict):
    if op == "edit":
        return Edited(arrays["pixels"], list(header["notes"]), arrays.get("mask"), arrays.get("reconstruction"))
    return arrays[RESULT_NAMES[op]]
