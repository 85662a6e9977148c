"""The four iCD losses, taken with the samplers' own step (icd.core.sampling.jump), and the machinery that
evaluates them.

The teacher's ODE is solved on the 50-step DDIM grid 19, 39, ..., 999 plus every boundary, so a teacher step
never crosses a boundary: with the paper's boundaries (all on the grid) exactly the official grid; off-grid ones
(249, 499, 699) are trained as start points too, which the official code never does.

- Reverse CD (reverse/decoding student, per-sample w): from t on the grid the target is the largest reverse
  boundary below t. With reverse timesteps 259/519/779/999: t = 259 -> 0 (the jump the reverse model makes at
  inference), t = 279 -> 259, t = 999 -> 779, the official rule max{e <= t - 20} on the grid.
- Forward CD (forward/encoding student, w = 0): the smallest forward boundary above t (259, ..., 999).
- The teacher steps to the neighbouring grid point with the same jump formula; the target is the stop-gradient
  student's jump from there, the identity where that point is the boundary itself (the consistency boundary
  condition, with no special case).
- Preservation (w = 0) on segments lo_f -> hi (a forward jump) whose hi starts a reverse jump hi -> lo_r:
  f(r(x_hi) -> lo_f) -> hi must give x_hi back, and r(f(x_lo_f)) must give x_lo_r back.

Two choices of the authors' code are switches (ICDSection, where each is described and measured; `--config
official` takes both as they do): D1, icd.teacher_final_step, where the teacher's step from 19 to 0 lands (the
schedule's abar_0 or the clean latent); D2, icd.reverse_preservation_target, lo_r on the bottom segment (0,
"clean", the default, or lo_f = 19, "start", the authors').

Timesteps are Python ints per row (nothing waits on the GPU to read one), handed to the core's math as one
tensor per call: noising, e(w) and the jump are the very functions inference runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from icd.core.consistency import add_noise, alpha_sigma, alphas_cumprod
from icd.core.schedule import ddim_grid, forward_jumps, reverse_jumps
from icd.core.denoiser import Conditioning, Guided
from icd.core.sampling import jump
from icd.models.loading import unet_eps

from .config import ICDSection

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Schedule:
    """The solver grid, each direction's boundaries and the preservation segments of one configuration."""

    def __init__(self, forward_timesteps: list[int], reverse_timesteps: list[int], ddim_steps: int = 50,
                 teacher_final_step: str = "schedule", reverse_preservation_target: str = "clean"):
        reverse, forward = reverse_jumps(reverse_timesteps), forward_jumps(forward_timesteps)
        self.reverse_boundaries = sorted({jump.s for jump in reverse})
        self.forward_boundaries = sorted({jump.s for jump in forward})
        self.grid = sorted(set(ddim_grid(ddim_steps)) | set(forward_timesteps) | set(reverse_timesteps))
        self.forward_starts = [t for t in self.grid if forward_timesteps[0] <= t < self.forward_boundaries[-1]]
        self.teacher_to_schedule_start = teacher_final_step == "schedule"
        # (lo_f, hi, lo_r): never empty, as the last forward jump ends at 999 where decoding starts.
        self.segments = [(f.t, f.s, f.t if reverse_preservation_target == "start" else r.s)
                         for f in forward for r in reverse if r.t == f.s]

    @classmethod
    def from_config(cls, icd: ICDSection) -> Schedule:
        return cls(icd.forward_timesteps, icd.reverse_timesteps, icd.ddim_steps, icd.teacher_final_step,
                   icd.reverse_preservation_target)

    def reverse_step(self, t: int) -> tuple[int, int]:
        """(the grid point below t, or 0; the boundary the reverse model jumps to from t)."""
        below = [g for g in self.grid if g < t]
        return (below[-1] if below else 0), max(e for e in self.reverse_boundaries if e < t)

    def forward_step(self, t: int) -> tuple[int, int]:
        """(the grid point above t; the boundary the forward model jumps to from t)."""
        return min(g for g in self.grid if g > t), min(f for f in self.forward_boundaries if f > t)


def noised(z0: torch.Tensor, noise: torch.Tensor, t: list[int]) -> torch.Tensor:
    """x_t = alpha_t z0 + sigma_t noise per row; t = 0 is the clean latent (the hard boundary)."""
    return add_noise(z0, noise, torch.tensor(t, device=z0.device))


SCHEDULE_ABAR_0 = alphas_cumprod()[0].item()  # 0.99915: where the authors' teacher step to 0 lands


