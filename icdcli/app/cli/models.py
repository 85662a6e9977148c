"""`icd pull`, `icd info` and `icd export`: the models, the environment, and a model's engine files."""

from __future__ import annotations

import json
import sys

import click

from icd import __version__
from icd.models.official import PRECISION_NAMES
from icd_export.registry import MAX_BATCH

from .common import resolve
from .options import threads_given, uses


def _sizes(values) -> tuple[tuple[int, int], ...]:
    from icd.latents import VAE_FACTOR

    sizes = []
    for value in values:
        width, sep, height = value.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) % VAE_FACTOR == 0
                and int(height) % VAE_FACTOR == 0):
            raise click.BadParameter(f"'{value}' is not WIDTHxHEIGHT in multiples of {VAE_FACTOR}, e.g. 512x512",
                                     param_hint="--size")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


@click.command("export")
@uses("model", "device", "threads")
@click.option("--precision", "precisions", type=click.Choice(PRECISION_NAMES), multiple=True,
              help="Precisions to build (repeatable). Default: fp16 with a CUDA GPU, else fp32.")
@click.option("--onnx/--no-onnx", default=True, show_default=True, help="ONNX graphs (fp32/fp16), checked in "
              "ONNX Runtime against PyTorch.")
@click.option("--tensorrt", is_flag=True, help="TensorRT engines for this GPU (from fp16 graphs).")
@click.option("--size", "sizes", multiple=True, metavar="WxH", help="TensorRT: image sizes the engines must take "
              "(repeatable). Default: the model's resolution.")
@click.option("--max-batch", type=click.IntRange(min=1), default=MAX_BATCH, show_default=True,
              help="TensorRT: the largest batch the engines take.")
@click.option("--force", is_flag=True, help="Rebuild everything, even what is still valid.")
@click.option("--verify", is_flag=True, help="Check every existing file against the hash recorded when it was "
              "built (reads them whole), and rebuild what differs.")
@uses("json", "quiet", "verbose")
def export(model, device, precisions, onnx, tensorrt, sizes, max_batch, force, verify, as_json):
    """Build the fast-start and engine files of a model: fused UNet weights, ONNX graphs, TensorRT engines.

    They go to $ICD_HOME/artifacts/<model fingerprint>/ with an index; what is still valid is reused,
    what is missing or stale is rebuilt. Later commands find them by themselves: the UNets load without
    LoRA fusion, and `--backend auto` picks the engines.

    \b
    Examples:
      icd export -m sd15                          # fp16 weights and graphs on a GPU machine
      icd export -m sd15 --tensorrt --size 512x512 --size 768x512
      icd export -m mini                          # fp32 on a CPU (graphs are traced on --device)
      icd export -m sd15 --verify                 # after a disk problem: rehash, rebuild what differs
    """
    from icd.models.loading import PRECISIONS, resolve_device, resolve_dtype
    from icd_export.artifacts import artifacts_dir
    from icd.models.threads import use_cpu_threads
    from icd_export.build import export_model
    from ..session import quiet_libraries

    quiet_libraries()
    use_cpu_threads(threads_given())
    manifest = resolve(model)[1]
    torch_device = resolve_device(device)
    chosen = precisions or (PRECISIONS[resolve_dtype("auto", torch_device)],)
    built = export_model(manifest, chosen, onnx=onnx, tensorrt=tensorrt, sizes=_sizes(sizes),
                         max_batch=max_batch, force=force, device=torch_device, verify=verify)
    folder = artifacts_dir(manifest)
    if as_json:
        click.echo(json.dumps({"folder": str(folder), "fingerprint": manifest.fingerprint,
                               "artifacts": [{"name": b.name, "reused": b.reused} for b in built]}))
        return
    for item in built:
        click.echo(f"{'reused' if item.reused else 'built':6} {item.name}")
    click.echo(folder)


@click.command()
@click.argument("name", required=False)
@click.option("--list", "show_list", is_flag=True, help="List the presets and every model that runs offline "
              "(shipped, pulled or built), with their sizes.")
@click.option("--force", is_flag=True, help="Download again even if present.")
@click.option("--vae", metavar="REPO|FOLDER", help="A VAE to run instead of the base's, fetched with it; for SDXL "
              "under fp16: madebyollin/sdxl-vae-fp16-fix (else SDXL's VAE runs in fp32).")
def pull(name, show_list, force, vae):
    """Download a released iCD model (teacher, LoRAs and base model) into the cache.

    The cache is $ICD_HOME, else $XDG_CACHE_HOME/icd, else ~/.cache/icd; base models go to the
    Hugging Face cache. Interrupted downloads resume.

    \b
    Example:
      icd pull sd15
    """
    from icd.models import hub

    if show_list or not name:
        offline = {entry.name: entry for entry in hub.available_models()}
        for preset in hub.PRESETS.values():
            entry = offline.pop(preset.name, None)
            state = f"pulled, {_bytes(entry.size_bytes)}" if entry else "-"
            click.echo(f"{preset.name:16} {state:18} {preset.description}")
        for alias, target in hub.ALIASES.items():
            click.echo(f"{alias:16} {'':18} alias of {target}")
        for entry in offline.values():
            click.echo(f"{entry.name:16} {entry.source + ', ' + _bytes(entry.size_bytes):18} {entry.path}")
        return
    click.echo(hub.pull(name, force=force, vae=vae))


def _bytes(size: float) -> str:
    """A size for people: 812 B, 4.1 MB, 2.3 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            break
        size /= 1000
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


@click.command()
def info():
    """Show the device, the available backends and every model that runs offline."""
    import torch

    from icd.models import cache, hub
    from icd_export.registry import installed_backends

    click.echo(f"icd {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            click.echo(f"device cuda:{i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                       f"compute capability {props.major}.{props.minor}")
    else:
        click.echo("device: cpu (no CUDA GPU visible)")
    click.echo(f"backends: {', '.join(installed_backends())}")
    click.echo(f"cache: {cache.icd_home()}")
    click.echo("models: " + ", ".join(f"{entry.name} ({entry.source}, {_bytes(entry.size_bytes)})"
                                      for entry in hub.available_models()))
