"""The options several commands share, declared once (`uses` attaches them), with the constants their
defaults and help texts read. ICD_* variables give the defaults of the model, device, dtype and backend
options wherever they appear."""

from __future__ import annotations

import functools
import logging
import math

import click

from icd.core.schedule import MAX_SEED
from icd.editing import (DEFAULT_CROSS_REPLACE, DEFAULT_SELF_REPLACE, EDIT_DEFAULTS, GENERATE_GUIDANCE,
                         GENERATE_TAU)
from icd_export.registry import BACKENDS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_MODEL = "sd15"
MAX_SIDE = 8192  # pixels: beyond this a working size is a typo, not a photo

GUIDANCE_HELP = ("Guidance strength w as in the iCD paper: the classical CFG scale minus one, so 0 means the "
                 "prompt alone, without extra guidance.")
TAU_HELP = ("Dynamic guidance: w is used on steps with t/1000 <= tau and 0 on the noisier ones above. "
            "1.0 = guidance on every step.")


def model_default_help(setting: str) -> str:
    """The help's note on a setting whose default is the model's own (EDIT_DEFAULTS)."""
    sd15, sdxl = (getattr(EDIT_DEFAULTS[kind], setting) for kind in ("sd15", "sdxl"))
    return f"Default: the model's own (its icd.json; else SD1.5 {sd15:g}, SDXL {sdxl:g})." \
        if not isinstance(sd15, str) else f"Default: the model's own (its icd.json; else SD1.5 {sd15}, SDXL {sdxl})."


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


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-q: errors only; -v: also debug lines, the libraries' warnings and bars, and tracebacks."""
    if not value:
        return
    level = logging.ERROR if param.name == "quiet" else logging.DEBUG
    if ctx.meta.setdefault("icd.verbosity", level) != level:
        raise click.UsageError("-q and -v cannot be used together")
    logging.getLogger("icd").setLevel(level)


def _remember_json_log(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["icd.json_log"] = value


def _remember_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value:
        ctx.meta["icd.threads"] = value


def threads_given() -> int | None:
    """The command's --threads, or None (then the model's opening chooses)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("icd.threads") if ctx is not None else None


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
    "backend": click.option("--backend", type=click.Choice(BACKENDS), default="auto",
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
    "threads": click.option("--threads", type=click.IntRange(min=1), expose_value=False, callback=_remember_threads,
                            help="CPU threads of torch and ONNX Runtime (one count for both). Default: "
                                 "OMP_NUM_THREADS if set, else the CPUs this process may use (its CPU affinity and "
                                 "cgroup quota). A command run by `icd serve` uses the server's."),
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
    # the edit settings that `icd edit` and `icd eval` share
    "method": click.option("--method", type=click.Choice(["p2p", "swap", "none"]), help="p2p: Prompt-to-Prompt "
                           "attention control; swap: source prompt on the unguided steps, target on the guided "
                           "ones; none: target prompt only. " + model_default_help("method")),
    "guidance": click.option("--guidance", type=Finite(0), help=GUIDANCE_HELP + " " + model_default_help("guidance")),
    "tau": click.option("--tau", type=Finite(0, 1), help=TAU_HELP + " " + model_default_help("tau")),
    "cross_replace": click.option("--cross-replace", type=Finite(0, 1), help="p2p: fraction of steps on which "
                                  "the target's cross-attention comes from the source. Default "
                                  f"{DEFAULT_CROSS_REPLACE:g}."),
    "self_replace": click.option("--self-replace", type=Finite(0, 1), help="p2p: fraction of steps on which the "
                                 f"target's self-attention comes from the source. Default {DEFAULT_SELF_REPLACE:g}."),
    "amplify": click.option("--amplify", multiple=True, metavar="WORD=F", help="p2p: scale a target word's "
                            "attention by F (repeatable). Default: each new target word x4."),
    "strength": click.option("--strength", type=Finite(0, 1), help="One knob from 0 (keep the photo) to 1 (follow "
                             "the target): moves --guidance (0 up to the model's default at 0.5), --tau (0 -> the "
                             "model's -> 1) and the p2p windows --cross-replace/--self-replace (1 -> "
                             f"{DEFAULT_CROSS_REPLACE:g}/{DEFAULT_SELF_REPLACE:g} -> 0) together; 0.5 is the model's "
                             "defaults. Those options, given too, win. E.g. --strength 0.7."),
    # generation's own defaults
    "generate_guidance": click.option("--guidance", type=Finite(0), default=GENERATE_GUIDANCE, show_default=True,
                                      help=GUIDANCE_HELP),
    "generate_tau": click.option("--tau", type=Finite(0, 1), default=GENERATE_TAU, show_default=True,
                                 help=TAU_HELP),
}
MODEL_RUN = ("model", "device", "dtype", "backend", "compile", "threads", "width", "height", "output", "overwrite",
             "skip_existing", "json", "json_log", "quiet", "verbose", "no_server")


def uses(*names: str):
    """Attach the shared options `names`, in that order in the help."""
    def attach(command):
        return functools.reduce(lambda cmd, name: OPTIONS[name](cmd), reversed(names), command)

    return attach
