"""`icd serve` end to end on the tiny model: start, status, jobs through the socket (bit-identical to
in-process ones), queued clients, clients and servers that die, stale sockets, refused peers, stop."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import numpy as np
from PIL import Image

from icd.app import jobs
from icd.app.serve import front as server
from icd.app.serve.client import _hello, find_server
from icd.app.runner import LocalRunner
from icd.app.session import open_session
from icd.app.serve.wire import receive
from icd.latents import load_latent
from icd.models.hub import resolve_model
from tests.fixtures.cli import icd

TINY = ("-m", "tiny", "--device", "cpu")
EDIT = ("--src", "a red cat", "--tgt", "a blue cat", "--method", "none", *TINY)
READY_TIMEOUT_S = 120
SOCKET_NAME = "tiny-sd15-cpu-fp32.sock"  # the tiny model's manifest name, device, dtype


def photo(path: Path, colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 48), colour)
    for x in range(0, 64, 8):
        for y in range(48):
            image.putpixel((x, y), (20, 20, 220))
    image.save(path)
    return path


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Served:
    """A server subprocess, started and waited for until it prints its ready line."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, "-m", "icd", "serve", *TINY, *args], env=_env(),
                                        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ready = self._ready_line()
        self.path = Path(self.ready.rsplit(" at ", 1)[1])

    def _ready_line(self) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT_S)
        if not lines or not lines[0].startswith("serving "):
            self.process.kill()
            raise AssertionError(f"the server did not start: {lines} {self.process.stderr.read()}")
        return lines[0].strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=60)


