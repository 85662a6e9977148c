"""What both training stages share: the Accelerator, the data loader, the step loop with its logs, checkpoints
and resume, and the output manifest.

Runs single-process on a CPU and unchanged under `accelerate launch` or `torchrun` (DDP, one or many nodes, GPUs
or CPU processes over gloo). Every iteration's random draws are seeded by (seed, batch index) and made for the
whole global batch, each process keeping its own rows (losses.RowRandom): a resumed run draws what the
uninterrupted one would have, without storing generator states, and N processes of batch B train what one
process of batch N x B does. Logged training values are the means over all processes.

The model folder is self-contained: the weights it builds on (the teacher, a local base folder) are hard-linked
inside where the filesystem allows (icd's writers replace files by renaming, so rewriting the original never
changes the link) and copied otherwise. Every file the run writes appears atomically.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from icd.errors import ICDError
from icd.files import atomic_write
from icd.models.loading import DTYPES, PRECISIONS, Model, resolve_dtype
from icd.models.manifest import MANIFEST_NAME, Manifest

from .config import ConfigError, TrainSection, flat_scalars, to_json
from .data import build_dataset
from .losses import RowRandom

log = logging.getLogger("icd")
CHECKPOINTS = "checkpoints"
WEIGHT_DTYPES = DTYPES | {"no": torch.float32}  # by accelerate's mixed_precision


def mixed_precision(train: TrainSection) -> str:
    """auto = the app's --dtype auto (fp16 on a GPU, the paper's setting; full precision on the CPU)."""
    cuda = torch.cuda.is_available()
    if train.mixed_precision == "auto":
        dtype = resolve_dtype("auto", torch.device("cuda" if cuda else "cpu"))
        return "no" if dtype == torch.float32 else PRECISIONS[dtype]
    if train.mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision = fp16 needs a GPU: use bf16 or no on the CPU")
    return train.mixed_precision


def make_accelerator(train: TrainSection, output: Path):
    if importlib.util.find_spec("accelerate") is None:
        raise ICDError('training needs accelerate: pip install "icd[train]"')
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration, set_seed

    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=mixed_precision(train),
        # Steps are counted by optimizer updates, so the end of an epoch must not force an early one.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=train.gradient_accumulation,
                                                                sync_with_dataloader=False),
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
        # The same shuffled order on every process (each takes its shard), reproducible per epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
    )
    set_seed(train.seed)  # the same initial weights everywhere (DDP also broadcasts them from process 0)
    return accelerator


def cpu_processes() -> bool:
    """Whether several processes were launched (torchrun, `accelerate launch --multi_gpu`) on a machine without
    an accelerator. accelerate joins such processes into one gloo run only when told that the run is on the CPU;
    otherwise each takes itself for a lone run and trains the whole data set alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen weights: the mixed-precision type (trained LoRA/UNet masters stay fp32)."""
    return WEIGHT_DTYPES[accelerator.mixed_precision]


def check_output(output: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; refuses to train over a finished or started run without --resume."""
    checkpoints = sorted((output / CHECKPOINTS).glob("step-*"))
    if resume:
        if not checkpoints:
            raise ICDError(f"{output}: no checkpoint to resume from")
        return checkpoints[-1]
    if checkpoints or (output / MANIFEST_NAME).exists():
        raise ICDError(f"{output} already holds a training run: use --resume, or another --output")
    return None


