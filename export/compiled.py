"""torch.compile as an engine: the PyTorch UNet compiled behind the same epsilon function, and the steered reverse
UNet of Prompt-to-Prompt compiled the same way (its control is tensor inputs, so one graph per shape serves every
step, row and edit). With CUDA graphs (max-autotune) a compiled call returns a buffer that the next replay of the
same graph overwrites, so each call's output is cloned: two-pass guidance calls the UNet twice before it reads the
first output, and the blend maps are kept across the steps of an edit.
"""

from __future__ import annotations

import os

import torch

from icd.core.denoiser import EpsFn
from icd.models.cache import icd_home
from icd.models.loading import unet_eps
from icd.p2p import steered_eps

from .graphs import cloned

# Where inductor keeps what it compiled: the user's own TORCHINDUCTOR_CACHE_DIR, read before anything (model
# loading imports parts of inductor that set it to a temporary folder), else $ICD_HOME/compiled.
_USER_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
INDUCTOR = "inductor"  # the compiler icd uses; another torch.compile backend (a name or a callable) only traces


def choose_compile_mode(device: torch.device, static_shapes: bool, loops_captured: bool = False) -> str:
    """torch.compile's mode: autotuning pays off only when every call has the same shapes; CUDA graphs per
    call (max-autotune) only when the loops are not captured whole (a graph cannot be recorded inside
    another); on a CPU the default mode."""
    if device.type != "cuda" or not static_shapes:
        return "default"
    return "max-autotune-no-cudagraphs" if loops_captured else "max-autotune"


def compile_module(module, mode: str, compiler=INDUCTOR):
    """One full graph per input shape; the mode applies to the inductor compiler only (another, such as
    "eager" or "aot_eager", only traces: for debugging). Inductor keeps what it compiled in $ICD_HOME/compiled
    (unless TORCHINDUCTOR_CACHE_DIR says otherwise), so a later process with the same model and shapes loads
    the kernels instead of compiling them again."""
    if compiler == INDUCTOR:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = _USER_CACHE_DIR or str(icd_home() / "compiled")
        return torch.compile(module, mode=mode, fullgraph=True)
    return torch.compile(module, backend=compiler, fullgraph=True)


def _cloned(run, mode: str):
    """`run` whose outputs survive the next CUDA-graph replay (a no-op without CUDA graphs)."""
    if mode not in CUDA_GRAPH_MODES:
        return run
    return lambda *args: cloned(run(*args))


def compiled_eps(unet, dtype: torch.dtype, mode: str, compiler=INDUCTOR) -> EpsFn:
    return _cloned(unet_eps(compile_module(unet, mode, compiler), dtype), mode)


def compiled_steered(module, dtype: torch.dtype, mode: str, compiler=INDUCTOR):
    """The steered run (x, t, cond, timestep_cond, control) -> (eps, blend maps) of a compiled `SteeredUNet`."""
    return _cloned(steered_eps(compile_module(module, mode, compiler), dtype), mode)
