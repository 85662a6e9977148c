"""The `icd` command line: parse, call the library, report. Exit codes: 0 ok, 1 an item failed, 2 usage."""

from __future__ import annotations

import functools
import json
import logging
import secrets
import sys
import time
from pathlib import Path

import click

from icd import __version__
from icd.errors import ICDError

from .training import train

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_MODEL = "sd15"

GUIDANCE_HELP = ("Guidance strength w as in the iCD paper: the classical CFG scale minus one, so 0 means the "
                 "prompt alone, without extra guidance.")
TAU_HELP = ("Dynamic guidance: w is used on steps with t/1000 <= tau and 0 on the noisier ones above. "
            "1.0 = guidance on every step.")


def _quiet_libraries() -> None:
    """Keep stderr for our own progress and errors: silence the libraries' bars and notices."""
    import diffusers
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    disable_progress_bars()


class _OneLineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"icd: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _setup_logging() -> None:
    log = logging.getLogger("icd")
    if not log.handlers:
        log.addHandler(_OneLineHandler())
        log.setLevel(logging.INFO)
        log.propagate = False


def _error(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"icd: error: {message}", file=sys.stderr)


def _open(model_ref: str, device: str, dtype: str, directions: tuple[str, ...] = (), backend: str = "auto",
          compile: bool = False, static_shapes: bool = False):
    """The session for a model; a failure here ends the command with one line (via `Main`)."""
    from .session import open_session

    _quiet_libraries()
    return open_session(model_ref, device, dtype, backend, compile, static_shapes, directions)


def run_batch(items: list, describe, work, *, as_json: bool, quiet: bool) -> int:
    """Run `work(item)` on each item; a failure is one line and the batch goes on. Returns the exit code."""
    import torch
    from tqdm import tqdm

    failed = 0
    notes_seen: set[str] = set()
    bar = tqdm(items, file=sys.stderr, disable=True if quiet else None, unit="item", dynamic_ncols=True)
    for item in bar:
        started = time.perf_counter()
        record = {"input": describe(item)}
        try:
            output, notes = work(item)
            record.update(status="ok", output=str(output))
            for note in notes:
                if note not in notes_seen:
                    notes_seen.add(note)
                    logging.getLogger("icd").warning(note)
        except ICDError as err:
            record.update(status="error", error=str(err))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            record.update(status="error", error=f"{record['input']}: out of memory: try a smaller --width/--height "
                                                "or --dtype fp16")
        record["seconds"] = round(time.perf_counter() - started, 3)
        if record["status"] == "error":
            failed += 1
            _error(record["error"])
        if as_json:
            bar.write(json.dumps(record), file=sys.stdout)
        elif record["status"] == "ok":
            bar.write(record["output"], file=sys.stdout)
    bar.close()
    if failed and len(items) > 1:
        _error(f"{failed} of {len(items)} items failed")
    return 1 if failed else 0


# Every option that several commands share, declared once; `uses(...)` attaches them. ICD_* variables give
# the defaults of the model, device, dtype and backend options wherever they appear.
OPTIONS = {
    "model": click.option("-m", "--model", envvar="ICD_MODEL", show_envvar=True,
                          help=f"A preset name (see `icd pull --list`), `mini`, a model in the cache, or a folder/"
                               f"icd.json path. Default: {DEFAULT_MODEL} (reconstruct: the one recorded in each "
                               f"latent file; demo: mini)."),
    "device": click.option("--device", default="auto", show_default=True, envvar="ICD_DEVICE", show_envvar=True,
                           help="auto, cpu, cuda or cuda:N."),
    "dtype": click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto",
                          show_default=True, envvar="ICD_DTYPE", show_envvar=True,
                          help="auto = fp16 on a GPU, fp32 on a CPU."),
    "backend": click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "tensorrt"]), default="auto",
                            show_default=True, envvar="ICD_BACKEND", show_envvar=True,
                            help="What runs the UNets. auto: TensorRT, else ONNX Runtime, when `icd export` has built "
                                 "their files for this model, else torch. Prompt-to-Prompt decoding always runs on "
                                 "torch."),
    "compile": click.option("--compile", is_flag=True, help="torch backend: torch.compile the UNets (slow first "
                            "item; with CUDA graphs when --width and --height fix the size)."),
    "width": click.option("--width", type=click.IntRange(min=8), help="Working width in pixels (a multiple of 64 "
                          "for SD1.5, 32 for SDXL). Default: keep the aspect ratio at the model's resolution."),
    "height": click.option("--height", type=click.IntRange(min=8), help="Working height in pixels."),
    "output": click.option("-o", "--output", type=click.Path(), help="Output file for one result, folder for "
                           "several. Default: the current folder."),
    "overwrite": click.option("--overwrite", is_flag=True, help="Replace existing output files."),
    "json": click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (one line per item)."),
    "quiet": click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
}
MODEL_RUN = ("model", "device", "dtype", "backend", "compile", "width", "height", "output", "overwrite", "json",
             "quiet")


