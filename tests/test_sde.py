"""The SDE step against closed forms, torch.distributions and diffusers' Euler scheduler."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from common import sde
from common.sde import SAMPLERS, make_sigmas, sde_step, transition_kl

SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 6, 5, generator=g), torch.randn(batch, 4, 6, 5, generator=g)


def test_sd3_schedule_comes_from_diffusers():
    expected = [1.0, 0.960129, 0.913349, 0.857692, 0.790368, 0.707278, 0.602151, 0.464876, 0.278049, 0.008929, 0.0]
    assert torch.allclose(make_sigmas(SD3_SCHEDULE, 10), torch.tensor(expected), atol=1e-6)


def test_dynamic_shift_schedule_matches_flux_grid():
    config = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)
    sigmas = make_sigmas(config, 6, image_seq_len=1024)  # FLUX at 512 px: m = 0.63
    expected = [1.0, 0.904, 0.790, 0.652, 0.484, 0.273, 0.0]
    assert torch.allclose(sigmas, torch.tensor(expected), atol=1.5e-3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_noise_zero_is_exactly_euler(sampler):
    velocity, x = _inputs()
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    for j in range(10):
        out = sde_step(velocity, x, j, sigmas, 0.0, sampler, generator=torch.Generator().manual_seed(1))
        assert torch.equal(out.sample, x + (sigmas[j + 1] - sigmas[j]) * velocity)
        reference = scheduler.step(velocity, scheduler.timesteps[j], x, return_dict=False)[0]
        assert torch.equal(out.sample, reference)
        assert torch.all(out.std == 0) and not out.trainable.any()
        assert torch.all(out.log_prob == 0)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("step", [0, 4, 8])
def test_log_prob_is_the_normal_density_mean_over_dims(sampler, step):
    velocity, x = _inputs()
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    level = {"flow": 0.7, "cps": 0.8, "dance": 0.3, "wan": 1.0}[sampler]
    out = sde_step(velocity, x, step, sigmas, level, sampler, generator=torch.Generator().manual_seed(2))
    std = out.std.view(-1, 1, 1, 1).expand_as(x)
    expected = Normal(out.mean, std).log_prob(out.sample).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, expected, atol=1e-5)
    # scoring the drawn sample again gives the same log-prob, and any other sample a lower one here
    again = sde_step(velocity, x, step, sigmas, level, sampler, prev_sample=out.sample)
    assert torch.equal(again.log_prob, out.log_prob)
    assert out.trainable.all()


def test_transition_means_and_stds_match_the_formulas():
    velocity, x = _inputs()
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    s, s1, s_next = sigmas[3].item(), sigmas[1].item(), sigmas[4].item()
    dt = s_next - s
    x1 = x + (1 - s) * velocity
    x0 = x - s * velocity
    # Flow-SDE, paper Eq. 9
    g = 0.7 * math.sqrt(s / (1 - s))
    out = sde_step(velocity, x, 3, sigmas, 0.7, "flow", generator=torch.Generator())
    assert torch.allclose(out.mean, x + dt * (velocity + g**2 / (2 * s) * x1), atol=1e-6)
    assert out.std[0].item() == pytest.approx(g * math.sqrt(-dt), rel=1e-6)
    assert out.diffusion[0].item() == pytest.approx(g, rel=1e-6)
    # CPS
    std = s_next * math.sin(0.8 * math.pi / 2)
    out = sde_step(velocity, x, 3, sigmas, 0.8, "cps", generator=torch.Generator())
    assert torch.allclose(out.mean, (1 - s_next) * x0 + math.sqrt(s_next**2 - std**2) * x1, atol=1e-6)
    assert out.std[0].item() == pytest.approx(std, rel=1e-6)
    # Dance-SDE: Flow-SDE with constant g = eta
    out = sde_step(velocity, x, 3, sigmas, 0.3, "dance", generator=torch.Generator())
    assert torch.allclose(out.mean, x + dt * (velocity + 0.3**2 / (2 * s) * x1), atol=1e-6)
    assert out.std[0].item() == pytest.approx(0.3 * math.sqrt(-dt), rel=1e-6)
    # at sigma = 1 Flow-SDE uses sigma_1 inside g, so the std is exactly a
    out = sde_step(velocity, x, 0, sigmas, 0.7, "flow", generator=torch.Generator())
    assert out.std[0].item() == pytest.approx(0.7, rel=1e-6)
    del s1


def test_flow_sde_std_profile_on_the_sd3_grid():
    velocity, x = _inputs(batch=1)
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    stds = [sde_step(velocity, x, j, sigmas, 0.7, "flow", generator=torch.Generator()).std.item() for j in range(10)]
    expected = [0.70, 0.74, 0.54, 0.45, 0.39, 0.35, 0.32, 0.28, 0.23, 0.006]
    assert stds == pytest.approx(expected, abs=0.006)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_no_nan_at_the_last_step_and_on_ode_steps(sampler):
    velocity, x = _inputs()
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    for level in (0.0, 0.7, 1.0):
        for step in (0, 9):
            out = sde_step(velocity, x, step, sigmas, level, sampler, generator=torch.Generator().manual_seed(3))
            for value in (out.sample, out.mean, out.log_prob, out.std, out.diffusion):
                assert torch.isfinite(value).all()
        last = sde_step(velocity, x, 9, sigmas, level, sampler, generator=torch.Generator())
        assert not last.trainable.any()  # sigma_next = 0: sampled, never trained
    cps_last = sde_step(velocity, x, 9, sigmas, 0.8, "cps", generator=torch.Generator())
    assert torch.equal(cps_last.std, torch.zeros(3))  # CPS leaves no noise in the final sample
    assert torch.allclose(cps_last.sample, x - sigmas[9] * velocity)  # = x0_hat


def test_per_sample_step_indices_and_noise_levels():
    velocity, x = _inputs(batch=4)
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    steps, levels = torch.tensor([0, 2, 5, 8]), torch.tensor([0.7, 0.0, 0.5, 0.7])
    out = sde_step(velocity, x, steps, sigmas, levels, "flow", generator=torch.Generator().manual_seed(0))
    for i in range(4):
        single = sde_step(velocity[i:i + 1], x[i:i + 1], int(steps[i]), sigmas, float(levels[i]), "flow",
                          prev_sample=out.sample[i:i + 1])
        assert torch.allclose(single.log_prob, out.log_prob[i:i + 1], atol=1e-6)
        assert torch.allclose(single.mean, out.mean[i:i + 1])
    assert out.trainable.tolist() == [True, False, True, True]


def test_log_prob_is_invariant_to_batch_split():
    velocity, x = _inputs(batch=6)
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    out = sde_step(velocity, x, 4, sigmas, 0.7, "flow", generator=torch.Generator().manual_seed(0))
    parts = [sde_step(velocity[i:i + 2], x[i:i + 2], 4, sigmas, 0.7, "flow", prev_sample=out.sample[i:i + 2])
             for i in (0, 2, 4)]
    assert torch.equal(torch.cat([p.log_prob for p in parts]), out.log_prob)


def test_cps_unnormalized_surrogate():
    velocity, x = _inputs()
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    exact = sde_step(velocity, x, 3, sigmas, 0.8, "cps", generator=torch.Generator().manual_seed(4))
    surrogate = sde_step(velocity, x, 3, sigmas, 0.8, "cps", prev_sample=exact.sample, logprob="cps_unnormalized")
    assert torch.allclose(surrogate.log_prob, -((exact.sample - exact.mean) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(surrogate.mean, exact.mean)


def test_gradient_flows_through_the_mean_only():
    velocity, x = _inputs()
    velocity.requires_grad_(True)
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    target = torch.randn_like(x).requires_grad_(True)
    out = sde_step(velocity, x, 2, sigmas, 0.7, "flow", prev_sample=target)
    out.log_prob.sum().backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0
    assert target.grad is None  # x' is detached


def test_transition_kl_closed_forms():
    velocity, x = _inputs()
    other = velocity + 0.1 * torch.randn_like(velocity)
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    a = sde_step(velocity, x, 3, sigmas, 0.7, "flow", generator=torch.Generator())
    b = sde_step(other, x, 3, sigmas, 0.7, "flow", generator=torch.Generator())
    std = a.std.view(-1, 1, 1, 1).expand_as(x)
    expected = kl_divergence(Normal(a.mean, std), Normal(b.mean, std)).mean(dim=(1, 2, 3))
    exact = transition_kl(a.mean, b.mean, a, "exact")
    assert torch.allclose(exact, expected, rtol=1e-5)
    # the public form omits |dt|: KL_pub = |dt| * KL_exact
    assert torch.allclose(transition_kl(a.mean, b.mean, a, "flowgrpo"), exact * (-a.dt), rtol=1e-5)
    # Flow-SDE closed form through the velocities (ALGORITHMS.md §2.6), per element
    s, g, dt = a.sigma[0], a.diffusion[0], a.dt[0]
    factor = (-dt / 2) * (1 / g + g * (1 - s) / (2 * s)) ** 2
    assert torch.allclose(exact, factor * ((velocity - other) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4)


def test_compiled_step_matches_eager():
    velocity, x = _inputs(batch=3)
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    try:
        for sampler, level in (("flow", 0.7), ("cps", 0.8), ("dance", 0.3)):
            sde.use_compile(False)
            eager = sde_step(velocity, x, 2, sigmas, level, sampler, generator=torch.Generator().manual_seed(5))
            sde.use_compile(True)
            compiled = sde_step(velocity, x, 2, sigmas, level, sampler, generator=torch.Generator().manual_seed(5))
            for name in ("sample", "mean", "std", "log_prob"):
                assert torch.allclose(getattr(compiled, name), getattr(eager, name), atol=1e-6, rtol=0), name
            scored = sde_step(velocity, x, 2, sigmas, level, sampler, prev_sample=eager.sample)
            assert torch.allclose(scored.log_prob, eager.log_prob, atol=1e-6, rtol=0)
    finally:
        sde.use_compile(False)


def test_bad_names_fail_clearly():
    velocity, x = _inputs()
    sigmas = make_sigmas(SD3_SCHEDULE, 10)
    with pytest.raises(ValueError, match="unknown sampler"):
        sde_step(velocity, x, 0, sigmas, 0.7, "ddim")
    with pytest.raises(ValueError, match="unknown logprob"):
        sde_step(velocity, x, 0, sigmas, 0.7, "flow", logprob="sum")
