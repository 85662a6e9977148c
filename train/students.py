"""The forward and reverse students: peft LoRAs on copies of the frozen teacher, saved in the official format.

Official files hold `unet.base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (peft keys behind
diffusers' `unet.` prefix) and no alpha: the alpha goes into icd.json, as icd.models.lora expects.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from icd.errors import ModelError, first_line
from icd.files import atomic_write

from .config import ConfigError, LoraSection


def make_student(teacher, lora: LoraSection, gradient_checkpointing: bool):
    """A copy of the teacher with LoRA adapters (B = 0, so it starts equal to the teacher); only they train.
    peft keeps the adapters in fp32 when the copied weights are fp16/bf16 (the mixed-precision masters)."""
    from peft import LoraConfig, get_peft_model

    unet = copy.deepcopy(teacher)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        return get_peft_model(unet, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets)))
    except ValueError as err:  # e.g. no target module found
        raise ConfigError(f"lora.targets: {first_line(err)}") from None


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_weights(student) -> dict[str, torch.Tensor]:
    """The student's LoRA tensors under the official key names (fp32, CPU)."""
    from peft import get_peft_model_state_dict

    return {f"unet.{key}": value.detach().float().cpu().contiguous()
            for key, value in get_peft_model_state_dict(student).items()}


def save_lora(student, path: Path) -> None:
    atomic_write(path, lambda temporary: save_file(lora_weights(student), str(temporary)), overwrite=True)


def load_lora(student, path: Path) -> None:
    """Put a file written by save_lora back into the student (resuming from a checkpoint)."""
    from peft import set_peft_model_state_dict

    state = {key.removeprefix("unet."): value for key, value in load_file(str(path)).items()}
    result = set_peft_model_state_dict(student, state)
    if result.unexpected_keys:
        raise ModelError(f"{path}: LoRA keys that the student lacks, e.g. {result.unexpected_keys[0]}")