@pytest.fixture
def serving(icd_home):
    started = Served()
    yield started
    started.close()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _icd_process(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "icd", *map(str, args)], cwd=cwd, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_serve_status_a_job_bit_identical_and_stop(serving, icd_home, tmp_path):
    assert serving.ready.startswith("serving tiny (") and serving.ready.endswith(
        f"on cpu, fp32, torch at {icd_home / 'serve' / SOCKET_NAME}")
    assert stat.S_IMODE(serving.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(serving.path.parent.stat().st_mode) == 0o700
    status = icd("serve", "--status", cwd=tmp_path)
    assert status.exit_code == 0
    assert status.stdout.startswith(f"{serving.path}: serving tiny (") and f"pid {serving.process.pid}" in status.stdout
    assert status.stdout.endswith(", 0 jobs in 0 batches, idle; 1 CPU thread\n")  # the tests' OMP_NUM_THREADS=1

    source = photo(tmp_path / "a.png")
    served = icd("edit", source, *EDIT, "-o", "served.png", cwd=tmp_path)
    assert served.exit_code == 0, served.output
    assert served.stderr == f"icd: info: using the server at {serving.path}\n"
    here = icd("edit", source, *EDIT, "-o", "here.png", "--no-server", cwd=tmp_path)
    assert here.exit_code == 0 and "using the server" not in here.stderr
    assert (tmp_path / "served.png").read_bytes() == (tmp_path / "here.png").read_bytes()  # pixels and metadata
    quiet = icd("edit", source, *EDIT, "-o", "quiet.png", "-q", cwd=tmp_path)
    assert quiet.exit_code == 0 and quiet.stderr == ""

    for command in (("invert", source, "--prompt", "a red cat", "-o", "{}.latent.safetensors", *TINY),
                    ("generate", "a red cat", "--seed", "3", "-o", "{}.png", *TINY)):
        outputs = []
        for name, flags in (("served-" + command[0], ()), ("here-" + command[0], ("--no-server",))):
            args = [a.format(name) if isinstance(a, str) else a for a in command]
            result = icd(*args, *flags, cwd=tmp_path)
            assert result.exit_code == 0, result.output
            assert ("using the server" in result.stderr) == (not flags)
            outputs.append(tmp_path / args[args.index("-o") + 1])
        if command[0] == "invert":  # safetensors orders its metadata keys at random: compare the contents
            (served_latent, served_info), (here_latent, here_info) = map(load_latent, outputs)
            assert np.array_equal(served_latent, here_latent) and served_info == here_info
        else:
            assert outputs[0].read_bytes() == outputs[1].read_bytes()
    recon = icd("reconstruct", "served-invert.latent.safetensors", "-o", "recon.png", cwd=tmp_path)
    assert recon.exit_code == 0 and "using the server" in recon.stderr

    stop = icd("serve", "--stop", cwd=tmp_path)
    assert stop.exit_code == 0 and stop.stdout == f"stopped the server at {serving.path}\n"
    assert serving.process.wait(timeout=60) == 0
    assert not serving.path.exists()
    none = icd("serve", "--status", cwd=tmp_path)
    assert none.exit_code == 1 and none.stderr == f"icd: error: no server is running (in {icd_home / 'serve'})\n"


def test_a_client_killed_mid_job_leaves_the_server_serving(serving, tmp_path):
    for i in range(8):
        photo(tmp_path / "in" / f"p{i}.png", colour=(30 * i, 90, 200))
    client = _icd_process("edit", tmp_path / "in", *EDIT, "-o", "out", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not ((tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir())) and time.monotonic() < deadline:
        time.sleep(0.02)
    client.kill()
    client.communicate(timeout=60)
    assert serving.process.poll() is None
    after = icd("edit", photo(tmp_path / "next.png"), *EDIT, "-o", "next-edit.png", cwd=tmp_path)
    assert after.exit_code == 0 and "using the server" in after.stderr
    assert (tmp_path / "next-edit.png").is_file()


def test_a_half_sent_request_does_not_disturb_the_server(serving, tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(serving.path))
        raw.sendall(b"\0\0\0\0\0\0\0\x40{\"op\": ")  # a header announced as 64 bytes, cut short
    assert icd("edit", photo(tmp_path / "a.png"), *EDIT, cwd=tmp_path).exit_code == 0
    assert serving.process.poll() is None


def test_two_clients_at_once_are_queued(serving, tmp_path):
    for name in ("a", "b"):
        for i in range(2):
            photo(tmp_path / name / f"p{i}.png", colour=(60 * i, 40, 200))
    runs = [_icd_process("edit", tmp_path / name, *EDIT, "-o", f"out-{name}", cwd=tmp_path) for name in ("a", "b")]
    for run in runs:
        _, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        assert f"icd: info: using the server at {serving.path}" in stderr
    for name in ("a", "b"):
        assert sorted(files(tmp_path / f"out-{name}")) == ["p0-edit.png", "p1-edit.png"]


def test_the_server_killed_mid_batch_and_the_batch_completes_here(serving, tmp_path, monkeypatch):
    for i in range(3):
        photo(tmp_path / "in" / f"p{i}.png", colour=(60 * i, 40, 200))
    real = jobs.edit_file

    def kill_after_the_first(settings, path, plan, output, mask_output=None):
        result = real(settings, path, plan, output, mask_output)
        if serving.process.poll() is None:
            serving.process.send_signal(signal.SIGKILL)
            serving.process.wait(timeout=60)
        return result

    monkeypatch.setattr(jobs, "edit_file", kill_after_the_first)
    result = icd("edit", tmp_path / "in", *EDIT, "-o", "out", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert f"icd: info: using the server at {serving.path}" in result.stderr
    assert f"icd: warning: the server at {serving.path} went away" in result.stderr
    assert "continuing in this process" in result.stderr
    assert sorted(files(tmp_path / "out")) == ["p0-edit.png", "p1-edit.png", "p2-edit.png"]
    monkeypatch.setattr(jobs, "edit_file", real)
    here = icd("edit", tmp_path / "in", *EDIT, "-o", "here", "--no-server", cwd=tmp_path)
    assert here.exit_code == 0
    assert files(tmp_path / "out") == files(tmp_path / "here")


def test_a_stale_socket_is_ignored_then_replaced(icd_home, tmp_path):
    folder = icd_home / "serve"
    folder.mkdir(mode=0o700, exist_ok=True)
    stale = folder / SOCKET_NAME
    stale.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # the file a killed server leaves: nobody listens
    status = icd("serve", "--status", cwd=tmp_path)
    assert status.exit_code == 1
    assert status.stdout == f"{stale}: stale (no server answers; the next `icd serve` replaces it)\n"
    result = icd("edit", photo(tmp_path / "a.png"), *EDIT, cwd=tmp_path)
    assert result.exit_code == 0 and "using the server" not in result.stderr
    started = Served()
    try:
        assert started.path == stale
        result = icd("edit", tmp_path / "a.png", *EDIT, "-o", "b.png", cwd=tmp_path)
        assert result.exit_code == 0 and "using the server" in result.stderr
        second = subprocess.run([sys.executable, "-m", "icd", "serve", *TINY], env=_env(), text=True,
                                capture_output=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().endswith(f"icd: error: a server already listens at {stale}: `icd serve --stop` "
                                              "ends it")
    finally:
        started.close()


def test_a_peer_of_another_user_is_refused(icd_home, monkeypatch):
    manifest = resolve_model("tiny")
    runner = LocalRunner(open_session(manifest, "cpu", "fp32"))
    serving = server.Server(runner, "tiny", False, icd_home / "unused.sock")
    monkeypatch.setattr(server, "peer_uid", lambda conn: os.getuid() + 1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handler = threading.Thread(target=serving.handle, args=(ours,))
    handler.start()
    reply, _ = receive(theirs)  # said before the peer can ask anything
    handler.join(10)
    assert reply == {"error": f"refused: this server serves user id {os.getuid()} only"}
    assert theirs.recv(1) == b""  # and the connection is closed
    assert _hello(theirs, {}) is None  # which a client takes as "no server here"
    theirs.close()


def test_a_server_of_another_model_or_dtype_is_not_used(icd_home, monkeypatch):
    manifest = resolve_model("tiny")
    runner = LocalRunner(open_session(manifest, "cpu", "fp32"))
    serving = server.Server(runner, "tiny", False, icd_home / "unused.sock")
    request = {"fingerprint": manifest.fingerprint, "device": "cpu", "dtype": "auto", "backend": "auto"}
    assert serving.match(request)[0] is None
    assert serving.match({**request, "dtype": "bf16"})[0] == "it runs on cpu, fp32"
    assert serving.match({**request, "fingerprint": "0" * 16})[0].startswith("it serves model tiny (")
    assert serving.match({**request, "backend": "onnx"})[0] == "it runs the torch backend"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=serving.handle, args=(ours,), daemon=True).start()
    assert _hello(theirs, request)["mismatch"] is None
    theirs.close()
    assert find_server(manifest, "cpu", "fp32", "auto", False) is None  # no socket at all
