"""Training configuration: dataclasses whose defaults are the paper's SD1.5 4-step recipe, read from TOML
(or YAML when PyYAML is installed), with `section.key=value` command-line overrides, each value coerced to its
field's type the same way, and every mistake (unknown key, wrong type, impossible setting) one ConfigError line.

The defaults depart from the authors' training code in one place, [icd] reverse_preservation_target (measured
clearly better, BENCHMARKS.md, the miniature world); the shipped preset `official` (presets/official.toml,
`--config official`) is their recipe exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from icd.core.schedule import DDIM_STEPS, NUM_TRAIN_TIMESTEPS
from icd.errors import ICDError, first_line
from icd.limits import MAX_SEED, MAX_SIDE
from icd.models.official import (FORWARD_TIMESTEPS, GUIDANCE_EMBED_DIM, GUIDANCE_SCALES, LORA_ALPHA, LORA_RANK,
                                 LORA_TARGETS, PRECISION_NAMES, REVERSE_TIMESTEPS)

SCHEDULES = ("official", "summed")
TEACHER_FINAL_STEPS = ("schedule", "boundary")
REVERSE_PRESERVATION_TARGETS = ("start", "clean")
PRESETS = Path(__file__).resolve().parent / "presets"  # shipped settings files, named by `--config NAME`
MIXED_PRECISION = ("auto", "no", *PRECISION_NAMES[1:])  # accelerate's names: "no" is fp32


class ConfigError(ICDError):
    """A configuration that cannot be used, described in one line."""


@dataclass
class ModelSection:
    path: str = ""  # an iCD model folder / icd.json, or a diffusers base folder / hub id (stage 1)


@dataclass
class DataSection:
    path: str = ""  # folder of images
    captions: str = ""  # caption file; default: metadata.jsonl or metadata.csv in the folder
    resolution: int = 512
    latent_cache: str = ""  # safetensors file of VAE latents, built on first use ("" = encode each batch)
    workers: int = 4


@dataclass
class TrainSection:
    max_steps: int = 6000
    batch_size: int = 8  # per process
    gradient_accumulation: int = 1
    lr: float = 8e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: fp16 on a GPU, none on the CPU
    gradient_checkpointing: bool = True
    seed: int = 453645634
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 500  # also evaluated before the first and after the last step
    eval_samples: int = 8  # the first images of the data set, with fixed noise; 0 = no evaluation


@dataclass
class GuidanceSection:
    """Stage 1: CFG distillation into a w-embedded teacher."""

    scales: list[float] = field(default_factory=lambda: list(GUIDANCE_SCALES))
    embed_dim: int = GUIDANCE_EMBED_DIM


@dataclass
class LoraSection:
    rank: int = LORA_RANK
    alpha: float = LORA_ALPHA
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class ICDSection:
    """Stage 2: multi-boundary forward and reverse consistency distillation."""

    forward_timesteps: list[int] = field(default_factory=lambda: list(FORWARD_TIMESTEPS))
    reverse_timesteps: list[int] = field(default_factory=lambda: list(REVERSE_TIMESTEPS))
    ddim_steps: int = DDIM_STEPS
    guidance_scales: list[float] = field(default_factory=lambda: list(GUIDANCE_SCALES))
    loss: str = "huber"  # or "l2"
    huber_c: float = 0.001
    forward_preservation: float = 1.5
    reverse_preservation: float = 1.5
    schedule: str = "official"  # official: 4 backward passes and steps per iteration; summed: one per student
    # The reverse CD teacher's DDIM step from t = 19 to 0: "schedule" lands on the noise schedule's
    # abar_0 = 0.99915 (the authors' code), "boundary" on the clean latent (alpha = 1) as every jump to 0 does.
    # No measurable difference (BENCHMARKS.md, the miniature world), so the authors' choice.
    teacher_final_step: str = "schedule"
    # Reverse preservation on the bottom segment: "start" jumps 259 -> 19 back to x_19, where the forward jump
    # started (the authors' code); "clean" jumps 259 -> 0 to the clean latent, the jump decoding makes. "start"
    # let the reverse student drift from the teacher (decode gap 10x larger), hence "clean".
    reverse_preservation_target: str = "clean"
    eval_guidance: float = 0.0  # w of the decode-gap evaluation


@dataclass
class GuidanceConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(lr=1e-5))
    guidance: GuidanceSection = field(default_factory=GuidanceSection)


@dataclass
class ICDConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    icd: ICDSection = field(default_factory=ICDSection)


Config = GuidanceConfig | ICDConfig


def _from_text(text: str, kind):
    """An override's text as the field's type: verbatim for text, comma-separated for lists, else as TOML
    reads it (numbers, booleans, [arrays])."""
    if kind is str:
        return text
    if typing.get_origin(kind) is list and not text.startswith("["):
        (item,) = typing.get_args(kind)
        return [_from_text(part.strip(), item) for part in text.split(",") if part.strip()]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(value, kind, key: str):
    """`value` checked against the declared type `kind` (int, float, bool, str or a list of those)."""
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return [_coerce(v, item, key) for v in (value if isinstance(value, list) else [value])]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # TOML and YAML both spell nan and inf
        raise ConfigError(f"{key}: must be a finite number, not {value!r}")
    return value


def _assign(config, key: str, value, from_text: bool = False) -> None:
    sections = {s.name: typing.get_type_hints(type(getattr(config, s.name))) for s in dataclasses.fields(config)}
    section, _, name = key.partition(".")
    if section not in sections:
        raise ConfigError(f"unknown section '{section}' in '{key}' (sections: {', '.join(sections)})")
    if name not in sections[section]:
        raise ConfigError(f"unknown setting '{key}' (in [{section}]: {', '.join(sections[section])})")
    kind = sections[section][name]
    try:
        parsed = _from_text(value, kind) if from_text else value
    except RecursionError:
        raise ConfigError(f"{key}: nested too deeply to be a setting") from None
    setattr(getattr(config, section), name, _coerce(parsed, kind, key))


def preset_names() -> list[str]:
    return sorted(preset.stem for preset in PRESETS.glob("*.toml"))


def _settings_file(path: str | Path) -> Path:
    """`path` itself, or the shipped preset of that name when no such file exists."""
    preset = PRESETS / f"{path}.toml"
    return preset if not Path(path).exists() and preset.is_file() else Path(path)


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file or preset (presets: {', '.join(preset_names())})"
                          ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration ({err.strerror})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use TOML") from None
        language, parse, invalid = "YAML", lambda text: yaml.safe_load(text) or {}, yaml.YAMLError
    else:
        language, parse, invalid = "TOML", tomllib.loads, tomllib.TOMLDecodeError
    try:
        data = parse(text)
    except invalid as err:
        raise ConfigError(f"{path}: not valid {language} ({first_line(err)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a configuration (nested too deeply)") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: the configuration must be sections of key = value settings")
    return data


def load_config(kind: type[Config], path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> Config:
    """Defaults, then the settings of the file (or shipped preset) `path`, then `section.key=value` overrides;
    validated."""
    config = kind()
    if path is not None:
        for section, values in _read_file(_settings_file(path)).items():
            for name, value in values.items():
                _assign(config, f"{section}.{name}", value)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"--set {override}: expected section.key=value")
        _assign(config, key.strip(), text.strip(), from_text=True)
    validate(config)
    return config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Reject settings that could only fail later, or silently train something else: the whole configuration
    is checked before anything is written (every number is finite already, `_coerce`)."""
    train, data = config.train, config.data
    _check(bool(config.model.path), "model.path: name the model to start from")
    _check(bool(data.path), "data.path: name the folder of training images")
    _check(8 <= data.resolution <= MAX_SIDE and data.resolution % 8 == 0,
           f"data.resolution: a multiple of 8 from 8 to {MAX_SIDE}")
    _check(data.workers >= 0, "data.workers: 0 (load in the training process) or a number of processes")
    for key in ("max_steps", "batch_size", "gradient_accumulation", "checkpoint_every", "log_every",
                "keep_checkpoints"):
        _check(getattr(train, key) >= 1, f"train.{key}: must be at least 1")
    _check(train.eval_every >= 0, "train.eval_every: 0 (only before and after) or a number of steps")
    _check(train.eval_samples >= 0, "train.eval_samples: 0 (no evaluation) or a number of images")
    _check(train.lr > 0, "train.lr: must be positive")
    _check(0 <= train.adam_beta1 < 1 and 0 <= train.adam_beta2 < 1, "train.adam_beta1/2: from 0 to below 1")
    _check(train.adam_eps > 0, "train.adam_eps: must be positive")
    _check(train.weight_decay >= 0, "train.weight_decay: not negative")
    _check(train.max_grad_norm > 0, "train.max_grad_norm: must be positive")
    _check(0 <= train.seed <= MAX_SEED, f"train.seed: from 0 to {MAX_SEED}")
    _check(train.mixed_precision in MIXED_PRECISION, f"train.mixed_precision: one of {', '.join(MIXED_PRECISION)}")
    scales = config.guidance.scales if isinstance(config, GuidanceConfig) else config.icd.guidance_scales
    key = "guidance.scales" if isinstance(config, GuidanceConfig) else "icd.guidance_scales"
    _check(bool(scales), f"{key}: give at least one guidance value")
    _check(min(scales) >= 0, f"{key}: w is the classical CFG scale minus one, so not negative")
    if isinstance(config, GuidanceConfig):
        _check(config.guidance.embed_dim > 0 and config.guidance.embed_dim % 2 == 0,
               "guidance.embed_dim: a positive even number")
        return
    icd, lora = config.icd, config.lora
    for key in ("forward_timesteps", "reverse_timesteps"):
        steps = getattr(icd, key)
        _check(bool(steps) and steps == sorted(set(steps)) and 0 < steps[0] and steps[-1] < NUM_TRAIN_TIMESTEPS,
               f"icd.{key}: increasing timesteps in 1..{NUM_TRAIN_TIMESTEPS - 1}")
    _check(icd.reverse_timesteps[-1] == NUM_TRAIN_TIMESTEPS - 1,
           f"icd.reverse_timesteps: decoding starts from pure noise at {NUM_TRAIN_TIMESTEPS - 1}")
    _check(icd.ddim_steps >= 1 and NUM_TRAIN_TIMESTEPS % icd.ddim_steps == 0,
           f"icd.ddim_steps: must divide {NUM_TRAIN_TIMESTEPS} (50 gives the grid 19, 39, ..., 999)")
    _check(icd.eval_guidance >= 0, "icd.eval_guidance: not negative")
    _check(icd.loss in ("huber", "l2"), "icd.loss: huber or l2")
    _check(icd.huber_c > 0, "icd.huber_c: must be positive")
    _check(icd.forward_preservation >= 0 and icd.reverse_preservation >= 0, "icd.*_preservation: not negative")
    _check(icd.schedule in SCHEDULES, f"icd.schedule: one of {', '.join(SCHEDULES)}")
    _check(icd.teacher_final_step in TEACHER_FINAL_STEPS,
           f"icd.teacher_final_step: one of {', '.join(TEACHER_FINAL_STEPS)}")
    _check(icd.reverse_preservation_target in REVERSE_PRESERVATION_TARGETS,
           f"icd.reverse_preservation_target: one of {', '.join(REVERSE_PRESERVATION_TARGETS)}")
    _check(icd.schedule == "summed" or train.gradient_accumulation == 1, "train.gradient_accumulation > 1 needs "
           "icd.schedule = 'summed' (the official schedule steps after each loss)")
    _check(lora.rank >= 1 and lora.alpha > 0 and bool(lora.targets), "lora: rank >= 1, alpha > 0 and some targets")


def to_json(config: Config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)


def flat_scalars(config: Config) -> dict[str, int | float | str | bool]:
    """`section.key` -> value with lists joined by commas: what TensorBoard's hparams accept."""
    flat = {}
    for section, values in dataclasses.asdict(config).items():
        for name, value in values.items():
            flat[f"{section}.{name}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat
