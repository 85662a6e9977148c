"""What an edit or a generation will do, decided before any model runs (torch-free: `icd serve` plans, checks
and records jobs without torch): the model's edit defaults, each step's guidance, Prompt-to-Prompt's settings,
the one strength knob that moves them together, and `EditPlan`, every setting of one edit resolved once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .core.schedule import dynamic_guidance, reverse_jumps
from .errors import ICDError, UsageError
from .limits import MAX_SEED
from .models.official import EDIT_METHODS

if TYPE_CHECKING:  # not imported: the command line's help reads this module's constants
    from .models.manifest import Manifest


@dataclass(frozen=True)
class EditDefaults:
    method: str
    guidance: float
    tau: float


# The official launch settings (generation's w is constant).
EDIT_DEFAULTS = {"sd15": EditDefaults("p2p", 19.0, 0.8), "sdxl": EditDefaults("swap", 19.0, 0.7)}
GENERATE_GUIDANCE, GENERATE_TAU = 7.0, 1.0
# Prompt-to-Prompt's official windows: the shares of decoding steps whose cross-/self-attention are the source's.
DEFAULT_CROSS_REPLACE, DEFAULT_SELF_REPLACE = 0.3, 0.6
DEFAULT_AMPLIFY = 4.0  # p2p: each new target word's attention, times this
# Each number an edit takes, its range (inclusive): what options, job files, records and sweeps accept.
BOUNDS = {"guidance": (0.0, math.inf), "tau": (0.0, 1.0), "strength": (0.0, 1.0), "cross_replace": (0.0, 1.0),
          "self_replace": (0.0, 1.0), "mix": (0.0, 1.0)}
# A folder's Hugging Face style metadata: each image's caption (its edits' source prompt) or `icd eval`'s rows.
CAPTIONS_NAME = "metadata.jsonl"


def model_defaults(manifest: Manifest) -> EditDefaults:
    """The model's own edit settings: its manifest's "edit" entry, else its kind's official ones."""
    return replace(EDIT_DEFAULTS[manifest.kind], **dict(manifest.edit_defaults))


def guidance_on_steps(manifest: Manifest, guidance: float, tau: float) -> list[tuple[int, float]]:
    """(t, w) for each decoding step, recorded with results to show what --guidance and --tau did."""
    jumps = reverse_jumps(list(manifest.reverse_timesteps))
    return [(jump.t, dynamic_guidance(guidance, jump.t, tau)) for jump in jumps]


# How the notes about one picture begin (what a blend's map selected): told for each item, unlike the notes
# about the settings (an empty window, a word not in the prompt), told once for a batch.
MASK_WORDS_NOTE = "--mask-words"


@dataclass(frozen=True)
class P2PConfig:
    """How strongly the edit follows the source (fractions of the decoding steps) and what it stresses."""

    cross_replace: float = DEFAULT_CROSS_REPLACE
    self_replace: float = DEFAULT_SELF_REPLACE
    amplify: Mapping[str, float] | None = None  # None: new target words (not stopwords) x DEFAULT_AMPLIFY
    blend: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (source words, target words)
    blend_threshold: float = 0.3


def parse_amplify(values) -> dict[str, float] | None:
    """WORD=FACTOR values as {word: factor}; a malformed one is a ValueError naming it."""
    if not values:
        return None
    amplify = {}
    for value in values:
        word, _, factor = value.partition("=")
        try:
            number = float(factor)
        except ValueError:
            number = math.nan
        if not word.strip() or not math.isfinite(number) or number < 0:
            raise ValueError(f"'{value}' is not WORD=FACTOR with a finite factor >= 0, e.g. bear=4")
        amplify[word.strip().lower()] = number
    return amplify


def parse_blend(value: str | None) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """SRC_WORDS:TGT_WORDS as two tuples of words; a malformed value is a ValueError naming it."""
    if value is None:
        return None
    src, sep, tgt = value.partition(":")
    if not sep or not src.split() or not tgt.split():
        raise ValueError(f"'{value}' is not SRC_WORDS:TGT_WORDS, e.g. pug:bear")
    return tuple(src.lower().split()), tuple(tgt.lower().split())


