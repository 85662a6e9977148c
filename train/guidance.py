"""Stage 1 (`icd train guidance`): distil classifier-free guidance into the UNet, making the w-embedded teacher.

The student is the base UNet plus `time_embedding.cond_proj` (e(w) -> time features, no bias), initialised
to zero so that it starts as the base model. All its weights learn eps_c + w (eps_c - eps_u) of the frozen
base, for w drawn per sample from guidance.scales (w = classical scale - 1; the paper's SD1.5 set is
0, 7, 11, 15, 19) and fed as e(w). It is saved in the official teacher format: `teacher.pt`, a plain state
dict strict-loadable into the base UNet config with time_cond_proj_dim = 512, plus an icd.json without LoRAs
that `icd train icd` takes as its model. A local base folder travels inside the output folder (loop.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from icd.core.consistency import add_noise, guidance_embedding, guided_eps
from icd.core.schedule import NUM_TRAIN_TIMESTEPS
from icd.core.denoiser import Conditioning
from icd.errors import ModelError, first_line
from icd.models.loading import load_teacher, unet_eps
from icd.models.manifest import (MANIFEST_NAME, TEACHER_FILE, Manifest, carry_inside, load_manifest, parse_manifest,
                                 write_model)

from .config import GuidanceConfig, ICDSection
from .data import batch_inputs, first_items, text_conditioning
from .loop import clip_and_step, load_model, prepare, run
from .losses import RowRandom


def base_manifest(path: str, resolution: int) -> Manifest:
    """The base model of an iCD model (folder or icd.json), or a diffusers base folder or hub id."""
    candidate = Path(path)
    if (candidate / MANIFEST_NAME).is_file() or candidate.suffix == ".json":
        manifest = load_manifest(candidate)
        return replace(manifest, teacher=None, guidance_embed_dim=None, forward_lora=None, reverse_lora=None)
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(path, subfolder="unet", local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: neither an iCD model nor a diffusers base model ({first_line(err)})") from None
    kind = "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd15"
    defaults = ICDSection()
    data = {"kind": kind, "base": path, "forward_timesteps": defaults.forward_timesteps,
            "reverse_timesteps": defaults.reverse_timesteps, "resolution": resolution}
    return parse_manifest(data, Path.cwd(), path)


def guidance_student(base, embed_dim: int):
    """The base UNet with a zero guidance projection: equal to the base until it learns."""
    from diffusers import UNet2DConditionModel

    if base.config.time_cond_proj_dim is not None:
        raise ModelError("the base UNet already has a guidance embedding (time_cond_proj_dim)")
    student = UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=embed_dim)
    missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


class GuidanceStage:
    def __init__(self, config: GuidanceConfig, output: Path, accelerator):
        self.config, self.output, self.accelerator = config, output, accelerator
        manifest = base_manifest(config.model.path, config.data.resolution)
        self.model = load_model(manifest, accelerator, config.data.resolution)
        base = load_teacher(manifest, self.model.unet_config)  # the manifest names no teacher: the base UNet
        self.student = guidance_student(base, config.guidance.embed_dim)
        if config.train.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.base = base.to(accelerator.device, self.model.dtype).requires_grad_(False).eval()
        prepare(self, (self.student,), [list(self.student.parameters())])
        self.uncond = text_conditioning(self.model, [""], config.data.resolution)

    def loss(self, unet, z0: torch.Tensor, cond: Conditioning, random: RowRandom) -> torch.Tensor:
        """MSE between unet(x_t, t, e(w)) and the base's guided eps, at random t, w and noise."""
        rows, device = z0.shape[0], z0.device
        scales = self.config.guidance.scales
        t = random.randint(NUM_TRAIN_TIMESTEPS, rows)
        w = torch.tensor([scales[i] for i in random.randint(len(scales), rows)])
        timesteps = torch.tensor(t, device=device)
        x_t = add_noise(z0, random.randn(z0.shape).to(device), timesteps)
        uncond = self.uncond.rows([0] * rows)
        with torch.no_grad():  # both halves of classical guidance in one batched pass of the base
            both = Conditioning.cat([cond, replace(uncond, time_ids=cond.time_ids)])
            eps_c, eps_u = unet_eps(self.base)(torch.cat([x_t, x_t]), timesteps.repeat(2), both, None).float().chunk(2)
            target = guided_eps(eps_c, eps_u, w)
        embedding = guidance_embedding(w, self.config.guidance.embed_dim).to(device)
        return F.mse_loss(unet_eps(unet)(x_t, timesteps, cond, embedding).float(), target)

    def train_step(self, batch: dict, random: RowRandom) -> dict:
        z0, cond = batch_inputs(self.model, batch, self.config.data.resolution)
        with self.accelerator.autocast():
            loss = self.loss(self.models[0], z0, cond, random)
        self.accelerator.backward(loss)
        clip_and_step(self)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """guidance_gap: the loss on the fixed evaluation images with fixed t, w and noise."""
        eval_batch = first_items(self.dataset, self.config.train.eval_samples)
        z0, cond = batch_inputs(self.model, eval_batch, self.config.data.resolution)
        with self.accelerator.autocast():
            return {"guidance_gap": self.loss(self.student, z0, cond, RowRandom(0)).item()}

    def save(self) -> None:
        state = {key: value.detach().cpu() for key, value in self.student.state_dict().items()}
        write_teacher_model(self.output, self.model.manifest, self.config, state)


def write_teacher_model(output: Path, base: Manifest, config: GuidanceConfig, state: dict[str, torch.Tensor]) -> Path:
    """The teacher folder `icd train icd` takes: `state` as teacher.pt, the `base` model's local folder placed
    inside (a hub id stays one), and an icd.json without LoRAs. Returns the icd.json path."""
    carried = carry_inside(output, None, base.base)
    files = {TEACHER_FILE: lambda temporary: torch.save(state, temporary)}
    return write_model(output, {
        "name": output.name, "kind": base.kind, **carried, "teacher": TEACHER_FILE,
        "guidance_embed_dim": config.guidance.embed_dim, "forward_timesteps": list(base.forward_timesteps),
        "reverse_timesteps": list(base.reverse_timesteps), "resolution": config.data.resolution}, files)


def train_guidance(config: GuidanceConfig, output: str | Path, resume: bool = False) -> dict:
    """Run stage 1 into `output`; returns the summary of loop.fit."""
    return run(GuidanceStage, config, Path(output), resume)
