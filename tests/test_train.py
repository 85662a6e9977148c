"""`icd train guidance` then `icd train icd` end to end on the tiny model (CPU): the three measurements move the
right way, the model folder runs in `icd edit`'s code path, resume continues a run exactly.

Setup: the tiny SD1.5-shaped model and 8 synthetic shape images at 64 px, its base pretrained briefly as a
denoiser of them (see fixtures/synthetic.py, pretrain_tiny_base), then 50 iterations of the paper's recipe with
and without the preservation losses. Eight images make a teacher that learns fast, so that tens of iterations
move the measurements by a wide margin; BENCHMARKS.md ("Training (tiny, CPU)") has the longer runs on 48.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from bench.miniature.world import random_scene, write_imagefolder
from fixtures.synthetic import pretrain_tiny_base
from fixtures.tiny import build_tiny_model
from icd.app.cli import main
from icd_export.engines import TorchEngine
from icd.app.cli.train import train
from icd.images import read_metadata
from icd.models.hub import resolve_model
from icd.models.loading import Model, load_teacher, unet_config
from icd.models.official import DIRECTIONS
from icd.models.manifest import load_manifest

RESOLUTION = 64
COMMON = (f"data.resolution={RESOLUTION}", "data.workers=0", "train.batch_size=4", "train.eval_samples=8",
          "train.gradient_checkpointing=false", "train.log_every=10", "train.eval_every=0")
STAGE2 = ("lora.rank=8", "train.lr=1e-3", "train.max_steps=50")


def invoke(command: str, output, *settings: str, resume: bool = False):
    """`icd train COMMAND`: through the `icd` group, which turns an ICDError into its line and exit code 1."""
    args = ["train", command, "-o", str(output), *(part for s in settings for part in ("--set", s))]
    return CliRunner().invoke(main, args + (["--resume"] if resume else []), catch_exceptions=False)


def evaluations(output) -> list[dict]:
    lines = [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [{k.removeprefix("eval/"): v for k, v in line.items() if k.startswith("eval/")} for line in lines
            if any(k.startswith("eval/") for k in line)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = build_tiny_model(root / "tiny").parent
    data = write_imagefolder(root / "data", range(8), RESOLUTION).parent
    pretrain_tiny_base(model, data, RESOLUTION, steps=250)
    return root, model, data


@pytest.fixture(scope="module")
def teacher(setup):
    root, model, data = setup
    result = invoke("guidance", root / "teacher", f"model.path={model}", f"data.path={data}", *COMMON,
                    "train.max_steps=20", "train.lr=3e-4")
    assert result.exit_code == 0, result.output
    return root / "teacher"


@pytest.fixture(scope="module")
def runs(setup, teacher):
    """The paper's recipe (official schedule, preservation 1.5) and the same without preservation."""
    root, _, data = setup
    outputs = {}
    for name, extra in (("recipe", ()), ("no-preservation", ("icd.forward_preservation=0", "icd.reverse_preservation=0"))):
        outputs[name] = root / name
        result = invoke("icd", outputs[name], f"model.path={teacher}", f"data.path={data}", *COMMON, *STAGE2, *extra)
        assert result.exit_code == 0, result.output
        assert "model written to" in result.output
    return outputs


def test_guidance_stage_writes_a_strict_loading_teacher_that_learned_the_guidance(teacher):
    before, after = evaluations(teacher)
    assert after["guidance_gap"] < 0.8 * before["guidance_gap"]
    manifest = load_manifest(teacher)
    assert manifest.teacher == (teacher / "teacher.pt").resolve() and manifest.guidance_embed_dim == 512
    assert manifest.base == str((teacher / "base").resolve())  # the tiny base folder, carried inside
    assert manifest.forward_lora is None and manifest.reverse_lora is None
    unet = load_teacher(manifest, unet_config(manifest))  # strict load_state_dict
    assert unet.config.time_cond_proj_dim == 512
    assert unet.time_embedding.cond_proj.weight.abs().sum() > 0  # the guidance projection was trained


