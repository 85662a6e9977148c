"""The authors' training recipe as a switch: icd.teacher_final_step (D1) and icd.reverse_preservation_target
(D2), the shipped preset `official`, and each variant's targets pinned on a fixed batch with a tiny w-embedded
teacher and two LoRA students (fast; no training run)."""

import math

import pytest
import torch
from click.testing import CliRunner

from fixtures.tiny import tiny_unet_config
from icd.app.cli import main
from icd.core.denoiser import Conditioning, Guided
from icd.models.loading import unet_eps
from icd.models.official import LORA_TARGETS
from icd_train.config import ConfigError, ICDConfig, load_config
from icd_train.losses import LOSSES, Draw, PassRunner, RowRandom, Schedule, draw
from icd_train.students import make_student

REQUIRED = ("model.path=m", "data.path=d")
TIMESTEPS = ([19, 259, 519, 779], [259, 519, 779, 999])
ABAR_0 = 1 - 0.00085  # the schedule's first beta is 0.00085: the official teacher step to 0 lands here


def _abar(t: int) -> float:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.prod(1 - betas[:t + 1]).item()


# --- configuration and the preset ----------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("icd.teacher_final_step=alpha", "icd.teacher_final_step: one of schedule, boundary"),
    ("icd.reverse_preservation_target=x_0", "icd.reverse_preservation_target: one of start, clean"),
])
def test_a_switch_takes_only_its_values(setting, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(ICDConfig, overrides=(*REQUIRED, setting))


def test_the_official_preset_is_the_authors_recipe():
    config = load_config(ICDConfig, "official", REQUIRED)
    icd, train, lora = config.icd, config.train, config.lora
    assert (icd.teacher_final_step, icd.reverse_preservation_target) == ("schedule", "start")
    assert (icd.forward_timesteps, icd.reverse_timesteps) == tuple(TIMESTEPS)
    assert (icd.ddim_steps, icd.guidance_scales, icd.loss, icd.huber_c) == (50, [0, 7, 11, 15, 19], "huber", 0.001)
    assert (icd.forward_preservation, icd.reverse_preservation, icd.schedule) == (1.5, 1.5, "official")
    assert (lora.rank, lora.alpha, tuple(lora.targets)) == (64, 8.0, LORA_TARGETS)
    assert (train.lr, train.batch_size, train.max_steps, train.max_grad_norm, train.weight_decay) == (
        8e-6, 8, 6000, 1.0, 0.0)
    assert (train.adam_beta1, train.adam_beta2, train.adam_eps, train.seed) == (0.9, 0.999, 1e-8, 453645634)
    assert config.data.resolution == 512
    schedule = Schedule.from_config(icd)
    assert schedule.teacher_to_schedule_start and schedule.segments[0] == (19, 259, 19)
    ours = Schedule.from_config(load_config(ICDConfig, overrides=(*REQUIRED, "icd.teacher_final_step=boundary",
                                                                  "icd.reverse_preservation_target=clean")).icd)
    assert not ours.teacher_to_schedule_start and ours.segments[0] == (19, 259, 0)


def test_icd_train_takes_the_preset_by_name(tmp_path):
    """--config official loads the shipped preset (the bad override is what fails); an unknown name lists them."""
    output = tmp_path / "run"
    settings = [part for setting in (*REQUIRED, "icd.teacher_final_step=alpha") for part in ("--set", setting)]
    result = CliRunner().invoke(main, ["train", "icd", "--config", "official", "-o", str(output), *settings])
    assert result.exit_code == 2 and "icd.teacher_final_step: one of schedule, boundary" in result.output
    result = CliRunner().invoke(main, ["train", "icd", "--config", str(tmp_path / "authors"), "-o", str(output)])
    assert result.exit_code == 2
    assert f"{tmp_path / 'authors'}: no such configuration file or preset (presets: official)" in result.output
    assert list(tmp_path.iterdir()) == []


# --- each variant's targets on a fixed batch ---------------------------------------------------------------

@pytest.fixture(scope="module")
def unets():
    """A tiny w-embedded teacher and two students whose LoRAs are not zero (so they differ from it)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**tiny_unet_config("sd15"), time_cond_proj_dim=512).eval()
    config = load_config(ICDConfig, overrides=(*REQUIRED, "lora.rank=4"))
    students = {}
    for direction in ("forward", "reverse"):
        student = make_student(teacher, config.lora, gradient_checkpointing=False)
        with torch.no_grad():
            for name, param in student.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        students[direction] = student
    return {"teacher": teacher, **students}


def _batch(rows: int):
    generator = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(rows, 4, 8, 8, generator=generator), torch.randn(rows, 4, 8, 8, generator=generator)
    return z0, noise, Conditioning(torch.randn(rows, 7, 32, generator=generator))


def _run(unets, loss: str, d: Draw, schedule: Schedule) -> dict[str, torch.Tensor]:
    """The loss's prediction and target on the draw."""
    seen = {}

    def distance(prediction, target):
        seen.update(prediction=prediction.detach(), target=target.detach())
        return (prediction - target).square().mean()

    PassRunner(unets, 512).run({loss: LOSSES[loss](d, schedule, distance)})
    return seen


def test_d1_the_teacher_step_to_0_lands_on_abar_0_only_in_the_official_recipe(unets):
    z0, noise, cond = _batch(4)
    d = Draw(z0, noise, cond, torch.tensor([0.0, 7.0, 11.0, 0.0]), reverse_t=[19, 279, 19, 519], forward_t=[19] * 4,
             segments=[(19, 259, 0)] * 4)
    official = _run(unets, "reverse_cd", d, Schedule(*TIMESTEPS, teacher_final_step="schedule"))
    ours = _run(unets, "reverse_cd", d, Schedule(*TIMESTEPS, teacher_final_step="boundary"))
    assert torch.equal(official["prediction"], ours["prediction"])
    steps_above_0 = [1, 3]  # 279 -> 259 and 519 -> 499: the same targets
    assert torch.equal(official["target"][steps_above_0], ours["target"][steps_above_0])
    # t = 19: the teacher's epsilon and clean estimate, by hand; ours is that estimate (alpha = 1), the
    # official target re-noises it to abar_0. The boundary 0 makes the target the teacher's step itself.
    ends_at_0 = [0, 2]
    x_19 = math.sqrt(_abar(19)) * z0[ends_at_0] + math.sqrt(1 - _abar(19)) * noise[ends_at_0]
    with torch.no_grad():
        eps = Guided(unet_eps(unets["teacher"]), 512)(x_19, 19, cond.rows(ends_at_0), (0.0, 11.0))
    x0 = (x_19 - math.sqrt(1 - _abar(19)) * eps) / math.sqrt(_abar(19))
    assert torch.allclose(ours["target"][ends_at_0], x0, atol=1e-5)
    assert torch.allclose(official["target"][ends_at_0], math.sqrt(ABAR_0) * x0 + math.sqrt(1 - ABAR_0) * eps,
                          atol=1e-5)
    assert (official["target"][ends_at_0] - ours["target"][ends_at_0]).abs().max() > 1e-2


def test_d2_bottom_segment_targets_x_19_in_the_official_recipe_and_the_clean_latent_in_ours(unets):
    z0, _, cond = _batch(8)
    official_schedule = Schedule(*TIMESTEPS, reverse_preservation_target="start")
    ours_schedule = Schedule(*TIMESTEPS, reverse_preservation_target="clean")
    official_draw = draw(z0, cond, official_schedule, [0.0], RowRandom(5))
    ours_draw = draw(z0, cond, ours_schedule, [0.0], RowRandom(5))
    bottom = [i for i, (low, _, _) in enumerate(ours_draw.segments) if low == 19]
    above = [i for i in range(8) if i not in bottom]
    assert bottom and above
    assert [official_draw.segments[i] for i in bottom] == [(19, 259, 19)] * len(bottom)
    assert [ours_draw.segments[i] for i in bottom] == [(19, 259, 0)] * len(bottom)
    official = _run(unets, "reverse_preservation", official_draw, official_schedule)
    ours = _run(unets, "reverse_preservation", ours_draw, ours_schedule)
    noise = official_draw.noise[bottom]  # the draws are the same in both: the same seed
    assert torch.equal(noise, ours_draw.noise[bottom])
    x_19 = math.sqrt(_abar(19)) * z0[bottom] + math.sqrt(1 - _abar(19)) * noise
    assert torch.allclose(official["target"][bottom], x_19, atol=1e-6)
    assert torch.equal(ours["target"][bottom], z0[bottom])
    # The reverse student jumps 259 -> 19 in one recipe, 259 -> 0 in the other, from the same x_259.
    assert not torch.allclose(official["prediction"][bottom], ours["prediction"][bottom], atol=1e-3)
    assert torch.equal(official["target"][above], ours["target"][above])
    assert torch.equal(official["prediction"][above], ours["prediction"][above])
