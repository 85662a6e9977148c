"""Pretrain the miniature world's base model and write it as a diffusers Stable Diffusion folder.

The base is SD1.5-shaped, only small: a VAE with 8x downsampling and 4 latent channels, a CLIP text encoder
over the world's vocabulary (one token per word) and a cross-attention UNet predicting epsilon on SD's
scaled-linear schedule. The text encoder is trained with the UNet (no CLIP weights can be downloaded), and
10% of captions are dropped to the empty prompt so that classifier-free guidance works. The result is the
base that `icd train guidance` and `icd train icd` distil.

Usage: python bench/miniature/pretrain.py --output /tmp/mini-base [--steps-vae N --steps-unet N --images N]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from icd.core.consistency import alphas_cumprod
from icd.core.schedule import NUM_TRAIN_TIMESTEPS
from world import random_scene, world_tokenizer

CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-6  # per latent element, against per-pixel reconstruction losses: keeps the latents bounded only


def world_pixels(seeds, size: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes as a uint8 (N, 3, H, W) tensor (small enough to hold in memory) and their captions."""
    scenes = [random_scene(seed, size) for seed in seeds]
    pixels = torch.from_numpy(np.stack([np.asarray(scene.image) for scene in scenes])).permute(0, 3, 1, 2)
    return pixels.contiguous(), [scene.caption for scene in scenes]


