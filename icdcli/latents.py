"""Latent files written by `icd invert`: x_T plus everything needed to decode it later.

A `.safetensors` file with one tensor, `latent` (1, C, h, w) fp32, and string metadata: the model
(reference and fingerprint), the prompt, the seed, the working and original image sizes and the icd
version. Edits and reconstructions read the prompt and sizes from here, so they need nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import InputError
from .files import atomic_write

FORMAT = "icd-latent-1"
LATENT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LatentInfo:
    model: str  # the --model reference used for inversion
    model_fingerprint: str
    prompt: str
    seed: int
    width: int  # working size the latent was encoded at
    height: int
    original_width: int
    original_height: int
    source: str  # the image file it came from
    icd_version: str = __version__


def save_latent(path: Path, latent: torch.Tensor, info: LatentInfo, *, overwrite: bool = False) -> None:
    metadata = {"format": FORMAT, "icd": json.dumps(asdict(info))}
    tensors = {"latent": latent.detach().float().cpu().contiguous()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def load_latent(path: Path) -> tuple[torch.Tensor, LatentInfo]:
    """Read a latent file; anything else gives one InputError line."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or "latent" not in f.keys():
                raise InputError(f"{path.name}: a safetensors file, but not an icd latent (make one with `icd invert`)")
            latent = f.get_tensor("latent")
        info = LatentInfo(**json.loads(metadata["icd"]))
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path.name}: no such file") from None
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise InputError(f"{path.name}: not a readable icd latent file ({str(err).splitlines()[0]})") from None
    except Exception as err:  # safetensors' own error type for corrupt headers
        raise InputError(f"{path.name}: corrupt latent file ({str(err).splitlines()[0]})") from None
    if latent.dim() != 4 or latent.shape[0] != 1:
        raise InputError(f"{path.name}: latent has shape {tuple(latent.shape)}, expected (1, C, h, w)")
    return latent, info


def is_latent_file(path: Path) -> bool:
    return Path(path).suffix == LATENT_SUFFIX
