"""Samplers against the analytic Gaussian oracle: exact per-step moments and ODE convergence."""

import math

import pytest
import torch

from common.oracle import GaussianOracleAdapter, exact_moments
from common.rollout import initial_latents, rollout
from common.sde import make_sigmas

DATA_MEAN, DATA_VAR = 0.8, 0.09
SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)
DEFAULT_LEVELS = {"ode": ("flow", 0.0), "flow": ("flow", 0.7), "cps": ("cps", 0.8), "dance": ("dance", 0.3)}


@pytest.mark.parametrize("name", ["ode", "flow", "cps", "dance"])
def test_particles_match_the_exact_recursion_at_every_step(name):
    sampler, level = DEFAULT_LEVELS[name]
    adapter = GaussianOracleAdapter(DATA_MEAN, DATA_VAR, shape=(100,))
    sigmas = make_sigmas(SCHEDULE, 10)
    batch = 240  # 24,000 independent particles (every element is one)
    latents = initial_latents(adapter.latent_shape(batch), range(batch))
    trajectory = rollout(adapter, adapter.encode_prompts([""] * batch), sigmas, latents, noise_level=level,
                         sampler=sampler, generator=torch.Generator().manual_seed(7))
    moments = exact_moments(sigmas, level, sampler, DATA_MEAN, DATA_VAR)
    particles = trajectory.latents.double()
    n = particles.shape[0] * particles.shape[2]
    for j, (mean, var) in enumerate(moments):
        values = particles[:, j].flatten()
        assert abs(values.mean().item() - mean) <= 3 * math.sqrt(var / n), (j, values.mean().item(), mean)
        assert abs(values.var().item() - var) <= 3 * var * math.sqrt(2 / (n - 1)), (j, values.var().item(), var)


def test_recursion_reproduces_the_independent_reference_table():
    # issue 2's figures, measured with an independent implementation (m = 0.8, s^2 = 0.09)
    reference = {("flow", 0.0): (0.032, 0.072), ("flow", 0.7): (0.0695, 0.0795),
                 ("cps", 0.8): (0.0256, 0.0463), ("dance", 0.3): (0.0479, 0.0760)}
    for (sampler, level), (at_10, at_40) in reference.items():
        for steps, expected in ((10, at_10), (40, at_40)):
            var = exact_moments(make_sigmas(SCHEDULE, steps), level, sampler, DATA_MEAN, DATA_VAR)[-1][1]
            assert var == pytest.approx(expected, abs=6e-4), (sampler, steps)
    cps_limit = exact_moments(make_sigmas(SCHEDULE, 2000), 0.8, "cps", DATA_MEAN, DATA_VAR)[-1][1]
    assert cps_limit == pytest.approx(0.058, abs=1e-3)  # CPS's injected noise does not shrink with dt


def test_euler_ode_converges_to_the_data_distribution():
    adapter = GaussianOracleAdapter(DATA_MEAN, DATA_VAR, shape=(1,))
    sigmas = make_sigmas(SCHEDULE, 2000)
    mean, var = exact_moments(sigmas, 0.0, "flow", DATA_MEAN, DATA_VAR)[-1]
    assert mean == pytest.approx(DATA_MEAN, rel=0.01) and var == pytest.approx(DATA_VAR, rel=0.01)
    # and the real rollout agrees with the recursion on a cheap deterministic check (x_T fixed)
    latents = torch.tensor([[-1.0], [0.0], [1.5]])
    final = rollout(adapter, adapter.encode_prompts([""] * 3), sigmas, latents, noise_level=0.0).latents[:, -1, 0]
    sd_ratio = math.sqrt(var)  # the ODE map is affine: x0 = sqrt(var)·x_T + mean
    assert torch.allclose(final.double(), mean + sd_ratio * latents[:, 0].double(), atol=2e-4)