def to_unit(pixels: torch.Tensor, device) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1], as the VAE reads them."""
    return pixels.to(device).float() / 127.5 - 1


def make_vae(size: int):
    """Four levels (8x downsampling, as SD's); narrow at full resolution, where convolutions cost most."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32, 32, 64), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=8, sample_size=size)


def make_text_encoder(vocab_size: int, width: int = 64, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config)


def make_unet(size: int, cross_attention_dim: int, channels: tuple[int, ...] = (32, 64), attend_finest: bool = False):
    """SD's blocks at two levels (latent 8x8 -> 4x4 at 64 px). As in SDXL, by default the finest level has
    no attention (`attend_finest` adds cross attention there too)."""
    from diffusers import UNet2DConditionModel

    levels = len(channels)
    down = ["CrossAttnDownBlock2D"] * levels
    if not attend_finest:
        down[0] = "DownBlock2D"
    up = ["CrossAttnUpBlock2D" if kind.startswith("CrossAttn") else "UpBlock2D" for kind in reversed(down)]
    return UNet2DConditionModel(sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=tuple(channels), norm_num_groups=8, attention_head_dim=4,
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                cross_attention_dim=cross_attention_dim)


def _fit(modules, loss_of, count: int, steps: int, batch: int, lr: float, seed: int, label: str,
         lrs: list[float] | None = None) -> float:
    """AdamW on random batches of `count` examples; `loss_of(index, generator)` is a batch's loss. A 5%
    linear warm-up, then cosine decay to zero gets the most out of a short budget. `lrs` gives each module
    its own peak rate (0 freezes it). Returns the last loss."""
    lrs = lrs or [lr] * len(modules)
    groups = [{"params": list(module.parameters()), "lr": rate} for module, rate in zip(modules, lrs) if rate > 0]
    for module, rate in zip(modules, lrs):
        module.requires_grad_(rate > 0)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 20)
    decay = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    generator = torch.Generator().manual_seed(seed)
    for module in modules:
        module.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=label, mininterval=5)
    for _ in bar:
        loss = loss_of(torch.randint(count, (batch,), generator=generator), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    for module in modules:
        module.eval()
    return loss.item()


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int = 8, lr: float = 1e-3, seed: int = 0) -> float:
    """Reconstruction (L1 + MSE) plus a small KL. The VAE is convolutional, so it learns from randomly
    flipped half-size crops at a quarter of the cost; many small batches beat fewer large ones here."""
    device, side = vae.device, pixels.shape[-1]
    crop = side // 2

    def loss_of(index, generator):
        top, left = torch.randint(side - crop + 1, (2,), generator=generator).tolist()
        x = to_unit(pixels[index, :, top:top + crop, left:left + crop], device)
        flip = (torch.rand(len(index), generator=generator) < 0.5).to(device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        out = vae.decode(sample).sample
        kl = posterior.kl().mean() / sample[0].numel()
        return (out - x).abs().mean() + ((out - x) ** 2).mean() + KL_WEIGHT * kl

    return _fit([vae], loss_of, len(pixels), steps, batch, lr, seed, "vae")


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means (as at inference), unscaled."""
    means = [vae.encode(to_unit(pixels[i:i + batch], vae.device)).latent_dist.mean for i in range(0, len(pixels), batch)]
    return torch.cat(means)


def loss_weights(weighting: str, min_snr: float = 5.0) -> torch.Tensor:
    """Per-timestep weights of the epsilon loss, normalised to a mean of 1 over t. With SNR = abar / (1 - abar),
    an epsilon error e is an x0 error e / sqrt(SNR), so epsilon-loss weight w is x0-loss weight w * SNR:
    "uniform" (SD's plain epsilon loss): x0 weight SNR, next to nothing at high noise;
    "min-snr" (Hang et al.): x0 weight min(SNR, gamma), which only tames the nearly clean timesteps;
    "v" (v-prediction's loss, on epsilon outputs): x0 weight SNR + 1;
    "min-snr-v": x0 weight min(SNR, gamma) + 1, both of the above.
    At high noise the image's layout and colours (what the caption says) are decided, from x0 estimates that
    amplify epsilon errors up to 14x (1 / sqrt(SNR) at t=999): only the last two weightings train them."""
    abar = alphas_cumprod()
    snr = abar / (1 - abar)
    x0_weight = {"uniform": snr, "min-snr": snr.clamp(max=min_snr), "v": snr + 1,
                 "min-snr-v": snr.clamp(max=min_snr) + 1}[weighting]
    weights = x0_weight / snr
    return weights / weights.mean()


def train_unet(unet, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str], steps: int,
               batch: int = 32, lr: float = 2e-3, seed: int = 0, text_lr: float | None = None,
               weighting: str = "v", min_snr: float = 5.0) -> float:
    """Epsilon prediction on scaled latents, text encoder trained jointly (at `text_lr`, default `lr`; 0
    freezes it); 10% of captions become "". Each example's loss is weighted by its timestep (`loss_weights`)."""
    device = unet.device
    tokens = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,  # noqa: E731
                                     truncation=True, return_tensors="pt").input_ids.to(device)
    ids, empty = tokens(captions), tokens([""])
    abar = alphas_cumprod().to(device)
    weights = loss_weights(weighting, min_snr).to(device)

    def loss_of(index, generator):
        z0 = latents[index].to(device)
        drop = (torch.rand(len(index), generator=generator) < CAPTION_DROPOUT).to(device)
        text = torch.where(drop[:, None], empty, ids[index.to(device)])
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (len(index),), generator=generator).to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        eps = unet(x_t, t, encoder_hidden_states=text_encoder(text)[0]).sample
        return (weights[t] * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    text_lr = lr if text_lr is None else text_lr
    return _fit([unet, text_encoder], loss_of, len(latents), steps, batch, lr, seed, "unet", lrs=[lr, text_lr])


def save_pipeline(output: Path, vae, text_encoder, tokenizer, unet) -> None:
    """A diffusers SD folder with the project's scheduler conventions (see tests/fixtures/tiny.py)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(output)


def pretrain(output: Path, steps_vae: int, steps_unet: int, images: int, size: int, device: str,
             vae_dir: Path | None = None, channels: tuple[int, ...] = (32, 64), attend_finest: bool = False,
             batch: int = 32, lr: float = 2e-3, text_lr: float | None = None, weighting: str = "v",
             min_snr: float = 5.0, text_width: int = 64, text_layers: int = 2) -> dict:
    """The whole recipe; returns its timings and final losses (also written to output/pretrain.json).
    `vae_dir` (a folder pretrain.py wrote, or its vae/ subfolder) reuses a trained VAE instead of training one."""
    torch.manual_seed(0)
    timings, clock = {}, time.perf_counter
    start = clock()
    pixels, captions = world_pixels(range(images), size)
    tokenizer = world_tokenizer(output / "tokenizer")
    timings["data_s"] = clock() - start

    if vae_dir is None:
        vae = make_vae(size).to(device)
        vae_loss = train_vae(vae, pixels, steps_vae)
    else:
        from diffusers import AutoencoderKL

        vae_dir = Path(vae_dir)
        vae_dir = vae_dir / "vae" if (vae_dir / "vae").is_dir() else vae_dir
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).to(device)
        vae.eval()
        vae_loss, steps_vae = float("nan"), 0
    latents = encode_latents(vae, pixels)
    scale = 1 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    timings["vae_s"] = clock() - start - sum(timings.values())

    text_encoder = make_text_encoder(len(tokenizer), text_width, text_layers).to(device)
    unet = make_unet(size, text_encoder.config.hidden_size, channels, attend_finest).to(device)
    unet_loss = train_unet(unet, text_encoder, tokenizer, latents * scale, captions, steps_unet, batch=batch, lr=lr,
                           text_lr=text_lr, weighting=weighting, min_snr=min_snr)
    save_pipeline(output, vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu())
    timings["unet_s"] = clock() - start - sum(timings.values())
    timings["total_s"] = clock() - start
    summary = {"steps_vae": steps_vae, "steps_unet": steps_unet, "images": images, "size": size, "device": device,
               "threads": torch.get_num_threads(), "vae": str(vae_dir) if vae_dir else None,
               "channels": list(channels), "attend_finest": attend_finest, "text_width": text_width,
               "text_layers": text_layers, "batch": batch, "lr": lr,
               "text_lr": lr if text_lr is None else text_lr, "weighting": weighting, "min_snr": min_snr,
               "unet_parameters": sum(p.numel() for p in unet.parameters()),
               "vae_loss": vae_loss, "unet_loss": unet_loss,
               "scaling_factor": scale, **{key: round(value, 1) for key, value in timings.items()}}
    (output / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps-vae", type=int, default=3000)
    parser.add_argument("--steps-unet", type=int, default=4000)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64, help="image side, a multiple of 16")
    parser.add_argument("--vae", type=Path, help="reuse the VAE of a folder pretrain.py wrote instead of training one")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="UNet widths, one per level")
    parser.add_argument("--attend-finest", action="store_true", help="cross attention at the finest level too")
    parser.add_argument("--text-width", type=int, default=64, help="text encoder width (and the UNet's context size)")
    parser.add_argument("--text-layers", type=int, default=2, help="text encoder layers")
    parser.add_argument("--batch", type=int, default=32, help="UNet batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="UNet peak learning rate")
    parser.add_argument("--text-lr", type=float, help="text encoder peak learning rate (default --lr; 0 freezes it)")
    parser.add_argument("--weighting", choices=("uniform", "min-snr", "v", "min-snr-v"), default="v",
                        help="timestep weighting of the epsilon loss (see loss_weights)")
    parser.add_argument("--min-snr", type=float, default=5.0, help="gamma of the min-snr weightings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (1 is fastest on a CPU other jobs share)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    summary = pretrain(args.output, args.steps_vae, args.steps_unet, args.images, args.size, args.device,
                       vae_dir=args.vae, channels=tuple(args.channels), attend_finest=args.attend_finest,
                       batch=args.batch, lr=args.lr, text_lr=args.text_lr, weighting=args.weighting, min_snr=args.min_snr,
                       text_width=args.text_width, text_layers=args.text_layers)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
