"""`icd serve`: hold a model in memory for every `icd` command of this user; `--status`, `--stop`."""

from __future__ import annotations

import functools
import logging

import click

from icd.errors import ICDError, UsageError

from .common import open_model, quiet, resolve
from .main import setup_logging
from .options import threads_given, uses


@click.command()
@uses("model")
@click.option("--device", "devices", multiple=True, default=("auto",), show_default=True, envvar="ICD_DEVICE",
              show_envvar=True, help="auto, cpu, cuda or cuda:N; repeat it (e.g. --device cuda:0 --device cuda:1) "
                                     "for one worker with its own copy of the model per device, behind the one "
                                     "socket.")
@uses("dtype", "backend", "compile", "threads")
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
    if status and stop:
        raise UsageError("--status and --stop cannot be used together")
    if status or stop:
        _status_or_stop(model, status, stop)
        return
    from icd.models.loading import PRECISIONS, resolve_device, resolve_dtype
    from icd_export.registry import check_options

    from ..serve.front import Server
    from ..serve.scheduler import ProcessWorker
    from ..serve.sockets import clear_stale, socket_path

    check_options(backend, compile)
    torch_devices = [resolve_device(device) for device in devices]
    precisions = [PRECISIONS[resolve_dtype(dtype, device)] for device in torch_devices]
    model, manifest = resolve(model)
    if len(set(precisions)) > 1:
        raise UsageError(f"--dtype {dtype} means {', '.join(precisions)} on {', '.join(devices)}: one server runs "
                         "one precision, name it with --dtype")
    path = socket_path(manifest.name, [str(device) for device in torch_devices], precisions[0])
    clear_stale(path)
    open_runner = functools.partial(serve_runner, manifest, dtype, backend, compile,
                                    logging.getLogger("icd").getEffectiveLevel(), threads=threads_given())
    others = [ProcessWorker(device, open_runner) for device in devices[1:]]  # loading while this process does
    try:
        Server(open_runner(devices[0]), model, compile, path, others).serve(ready=lambda line: click.echo(line))
    finally:
        for worker in others:
            worker.close()


def _status_or_stop(model: str | None, status: bool, stop: bool) -> None:
    from ..serve.client import running_servers, stop_server
    from ..serve.sockets import serve_folder

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
            fingerprint = resolve(model)[1].fingerprint
            live = [(path, facts) for path, facts in live if facts["fingerprint"] == fingerprint]
            if not live:
                raise ICDError(f"no server of model '{model}' is running")
        if len(live) > 1:
            raise UsageError(f"{len(live)} servers are running: name the one to stop with -m (see "
                             "`icd serve --status`)")
        path, facts = live[0]
        stop_server(path, facts)
        if not quiet():
            click.echo(f"stopped the server at {path}")


def serve_runner(manifest, dtype: str, backend: str, compile: bool, level: int, device: str,
                 threads: int | None = None):
    """One worker's model for `icd serve`, in the server's process or in a worker process of its own (spawned:
    it sets up the server's logging again, and chooses its threads as the server did)."""
    from icd.models.official import DIRECTIONS

    from ..runner import LocalRunner

    setup_logging()
    logging.getLogger("icd").setLevel(level)
    return LocalRunner(open_model(manifest, device, dtype, DIRECTIONS, backend, compile, threads=threads))


def _served(facts: dict) -> str:
    from ..serve.sockets import describe, describe_worker

    return "\n".join([f"{describe(facts)}, pid {facts['pid']}",
                      *(f"  {describe_worker(number, worker)}" for number, worker in enumerate(facts["workers"], 1))])
