"""What an edit or a generation will do, decided before any model runs: the model's edit defaults, the
guidance on each decoding step, and Prompt-to-Prompt's settings. Torch-free, so that a command served by
`icd serve` plans, checks and records its jobs without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .core.schedule import dynamic_guidance, reverse_jumps
from .errors import ICDError
from .models.manifest import EDIT_METHODS, Manifest


@dataclass(frozen=True)
class EditDefaults:
    method: str
    guidance: float
    tau: float


# The official launch settings: SD1.5 edits with Prompt-to-Prompt at w 19, tau 0.8; SDXL with the prompt
# swap at w 19, tau 0.7. Generation uses a constant w of 7.
EDIT_DEFAULTS = {"sd15": EditDefaults("p2p", 19.0, 0.8), "sdxl": EditDefaults("swap", 19.0, 0.7)}
GENERATE_GUIDANCE, GENERATE_TAU = 7.0, 1.0


def edit_settings(manifest: Manifest, method: str | None = None, guidance: float | None = None,
                  tau: float | None = None) -> EditDefaults:
    """The model's defaults (its manifest's "edit" entry, else its kind's) with the given values in their place."""
    defaults = replace(EDIT_DEFAULTS[manifest.kind], **dict(manifest.edit_defaults))
    settings = EditDefaults(method or defaults.method, defaults.guidance if guidance is None else guidance,
                            defaults.tau if tau is None else tau)
    if settings.method not in EDIT_METHODS:
        raise ICDError(f"unknown edit method '{settings.method}': choose {', '.join(EDIT_METHODS)}")
    return settings


def guidance_on_steps(manifest: Manifest, guidance: float, tau: float) -> list[tuple[int, float]]:
    """(t, w) for each decoding step, recorded with results to show what --guidance and --tau did."""
    return [(jump.t, dynamic_guidance(guidance, jump.t, tau)) for jump in reverse_jumps(list(manifest.reverse_timesteps))]


@dataclass
class P2PConfig:
    """How strongly the edit follows the source (fractions of the decoding steps) and what it stresses."""

    cross_replace: float = 0.3
    self_replace: float = 0.6
    amplify: dict[str, float] | None = None  # None: new target words (not stopwords) x DEFAULT_AMPLIFY
    blend: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (source words, target words)
    blend_threshold: float = 0.3
