"""Tiny SD1.5- and SDXL-shaped iCD models built offline from configs.

They have random weights, so their pictures are noise, but every file is in the official format
(a diffusers base folder, a teacher `.pt`, peft-format forward and reverse LoRAs and an `icd.json`),
so the whole loading and editing path runs on them: in the tests and in `icd demo`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import CLIPTokenizer

# Characters the tiny tokenizer knows; every other character is dropped by CLIP's BPE as unknown.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (a word is several tokens), written to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for char in _ALPHABET:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


# The LoRA targets of the official iCD training (matched as module-name suffixes).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TINY_TIMESTEPS = {"forward_timesteps": [19, 259, 519, 779], "reverse_timesteps": [259, 519, 779, 999]}
TINY_RESOLUTION = 128


def _tiny_unet_config(kind: str) -> dict:
    """Three levels (latent 16 -> 8 -> 4 at 128 px) so attention runs at several resolutions."""
    config = dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=TINY_RESOLUTION // 8,
        in_channels=4, out_channels=4, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    if kind == "sdxl":
        config.update(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return config


def _tiny_text_encoder(projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=3, vocab_size=100, projection_dim=32,
                            max_position_embeddings=77)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _peft_lora(unet, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random LoRA weights in the official peft key format (no alpha stored), on every target layer."""
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(LORA_TARGETS) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        weight = module.weight
        down_shape = (rank, weight.shape[1], *weight.shape[2:])
        up_shape = (weight.shape[0], rank, *((1, 1) if weight.dim() == 4 else ()))
        prefix = f"unet.base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(down_shape, generator=generator) * 0.5
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(up_shape, generator=generator) * 0.5
    return tensors


def build_tiny_model(directory: str | Path, kind: str = "sd15", seed: int = 0, lora_rank: int = 4) -> Path:
    """Write a complete tiny iCD model (official file formats) into `directory`; returns its icd.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    directory = Path(directory)
    staging = directory.with_name(directory.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = tiny_tokenizer(staging / "vocab")
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=TINY_RESOLUTION, force_upcast=kind == "sdxl")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    unet_config = _tiny_unet_config(kind)
    components = dict(vae=vae, unet=UNet2DConditionModel(**unet_config), scheduler=scheduler, tokenizer=tokenizer)
    if kind == "sdxl":
        pipeline = StableDiffusionXLPipeline(text_encoder=_tiny_text_encoder(False), text_encoder_2=_tiny_text_encoder(True),
                                             tokenizer_2=tokenizer, **components)
    else:
        pipeline = StableDiffusionPipeline(text_encoder=_tiny_text_encoder(False), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False, **components)
    pipeline.save_pretrained(staging / "base")
    shutil.rmtree(staging / "vocab")

    teacher = UNet2DConditionModel(**unet_config, time_cond_proj_dim=512)
    torch.save(teacher.state_dict(), staging / "teacher.pt")
    for direction in ("forward", "reverse"):
        save_file(_peft_lora(teacher, lora_rank, generator), staging / f"tiny-{direction}.safetensors")
    manifest = {
        "name": f"tiny-{kind}", "kind": kind, "base": "base", "teacher": "teacher.pt", "guidance_embed_dim": 512,
        "forward_lora": "tiny-forward.safetensors", "reverse_lora": "tiny-reverse.safetensors", "lora_alpha": 8,
        **TINY_TIMESTEPS, "resolution": TINY_RESOLUTION,
    }
    (staging / "icd.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory / "icd.json"
