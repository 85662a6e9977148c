"""Models built offline from configs: the published SD1.5 and SDXL architectures (`CONFIGS`) with random
weights, to measure speed anywhere (`icd bench --random-weights`), and the character-level tokenizer such models
use. The model is written once into the cache in the official formats, so that everything runs exactly as for a
downloaded model; its pictures are noise, only the timings mean something."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .cache import exclusive_lock, icd_home, writing_cache
from .manifest import MANIFEST_NAME, write_model
from .official import (DIRECTIONS, FORWARD_TIMESTEPS, GUIDANCE_EMBED_DIM, LORA_ALPHA, LORA_RANK, RESOLUTION,
                       REVERSE_TIMESTEPS)

# Characters the character-level tokenizer knows; every other character is dropped by CLIP's BPE as unknown.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def character_tokenizer(directory: str | Path):
    """A character-level CLIP tokenizer (a word is several tokens), saved in `directory` as a base's tokenizer."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for char in _ALPHABET:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(directory)
    return tokenizer


_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768, vocab_size=49408, max_position_embeddings=77)
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)

CONFIGS = {
    "sd15": {
        "unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                     cross_attention_dim=768, sample_size=64, norm_num_groups=32,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(_VAE, sample_size=512, scaling_factor=0.18215),
        "text_encoders": [_CLIP_L],
    },
    "sdxl": {
        "unet": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                     transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, sample_size=128,
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816, norm_num_groups=32,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoders": [_CLIP_L, dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280)],
    },
}
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")  # a LoRA on the attention projections: fusion does real work


def random_model_dir(kind: str) -> Path:
    return icd_home() / "models" / f"random-{kind}"


def _lora(unet, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Small random peft-format LoRA weights (official key names), so that fusing perturbs the weights mildly."""
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(LORA_LAYERS) and isinstance(module, torch.nn.Linear):
            prefix = f"unet.base_model.model.{name}"
            down = torch.randn(LORA_RANK, module.in_features, generator=generator) / module.in_features**0.5
            tensors[f"{prefix}.lora_A.weight"] = down
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.01
    return tensors


def build_random_model(kind: str) -> Path:
    """The random-weights model folder of `kind` (sd15 or sdxl), built on first use; returns its icd.json."""
    folder = random_model_dir(kind)
    if (folder / MANIFEST_NAME).is_file():
        return folder / MANIFEST_NAME
    # Two processes starting on a fresh cache: one builds, the other waits and then finds the model.
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")), writing_cache():
        if (folder / MANIFEST_NAME).is_file():
            return folder / MANIFEST_NAME
        return _build(kind, folder)


def _build(kind: str, folder: Path) -> Path:
    """Write the model folder (under build_random_model's lock; icd.json last, so a folder with one is whole)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CONFIGS[kind]
    torch.manual_seed(0)

    def base(path: Path) -> None:
        for i, encoder in enumerate(config["text_encoders"]):
            suffix = "_2" if i else ""
            character_tokenizer(path / f"tokenizer{suffix}")  # the token count, not the vocabulary, costs
            cls = CLIPTextModelWithProjection if i else CLIPTextModel
            cls(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **encoder)).save_pretrained(
                path / f"text_encoder{suffix}")
        AutoencoderKL(**config["vae"]).save_pretrained(path / "vae")
        teacher.save_config(path / "unet")

    teacher = UNet2DConditionModel(**config["unet"], time_cond_proj_dim=GUIDANCE_EMBED_DIM)
    generator = torch.Generator().manual_seed(0)
    files = {"base": base,
             "teacher.safetensors": lambda path: save_file(
                 {k: v.half().contiguous() for k, v in teacher.state_dict().items()}, str(path))}
    for direction in DIRECTIONS:
        files[f"{direction}.safetensors"] = lambda path, lora=_lora(teacher, generator): save_file(lora, str(path))
    return write_model(folder, {
        "name": f"random-{kind}", "kind": kind, "base": "base", "teacher": "teacher.safetensors",
        "guidance_embed_dim": GUIDANCE_EMBED_DIM, "forward_lora": "forward.safetensors",
        "reverse_lora": "reverse.safetensors", "lora_alpha": LORA_ALPHA, "forward_timesteps": list(FORWARD_TIMESTEPS),
        "reverse_timesteps": list(REVERSE_TIMESTEPS), "resolution": RESOLUTION[kind]}, files)
