"""The model cache and downloader, against a loopback HTTP server serving synthetic archives."""

import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest

from icd.errors import ModelError, UsageError
from icd.models import cache, hub
from icd.models.manifest import model_files
from tests.fixtures.downloads import targz

FORWARD = b"forward lora bytes"
REVERSE = b"reverse lora bytes"
TEACHER = b"teacher state dict"



def pulled() -> list[tuple[str, Path]]:
    """The presets pulled into the cache, with their folders."""
    return [(entry.name, entry.path) for entry in hub.available_models() if entry.source == "pulled"]

def serve_sd15(server):
    server.files["sd15_cfg_distill.pt.tar.gz"] = targz({"sd15_cfg_distill.pt": TEACHER})
    server.files["iCD-SD15_4steps_1.tar.gz"] = targz({
        "iCD-SD15_4steps_1/iCD-SD15-forward_19_259_519_779.safetensors": FORWARD,
        "iCD-SD15_4steps_1/iCD-SD15-reverse_259_519_779_999.safetensors": REVERSE,
        "iCD-SD15_4steps_1/README.txt": b"notes",
    })


def test_pull_installs_files_and_writes_manifest(server, home):
    serve_sd15(server)
    path = hub.pull("sd15", base_url=server.url, progress=False, fetch_base=False)

    assert path == home / "models" / "sd15-4step-259" / "icd.json"
    manifest = json.loads(path.read_text())
    assert manifest == {
        "name": "sd15-4step-259", "kind": "sd15", "base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "teacher": "../../teachers/sd15/sd15_cfg_distill.pt", "guidance_embed_dim": 512,
        "forward_lora": "forward.safetensors", "reverse_lora": "reverse.safetensors", "lora_alpha": 8,
        "forward_timesteps": [19, 259, 519, 779], "reverse_timesteps": [259, 519, 779, 999],
        "resolution": 512,
    }
    assert (path.parent / manifest["teacher"]).read_bytes() == TEACHER
    assert (path.parent / manifest["forward_lora"]).read_bytes() == FORWARD
    assert (path.parent / manifest["reverse_lora"]).read_bytes() == REVERSE
    assert list((home / "downloads").iterdir()) == []
    assert pulled() == [("sd15-4step-259", path.parent)]


def test_pull_skips_what_is_installed_unless_forced(server, home):
    serve_sd15(server)
    hub.pull("sd15-4step-259", base_url=server.url, progress=False, fetch_base=False)
    asked = len(server.requests)

    hub.pull("sd15-4step-259", base_url=server.url, progress=False, fetch_base=False)
    assert len(server.requests) == asked

    hub.pull("sd15-4step-259", base_url=server.url, progress=False, fetch_base=False, force=True)
    assert len(server.requests) == 2 * asked


def test_pull_fetches_only_the_needed_base_files(server, home, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: calls.append(kwargs))
    server.files["sdxl_cfg_distill.pt.tar.gz"] = targz({"teacher/sdxl_cfg_distill.pt": TEACHER})
    server.files["iCD-SDXL_4steps_2.tar.gz"] = targz({"a-forward.safetensors": FORWARD,
                                                      "a-reverse.safetensors": REVERSE})

    path = hub.pull("sdxl", base_url=server.url, progress=False)

    assert calls == [{"repo_id": "stabilityai/stable-diffusion-xl-base-1.0",
                      "allow_patterns": hub.BASE_FILES["sdxl"], "force_download": False}]
    assert "unet/config.json" in calls[0]["allow_patterns"]
    assert not any(p.startswith("unet/") and p != "unet/config.json" for p in calls[0]["allow_patterns"])
    manifest = json.loads(path.read_text())
    assert (manifest["reverse_timesteps"], manifest["resolution"]) == ([249, 499, 699, 999], 1024)


