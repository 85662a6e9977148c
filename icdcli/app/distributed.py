"""One planned batch split across the processes of `torchrun` or `accelerate launch --multi_gpu`: every process
plans the whole batch, so names agree, and runs items rank, rank + N, ... (round-robin, so neighbouring inputs of
similar size spread). Nothing is exchanged but the merged JSON log, gathered at the end over gloo (TCP: no shared
folder needed). The launch is read from RANK, WORLD_SIZE and LOCAL_RANK, so accelerate is never imported."""

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
    """`--device` for this process: with several processes and CUDA, `auto` and a bare `cuda` become its GPU on
    its node (cuda:LOCAL_RANK, round-robin when processes outnumber the GPUs); else as given."""
    launch = current_launch()
    if not launch.several or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    return f"cuda:{launch.local_rank % torch.cuda.device_count()}"


def merge_json_log(path: str | Path, records: list[dict]) -> None:
    """Write every process's JSON-log `records` to `path` as JSON lines, rank 0's first: every process calls
    it after its share, and rank 0 (or a lone process) writes the file, replacing an older one."""
    merged = gather_records(records)
    if merged is not None:
        text = "".join(json.dumps(record) + "\n" for record in merged)
        atomic_write(path, lambda temporary: Path(temporary).write_text(text), overwrite=True)


def gather_records(records: list) -> list | None:
    """Every process's `records` on rank 0, rank 0's first, then rank 1's, ... (None on the other ranks; a lone
    process gets its own), over a gloo group made for this one exchange, so it works on CPU and GPU launches
    alike and leaves no process group behind. Every process must call it: rank 0 waits up to MERGE_TIMEOUT."""
    launch = current_launch()
    if not launch.several:
        return records
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
    finally:
        dist.destroy_process_group(group)
        if owned:
            dist.destroy_process_group()
    return None if parts is None else [record for part in parts for record in part]
