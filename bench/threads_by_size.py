"""One reconstruct (decode of x_T: the reverse UNet's steps and the VAE) on 1 and 2 CPU threads, with OpenMP's
threads sleeping and spinning between operations, at several sizes: where a second thread starts to pay, which
is how icd/models/threads.py sizes its rule.

    python bench/threads_by_size.py [-m mini] [--sizes 64 256 512] [--repeats 5]

Each waiting policy runs in a process of its own (OpenMP reads it once); the thread counts alternate within
it, twice each, and the best of the two medians is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(model: str, size: int, repeats: int) -> dict[int, float]:
    """Milliseconds of one reconstruct at `size` px on 1 and 2 threads, in this process."""
    import torch

    from icd import pipeline
    from icd.app.session import open_session

    session = open_session(model, "cpu", "fp32", "torch", directions=("reverse",))
    shape = session.model.latent_shape(size, size)
    best: dict[int, float] = {}
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        pipeline.reconstruct(session, torch.randn(shape), "a red circle")  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            pipeline.reconstruct(session, torch.randn(shape), "a red circle")
            times.append(time.perf_counter() - start)
        best[threads] = min(best.get(threads, float("inf")), statistics.median(times) * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="mini")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, int(args.child[0]), args.repeats)))
        return
    print(f"{args.model}, one reconstruct, median of {args.repeats}: ms at 1 thread / 2 sleeping / 2 spinning")
    for size in args.sizes:
        row = {}
        for policy in ("PASSIVE", ""):  # "" leaves OpenMP's default, which spins for a while
            env = {**os.environ, "OMP_WAIT_POLICY": policy, "HF_HUB_OFFLINE": "1"}
            env.pop("OMP_NUM_THREADS", None)
            done = subprocess.run([sys.executable, __file__, "-m", args.model, "--repeats", str(args.repeats),
                                   "--child", str(size), policy], env=env, capture_output=True, text=True, check=True)
            row[policy] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{size:5} px: {row['PASSIVE']['1']:.0f} / {row['PASSIVE']['2']:.0f} / {row['']['2']:.0f} ms")


if __name__ == "__main__":
    main()
