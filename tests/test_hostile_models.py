"""Hostile or broken models, caches and artifacts: each fails early as one line, and loses nothing on disk.

Manifests (schema, size, nesting), weights (teacher and LoRA contents, NaN/inf, LoRA shapes), downloads and
archives (file names, extra files, symbolic links, an unwritable cache), `--model` resolution, `--device` and
`--dtype`, concurrent builds, and exported artifacts damaged in place.
"""

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from icd.errors import ModelError, UsageError
from icd.models import cache, hub, loading, lora
from icd.models.hub import available_models, resolve_model
from icd.models.loading import fuse_unets, load_teacher, resolve_device, resolve_dtype, unet_config
from icd.models.manifest import MAX_STEPS, load_manifest, parse_manifest, write_model
from tests.fixtures.cli import icd
from tests.fixtures.deadline import within
from tests.fixtures.downloads import targz
from tests.test_hostile_cli import photo

TESTS = Path(__file__).parent
VALID = {"kind": "sd15", "base": "base", "forward_timesteps": [19, 259], "reverse_timesteps": [259, 999]}


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def tree(folder: Path) -> set[str]:
    """Every path under `folder` (symbolic links not followed), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# --- manifests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, expected", [
    ({"lora_alpha": "8"}, "field 'lora_alpha': Input should be a valid number (got '8')"),
    ({"lora_alpha": None}, "field 'lora_alpha': Input should be a valid number (got None)"),
    ({"lora_alpha": [8]}, "field 'lora_alpha': Input should be a valid number"),
    ({"lora_alpha": math.nan}, "field 'lora_alpha': Input should be a finite number (got nan)"),
    ({"lora_alpha": math.inf}, "field 'lora_alpha': Input should be a finite number (got inf)"),
    ({"lora_alpha": 0}, "field 'lora_alpha': Input should be greater than 0 (got 0)"),
    ({"lora_alpha": -8.0}, "field 'lora_alpha': Input should be greater than 0 (got -8.0)"),
    ({"guidance_embed_dim": 511}, "field 'guidance_embed_dim': Input should be a multiple of 2 (got 511)"),
    ({"guidance_embed_dim": "512"}, "field 'guidance_embed_dim': Input should be a valid integer (got '512')"),
    ({"forward_timesteps": [19.5, 259]}, "field 'forward_timesteps' (item 0): Input should be a valid integer"),
    ({"forward_timesteps": [19, True]}, "field 'forward_timesteps' (item 1): Input should be a valid integer"),
    ({"forward_timesteps": [0, 259]}, "field 'forward_timesteps' (item 0): Input should be greater than or equal to 1"),
    ({"reverse_timesteps": [259, 1000]}, "field 'reverse_timesteps' (item 1): Input should be less than or equal to 999"),
    ({"reverse_timesteps": [259, 999, 259]}, "field 'reverse_timesteps': each timestep may appear once, 259 repeats"),
    ({"reverse_timesteps": list(range(1, 1000))},
     f"field 'reverse_timesteps': 999 timesteps, but a consistency model takes at most {MAX_STEPS} steps"),
    ({"edit": {"method": "magic"}}, "field 'edit.method': Input should be 'p2p', 'swap' or 'none' (got 'magic')"),
    ({"edit": {"guidance": "4"}}, "field 'edit.guidance': Input should be a valid number (got '4')"),
    ({"edit": {"guidance": math.nan}}, "field 'edit.guidance': Input should be a finite number (got nan)"),
    ({"edit": {"guidance": -1}}, "field 'edit.guidance': Input should be greater than or equal to 0 (got -1)"),
    ({"edit": {"tau": 1.5}}, "field 'edit.tau': Input should be less than or equal to 1 (got 1.5)"),
    ({"edit": {"tau": -0.1}}, "field 'edit.tau': Input should be greater than or equal to 0 (got -0.1)"),
    ({"edit": "p2p"}, "field 'edit': Input should be a JSON object (got 'p2p')"),
    ({"demo": "demo.png"}, "field 'demo': Input should be a JSON object (got 'demo.png')"),
    ({"demo": {"image": "demo.png", "source": "a cat"}}, "field 'demo.target': Field required"),
    ({"demo": {"image": 3, "source": "a", "target": "b"}}, "field 'demo.image': Input should be a valid string (got 3)"),
    ({"kind": "sd3"}, "field 'kind': Input should be 'sd15' or 'sdxl' (got 'sd3')"),
    ({"resolution": 4}, "field 'resolution': Input should be greater than or equal to 8 (got 4)"),
    ({"resolution": 4096}, "field 'resolution': Input should be less than or equal to 2048 (got 4096)"),
    ({"resolution": 200000}, "field 'resolution': Input should be less than or equal to 2048 (got 200000)"),
    ({"base": "https://example.com/sd15"}, "field 'base': 'https://example.com/sd15' is a URL, which base cannot be: "
                                           "name a Hugging Face hub id (owner/name) or a local diffusers folder"),
    ({"base": "../sd15"}, "field 'base': '../sd15' is neither a folder (there is none at "),
])
def test_manifest_field_errors_are_one_line(tmp_path, change, expected):
    path = tmp_path / "icd.json"
    path.write_text(json.dumps({**VALID, **change}))  # json writes NaN and Infinity, as hand-edited files may
    with pytest.raises(ModelError) as err:
        load_manifest(path)
    assert one_line(err).startswith(f"{path}: {expected}")


def test_manifest_schema_keeps_what_callers_read(tmp_path):
    data = {**VALID, "reverse_timesteps": [999, 259], "edit": {"guidance": 4, "tau": 1}, "description": "notes"}
    manifest = parse_manifest(data, tmp_path, "icd.json")
    assert manifest.reverse_timesteps == (259, 999) and manifest.lora_alpha == 8.0
    assert manifest.edit_defaults == (("guidance", 4.0), ("tau", 1.0))
    assert manifest.guidance_embed_dim is None and manifest.resolution == 512 and manifest.name == tmp_path.name
    assert len(parse_manifest({**VALID, "forward_timesteps": list(range(1, MAX_STEPS + 1))}, tmp_path,
                              "icd.json").forward_timesteps) == MAX_STEPS


def test_huge_manifest_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "icd.json"
    path.write_text(json.dumps({**VALID, "description": "x" * (1 << 20)}))

    def no_parsing(*args, **kwargs):
        raise AssertionError("a manifest over 1 MiB was parsed")

    monkeypatch.setattr(json, "loads", no_parsing)
    with pytest.raises(ModelError, match=r"icd.json: \d+ bytes, over the 1 MiB a manifest may have$") as err:
        load_manifest(path)
    one_line(err)


def test_deeply_nested_manifest_is_one_line(tmp_path):
    path = tmp_path / "icd.json"
    path.write_text('{"edit": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ModelError, match="icd.json: not a readable JSON manifest \\(nested too deeply\\)$") as err:
        load_manifest(path)
    one_line(err)


# --- weights at load ----------------------------------------------------------------------------------------

@pytest.fixture
def tiny(icd_home):
    return resolve_model("tiny")


def with_files(tiny, tmp_path, **files):
    """The tiny model with some of its weight files replaced (manifest in tmp_path, so a fingerprint of its own)."""
    data = json.loads(tiny.path.read_text())
    data.update({key: str(tiny.path.parent / data[key]) for key in ("base", "teacher", "forward_lora", "reverse_lora")})
    data.update({key: str(path) for key, path in files.items()})
    return parse_manifest(data, tmp_path, str(tmp_path / "icd.json"))


@pytest.mark.parametrize("state, expected", [
    ({}, "teacher.pt: holds an empty state dict, not the UNet's weights"),
    ({3: torch.zeros(1)}, "teacher.pt: key 3 (int) is not a parameter name"),
    ({"conv_in.weight": [1.0, 2.0]}, "teacher.pt: 'conv_in.weight' holds a list, not a tensor"),
])
def test_teacher_contents_are_checked(tiny, tmp_path, state, expected):
    torch.save(state, tmp_path / "teacher.pt")
    manifest = with_files(tiny, tmp_path, teacher=tmp_path / "teacher.pt")
    with pytest.raises(ModelError) as err:
        load_teacher(manifest, unet_config(manifest))
    assert one_line(err).endswith(expected)


def test_nan_in_teacher_named_once_then_verdict_cached(tiny, tmp_path, icd_home, monkeypatch):
    state = torch.load(tiny.teacher, weights_only=True)
    state["conv_in.bias"] = state["conv_in.bias"].clone()
    state["conv_in.bias"][3] = math.inf
    torch.save(state, tmp_path / "bad.pt")
    bad = with_files(tiny, tmp_path, teacher=tmp_path / "bad.pt")
    with pytest.raises(ModelError) as err:
        load_teacher(bad, unet_config(bad))
    assert one_line(err) == f"{tmp_path / 'bad.pt'}: tensor 'conv_in.bias' holds NaN or infinite values"
    assert not (icd_home / "checked" / f"{bad.fingerprint}-teacher").exists()

    good = with_files(tiny, tmp_path)
    verdict = icd_home / "checked" / f"{good.fingerprint}-teacher"
    verdict.unlink(missing_ok=True)
    load_teacher(good, unet_config(good))
    assert verdict.is_file()

    def no_second_pass(tensors):
        raise AssertionError("the finite check ran again for a model already checked")

    monkeypatch.setattr(loading, "first_non_finite", no_second_pass)
    load_teacher(good, unet_config(good))


def test_nan_in_lora_named(tiny, tmp_path):
    tensors = load_file(str(tiny.reverse_lora))
    key = sorted(tensors)[5]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = math.nan
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    manifest = with_files(tiny, tmp_path, reverse_lora=tmp_path / "nan.safetensors")
    with pytest.raises(ModelError) as err:
        fuse_unets(manifest, unet_config(manifest), ("forward", "reverse"))
    assert one_line(err) == f"{tmp_path / 'nan.safetensors'}: tensor '{key}' holds NaN or infinite values"


def lora_with(tiny, tmp_path, change) -> Path:
    tensors = load_file(str(tiny.forward_lora))
    change(tensors)
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    return tmp_path / "lora.safetensors"


Q = "unet.base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.update({f"{Q}.lora_B.weight": torch.zeros(32)}),
     "LoRA for 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q': A is (4, 32) and B (32,), not two "
     "matrices (2-D) or two conv kernels (4-D)"),
    (lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(4, 33)}),
     "LoRA for 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q': A is (4, 33) but the Linear takes "
     "in=32: A should be (4, 32)"),
    (lambda t: t.update({f"{Q}.lora_B.weight": torch.zeros(31, 4)}),
     "LoRA for 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q': B is (31, 4) but the Linear gives "
     "out=32: B should be (32, 4)"),
    (lambda t: t.update({f"{Q}.alpha": torch.tensor([8.0, 8.0])}),
     f"'{Q}.alpha' must hold one number, not a tensor of shape (2,)"),
    (lambda t: t.update({f"{Q}.alpha": torch.tensor(math.nan)}),
     f"'{Q}.alpha' must be a positive finite number, not nan"),
])
def test_lora_shapes_checked_before_any_weight_changes(tiny, tmp_path, change, expected):
    path = lora_with(tiny, tmp_path, change)
    (unet,) = fuse_unets(tiny, unet_config(tiny), ("reverse",))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ModelError) as err:
        lora.fuse_lora(unet, path, 8.0)
    assert one_line(err) == f"{path}: {expected}"
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


# --- downloads and archives ---------------------------------------------------------------------------------



@pytest.mark.parametrize("url", ["https://example.com/weights/..", "https://example.com/", "https://example.com",
                                 "https://example.com/a/."])
def test_url_without_file_name_refused(home, url):
    with pytest.raises(ModelError, match="the URL names no file") as err:
        cache.cached_download(url)
    assert one_line(err).startswith(url)
    assert not home.exists()


def test_archive_with_two_teachers_leaves_nothing(server, home):
    (home / "downloads").mkdir(parents=True)
    (home / "downloads" / "mine.txt").write_text("kept")
    server.files["sd15_cfg_distill.pt.tar.gz"] = targz({"a/one.pt": b"1", "b/two.pt": b"2"})
    with pytest.raises(ModelError) as err:
        hub.pull("sd15", base_url=server.url, fetch_base=False, progress=False)
    assert one_line(err) == "sd15_cfg_distill.pt.tar.gz holds 2 files matching *.pt, expected exactly one"
    assert tree(home / "downloads") == {"mine.txt"}
    assert not (home / "teachers").exists()


def test_symlinked_downloads_folder_refused(server, home, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sd15_cfg_distill.pt").mkdir(parents=True)
    (elsewhere / "sd15_cfg_distill.pt" / "precious.txt").write_text("not icd's")
    home.mkdir()
    (home / "downloads").symlink_to(elsewhere, target_is_directory=True)
    server.files["sd15_cfg_distill.pt.tar.gz"] = targz({"sd15_cfg_distill.pt": b"teacher"})
    with pytest.raises(ModelError) as err:
        hub.pull("sd15", base_url=server.url, fetch_base=False, progress=False)
    assert one_line(err).startswith(f"{home / 'downloads'} is a symbolic link: icd unpacks and deletes only")
    assert tree(elsewhere) == {"sd15_cfg_distill.pt", "sd15_cfg_distill.pt/precious.txt"}
    assert tree(home) == {"downloads"} and server.requests == []


def test_safe_extract_never_follows_a_symlinked_target(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(targz({"x.bin": b"x"}))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "a").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelError, match="a is a symbolic link") as err:
        hub.safe_extract(archive, tmp_path / "cache" / "a")
    one_line(err)
    (tmp_path / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelError, match="linked is a symbolic link"):
        hub.safe_extract(archive, tmp_path / "linked" / "a")
    assert tree(outside) == {"keep.txt"} and tree(tmp_path / "cache") == {"a"}


def test_icd_home_that_is_a_file(server, home):
    home.parent.mkdir(exist_ok=True)
    home.write_text("not a folder")
    server.files["w.safetensors"] = b"weights"
    for call in (lambda: cache.cached_download(server.url + "w.safetensors", progress=False),
                 lambda: hub.pull("sd15", base_url=server.url, fetch_base=False, progress=False)):
        with pytest.raises(ModelError) as err:
            call()
        assert one_line(err) in (f"cannot write to the icd cache ICD_HOME={home}: Not a directory",
                                 f"cannot write to the icd cache ICD_HOME={home}: File exists")
    assert home.read_text() == "not a folder"


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_full_disk_during_download(server, home, monkeypatch):
    server.files["w.safetensors"] = b"weights"
    monkeypatch.setattr(cache, "open", lambda *a, **k: FullDisk(open(*a, **k)), raising=False)
    with pytest.raises(ModelError) as err:
        cache.cached_download(server.url + "w.safetensors", progress=False)
    assert one_line(err) == f"cannot write to the icd cache ICD_HOME={home}: No space left on device"
    assert not cache.cached_download_path(server.url + "w.safetensors").exists()


def test_read_only_cache_on_the_final_rename(server, home, monkeypatch):
    server.files["w.safetensors"] = b"weights"
    real_replace = os.replace

    def read_only(source, target, *args, **kwargs):
        if str(target).endswith("w.safetensors"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(ModelError) as err:
        cache.cached_download(server.url + "w.safetensors", progress=False)
    assert one_line(err) == f"cannot write to the icd cache ICD_HOME={home}: Read-only file system"


# --- --model resolution and the model list ------------------------------------------------------------------

def test_bare_name_prefers_the_shipped_model_and_says_how_to_get_the_folder(icd_home, tmp_path, monkeypatch, caplog):
    shutil.copytree(icd_home / "models" / "tiny", tmp_path / "mini")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="icd"):
        shipped = resolve_model("mini")
    assert shipped.path == hub.builtin_dir("mini") / "icd.json"
    assert "'mini' is the shipped model; for the folder use ./mini" in caplog.text
    assert resolve_model("./mini").name == resolve_model("mini/").name == "tiny-sd15"


def test_bare_preset_name_not_pulled_with_a_same_named_folder(icd_home, tmp_path, monkeypatch):
    shutil.copytree(icd_home / "models" / "tiny", tmp_path / "sd15")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as err:
        resolve_model("sd15")
    assert one_line(err) == "model 'sd15' is not downloaded yet: run `icd pull sd15` (for the folder use ./sd15)"
    assert resolve_model("./sd15").name == "tiny-sd15"


def test_path_reference_never_falls_back_to_a_name(icd_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny").name == "tiny-sd15"  # the cache's models folder
    with pytest.raises(ModelError) as err:
        resolve_model("./tiny")
    assert one_line(err) == "no model folder or icd.json at ./tiny"


def test_available_models(icd_home, tmp_path, monkeypatch, caplog):
    home = tmp_path / "home"
    shutil.copytree(icd_home / "models" / "tiny", home / "models" / "tiny")
    monkeypatch.setenv("ICD_HOME", str(home))
    (tmp_path / "t.pt").write_bytes(b"t" * 1000)
    write_model(home / "models" / "sd15-4step-259", {
        **VALID, "base": hub.SD15_BASE, "teacher": str(tmp_path / "t.pt")}, {"f.safetensors": lambda p: p.write_text("f")})
    (home / "models" / "broken").mkdir()
    (home / "models" / "broken" / "icd.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="icd"):
        found = {m.name: m for m in available_models()}
    assert "skipping" in caplog.text and "broken" in caplog.text and "broken" not in found
    assert [(m.source, m.offline) for m in found.values()] == [("shipped", True), ("pulled", False), ("built", True)]
    mini, pulled, tiny = found["mini"], found["sd15-4step-259"], found["tiny"]
    assert mini.path == hub.builtin_dir("mini") and tiny.path == home / "models" / "tiny"
    files = [p for p in (home / "models" / "tiny").rglob("*") if p.is_file()]
    assert tiny.size_bytes == sum(p.stat().st_size for p in files)
    pulled_files = [p for p in pulled.path.rglob("*") if p.is_file()] + [tmp_path / "t.pt"]
    assert pulled.size_bytes == sum(p.stat().st_size for p in pulled_files)  # the teacher kept elsewhere counts


# --- --device and --dtype ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, why", [
    ("bogus", "not a device icd runs on"), ("meta", "not a device icd runs on"), ("cuda:abc", "not a device icd runs on"),
    ("cpu:1", "not a device icd runs on"),
])
def test_bad_device_is_a_usage_error(name, why):
    with pytest.raises(UsageError) as err:
        resolve_device(name)
    assert one_line(err).startswith(f"--device {name}: {why}; choose one of: auto, cpu")


def test_cuda_without_a_gpu_and_beyond_the_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"^--device cuda: .*(no CUDA|no CUDA GPU is visible); choose one of: auto, cpu$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError) as err:
        resolve_device("cuda:7")
    assert one_line(err) == "--device cuda:7: only 1 CUDA GPU(s) are visible; choose one of: auto, cpu, cuda, cuda:0"
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_bad_dtype_is_a_usage_error():
    with pytest.raises(UsageError, match="^--dtype fp8: unknown precision; choose one of: auto, fp32, fp16, bf16$"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(UsageError, match="^--dtype fp16: not supported on the CPU; choose one of: auto, fp32, bf16$"):
        resolve_dtype("fp16", torch.device("cpu"))


# --- two processes at once ----------------------------------------------------------------------------------

def run_together(script: str, home: Path, args: list[list[str]]) -> list[str]:
    """Run `script` in one process per argument list, started together (a barrier of files in `home`)."""
    env = {**os.environ, "ICD_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    barrier = home / "barrier"
    barrier.mkdir(parents=True)
    prelude = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        barrier, count = Path({str(barrier)!r}), {len(args)}
        def wait_for_all():
            (barrier / sys.argv[1]).touch()
            while len(list(barrier.iterdir())) < count:
                time.sleep(0.01)
    """)
    processes = [subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script), str(i), *a], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i, a in enumerate(args)]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        outputs.append(out)
    return outputs


