"""Stage 2 (`icd train icd`): distil the forward (encoding) and reverse (decoding) students from the teacher.

Update schedule (icd.schedule): official (default), the four losses in the official order (reverse CD, forward CD,
forward preservation, reverse preservation), each with its own backward pass and optimizer step, in 10 UNet calls per
iteration; summed, each student's CD and preservation losses summed and stepped once, the same rows in 5 batched calls
(BENCHMARKS.md compares them). One AdamW holds both students' LoRA parameters (a group each): Adam is per parameter and
skips those without gradients, so this equals one optimizer per student, and a single fp16 GradScaler stays valid.

The model folder carries its teacher (and a local base), and edit defaults whose guidance lies within the scales the
reverse student was trained on: outside them it was never taught, and edits degrade.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from icd.errors import ModelError
from icd.models.loading import load_teacher
from icd.models.manifest import Manifest, carry_inside, load_manifest, write_model
from icd.models.official import DIRECTIONS
from icd.editing import EDIT_DEFAULTS

from .config import ICDConfig
from .data import batch_inputs, first_items
from .evaluate import ICDProbe
from .loop import clip_and_step, load_model, prepare, run
from .losses import LOSSES, PassRunner, RowRandom, Schedule, distance_for, draw, loss_weights
from .students import load_lora, lora_weights, make_student, save_lora, trainable


def edit_defaults(kind: str, guidance_scales: list[float]) -> dict:
    """The "edit" entry of a trained model's icd.json: its kind's official method and tau, and the official
    guidance when it lies within the trained scales, else the largest trained scale."""
    official = EDIT_DEFAULTS[kind]
    if not min(guidance_scales) <= official.guidance <= max(guidance_scales):
        official = replace(official, guidance=float(max(guidance_scales)))
    return asdict(official)


def write_icd_model(output: Path, teacher: Manifest, config: ICDConfig,
                    loras: dict[str, dict[str, torch.Tensor]]) -> Path:
    """The model folder `icd edit --model` runs: the two LoRAs (`loras`: direction -> official LoRA tensors),
    the teacher and a local base of the `teacher` model placed inside, and an icd.json naming them by paths
    within the folder, with edit defaults for the trained guidance range. Returns the icd.json path."""
    icd = config.icd
    carried = carry_inside(output, teacher.teacher, teacher.base)
    files = {f"{direction}.safetensors": lambda path, weights=weights: save_file(weights, str(path))
             for direction, weights in loras.items()}
    return write_model(output, {
        "name": output.name, "kind": teacher.kind, **carried, "guidance_embed_dim": teacher.guidance_embed_dim,
        "forward_lora": "forward.safetensors", "reverse_lora": "reverse.safetensors",
        "lora_alpha": config.lora.alpha, "forward_timesteps": icd.forward_timesteps,
        "reverse_timesteps": icd.reverse_timesteps, "resolution": config.data.resolution,
        "edit": edit_defaults(teacher.kind, icd.guidance_scales)}, files)


class ICDStage:
    def __init__(self, config: ICDConfig, output: Path, accelerator):
        self.config, self.output, self.accelerator = config, output, accelerator
        manifest = load_manifest(config.model.path)
        if manifest.teacher is None or not manifest.guidance_embed_dim:
            raise ModelError(f"{config.model.path}: needs a guidance-embedded teacher (make one with "
                             f"`icd train guidance`)")
        self.model = load_model(manifest, accelerator, config.data.resolution)
        teacher = load_teacher(manifest, self.model.unet_config).to(self.model.dtype).requires_grad_(False)
        self.students = {d: make_student(teacher, config.lora, config.train.gradient_checkpointing)
                         for d in DIRECTIONS}
        self.teacher = teacher.to(accelerator.device).eval()
        prepare(self, tuple(self.students.values()), [trainable(student) for student in self.students.values()])
        self.embed_dim = manifest.guidance_embed_dim
        self.runner = PassRunner({"teacher": self.teacher, **dict(zip(DIRECTIONS, self.models))}, self.embed_dim)
        self.schedule = Schedule.from_config(config.icd)
        self.weights = loss_weights(config.icd)
        self.distance = distance_for(config.icd)
        self._probe: ICDProbe | None = None
        # Checkpoints hold the two LoRA files (official format), not two full UNet copies.
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def train_step(self, batch: dict, random: RowRandom) -> dict:
        z0, cond = batch_inputs(self.model, batch, self.config.data.resolution)
        d = draw(z0, cond, self.schedule, self.config.icd.guidance_scales, random)
        names = list(self.weights)
        groups = [names] if self.config.icd.schedule == "summed" else [[name] for name in names]
        calls, rows = self.runner.calls, self.runner.rows
        values = {}
        for group in groups:
            with self.accelerator.autocast():
                losses = self.runner.run({name: LOSSES[name](d, self.schedule, self.distance) for name in group})
            self.accelerator.backward(sum(self.weights[name] * losses[name] for name in group))
            clip_and_step(self)
            values.update({f"loss_{name}": loss.detach() for name, loss in losses.items()})
        values["unet_calls"] = self.runner.calls - calls
        values["unet_passes"] = (self.runner.rows - rows) / z0.shape[0]  # in batch-sized passes
        return values

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        with self.accelerator.autocast():
            if self._probe is None:
                eval_batch = first_items(self.dataset, self.config.train.eval_samples)
                z0, cond = batch_inputs(self.model, eval_batch, self.config.data.resolution)
                icd = self.config.icd
                self._probe = ICDProbe(self.teacher, self.embed_dim, z0, cond, self.schedule, icd.forward_timesteps,
                                       icd.reverse_timesteps, icd.eval_guidance)
            return self._probe(self.students["forward"], self.students["reverse"])

    def save(self) -> None:
        write_icd_model(self.output, self.model.manifest, self.config,
                        {direction: lora_weights(student) for direction, student in self.students.items()})

    def _save_hook(self, models, weights, folder) -> None:
        if self.accelerator.is_main_process:
            for direction, student in self.students.items():
                save_lora(student, Path(folder) / f"{direction}.safetensors")
        weights.clear()

    def _load_hook(self, models, folder) -> None:
        models.clear()
        for direction, student in self.students.items():
            load_lora(student, Path(folder) / f"{direction}.safetensors")


def train_icd(config: ICDConfig, output: str | Path, resume: bool = False) -> dict:
    """Run stage 2 into `output`; returns the summary of loop.fit."""
    return run(ICDStage, config, Path(output), resume)
