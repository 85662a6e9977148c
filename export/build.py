"""`icd export`: build, or reuse when still valid, a model's fused weights, ONNX graphs and TensorRT engines."""

from __future__ import annotations

import logging

import torch

from icd.errors import ICDError
from icd.files import sweep_temporaries
from icd.models.cache import writing_cache
from icd.models.loading import fuse_unets, unet_config
from icd.models.manifest import Manifest
from icd.models.official import DIRECTIONS

from .artifacts import (Built, Index, artifacts_dir, fused_name, fused_unets, graph_kind, onnx_name,
                        save_fused_unet)
from .onnx import TOLERANCE, ensure_cpu_optimized, example_latent, export_unet, verify_graph, verify_latent
from .registry import MAX_BATCH
from .tensorrt import DTYPE, PRECISION, ensure_engine, tensorrt_problem

log = logging.getLogger("icd")


def export_model(manifest: Manifest, precisions: tuple[str, ...], *, onnx: bool = True, tensorrt: bool = False,
                 sizes: tuple[tuple[int, int], ...] = (), max_batch: int = MAX_BATCH, force: bool = False,
                 verify: bool = False, device: torch.device = torch.device("cpu")) -> list[Built]:
    """Make every requested artifact of both UNets valid, building only what is missing or stale (everything
    with `force`). TensorRT engines are built from fp16 graphs, with profiles for `sizes` (width, height in
    pixels; default the model's resolution) and batches up to `max_batch`. Graphs are traced on `device`.
    `verify` first hashes every file of the model's artifacts and rebuilds those that differ from the index.
    One export of a model runs at a time (a lock file); a second waits, then reuses what the first built."""
    if tensorrt and (why := tensorrt_problem(torch.device("cuda"), DTYPE)):  # before any work
        raise ICDError(f"--tensorrt: {why}")
    config = unet_config(manifest)
    with writing_cache(), Index(artifacts_dir(manifest), manifest.fingerprint).lock():
        index = Index.open(manifest)  # read under the lock: another export may just have finished
        sweep_temporaries(index.folder)  # what a killed export was building
        if verify:
            for name in list(index.entries):
                if damaged := index.damaged_files(name):
                    index.forget_damaged(name, f"{', '.join(damaged)} differs from its recorded SHA-256",
                                         "rebuilding it now")
        return _export(index, manifest, config, precisions, onnx=onnx, tensorrt=tensorrt, sizes=sizes,
                       max_batch=max_batch, force=force, device=device)


def _export(index: Index, manifest: Manifest, config: dict, precisions: tuple[str, ...], *, onnx: bool,
            tensorrt: bool, sizes: tuple[tuple[int, int], ...], max_batch: int, force: bool,
            device: torch.device) -> list[Built]:
    # ONNX graphs exist in the precisions they are checked in; TensorRT builds from its precision's graphs.
    graph_precisions = sorted((set(precisions) & set(TOLERANCE) if onnx else set())
                              | ({PRECISION} if tensorrt else set()))
    done: list[Built] = []
    for direction in DIRECTIONS:
        def stale(kind: str, wanted) -> list[str]:
            return [p for p in wanted if force or not index.find(kind=kind, direction=direction, precision=p)]

        # The reverse UNet also has the Prompt-to-Prompt graph (steered), built and reused like the plain one.
        graphs = {steered: stale(graph_kind(steered), graph_precisions)
                  for steered in ((False, True) if direction == "reverse" else (False,))}
        stale_weights, unet = stale("unet", precisions), None
        if stale_weights or any(graphs.values()):
            # The fused fp32 UNet on the CPU: from the artifacts when valid (and not forced), else teacher + LoRA.
            unet = (fuse_unets(manifest, config, (direction,)) if force else
                    fused_unets(manifest, config, (direction,), torch.float32, torch.device("cpu")))[0]
            index.reload()  # loading may have found a damaged file and forgotten it
            stale_weights = stale("unet", precisions)
        for precision in precisions:
            if precision in stale_weights:
                log.info("saving the fused %s UNet (%s)", direction, precision)
                save_fused_unet(index, unet, direction, precision)
            done.append(Built(fused_name(direction, precision), precision not in stale_weights))
        for steered, stale_graphs in graphs.items():  # the plain graph first: the other sets P2P processors
            for precision in graph_precisions:
                if precision in stale_graphs:
                    _export_graph(index, unet, direction, precision, device, steered)
                done.append(Built(onnx_name(direction, precision, steered), precision not in stale_graphs))
        for steered in graphs if "fp32" in graph_precisions else ():  # the graphs ONNX Runtime runs on a CPU
            ensure_cpu_optimized(index, onnx_name(direction, "fp32", steered), force)
        for steered in graphs if tensorrt else ():
            done.append(ensure_engine(index, direction, config, sizes or ((manifest.resolution,) * 2,), max_batch,
                                      force, steered=steered))
    return done


def _export_graph(index: Index, unet, direction: str, precision: str, device: torch.device, steered: bool) -> None:
    """Export at the odd example size and batch 2, check at another size and batch 1 (2: one source and
    target pair for the Prompt-to-Prompt graph), record both."""
    log.info("exporting the %s UNet%s to ONNX (%s)", direction, " with prompt-to-prompt" if steered else "", precision)
    name = onnx_name(direction, precision, steered)
    with index.staged() as scratch:
        files = export_unet(unet, scratch / name, precision, device, steered=steered)
        latent, batch = verify_latent(unet.config), 2 if steered else 1
        error = verify_graph(scratch / name, unet, precision, batch=batch, latent=latent, steered=steered)
        index.record(name, files, kind=graph_kind(steered), direction=direction, precision=precision,
                     example=[2, *example_latent(unet.config)], verified=[batch, *latent], relative_error=error)
