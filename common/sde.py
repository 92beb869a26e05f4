"""The SDE step: one function, used identically by rollout and by training-time log-probs.

Conventions (ALGORITHMS.md §1-2): x_s = (1 - s)·x0 + s·eps, the model predicts v = eps - x0,
the grid runs from sigma_0 = 1 down to sigma_N = 0 and every step has dt = sigma' - sigma < 0.
A stochastic step is the Gaussian pi(x'|x) = N(mean, std^2 I):

- `flow`  (Flow-GRPO Eq. 9): g = a·sqrt(sigma / (1 - sigma~)), sigma~ = sigma_1 at sigma = 1,
          mean = x + dt·[v + g²/(2 sigma)·(x + (1 - sigma)·v)], std = g·sqrt|dt|
- `cps`   (Coefficients-Preserving Sampling): std = sigma'·sin(a·pi/2),
          mean = (1 - sigma')·x0_hat + sqrt(sigma'² - std²)·x1_hat
- `dance` (DanceGRPO): flow with a constant g = a.
- `wan`   (flow_grpo's Wan2.1 script): flow with g = a·(sigma_min + (sigma_max - sigma_min)·sigma),
          sigma_max = the grid's second value, sigma_min = its last (0 on the released grid);
          the published sampler is a = 1.

`noise_level` (a) = 0 is exactly the Euler ODE step x + v·dt for every type. All maths runs
in fp32 whatever the model dtype. Log-probs are the exact Gaussian log-density *averaged*
over the non-batch dims, the convention of every published config (their clip ranges assume
it); `logprob="cps_unnormalized"` is the public CPS code's surrogate -mean (x' - mean)²,
offered for parity only (its ratios are the exact ones raised to the power 2·std²).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

SAMPLERS = ("flow", "cps", "dance", "wan")
LOGPROBS = ("exact", "cps_unnormalized")
KL_CONVENTIONS = ("exact", "flowgrpo")

_compile_enabled = False
_compiled_core = None


def use_compile(enabled: bool):
    """Route every `sde_step` call (rollout and training alike) through `torch.compile`."""
    global _compile_enabled
    _compile_enabled = bool(enabled)


@dataclass
class StepOutput:
    sample: torch.Tensor      # x' (drawn, or the given prev_sample), fp32
    log_prob: torch.Tensor    # (B,) mean over non-batch dims; 0 where not trainable
    mean: torch.Tensor        # transition mean, fp32
    std: torch.Tensor         # (B,) per-step std, sqrt|dt| included; 0 on ODE steps
    diffusion: torch.Tensor   # (B,) g for flow/dance/wan, std for cps: the public KL's scale
    sigma: torch.Tensor       # (B,)
    sigma_next: torch.Tensor  # (B,)
    dt: torch.Tensor          # (B,) sigma_next - sigma < 0
    trainable: torch.Tensor   # (B,) bool: std > 0 and sigma_next > 0


def _sde_step_core(velocity, sample, sigma, sigma_next, sigma_for_g, sigma_max, sigma_min, noise_level,
                   noise_or_prev, draw: bool, sampler: str, logprob: str):
    """Pure tensor maths of one step (compilable, no Python branching on values)."""
    shape = (-1,) + (1,) * (sample.ndim - 1)
    v, x = velocity.float(), sample.float()
    s, s_next, a = sigma.view(shape), sigma_next.view(shape), noise_level.view(shape)
    dt = s_next - s
    euler = x + dt * v
    x0_hat, x1_hat = x - s * v, x + (1 - s) * v
    if sampler == "cps":
        std = s_next * torch.sin(a * (math.pi / 2))
        diffusion = std
        mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * x1_hat
    else:
        if sampler == "flow":
            g = a * torch.sqrt(s / (1 - sigma_for_g.view(shape)))
        elif sampler == "wan":
            low = sigma_min.view(shape)
            g = a * (low + (sigma_max.view(shape) - low) * s)
        else:  # dance
            g = a
        std = g * torch.sqrt(-dt)
        diffusion = g
        mean = x + dt * (v + g**2 / (2 * s) * x1_hat)
    mean = torch.where(a == 0, euler, mean)
    std = torch.where(a == 0, torch.zeros_like(std), std)
    next_sample = mean + std * noise_or_prev.float() if draw else noise_or_prev.float()
    next_sample = next_sample.detach()
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    dims = tuple(range(1, sample.ndim))
    if logprob == "exact":
        log_density = (-((next_sample - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std)
                       - 0.5 * math.log(2 * math.pi))
    else:  # cps_unnormalized: the public CPS surrogate
        log_density = -((next_sample - mean) ** 2)
    trainable = positive.view(-1) & (sigma_next > 0)
    log_prob = torch.where(trainable, log_density.mean(dim=dims), torch.zeros_like(sigma))
    return next_sample, log_prob, mean, std.view(-1), diffusion.expand_as(std).reshape(-1), dt.view(-1), trainable


def sde_step(velocity, sample, step_index, sigmas, noise_level, sampler="flow", prev_sample=None,
             generator=None, logprob="exact"):
    """One denoising transition from `sample` at grid step `step_index` (int or (B,) tensor).

    With `prev_sample` it scores that sample (training); otherwise it draws one with
    `generator` (a torch.Generator or one per sample, noise drawn on its device in fp32).
    `noise_level` is a float or a (B,) tensor (0 = Euler ODE for that sample).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if logprob not in LOGPROBS:
        raise ValueError(f"unknown logprob {logprob!r}; choose one of {LOGPROBS}")
    batch, device = sample.shape[0], sample.device
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    index = torch.as_tensor(step_index, device=device).long().expand(batch)
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    # sigma~ (Flow-SDE): at sigma = 1 use the grid's second value, avoiding 1/0; test >= 1, not ==
    sigma_for_g = torch.where(sigma >= 1, sigmas[1].expand(batch), sigma)
    # Wan's g is linear from sigma_max = sigmas[1] (not sigmas[0]) to sigma_min = sigmas[-1], as its script reads them
    sigma_max, sigma_min = sigmas[1].expand(batch), sigmas[-1].expand(batch)
    noise_level = torch.as_tensor(noise_level, device=device, dtype=torch.float32).expand(batch).contiguous()
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor  # lazily: `validate` imports this module

        noise = randn_tensor(sample.shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        noise_or_prev, draw = noise.to(device), True
    else:
        noise_or_prev, draw = prev_sample.detach(), False
    core = _core()
    out = core(velocity, sample, sigma, sigma_next, sigma_for_g, sigma_max, sigma_min, noise_level, noise_or_prev,
               draw, sampler, logprob)
    next_sample, log_prob, mean, std, diffusion, dt, trainable = out
    return StepOutput(next_sample, log_prob, mean, std, diffusion, sigma, sigma_next, dt, trainable)


def _core():
    global _compiled_core
    if not _compile_enabled:
        return _sde_step_core
    if _compiled_core is None:
        # one graph per (sampler, logprob, draw/score, grad on/off, shape family): the default limit
        # of 8 is reached by a process that trains with several samplers (the test suite does)
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_core = torch.compile(_sde_step_core, fullgraph=True)
    return _compiled_core


def transition_kl(mean, mean_ref, step: StepOutput, convention="exact"):
    """Per-sample KL(N(mean, s²) || N(mean_ref, s²)) per latent element (mean over dims).

    `exact`: mean_D (Δmean)² / (2 std²), the true per-element KL of the two transitions.
    `flowgrpo`: mean_D (Δmean)² / (2 g²), the public code's form, which omits the |dt| of
    std² = g²|dt| (ALGORITHMS.md §2.6); published betas were tuned on it.
    Zero on steps that are not trainable.
    """
    if convention not in KL_CONVENTIONS:
        raise ValueError(f"unknown kl convention {convention!r}; choose one of {KL_CONVENTIONS}")
    scale = step.std if convention == "exact" else step.diffusion
    scale = torch.where(step.trainable, scale, torch.ones_like(scale))
    dims = tuple(range(1, mean.ndim))
    kl = ((mean.float() - mean_ref.float()) ** 2).mean(dim=dims) / (2 * scale**2)
    return torch.where(step.trainable, kl, torch.zeros_like(kl))


def make_sigmas(scheduler_config, num_steps, image_seq_len=None):
    """The sigma grid (num_steps + 1 values, 1 -> 0, fp32) from diffusers' scheduler.

    Static shift (SD3) comes from `set_timesteps(num_steps)`; with `use_dynamic_shifting`
    (FLUX, Qwen-Image) the shift mu is computed from the image's token count as their
    pipelines do, on the grid linspace(1, 1/N, N).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler  # lazily: importing diffusers takes seconds

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    if scheduler.config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("this scheduler uses dynamic shifting: pass image_seq_len")
        config = scheduler.config
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = image_seq_len * slope + config.base_shift - slope * config.base_image_seq_len
        scheduler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    else:
        scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float().cpu()