# --strength: from the reconstruction (0) to the strongest edit of the model's defaults (1), each knob linear:
# w from 0 to the default; tau from the default to 1; Prompt-to-Prompt's windows from 1 to 0; `mix`, the share
# of the edit kept, from 0 to 1. The mix makes 0 the reconstruction for every method and prompt pair (at w = 0
# the target prompt still decodes something else, and the other knobs barely act on mini). Strength 1 is the
# defaults with guidance on every step and no window, so the defaults (no --strength) are not on this line.
STRENGTH_KNOBS = ("guidance", "tau", "cross_replace", "self_replace", "mix")


def strength_knobs(manifest: Manifest, strength: float) -> dict[str, float]:
    """The values of STRENGTH_KNOBS that `strength` in [0, 1] stands for on this model."""
    if not 0.0 <= strength <= 1.0:
        raise ICDError(f"strength must be between 0 and 1, got {strength}")
    defaults = model_defaults(manifest)
    keep = {"guidance": 0.0, "tau": defaults.tau, "cross_replace": 1.0, "self_replace": 1.0, "mix": 0.0}
    follow = {"guidance": defaults.guidance, "tau": 1.0, "cross_replace": 0.0, "self_replace": 0.0, "mix": 1.0}
    return {name: round(keep[name] + (follow[name] - keep[name]) * strength, 6) for name in STRENGTH_KNOBS}


@dataclass(frozen=True)
class EditPlan:
    """Every setting of one edit, resolved (`resolve_edit`) for everything downstream to take as it is. `source`
    is None for a latent file until its recorded prompt is read; `strength` is only recorded (its knobs are set)."""

    source: str | None
    target: str
    method: str
    guidance: float
    tau: float
    p2p: P2PConfig = field(default_factory=P2PConfig)
    seed: int = 0
    mask: Path | None = None  # where the edit may act (white) and where the photo is kept (black)
    keep_outside: bool = True  # with a mask: the input photo's own pixels outside it
    strength: float | None = None
    mix: float = 1.0  # the share of the edit kept: below 1 the target row leans to the source row on every step

    def record(self) -> dict:
        """The settings as a result's metadata records them (and `--from` reads them back: `recorded`)."""
        fields = {"prompt": self.target, "source_prompt": self.source, "method": self.method,
                  "guidance_w": self.guidance, "tau": self.tau, "strength": self.strength, "mix": self.mix}
        if self.method == "p2p":
            fields |= {"cross_replace": self.p2p.cross_replace, "self_replace": self.p2p.self_replace}
            if self.p2p.amplify is not None:
                fields["amplify"] = [f"{word}={factor:g}" for word, factor in self.p2p.amplify.items()]
            if self.p2p.blend is not None:
                fields["blend"] = " ".join(self.p2p.blend[0]) + ":" + " ".join(self.p2p.blend[1])
        return fields

    def to_json(self) -> dict:
        """The plan as JSON values (for `icd serve`'s wire); `from_json` gives it back."""
        return {**asdict(self), "mask": None if self.mask is None else str(self.mask)}

    @classmethod
    def from_json(cls, fields: dict) -> EditPlan:
        p2p = dict(fields["p2p"])
        blend = p2p.get("blend")
        p2p["blend"] = None if blend is None else (tuple(blend[0]), tuple(blend[1]))
        mask = fields.get("mask")
        return cls(**{**fields, "p2p": P2PConfig(**p2p), "mask": None if mask is None else Path(mask)})


# The settings one source of them may give, by the names EditPlan resolves them under.
SETTINGS = ("source", "target", "seed", "method", "guidance", "tau", "cross_replace", "self_replace", "amplify",
            "blend", "mask", "keep_outside", "strength", "mix")
P2P_ONLY = ("cross_replace", "self_replace", "amplify", "blend")


@dataclass(frozen=True)
class Given:
    """The settings one source gave (a `--from` record, a command line, a job row), with how that source
    names them, so that an error speaks its language (`--mask-words`, or a job file's `mask_words` column)."""

    values: Mapping[str, object]
    names: Mapping[str, str] = field(default_factory=dict)
    where: str = ""  # what an error starts with, e.g. "edits.csv row 3: "

    def __post_init__(self):
        unknown = set(self.values) - set(SETTINGS)
        if unknown:
            raise TypeError(f"Given: unknown settings {', '.join(sorted(unknown))}")

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None

    def name(self, setting: str) -> str:
        return self.names.get(setting, setting)


