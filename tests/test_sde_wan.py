"""The `wan` sampler (flow_grpo's Wan2.1 SDE) against hand computations and the Gaussian oracle.

g = a·(sigma_min + (sigma_max - sigma_min)·sigma) with sigma_max = sigmas[1], sigma_min = sigmas[-1];
mean = x + dt·[v + g²/(2 sigma)·x1_hat], std = g·sqrt|dt| (ALGORITHMS.md §2.1 with this g, §11.2).
"""

import math

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from torch.distributions import Normal

from common import sde
from common.oracle import GaussianOracleAdapter, velocity_coefficients
from common.rollout import initial_latents, rollout
from common.sde import sde_step, transition_kl

DATA_MEAN, DATA_VAR = 0.8, 0.09


def wan_sigmas(num_steps):
    """The released Wan2.1 grid as `WanAdapter.make_sigmas` builds it: UniPC flow sigmas, shift 3,
    sigma_0 raised from 1 - 1e-6 to 1."""
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.float().clone()
    sigmas[0] = 1.0
    return sigmas


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # video-shaped latents (B, C, F, h, w), as Wan's
    return torch.randn(batch, 4, 3, 4, 5, generator=g), torch.randn(batch, 4, 3, 4, 5, generator=g)


def test_noise_zero_is_exactly_the_euler_step():
    velocity, x = _inputs()
    for sigmas in (wan_sigmas(20), torch.tensor([1.0, 0.9, 0.6, 0.3, 0.05])):
        for j in range(len(sigmas) - 1):
            out = sde_step(velocity, x, j, sigmas, 0.0, "wan", generator=torch.Generator().manual_seed(1))
            assert torch.equal(out.sample, x + (sigmas[j + 1] - sigmas[j]) * velocity)
            assert torch.equal(out.mean, out.sample)
            assert torch.all(out.std == 0) and not out.trainable.any() and torch.all(out.log_prob == 0)
    # an SDE window: per-sample levels, the a = 0 rows are Euler steps bit for bit
    sigmas = wan_sigmas(20)
    out = sde_step(velocity, x, 5, sigmas, torch.tensor([1.0, 0.0, 1.0]), "wan",
                   generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.sample[1], x[1] + (sigmas[6] - sigmas[5]) * velocity[1])
    assert out.trainable.tolist() == [True, False, True]


@pytest.mark.parametrize("grid", ["wan20", "custom"])
def test_mean_and_std_match_a_hand_computation(grid):
    velocity, x = _inputs()
    # the custom grid ends above 0, so sigma_min = 0.05 enters g (on the released grid it is 0)
    sigmas = wan_sigmas(20) if grid == "wan20" else torch.tensor([1.0, 0.9, 0.6, 0.3, 0.05])
    sigma_max, sigma_min = sigmas[1].item(), sigmas[-1].item()
    steps = (0, 3, 10, 18, 19) if grid == "wan20" else (0, 1, 2, 3)
    for level in (1.0, 0.6):
        for j in steps:
            s, s_next = sigmas[j].item(), sigmas[j + 1].item()
            dt = s_next - s
            g = level * (sigma_min + (sigma_max - sigma_min) * s)
            x1_hat = x + (1 - s) * velocity
            out = sde_step(velocity, x, j, sigmas, level, "wan", generator=torch.Generator().manual_seed(3))
            assert torch.allclose(out.mean, x + dt * (velocity + g**2 / (2 * s) * x1_hat), atol=1e-6), (j, level)
            # the published script's expanded form of the same mean
            published = x * (1 + g**2 / (2 * s) * dt) + velocity * (1 + g**2 * (1 - s) / (2 * s)) * dt
            assert torch.allclose(out.mean, published, atol=1e-6)
            assert out.std[0].item() == pytest.approx(g * math.sqrt(-dt), rel=1e-6)
            assert out.diffusion[0].item() == pytest.approx(g, rel=1e-6)
            assert out.dt[0].item() == pytest.approx(dt, rel=1e-6)
            assert bool(out.trainable.all()) == (s_next > 0)
    # at sigma = 1 the diffusion is exactly sigma_max (no sigma~ substitute needed: g stays finite)
    out = sde_step(velocity, x, 0, sigmas, 1.0, "wan", generator=torch.Generator())
    assert out.diffusion[0].item() == pytest.approx(sigma_max, rel=1e-6)


