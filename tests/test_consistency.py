"""The iCD equations: noise schedule, guidance embedding, the consistency jump, dynamic guidance, step lists;
per-row tensor timesteps (training's batches), and the guidance wrapper every engine runs behind."""

import math

import pytest
import torch

from icd.core.consistency import (
    add_noise,
    alpha_sigma,
    alphas_cumprod,
    consistency_jump,
    guidance_embedding,
    guided_eps,
)
from icd.core.schedule import Jump, ddim_grid, dynamic_guidance, forward_jumps, reverse_jumps
from icd.core.denoiser import Conditioning, Guided
from icd.core.sampling import jump
from icd.models.official import FORWARD_TIMESTEPS, GUIDANCE_EMBED_DIM

# The schedule table of the reference (t, abar_t, alpha_t, sigma_t): abar and alpha to 5 decimals, sigma to 4.
SCHEDULE_TABLE = [
    (0, 0.99915, 0.99957, 0.0292),
    (19, 0.98224, 0.99108, 0.1333),
    (249, 0.67543, 0.82185, 0.5697),
    (259, 0.65898, 0.81177, 0.5840),
    (339, 0.52489, 0.72449, 0.6893),
    (499, 0.27767, 0.52694, 0.8499),
    (519, 0.25158, 0.50158, 0.8651),
    (699, 0.08313, 0.28832, 0.9575),
    (779, 0.04420, 0.21024, 0.9777),
    (999, 0.00466, 0.06826, 0.9977),
]


# --- noise schedule ------------------------------------------------------------------------------------

def test_alphas_cumprod_shape_dtype_and_monotone():
    abar = alphas_cumprod()
    assert abar.shape == (1000,)
    assert abar.dtype == torch.float32
    assert bool((abar[1:] < abar[:-1]).all())


@pytest.mark.parametrize("t, abar_t, alpha_t, sigma_t", SCHEDULE_TABLE)
def test_schedule_matches_reference_table(t, abar_t, alpha_t, sigma_t):
    abar = alphas_cumprod()[t].item()
    assert abar == pytest.approx(abar_t, abs=1e-5)
    assert math.sqrt(abar) == pytest.approx(alpha_t, abs=1e-5)
    assert math.sqrt(1 - abar) == pytest.approx(sigma_t, abs=1e-4)
    if t > 0:
        alpha, sigma = alpha_sigma(t)
        assert alpha == pytest.approx(alpha_t, abs=1e-5)
        assert sigma == pytest.approx(sigma_t, abs=1e-4)
        assert alpha**2 + sigma**2 == pytest.approx(1.0, abs=1e-6)


def test_schedule_from_an_independent_float64_computation():
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    expected, running = [], 1.0
    for beta in betas:
        running *= 1 - beta
        expected.append(running)
    assert torch.allclose(alphas_cumprod().double(), torch.tensor(expected, dtype=torch.float64), atol=2e-6, rtol=0)


def test_schedule_equals_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.equal(alphas_cumprod(), scheduler.alphas_cumprod)


def test_alpha_sigma_at_zero_is_the_hard_boundary():
    assert alpha_sigma(0) == (1.0, 0.0)  # not sqrt(abar_0) = 0.99957


def test_add_noise_values():
    x0, noise = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    abar = alphas_cumprod()[19].item()
    expected = torch.tensor([math.sqrt(abar) * 1.0 + math.sqrt(1 - abar) * 0.5,
                             math.sqrt(abar) * -2.0 + math.sqrt(1 - abar) * 3.0])
    assert torch.allclose(add_noise(x0, noise, 19), expected, atol=1e-6)
    # 0.99108 * 1 + 0.13325 * 0.5 from the table
    assert add_noise(x0, noise, 19)[0].item() == pytest.approx(0.99108 + 0.13325 * 0.5, abs=1e-4)


def test_encoding_starts_at_the_first_point_of_the_ddim_grid():
    grid = ddim_grid(50)
    assert grid[:2] == [19, 39] and grid[-1] == 999 and len(grid) == 50
    assert forward_jumps(list(FORWARD_TIMESTEPS))[0].t == grid[0] == 19