def resolve_edit(manifest: Manifest, *sources: Given) -> EditPlan:
    """The one place an edit's settings are decided: the model's defaults, then each source in order (`--from`'s
    record, then a command line or job row), a later one winning; `strength` sets the STRENGTH_KNOBS that no
    source at or after its own gave. Prompt-to-Prompt's settings with another method are an error where that
    method was chosen or later, and dropped before it (a rerun of a p2p edit with `--method swap`)."""
    def latest(name: str, default=None, within=sources):
        return next((source.values[name] for source in reversed(within) if source.has(name)), default)

    defaults = model_defaults(manifest)
    chosen_at = next((i for i in reversed(range(len(sources))) if sources[i].has("method")), 0)
    method = latest("method", defaults.method)
    if method not in EDIT_METHODS:
        raise UsageError(f"unknown edit method '{method}': choose {', '.join(EDIT_METHODS)}")
    if method != "p2p":
        for source in sources[chosen_at:]:
            if given := [source.name(name) for name in P2P_ONLY if source.has(name)]:
                raise UsageError(f"{source.where}{', '.join(given)} apply to {source.name('method')} p2p, "
                                 f"not {method}")
    knobs = {"guidance": defaults.guidance, "tau": defaults.tau, "cross_replace": DEFAULT_CROSS_REPLACE,
             "self_replace": DEFAULT_SELF_REPLACE, "mix": 1.0}
    strength_at = next((i for i in reversed(range(len(sources))) if sources[i].has("strength")), None)
    if strength_at is not None:
        knobs |= strength_knobs(manifest, sources[strength_at].values["strength"])
    for source in sources[strength_at or 0:]:
        knobs |= {name: source.values[name] for name in STRENGTH_KNOBS if source.has(name)}
    p2p_sources = sources if method == "p2p" else ()
    p2p = P2PConfig(knobs["cross_replace"], knobs["self_replace"], latest("amplify", within=p2p_sources),
                    latest("blend", within=p2p_sources))
    mask = latest("mask")
    return EditPlan(latest("source"), latest("target"), method, knobs["guidance"], knobs["tau"], p2p,
                    latest("seed", 0), None if mask is None else Path(mask), latest("keep_outside", True),
                    latest("strength"), knobs["mix"])


# How a result's metadata records each setting (`EditPlan.record`), with the type and range it must have.
RECORDED = {"source": ("source_prompt", str, None), "target": ("prompt", str, None),
            "seed": ("seed", int, (0, MAX_SEED)), "method": ("method", str, None),
            "guidance": ("guidance_w", float, BOUNDS["guidance"]), "tau": ("tau", float, BOUNDS["tau"]),
            "cross_replace": ("cross_replace", float, BOUNDS["cross_replace"]),
            "self_replace": ("self_replace", float, BOUNDS["self_replace"]), "mask": ("mask", str, None),
            "keep_outside": ("keep_outside", bool, None), "strength": ("strength", float, BOUNDS["strength"]),
            "mix": ("mix", float, BOUNDS["mix"]), "amplify": ("amplify", list, None), "blend": ("blend", str, None)}


def recorded(fields: Mapping, folder: Path) -> Given:
    """The first source of a rerun (`icd edit --from`): a result's recorded settings, each checked for its type
    and range (a ValueError names the first that is not), a mask path relative to the result's `folder`."""
    values = {}
    for setting, (key, kind, bounds) in RECORDED.items():
        value = fields.get(key)
        if value is None:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind or (kind is list and not all(isinstance(item, str) for item in value)):
            expected = "list of strings" if kind is list else kind.__name__
            raise ValueError(f"its recorded {key} is {value!r}, not a {expected}")
        if bounds is not None and not (bounds[0] <= value <= bounds[1] and math.isfinite(value)):
            raise ValueError(f"its recorded {key} {value!r} is outside {bounds[0]:g}..{bounds[1]:g}")
        values[setting] = value
    values.setdefault("mix", 1.0)  # a record from before the mix existed was made with the whole edit
    values["amplify"] = parse_amplify(values.get("amplify"))
    values["blend"] = parse_blend(values.get("blend"))
    if "mask" in values:
        values["mask"] = folder / values["mask"]
    return Given(values, {name: f"recorded {key}" for name, (key, _, _) in RECORDED.items()})


def edit_plan(manifest: Manifest, source: str | None, target: str, **settings) -> EditPlan:
    """An edit of `source` into `target` with `settings` (SETTINGS) over the model's defaults, from Python."""
    return resolve_edit(manifest, Given({"source": source, "target": target, **settings}))
