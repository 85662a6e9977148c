"""train/: configuration, data, loss schedule and passes, LoRA files (fast; no training run)."""

import copy
import errno
import json
import logging
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fixtures.tiny import tiny_unet_config
from icd.core.consistency import add_noise, consistency_jump, guidance_embedding
from icd.core.schedule import ddim_grid
from icd.core.denoiser import Conditioning, Guided
from icd.errors import ICDError
from icd.models.hub import resolve_model
from icd.models.loading import load_teacher, unet_config, unet_eps
from icd.models.lora import fuse_lora
from icd.models.manifest import load_manifest
from icd.models.official import LORA_TARGETS
from icd.editing import model_defaults
from icd_train.config import ConfigError, GuidanceConfig, ICDConfig, load_config
from icd_train.data import ImageDataset, cached_latents, read_examples, square_pixels, vae_identity
from icd_train.guidance import base_manifest, guidance_student, write_teacher_model
from icd_train.icd import edit_defaults, write_icd_model
from icd_train.loop import MetricsLog, _save_checkpoint, check_output, cpu_processes, mean_over_processes
from icd_train.losses import (LOSSES, Draw, PassRunner, RowRandom, Rows, Schedule, distance_for, draw, huber,
                              loss_weights, noised)
from icd_train.students import load_lora, make_student, save_lora

REQUIRED = ("model.path=m", "data.path=d")


# --- configuration -----------------------------------------------------------------------------------

def test_defaults_are_the_paper_sd15_4_step_recipe():
    config = load_config(ICDConfig, overrides=REQUIRED)
    assert config.icd.forward_timesteps == [19, 259, 519, 779]
    assert config.icd.reverse_timesteps == [259, 519, 779, 999]
    assert config.icd.guidance_scales == [0, 7, 11, 15, 19]
    assert (config.icd.loss, config.icd.huber_c, config.icd.ddim_steps) == ("huber", 0.001, 50)
    assert config.icd.forward_preservation == config.icd.reverse_preservation == 1.5
    assert (config.lora.rank, config.lora.alpha, tuple(config.lora.targets)) == (64, 8.0, LORA_TARGETS)
    assert (config.train.lr, config.train.max_steps, config.train.max_grad_norm) == (8e-6, 6000, 1.0)
    assert config.data.resolution == 512


def test_file_then_overrides_with_types(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npath = "teacher"\n[data]\npath = "photos"\nresolution = 256\n'
                    '[icd]\nschedule = "summed"\nguidance_scales = [0, 7]\n[train]\nlr = 1e-4\n')
    config = load_config(ICDConfig, path, ("train.lr=3e-4", "icd.reverse_timesteps=339,699,999",
                                           "train.gradient_checkpointing=false", "data.path=other dir/x",
                                           "model.path=2024", "icd.forward_timesteps=[19, 339, 699]",
                                           "lora.targets=to_q,to_out.0"))
    assert config.data.resolution == 256 and config.icd.schedule == "summed"
    assert config.icd.guidance_scales == [0.0, 7.0] and isinstance(config.icd.guidance_scales[0], float)
    assert config.train.lr == 3e-4
    assert config.icd.reverse_timesteps == [339, 699, 999]
    assert config.train.gradient_checkpointing is False
    assert config.data.path == "other dir/x" and config.model.path == "2024"  # text stays text
    assert config.icd.forward_timesteps == [19, 339, 699] and config.lora.targets == ["to_q", "to_out.0"]
    assert load_config(ICDConfig, overrides=(*REQUIRED, "icd.guidance_scales=7")).icd.guidance_scales == [7.0]