def uses(*names: str):
    """Attach the shared options `names`, in that order in the help."""
    def attach(command):
        return functools.reduce(lambda cmd, name: OPTIONS[name](cmd), reversed(names), command)

    return attach


def _settings(session, model_ref, seed, width, height, overwrite):
    from .jobs import Settings

    return Settings(session=session, model_ref=model_ref, seed=seed, width=width, height=height, overwrite=overwrite)


def _check_output(output: str | None, count: int) -> None:
    from .jobs import OUTPUT_SUFFIXES

    if output and count > 1 and (Path(output).suffix.lower() in OUTPUT_SUFFIXES or output.endswith(".safetensors")):
        raise click.UsageError(f"-o {output} names one file, but there are {count} results: give a folder")


class Main(click.Group):
    """The `icd` group: the one place where an ICDError becomes its line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ICDError as err:
            _error(str(err))
            ctx.exit(1)


@click.group(cls=Main, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="icd")
def main() -> None:
    """Edit photos with text in a few UNet steps (Invertible Consistency Distillation).

    \b
    Examples:
      icd pull sd15                                   # download a released model once
      icd edit photo.jpg --src "a pug" --tgt "a bear"
      icd edit photos/ --src "a cat" --tgt "a tiger" -o edited/
      icd invert photo.jpg --prompt "a pug" && icd edit photo.latent.safetensors --tgt "a bear"
      icd generate "a lighthouse at dusk" -n 4 -o out/
      icd demo                                        # offline, with the shipped mini model
    """
    _setup_logging()


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--src", "source", help="Prompt describing the input photo (not needed for latent files).")
@click.option("--tgt", "target", required=True, help="Prompt describing the wanted result.")
@click.option("--method", type=click.Choice(["p2p", "swap", "none"]), help="p2p: Prompt-to-Prompt attention "
              "control (SD1.5 default); swap: source prompt on the unguided steps, target on the guided ones "
              "(SDXL default); none: target prompt only.")
@click.option("--guidance", type=float, help=GUIDANCE_HELP + " Default 19.")
@click.option("--tau", type=click.FloatRange(0, 1), help=TAU_HELP + " Default 0.8 (SD1.5), 0.7 (SDXL).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise added before encoding.")
@click.option("--cross-replace", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="p2p: fraction of steps on which the target's cross-attention comes from the source.")
@click.option("--self-replace", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="p2p: fraction of steps on which the target's self-attention comes from the source.")
@click.option("--amplify", multiple=True, metavar="WORD=F", help="p2p: scale a target word's attention by F "
              "(repeatable). Default: each new target word x4.")
@click.option("--blend", metavar="SRC_WORDS:TGT_WORDS", help="p2p: change only where these words attend, "
              "e.g. --blend pug:bear.")
@uses(*MODEL_RUN)
def edit(inputs, source, target, method, guidance, tau, seed, cross_replace, self_replace, amplify, blend,
         model, device, dtype, backend, compile, width, height, output, overwrite, as_json, quiet):
    """Edit photos (or latent files from `icd invert`) from a source prompt to a target prompt.

    INPUTS are image files, folders of images, globs, or .latent.safetensors files.

    \b
    Prompt-to-Prompt windows: with K decoding steps (3 or 4), cross-attention is
    replaced on the first floor(cross*(K+1)) steps and self-attention on the first
    floor(self*K) steps. With 4 steps the defaults 0.3/0.6 give 1 and 2 steps;
    a fraction that maps to no step at all is warned about.

    \b
    Examples:
      icd edit photo.jpg --src "a pug" --tgt "a bear"
      icd edit cat.png --src "a cat on a sofa" --tgt "a tiger on a sofa" --blend cat:tiger
      icd edit photos/*.jpg --src "a dog" --tgt "a wolf" --method none -o wolves/
    """
    from icd.p2p import P2PConfig

    from .jobs import IMAGE_SUFFIXES, EditOptions, edit_file, expand_inputs, needs_inversion, output_path, output_stem

    config = P2PConfig(cross_replace=cross_replace, self_replace=self_replace,
                       amplify=_parse_amplify(amplify), blend=_parse_blend(blend))
    paths = expand_inputs(list(inputs), IMAGE_SUFFIXES | {".safetensors"})
    if not paths:
        raise click.UsageError("no input files found")
    _check_output(output, len(paths))
    directions = ("forward", "reverse") if needs_inversion(paths) else ("reverse",)
    model = model or DEFAULT_MODEL
    session = _open(model, device, dtype, directions, backend, compile, bool(width and height))
    settings = _settings(session, model, seed, width, height, overwrite)
    options = EditOptions(source, target, method, guidance, tau, config)

    def work(path):
        out = output_path(output, f"{output_stem(path)}-edit.png", len(paths) > 1)
        return edit_file(settings, path, options, out)

    sys.exit(run_batch(paths, str, work, as_json=as_json, quiet=quiet))


def _parse_amplify(values) -> dict[str, float] | None:
    if not values:
        return None
    amplify = {}
    for value in values:
        word, _, factor = value.partition("=")
        try:
            amplify[word.strip().lower()] = float(factor)
        except ValueError:
            raise click.BadParameter(f"'{value}' is not WORD=FACTOR, e.g. bear=4", param_hint="--amplify") from None
    return amplify


def _parse_blend(value: str | None):
    if value is None:
        return None
    src, sep, tgt = value.partition(":")
    if not sep or not src.split() or not tgt.split():
        raise click.BadParameter(f"'{value}' is not SRC_WORDS:TGT_WORDS, e.g. pug:bear", param_hint="--blend")
    return tuple(src.lower().split()), tuple(tgt.lower().split())


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--prompt", required=True, help="Prompt describing the photos (the source prompt of later edits).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise added before encoding.")
@uses(*MODEL_RUN)
def invert(images, prompt, seed, model, device, dtype, backend, compile, width, height, output, overwrite, as_json,
           quiet):
    """Encode photos into latent files (x_T plus metadata) for fast repeated edits.

    \b
    Example:
      icd invert photo.jpg --prompt "a pug on the grass"
      icd edit photo.latent.safetensors --tgt "a bear on the grass"
    """
    from .jobs import IMAGE_SUFFIXES, LATENT_NAME, expand_inputs, invert_file, output_path

    paths = expand_inputs(list(images), IMAGE_SUFFIXES)
    _check_output(output, len(paths))
    model = model or DEFAULT_MODEL
    session = _open(model, device, dtype, ("forward",), backend, compile, bool(width and height))
    settings = _settings(session, model, seed, width, height, overwrite)

    def work(path):
        out = output_path(output, path.stem + LATENT_NAME, len(paths) > 1)
        return invert_file(settings, path, prompt, out), []

    sys.exit(run_batch(paths, str, work, as_json=as_json, quiet=quiet))


@main.command()
@click.argument("latents", nargs=-1, required=True)
@uses("model", "device", "dtype", "backend", "compile", "output", "overwrite", "json", "quiet")
def reconstruct(latents, model, device, dtype, backend, compile, output, overwrite, as_json, quiet):
    """Decode latent files back into images with their own prompt and w = 0 (the faithful inversion)."""
    from icd.latents import load_latent

    from .jobs import expand_inputs, output_path, output_stem, reconstruct_file

    paths = expand_inputs(list(latents), {".safetensors"})
    _check_output(output, len(paths))

    def work(path):
        model_ref = model or load_latent(path)[1].model
        session = _open(model_ref, device, dtype, ("reverse",), backend, compile)
        settings = _settings(session, model_ref, 0, None, None, overwrite)
        out = output_path(output, f"{output_stem(path)}-recon.png", len(paths) > 1)
        return reconstruct_file(settings, path, out), []

    sys.exit(run_batch(paths, str, work, as_json=as_json, quiet=quiet))


@main.command()
@click.argument("prompt")
@click.option("-n", "--count", type=click.IntRange(min=1), default=1, show_default=True, help="Number of images.")
@click.option("--seed", type=int, help="Seed of the first image (the next ones use seed+1, ...). Default: random.")
@click.option("--guidance", type=float, default=7.0, show_default=True, help=GUIDANCE_HELP)
@click.option("--tau", type=click.FloatRange(0, 1), default=1.0, show_default=True, help=TAU_HELP)
@uses(*MODEL_RUN)
def generate(prompt, count, seed, guidance, tau, model, device, dtype, backend, compile, width, height, output,
             overwrite, as_json, quiet):
    """Generate images from a prompt in the model's 3-4 steps.

    \b
    Example:
      icd generate "a lighthouse at dusk, oil painting" -n 4 -o out/
    """
    from .jobs import generate_file, output_path, slug

    _check_output(output, count)
    first = secrets.randbelow(2**31) if seed is None else seed
    seeds = [first + i for i in range(count)]
    model = model or DEFAULT_MODEL
    session = _open(model, device, dtype, ("reverse",), backend, compile, static_shapes=True)
    settings = _settings(session, model, first, width, height, overwrite)

    def work(item_seed):
        out = output_path(output, f"{slug(prompt)}-{item_seed}.png", count > 1)
        return generate_file(settings, prompt, item_seed, guidance, tau, out), []

    sys.exit(run_batch(seeds, lambda s: f"seed {s}", work, as_json=as_json, quiet=quiet))


def _sizes(values) -> tuple[tuple[int, int], ...]:
    sizes = []
    for value in values:
        width, sep, height = value.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit() and int(width) % 8 == 0 and int(height) % 8 == 0):
            raise click.BadParameter(f"'{value}' is not WIDTHxHEIGHT in multiples of 8, e.g. 512x512",
                                     param_hint="--size")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


@main.command("export")
@uses("model", "device")
@click.option("--precision", "precisions", type=click.Choice(["fp32", "fp16", "bf16"]), multiple=True,
              help="Precisions to build (repeatable). Default: fp16 with a CUDA GPU, else fp32.")
@click.option("--onnx/--no-onnx", default=True, show_default=True, help="ONNX graphs (fp32/fp16), checked in "
              "ONNX Runtime against PyTorch.")
@click.option("--tensorrt", is_flag=True, help="TensorRT engines for this GPU (from fp16 graphs).")
@click.option("--size", "sizes", multiple=True, metavar="WxH", help="TensorRT: image sizes the engines must take "
              "(repeatable). Default: the model's resolution.")
@click.option("--max-batch", type=click.IntRange(min=1), default=2, show_default=True,
              help="TensorRT: the largest batch the engines take.")
@click.option("--force", is_flag=True, help="Rebuild everything, even what is still valid.")
@uses("json")
def export_command(model, device, precisions, onnx, tensorrt, sizes, max_batch, force, as_json):
    """Build the fast-start and engine files of a model: fused UNet weights, ONNX graphs, TensorRT engines.

    They go to $ICD_HOME/artifacts/<model fingerprint>/ with an index; what is still valid is reused,
    what is missing or stale is rebuilt. Later commands find them by themselves: the UNets load without
    LoRA fusion, and `--backend auto` picks the engines.

    \b
    Examples:
      icd export -m sd15                          # fp16 weights and graphs on a GPU machine
      icd export -m sd15 --tensorrt --size 512x512 --size 768x512
      icd export -m mini                          # fp32 on a CPU (graphs are traced on --device)
    """
    from icd.models.hub import resolve_model
    from icd.models.loading import resolve_device
    from icd_export.artifacts import artifacts_dir
    from icd_export.build import export_model

    _quiet_libraries()
    manifest = resolve_model(model or DEFAULT_MODEL)
    torch_device = resolve_device(device)
    chosen = precisions or (("fp16",) if torch_device.type == "cuda" else ("fp32",))
    built = export_model(manifest, chosen, onnx=onnx, tensorrt=tensorrt, sizes=_sizes(sizes),
                         max_batch=max_batch, force=force, device=torch_device)
    folder = artifacts_dir(manifest)
    if as_json:
        click.echo(json.dumps({"folder": str(folder), "fingerprint": manifest.fingerprint,
                               "artifacts": [{"name": b.name, "reused": b.reused} for b in built]}))
        return
    for item in built:
        click.echo(f"{'reused' if item.reused else 'built':6} {item.name}")
    click.echo(folder)


@main.command()
@uses("model", "device", "dtype", "backend", "compile")
@click.option("--random-weights", type=click.Choice(["sd15", "sdxl"]), help="Measure the real SD1.5/SDXL "
              "architecture with random weights instead of --model (built once into the cache, no download).")
@click.option("--size", type=click.IntRange(min=64), default=512, show_default=True, help="Square image side in "
              "pixels (128 on a CPU).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per stage.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs first.")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, help="Batch sizes for the "
              "throughput rows (repeatable). Default: 1, 2, 4.")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Also time a new `icd edit` process from start to edited image.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch and ONNX Runtime. "
              "Default: torch's.")
@click.option("--stages-only", is_flag=True, help="Only the single stages: no whole edits, batches or cold start "
              "(for CPUs).")
@uses("json")
def bench(model, device, dtype, backend, compile, random_weights, size, repeats, warmup, batches, cold_start,
          threads, stages_only, as_json):
    """Time every stage of an edit (text, VAE, each UNet call), whole edits, batches and a cold start,
    each next to its floor (FLOPs over the measured matmul rate).

    \b
    Examples:
      icd bench --random-weights sd15             # on a GPU: SD1.5 at 512x512, fp16
      icd bench --random-weights sd15 --size 128 --repeats 3 --warmup 1 --stages-only   # on a CPU
      icd bench -m sd15 --backend tensorrt --json
    """
    import torch

    from icd.models.offline import build_random_model

    from .bench import format_report, run_bench

    _quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    model = str(build_random_model(random_weights)) if random_weights else model or DEFAULT_MODEL
    report = run_bench(model, backend=backend, device=device, dtype=dtype, size=size, warmup=warmup,
                       repeats=repeats, batches=batches or (1, 2, 4), compile=compile, cold_start=cold_start,
                       stages_only=stages_only)
    click.echo(json.dumps(report) if as_json else format_report(report))


@main.command()
@click.argument("name", required=False)
@click.option("--list", "show_list", is_flag=True, help="List the presets and whether each is downloaded.")
@click.option("--force", is_flag=True, help="Download again even if present.")
def pull(name, show_list, force):
    """Download a released iCD model (teacher, LoRAs and base model) into the cache.

    The cache is $ICD_HOME, else $XDG_CACHE_HOME/icd, else ~/.cache/icd; base models go to the
    Hugging Face cache. Interrupted downloads resume.

    \b
    Example:
      icd pull sd15
    """
    from icd.models import hub

    if show_list or not name:
        for preset in hub.PRESETS.values():
            state = "downloaded" if (hub.preset_dir(preset.name) / "icd.json").is_file() else "-"
            click.echo(f"{preset.name:16} {state:11} {preset.description}")
        for alias, target in hub.ALIASES.items():
            click.echo(f"{alias:16} {'':11} alias of {target}")
        return
    click.echo(hub.pull(name, force=force))


@main.command()
def info():
    """Show the device, the available backends and the downloaded models."""
    import importlib.util

    import torch

    from icd.models import cache, hub

    click.echo(f"icd {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            click.echo(f"device cuda:{i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                       f"compute capability {props.major}.{props.minor}")
    else:
        click.echo("device: cpu (no CUDA GPU visible)")
    backends = ["torch"] + [name for name, module in (("onnx", "onnxruntime"), ("tensorrt", "tensorrt"))
                            if importlib.util.find_spec(module)]
    click.echo(f"backends: {', '.join(backends)}")
    click.echo(f"cache: {cache.icd_home()}")
    installed = hub.installed_models()
    click.echo("models: " + (", ".join(name for name, _ in installed) if installed else "none (run `icd pull sd15`)"))


@main.command()
@click.option("-o", "--output", type=click.Path(file_okay=False), default="icd-demo", show_default=True,
              help="Folder for the demo's files.")
@uses("model", "device", "dtype", "overwrite")
def demo(output, model, device, dtype, overwrite):
    """Invert, edit and reconstruct a sample, offline, and write a before/after picture.

    The default `mini` model ships with icd: it was trained by bench/miniature/recipe.py on a miniature
    world of coloured shapes, and turns a red circle into a blue one. It knows only that world, not
    photos (for those, `icd pull sd15`). Other models edit the bundled photo.
    """
    from .demo import run_demo

    model = model or "mini"
    settings = _settings(_open(model, device, dtype, ("forward", "reverse")), model, 0, None, None, overwrite)
    for path in run_demo(settings, Path(output)):
        click.echo(path)


main.add_command(train)
