"""One planned batch split across the processes of `torchrun` or `accelerate launch --multi_gpu` (one per GPU, on
as many nodes as the launcher is given).

Every process plans the whole batch (existing outputs, name collisions), so every output name is the one a
single process would give, and then runs only its own share: items rank, rank + N, rank + 2N, ... of the plan
(round-robin, so neighbouring inputs of similar size spread over the processes). Each process writes its own
outputs; nothing is exchanged while the batch runs. Only the optional merged JSON log joins the processes, once,
at the end: rank 0 gathers every process's records over gloo (TCP, so nodes need no shared folder for it) and
writes the one file. The launch is read from the standard variables RANK, WORLD_SIZE and LOCAL_RANK, so
accelerate, an optional dependency, is never imported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from icd.errors import UsageError
from icd.files import atomic_write

Item = TypeVar("Item")
# How long the merge of the JSON log waits for the slowest process to finish its share.
MERGE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch: its global rank, the number of processes, its rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def several(self) -> bool:
        return self.world > 1


def _variable(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"environment variable {name}={text!r}: expected a whole number >= 0 (set by torchrun "
                         f"or accelerate launch)")
    return value


def current_launch() -> Launch:
    """The launch this process belongs to; a lone process (no launcher) is rank 0 of 1."""
    world = _variable("WORLD_SIZE", 1)
    rank = _variable("RANK", 0)
    if world == 0 or rank >= world:
        raise UsageError(f"environment variables RANK={rank} and WORLD_SIZE={world}: the rank must be below the "
                         f"number of processes")
    return Launch(rank, world, _variable("LOCAL_RANK", 0))


def process_share(items: list[Item]) -> list[Item]:
    """This process's items of a batch that every process planned identically (all of them in a lone process)."""
    launch = current_launch()
    return items[launch.rank::launch.world]


def local_device(requested: str) -> str:
    """`--device` for this process: with several processes and CUDA, `auto` and a bare `cuda` become this
    process's GPU on its node (cuda:LOCAL_RANK, shared round-robin when processes outnumber the GPUs);
    anything else, and every device of a lone process, is kept as given."""
    launch = current_launch()
    if not launch.several or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    return f"cuda:{launch.local_rank % torch.cuda.device_count()}"


def merge_json_log(path: str | Path, records: list[dict]) -> None:
    """Write every process's `records` (this process's JSON-log records, in its order) to `path` as JSON lines,
    rank 0's first, then rank 1's, and so on. Every process of the launch must call it, after its share: rank 0
    waits up to MERGE_TIMEOUT for the others and writes the file, replacing an older one; the others write
    nothing. A lone process writes its own records."""
    merged = gather_records(records)
    if merged is not None:
        text = "".join(json.dumps(record) + "\n" for record in merged)
        atomic_write(path, lambda temporary: Path(temporary).write_text(text), overwrite=True)


def gather_records(records: list) -> list | None:
    """Every process's `records` on rank 0, rank 0's first, then rank 1's, ... (None on the other ranks; a lone
    process gets its own). Every process of the launch must call it: rank 0 waits up to MERGE_TIMEOUT for the
    others."""
    launch = current_launch()
    if not launch.several:
        return records
    parts = _gather(records, launch)
    return [record for part in parts for record in part] if launch.rank == 0 else None


def _gather(records: list[dict], launch: Launch) -> list[list[dict]]:
    """Each process's records on rank 0 (empty lists elsewhere), over a gloo group made for this one exchange,
    so it works on CPU and GPU launches alike and leaves no process group behind."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UsageError(f"environment variable {missing[0]} is not set: several processes (WORLD_SIZE="
                             f"{launch.world}) merge their JSON log only when started by torchrun or accelerate launch")
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world, timeout=MERGE_TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=MERGE_TIMEOUT)
    try:
        parts = [None] * launch.world if launch.rank == 0 else None
        dist.gather_object(records, parts, dst=0, group=group)
        return parts or []
    finally:
        dist.destroy_process_group(group)
        if owned:
            dist.destroy_process_group()
