"""The `icd` command line: parse, call the library, report. Exit codes: 0 ok, 1 an item failed, 2 usage."""

from __future__ import annotations

import functools
import json
import logging
import math
import secrets
import signal
import sys
import threading
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from icd import __version__
from icd.errors import ICDError, UsageError
from icd.limits import MAX_SEED, MAX_SIDE

if TYPE_CHECKING:
    from icd.models.manifest import Manifest

from .training import train

log = logging.getLogger("icd")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_MODEL = "sd15"

GUIDANCE_HELP = ("Guidance strength w as in the iCD paper: the classical CFG scale minus one, so 0 means the "
                 "prompt alone, without extra guidance.")
TAU_HELP = ("Dynamic guidance: w is used on steps with t/1000 <= tau and 0 on the noisier ones above. "
            "1.0 = guidance on every step.")
MODEL_DEFAULT_HELP = "Default: the model's own (its icd.json; else SD1.5 {sd15}, SDXL {sdxl})."


class Finite(click.ParamType):
    """A float that is a real number (click's FloatRange lets nan through), within optional bounds."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            self.fail(f"{value} is not in the range {self.low:g}..{self.high:g}" if self.high is not None
                      else f"{value} is below {self.low:g}", param, ctx)
        return number


def _quiet_libraries() -> None:
    """Keep stderr for our own progress and errors: silence the libraries' bars, notices and warnings
    (all shown with -v)."""
    if _verbose():
        return
    import diffusers
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    disable_progress_bars()
    warnings.simplefilter("ignore")


class _OneLineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from .batch import stderr_line

        stderr_line(f"icd: {record.levelname.lower()}: {record.getMessage()}")


def _setup_logging() -> None:
    log = logging.getLogger("icd")
    if not log.handlers:
        log.addHandler(_OneLineHandler())
        log.propagate = False
    log.setLevel(logging.INFO)


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-q: errors only; -v: also debug lines, the libraries' warnings and bars, and tracebacks."""
    if not value:
        return
    level = logging.ERROR if param.name == "quiet" else logging.DEBUG
    if ctx.meta.setdefault("icd.verbosity", level) != level:
        raise click.UsageError("-q and -v cannot be used together")
    logging.getLogger("icd").setLevel(level)


def _quiet() -> bool:
    return not logging.getLogger("icd").isEnabledFor(logging.WARNING)


def _verbose() -> bool:
    return logging.getLogger("icd").isEnabledFor(logging.DEBUG)


def _open(model_ref: str | Manifest, device: str, dtype: str, directions: tuple[str, ...] = (),
          backend: str = "auto", compile: bool = False, static_shapes: bool = False):
    """The session for a model; a failure here ends the command with one line (via `Main`). Under
    `accelerate launch` or `torchrun`, `auto` means this process's own GPU."""
    from .distributed import local_device
    from .session import open_session

    _quiet_libraries()
    return open_session(model_ref, local_device(device), dtype, backend, compile, static_shapes, directions)


def _finish(items, work, as_json: bool) -> None:
    """Run this process's share of the planned items (all of them, unless several processes were launched:
    each plans the whole batch, so names agree, and runs every world-th item), write the --json-log, and
    exit with the batch's code."""
    from .batch import run
    from .distributed import merge_json_log, process_share

    ctx = click.get_current_context()
    log_path = ctx.meta.get("icd.json_log")
    if log_path and Path(log_path).exists() and not ctx.params.get("overwrite"):
        raise UsageError(f"--json-log {log_path} exists (use --overwrite to replace it)")
    report = run(process_share(items), work, as_json=as_json, quiet=_quiet())
    if log_path:
        merge_json_log(log_path, report.records)
    sys.exit(report.exit_code)


