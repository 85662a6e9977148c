"""The options several commands share, declared once (`uses` attaches them), with the constants their
defaults and help texts read. ICD_* variables give the defaults of the model, device, dtype and backend
options wherever they appear."""

from __future__ import annotations

import functools
import logging
import math

import click

from icd.editing import (BOUNDS, DEFAULT_AMPLIFY, DEFAULT_CROSS_REPLACE, DEFAULT_SELF_REPLACE, EDIT_DEFAULTS,
                         GENERATE_GUIDANCE, GENERATE_TAU)
from icd.limits import DEFAULT_QUALITY, MAX_SIDE
from icd.models.official import EDIT_METHODS, PRECISION_NAMES
from icd_export.registry import BACKENDS, FASTEST_FIRST

from ..naming import FIELDS, FORMATS, WRITTEN_SUFFIXES, fill

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_MODEL = "sd15"
DEMO_MODEL = "mini"  # `icd demo`'s default, the model that ships with icd

GUIDANCE_HELP = ("Guidance strength w as in the iCD paper: the classical CFG scale minus one, so 0 means the "
                 "prompt alone, without extra guidance.")
TAU_HELP = ("Dynamic guidance: w is used on steps with t/1000 <= tau and 0 on the noisier ones above. "
            "1.0 = guidance on every step.")
STRENGTH_HELP = ("One knob from 0 (the reconstruction of the photo's inversion, as `icd reconstruct` decodes it, on "
                 "every method) to 1 (the strongest edit of the model's defaults: its --guidance on every step, no "
                 "attention map from the source). Each knob moves linearly: --guidance 0 -> the model's, --tau the "
                 "model's -> 1, the p2p windows --cross-replace/--self-replace 1 -> 0, and the share of the edit "
                 "kept 0 -> 1 (the edit leans to the reconstruction after every step). Those options, given too, "
                 "win. Unset: the model's defaults.")


def model_default_help(setting: str) -> str:
    """The help's note on a setting whose default is the model's own (EDIT_DEFAULTS, for SD1.5 and SDXL)."""
    sd15, sdxl = (fill("{v}", {"v": getattr(defaults, setting)}) for defaults in EDIT_DEFAULTS.values())
    return f"Default: the model's own (its icd.json; else SD1.5 {sd15}, SDXL {sdxl})."


class Finite(click.ParamType):
    """A float that is a real number (click's FloatRange lets nan through), within the BOUNDS of `setting`."""

    name = "number"

    def __init__(self, setting: str):
        self.low, self.high = BOUNDS[setting]

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        if not self.low <= number <= self.high:
            self.fail(f"{value} is not in the range {self.low:g}..{self.high:g}" if self.high < math.inf
                      else f"{value} is below {self.low:g}", param, ctx)
        return number


class Several(click.ParamType):
    """A comma list of values of `kind` (one value is a list of one), each value once in the order given: a
    sweep, run from one inversion."""

    def __init__(self, kind: click.ParamType):
        self.kind = kind
        self.name = f"{kind.name}[,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",")]
        if not all(parts):
            self.fail(f"{value!r} has an empty value: give numbers separated by commas, e.g. 5,10,19", param, ctx)
        return tuple(dict.fromkeys(self.kind.convert(part, param, ctx) for part in parts))


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-q: errors only; -v: also debug lines, the libraries' warnings and bars, and tracebacks."""
    if not value:
        return
    level = logging.ERROR if param.name == "quiet" else logging.DEBUG
    if ctx.meta.setdefault("icd.verbosity", level) != level:
        raise click.UsageError("-q and -v cannot be used together")
    logging.getLogger("icd").setLevel(level)


def _remember(key: str):
    """A callback that keeps an option's value, when given, in the context's `meta` under `key`."""
    def callback(ctx: click.Context, param: click.Parameter, value) -> None:
        if value:
            ctx.meta[key] = value

    return callback


