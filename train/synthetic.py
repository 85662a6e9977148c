"""Make a random tiny model a (small) diffusion model of a data set, for trying and testing `icd train`
offline; the data are scenes of the miniature world (icdcli.miniworld.write_imagefolder)."""

from __future__ import annotations

import json
from pathlib import Path


def pretrain_tiny_base(model_dir: str | Path, data_dir: str | Path, resolution: int, steps: int, seed: int = 0,
                       batch_size: int = 8, lr: float = 1e-3) -> dict[str, float]:
    """Make a random tiny model's base a (small) diffusion model of the data set, in place.

    A random UNet's probability-flow ODE is well defined but unlike a real model's: it does not carry the
    noised data to N(0, I), so encoding a photo lands where decoding never goes. So the VAE scaling factor
    is set to give unit-variance latents (how SD's 0.18215 was chosen) and the base UNet is trained to
    predict the noise, with 10% empty captions so that classifier-free guidance means something.
    Returns the denoising loss before and after.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from icdcli.consistency import NUM_TRAIN_TIMESTEPS, add_noise
    from icdcli.manifest import load_manifest
    from icdcli.models import ICDModel

    from .data import ImageDataset, read_examples, text_conditioning
    from .losses import per_row

    model = ICDModel.load(load_manifest(model_dir), torch.device("cpu"), torch.float32)
    base = Path(model.manifest.base)
    dataset = ImageDataset(read_examples(data_dir), resolution)
    pixels = torch.stack([dataset[i]["pixels"] for i in range(len(dataset))])
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    latents = model.encode_image(pixels).clone() / model.vae.config.scaling_factor
    scaling = 1.0 / latents.std().item()
    vae_config = base / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "scaling_factor": scaling}, indent=2))
    latents = latents * scaling
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(captions), (batch_size,), generator=generator).tolist()
        prompts = ["" if torch.rand((), generator=generator) < 0.1 else captions[i] for i in rows]
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *latents.shape[1:]), generator=generator)
        x_t = per_row(add_noise, latents[rows], noise, t.tolist())
        cond = text_conditioning(model, prompts, resolution)
        loss = F.mse_loss(unet(x_t, t, return_dict=False, **cond.unet_kwargs())[0], noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    unet.save_pretrained(base / "unet")
    return {"denoising_loss_first": sum(losses[:20]) / 20, "denoising_loss_last": sum(losses[-20:]) / 20}
