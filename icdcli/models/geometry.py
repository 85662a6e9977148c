"""Image-size rules of a model, read from its base's config files alone (no weights, no diffusers import),
so that a bad --width or --height is a usage error before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

from .manifest import Manifest


def multiple_of(vae_config: dict, unet_config: dict) -> int:
    """Image sides must divide by this so every UNet downsampling stays exact (64 SD1.5, 32 SDXL)."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return vae_factor * 2 ** (len(unet_config["up_block_types"]) - 1)


def _base_config(base: str, part: str) -> dict | None:
    """`part`/config.json of a local base folder, or of a hub base already in the Hugging Face cache."""
    if Path(base).is_dir():
        path = Path(base) / part / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base, f"{part}/config.json")
        path = Path(found) if isinstance(found, str) else None
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def size_multiple(manifest: Manifest) -> int | None:
    """The model's size multiple, or None when its base's configs are not on disk (loading will say so)."""
    vae, unet = _base_config(manifest.base, "vae"), _base_config(manifest.base, "unet")
    try:
        return multiple_of(vae, unet) if vae and unet else None
    except (KeyError, TypeError):
        return None