def threads_given() -> int | None:
    """The command's --threads, or None (then the model's opening chooses)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("icd.threads") if ctx is not None else None


SWEEP_HELP = " A comma list runs each value from the one inversion (a sweep), e.g. {example}."
NAME_FIELDS_HELP = (", ".join(f"{{{name}}}" for name in FIELDS[:-1]) + " and {n} (the result's number), as far "
                    "as the command knows them; a Python format spec may follow, e.g. {n:03d}")


OPTIONS = {
    "model": click.option("-m", "--model", envvar="ICD_MODEL", show_envvar=True,
                          help=f"A preset name (see `icd pull --list`), `{DEMO_MODEL}`, a model in the cache, or a "
                               "folder/icd.json path (write ./NAME for a folder that shares a preset's name). Default: "
                               f"{DEFAULT_MODEL} (reconstruct: the one recorded in each latent file; demo: "
                               f"{DEMO_MODEL})."),
    "device": click.option("--device", default="auto", show_default=True, envvar="ICD_DEVICE", show_envvar=True,
                           help="auto, cpu, cuda or cuda:N."),
    "dtype": click.option("--dtype", type=click.Choice(("auto", *PRECISION_NAMES)), default="auto",
                          show_default=True, envvar="ICD_DTYPE", show_envvar=True,
                          help="auto = fp16 on a GPU, fp32 on a CPU."),
    "backend": click.option("--backend", type=click.Choice(BACKENDS), default="auto",
                            show_default=True, envvar="ICD_BACKEND", show_envvar=True,
                            help="What runs the UNets, for every edit method. auto: " + ", else ".join(FASTEST_FIRST) +
                                 ", when `icd export` has built their files for this model, else torch."),
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
    "threads": click.option("--threads", type=click.IntRange(min=1), expose_value=False,
                            callback=_remember("icd.threads"),
                            help="CPU threads of torch and ONNX Runtime (one count for both). Default: "
                                 "OMP_NUM_THREADS if set, else the CPUs this process may use (its CPU affinity and "
                                 "cgroup quota). A command run by `icd serve` uses the server's."),
    "no_server": click.option("--no-server", is_flag=True, help="Load the model in this process even when "
                              "`icd serve` serves it."),
    "json": click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (one line per item)."),
    "json_log": click.option("--json-log", type=click.Path(dir_okay=False), expose_value=False,
                             callback=_remember("icd.json_log"), help="Also write every item's JSON record to "
                             "this file (under torchrun or accelerate launch: one file for all processes)."),
    "quiet": click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_verbosity,
                          help="Print nothing but errors."),
    "verbose": click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_verbosity,
                            help="Also print details, the libraries' warnings and the traceback of an unexpected "
                                 "error (so does ICD_DEBUG=1)."),
    # the edit settings that `icd edit` and `icd eval` share
    "method": click.option("--method", type=click.Choice(EDIT_METHODS), help="p2p: Prompt-to-Prompt "
                           "attention control; swap: source prompt on the unguided steps, target on the guided "
                           "ones; none: target prompt only. " + model_default_help("method")),
    "guidance": click.option("--guidance", type=Finite("guidance"), help=GUIDANCE_HELP + " " +
                             model_default_help("guidance")),
    "tau": click.option("--tau", type=Finite("tau"), help=TAU_HELP + " " + model_default_help("tau")),
    "cross_replace": click.option("--cross-replace", type=Finite("cross_replace"), help="p2p: fraction of steps on "
                                  "which the target's cross-attention comes from the source. Default "
                                  f"{DEFAULT_CROSS_REPLACE:g}."),
    "self_replace": click.option("--self-replace", type=Finite("self_replace"), help="p2p: fraction of steps on "
                                 "which the target's self-attention comes from the source. Default "
                                 f"{DEFAULT_SELF_REPLACE:g}."),
    "amplify": click.option("--amplify", multiple=True, metavar="WORD=F", help="p2p: scale a target word's "
                            f"attention by F (repeatable). Default: each new target word x{DEFAULT_AMPLIFY:g}."),
    "strength": click.option("--strength", type=Finite("strength"), help=STRENGTH_HELP + " E.g. --strength 0.7."),
    # the settings `icd edit` sweeps: one value, or several separated by commas
    "guidances": click.option("--guidance", type=Several(Finite("guidance")), help=GUIDANCE_HELP + " " +
                              model_default_help("guidance") + SWEEP_HELP.format(example="--guidance 5,10,19")),
    "taus": click.option("--tau", type=Several(Finite("tau")), help=TAU_HELP + " " + model_default_help("tau") +
                         SWEEP_HELP.format(example="--tau 0.5,0.8")),
    "strengths": click.option("--strength", type=Several(Finite("strength")), help=STRENGTH_HELP +
                              SWEEP_HELP.format(example="--strength 0.25,0.5,0.75")),
    # generation's own defaults
    "generate_guidance": click.option("--guidance", type=Several(Finite("guidance")), default=str(GENERATE_GUIDANCE),
                                      show_default=True, help=GUIDANCE_HELP +
                                      " A comma list generates each seed with each value."),
    "generate_tau": click.option("--tau", type=Several(Finite("tau")), default=str(GENERATE_TAU), show_default=True,
                                 help=TAU_HELP + " A comma list generates each seed with each value."),
    # naming and writing the results, planning only
    "name": click.option("--name", "name_template", metavar="TEMPLATE", help="How to name the results: a "
                         "template of " + NAME_FIELDS_HELP + ", e.g. --name '{stem}-{target}-s{seed}'. Ending "
                         f"in {WRITTEN_SUFFIXES} it also chooses the format. Default: the command's usual names, "
                         "with each value that differs between the results added."),
    "format": click.option("--format", "format_name", type=click.Choice(list(FORMATS),
                           case_sensitive=False), help="The results' image format. Default: each input's own "
                           "(PNG for a format icd does not write; a latent file's: its photo's)."),
    "quality": click.option("--quality", type=click.IntRange(1, 100), help="JPEG and WebP results: their quality, "
                            f"1-100. Default {DEFAULT_QUALITY}."),
    "dry_run": click.option("--dry-run", is_flag=True, expose_value=False, callback=_remember("icd.dry_run"),
                            help="Print the plan (each item, its output and settings) and stop: no model loads, "
                                 "nothing is written."),
}
MODEL_RUN = ("model", "device", "dtype", "backend", "compile", "threads", "width", "height", "output",
             "overwrite", "skip_existing", "json", "json_log", "quiet", "verbose", "no_server", "dry_run")
IMAGE_NAMING = ("name", "format", "quality")


def uses(*names: str):
    """Attach the shared options `names`, in that order in the help."""
    def attach(command):
        return functools.reduce(lambda cmd, name: OPTIONS[name](cmd), reversed(names), command)

    return attach
