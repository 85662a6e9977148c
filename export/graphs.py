"""Whole loops as one CUDA graph: the forward loop (3-4 UNet calls) or an edit's reverse loop replayed with one
launch, so no Python, no kernel-launch gap and no allocator work sits between the calls.

A loop is a function of explicit inputs (tensors, `Conditioning`s and tuples of them); anything else it reads is
a host constant named in its key, or lives as long as the model (weights, the guidance embeddings kept alive
through `keep`). Its first call runs eagerly (a single photo pays nothing for a graph used once); the second runs
it on the capture stream (lazy tensors such as e(w) and the Prompt-to-Prompt control are made then, outside the
graph), records it over static input buffers and returns the warm-up's result; later calls copy their inputs in
and replay, and clone the outputs the next replay overwrites. All of it runs under the loop's device
(`device_guard`): CUDA work goes to the current device's streams, so serving cuda:1 with cuda:0 current would
record an empty graph. The loops are written for this (tests/test_no_wasted_work.py): no host reads, no
host-to-device copies, noise drawn before the loop; tests/fixtures/recorders.py has a CPU stand-in recorder.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from icd.core.denoiser import Conditioning
from icd.errors import first_line

log = logging.getLogger("icd")

# Graphs kept per session; the least recently used goes first. A serve session using every method, a mask,
# blend words and two batch sizes runs 14 loops (tests/test_loop_graphs.py counts them), a second image size
# twice that; with one memory pool for all graphs, a graph costs its static buffers and CUDA's graph objects.
CAPACITY = 32


def device_guard(device: torch.device):
    """`device` made current for the CUDA work queued inside (a no-op context off CUDA): graphs record and
    replay, and copies run, on the current device's streams, whatever device their tensors are on."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


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


def leaves(value) -> list[torch.Tensor]:
    """The tensors in a loop's inputs or outputs, in order."""
    found: list[torch.Tensor] = []
    _map(found.append, value)
    return found


def cloned(value):
    """A copy of every tensor in `value` (a replay's outputs, which the next replay overwrites)."""
    return _map(torch.Tensor.clone, value)


def signature(value) -> tuple:
    """What a graph is recorded for besides its key: the structure, shapes, dtypes and devices of the inputs."""
    shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in leaves(value))
    return shapes, repr(_map(lambda _: "T", value))


class CudaRecorder:
    """Records `run()` as a CUDA graph of `device`; returns (the warm-up's result, the static outputs, replay).
    Under a guard of `device`, on one capture stream of it: one warm-up run (the loop ran eagerly once before,
    so the kernels' lazy set-up is done; this run makes the stream's own and gives the call's result), then the
    capture. All graphs of a recorder share one memory pool: a session's loops run one at a time, their inputs
    are copied into buffers outside the pool and their outputs cloned right after each replay, so one graph may
    reuse another's scratch memory, in any order."""

    def __init__(self):
        self.stream = None  # made on the device at the first recording
        self.pool = None

    def __call__(self, run: Callable[[], Any], device: torch.device):
        with device_guard(device):
            if self.stream is None:
                self.stream, self.pool = torch.cuda.Stream(device), torch.cuda.graph_pool_handle()
            current = torch.cuda.current_stream(device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                first = cloned(run())
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of the server's other threads does not void this thread's recording
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                outputs = run()
            current.wait_stream(self.stream)
        return first, outputs, graph.replay


@dataclass
class _Graph:
    inputs: Any  # the static input buffers, in the loop's argument structure
    outputs: Any  # the static outputs a replay writes
    replay: Callable[[], None]
    keep: list = field(default_factory=list)  # tensors the loop reads besides its inputs


class LoopGraphs:
    """The captured loops of one session, per (key, input signature): up to `capacity` graphs, and up to
    `capacity` loops run once and remembered (the next call of one of those records it). A graph evicted is
    forgotten, so its next call runs eagerly rather than paying a recording at once; a loop that fails to
    record (an operation CUDA graphs cannot hold) is said once and runs eagerly from then on."""

    def __init__(self, device: torch.device, recorder=None, capacity: int = CAPACITY):
        self.device = torch.device(device)
        self.recorder = recorder or CudaRecorder()
        self.capacity = capacity
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()  # run once, eagerly, and not recorded
        self._failed: set[tuple] = set()
        self.recorded = 0  # graphs recorded so far (a second call of the same loop records none)

    def run(self, key: tuple, loop: Callable, *inputs, keep: Callable[[], list] = list):
        """`loop(*inputs)`, replayed from its graph when one was recorded for `key` and these input shapes;
        `keep()` lists the tensors the loop reads that the graph must keep alive (made by the warm-up)."""
        full_key = (key, signature(inputs))
        if full_key in self._failed:
            return loop(*inputs)
        graph = self._graphs.get(full_key)
        if graph is not None:
            self._graphs.move_to_end(full_key)
            return self._replay(graph, inputs)
        if full_key not in self._seen:
            self._seen[full_key] = None
            if len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
            return loop(*inputs)
        del self._seen[full_key]
        return self._record(full_key, loop, inputs, keep)

    def _replay(self, graph: _Graph, inputs: tuple):
        with device_guard(self.device):
            for static, given in zip(leaves(graph.inputs), leaves(inputs), strict=True):
                static.copy_(given)
            graph.replay()
            return cloned(graph.outputs)

    def _record(self, full_key: tuple, loop: Callable, inputs: tuple, keep: Callable[[], list]):
        static = cloned(inputs)
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