def test_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: t}\ndata: {path: p}\nguidance: {scales: [0, 3]}\n")
    assert load_config(GuidanceConfig, path).guidance.scales == [0.0, 3.0]


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown setting 'train.lrr'"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("icd.guidance_scales=a,b", "icd.guidance_scales: expected float"),
    ("train.lr", "expected section.key=value"),
    ("icd.schedule=fast", "icd.schedule: one of official, summed"),
    ("icd.reverse_timesteps=259,519,779", "decoding starts from pure noise at 999"),
    ("icd.forward_timesteps=259,19", "increasing timesteps"),
    ("train.gradient_accumulation=2", "needs icd.schedule = 'summed'"),
    ("lora.rank=0", "lora: rank >= 1"),
    ("train.lr=nan", "train.lr: must be a finite number, not nan"),
    ("lora.alpha=inf", "lora.alpha: must be a finite number, not inf"),
    ("icd.guidance_scales=0,nan", "icd.guidance_scales: must be a finite number, not nan"),
    ("icd.guidance_scales=0,-1", "icd.guidance_scales: w is the classical CFG scale minus one, so not negative"),
    ("icd.huber_c=-inf", "icd.huber_c: must be a finite number, not -inf"),
    ("icd.ddim_steps=0", "icd.ddim_steps: must divide 1000"),
    ("train.adam_beta2=1", "train.adam_beta1/2: from 0 to below 1"),
    ("train.max_grad_norm=0", "train.max_grad_norm: must be positive"),
    ("train.seed=-1", "train.seed: from 0 to 18446744073709551615"),
    ("data.resolution=200000", "data.resolution: a multiple of 8 from 8 to 2048"),
    ("train.max_steps=0", "train.max_steps: must be at least 1"),
    ("icd.guidance_scales=" + "[" * 100_000 + "]" * 100_000,
     "icd.guidance_scales: nested too deeply to be a setting"),
])
def test_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ICDConfig, overrides=(*REQUIRED, override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_stage_sections_are_separate():
    with pytest.raises(ConfigError, match="unknown section 'lora'"):
        load_config(GuidanceConfig, overrides=(*REQUIRED, "lora.rank=4"))
    with pytest.raises(ConfigError, match="model.path"):
        load_config(ICDConfig)


# --- data --------------------------------------------------------------------------------------------

def _png(path, size=(40, 20), colour=(200, 0, 0)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_imagefolder_metadata_bad_rows_and_files(tmp_path, caplog):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", colour=(0, 0, 200))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{"file_name": "a.png", "text": "red"}, {"file_name": "bad.png", "text": "broken"},
            {"file_name": "gone.png", "text": "missing"}, {"file_name": "b.png"}, {"file_name": "b.png", "text": "blue"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    with caplog.at_level(logging.WARNING, logger="icd"):
        examples = read_examples(tmp_path)
        dataset = ImageDataset(examples, 16)
        served = [dataset[i]["caption"] for i in range(len(dataset))]
    assert [e.caption for e in examples] == ["red", "broken", "blue"]
    assert served == ["red", "blue", "blue"]  # the broken file is replaced by the next readable one
    log = caplog.text
    assert "gone.png: listed in metadata.jsonl but not found" in log
    assert "skipping bad.png: not an image" in log
    assert "without file_name and text/caption" in log and "line 6: not JSON" in log


def test_official_csv_and_centre_crop(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (20, 0, 40, 20))  # a red square in the middle of a blue strip
    image.save(tmp_path / "strip.png")
    (tmp_path / "train.csv").write_text(',file_name,caption\n0,strip.png,"a red square, centred"\n')
    (example,) = read_examples(tmp_path, tmp_path / "train.csv")
    assert example.caption == "a red square, centred"
    pixels = square_pixels(example.path, 8)
    assert pixels.shape == (3, 8, 8)
    assert torch.allclose(pixels[0], torch.ones(8, 8), atol=0.02) and torch.allclose(pixels[2], -torch.ones(8, 8), atol=0.02)


def test_no_captions_is_an_error(tmp_path):
    with pytest.raises(ICDError, match="no captions"):
        read_examples(tmp_path)


def test_latent_cache_is_reused_and_rebuilt(tmp_path):
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,one\nb.png,two\n")
    examples = read_examples(tmp_path)
    calls = []

    def encode(pixels):
        calls.append(pixels.shape)
        return pixels[:, :1, ::4, ::4] * 2

    cache = tmp_path / "cache" / "latents.safetensors"
    first = cached_latents(cache, examples, 16, "base", encode)
    again = cached_latents(cache, examples, 16, "base", encode)
    assert len(calls) == 1 and torch.equal(first.latents, again.latents) and again.captions == ["one", "two"]
    assert again[1]["latents"].shape == (1, 4, 4)
    cached_latents(cache, examples, 32, "base", encode)
    assert len(calls) == 2
    assert [p.name for p in cache.parent.iterdir()] == ["latents.safetensors"]  # written whole, no leftovers


def test_latent_cache_knows_a_carried_base_by_its_vae(tiny_models, tmp_path):
    """A base placed inside a model folder (another path) is the same VAE; another VAE is not."""
    carried = shutil.copytree(tiny_models / "tiny" / "base", tmp_path / "model" / "base")
    assert vae_identity(str(carried)) == vae_identity(str(tiny_models / "tiny" / "base"))
    assert vae_identity(str(carried)) != vae_identity(str(tiny_models / "tiny-sdxl" / "base"))
    assert vae_identity("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"


# --- timesteps and boundaries ------------------------------------------------------------------------

def test_schedule_of_the_default_4_step_model():
    schedule = Schedule([19, 259, 519, 779], [259, 519, 779, 999])
    assert schedule.grid == ddim_grid(50) == list(range(19, 1000, 20))
    assert schedule.reverse_boundaries == [0, 259, 519, 779]
    assert schedule.forward_boundaries == [259, 519, 779, 999]
    # Reverse CD: (the teacher's next grid point, the boundary). t = 259 sits at the top of the first
    # segment: like the reverse model at inference (259 -> 0) it targets 0, i.e. the official
    # max{e <= t - 20}. Just above a boundary the teacher step lands on it (the target is the teacher's x_s).
    assert schedule.reverse_step(19) == (0, 0)
    assert schedule.reverse_step(259) == (239, 0)
    assert schedule.reverse_step(279) == (259, 259)
    assert schedule.reverse_step(519) == (499, 259)
    assert schedule.reverse_step(999) == (979, 779)
    # Forward CD: official min{f >= t + 20}.
    assert schedule.forward_starts[0] == 19 and schedule.forward_starts[-1] == 979
    assert schedule.forward_step(19) == (39, 259)
    assert schedule.forward_step(239) == (259, 259)
    assert schedule.forward_step(259) == (279, 519)
    assert schedule.forward_step(979) == (999, 999)
    assert schedule.segments == [(19, 259, 0), (259, 519, 259), (519, 779, 519), (779, 999, 779)]


def test_off_grid_boundaries_are_honoured():
    schedule = Schedule([19, 249, 499, 699], [249, 499, 699, 999])
    assert {249, 499, 699} <= set(schedule.grid)
    assert schedule.reverse_step(259) == (249, 249)  # the step stops at the boundary instead of crossing it
    assert schedule.reverse_step(249) == (239, 0)
    assert schedule.forward_step(239) == (249, 249)
    three = Schedule([19, 339, 699], [339, 699, 999])
    assert three.reverse_boundaries == [0, 339, 699]  # not the 679 the official SD1.5 script would use
    assert three.segments == [(19, 339, 0), (339, 699, 339), (699, 999, 699)]


def test_huber_by_hand_and_l2():
    prediction, target = torch.tensor([0.0, 0.003, -0.5]), torch.zeros(3)
    expected = (0 + (math.sqrt(0.003**2 + 1e-6) - 1e-3) + (math.sqrt(0.25 + 1e-6) - 1e-3)) / 3
    assert huber(prediction, target, 0.001).item() == pytest.approx(expected, rel=1e-5)
    l2 = load_config(ICDConfig, overrides=(*REQUIRED, "icd.loss=l2")).icd
    assert distance_for(l2)(prediction, target).item() == pytest.approx((0.003**2 + 0.25) / 3)


def test_preservation_losses_gated_on_their_own_weights():
    icd = load_config(ICDConfig, overrides=(*REQUIRED, "icd.forward_preservation=0")).icd
    assert loss_weights(icd) == {"reverse_cd": 1.0, "forward_cd": 1.0, "reverse_preservation": 1.5}


def test_preservation_segments_need_matching_jumps():
    # Forward jumps 19 -> 500 -> 999; only 999 starts a reverse jump (999 -> 779).
    assert Schedule([19, 500], [259, 519, 779, 999]).segments == [(500, 999, 779)]


# --- the passes of the four losses --------------------------------------------------------------------

class RecordingUNet(torch.nn.Module):
    """eps = scale * x + t / 1000, recording the timesteps of every call."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x, t, timestep_cond, return_dict, encoder_hidden_states):
        self.calls.append((t.tolist(), timestep_cond[:, 256].tolist()))
        return (self.scale * x + t.view(-1, 1, 1, 1) / 1000,)


def _draw(rows=2):
    generator = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(rows, 4, 2, 2, generator=generator), torch.randn(rows, 4, 2, 2, generator=generator)
    return Draw(z0, noise, Conditioning(torch.zeros(rows, 3, 8)), torch.tensor([7.0, 0.0])[:rows],
                reverse_t=[279, 519][:rows], forward_t=[239, 19][:rows], segments=[(19, 259, 0), (259, 519, 259)][:rows])


def test_a_lone_process_draws_what_a_plain_generator_draws():
    """Single-process runs keep the draws they always had (one generator per batch, seeded by its index)."""
    random, plain = RowRandom(11), torch.Generator().manual_seed(11)
    assert random.randint(1000, 3) == torch.randint(1000, (3,), generator=plain).tolist()
    assert torch.equal(random.randn(torch.Size([3, 4, 2, 2])), torch.randn(3, 4, 2, 2, generator=plain))


def test_processes_draw_their_rows_of_the_global_batch():
    """Two processes of 2 rows each draw, between them, exactly what one process of 4 rows draws."""
    schedule = Schedule([19, 259, 519, 779], [259, 519, 779, 999])
    z0 = torch.randn(4, 4, 2, 2)
    cond = Conditioning(torch.randn(4, 3, 8))
    whole = draw(z0, cond, schedule, [0.0, 7.0, 19.0], RowRandom(5))
    halves = [draw(z0[rows], cond.rows(rows), schedule, [0.0, 7.0, 19.0], RowRandom(5, process, 2))
              for process, rows in enumerate((slice(0, 2), slice(2, 4)))]
    assert torch.equal(torch.cat([half.noise for half in halves]), whole.noise)
    assert torch.equal(torch.cat([half.w for half in halves]), whole.w)
    for key in ("reverse_t", "forward_t", "segments"):
        assert getattr(halves[0], key) + getattr(halves[1], key) == getattr(whole, key)
    assert not torch.equal(halves[0].noise, halves[1].noise)  # each process its own rows, not a copy


def test_several_cpu_processes_are_one_accelerate_run(monkeypatch):
    """accelerate makes several processes one gloo run only when told they are on the CPU."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not cpu_processes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cpu_processes()
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert not cpu_processes()  # GPUs: accelerate finds the distributed run itself


def test_logged_values_are_means_over_iterations_and_processes():
    reductions = []

    def reduce(tensor, reduction):
        reductions.append(reduction)
        return (tensor + torch.tensor([2.0, 10.0])) / 2  # with the other process's means: loss 2, 10 calls

    sums = {"loss": torch.tensor(0.3, dtype=torch.float64), "unet_calls": 20.0}
    lone = SimpleNamespace(num_processes=1, reduce=reduce)
    assert mean_over_processes(lone, sums, count=2) == {"loss": 0.15, "unet_calls": 10.0} and not reductions
    two = SimpleNamespace(num_processes=2, device="cpu", reduce=reduce)
    assert mean_over_processes(two, sums, count=2) == pytest.approx({"loss": 1.075, "unet_calls": 10.0})
    assert reductions == ["mean"]


def test_four_losses_in_10_calls_one_at_a_time_or_5_together():
    schedule = Schedule([19, 259, 519, 779], [259, 519, 779, 999])
    for plans_per_run, calls in ((1, 10), (4, 5)):
        unets = {name: RecordingUNet() for name in ("teacher", "forward", "reverse")}
        runner = PassRunner(unets, 512)
        names = list(LOSSES)
        for start in range(0, 4, plans_per_run):
            group = names[start:start + plans_per_run]
            losses = runner.run({name: LOSSES[name](_draw(), schedule, torch.nn.functional.mse_loss) for name in group})
            assert set(losses) == set(group)
        assert (runner.calls, runner.rows) == (calls, 20)
        assert set(runner.denoisers) == set(unets)
        assert all(isinstance(d, Guided) and d.embed_dim == 512 for d in runner.denoisers.values())
        assert len(unets["teacher"].calls) == (2 if plans_per_run == 1 else 1)


def test_reverse_cd_passes_and_boundary_target():
    schedule = Schedule([19, 259, 519, 779], [259, 519, 779, 999])
    unets = {name: RecordingUNet() for name in ("teacher", "forward", "reverse")}
    seen = {}

    def distance(prediction, target):
        seen.update(prediction=prediction, target=target)
        return (prediction - target).square().mean()

    d = _draw()
    loss = PassRunner(unets, 512).run({"reverse_cd": LOSSES["reverse_cd"](d, schedule, distance)})["reverse_cd"]
    assert unets["teacher"].calls[0][0] == [279, 519]  # the teacher steps 279 -> 259 and 519 -> 499
    assert [call[0] for call in unets["reverse"].calls] == [[259, 499], [279, 519]]  # target, then prediction
    assert unets["reverse"].calls[0][1] == pytest.approx([math.cos(7000.0), 1.0])  # e(w)[256] = cos(1000 w)
    # Row 0 starts just above boundary 259: its target is the teacher's own step, x_259.
    x_t = noised(d.z0[:1], d.noise[:1], [279])
    teacher_eps = 0.3 * x_t + 0.279
    assert torch.allclose(seen["target"][:1], consistency_jump(x_t, teacher_eps, 279, 259), atol=1e-6)
    loss.backward()
    assert unets["reverse"].scale.grad is not None and unets["teacher"].scale.grad is None


def test_reverse_preservation_targets_the_clean_latent_on_the_bottom_segment():
    schedule = Schedule([19, 259, 519, 779], [259, 519, 779, 999])
    unets = {name: RecordingUNet() for name in ("teacher", "forward", "reverse")}
    seen = {}

    def distance(prediction, target):
        seen["target"] = target
        return (prediction - target).square().mean()

    d = _draw()
    PassRunner(unets, 512).run({"reverse_preservation": LOSSES["reverse_preservation"](d, schedule, distance)})
    assert torch.equal(seen["target"][0], d.z0[0])  # 259 -> 0 as at inference (the official code uses 19)
    assert torch.allclose(seen["target"][1:], noised(d.z0[1:], d.noise[1:], [259]))
    assert [call[0] for call in unets["forward"].calls] == [[19, 259]]
    assert [call[0] for call in unets["reverse"].calls] == [[259, 519]]
    assert all(w == 1.0 for call in unets["reverse"].calls for w in call[1])  # e(0): cos block is ones


def test_noised_is_add_noise_per_row_with_the_clean_boundary():
    d = _draw()
    x = noised(d.z0, d.noise, [0, 259])
    assert torch.equal(x[0], d.z0[0])  # t = 0 is the clean latent, not sqrt(abar_0) z0 + ...
    torch.testing.assert_close(x[1:], add_noise(d.z0[1:], d.noise[1:], 259), rtol=1e-6, atol=1e-6)


def test_rows_jump_is_one_guided_call_then_each_rows_own_jump():
    """What every pass of the losses does: one UNet call fed e(w) per row, then the sampler's jump per row."""
    unet, d = RecordingUNet(), _draw()
    x = torch.cat([d.z0, d.noise])
    rows = Rows(x, [279, 519, 19, 999], [259, 0, 259, 779], torch.tensor([7.0, 0.0, 0.0, 19.0]),
                Conditioning(torch.zeros(4, 3, 8)))
    with torch.no_grad():
        out = rows.jump(Guided(unet_eps(unet), 512))
    [(t, e_w)] = unet.calls
    assert t == rows.t and e_w == guidance_embedding(rows.w, 512)[:, 256].tolist()
    for i, (t_i, s_i) in enumerate(zip(rows.t, rows.s)):
        eps = 0.3 * x[i:i + 1] + t_i / 1000
        torch.testing.assert_close(out[i:i + 1], consistency_jump(x[i:i + 1], eps, t_i, s_i), rtol=1e-5, atol=1e-6)


# --- students and their files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**tiny_unet_config("sd15"), time_cond_proj_dim=512).eval()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=generator), timestep=torch.tensor([259, 779]),
                encoder_hidden_states=torch.randn(2, 77, 32, generator=generator),
                timestep_cond=torch.randn(2, 512, generator=generator))


def test_saved_lora_is_official_and_fuses_to_the_live_student(teacher, tmp_path):
    config = load_config(ICDConfig, overrides=(*REQUIRED, "lora.rank=4"))
    student = make_student(teacher, config.lora, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        live = student(**_inputs()).sample
    path = tmp_path / "reverse.safetensors"
    save_lora(student, path)
    keys = list(load_file(str(path)))
    assert keys and all(re.fullmatch(r"unet\.base_model\.model\..+\.lora_[AB]\.weight", k) for k in keys)
    assert len(keys) == 2 * sum(1 for n, _ in teacher.named_modules() if n.endswith(LORA_TARGETS))
    fused = copy.deepcopy(teacher)
    fuse_lora(fused, path, config.lora.alpha)
    with torch.no_grad():
        assert torch.allclose(fused(**_inputs()).sample, live, atol=1e-5)
        assert not torch.allclose(teacher(**_inputs()).sample, live, atol=1e-3)
    fresh = make_student(teacher, config.lora, gradient_checkpointing=False)
    load_lora(fresh, path)
    with torch.no_grad():
        assert torch.allclose(fresh(**_inputs()).sample, live, atol=1e-6)


def test_guidance_student_starts_as_the_base(teacher):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel(**tiny_unet_config("sd15")).eval()
    student = guidance_student(base, 512).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = base(**{k: v for k, v in inputs.items() if k != "timestep_cond"}).sample
        assert torch.allclose(student(**inputs).sample, expected, atol=1e-6)
    assert student.config.time_cond_proj_dim == 512
    with pytest.raises(ICDError, match="already has a guidance embedding"):
        guidance_student(teacher, 512)


# --- the output folders: self-contained, relative paths, edit defaults, atomic logs and checkpoints ----------

HUB_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture
def source(tiny_models, tmp_path):
    """A private copy of the tiny model (teacher.pt, a local base/ and two LoRAs), free to delete."""
    return shutil.copytree(tiny_models / "tiny", tmp_path / "source")


def _loras(model) -> dict:
    manifest = load_manifest(model)
    return {"forward": load_file(str(manifest.forward_lora)), "reverse": load_file(str(manifest.reverse_lora))}


def _paths(data: dict) -> list[str]:
    """Every string an icd.json holds that could be a path (all but the prose fields)."""
    return [value for key, value in data.items() if isinstance(value, str) and key not in ("name", "kind")]


def test_icd_model_carries_hard_links_to_its_teacher_and_base(source, tmp_path):
    config = load_config(ICDConfig, overrides=(*REQUIRED, "icd.guidance_scales=0,2,6", "data.resolution=64"))
    output = tmp_path / "trained"
    (source / "teacher.pt").chmod(0o444)
    for _ in range(2):  # the second time as a resumed run saves again: the links are already there
        write_icd_model(output, load_manifest(source), config, _loras(source))
    assert (source / "teacher.pt").stat().st_mode & 0o777 == 0o444  # linking left the source's modes alone
    data = json.loads((output / "icd.json").read_text())
    assert (data["teacher"], data["base"]) == ("teacher.pt", "base")
    assert (data["forward_lora"], data["reverse_lora"]) == ("forward.safetensors", "reverse.safetensors")
    assert not any(path.startswith(("..", "/")) for path in _paths(data))
    assert data["edit"] == {"method": "p2p", "guidance": 6.0, "tau": 0.8}
    same_inode = [(source / name).stat().st_ino == (output / name).stat().st_ino
                  for name in ("teacher.pt", "base/model_index.json", "base/unet/config.json")]
    assert same_inode == [True, True, True]
    assert sorted(p.name for p in output.iterdir()) == ["base", "forward.safetensors", "icd.json",
                                                        "reverse.safetensors", "teacher.pt"]
    assert not [p.name for p in output.rglob(".*")]  # no temporary left behind


def test_icd_model_is_copied_where_hard_links_fail(source, tmp_path, monkeypatch):
    attempts = []

    def cross_device(src, dst, **kwargs):
        attempts.append(dst)
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))

    monkeypatch.setattr(os, "link", cross_device)
    output = tmp_path / "trained"
    write_icd_model(output, load_manifest(source), load_config(ICDConfig, overrides=REQUIRED), _loras(source))
    assert attempts  # a link was tried first
    for name in ("teacher.pt", "base/model_index.json", "base/vae/config.json"):
        copied, original = output / name, source / name
        assert copied.stat().st_ino != original.stat().st_ino and copied.read_bytes() == original.read_bytes()
    assert not [p.name for p in output.rglob(".*")]  # no temporary left behind
    assert json.loads((output / "icd.json").read_text())["teacher"] == "teacher.pt"


def test_moved_model_folder_still_loads_without_its_sources(source, tmp_path):
    output = tmp_path / "trained"
    write_icd_model(output, load_manifest(source), load_config(ICDConfig, overrides=REQUIRED), _loras(source))
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(output, tmp_path / "elsewhere" / "moved")
    shutil.rmtree(source)
    manifest = resolve_model(str(moved))
    assert manifest.teacher == moved / "teacher.pt" and manifest.base == str(moved / "base")
    assert manifest.forward_lora == moved / "forward.safetensors"
    assert load_teacher(manifest, unet_config(manifest)).config.time_cond_proj_dim == 512  # strict load
    assert model_defaults(manifest).guidance == 19.0  # the default scales include the official w


def test_teacher_folder_carries_a_local_base_and_keeps_a_hub_id(source, tmp_path):
    config = load_config(GuidanceConfig, overrides=REQUIRED)
    state = torch.load(source / "teacher.pt", weights_only=True)
    local = tmp_path / "teacher"
    write_teacher_model(local, base_manifest(str(source / "base"), 64), config, state)
    data = json.loads((local / "icd.json").read_text())
    assert (data["teacher"], data["base"]) == ("teacher.pt", "base") and "edit" not in data
    assert (local / "base" / "model_index.json").stat().st_ino == (source / "base" / "model_index.json").stat().st_ino
    moved = shutil.move(local, tmp_path / "moved")
    shutil.rmtree(source / "base")
    manifest = load_manifest(moved)
    assert manifest.base == str(moved / "base") and manifest.teacher == moved / "teacher.pt"
    assert unet_config(manifest)["time_cond_proj_dim"] == 512
    hub = tmp_path / "hub-teacher"
    write_teacher_model(hub, replace(manifest, base=HUB_BASE), config, state)
    assert json.loads((hub / "icd.json").read_text())["base"] == HUB_BASE
    assert sorted(p.name for p in hub.iterdir()) == ["icd.json", "teacher.pt"]


@pytest.mark.parametrize("kind, scales, expected", [
    ("sd15", [0, 7, 11, 15, 19], ("p2p", 19.0, 0.8)),  # the official w lies within the trained range
    ("sd15", [0, 2, 6], ("p2p", 6.0, 0.8)),  # above it: the largest trained scale
    ("sd15", [20, 30], ("p2p", 30.0, 0.8)),  # below it: the largest too
    ("sdxl", [3, 0], ("swap", 3.0, 0.7)),
    ("sdxl", [10, 25], ("swap", 19.0, 0.7)),
])
def test_edit_defaults_stay_within_the_trained_guidance(kind, scales, expected):
    assert tuple(edit_defaults(kind, scales).values()) == expected


def _accelerator(**extra):
    return SimpleNamespace(is_main_process=True, init_trackers=lambda *args, **kwargs: None,
                           log=lambda *args, **kwargs: None, wait_for_everyone=lambda: None, **extra)


def test_metrics_log_is_replaced_whole_and_resumes_at_its_checkpoint(tmp_path):
    log_file = tmp_path / "logs" / "metrics.jsonl"
    log_file.parent.mkdir()
    log_file.write_text("".join(json.dumps({"step": step, "loss": step}) + "\n" for step in range(4)))
    metrics = MetricsLog(_accelerator(), tmp_path, {}, resumed_step=2)  # step 3 is repeated by the resumed run
    metrics.write(3, {"loss": 30})
    assert [json.loads(line) for line in log_file.read_text().splitlines()] == [
        {"step": 0, "loss": 0}, {"step": 1, "loss": 1}, {"step": 2, "loss": 2}, {"step": 3, "loss": 30}]
    MetricsLog(_accelerator(), tmp_path, {}).write(1, {"loss": 9})  # a fresh run: a stale log is replaced
    assert log_file.read_text() == '{"step": 1, "loss": 9}\n'
    assert [p.name for p in log_file.parent.iterdir()] == ["metrics.jsonl"]


def test_a_checkpoint_appears_only_once_complete(tmp_path):
    def interrupted(folder):
        (Path(folder) / "model.safetensors").parent.mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _save_checkpoint(_accelerator(save_state=interrupted), tmp_path, 2, keep=2)
    with pytest.raises(ICDError, match="no checkpoint to resume from"):
        check_output(tmp_path, resume=True)

    def complete(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"whole")

    for step in (2, 4, 6):
        _save_checkpoint(_accelerator(save_state=complete), tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    assert check_output(tmp_path, resume=True) == tmp_path / "checkpoints" / "step-0000006"
    assert (tmp_path / "checkpoints" / "step-0000006" / "model.safetensors").read_bytes() == b"whole"