def _remember_json_log(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["icd.json_log"] = value


# Every option that several commands share, declared once; `uses(...)` attaches them. ICD_* variables give
# the defaults of the model, device, dtype and backend options wherever they appear.
OPTIONS = {
    "model": click.option("-m", "--model", envvar="ICD_MODEL", show_envvar=True,
                          help=f"A preset name (see `icd pull --list`), `mini`, a model in the cache, or a folder/"
                               f"icd.json path (write ./NAME for a folder that shares a preset's name). Default: "
                               f"{DEFAULT_MODEL} (reconstruct: the one recorded in each latent file; demo: mini)."),
    "device": click.option("--device", default="auto", show_default=True, envvar="ICD_DEVICE", show_envvar=True,
                           help="auto, cpu, cuda or cuda:N."),
    "dtype": click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto",
                          show_default=True, envvar="ICD_DTYPE", show_envvar=True,
                          help="auto = fp16 on a GPU, fp32 on a CPU."),
    "backend": click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "tensorrt"]), default="auto",
                            show_default=True, envvar="ICD_BACKEND", show_envvar=True,
                            help="What runs the UNets, for every edit method. auto: TensorRT, else ONNX Runtime, when "
                                 "`icd export` has built their files for this model, else torch."),
    "compile": click.option("--compile", is_flag=True, help="torch backend: torch.compile the UNets (slow first "
                            "item; with CUDA graphs when --width and --height fix the size)."),
    "width": click.option("--width", type=click.IntRange(8, MAX_SIDE), help="Working width in pixels (a multiple "
                          "of 64 for SD1.5, 32 for SDXL). Default: keep the aspect ratio at the model's resolution."),
    "height": click.option("--height", type=click.IntRange(8, MAX_SIDE), help="Working height in pixels."),
    "output": click.option("-o", "--output", type=click.Path(), help="Output file for one result, folder for "
                           "several. Default: the current folder."),
    "overwrite": click.option("--overwrite", is_flag=True, help="Replace existing output files."),
    "skip_existing": click.option("--skip-existing", is_flag=True, help="Leave items whose output exists, "
                                  "e.g. to finish an interrupted batch."),
    "no_server": click.option("--no-server", is_flag=True, help="Load the model in this process even when "
                              "`icd serve` serves it."),
    "json": click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (one line per item)."),
    "json_log": click.option("--json-log", type=click.Path(dir_okay=False), expose_value=False,
                             callback=_remember_json_log, help="Also write every item's JSON record to this file "
                             "(under torchrun or accelerate launch: one file for all processes)."),
    "quiet": click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_verbosity,
                          help="Print nothing but errors."),
    "verbose": click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_verbosity,
                            help="Also print details, the libraries' warnings and the traceback of an unexpected "
                                 "error (so does ICD_DEBUG=1)."),
}
MODEL_RUN = ("model", "device", "dtype", "backend", "compile", "width", "height", "output", "overwrite",
             "skip_existing", "json", "json_log", "quiet", "verbose", "no_server")


def uses(*names: str):
    """Attach the shared options `names`, in that order in the help."""
    def attach(command):
        return functools.reduce(lambda cmd, name: OPTIONS[name](cmd), reversed(names), command)

    return attach


def _settings(runner, model_ref, seed, width, height, overwrite):
    from .jobs import Settings

    return Settings(runner=runner, model_ref=model_ref, seed=seed, width=width, height=height, overwrite=overwrite)


def _runner(manifest: Manifest, device: str, dtype: str, directions: tuple[str, ...], backend: str, compile: bool,
            static_shapes: bool = False, no_server: bool = False):
    """What runs the jobs: a running `icd serve` of this model, device and dtype (said once), falling back to
    this process if it goes away; else, or with --no-server, the model opened here."""
    from .runner import LocalRunner

    def open_here():
        return LocalRunner(_open(manifest, device, dtype, directions, backend, compile, static_shapes))

    if not no_server:
        from .client import FallbackRunner, find_server
        from .distributed import local_device

        remote = find_server(manifest, local_device(device), dtype, backend, compile)
        if remote is not None:
            log.info("using the server at %s", remote.path)
            return FallbackRunner(remote, open_here)
    return open_here()


def _check_output(output: str | None, count: int, *, latent: bool = False) -> None:
    """-o must name what the command writes: an image (or a latent file for invert), or a folder."""
    if output is None:
        return
    from icd.images import OUTPUT_SUFFIXES
    from icd.latents import LATENT_NAME, LATENT_SUFFIX

    path = Path(output)
    names_file = path.suffix.lower() in OUTPUT_SUFFIXES or output.endswith(LATENT_SUFFIX)
    if latent and names_file and not output.endswith(LATENT_NAME):
        raise UsageError(f"-o {output}: invert writes latent files: name one NAME{LATENT_NAME}, or a folder")
    if not latent and output.endswith(LATENT_SUFFIX):
        raise UsageError(f"-o {output}: this command writes images: name a .png, .jpg or .webp file, or a folder")
    if not names_file and path.suffix and not path.is_dir() and path.suffix.lower()[1:].isalpha() \
            and len(path.suffix) <= 5:
        raise UsageError(f"-o {output}: unknown image format {path.suffix!r} (use .png, .jpg, .jpeg or .webp, "
                         "or name a folder)")
    if names_file and count > 1:
        raise UsageError(f"-o {output} names one file, but there are {count} results: give a folder")
    if path.is_file() and not names_file:
        raise UsageError(f"-o {output} is a file: give a folder for the results")


def _resolve(model_ref: str) -> Manifest:
    """The model's manifest: cheap (no weights), so every later check can use it before anything loads."""
    from icd.models.hub import resolve_model

    return resolve_model(model_ref)


def _check_size(manifest: Manifest, width: int | None, height: int | None) -> None:
    from icd.images import check_multiple
    from icd.models.geometry import size_multiple

    multiple = size_multiple(manifest)
    if multiple is not None:
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                check_multiple(name, value, multiple)