def test_pull_with_a_vae_fetches_it_with_the_base_and_names_it(server, home, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: calls.append(
        (kwargs["repo_id"], kwargs["allow_patterns"])))
    server.files["sdxl_cfg_distill.pt.tar.gz"] = targz({"teacher/sdxl_cfg_distill.pt": TEACHER})
    server.files["iCD-SDXL_4steps_2.tar.gz"] = targz({"a-forward.safetensors": FORWARD,
                                                      "a-reverse.safetensors": REVERSE})
    path = hub.pull("sdxl", base_url=server.url, progress=False, vae=hub.SDXL_FP16_VAE)
    assert calls == [(hub.SDXL_BASE, hub.BASE_FILES["sdxl"]),
                     ("madebyollin/sdxl-vae-fp16-fix", ["config.json", "diffusion_pytorch_model.safetensors"])]
    assert json.loads(path.read_text())["vae"] == "madebyollin/sdxl-vae-fp16-fix"
    _, remote = model_files(path)
    assert remote == [hub.SDXL_BASE, "madebyollin/sdxl-vae-fp16-fix"]  # what `icd pull --list` checks is cached


def test_pull_refuses_archive_without_exactly_one_lora(server, home):
    serve_sd15(server)
    server.files["iCD-SD15_4steps_1.tar.gz"] = targz({"x-forward.safetensors": FORWARD})
    with pytest.raises(ModelError, match=r"0 files matching \*reverse\*\.safetensors"):
        hub.pull("sd15", base_url=server.url, progress=False, fetch_base=False)
    assert pulled() == []


