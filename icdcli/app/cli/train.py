"""`icd train guidance` and `icd train icd`. Torch, diffusers and accelerate are imported inside the commands,
so that `icd --help` stays fast; errors become their one line and exit code in the `icd` group."""

from __future__ import annotations

import click

from .options import CONTEXT, threads_given, uses


def _stage_options(command):
    command = uses("threads")(command)
    command = click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --output.")(command)
    command = click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
                           help="Folder for the trained model, logs/, checkpoints/ and config.json.")(command)
    command = click.option("--set", "settings", multiple=True, metavar="SECTION.KEY=VALUE",
                           help="Override one setting (repeatable), e.g. --set train.lr=1e-5 "
                                "--set icd.guidance_scales=0,7,11.")(command)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="TOML (or YAML) file of settings, or a shipped preset: `official` (the authors' training "
                             "recipe exactly, for `icd train icd`). Defaults: the paper's SD1.5 recipe with icd's "
                             "reverse preservation target (see `icd train icd --help`).")(command)


def _run(stage: str, config_file: str | None, settings: tuple[str, ...], output: str, resume: bool) -> None:
    from icd.models.threads import use_cpu_threads
    from icd_train.config import ConfigError, GuidanceConfig, ICDConfig, load_config

    from ..distributed import current_launch

    use_cpu_threads(threads_given())
    try:
        config = load_config(GuidanceConfig if stage == "guidance" else ICDConfig, config_file, settings)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    if stage == "guidance":
        from icd_train.guidance import train_guidance as train_stage
    else:
        from icd_train.icd import train_icd as train_stage
    summary = train_stage(config, output, resume)  # a ConfigError here (checked against the model) exits 1
    if current_launch().rank != 0:
        return  # several processes trained one model: the first one reports
    for when in ("eval_before", "eval_after"):
        if when in summary:
            values = ", ".join(f"{name} {value:.4g}" for name, value in summary[when].items())
            click.echo(f"{when.removeprefix('eval_')}: {values}")
    click.echo(f"{summary['steps']} steps at {summary['iterations_per_second']:.3g} it/s; model written to {output}")


@click.group(context_settings=CONTEXT)
def train() -> None:
    """Train your own iCD model: first a guidance-embedded teacher, then the forward and reverse LoRAs.

    \b
    Examples:
      icd train guidance --set model.path=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
          --set data.path=photos/ -o teacher/
      icd train icd --set model.path=teacher/ --set data.path=photos/ -o my-icd/
      icd edit photo.jpg --model my-icd/ --src "a cat" --tgt "a tiger"
      accelerate launch --multi_gpu --num_processes 8 -m icd train icd --config sd15.toml -o my-icd/

    data.path is a folder of images with captions: metadata.jsonl lines {"file_name": ..., "text": ...}
    (Hugging Face imagefolder), or a CSV with file_name and text or caption columns.
    """


@train.command()
@_stage_options
def guidance(config_file, settings, output, resume):
    """Stage 1: distil classifier-free guidance into the base UNet (a w-embedded teacher).

    model.path is a diffusers base model (folder or cached hub id) or an iCD model folder (its base is
    used). Writes teacher.pt (the official teacher format) and an icd.json that `icd train icd` takes; a
    local base folder is placed inside --output (hard-linked where possible), so the folder can move.
    Settings: [model] path; [data] path, captions, resolution, latent_cache, workers; [train] max_steps,
    batch_size, lr, mixed_precision, ... (see train/config.py); [guidance] scales, embed_dim.
    """
    _run("guidance", config_file, settings, output, resume)


@train.command()
@_stage_options
def icd(config_file, settings, output, resume):
    """Stage 2: distil the forward (encoding) and reverse (decoding) consistency LoRAs.

    model.path is a model folder with a guidance-embedded teacher (from `icd train guidance`, or a released
    iCD model). Writes forward.safetensors, reverse.safetensors, the teacher (and a local base folder),
    hard-linked where possible, and an icd.json that `icd edit --model` runs: a folder that can move, whose
    edit defaults keep the guidance within icd.guidance_scales. Settings: [lora] rank, alpha, targets;
    [icd] forward_timesteps, reverse_timesteps, ddim_steps, guidance_scales, loss, huber_c,
    forward_preservation, reverse_preservation, schedule (official or summed), eval_guidance,
    teacher_final_step (schedule: the teacher's step to t = 0 uses the schedule's abar_0, as the authors do;
    boundary: alpha = 1), reverse_preservation_target (clean: the bottom segment's reverse jump ends at the
    clean latent, as decoding does, the default; start: at x_19, the authors' choice, measured worse in
    BENCHMARKS.md); and [model], [data], [train] as for `guidance`.

    \b
    Examples:
      icd train icd --config official --set model.path=my-teacher -o my-icd/   # the authors' recipe exactly
    """
    _run("icd", config_file, settings, output, resume)