def _check_engine(device: str, dtype: str, backend: str, compile: bool, server_may_check: bool = False) -> None:
    """The backend options fit together, and the device exists and takes the dtype. That takes torch, which a
    command served by `icd serve` never imports: with `server_may_check` and a server's socket present, the
    device and dtype are left to the server's check (a server that cannot take them is not used) and to the
    model's opening in this process."""
    if compile and backend in ("onnx", "tensorrt"):
        raise UsageError(f"--compile applies to the torch backend, not --backend {backend}")
    if server_may_check:
        from .server import sockets

        if sockets():
            return
    from icd.models.loading import resolve_device, resolve_dtype

    from .distributed import local_device

    resolve_dtype(dtype, resolve_device(local_device(device)))


class Main(click.Group):
    """The `icd` group: the one place where errors become their line on stderr and an exit code
    (2 usage, 1 failure, 130/143 interrupted), and where SIGTERM unwinds like Ctrl-C, so that no
    temporary file outlives a killed run."""

    def invoke(self, ctx: click.Context):
        from .batch import debugging, discard_stdout, error_line, out_of_memory

        previous = _on_sigterm()
        log = logging.getLogger("icd")
        logging_state = (log.level, log.propagate, list(log.handlers))
        # File names are bytes: one that is not UTF-8 (a str with surrogate escapes) is printed as it is, as ls does.
        stdout_errors = _print_names_as_bytes()
        try:
            return super().invoke(ctx)
        except UsageError as err:
            error_line(str(err))
            ctx.exit(2)
        except click.UsageError as err:  # click's own: one line too, with where to find help
            path = err.ctx.command_path if err.ctx else "icd"
            error_line(f"{err.format_message()} (see `{path} -h`)")
            ctx.exit(2)
        except ICDError as err:
            error_line(str(err))
            ctx.exit(1)
        except _Terminated:
            error_line("terminated: no result was left half-written")
            ctx.exit(143)
        except KeyboardInterrupt:
            error_line("interrupted: no result was left half-written")
            ctx.exit(130)
        except BrokenPipeError:  # the reader of stdout has gone (`icd info | head -1`): as git or cat would
            discard_stdout()
            ctx.exit(141)  # 128 + SIGPIPE
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as err:  # the last wall: one line, the traceback only when asked for
            if memory := out_of_memory(err):
                error_line(memory)
                ctx.exit(1)
            if debugging():
                traceback.print_exc(file=sys.stderr)
            error_line(f"unexpected {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                       + ("" if debugging() else " (run with -v or ICD_DEBUG=1 for the traceback)"))
            ctx.exit(1)
        finally:
            _restore_sigterm(previous)
            _print_names_as_bytes(stdout_errors)
            log.setLevel(logging_state[0])  # a caller in Python (a test, a script) gets its logging back
            log.propagate, log.handlers[:] = logging_state[1], logging_state[2]


def _print_names_as_bytes(errors: str = "surrogateescape") -> str | None:
    """Set stdout's error handler (when it has one to set); returns the one it had."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    previous = getattr(sys.stdout, "errors", None)
    if reconfigure is not None and errors is not None:
        reconfigure(errors=errors)
    return previous


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every cleanup on the way out runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _on_sigterm():
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _raise_terminated)
    return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


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
      icd edit --from photo-edit.png --tgt "a wolf"   # rerun an edit with one thing changed
      icd generate "a lighthouse at dusk" -n 4 -o out/
      icd demo                                        # offline, with the shipped mini model

    Exit codes: 0 done, 1 an item or the model failed (the rest of a batch still runs), 2 a usage error
    (found before anything loads), 130/143 interrupted.
    """
    _setup_logging()


def _rerun_defaults(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--from IMAGE: the parameters recorded in a result of `icd edit` become this run's defaults (options given
    on the command line still win), and its input the input when none is named."""
    if value is None:
        return None
    from icd.images import read_metadata

    try:
        recorded = read_metadata(value)
    except ICDError as err:
        raise click.BadParameter(str(err), ctx, param) from None
    if recorded.get("command") != "edit":
        raise click.BadParameter(f"{value} holds no parameters of `icd edit`", ctx, param)
    names = {"source": "source_prompt", "targets": "prompt", "method": "method", "guidance": "guidance_w",
             "tau": "tau", "seeds": "seed", "cross_replace": "cross_replace", "self_replace": "self_replace",
             "amplify": "amplify", "blend": "blend", "model": "model", "dtype": "dtype", "backend": "backend",
             "width": "width", "height": "height", "mask": "mask", "keep_outside": "keep_outside",
             "strength": "strength"}
    defaults = {option: recorded[key] for option, key in names.items() if recorded.get(key) is not None}
    defaults |= {option: [defaults[option]] for option in ("targets", "seeds") if option in defaults}
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["icd.rerun_input"] = recorded.get("source")
    return value


@main.command()
@click.argument("inputs", nargs=-1)
@click.option("--src", "source", help="Prompt describing the input photo (not needed for latent files).")
@click.option("--tgt", "targets", multiple=True, help="Prompt describing the wanted result (required). Repeatable: "
              "one output per target, NAME-edit-<target>.png, all from one inversion.")
@click.option("--method", type=click.Choice(["p2p", "swap", "none"]), help="p2p: Prompt-to-Prompt attention "
              "control; swap: source prompt on the unguided steps, target on the guided ones; none: target prompt "
              "only. " + MODEL_DEFAULT_HELP.format(sd15="p2p", sdxl="swap"))
@click.option("--guidance", type=Finite(0), help=GUIDANCE_HELP + " " + MODEL_DEFAULT_HELP.format(sd15="19",
                                                                                                  sdxl="19"))
@click.option("--tau", type=Finite(0, 1), help=TAU_HELP + " " + MODEL_DEFAULT_HELP.format(sd15="0.8", sdxl="0.7"))
@click.option("--seed", "seeds", type=click.IntRange(0, MAX_SEED), multiple=True,
              help="Seed of the noise added before encoding (default 0). Repeatable: one output per seed, "
                   "NAME-edit-s<seed>.png.")
@click.option("-n", "--count", type=click.IntRange(1, 10_000), help="Edit with N seeds: --seed, --seed+1, ...")
@click.option("--cross-replace", type=Finite(0, 1), help="p2p: fraction of steps on which the target's "
              "cross-attention comes from the source. Default 0.3.")
@click.option("--self-replace", type=Finite(0, 1), help="p2p: fraction of steps on which the target's "
              "self-attention comes from the source. Default 0.6.")
@click.option("--amplify", multiple=True, metavar="WORD=F", help="p2p: scale a target word's attention by F "
              "(repeatable). Default: each new target word x4.")
@click.option("--mask-words", "--blend", "blend", metavar="SRC_WORDS:TGT_WORDS", help="p2p: change only where "
              "these words attend (LocalBlend), e.g. --mask-words pug:bear (--blend is the older name). The map "
              "is as coarse as the UNet's attention (16x16 at 512 px, 4x4 on mini); icd says when it selects "
              "nothing or everything.")
@click.option("--mask", type=click.Path(dir_okay=False), metavar="FILE", help="Any method: a picture of where the "
              "edit may act: white changes, grey partly, black keeps (resized to the image). After every step the "
              "latent outside it is the source's at that step.")
@click.option("--keep-outside/--no-keep-outside", default=None, help="With --mask: the pixels outside the mask "
              "are the input photo's own (the mask feathered inwards by 2 working pixels). Default: on.")
@click.option("--save-mask", type=click.Path(), metavar="PATH", help="Write the map the edit was "
              "confined to (--mask or --mask-words, on the latent grid) as a PNG of the image's size: a .png file "
              "for one result, else a folder (NAME-edit...-mask.png in it).")
@click.option("--strength", type=Finite(0, 1), help="One knob from 0 (keep the photo) to 1 (follow the target): "
              "moves --guidance (0 up to the model's default at 0.5), --tau (0 -> the model's -> 1) and the p2p "
              "windows --cross-replace/--self-replace (1 -> 0.3/0.6 -> 0) together; 0.5 is the model's defaults. "
              "Those options, given too, win. E.g. --strength 0.7.")
@click.option("--from", "from_image", metavar="IMAGE", is_eager=True, callback=_rerun_defaults,
              help="Rerun the edit recorded in a result of `icd edit`: its input, prompts and every setting, "
                   "unless given here.")
@click.option("--jobs", "jobs_file", type=click.Path(dir_okay=False), help="A job file: JSON lines or CSV with "
              "one edit per row (image, source, target, seed, method, guidance, tau, strength, mask_words (or "
              "blend), amplify, mask, keep_outside, output; paths relative to the file; default output "
              "NAME-edit-<target>-s<seed>.png in -o), all checked before the model loads.")
@uses(*MODEL_RUN)
def edit(inputs, source, targets, method, guidance, tau, seeds, count, cross_replace, self_replace, amplify, blend,
         mask, keep_outside, save_mask, strength, from_image, jobs_file, model, device, dtype, backend, compile, width,
         height, output, overwrite, skip_existing, as_json, no_server):
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
      icd edit cat.png --src "a cat on a sofa" --tgt "a tiger on a sofa" --mask-words cat:tiger
      icd edit cat.png --src "a cat on a sofa" --tgt "a tiger on a sofa" --mask cat-mask.png
      icd edit cat.png --src "a cat" --tgt "a tiger" --strength 0.8 --save-mask used.png
      icd edit photos/*.jpg --src "a dog" --tgt "a wolf" --method none -o wolves/
      icd edit photo.jpg --src "a pug" --tgt "a bear" --tgt "a lion" -n 3 -o variants/
      icd edit --jobs edits.jsonl -o out/
      icd edit --from photo-edit.png --guidance 12 -o stronger.png
    """
    from icd.editing import edit_settings
    from icd.latents import LATENT_SUFFIX

    from . import planning
    from .batch import plan
    from .jobs import IMAGE_SUFFIXES, EditOptions, check_edit, check_input, expand_inputs, needs_inversion

    ctx = click.get_current_context()
    masks = {}  # each mask file's values, read once in the checks and used by the run
    if keep_outside is not None and not mask and _given_here(ctx, "keep_outside"):
        raise UsageError(f"--{'' if keep_outside else 'no-'}keep-outside applies with --mask")
    if save_mask and not (mask or blend) and not jobs_file:
        raise UsageError("--save-mask needs --mask or --mask-words: nothing else confines an edit")
    if jobs_file:
        given = [flag for flag, value in (("INPUTS", inputs), ("--src", source), ("--tgt", targets),
                                          ("--seed", seeds), ("-n", count), ("--mask", mask),
                                          ("--save-mask", save_mask), ("--strength", strength))
                 if value is not None and value != ()]
        if given:
            raise UsageError(f"--jobs {jobs_file} holds the inputs, prompts and seeds: drop {', '.join(given)}")
        _check_output(output, 2)
        _check_engine(device, dtype, backend, compile, not no_server)
        model = model or DEFAULT_MODEL
        manifest = _resolve(model)
        _check_size(manifest, width, height)
        items = planning.edit_job_items(jobs_file, manifest, output)
        paths = [item.source for item in items]
    else:
        rerun_input = ctx.meta.get("icd.rerun_input")
        if not inputs and rerun_input:
            inputs = (rerun_input,)
        if not inputs:
            raise UsageError("no INPUTS: name image or latent files, folders or globs")
        if not targets:
            raise UsageError("--tgt is required: the prompt describing the wanted result")
        seeds = planning.seeds_to_run(seeds, count)
        paths = expand_inputs(list(inputs), IMAGE_SUFFIXES | {LATENT_SUFFIX})
        images = [path for path in paths if needs_inversion([path])]
        if images and not source:
            raise UsageError(f"--src is needed to edit images ({images[0]}); latent files carry their own prompt")
        if not images and (width or height):
            raise UsageError("--width/--height apply to images: a latent file keeps the size it was inverted at")
        targets = tuple(dict.fromkeys(targets))
        _check_output(output, len(targets) * (len(images) * len(seeds) + len(paths) - len(images)))
        _check_engine(device, dtype, backend, compile, not no_server)
        amplified, blended = _parse_amplify(amplify), _parse_blend(blend)
        mask_path = planning.checked_mask(mask, masks)
        model = model or DEFAULT_MODEL
        manifest = _resolve(model)
        _check_size(manifest, width, height)
        method = edit_settings(manifest, method).method
        p2p_given = [flag for flag, value in (("--cross-replace", cross_replace), ("--self-replace", self_replace),
                                              ("--amplify", amplify), ("--mask-words/--blend", blend)) if value]
        if p2p_given and method != "p2p":
            raise UsageError(f"{', '.join(p2p_given)} apply to --method p2p, not {method}")
        knobs = _knobs(ctx, manifest, strength, guidance=guidance, tau=tau, cross_replace=cross_replace,
                       self_replace=self_replace)
        config = replace(knobs["p2p"], amplify=amplified, blend=blended)
        options = [EditOptions(source, target, method, knobs["guidance"], knobs["tau"], config, mask_path,
                               keep_outside is not False, strength=strength) for target in targets]
        items = planning.with_mask_outputs(planning.edit_items(paths, output, options, seeds), save_mask)

    def check(item):
        check_input(item.source, manifest, model)
        check_edit(item.job[1], paths, overwrite, masks)

    items = plan(items, paths, overwrite=overwrite, skip_existing=skip_existing, check=check)
    if not any(item.runnable for item in items):
        _finish(items, None, as_json)
    directions = ("forward", "reverse") if needs_inversion(paths) else ("reverse",)
    settings = _settings(_runner(manifest, device, dtype, directions, backend, compile, bool(width and height),
                                 no_server), model, 0, width, height, overwrite)
    settings.masks.update(masks)
    _finish(planning.by_inversion(items), lambda item: _edit_one(settings, item), as_json)


def _given_here(ctx: click.Context, name: str) -> bool:
    """Whether an option came from this command line (or its ICD_* variable), not from a --from record."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _knobs(ctx: click.Context, manifest, strength: float | None, **given) -> dict:
    """guidance, tau and p2p's windows: each option as given, the rest from --strength (a --from record's
    knobs give way to a --strength given here), else the defaults."""
    from icd.editing import P2PConfig, edit_settings, strength_settings

    if strength is not None:
        if _given_here(ctx, "strength"):
            given = {name: value if _given_here(ctx, name) else None for name, value in given.items()}
        return strength_settings(manifest, strength, **given)
    defaults, windows = edit_settings(manifest, None, given["guidance"], given["tau"]), P2PConfig()
    return {"guidance": defaults.guidance, "tau": defaults.tau,
            "p2p": P2PConfig(cross_replace=windows.cross_replace if given["cross_replace"] is None
                             else given["cross_replace"],
                             self_replace=windows.self_replace if given["self_replace"] is None
                             else given["self_replace"])}


def _edit_one(settings, item):
    from . import jobs

    seed, options = item.job
    return jobs.edit_file(replace(settings, seed=seed), item.source, options, item.output)


def _parse_amplify(values) -> dict[str, float] | None:
    from .jobfile import parse_amplify

    try:
        return parse_amplify(values)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--amplify") from None


def _parse_blend(value: str | None):
    from .jobfile import parse_blend

    try:
        return parse_blend(value)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--mask-words") from None


@main.command()
@click.argument("images", nargs=-1)
@click.option("--prompt", help="Prompt describing the photos (the source prompt of later edits). Default: each "
              "image's caption in the metadata.jsonl of its folder (Hugging Face style: file_name, text).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the noise added before encoding.")
@click.option("--jobs", "jobs_file", type=click.Path(dir_okay=False), help="A job file: JSON lines or CSV with "
              "one inversion per row (image, source, seed, output; paths relative to the file).")
@uses(*MODEL_RUN)
def invert(images, prompt, seed, jobs_file, model, device, dtype, backend, compile, width, height, output,
           overwrite, skip_existing, as_json, no_server):
    """Encode photos into latent files (x_T plus metadata) for fast repeated edits.

    \b
    Examples:
      icd invert photo.jpg --prompt "a pug on the grass"
      icd edit photo.latent.safetensors --tgt "a bear on the grass"
      icd invert photos/ -o latents/                  # captions from photos/metadata.jsonl
    """
    from icd.images import probe_image

    from .batch import Item, file_items, plan
    from .jobfile import InvertJob, read_jobs
    from icd.latents import LATENT_NAME

    from .jobs import IMAGE_SUFFIXES, expand_inputs, invert_file, output_path, output_stem

    if jobs_file:
        if images or prompt:
            raise UsageError(f"--jobs {jobs_file} holds the images and prompts: drop "
                             f"{', '.join(flag for flag, value in (('IMAGES', images), ('--prompt', prompt)) if value)}")
        folder = Path(jobs_file).parent
        items = [Item(f"{jobs_file} row {number}", folder / job.image,
                      folder / job.output if job.output else
                      output_path(output, output_stem(folder / job.image) + LATENT_NAME, True),
                      job=(job.seed, job.source)) for number, job in read_jobs(jobs_file, InvertJob)]
    else:
        if not images:
            raise UsageError("no IMAGES: name image files, folders or globs (or give --jobs FILE)")
        paths = expand_inputs(list(images), IMAGE_SUFFIXES)
        items = file_items(paths, output, lambda path: path.stem + LATENT_NAME)
        for item in items:
            item.job = (seed, prompt)
    _check_output(output, max(len(items), 2 if jobs_file else 1), latent=True)
    _captions(items)
    _check_engine(device, dtype, backend, compile, not no_server)
    model = model or DEFAULT_MODEL
    manifest = _resolve(model)
    _check_size(manifest, width, height)
    items = plan(items, [item.source for item in items], overwrite=overwrite, skip_existing=skip_existing,
                 check=lambda item: probe_image(item.source))
    if not any(item.runnable for item in items):
        _finish(items, None, as_json)
    settings = _settings(_runner(manifest, device, dtype, ("forward",), backend, compile, bool(width and height),
                                 no_server), model, seed, width, height, overwrite)

    def work(item):
        item_seed, item_prompt = item.job
        return invert_file(replace(settings, seed=item_seed), item.source, item_prompt, item.output), []

    _finish(items, work, as_json)


def _captions(items) -> None:
    """Give each item without a prompt its caption from its folder's metadata.jsonl; none is a usage error."""
    from .jobfile import CAPTIONS_NAME, captions

    folders: dict[Path, dict[str, str]] = {}
    for item in items:
        seed, prompt = item.job
        if prompt:
            continue
        folder = item.source.parent
        if folder not in folders:
            folders[folder] = captions(folder)
        caption = folders[folder].get(item.source.name)
        if caption is None:
            raise UsageError(f"{item.label}: no --prompt, and no caption for {item.source.name} in "
                             f"{folder / CAPTIONS_NAME}")
        item.job = (seed, caption)


