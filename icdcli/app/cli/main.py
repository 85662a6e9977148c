"""The `icd` group: the one place where errors become their line on stderr and an exit code (2 usage,
1 failure, 130/143 interrupted), where SIGTERM unwinds like Ctrl-C (so that no temporary file outlives a
killed run), and where each command's module is found when that command runs."""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading

import click

from icd import __version__
from icd.errors import ICDError, UsageError

from .options import CONTEXT

# Each command: its module in this package and the command's name there.
COMMANDS = {"edit": ("edit", "edit"), "invert": ("invert", "invert"), "reconstruct": ("invert", "reconstruct"),
            "generate": ("generate", "generate"), "serve": ("serve", "serve"), "export": ("models", "export"),
            "bench": ("bench", "bench"), "pull": ("models", "pull"), "info": ("models", "info"),
            "demo": ("demo", "demo"), "train": ("train", "train"), "eval": ("eval", "evaluate")}


class _OneLineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from ..batch import stderr_line

        stderr_line(f"icd: {record.levelname.lower()}: {record.getMessage()}")


def setup_logging() -> None:
    log = logging.getLogger("icd")
    if not log.handlers:
        log.addHandler(_OneLineHandler())
        log.propagate = False
    log.setLevel(logging.INFO)


def _print_names_as_bytes(errors: str | None = "surrogateescape") -> str | None:
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


class Main(click.Group):
    """The `icd` group (see the module's docstring)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)

    def invoke(self, ctx: click.Context):
        from ..batch import discard_stdout, error_line, failure_line

        previous = signal.signal(signal.SIGTERM, _raise_terminated) \
            if threading.current_thread() is threading.main_thread() else None
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
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as err:  # the last wall: one line, the traceback only when asked for
            error_line(failure_line(err))
            ctx.exit(1)
        finally:
            _print_names_as_bytes(stdout_errors)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            log.setLevel(logging_state[0])  # a caller in Python (a test, a script) gets its logging back
            log.propagate, log.handlers[:] = logging_state[1], logging_state[2]


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
    setup_logging()