def test_add_noise_at_zero_is_the_clean_latent():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert torch.equal(add_noise(x0, noise, 0), x0)  # not sqrt(abar_0) x0 + sqrt(1 - abar_0) noise
    assert torch.equal(add_noise(x0, noise, torch.tensor([0, 0])), x0)


# --- one timestep per row (training) ----------------------------------------------------------------------

ROW_T = [0, 19, 259, 519, 999]
ROW_S = [259, 0, 0, 779, 779]  # up from the clean latent, down to it, and both ways between boundaries


def _rows(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(ROW_T), 4, 8, 8, generator=g), torch.randn(len(ROW_T), 4, 8, 8, generator=g)


def test_alpha_sigma_per_row_equals_the_int_values():
    alpha, sigma = alpha_sigma(torch.tensor(ROW_T))
    assert alpha.shape == sigma.shape == (len(ROW_T), 1, 1, 1) and alpha.dtype == sigma.dtype == torch.float32
    assert (alpha[0].item(), sigma[0].item()) == (1.0, 0.0)
    for i, t in enumerate(ROW_T):
        assert alpha[i].item() == pytest.approx(alpha_sigma(t)[0], abs=1e-7)
        assert sigma[i].item() == pytest.approx(alpha_sigma(t)[1], abs=1e-7)


def test_add_noise_per_row_equals_row_by_row():
    x0, noise = _rows(4)
    rows = add_noise(x0, noise, torch.tensor(ROW_T))
    expected = torch.cat([add_noise(x0[i:i + 1], noise[i:i + 1], t) for i, t in enumerate(ROW_T)])
    torch.testing.assert_close(rows, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(rows[0], x0[0])


def test_consistency_jump_per_row_equals_row_by_row():
    x, eps = _rows(5)
    rows = consistency_jump(x, eps, torch.tensor(ROW_T), torch.tensor(ROW_S))
    expected = torch.cat([consistency_jump(x[i:i + 1], eps[i:i + 1], t, s)
                          for i, (t, s) in enumerate(zip(ROW_T, ROW_S))])
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)


def test_sampling_jump_per_row_equals_row_by_row():
    """The one step of samplers and training: the denoiser's epsilon at t, then the jump to s."""
    x, _ = _rows(6)
    cond, w = Conditioning(torch.zeros(len(ROW_T), 3, 8)), torch.zeros(len(ROW_T))

    def denoiser(x, t, cond, w):  # depends on the timestep, as a row's own t must be used
        t = t if isinstance(t, torch.Tensor) else torch.full((x.shape[0],), t)
        return 0.3 * x + t.view(-1, 1, 1, 1) / 1000

    rows = jump(denoiser, x, torch.tensor(ROW_T), torch.tensor(ROW_S), cond, w)
    expected = torch.cat([jump(denoiser, x[i:i + 1], t, s, cond.rows([i]), w[i:i + 1])
                          for i, (t, s) in enumerate(zip(ROW_T, ROW_S))])
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows, consistency_jump(x, denoiser(x, torch.tensor(ROW_T), cond, w),
                                                      torch.tensor(ROW_T), torch.tensor(ROW_S)), rtol=0, atol=0)


# --- guidance embedding ----------------------------------------------------------------------------------

def test_guidance_embedding_shape_and_dtype():
    e = guidance_embedding(torch.tensor([0.0, 7.0, 19.0]), GUIDANCE_EMBED_DIM)
    assert e.shape == (3, 512)
    assert e.dtype == torch.float32
    assert guidance_embedding(torch.tensor([1.0]), 64).shape == (1, 64)


def test_guidance_embedding_of_zero_is_sin_zeros_then_cos_ones():
    e = guidance_embedding(torch.tensor([0.0]), GUIDANCE_EMBED_DIM)[0]
    assert torch.equal(e[:256], torch.zeros(256))
    assert torch.equal(e[256:], torch.ones(256))