BUILD_RANDOM = """
    import torch
    from fixtures.tiny import tiny_unet_config
    from icd.models import offline
    clip = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="quick_gelu", projection_dim=32, vocab_size=100, max_position_embeddings=77)
    vae = dict(offline._VAE, block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    offline.CONFIGS["sd15"] = {"resolution": 64, "unet": tiny_unet_config("sd15"), "vae": vae, "text_encoders": [clip]}
    write = offline.write_model
    def slow_write(*args, **kwargs):
        print("built", flush=True)
        time.sleep(0.5)  # a long build: the other process must wait for it, not build too
        return write(*args, **kwargs)
    offline.write_model = slow_write
    wait_for_all()
    print(offline.build_random_model("sd15"))
"""


def test_two_random_model_builds_at_once(tmp_path):
    home = tmp_path / "home"
    outputs = run_together(BUILD_RANDOM, home, [[], []])
    assert sum(out.count("built") for out in outputs) == 1
    manifest_path = home / "models" / "random-sd15" / "icd.json"
    assert {out.split()[-1] for out in outputs} == {str(manifest_path)}
    assert load_manifest(manifest_path).name == "random-sd15"
    assert not [p for p in (home / "models" / "random-sd15").iterdir() if p.name.startswith(".")]


EXPORT = """
    from icd.models.hub import resolve_model
    from icd_export import build
    manifest = resolve_model("tiny")
    save = build.save_fused_unet
    def slow_save(*args):
        time.sleep(0.3)  # the other export reads the index meanwhile, unless it waits for the lock
        return save(*args)
    build.save_fused_unet = slow_save
    wait_for_all()
    build.export_model(manifest, (sys.argv[2],), onnx=False)
"""