def to_schedule_start(x_t: torch.Tensor, t: list[int], x_s: torch.Tensor, s: list[int]) -> torch.Tensor:
    """The authors' teacher step to 0 (D1) from ours: rows whose step t -> s ended at s = 0 (the clean estimate x0) move
    to sqrt(abar_0) x0 + sqrt(1 - abar_0) eps, with the step's epsilon read back from its two ends (x_t = alpha_t x0 +
    sigma_t eps), so the jump itself stays the samplers' one step. Other rows are returned as they are."""
    ends = torch.tensor([step_end == 0 for step_end in s], device=x_s.device).view(-1, 1, 1, 1)
    alpha_t, sigma_t = alpha_sigma(torch.tensor(t, device=x_s.device))
    eps = (x_t.float() - alpha_t * x_s) / sigma_t
    moved = math.sqrt(SCHEDULE_ABAR_0) * x_s + math.sqrt(1 - SCHEDULE_ABAR_0) * eps
    return torch.where(ends, moved, x_s)


@dataclass
class Rows:
    """UNet evaluations, one per row: row i is evaluated at t[i] and jumps to s[i] with guidance w[i]."""

    x: torch.Tensor
    t: list[int]
    s: list[int]
    w: torch.Tensor
    cond: Conditioning

    def __len__(self) -> int:
        return len(self.t)

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        return Rows(torch.cat([p.x for p in parts]), [t for p in parts for t in p.t], [s for p in parts for s in p.s],
                    torch.cat([p.w for p in parts]), Conditioning.cat([p.cond for p in parts]))

    def jump(self, denoiser) -> torch.Tensor:
        """One UNet call on all rows, then each row's consistency jump (fp32)."""
        device = self.x.device
        return jump(denoiser, self.x, torch.tensor(self.t, device=device), torch.tensor(self.s, device=device),
                    self.cond, self.w)


@dataclass
class Pass:
    """What a loss plan asks for: `model` ("teacher", "forward" or "reverse") evaluated on `rows`."""

    model: str
    rows: Rows
    grad: bool = False

    @property
    def phase(self) -> int:
        """Teacher steps come first, then stop-gradient student passes, then the passes that are trained."""
        return 2 if self.grad else int(self.model != "teacher")


Plan = Generator[Pass, torch.Tensor, torch.Tensor]


class PassRunner:
    """Drives loss plans together: requests of the same phase for the same UNet share one batched call. Run one
    plan at a time and every pass is its own call (the official 10 per iteration); run all four and an iteration
    takes 5 calls (teacher, two stop-gradient, two trained) over the same rows."""

    def __init__(self, unets: dict, embed_dim: int):
        self.denoisers = {name: Guided(unet_eps(unet), embed_dim, device=next(unet.parameters()).device)
                          for name, unet in unets.items()}
        self.calls = self.rows = 0

    def run(self, plans: dict[str, Plan]) -> dict[str, torch.Tensor]:
        results: dict[str, torch.Tensor] = {}
        pending: dict[str, Pass] = {}

        def advance(name: str, value: torch.Tensor | None) -> None:
            try:
                pending[name] = plans[name].send(value)
            except StopIteration as done:
                results[name] = done.value
                pending.pop(name, None)

        for name in plans:
            advance(name, None)
        while pending:
            phase = min(p.phase for p in pending.values())
            by_model: dict[str, list[str]] = {}
            for name, request in pending.items():
                if request.phase == phase:
                    by_model.setdefault(request.model, []).append(name)
            for model, names in by_model.items():
                parts = [pending[name].rows for name in names]
                with torch.set_grad_enabled(phase == 2):
                    out = Rows.cat(parts).jump(self.denoisers[model])
                self.calls, self.rows = self.calls + 1, self.rows + len(out)
                for name, part in zip(names, out.split([len(p) for p in parts])):
                    advance(name, part)
        return results


@dataclass
class Draw:
    """One iteration's random choices, shared by its four losses (as in the official code)."""

    z0: torch.Tensor
    noise: torch.Tensor
    cond: Conditioning
    w: torch.Tensor  # reverse CD guidance per row
    reverse_t: list[int]
    forward_t: list[int]
    segments: list[tuple[int, int, int]]


