"""The analytic oracle: Gaussian data, whose velocity field is known in closed form.

For x0 ~ N(m, s²) per element and x_sigma = (1 - sigma)·x0 + sigma·eps, the marginal has
variance V = (1 - sigma)² s² + sigma² and the exact velocity E[eps - x0 | x] is affine in x:
    v(x, sigma) = alpha·(x - (1 - sigma)·m) - m,   alpha = (sigma - (1 - sigma)·s²) / V.
Every sampler step is then affine in x plus Gaussian noise, x' = A·x + B + std·z, so the
exact mean and variance of x at every step follow from a two-line recursion. Tests compare
particle runs of the real rollout against it; the README's sampler table comes from it.
"""

import math

import torch

from common.models.base import ModelAdapter, PromptEmbeds


def velocity_coefficients(sigma, data_mean, data_var):
    """(alpha, beta) with v(x, sigma) = alpha·x + beta."""
    variance = (1 - sigma) ** 2 * data_var + sigma**2
    alpha = (sigma - (1 - sigma) * data_var) / variance
    return alpha, -alpha * (1 - sigma) * data_mean - data_mean


def step_coefficients(sigma, sigma_next, sigma_1, noise_level, sampler, data_mean, data_var):
    """(A, B, std) of one step x' = A·x + B + std·z, derived by hand from ALGORITHMS.md §2."""
    alpha, beta = velocity_coefficients(sigma, data_mean, data_var)
    dt = sigma_next - sigma
    if noise_level == 0:
        return 1 + dt * alpha, dt * beta, 0.0
    if sampler == "cps":
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        k = math.sqrt(max(sigma_next**2 - std**2, 0.0))
        slope = -sigma * (1 - sigma_next) + k * (1 - sigma)  # coefficient of v in the mean
        return (1 - sigma_next) + k + slope * alpha, slope * beta, std
    if sampler == "flow":
        sigma_for_g = sigma_1 if sigma >= 1 else sigma
        g = noise_level * math.sqrt(sigma / (1 - sigma_for_g))
    elif sampler == "dance":
        g = noise_level
    else:
        raise ValueError(sampler)
    c = g**2 / (2 * sigma)
    a = 1 + dt * ((1 + c * (1 - sigma)) * alpha + c)
    b = dt * (1 + c * (1 - sigma)) * beta
    return a, b, g * math.sqrt(-dt)


def velocity_slope(sigma, sigma_next, sigma_1, noise_level, sampler):
    """∂mean/∂v of one step: how far the transition mean moves per unit shift of the velocity
    (the coefficient of v in ALGORITHMS.md §2's means; `step_coefficients` multiplies it by beta)."""
    dt = sigma_next - sigma
    if noise_level == 0:
        return dt
    if sampler == "cps":
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        return -sigma * (1 - sigma_next) + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * (1 - sigma)
    g = noise_level * math.sqrt(sigma / (1 - (sigma_1 if sigma >= 1 else sigma))) if sampler == "flow" else noise_level
    return dt * (1 + g**2 / (2 * sigma) * (1 - sigma))


def final_mean(sigmas, noise_level, sampler, data_mean, data_var, offsets):
    """E[x_N] (a torch fp64 scalar, differentiable in `offsets`) when the velocity of step j is the
    exact one plus `offsets[j]` (a (N,) tensor): the moment recursion with the shift's slope added.
    Its gradient is the exact policy gradient dJ/d(offsets) of the reward r(x) = x."""
    sigmas = [float(s) for s in sigmas]
    mean = torch.zeros((), dtype=torch.float64)
    for j in range(len(sigmas) - 1):
        a, b, _ = step_coefficients(sigmas[j], sigmas[j + 1], sigmas[1], noise_level, sampler, data_mean, data_var)
        mean = a * mean + b + velocity_slope(sigmas[j], sigmas[j + 1], sigmas[1], noise_level, sampler) * offsets[j]
    return mean


def exact_moments(sigmas, noise_level, sampler, data_mean, data_var, noise_levels=None):
    """Exact (mean, variance) of x at every grid point, starting from x_T ~ N(0, 1)."""
    sigmas = [float(s) for s in sigmas]
    mean, var, out = 0.0, 1.0, [(0.0, 1.0)]
    for j in range(len(sigmas) - 1):
        level = noise_level if noise_levels is None else float(noise_levels[j])
        a, b, std = step_coefficients(sigmas[j], sigmas[j + 1], sigmas[1], level, sampler, data_mean, data_var)
        mean, var = a * mean + b, a * a * var + std * std
        out.append((mean, var))
    return out


class GaussianOracleAdapter(ModelAdapter):
    """An adapter whose 'transformer' is the exact velocity field of N(m, s²) data."""

    name = "gaussian_oracle"

    def __init__(self, data_mean=0.8, data_var=0.09, shape=(4,), scheduler_config=None):
        self.data_mean, self.data_var, self.shape = data_mean, data_var, tuple(shape)
        self.scheduler_config = scheduler_config or dict(num_train_timesteps=1000, shift=3.0)
        self.transformer = torch.nn.Identity()

    def encode_prompts(self, prompts):
        return PromptEmbeds(hidden=torch.zeros(len(prompts), 1, 1), pooled=torch.zeros(len(prompts), 1))

    def transformer_forward(self, latents, sigma, embeds):
        sigma = sigma.view((-1,) + (1,) * (latents.ndim - 1)).double()
        alpha, beta = velocity_coefficients(sigma, self.data_mean, self.data_var)
        return (alpha * latents.double() + beta).float()

    def decode(self, latents):
        return latents

    def latent_shape(self, batch, resolution=None):
        return (batch, *self.shape)