def endless(loader, accelerator, consumed: int):
    """Batches forever, starting after the `consumed` first ones (epochs reshuffled reproducibly)."""
    epoch, skip = divmod(consumed, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0


class Stage(Protocol):
    config: object
    accelerator: object
    loader: object
    optimizer: object
    models: tuple  # the prepared (trained) models

    def train_step(self, batch: dict, random: RowRandom) -> dict[str, torch.Tensor | float]: ...

    def evaluate(self) -> dict[str, float]: ...

    def save(self) -> None: ...


class Progress:
    """The step count, saved in every checkpoint."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


class MetricsLog:
    """Scalars to logs/metrics.jsonl (always) and to TensorBoard when it is installed; main process only. The
    log is small (a line per logged step), so each write replaces it whole: a crash never leaves a torn line. A
    resumed run keeps the lines up to its checkpoint's step and drops those of the steps it repeats."""

    def __init__(self, accelerator, output: Path, hparams: dict, resumed_step: int | None = None):
        self.accelerator, self.file = accelerator, output / "logs" / "metrics.jsonl"
        self.lines: list[str] = []
        if accelerator.is_main_process and resumed_step is not None and self.file.is_file():
            self.lines = [line + "\n" for line in self.file.read_text().splitlines()
                          if line.strip() and json.loads(line)["step"] <= resumed_step]
        accelerator.init_trackers("icd-train", config=hparams)

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            self.lines.append(json.dumps({"step": step, **values}) + "\n")
            atomic_write(self.file, lambda temporary: temporary.write_text("".join(self.lines)), overwrite=True)
        self.accelerator.log(values, step=step)


def mean_over_processes(accelerator, sums: dict, count: int) -> dict[str, float]:
    """The means of `sums` over `count` iterations and over all processes (each has its own rows' values)."""
    means = {name: float(total) / count for name, total in sums.items()}
    if accelerator.num_processes == 1:
        return means
    local = torch.tensor(list(means.values()), device=accelerator.device)
    return dict(zip(means, accelerator.reduce(local, reduction="mean").tolist()))


def _save_checkpoint(accelerator, output: Path, step: int, keep: int) -> None:
    """Every process writes its part into a hidden folder, renamed to step-N once all are done: a run killed
    while saving leaves no step-N that --resume would take for complete."""
    final = output / CHECKPOINTS / f"step-{step:07d}"
    partial_folder = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process and partial_folder.exists():  # left by a run killed while saving
        shutil.rmtree(partial_folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial_folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial_folder, final)
        for old in sorted((output / CHECKPOINTS).glob("step-*"))[:-keep]:
            shutil.rmtree(old)


def fit(stage: Stage, train: TrainSection, output: Path, hparams: dict, resume_from: Path | None = None) -> dict:
    """Train to train.max_steps; returns the evaluations before/after and the speed of the steps."""
    from tqdm.auto import tqdm

    accelerator = stage.accelerator
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        log.info("resumed from %s at step %d", resume_from, progress.step)
    metrics = MetricsLog(accelerator, output, hparams, None if resume_from is None else progress.step)
    summary: dict = {"start_step": progress.step}

    def evaluate(key: str) -> None:
        if not train.eval_samples:
            return
        if accelerator.is_main_process:
            summary[key] = stage.evaluate()
            metrics.write(progress.step, {f"eval/{name}": value for name, value in summary[key].items()})
        accelerator.wait_for_everyone()

    if progress.step == 0:
        evaluate("eval_before")
    batches = endless(stage.loader, accelerator, progress.step * train.gradient_accumulation)
    bar = tqdm(total=train.max_steps, initial=progress.step, disable=not accelerator.is_main_process,
               desc="training", dynamic_ncols=True)
    window: dict = {}  # sums of the step values since the last log line
    window_count, seconds, micro = 0, 0.0, progress.step * train.gradient_accumulation
    while progress.step < train.max_steps:
        started = time.perf_counter()
        random = RowRandom(train.seed + micro, accelerator.process_index, accelerator.num_processes)
        with accelerator.accumulate(*stage.models):
            values = stage.train_step(next(batches), random)
        micro, window_count = micro + 1, window_count + 1
        for name, value in values.items():
            window[name] = window.get(name, 0.0) + value
        seconds += time.perf_counter() - started
        if not accelerator.sync_gradients:
            continue
        progress.step += 1
        bar.update(1)
        last = progress.step == train.max_steps
        if progress.step % train.log_every == 0 or last:
            summary["train"] = mean_over_processes(accelerator, window, window_count)
            window, window_count = {}, 0
            bar.set_postfix({name: f"{value:.4g}" for name, value in summary["train"].items() if "loss" in name})
            metrics.write(progress.step, {f"train/{name}": value for name, value in summary["train"].items()})
        if progress.step % train.checkpoint_every == 0 or last:
            _save_checkpoint(accelerator, output, progress.step, train.keep_checkpoints)
        if train.eval_every and progress.step % train.eval_every == 0 and not last:
            evaluate(f"eval_{progress.step}")
    bar.close()
    steps = progress.step - summary["start_step"]
    summary.update(steps=steps, train_seconds=seconds, iterations_per_second=steps / seconds if seconds else 0.0)
    evaluate("eval_after")
    if accelerator.is_main_process:
        stage.save()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def load_model(manifest: Manifest, accelerator, resolution: int) -> Model:
    """The model's text encoders and VAE in the dtype of frozen weights, for a UNet that takes `resolution`."""
    model = Model.load(manifest, accelerator.device, weight_dtype(accelerator))
    if resolution % model.size_multiple:
        raise ICDError(f"data.resolution {resolution} is not a multiple of {model.size_multiple}, "
                       f"which this model's UNet needs")
    return model


def prepare(stage, trained: tuple, groups: list[list[torch.nn.Parameter]]) -> None:
    """The stage's data set, then its `trained` models, one AdamW (a parameter group per model) and the data
    loader as accelerate prepares them: `stage.models`, `stage.optimizer` and `stage.loader`."""
    config, accelerator, train = stage.config, stage.accelerator, stage.config.train
    stage.dataset = build_dataset(config.data, stage.model, accelerator)
    optimizer = torch.optim.AdamW([{"params": params} for params in groups], lr=train.lr,
                                  betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                                  weight_decay=train.weight_decay)
    images, processes, workers = len(stage.dataset), accelerator.num_processes, config.data.workers
    if images < train.batch_size * processes:
        raise ICDError(f"{images} images are fewer than one batch ({train.batch_size} x {processes} processes)")
    loader = DataLoader(stage.dataset, batch_size=train.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    *models, stage.optimizer, stage.loader = accelerator.prepare(*trained, optimizer, loader)
    stage.models = tuple(models)


def clip_and_step(stage) -> None:
    """Clip each trained model's gradient norm separately (as the official code does), then step."""
    accelerator, train = stage.accelerator, stage.config.train
    if accelerator.sync_gradients:
        accelerator.unscale_gradients()
        for model in stage.models:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)


def run(make_stage, config, output: Path, resume: bool) -> dict:
    """Train one stage into `output` (the model folder, logs, checkpoints and the effective config.json)."""
    resume_from = check_output(output, resume)
    accelerator = make_accelerator(config.train, output)
    stage = make_stage(config, output, accelerator)  # checks the settings against the model: nothing written yet
    output.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        atomic_write(output / "config.json", lambda temporary: temporary.write_text(to_json(config)), overwrite=True)
    return fit(stage, config.train, output, flat_scalars(config), resume_from)