class RowRandom:
    """One iteration's random draws for this process's rows of the global batch: every process draws the whole
    global batch's values from the same seed and keeps its own contiguous slice, the rows its data shard holds,
    so the draws do not depend on how many processes share the batch."""

    def __init__(self, seed: int, process: int = 0, processes: int = 1):
        self.generator = torch.Generator().manual_seed(seed)
        self.process, self.processes = process, processes

    def _own(self, values: torch.Tensor) -> torch.Tensor:
        rows = values.shape[0] // self.processes
        return values[self.process * rows:(self.process + 1) * rows]

    def randint(self, high: int, rows: int) -> list[int]:
        return self._own(torch.randint(high, (rows * self.processes,), generator=self.generator)).tolist()

    def randn(self, shape: torch.Size) -> torch.Tensor:
        return self._own(torch.randn((shape[0] * self.processes, *shape[1:]), generator=self.generator))


def draw(z0: torch.Tensor, cond: Conditioning, schedule: Schedule, scales: list[float], random: RowRandom) -> Draw:
    """Uniform start points, segments and guidance values per row; noise from the same draws."""
    rows = z0.shape[0]

    def pick(options: list) -> list:
        return [options[i] for i in random.randint(len(options), rows)]

    noise = random.randn(z0.shape).to(z0.device)
    return Draw(z0, noise, cond, torch.tensor(pick(scales)), pick(schedule.grid), pick(schedule.forward_starts),
                pick(schedule.segments))


def _consistency(student: str, x_t, t: list[int], steps: list[tuple[int, int]], w, cond, distance,
                 teacher_to_schedule_start: bool = False) -> Plan:
    following, boundary = [list(column) for column in zip(*steps)]
    x_next = yield Pass("teacher", Rows(x_t, t, following, w, cond))  # one teacher DDIM step
    if teacher_to_schedule_start:
        x_next = to_schedule_start(x_t, t, x_next, following)
    target = yield Pass(student, Rows(x_next, following, boundary, w, cond))  # stop-gradient student from there
    prediction = yield Pass(student, Rows(x_t, t, boundary, w, cond), grad=True)
    return distance(prediction, target)


def reverse_cd(d: Draw, schedule: Schedule, distance: Distance) -> Plan:
    steps = [schedule.reverse_step(t) for t in d.reverse_t]
    return _consistency("reverse", noised(d.z0, d.noise, d.reverse_t), d.reverse_t, steps, d.w, d.cond, distance,
                        schedule.teacher_to_schedule_start)


def forward_cd(d: Draw, schedule: Schedule, distance: Distance) -> Plan:
    steps = [schedule.forward_step(t) for t in d.forward_t]
    unguided = torch.zeros(len(d.forward_t))
    return _consistency("forward", noised(d.z0, d.noise, d.forward_t), d.forward_t, steps, unguided, d.cond, distance)


def forward_preservation(d: Draw, schedule: Schedule, distance: Distance) -> Plan:
    low, high, _ = [list(column) for column in zip(*d.segments)]
    unguided = torch.zeros(len(low))
    x_high = noised(d.z0, d.noise, high)
    x_low = yield Pass("reverse", Rows(x_high, high, low, unguided, d.cond))
    prediction = yield Pass("forward", Rows(x_low, low, high, unguided, d.cond), grad=True)
    return distance(prediction, x_high)


def reverse_preservation(d: Draw, schedule: Schedule, distance: Distance) -> Plan:
    low, high, reverse_low = [list(column) for column in zip(*d.segments)]
    unguided = torch.zeros(len(low))
    x_high = yield Pass("forward", Rows(noised(d.z0, d.noise, low), low, high, unguided, d.cond))
    prediction = yield Pass("reverse", Rows(x_high, high, reverse_low, unguided, d.cond), grad=True)
    return distance(prediction, noised(d.z0, d.noise, reverse_low))


# In the official order of updates. Each trains the student of its grad=True pass.
LOSSES = {"reverse_cd": reverse_cd, "forward_cd": forward_cd, "forward_preservation": forward_preservation,
          "reverse_preservation": reverse_preservation}


def huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber: mean of sqrt(d^2 + c^2) - c, quadratic below c and linear above."""
    return (torch.sqrt((prediction - target) ** 2 + c * c) - c).mean()


def distance_for(icd: ICDSection) -> Distance:
    return partial(huber, c=icd.huber_c) if icd.loss == "huber" else F.mse_loss


def loss_weights(icd: ICDSection) -> dict[str, float]:
    """Each loss's weight; preservation losses are each gated on their own coefficient (the authors' code gates
    the reverse one on the forward one's coefficient)."""
    weights = {"reverse_cd": 1.0, "forward_cd": 1.0, "forward_preservation": icd.forward_preservation,
               "reverse_preservation": icd.reverse_preservation}
    return {name: weight for name, weight in weights.items() if weight > 0}