def test_download_resumes_from_part(server, tmp_path):
    data = os.urandom(200_000)
    server.files["blob.bin"] = data
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(data[:70_000])

    assert cache.download(server.url + "blob.bin", dest, progress=False) == dest
    assert server.requests == [("blob.bin", "bytes=70000-")]
    assert dest.read_bytes() == data
    assert not (tmp_path / "blob.bin.part").exists()


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    data = os.urandom(50_000)
    server.files["blob.bin"], server.honour_range = data, False
    (tmp_path / "blob.bin.part").write_bytes(b"stale" * 1000)

    cache.download(server.url + "blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == data


def test_download_finishes_a_complete_part_on_416(server, tmp_path):
    data = os.urandom(10_000)
    server.files["blob.bin"] = data
    (tmp_path / "blob.bin.part").write_bytes(data)

    cache.download(server.url + "blob.bin", tmp_path / "blob.bin", progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert server.requests == [("blob.bin", "bytes=10000-")]


def test_interrupted_download_resumes_on_next_call(server, tmp_path):
    data = os.urandom(100_000)
    server.files["blob.bin"], server.truncate_once = data, True
    dest = tmp_path / "blob.bin"

    with pytest.raises(ModelError, match="connection closed early; run again to resume"):
        cache.download(server.url + "blob.bin", dest, progress=False)
    assert not dest.exists()
    assert (tmp_path / "blob.bin.part").read_bytes() == data[:50_000]

    cache.download(server.url + "blob.bin", dest, progress=False)
    assert server.requests[-1] == ("blob.bin", "bytes=50000-")
    assert dest.read_bytes() == data


def test_download_error_names_url_and_reason(server, tmp_path):
    with pytest.raises(ModelError, match=rf"cannot download {server.url}missing.bin: HTTP 404"):
        cache.download(server.url + "missing.bin", tmp_path / "missing.bin", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_keeps_an_existing_file(server, tmp_path):
    (tmp_path / "done.bin").write_bytes(b"done")
    cache.download(server.url + "done.bin", tmp_path / "done.bin", progress=False)
    assert server.requests == []


def test_cached_download_fetches_a_url_once(server, home, monkeypatch):
    server.files["weights/lora.safetensors"] = FORWARD
    path = cache.cached_download(server.url + "weights/lora.safetensors", progress=False)
    assert path.name == "lora.safetensors" and path.parent.parent == home / "urls"
    assert path.read_bytes() == FORWARD

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cache.cached_download(server.url + "weights/lora.safetensors", progress=False) == path
    assert len(server.requests) == 1
    with pytest.raises(ModelError) as error:
        cache.cached_download(server.url + "other.bin")
    assert str(error.value) == f"offline (HF_HUB_OFFLINE is set): {server.url}other.bin is not in the cache"

OUTSIDE = f"/tmp/icd-test-{uuid.uuid4().hex}"


@pytest.mark.parametrize("members, links, hostile", [
    ({"ok.txt": b"ok", "../evil.txt": b"evil"}, {}, "../evil.txt"),
    ({"ok.txt": b"ok", OUTSIDE: b"evil"}, {}, OUTSIDE),
    ({"ok.txt": b"ok"}, {"passwd": (tarfile.SYMTYPE, "/etc/passwd")}, "passwd"),
    ({"ok.txt": b"ok"}, {"up": (tarfile.SYMTYPE, "sub/../../x")}, "up"),
    ({"ok.txt": b"ok"}, {"hard": (tarfile.LNKTYPE, "../x")}, "hard"),
    ({"ok.txt": b"ok"}, {"fifo": (tarfile.FIFOTYPE, "")}, "fifo"),
])
def test_safe_extract_refuses_hostile_archive_whole(tmp_path, members, links, hostile):
    archive = tmp_path / "work" / "bad.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(targz(members, links))

    with pytest.raises(ModelError, match=f"unsafe member '{hostile}'"):
        hub.safe_extract(archive, tmp_path / "work" / "out")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.tar.gz", "work"]
    assert not Path(OUTSIDE).exists()


def test_safe_extract_keeps_inside_links_and_replaces_target(tmp_path):
    archive = tmp_path / "good.tar.gz"
    archive.write_bytes(targz({"dir/a.bin": b"a"}, {"dir/link": (tarfile.SYMTYPE, "a.bin")}))
    target = tmp_path / "out"
    (target / "old").mkdir(parents=True)

    assert hub.safe_extract(archive, target) == [target / "dir" / "a.bin"]
    assert (target / "dir" / "link").read_bytes() == b"a"
    assert not (target / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.tar.gz", "out"]


def test_safe_extract_reports_a_corrupt_archive(tmp_path):
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(targz({"a.bin": os.urandom(5000)})[:100])
    with pytest.raises(ModelError, match="cannot unpack cut.tar.gz"):
        hub.safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.gz"]


def test_pull_offline_fails_before_any_request(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ICD_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as error:
        hub.pull("sdxl", base_url=server.url, progress=False)
    assert str(error.value) == ("offline (HF_HUB_OFFLINE is set): cannot download 'sdxl'; "
                                "unset it and run `icd pull sdxl` again")
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, offline", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                            ("0", False), ("", False), ("false", False)])
def test_offline_switch_reads_environment_now(monkeypatch, value, offline):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", value)
    assert cache._offline_var() == ("TRANSFORMERS_OFFLINE" if offline else None)


def test_unknown_preset_lists_names(home):
    with pytest.raises(UsageError) as error:
        hub.pull("sd3")
    assert str(error.value) == (
        "unknown model 'sd3'; choose one of: sd15-4step-259, sd15-4step-249, sd15-3step, "
        "sdxl-4step-259, sdxl-4step-249, sdxl-3step, sd15, sdxl")


def test_presets_and_aliases():
    assert hub.resolve_preset_name("sd15") == "sd15-4step-259"
    assert hub.resolve_preset_name("sdxl") == "sdxl-4step-249"
    assert hub.resolve_preset_name("sdxl-3step") == "sdxl-3step"
    assert hub.resolve_preset_name("nope") is None
    three = hub.PRESETS["sdxl-3step"]
    assert three.lora_archive == "iCD-SDXL_3steps.tar.gz"
    assert three.teacher_archive == "sdxl_cfg_distill.pt.tar.gz"
    assert (three.forward_timesteps, three.reverse_timesteps) == ((19, 339, 699), (339, 699, 999))
    assert hub.PRESETS["sd15-4step-249"].lora_archive == "iCD-SD15_4steps_2.tar.gz"
    assert hub.PRESETS["sd15-4step-249"].reverse_timesteps == (249, 499, 699, 999)


def test_icd_home_honours_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ICD_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache.icd_home() == tmp_path / "user" / ".cache" / "icd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.icd_home() == tmp_path / "xdg" / "icd"
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "mine"))
    assert cache.icd_home() == tmp_path / "mine"
    assert hub.preset_dir("sd15-3step") == tmp_path / "mine" / "models" / "sd15-3step"