@main.command()
@click.argument("latents", nargs=-1, required=True)
@uses("model", "device", "dtype", "backend", "compile", "output", "overwrite", "skip_existing", "json", "json_log",
      "quiet", "verbose", "no_server")
def reconstruct(latents, model, device, dtype, backend, compile, output, overwrite, skip_existing, as_json,
                no_server):
    """Decode latent files back into images with their own prompt and w = 0 (the faithful inversion)."""
    from icd.latents import LATENT_SUFFIX, read_latent_info

    from .batch import file_items, plan
    from .jobs import check_latent, expand_inputs, output_stem, reconstruct_file

    paths = expand_inputs(list(latents), {LATENT_SUFFIX})
    _check_output(output, len(paths))
    _check_engine(device, dtype, backend, compile, not no_server)
    refs: dict[Path, str] = {}  # each latent's model: -m, else the one it records
    runners: dict[str, object] = {}  # one per model, found or opened at its first item

    def check(item):
        refs[item.source] = model or read_latent_info(item.source).model
        check_latent(item.source, _resolve(refs[item.source]), refs[item.source])

    items = plan(file_items(paths, output, lambda path: f"{output_stem(path)}-recon.png"), paths,
                 overwrite=overwrite, skip_existing=skip_existing, check=check)

    def work(item):
        model_ref = refs[item.source]
        if model_ref not in runners:
            runners[model_ref] = _runner(_resolve(model_ref), device, dtype, ("reverse",), backend, compile,
                                         no_server=no_server)
        settings = _settings(runners[model_ref], model_ref, 0, None, None, overwrite)
        return reconstruct_file(settings, item.source, item.output), []

    _finish(items, work, as_json)