def test_two_exports_at_once_keep_both_in_the_index(icd_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(icd_home / "models" / "tiny", home / "models" / "tiny")
    run_together(EXPORT, home, [["fp32"], ["bf16"]])
    index = json.loads(next((home / "artifacts").glob("*/index.json")).read_text())
    assert set(index["artifacts"]) == {f"unet-{d}-{p}.safetensors" for d in ("forward", "reverse")
                                       for p in ("fp32", "bf16")}


# --- exported artifacts damaged in place ---------------------------------------------------------------------

def damage(path: Path, at: int = 0, keep_time: bool = False) -> None:
    """Overwrite bytes in place from `at` on (the size stays); `keep_time`: as bit rot would, the file's time too."""
    status = path.stat()
    data = bytearray(path.read_bytes())
    data[at:at + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    if keep_time:
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ends_sha256(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[:1 << 20] + data[max(0, len(data) - (1 << 20)):]).hexdigest()


@pytest.fixture
def exported(icd_home):
    from icd_export.artifacts import Index, artifacts_dir
    from icd_export.build import export_model

    manifest = resolve_model("tiny")
    export_model(manifest, ("fp32",), onnx=False)
    return manifest, artifacts_dir(manifest), Index, export_model


def test_each_file_hash_is_recorded(exported):
    manifest, folder, Index, _ = exported
    path = folder / "unet-reverse-fp32.safetensors"
    entry = Index.open(manifest).entries[path.name]
    assert entry["files"] == {path.name: {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                                          "ends_sha256": ends_sha256(path), "sha256": sha256(path)}}


def test_garbage_fused_weights_warn_and_fall_back(exported, caplog):
    from icd_export.artifacts import load_fused_unet

    manifest, folder, Index, export_model = exported
    damage(folder / "unet-reverse-fp32.safetensors")  # the header: it no longer loads
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert load_fused_unet(manifest, unet_config(manifest), "reverse", torch.float32, torch.device("cpu")) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.endswith("unet-reverse-fp32.safetensors is damaged (unet-reverse-fp32.safetensors is not the file "
                            "built): it is not used; the next `icd export` rebuilds it")
    assert not (folder / "unet-reverse-fp32.safetensors").exists()
    assert "unet-reverse-fp32.safetensors" not in Index.open(manifest).entries
    built = {b.name: b.reused for b in export_model(manifest, ("fp32",), onnx=False)}
    assert built == {"unet-forward-fp32.safetensors": True, "unet-reverse-fp32.safetensors": False}


def test_verify_rehashes_and_rebuilds(exported, caplog):
    manifest, folder, Index, export_model = exported
    path = folder / "unet-forward-fp32.safetensors"
    damage(path, at=path.stat().st_size // 2, keep_time=True)  # in the weights: it loads, only the hash tells
    assert {b.name: b.reused for b in export_model(manifest, ("fp32",), onnx=False)}[path.name] is True
    with caplog.at_level(logging.WARNING, logger="icd"):
        built = {b.name: b.reused for b in export_model(manifest, ("fp32",), onnx=False, verify=True)}
    assert built == {"unet-forward-fp32.safetensors": False, "unet-reverse-fp32.safetensors": True}
    assert "unet-forward-fp32.safetensors differs from its recorded SHA-256" in caplog.text
    assert Index.open(manifest).entries[path.name]["files"][path.name]["sha256"] == sha256(path)


def test_garbage_onnx_graph_runs_on_torch_instead(icd_home, caplog):
    pytest.importorskip("onnxruntime")
    from icd_export.artifacts import Index, artifacts_dir
    from icd_export.build import export_model
    from icd_export.engines import OnnxEngine

    manifest = resolve_model("tiny")
    export_model(manifest, ("fp32",))
    graph = artifacts_dir(manifest) / "unet-reverse-fp32.onnx"
    damage(graph)  # and recorded as it is now: a graph this ONNX Runtime cannot load
    index = Index.open(manifest)
    index.record(graph.name, index.files(graph.name), **index.entries[graph.name])
    model = loading.Model(manifest, torch.device("cpu"), torch.float32, unet_config(manifest))
    with caplog.at_level(logging.WARNING, logger="icd"):
        eps = OnnxEngine().eps(model, "reverse")
    assert "unet-reverse-fp32.onnx is damaged" in caplog.text and "running the reverse UNet on PyTorch" in caplog.text
    assert not graph.exists() and Index.open(manifest).find(kind="onnx", direction="reverse") is None
    x = torch.randn(1, 4, 8, 8)
    from icd.core.denoiser import Conditioning

    out = eps(x, 259, Conditioning(torch.randn(1, 77, 32)), torch.zeros(1, 512))
    assert out.shape == x.shape and torch.isfinite(out).all()


# --- a hostile artifacts folder: paths outside it, FIFOs, files swapped --------------------------------------

@pytest.fixture
def fresh_sessions(monkeypatch):
    """Each command opens its model anew (a process keeps its sessions), so it reads the artifacts again."""
    from icd.app import session

    monkeypatch.setattr(session, "_OPEN", {})
    return session._OPEN


def warnings_of(result) -> list[str]:
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("icd: warning: ")]


HOSTILE_ENTRIES = {
    "a file up two folders": lambda entry, victims: {**entry, "files": {**entry["files"], "../../x": entry["files"][
        next(iter(entry["files"]))]}},
    "an absolute path": lambda entry, victims: {**entry, "files": {str(victims[1]): entry["files"][
        next(iter(entry["files"]))]}},
}


@pytest.mark.parametrize("case", [*HOSTILE_ENTRIES, "an artifact named up two folders"])
def test_an_index_naming_files_outside_its_folder_is_rebuilt_and_nothing_outside_is_touched(exported, tmp_path,
                                                                                           icd_home, case):
    manifest, folder, Index, export_model = exported
    victims = [icd_home / "x", tmp_path / "victim.txt"]
    for victim in victims:
        victim.write_text("keep me")
    index = json.loads((folder / "index.json").read_text())
    entries = index["artifacts"]
    name = "unet-reverse-fp32.safetensors"
    if case in HOSTILE_ENTRIES:
        entries[name] = HOSTILE_ENTRIES[case](entries[name], victims)
    else:
        entries["../../x"] = entries.pop(name)
    (folder / "index.json").write_text(json.dumps(index))
    before = tree(folder)
    result = icd("export", "-m", "tiny", "--no-onnx", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    (warning,) = warnings_of(result)
    assert warning.startswith(f"icd: warning: {folder / 'index.json'} is damaged (entry ") and warning.endswith(
        "is not a file of this folder): it is replaced by an empty index, and the next `icd export` rebuilds the "
        "artifacts")
    assert result.stdout.splitlines()[:2] == ["built  unet-forward-fp32.safetensors",
                                              "built  unet-reverse-fp32.safetensors"]
    assert [victim.read_text() for victim in victims] == ["keep me", "keep me"]
    assert tree(folder) == before
    assert set(Index.open(manifest).entries) == {"unet-forward-fp32.safetensors", name}


def test_a_fifo_in_place_of_the_index_is_replaced_without_being_read(exported, caplog):
    manifest, folder, Index, export_model = exported
    index_path = folder / "index.json"
    index_path.unlink()
    os.mkfifo(index_path)
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert within(20, lambda: Index.open(manifest), index_path).entries == {}
    assert [r.getMessage() for r in caplog.records] == [
        f"{index_path} is damaged (index.json: not a regular file (a FIFO)): it is replaced by an empty index, "
        "and the next `icd export` rebuilds the artifacts"]
    assert json.loads(index_path.read_text())["artifacts"] == {}
    assert {b.name: b.reused for b in export_model(manifest, ("fp32",), onnx=False)} == {
        "unet-forward-fp32.safetensors": False, "unet-reverse-fp32.safetensors": False}


def test_a_fifo_in_place_of_fused_weights_is_not_waited_on(exported, tmp_path, fresh_sessions):
    manifest, folder, Index, export_model = exported
    weights = folder / "unet-reverse-fp32.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    photo(tmp_path / "a.png")
    result = within(120, lambda: icd("edit", "a.png", "--src", "a red cat", "--tgt", "a blue cat", "--method", "none",
                                     "-m", "tiny", "--device", "cpu", "--backend", "torch", cwd=tmp_path), weights)
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [
        f"icd: warning: {weights} is damaged (unet-reverse-fp32.safetensors: not a regular file (a FIFO)): it is "
        "not used; the next `icd export` rebuilds it"]
    assert not os.path.lexists(weights) and sorted(p.name for p in tmp_path.iterdir()) == ["a-edit.png", "a.png"]


def test_two_swapped_weight_files_are_found_and_not_used(exported, tmp_path, fresh_sessions):
    """Same sizes, same names: only their stamps tell them apart. The picture is the one the right weights give."""
    manifest, folder, Index, export_model = exported
    photo(tmp_path / "a.png")
    edit = ("edit", "a.png", "--src", "a red cat", "--tgt", "a blue cat", "--method", "none", "-m", "tiny",
            "--device", "cpu", "--backend", "torch")
    assert icd(*edit, "-o", "right.png", cwd=tmp_path).exit_code == 0
    forward, reverse = folder / "unet-forward-fp32.safetensors", folder / "unet-reverse-fp32.safetensors"
    assert forward.stat().st_size == reverse.stat().st_size
    forward.rename(tmp_path / "swap")
    reverse.rename(forward)
    (tmp_path / "swap").rename(reverse)
    fresh_sessions.clear()
    result = icd(*edit, "-o", "swapped.png", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [f"icd: warning: {path} is damaged ({path.name} is not the file built): it is not "
                                   "used; the next `icd export` rebuilds it" for path in (forward, reverse)]
    assert Image.open(tmp_path / "swapped.png").tobytes() == Image.open(tmp_path / "right.png").tobytes()
    assert not forward.exists() and not reverse.exists()
    assert {b.name: b.reused for b in export_model(manifest, ("fp32",), onnx=False)} == {
        "unet-forward-fp32.safetensors": False, "unet-reverse-fp32.safetensors": False}


def test_two_swapped_graphs_are_found_and_rebuilt(icd_home, caplog):
    pytest.importorskip("onnxruntime")
    from icd_export.artifacts import Index, artifacts_dir
    from icd_export.build import export_model

    manifest = resolve_model("tiny")
    export_model(manifest, ("fp32",))
    folder = artifacts_dir(manifest)
    for suffix in (".onnx", ".onnx.data"):
        forward, reverse = folder / f"unet-forward-fp32{suffix}", folder / f"unet-reverse-fp32{suffix}"
        forward.rename(folder / "swap")
        reverse.rename(forward)
        (folder / "swap").rename(reverse)
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert Index.open(manifest).find(kind="onnx", precision="fp32") is None
    assert {r.getMessage().split(" is damaged")[0] for r in caplog.records} == {
        str(folder / "unet-forward-fp32.onnx"), str(folder / "unet-reverse-fp32.onnx")}
    rebuilt = {b.name: b.reused for b in export_model(manifest, ("fp32",)) if b.name.endswith(".onnx")}
    assert rebuilt == {"unet-forward-fp32.onnx": False, "unet-reverse-fp32.onnx": False,
                       "unet-reverse-p2p-fp32.onnx": True}


def test_a_fifo_in_place_of_a_graph_is_not_waited_on(icd_home, caplog):
    pytest.importorskip("onnxruntime")
    from icd_export.artifacts import Index, artifacts_dir
    from icd_export.build import export_model

    manifest = resolve_model("tiny")
    export_model(manifest, ("fp32",))
    graph = artifacts_dir(manifest) / "unet-reverse-fp32.onnx"
    graph.unlink()
    os.mkfifo(graph)
    with caplog.at_level(logging.WARNING, logger="icd"):
        assert within(20, lambda: Index.open(manifest).find(kind="onnx", direction="reverse"), graph) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{graph} is damaged (unet-reverse-fp32.onnx: not a regular file (a FIFO)): it is not used; the next "
        "`icd export` rebuilds it"]
    assert not os.path.lexists(graph) and not graph.with_name(graph.name + ".data").exists()


def test_a_copied_cache_is_hashed_once_and_kept(exported, monkeypatch):
    """New times, same bytes (a copy without its times): each file is hashed whole once, and its new time kept."""
    from icd_export import artifacts

    manifest, folder, Index, export_model = exported
    path = folder / "unet-forward-fp32.safetensors"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    hashed = []
    whole = artifacts._whole_sha256
    monkeypatch.setattr(artifacts, "_whole_sha256", lambda file: hashed.append(file.name) or whole(file))
    assert Index.open(manifest).find(kind="unet", direction="forward") == path.name
    assert Index.open(manifest).find(kind="unet", direction="forward") == path.name
    assert len(hashed) == 1
    assert Index.open(manifest).entries[path.name]["files"][path.name]["mtime_ns"] == path.stat().st_mtime_ns
