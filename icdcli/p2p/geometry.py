"""Where Prompt-to-Prompt acts in a diffusers UNet: its resolution levels, the level of an attention module,
and the level whose cross-attention LocalBlend reads."""

from __future__ import annotations

import math

LEVELS = 6  # self-attention flags per step, one per UNet resolution level (SD1.5 has 4, SDXL 3)


def level_grid(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """The (h, w) of UNet resolution level `level` (0: the latent; each level halves, rounding up)."""
    h, w = latent_size
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def attention_level(module_name: str, levels: int) -> int:
    """The resolution level of an attention module, from its name in a diffusers UNet with `levels` levels."""
    block, _, rest = module_name.partition(".")
    if block == "mid_block":
        return levels - 1
    index = int(rest.split(".", 1)[0])
    return index if block == "down_blocks" else levels - 1 - index


def blend_level(config) -> int:
    """The level whose cross-attention LocalBlend reads: latent/4 (16x16 at 512 px), else the coarsest with some."""
    levels = len(config["block_out_channels"])
    found = {i for i, kind in enumerate(config["down_block_types"]) if "CrossAttn" in kind}
    found |= {levels - 1 - j for j, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    if config.get("mid_block_type") and "CrossAttn" in config["mid_block_type"]:
        found.add(levels - 1)
    if not found:
        raise ValueError("prompt-to-prompt needs a UNet with cross-attention")
    return 2 if 2 in found else max(found)