def test_guidance_embedding_hand_computed_values():
    e = guidance_embedding(torch.tensor([0.5]), GUIDANCE_EMBED_DIM)[0]
    assert e[0].item() == pytest.approx(math.sin(500.0), abs=1e-4)
    assert e[256].item() == pytest.approx(math.cos(500.0), abs=1e-4)
    f10 = math.exp(-math.log(1e4) * 10 / 255)
    assert e[10].item() == pytest.approx(math.sin(500.0 * f10), abs=1e-4)
    assert e[266].item() == pytest.approx(math.cos(500.0 * f10), abs=1e-4)
    # the last frequency is 1e-4: angle 0.05
    assert e[255].item() == pytest.approx(math.sin(0.05), abs=1e-6)
    assert e[511].item() == pytest.approx(math.cos(0.05), abs=1e-6)


def test_guidance_embedding_rows_are_independent():
    both = guidance_embedding(torch.tensor([0.0, 7.0]), GUIDANCE_EMBED_DIM)
    assert torch.equal(both[0], guidance_embedding(torch.tensor([0.0]), GUIDANCE_EMBED_DIM)[0])
    assert torch.equal(both[1], guidance_embedding(torch.tensor([7.0]), GUIDANCE_EMBED_DIM)[0])
    assert not torch.allclose(both[0], both[1])


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 7.0, 19.0])
def test_guidance_embedding_equals_diffusers(w):
    from diffusers import StableDiffusionPipeline

    # diffusers multiplies by 1000 itself and does not subtract 1 (its LCM pipeline passes scale - 1).
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), embedding_dim=512)
    ours = guidance_embedding(torch.tensor([w]), GUIDANCE_EMBED_DIM)
    # the two compute the fp32 frequencies in a different order: angles up to 1000 w differ in the last bits
    assert (ours - theirs).abs().max().item() <= 2e-4 * max(1.0, w)
    if w > 0:  # a (w - 1) shift would give a completely different vector
        shifted = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1]), embedding_dim=512)
        assert (ours - shifted).abs().max().item() > 0.5


# --- classifier-free guidance and the guidance wrapper ------------------------------------------------------

def test_guided_eps_per_row():
    g = torch.Generator().manual_seed(7)
    eps_c, eps_u = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    w = torch.tensor([0.0, 1.0, 7.0])
    out = guided_eps(eps_c, eps_u, w)
    for i in range(3):
        torch.testing.assert_close(out[i], eps_c[i] + w[i].item() * (eps_c[i] - eps_u[i]), rtol=0, atol=1e-6)
    assert torch.equal(out[0], eps_c[0])  # w = 0 is conditional-only, not unguided