def test_std_profile_on_the_published_grid():
    velocity, x = _inputs(batch=1)
    sigmas = wan_sigmas(20)
    stds = [sde_step(velocity, x, j, sigmas, 1.0, "wan", generator=torch.Generator()).std.item() for j in range(20)]
    # g·sqrt|dt| with g = 0.98·sigma: ~0.13 at the start, shrinking with sigma, last step 0.139·0.98·sqrt(0.139)
    assert stds[0] == pytest.approx(0.9828 * math.sqrt(1 - 0.9828), abs=1e-3)
    assert stds[-1] == pytest.approx(0.1387 * 0.9828 * math.sqrt(0.1387), abs=1e-3)
    assert all(math.isfinite(v) and v > 0 for v in stds)


@pytest.mark.parametrize("step", [0, 7, 18])
def test_log_prob_is_the_normal_density_mean_over_dims(step):
    velocity, x = _inputs()
    sigmas = wan_sigmas(20)
    out = sde_step(velocity, x, step, sigmas, 1.0, "wan", generator=torch.Generator().manual_seed(4))
    dims = (1, 2, 3, 4)
    std = out.std.view(-1, 1, 1, 1, 1).expand_as(x)
    expected = Normal(out.mean, std).log_prob(out.sample).mean(dim=dims)
    assert torch.allclose(out.log_prob, expected, atol=1e-5)
    by_hand = (-((out.sample - out.mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi))
    assert torch.allclose(out.log_prob, by_hand.mean(dim=dims), atol=1e-5)
    # training scores the stored sample with the same function: the same value
    again = sde_step(velocity, x, step, sigmas, 1.0, "wan", prev_sample=out.sample)
    assert torch.equal(again.log_prob, out.log_prob)
    # the last step (sigma' = 0) is drawn but never trained
    last = sde_step(velocity, x, 19, sigmas, 1.0, "wan", generator=torch.Generator())
    assert not last.trainable.any() and torch.isfinite(last.sample).all()


def test_per_sample_step_indices_and_the_exact_kl():
    velocity, x = _inputs(batch=4)
    sigmas = wan_sigmas(20)
    steps = torch.tensor([0, 4, 11, 17])
    out = sde_step(velocity, x, steps, sigmas, 1.0, "wan", generator=torch.Generator().manual_seed(5))
    for i in range(4):
        single = sde_step(velocity[i:i + 1], x[i:i + 1], int(steps[i]), sigmas, 1.0, "wan",
                          prev_sample=out.sample[i:i + 1])
        assert torch.allclose(single.log_prob, out.log_prob[i:i + 1], atol=1e-6)
        assert torch.allclose(single.mean, out.mean[i:i + 1])
    # the Wan script's KL: mean_D (Δmean)² / (2 g² |dt|) = the `exact` convention
    other = velocity + 0.1 * torch.randn_like(velocity)
    ref = sde_step(other, x, steps, sigmas, 1.0, "wan", prev_sample=out.sample)
    g, dt = out.diffusion.view(-1, 1, 1, 1, 1), out.dt.view(-1, 1, 1, 1, 1)
    expected = ((out.mean - ref.mean) ** 2 / (2 * g**2 * -dt)).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(transition_kl(out.mean, ref.mean, out, "exact"), expected, rtol=1e-5)


def test_compiled_step_matches_eager():
    velocity, x = _inputs(batch=3)
    sigmas = wan_sigmas(20)
    steps = torch.tensor([0, 6, 12])
    try:
        sde.use_compile(False)
        eager = sde_step(velocity, x, steps, sigmas, 1.0, "wan", generator=torch.Generator().manual_seed(6))
        eager_scored = sde_step(velocity, x, steps, sigmas, 1.0, "wan", prev_sample=eager.sample)
        sde.use_compile(True)
        compiled = sde_step(velocity, x, steps, sigmas, 1.0, "wan", generator=torch.Generator().manual_seed(6))
        for name in ("sample", "mean", "std", "diffusion", "log_prob"):
            assert torch.allclose(getattr(compiled, name), getattr(eager, name), atol=1e-6, rtol=0), name
        scored = sde_step(velocity, x, steps, sigmas, 1.0, "wan", prev_sample=eager.sample)
        assert torch.allclose(scored.log_prob, eager_scored.log_prob, atol=1e-6, rtol=0)
    finally:
        sde.use_compile(False)


def wan_moments(sigmas, noise_level):
    """Exact (mean, variance) of x at every grid point under the `wan` sampler with the oracle's
    velocity v = alpha·x + beta, from x_T ~ N(0, 1): each step is x' = A·x + B + std·z with
    A = 1 + dt·[(1 + c(1 - sigma))·alpha + c], B = dt·(1 + c(1 - sigma))·beta, c = g²/(2 sigma)."""
    sigmas = [float(s) for s in sigmas]
    sigma_max, sigma_min = sigmas[1], sigmas[-1]
    mean, var, out = 0.0, 1.0, [(0.0, 1.0)]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        alpha, beta = velocity_coefficients(s, DATA_MEAN, DATA_VAR)
        dt = s_next - s
        g = noise_level * (sigma_min + (sigma_max - sigma_min) * s)
        c = g**2 / (2 * s)
        a = 1 + dt * ((1 + c * (1 - s)) * alpha + c)
        b = dt * (1 + c * (1 - s)) * beta
        mean, var = a * mean + b, a * a * var + g * g * -dt
        out.append((mean, var))
    return out


def test_particles_match_the_exact_recursion_at_every_step():
    adapter = GaussianOracleAdapter(DATA_MEAN, DATA_VAR, shape=(100,))
    sigmas = wan_sigmas(20)
    batch = 240  # 24,000 independent particles (every element is one)
    latents = initial_latents(adapter.latent_shape(batch), range(batch))
    trajectory = rollout(adapter, adapter.encode_prompts([""] * batch), sigmas, latents, noise_level=1.0,
                         sampler="wan", generator=torch.Generator().manual_seed(7))
    particles = trajectory.latents.double()
    n = particles.shape[0] * particles.shape[2]
    for j, (mean, var) in enumerate(wan_moments(sigmas, 1.0)):
        values = particles[:, j].flatten()
        assert abs(values.mean().item() - mean) <= 3 * math.sqrt(var / n), (j, values.mean().item(), mean)
        assert abs(values.var().item() - var) <= 3 * var * math.sqrt(2 / (n - 1)), (j, values.var().item(), var)


def _worst_variance_error(sigmas, noise_level):
    """Largest relative error of the sampler's variance against the true marginal
    (1 - sigma)² s² + sigma² over the grid, and the largest absolute error of its mean."""
    worst_var, worst_mean = 0.0, 0.0
    for (mean, var), s in zip(wan_moments(sigmas, noise_level), (float(s) for s in sigmas)):
        truth = (1 - s) ** 2 * DATA_VAR + s**2
        worst_var = max(worst_var, abs(var - truth) / truth)
        worst_mean = max(worst_mean, abs(mean - (1 - s) * DATA_MEAN))
    return worst_var, worst_mean


def test_marginals_are_the_odes_only_in_the_continuous_limit():
    # measured (m = 0.8, s² = 0.09, a = 1): worst relative variance error over the grid 0.305 at
    # N = 20, 0.0374 at 200, 0.00771 at 1000, 0.00391 at 2000 (Euler ODE: 0.369 / 0.0442 / 0.00908 /
    # 0.00460): first order in 1/N, so a discretisation error, not a bias of the SDE. The mean is
    # exact at every N (E[x1_hat] = 0 on the true marginal, so the extra drift has zero mean).
    coarse, coarse_mean = _worst_variance_error(wan_sigmas(20), 1.0)
    assert coarse > 0.25  # 20 steps are far from the limit
    errors = {n: _worst_variance_error(wan_sigmas(n), 1.0) for n in (1000, 2000)}
    assert errors[2000][0] < 0.005  # 0.0039 measured
    assert 1.8 < errors[1000][0] / errors[2000][0] < 2.2  # halves with dt: 1.97 measured
    assert max(coarse_mean, errors[1000][1], errors[2000][1]) < 1e-9
    final_mean, final_var = wan_moments(wan_sigmas(2000), 1.0)[-1]
    assert final_mean == pytest.approx(DATA_MEAN, abs=1e-9) and final_var == pytest.approx(DATA_VAR, rel=0.005)
