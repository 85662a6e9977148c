"""ONNX Runtime's optimisation levels on the CPU for one exported graph: how long a session takes to open and
how fast one call runs, next to the PyTorch module it was exported from (medians, one process; each
runs its calls in a block, torch before any session exists).

Levels: `basic` (ORT_ENABLE_BASIC on the export's graph, what a session opens without the optimised copy),
`extended` (ORT_ENABLE_EXTENDED: the fusions without the CPU layout changes), `all` (ORT_ENABLE_ALL), `saved` (the export's fully optimised copy, `write_cpu_optimized`, opened with
ORT_DISABLE_ALL: what `onnx_session` opens). The model must have been exported (`icd export -m MODEL`).

Usage: python bench/onnx_cpu_levels.py -m MODEL [--graph reverse-p2p|reverse|forward] [--latent 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from icd.models.hub import resolve_model  # noqa: E402
from icd.models.loading import unet_config  # noqa: E402
from icd_export.artifacts import Index, fused_unets  # noqa: E402
from icd_export.onnx import find_cpu_optimized, graph_class, graph_feeds  # noqa: E402


def session(path, level, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as onnx_session sets it
    options.log_severity_level = 3
    started = time.perf_counter()
    opened = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return opened, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--graph", choices=("reverse-p2p", "reverse", "forward"), default="reverse-p2p")
    parser.add_argument("--latent", type=int, default=16, help="latent side (16: 128 px)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = resolve_model(args.model)
    index = Index.open(manifest)
    graph = index.folder / f"unet-{args.graph}-fp32.onnx"
    saved = find_cpu_optimized(index, graph.name) if graph.name in index.entries else None
    if saved is None:
        raise SystemExit(f"no CPU-optimised version of {graph}: run `icd export -m {args.model}` first")
    steered = args.graph == "reverse-p2p"
    direction = "forward" if args.graph == "forward" else "reverse"
    unet = fused_unets(manifest, unet_config(manifest), (direction,), torch.float32, torch.device("cpu"))[0].eval()
    module = graph_class(steered)(unet).eval()
    feeds = graph_feeds(unet.config, 2 if steered else 1, (args.latent, args.latent), "fp32", steered, seed=1)
    arrays = {name: tensor.numpy() for name, tensor in feeds.items()}
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        fn()
        times[name] = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)

    with torch.inference_mode():  # before any session exists: their threads would share the cores
        timed("torch", lambda: module(*feeds.values()))
    sessions = {"basic": session(graph, "ORT_ENABLE_BASIC", args.threads),
                "extended": session(graph, "ORT_ENABLE_EXTENDED", args.threads),
                "all": session(graph, "ORT_ENABLE_ALL", args.threads),
                "saved": session(saved, "ORT_DISABLE_ALL", args.threads)}
    outputs = [output.name for output in sessions["basic"][0].get_outputs()]
    for name, (opened, _) in sessions.items():
        timed(name, lambda s=opened: s.run(outputs, arrays))
    torch_ms = statistics.median(times["torch"]) * 1e3
    print(f"# {args.model}, {args.graph} graph, batch {feeds['sample'].shape[0]}, latent {args.latent}x{args.latent}, "
          f"{args.threads} thread(s), medians of {args.repeats}")
    print("| runs | session opens in s | call ms | vs torch |\n| --- | ---: | ---: | ---: |")
    for name in times:
        ms = statistics.median(times[name]) * 1e3
        opened = f"{sessions[name][1]:.1f}" if name in sessions else ""
        print(f"| {name} | {opened} | {ms:.1f} | {torch_ms / ms:.2f}x |")


if __name__ == "__main__":
    main()