class RecordingEps:
    """An epsilon function that depends on x, t, the text and e(w), recording each call's inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond, timestep_cond):
        self.calls.append((t, cond, timestep_cond))
        eps = 0.5 * x + cond.embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t / 1000
        return eps if timestep_cond is None else eps + timestep_cond.sum(1).view(-1, 1, 1, 1)


def _guided_inputs(sdxl=False):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 2, 2, generator=g)
    extra = dict(pooled=torch.randn(3, 5, generator=g), time_ids=torch.randn(3, 6, generator=g)) if sdxl else {}
    cond = Conditioning(torch.randn(3, 7, 8, generator=g), **extra)
    uncond_extra = dict(pooled=torch.randn(1, 5, generator=g), time_ids=torch.randn(1, 6, generator=g)) if sdxl else {}
    return x, cond, Conditioning(torch.randn(1, 7, 8, generator=g), **uncond_extra)


def test_guided_with_a_guidance_embedding_is_one_pass_fed_e_w():
    x, cond, _ = _guided_inputs()
    w = torch.tensor([0.0, 7.0, 7.0])
    eps_fn = RecordingEps()
    out = Guided(eps_fn, 16)(x, 519, cond, w)
    [(t, seen, embedding)] = eps_fn.calls
    assert t == 519 and seen is cond
    assert torch.equal(embedding, guidance_embedding(w, 16))
    torch.testing.assert_close(out, RecordingEps()(x, 519, cond, guidance_embedding(w, 16)), rtol=0, atol=0)


def test_guided_needs_an_embedding_or_the_unconditional_rows():
    with pytest.raises(ValueError, match="guidance embedding size or the unconditional rows"):
        Guided(RecordingEps(), None)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_guided_without_embedding_adds_the_unconditional_rows_to_the_one_call_only_when_needed(sdxl):
    x, cond, uncond = _guided_inputs(sdxl)
    eps_fn = RecordingEps()
    denoiser = Guided(eps_fn, None, uncond)
    eps_c = RecordingEps()(x, 259, cond, None)

    unguided = denoiser(x, 259, cond, (0.0, 0.0, 0.0))
    assert len(eps_fn.calls) == 1 and eps_fn.calls[0][1] is cond and eps_fn.calls[0][2] is None
    torch.testing.assert_close(unguided, eps_c, rtol=0, atol=0)

    w = (0.0, 2.0, 7.0)
    guided = denoiser(x, 259, cond, w)
    assert len(eps_fn.calls) == 2  # one call: the conditional rows, then the unconditional ones
    _, both, embedding = eps_fn.calls[1]
    assert embedding is None and torch.equal(both.embeds, torch.cat([cond.embeds, uncond.embeds.expand(3, -1, -1)]))
    if sdxl:  # the empty prompt's pooled embedding, the rows' own size ids
        assert torch.equal(both.pooled, torch.cat([cond.pooled, uncond.pooled.expand(3, -1)]))
        assert torch.equal(both.time_ids, torch.cat([cond.time_ids, cond.time_ids]))
    eps_u = RecordingEps()(x, 259, both.rows(slice(3, 6)), None)
    torch.testing.assert_close(guided, guided_eps(eps_c, eps_u, torch.tensor(w)), rtol=0, atol=0)
    torch.testing.assert_close(guided[0], eps_c[0], rtol=0, atol=0)
    torch.testing.assert_close(guided[2], eps_c[2] + 7.0 * (eps_c[2] - eps_u[2]), rtol=0, atol=1e-5)
    # training's per-row tensor of w gives the same, read back to the host once
    torch.testing.assert_close(denoiser(x, 259, cond, torch.tensor(w)), guided, rtol=0, atol=0)


def test_guided_keeps_the_device_tensors_per_tuple_of_values():
    denoiser = Guided(RecordingEps(), 16)
    first = denoiser.embedding((0.0, 7.0, 7.0))
    assert denoiser.embedding(torch.tensor([0.0, 7.0, 7.0])) is first
    assert torch.equal(first, guidance_embedding(torch.tensor([0.0, 7.0, 7.0]), 16))
    for i in range(Guided.CACHED):
        denoiser.embedding((float(i),))
    assert len(denoiser._tensors) == Guided.CACHED  # bounded: the oldest went first
    assert denoiser.embedding((0.0, 7.0, 7.0)) is not first


# --- consistency jump ------------------------------------------------------------------------------------

def test_jump_hand_computed_reverse():
    x, eps = torch.tensor([1.0]), torch.tensor([0.5])
    # x0 = (1 - 0.997667 * 0.5) / 0.068265 = 7.3415; x_259 = 0.811773 x0 + 0.583973 * 0.5 = 6.2516
    assert consistency_jump(x, eps, 999, 0).item() == pytest.approx(7.34150, abs=1e-3)
    assert consistency_jump(x, eps, 999, 259).item() == pytest.approx(6.25161, abs=1e-3)


def test_jump_hand_computed_forward():
    x, eps = torch.tensor([0.2]), torch.tensor([-1.0])
    # x0 = (0.2 + 0.133252) / 0.991082 = 0.336250; x_259 = 0.811773 x0 - 0.583973 = -0.311014
    assert consistency_jump(x, eps, 19, 259).item() == pytest.approx(-0.311014, abs=1e-5)


def test_jump_to_zero_returns_x0_exactly():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    alpha_t, sigma_t = alpha_sigma(779)
    x0 = (x - sigma_t * eps) / alpha_t
    assert torch.equal(consistency_jump(x, eps, 779, 0), x0)
    # not the soft boundary sqrt(abar_0) x0 + sqrt(1 - abar_0) eps
    abar0 = alphas_cumprod()[0].item()
    soft = math.sqrt(abar0) * x0 + math.sqrt(1 - abar0) * eps
    assert (consistency_jump(x, eps, 779, 0) - soft).abs().max().item() > 0.01


@pytest.mark.parametrize("t, s", [(19, 259), (259, 519), (339, 699), (779, 999), (19, 999)])
def test_jump_up_then_down_with_same_eps_is_identity(t, s):
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    up = consistency_jump(x, eps, t, s)
    assert not torch.allclose(up, x, atol=1e-2)
    back = consistency_jump(up, eps, s, t)
    assert torch.allclose(back, x, atol=1e-5)


def test_jump_with_the_true_noise_recovers_the_clean_latent():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    x_t = add_noise(x0, eps, 519)
    assert torch.allclose(consistency_jump(x_t, eps, 519, 0), x0, atol=1e-5)
    assert torch.allclose(consistency_jump(x_t, eps, 519, 259), add_noise(x0, eps, 259), atol=1e-5)


def test_jump_computes_in_fp32():
    x, eps = torch.ones(3, dtype=torch.float16), torch.full((3,), 0.5, dtype=torch.float16)
    out = consistency_jump(x, eps, 999, 259)
    assert out.dtype == torch.float32
    assert out[0].item() == pytest.approx(6.25161, abs=1e-3)


# --- dynamic guidance ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau, expected", [
    (0.8, [0.0, 19.0, 19.0, 19.0]),
    (0.7, [0.0, 0.0, 19.0, 19.0]),
    (1.0, [19.0, 19.0, 19.0, 19.0]),
    (0.2, [0.0, 0.0, 0.0, 0.0]),
])
def test_dynamic_guidance_sd15_steps(tau, expected):
    assert [dynamic_guidance(19.0, t, tau) for t in (999, 779, 519, 259)] == expected


def test_dynamic_guidance_sdxl_steps_inclusive_at_tau():
    assert [dynamic_guidance(7.0, t, 0.7) for t in (999, 699, 499, 249)] == [0.0, 7.0, 7.0, 7.0]
    assert dynamic_guidance(7.0, 700, 0.7) == 7.0  # t / 1000 == tau: still guided
    assert dynamic_guidance(7.0, 701, 0.7) == 0.0


# --- timesteps visited -----------------------------------------------------------------------------------

def chain(jumps):
    return [jumps[0].t] + [j.s for j in jumps]


@pytest.mark.parametrize("reverse, expected", [
    ([259, 519, 779, 999], [999, 779, 519, 259, 0]),
    ([249, 499, 699, 999], [999, 699, 499, 249, 0]),
    ([339, 699, 999], [999, 699, 339, 0]),
    ([999, 259, 779, 519], [999, 779, 519, 259, 0]),  # order of the input does not matter
])
def test_reverse_jumps(reverse, expected):
    jumps = reverse_jumps(reverse)
    assert chain(jumps) == expected
    assert all(isinstance(j, Jump) and j.s < j.t for j in jumps)
    assert len(jumps) == len(reverse)


@pytest.mark.parametrize("forward, expected", [
    ([19, 259, 519, 779], [19, 259, 519, 779, 999]),
    ([19, 249, 499, 699], [19, 249, 499, 699, 999]),
    ([19, 339, 699], [19, 339, 699, 999]),
])
def test_forward_jumps(forward, expected):
    jumps = forward_jumps(forward)
    assert chain(jumps) == expected
    assert all(j.s > j.t for j in jumps)
    assert len(jumps) == len(forward)


def test_jump_lists_exact():
    assert reverse_jumps([339, 699, 999]) == [Jump(999, 699), Jump(699, 339), Jump(339, 0)]
    assert forward_jumps([19, 339, 699]) == [Jump(19, 339), Jump(339, 699), Jump(699, 999)]