def test_training_moves_the_three_measurements(runs):
    before, after = evaluations(runs["recipe"])
    _, unpreserved = evaluations(runs["no-preservation"])
    # 1. the reverse student's 4-step decode is closer to the teacher's 50-step DDIM solution, and so is each jump
    assert after["decode_gap"] < 0.8 * before["decode_gap"]
    assert after["jump_gap"] < 0.8 * before["jump_gap"]
    # 2. encoding then decoding reconstructs the latents better than the untrained students (= the teacher)
    assert after["reconstruction"] < 0.85 * before["reconstruction"]
    # 3. ...and better than the same training without the preservation losses
    assert after["reconstruction"] < 0.8 * unpreserved["reconstruction"]


def test_model_folder_runs_in_icd_edit(runs, tmp_path):
    folder = runs["recipe"]
    data = json.loads((folder / "icd.json").read_text())
    assert (data["teacher"], data["base"], data["lora_alpha"]) == ("teacher.pt", "base", 8)  # carried inside
    assert (folder / "teacher.pt").stat().st_ino == (folder.parent / "teacher" / "teacher.pt").stat().st_ino
    assert data["edit"] == {"method": "p2p", "guidance": 19.0, "tau": 0.8}  # w 19 was trained
    assert (data["forward_lora"], data["reverse_lora"]) == ("forward.safetensors", "reverse.safetensors")
    assert data["forward_timesteps"] == [19, 259, 519, 779] and data["reverse_timesteps"] == [259, 519, 779, 999]
    forward, reverse = (load_file(str(folder / f"{d}.safetensors")) for d in ("forward", "reverse"))
    assert all(k.startswith("unet.base_model.model.") and ".lora_" in k for k in forward)
    assert not torch.equal(forward[next(iter(forward))], reverse[next(iter(reverse))])  # two different files
    photo = tmp_path / "scene.png"
    random_scene(10**6, RESOLUTION).image.save(photo)
    result = CliRunner().invoke(main, ["edit", str(photo), "--model", str(folder), "--device", "cpu",
                                       "--src", "a red circle", "--tgt", "a green circle", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    [edited] = (tmp_path / "out").iterdir()
    with Image.open(edited) as image:
        assert image.size == (RESOLUTION, RESOLUTION)
    assert read_metadata(edited)["prompt"] == "a green circle"


def test_resume_continues_the_run_exactly(setup, teacher, tmp_path):
    """Two steps, then two more from the checkpoint, equal four straight (summed schedule, two micro-batches
    per step: the data order, draws and optimizer state all resume)."""
    _, _, data = setup
    settings = (f"model.path={teacher}", f"data.path={data}", *COMMON, "lora.rank=4", "train.lr=1e-3",
                "train.batch_size=2", "train.gradient_accumulation=2", "icd.schedule=summed", "train.eval_samples=0",
                "train.log_every=1", "train.checkpoint_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert invoke("icd", straight, *settings, "train.max_steps=4").exit_code == 0
    assert invoke("icd", resumed, *settings, "train.max_steps=2").exit_code == 0
    again = invoke("icd", resumed, *settings, "train.max_steps=4")
    assert again.exit_code == 1 and "already holds a training run: use --resume" in again.output
    assert invoke("icd", resumed, *settings, "train.max_steps=4", resume=True).exit_code == 0
    steps = [json.loads(line)["step"] for line in (resumed / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    for direction in ("forward", "reverse"):
        expected, got = (load_file(str(folder / f"{direction}.safetensors")) for folder in (straight, resumed))
        assert expected.keys() == got.keys()
        # float rounding only (1.35e-6 seen on weights up to 0.18: the resumed run's kernels may sum in another order)
        assert all(torch.allclose(expected[k], got[k], atol=1e-5) for k in expected)
        assert any(value.abs().sum() > 0 for key, value in got.items() if "lora_B" in key)  # it did train


def test_the_recipe_switches_reach_the_training_run(setup, teacher, tmp_path):
    """icd.reverse_preservation_target changes what the run learns (the stage builds its schedule from the
    config): two steps from one seed give another reverse LoRA with the authors' target."""
    _, _, data = setup
    settings = (f"model.path={teacher}", f"data.path={data}", *COMMON, "lora.rank=4", "train.lr=1e-3",
                "train.eval_samples=0", "train.max_steps=2")
    loras = {}
    for target in ("clean", "start", "clean"):
        output = tmp_path / f"{target}-{len(loras)}"
        assert invoke("icd", output, *settings, f"icd.reverse_preservation_target={target}").exit_code == 0
        loras.setdefault(target, []).append(load_file(str(output / "reverse.safetensors")))
    first, again = loras["clean"]
    [authors] = loras["start"]
    assert all(torch.equal(first[k], again[k]) for k in first)  # the run is deterministic, so
    assert any(not torch.allclose(first[k], authors[k], atol=1e-6) for k in first)  # this is the switch


def test_sdxl_conditioning_and_cached_latents(setup, tmp_path):
    """Both stages on the tiny SDXL model (pooled embeddings and size ids), from a latent cache; the model folder
    still runs once moved away from the teacher and base it was trained from, which are then deleted."""
    _, _, data = setup
    model = build_tiny_model(tmp_path / "tiny-sdxl", kind="sdxl").parent
    cache = tmp_path / "latents.safetensors"
    settings = (f"data.path={data}", f"data.latent_cache={cache}", *COMMON, "train.max_steps=1", "train.eval_samples=0")
    assert invoke("guidance", tmp_path / "teacher", f"model.path={model}", *settings).exit_code == 0
    cached = cache.stat().st_mtime_ns
    result = invoke("icd", tmp_path / "icd", f"model.path={tmp_path / 'teacher'}", *settings, "lora.rank=2",
                    "icd.schedule=summed", "icd.guidance_scales=0,4")
    assert result.exit_code == 0, result.output
    assert cache.stat().st_mtime_ns == cached  # the teacher's carried base/ is the same VAE: the cache is reused
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(tmp_path / "icd", tmp_path / "elsewhere" / "icd")
    shutil.rmtree(tmp_path / "teacher")
    shutil.rmtree(model)
    data = json.loads((moved / "icd.json").read_text())
    assert not [value for value in data.values() if isinstance(value, str) and value.startswith(("..", "/"))]
    assert data["edit"] == {"method": "swap", "guidance": 4.0, "tau": 0.7}  # within the trained 0..4
    manifest = resolve_model(str(moved))
    assert manifest.kind == "sdxl" and manifest.base == str(moved / "base")
    # the UNets `icd edit` runs: the teacher with each LoRA fused (UNets only, no text encoders needed)
    model = Model(manifest, torch.device("cpu"), torch.float32, unet_config(manifest))
    forward, _ = TorchEngine().unets(model, *DIRECTIONS)
    assert forward.config.addition_embed_type == "text_time" and forward.config.time_cond_proj_dim == 512


def test_cli_messages(tmp_path):
    result = invoke("icd", tmp_path / "out", "model.path=x", "data.path=y", "train.lrr=1")
    assert result.exit_code == 2 and "unknown setting 'train.lrr'" in result.output
    result = invoke("icd", tmp_path / "out", f"model.path={tmp_path}", f"data.path={tmp_path}", resume=True)
    assert result.exit_code == 1 and "no checkpoint to resume from" in result.output
    assert main.get_command(None, "train") is train
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "guidance" in help_text and "icd" in help_text and "accelerate launch" in help_text
    imports = subprocess.run([sys.executable, "-c", "import sys, icd.app.cli.train; print(sorted({'torch', "
                              "'accelerate', 'diffusers'} & set(sys.modules)))"], capture_output=True, text=True,
                             check=True)
    assert imports.stdout.strip() == "[]"  # `icd --help` stays fast
