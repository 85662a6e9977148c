"""Whole loops as one CUDA graph: the forward loop (3-4 UNet calls) or the reverse loop of an edit replayed
with one launch, so no Python, no kernel-launch gap and no allocator work sits between the calls.

A loop is a function of explicit inputs (tensors, `Conditioning`s and tuples of them); everything else it
reads is either a host constant, named in its key, or lives as long as the model (weights, the guidance
embeddings the caller keeps alive through `keep`). The first call of a key and input signature runs eagerly
(a single photo pays nothing for a graph it would use once); the second runs the loop twice on a side stream
(lazy tensors such as e(w) and the Prompt-to-Prompt control are made then, outside the graph), records it
into static input buffers and returns the warm-up's result; later calls copy their inputs into those buffers
on the device and replay. Outputs are cloned: the next replay overwrites them.

The loops are written for this (tests/test_no_wasted_work.py): no host reads, no host-to-device copies,
noise drawn before the loop. `Rerun` stands in for the CUDA recorder where there is no GPU: it runs the
loop again over the same static buffers, so everything but the recording itself is exercised on a CPU.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from icd.core.denoiser import Conditioning
from icd.errors import first_line

log = logging.getLogger("icd")

CAPACITY = 4  # graphs kept per session (each holds its own memory pool); the least recently used goes first


def captures_loops(device: torch.device, backend: str) -> bool:
    """Whether a session captures its loops: PyTorch on CUDA, unless ICD_CUDA_GRAPHS=0 (ONNX Runtime and
    TensorRT run on their own streams; TensorRT records its own graphs)."""
    return torch.device(device).type == "cuda" and backend == "torch" and os.environ.get("ICD_CUDA_GRAPHS", "1") != "0"


def _map(fn: Callable[[torch.Tensor], Any], value):
    """`value` with `fn` applied to each tensor in it (tensors, Conditionings, tuples/lists of them, None)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Conditioning):
        return Conditioning(*(_map(fn, part) for part in (value.embeds, value.pooled, value.time_ids)))
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, part) for part in value)
    if value is None:
        return None
    raise TypeError(f"a captured loop takes tensors, Conditionings and tuples of them, not {type(value).__name__}")


def _leaves(value) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(found.append, value)
    return found


def signature(value) -> tuple:
    """What a graph is recorded for besides its key: the structure, shapes, dtypes and devices of the inputs."""
    shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in _leaves(value))
    return shapes, repr(_map(lambda _: "T", value))


class CudaRecorder:
    """Records `run()` as a CUDA graph after two warm-up runs on a side stream; returns (warm-up result, replay)."""

    def __call__(self, run: Callable[[], Any], device: torch.device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
            first = _map(torch.Tensor.clone, run())
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of the server's other threads does not void this thread's recording
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = run()
        return first, outputs, graph.replay


class Rerun:
    """The recorder's contract without a GPU: a replay runs the loop again on the static inputs and writes
    into the static outputs, as a graph replay would."""

    def __call__(self, run: Callable[[], Any], device: torch.device):
        outputs = run()
        first = _map(torch.Tensor.clone, outputs)

        def replay():
            for static, fresh in zip(_leaves(outputs), _leaves(run()), strict=True):
                static.copy_(fresh)

        return first, outputs, replay


@dataclass
class _Graph:
    inputs: Any  # the static input buffers, in the loop's argument structure
    outputs: Any  # the static outputs a replay writes
    replay: Callable[[], None]
    keep: list = field(default_factory=list)  # tensors the loop reads besides its inputs


class LoopGraphs:
    """The captured loops of one session, per (key, input signature). A loop that fails to record (an
    operation CUDA graphs cannot hold) is said once and runs eagerly from then on."""

    def __init__(self, device: torch.device, recorder=None, capacity: int = CAPACITY):
        self.device = torch.device(device)
        self.recorder = recorder or CudaRecorder()
        self.capacity = capacity
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._failed: set[tuple] = set()
        self._seen: set[tuple] = set()  # loops run once, eagerly: the next call of each records it
        self.recorded = 0  # graphs recorded so far (a second call of the same loop records none)

    def run(self, key: tuple, loop: Callable, *inputs, keep: Callable[[], list] = list):
        """`loop(*inputs)`, replayed from its graph when one was recorded for `key` and these input shapes;
        `keep()` lists the tensors the loop reads that the graph must keep alive (made by the warm-up)."""
        full_key = (key, signature(inputs))
        if full_key in self._failed:
            return loop(*inputs)
        graph = self._graphs.get(full_key)
        if graph is None:
            if full_key not in self._seen:
                self._seen.add(full_key)
                return loop(*inputs)
            return self._record(full_key, loop, inputs, keep)
        self._graphs.move_to_end(full_key)
        for static, given in zip(_leaves(graph.inputs), _leaves(inputs), strict=True):
            static.copy_(given)
        graph.replay()
        return _map(torch.Tensor.clone, graph.outputs)

    def _record(self, full_key: tuple, loop: Callable, inputs: tuple, keep: Callable[[], list]):
        static = _map(torch.Tensor.clone, inputs)
        try:
            first, outputs, replay = self.recorder(lambda: loop(*static), self.device)
        except RuntimeError as error:  # CUDA refuses to record some operation: keep the loop eager
            self._failed.add(full_key)
            log.warning("could not capture the %s loop as a CUDA graph, running it step by step: %s",
                        full_key[0][0], first_line(error))
            return loop(*inputs)
        if len(self._graphs) >= self.capacity:
            self._graphs.popitem(last=False)
        self._graphs[full_key] = _Graph(static, outputs, replay, list(keep()))
        self.recorded += 1
        return first
