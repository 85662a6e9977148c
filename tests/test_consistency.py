"""The iCD equations: noise schedule, guidance embedding, the consistency jump, dynamic guidance, step lists."""

import math

import pytest
import torch

from icdcli.consistency import (
    ENCODE_START_TIMESTEP,
    Jump,
    add_noise,
    alpha_sigma,
    alphas_cumprod,
    consistency_jump,
    dynamic_guidance,
    forward_jumps,
    guidance_embedding,
    reverse_jumps,
)

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


def test_encode_start_timestep():
    assert ENCODE_START_TIMESTEP == 19


# --- guidance embedding ----------------------------------------------------------------------------------

def test_guidance_embedding_shape_and_dtype():
    e = guidance_embedding(torch.tensor([0.0, 7.0, 19.0]))
    assert e.shape == (3, 512)
    assert e.dtype == torch.float32
    assert guidance_embedding(torch.tensor([1.0]), dim=64).shape == (1, 64)


def test_guidance_embedding_of_zero_is_sin_zeros_then_cos_ones():
    e = guidance_embedding(torch.tensor([0.0]))[0]
    assert torch.equal(e[:256], torch.zeros(256))
    assert torch.equal(e[256:], torch.ones(256))


def test_guidance_embedding_hand_computed_values():
    e = guidance_embedding(torch.tensor([0.5]))[0]
    assert e[0].item() == pytest.approx(math.sin(500.0), abs=1e-4)
    assert e[256].item() == pytest.approx(math.cos(500.0), abs=1e-4)
    f10 = math.exp(-math.log(1e4) * 10 / 255)
    assert e[10].item() == pytest.approx(math.sin(500.0 * f10), abs=1e-4)
    assert e[266].item() == pytest.approx(math.cos(500.0 * f10), abs=1e-4)
    # the last frequency is 1e-4: angle 0.05
    assert e[255].item() == pytest.approx(math.sin(0.05), abs=1e-6)
    assert e[511].item() == pytest.approx(math.cos(0.05), abs=1e-6)


def test_guidance_embedding_rows_are_independent():
    both = guidance_embedding(torch.tensor([0.0, 7.0]))
    assert torch.equal(both[0], guidance_embedding(torch.tensor([0.0]))[0])
    assert torch.equal(both[1], guidance_embedding(torch.tensor([7.0]))[0])
    assert not torch.allclose(both[0], both[1])


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 7.0, 19.0])
def test_guidance_embedding_equals_diffusers(w):
    from diffusers import StableDiffusionPipeline

    # diffusers multiplies by 1000 itself and does not subtract 1 (its LCM pipeline passes scale - 1).
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([w]), embedding_dim=512)
    ours = guidance_embedding(torch.tensor([w]))
    # the two compute the fp32 frequencies in a different order: angles up to 1000 w differ in the last bits
    assert (ours - theirs).abs().max().item() <= 2e-4 * max(1.0, w)
    if w > 0:  # a (w - 1) shift would give a completely different vector
        shifted = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1]), embedding_dim=512)
        assert (ours - shifted).abs().max().item() > 0.5


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
