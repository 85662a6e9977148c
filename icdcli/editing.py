"""What an edit or a generation will do, decided before any model runs: the model's edit defaults, the
guidance on each decoding step, Prompt-to-Prompt's settings and the one strength knob that moves them together.
Torch-free, so that a command served by `icd serve` plans, checks and records its jobs without importing torch."""

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


# How the notes about one picture begin (what a blend's map selected): they are told for each item, while
# the notes about the settings (an empty window, a word not in the prompt) are told once for a batch.
MASK_WORDS_NOTE = "--mask-words"


@dataclass
class P2PConfig:
    """How strongly the edit follows the source (fractions of the decoding steps) and what it stresses."""

    cross_replace: float = 0.3
    self_replace: float = 0.6
    amplify: dict[str, float] | None = None  # None: new target words (not stopwords) x DEFAULT_AMPLIFY
    blend: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (source words, target words)
    blend_threshold: float = 0.3


# --strength: 0 keeps the photo (no guidance, tau 0 so `swap` decodes under the source prompt on every step,
# every attention map from the source), DEFAULT_STRENGTH is the model's own edit settings, 1 follows the
# target (the model's guidance on every step, no attention map from the source). Between those three
# points each knob moves linearly. Guidance stays at the model's default above DEFAULT_STRENGTH: that
# default is the top of the range the released models were trained on.
DEFAULT_STRENGTH = 0.5
STRENGTH_KNOBS = ("guidance", "tau", "cross_replace", "self_replace")


def strength_settings(manifest: Manifest, strength: float, **given: float | None) -> dict:
    """The keyword arguments of `icd.pipeline.edit` (guidance, tau, p2p) that `strength` in [0, 1] stands
    for on this model; a knob in `given` (guidance, tau, cross_replace, self_replace) that is not None keeps
    its value, as an option given on the command line wins over --strength."""
    if not 0.0 <= strength <= 1.0:
        raise ICDError(f"strength must be between 0 and 1, got {strength}")
    unknown = set(given) - set(STRENGTH_KNOBS)
    if unknown:
        raise TypeError(f"strength_settings: unknown knobs {', '.join(sorted(unknown))}")
    defaults, windows = edit_settings(manifest), P2PConfig()
    keep = (0.0, 0.0, 1.0, 1.0)
    middle = (defaults.guidance, defaults.tau, windows.cross_replace, windows.self_replace)
    follow = (defaults.guidance, 1.0, 0.0, 0.0)
    low, high, share = (keep, middle, strength / DEFAULT_STRENGTH) if strength <= DEFAULT_STRENGTH else \
        (middle, follow, (strength - DEFAULT_STRENGTH) / (1.0 - DEFAULT_STRENGTH))
    knobs = {name: given[name] if given.get(name) is not None else round(a + (b - a) * share, 6)
             for name, a, b in zip(STRENGTH_KNOBS, low, high)}
    return {"guidance": knobs["guidance"], "tau": knobs["tau"],
            "p2p": P2PConfig(cross_replace=knobs["cross_replace"], self_replace=knobs["self_replace"])}