@main.command()
@click.argument("prompt")
@click.option("-n", "--count", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="Number of images.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), help="Seed of the first image (the next ones use seed+1, "
              "...). Default: random.")
@click.option("--guidance", type=Finite(0), default=7.0, show_default=True, help=GUIDANCE_HELP)
@click.option("--tau", type=Finite(0, 1), default=1.0, show_default=True, help=TAU_HELP)
@uses(*MODEL_RUN)
def generate(prompt, count, seed, guidance, tau, model, device, dtype, backend, compile, width, height, output,
             overwrite, skip_existing, as_json, no_server):
    """Generate images from a prompt in the model's 3-4 steps.

    \b
    Example:
      icd generate "a lighthouse at dusk, oil painting" -n 4 -o out/
    """
    from .batch import Item, plan
    from .jobs import generate_file, output_path, slug
    from .planning import seeds_to_run

    _check_output(output, count)
    _check_engine(device, dtype, backend, compile, not no_server)
    seeds = seeds_to_run((secrets.randbelow(2**31) if seed is None else seed,), count)
    model = model or DEFAULT_MODEL
    manifest = _resolve(model)
    _check_size(manifest, width, height)
    items = plan([Item(f"seed {s}", s, output_path(output, f"{slug(prompt)}-{s}.png", count > 1))
                  for s in seeds], [], overwrite=overwrite, skip_existing=skip_existing)
    if not any(item.runnable for item in items):
        _finish(items, None, as_json)
    runner = _runner(manifest, device, dtype, ("reverse",), backend, compile, static_shapes=True, no_server=no_server)
    settings = _settings(runner, model, seeds[0], width, height, overwrite)
    _finish(items, lambda item: (generate_file(settings, prompt, item.source, guidance, tau, item.output), []),
            as_json)


@main.command()
@uses("model")
@click.option("--device", "devices", multiple=True, default=("auto",), show_default=True, envvar="ICD_DEVICE",
              show_envvar=True, help="auto, cpu, cuda or cuda:N; repeat it (e.g. --device cuda:0 --device cuda:1) "
                                     "for one worker with its own copy of the model per device, behind the one "
                                     "socket.")
@uses("dtype", "backend", "compile")
@click.option("--status", is_flag=True, help="Describe the running servers and their workers (exit 1 when there "
              "is none).")
@click.option("--stop", is_flag=True, help="Stop the running server (of -m, when several run).")
@uses("quiet", "verbose")
def serve(model, devices, dtype, backend, compile, status, stop):
    """Hold a model in memory and run the jobs of every `icd` command of this user, so that a shell loop of
    `icd edit` calls pays the model's start-up once.

    Commands use a server of the same model, device and dtype by themselves (and say so), and go on in their
    own process if it stops; --no-server opts out. The socket is $ICD_HOME/serve/<model>-<devices>-<dtype>.sock
    (devices joined by +), for its owner only. Ctrl-C or SIGTERM ends the server after the jobs in flight.
    Jobs of several clients that wait together and share an operation and size (invert, reconstruct,
    generate) run as one batch.

    \b
    Examples:
      icd serve -m mini &
      for f in scenes/*.png; do icd edit "$f" -m mini --src "a red circle" --tgt "a blue circle"; done
      icd serve --status
      icd serve --stop
      icd serve -m sd15 --device cuda:0 --device cuda:1 &
    """
    from icd.models.loading import PRECISIONS, resolve_device, resolve_dtype

    from .client import running_servers, stop_server
    from .server import ProcessWorker, Server, clear_stale, serve_folder, socket_path

    if status and stop:
        raise UsageError("--status and --stop cannot be used together")
    if status or stop:
        found = running_servers()
        live = [(path, facts) for path, facts in found if facts is not None]
        if status:
            for path, facts in found:
                click.echo(f"{path}: " + ("stale (no server answers; the next `icd serve` replaces it)"
                                          if facts is None else _served(facts)))
        if not live:
            raise ICDError(f"no server is running (in {serve_folder()})")
        if stop:
            if model:
                fingerprint = _resolve(model).fingerprint
                live = [(path, facts) for path, facts in live if facts["fingerprint"] == fingerprint]
                if not live:
                    raise ICDError(f"no server of model '{model}' is running")
            if len(live) > 1:
                raise UsageError(f"{len(live)} servers are running: name the one to stop with -m (see "
                                 "`icd serve --status`)")
            path, facts = live[0]
            stop_server(path, facts)
            if not _quiet():
                click.echo(f"stopped the server at {path}")
        return
    for device in devices:
        _check_engine(device, dtype, backend, compile)
    model = model or DEFAULT_MODEL
    manifest = _resolve(model)
    torch_devices = [resolve_device(device) for device in devices]
    precisions = [PRECISIONS[resolve_dtype(dtype, device)] for device in torch_devices]
    if len(set(precisions)) > 1:
        raise UsageError(f"--dtype {dtype} means {', '.join(precisions)} on {', '.join(devices)}: one server runs "
                         "one precision, name it with --dtype")
    path = socket_path(manifest.name, torch_devices, precisions[0])
    clear_stale(path)
    open_runner = functools.partial(_serve_runner, manifest, dtype, backend, compile,
                                    logging.getLogger("icd").getEffectiveLevel())
    others = [ProcessWorker(device, open_runner) for device in devices[1:]]  # loading while this process does
    try:
        Server(open_runner(devices[0]), model, compile, path, others).serve(ready=lambda line: click.echo(line))
    finally:
        for worker in others:
            worker.close()


def _serve_runner(manifest: Manifest, dtype: str, backend: str, compile: bool, level: int, device: str):
    """One worker's model for `icd serve`, in the server's process or in a worker process of its own (spawned:
    it sets up the server's logging again)."""
    from .runner import LocalRunner

    _setup_logging()
    logging.getLogger("icd").setLevel(level)
    return LocalRunner(_open(manifest, device, dtype, ("forward", "reverse"), backend, compile))


def _served(facts: dict) -> str:
    from .server import describe, describe_worker

    return "\n".join([f"{describe(facts)}, pid {facts['pid']}",
                      *(f"  {describe_worker(number, worker)}" for number, worker in enumerate(facts["workers"], 1))])


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
@click.option("--verify", is_flag=True, help="Check every existing file against the hash recorded when it was "
              "built (reads them whole), and rebuild what differs.")
@uses("json", "quiet", "verbose")
def export_command(model, device, precisions, onnx, tensorrt, sizes, max_batch, force, verify, as_json):
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
    from icd.models.hub import resolve_model
    from icd.models.loading import resolve_device
    from icd_export.artifacts import artifacts_dir
    from icd_export.build import export_model

    _quiet_libraries()
    manifest = resolve_model(model or DEFAULT_MODEL)
    torch_device = resolve_device(device)
    chosen = precisions or (("fp16",) if torch_device.type == "cuda" else ("fp32",))
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
@uses("json", "quiet", "verbose")
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
@click.option("--list", "show_list", is_flag=True, help="List the presets and every model that runs offline "
              "(shipped, pulled or built), with their sizes.")
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
    click.echo(hub.pull(name, force=force))


def _bytes(size: float) -> str:
    """A size for people: 812 B, 4.1 MB, 2.3 GB."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            break
        size /= 1000
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


@main.command()
def info():
    """Show the device, the available backends and every model that runs offline."""
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
    offline = hub.available_models()
    click.echo("models: " + ", ".join(f"{entry.name} ({entry.source}, {_bytes(entry.size_bytes)})" for entry in offline))


@main.command()
@click.option("-o", "--output", type=click.Path(file_okay=False), default="icd-demo", show_default=True,
              help="Folder for the demo's files.")
@uses("model", "device", "dtype", "overwrite", "quiet", "verbose")
def demo(output, model, device, dtype, overwrite):
    """Invert, edit and reconstruct a sample, offline, and write a before/after picture.

    The default `mini` model ships with icd: it was trained by bench/miniature/recipe.py on a miniature
    world of coloured shapes, and turns a red circle into a blue one. It knows only that world, not
    photos (for those, `icd pull sd15`). Other models edit the bundled photo.
    """
    from .demo import run_demo

    from .runner import LocalRunner

    model = model or "mini"
    settings = _settings(LocalRunner(_open(model, device, dtype, ("forward", "reverse"))), model, 0, None, None,
                         overwrite)
    for path in run_demo(settings, Path(output)):
        if not _quiet():
            click.echo(path)


main.add_command(train)
