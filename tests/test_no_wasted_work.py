"""No wasted work in the sampling loops: a decode or an encode reads nothing back from the device, copies
nothing between devices, and makes one UNet call per step, classical two-pass guidance included.

A host sync on a GPU is a read of a tensor's value on the host (`.item()`, `.tolist()`, `bool()`); it stalls
the GPU's queue and rules out capturing a loop as one graph. On the CPU there is nothing to stall, so the
reads and the cross-device copies are counted instead, by intercepting torch's calls at two levels: the
Python tensor methods (`tolist` on a CPU tensor never reaches the dispatcher) and the ATen ops beneath.
Where CUDA exists the loops also run under `torch.cuda.set_sync_debug_mode("error")`.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from icd.core.consistency import guided_eps
from icd.core.denoiser import Guided
from icd.core.sampling import Step, decode, encode, guidance_schedule, run_steps
from icd.models.hub import resolve_model
from icd.models.loading import Model, fuse_unets, ready_unet, unet_eps

SIZE = (64, 64)  # latents 8x8
HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__}
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero"}


@dataclass
class Tally:
    ops: int = 0
    syncs: list[str] = field(default_factory=list)
    transfers: list[str] = field(default_factory=list)


class _HostReads(TorchFunctionMode):
    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.tally.syncs.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class _AtenOps(TorchDispatchMode):
    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.tally.ops += 1
        if name in SYNC_OPS:
            self.tally.syncs.append(name)
        if name in ("aten._to_copy", "aten.copy_"):
            source, destination = (args[0], out) if name == "aten._to_copy" else (args[1], args[0])
            if isinstance(source, torch.Tensor) and source.device != destination.device:
                self.tally.transfers.append(f"{name} {source.device} -> {destination.device}")
        return out


@contextmanager
def watched():
    """Counts the host reads and the cross-device copies made inside the block."""
    tally = Tally()
    with _HostReads(tally), _AtenOps(tally):
        yield tally


@dataclass
class Tiny:
    model: Model
    forward: torch.nn.Module
    reverse: torch.nn.Module


@pytest.fixture(scope="module")
def tiny(icd_home):
    """The tiny SD1.5-shaped model (its UNets have a guidance embedding; fed None they run unguided)."""
    manifest = resolve_model("tiny")
    model = Model.load(manifest, torch.device("cpu"), torch.float32)
    unets = fuse_unets(manifest, model.unet_config, ("forward", "reverse"))
    return Tiny(model, *(ready_unet(unet, model.device, model.dtype) for unet in unets))


def denoiser(tiny: Tiny, unet, two_pass: bool) -> Guided:
    model = tiny.model
    if two_pass:
        return Guided(unet_eps(unet), None, model.encode_text([""], SIZE), model.device)
    return Guided(unet_eps(unet), model.guidance_embed_dim, None, model.device)


def latents(rows: int = 1, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.randn(rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)


def test_the_watch_sees_host_reads_and_transfers():
    x = torch.ones(3)
    with watched() as tally:
        x.sum().item()
        x.tolist()
        bool(x[0] > 0)
        x.to("meta")
        torch.empty(3, device="meta").copy_(x)
    assert {"Tensor.item", "Tensor.tolist", "Tensor.__bool__", "aten._local_scalar_dense"} <= set(tally.syncs)
    assert tally.transfers == ["aten._to_copy cpu -> meta", "aten.copy_ cpu -> meta"]


@pytest.mark.parametrize("two_pass", [False, True], ids=["guidance-embedding", "two-pass"])
def test_encode_and_decode_read_nothing_back_and_copy_nothing(tiny, two_pass):
    forward, reverse = denoiser(tiny, tiny.forward, two_pass), denoiser(tiny, tiny.reverse, two_pass)
    manifest = tiny.model.manifest
    cond = tiny.model.encode_text(["a cat"], SIZE)
    both = tiny.model.encode_text(["a cat", "a dog"], SIZE)
    p2p_steps = [Step(jump, both, (0.0, w)) for jump, w in guidance_schedule(manifest.reverse_timesteps, 7.0, 0.8)]
    with torch.inference_mode(), watched() as tally:
        x_T = encode(forward, latents(), cond, manifest.forward_timesteps, latents(seed=1))
        decode(reverse, x_T, cond, manifest.reverse_timesteps, guidance=7.0, tau=0.8)
        run_steps(reverse, x_T.expand(2, -1, -1, -1), p2p_steps)  # rows [source unguided, target guided]
    assert tally.ops > 1000  # the loops ran under the watch
    assert tally.syncs == []
    assert tally.transfers == []


@pytest.mark.parametrize("tau, rows_per_call", [(1.0, [2, 2, 2, 2]), (0.6, [1, 1, 2, 2]), (0.0, [1, 1, 1, 1])])
def test_two_pass_guidance_is_one_unet_call_per_step(tiny, tau, rows_per_call):
    assert tiny.model.manifest.reverse_timesteps == (259, 519, 779, 999)  # guided at t <= 1000 tau
    calls = []
    hook = tiny.reverse.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            decode(denoiser(tiny, tiny.reverse, two_pass=True), latents(), tiny.model.encode_text(["a cat"], SIZE),
                   tiny.model.manifest.reverse_timesteps, guidance=7.0, tau=tau)
    finally:
        hook.remove()
    assert calls == rows_per_call


@pytest.mark.parametrize("t", [779, torch.tensor([999, 259])], ids=["one-timestep", "per-row"])
def test_batched_two_pass_equals_two_calls(tiny, t):
    eps_fn = unet_eps(tiny.reverse)
    uncond = tiny.model.encode_text([""], SIZE)
    cond, x, w = tiny.model.encode_text(["a cat", "a dog"], SIZE), latents(rows=2, seed=2), (2.0, 7.0)
    with torch.inference_mode():
        batched = Guided(eps_fn, None, uncond)(x, t, cond, w)
        eps_c, eps_u = eps_fn(x, t, cond, None), eps_fn(x, t, uncond.expand(2), None)
    # float rounding only: the batch of 4 rows and the two of 2 may take other CPU kernels (2.6e-5 seen)
    torch.testing.assert_close(batched, guided_eps(eps_c, eps_u, torch.tensor(w)), rtol=1e-4, atol=1e-4)
    assert (batched - eps_c).abs().max().item() > 1e-3  # the guidance did something


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("two_pass", [False, True], ids=["guidance-embedding", "two-pass"])
def test_on_cuda_the_loops_never_sync(icd_home, two_pass):
    manifest = resolve_model("tiny")
    device, dtype = torch.device("cuda"), torch.float16
    model = Model.load(manifest, device, dtype)
    forward, reverse = (ready_unet(unet, device, dtype) for unet in fuse_unets(manifest, model.unet_config,
                                                                              ("forward", "reverse")))
    uncond = model.encode_text([""], SIZE) if two_pass else None
    embed_dim = None if two_pass else model.guidance_embed_dim
    forward, reverse = (Guided(unet_eps(unet, dtype), embed_dim, uncond, device, dtype) for unet in (forward, reverse))
    cond = model.encode_text(["a cat"], SIZE)
    z0, noise = latents(device="cuda"), latents(seed=1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            x_T = encode(forward, z0, cond, manifest.forward_timesteps, noise)
            x_0 = decode(reverse, x_T, cond, manifest.reverse_timesteps, guidance=7.0, tau=0.8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x_0.shape == z0.shape and torch.isfinite(x_0).all()


class _HostCopies(TorchFunctionMode):
    """The shapes of the tensors turned into numpy arrays (on a GPU each is a copy to the host)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_an_in_process_edit_keeps_x_T_on_the_device(icd_home, tmp_path):
    """In this process x_T goes from the inversion to its edits as a tensor on the model's device: of the
    latents only the pixels of the result come back to the host, never x_T (which icd serve's client needs)."""
    from PIL import Image

    from icd.app.jobs import Settings, edit_file
    from icd.app.runner import LocalRunner
    from icd.app.session import open_session
    from icd.editing import edit_plan

    runner = LocalRunner(open_session("mini", "cpu", "fp32", "torch", directions=("forward", "reverse")))
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "photo.png")
    settings = Settings(runner, "mini")
    plans = [edit_plan(runner.manifest, "a red circle on a sandy background", f"a {colour} circle on a sandy background")
             for colour in ("blue", "green")]
    with _HostCopies() as copies:
        for i, plan in enumerate(plans):
            edit_file(settings, tmp_path / "photo.png", plan, tmp_path / f"edit-{i}.png")
    assert copies.shapes == [(3, 64, 64), (3, 64, 64)]  # each edit's pixels, nothing else
