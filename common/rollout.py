"""Rollout: run a model adapter over a sigma grid with the SDE step, keeping what training needs.

One function serves every algorithm: CFG or not, an SDE window (stochastic steps inside it,
Euler ODE outside; Flow-GRPO-Fast and MixGRPO are a window, not a copy of the loop), and a
start/end step so a trajectory can be branched mid-way. Initial noise is drawn on the CPU in
fp32 from one seeded generator per sample, so it is bit-stable across machines and ranks.
"""

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from common.models.base import ModelAdapter, PromptEmbeds
from common.sde import sde_step


@dataclass
class Trajectory:
    latents: torch.Tensor     # (B, T + 1, ...) x at every visited grid point, fp32
    log_probs: torch.Tensor   # (B, T) log pi(x_{j+1} | x_j), 0 where not trainable
    means: torch.Tensor       # (B, T, ...) transition means (GRPO-Guard's RatioNorm needs them)
    stds: torch.Tensor        # (B, T) per-step std (0 on ODE steps)
    noise_levels: torch.Tensor  # (T,) the noise level used at each step (0 = ODE)
    trainable: torch.Tensor   # (B, T) bool: stochastic and not the final step
    step_indices: torch.Tensor  # (T,) grid index of each stored transition
    sigmas: torch.Tensor      # (N + 1,) the whole grid
    images: Optional[torch.Tensor] = None  # (B, 3, H, W) in [0, 1]

    @property
    def timesteps(self):
        """1000·sigma of each stored transition (the SD3 time convention)."""
        return self.sigmas[self.step_indices] * 1000


def derive_seed(*parts):
    """A stable 63-bit seed from any tuple of ints/strings (Python's hash() is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def initial_latents(shape, seeds):
    """x_T ~ N(0, I) in fp32 on the CPU, one generator per sample (`seeds`: one int each)."""
    if len(seeds) != shape[0]:
        raise ValueError(f"need one seed per sample: {len(seeds)} seeds for batch {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def noise_schedule(num_steps, noise_level, sde_window=None):
    """Per-step noise levels: `noise_level` on steps in [start, end) of `sde_window`, 0 elsewhere."""
    start, end = sde_window if sde_window is not None else (0, num_steps)
    if not 0 <= start <= end <= num_steps:
        raise ValueError(f"sde_window {sde_window} must lie inside the {num_steps}-step schedule")
    return torch.tensor([noise_level if start <= j < end else 0.0 for j in range(num_steps)])


@torch.no_grad()
def rollout(adapter: ModelAdapter, embeds: PromptEmbeds, sigmas, latents, *, negative: PromptEmbeds = None,
            guidance=1.0, noise_level=0.7, sampler="flow", sde_window=None, generator=None, logprob="exact",
            start_step=0, end_step=None, decode=True, keep_means=True, progress=None):
    """Denoise `latents` (at grid step `start_step`) to `end_step` (default: the end).

    `negative` (batch 1 or B) and `guidance` > 1 enable CFG. `generator` drives the SDE noise
    (a CPU torch.Generator, or a list with one per sample).
    """
    num_steps = len(sigmas) - 1
    end_step = num_steps if end_step is None else end_step
    levels = noise_schedule(num_steps, noise_level, sde_window)
    batch = latents.shape[0]
    x = latents.to(adapter.device, torch.float32)
    visited, log_probs, means, stds, trainable = [x], [], [], [], []
    for j in range(start_step, end_step):
        velocity = adapter.predict_velocity(x, sigmas[j].expand(batch), embeds, negative, guidance)
        out = sde_step(velocity, x, j, sigmas, float(levels[j]), sampler, generator=generator, logprob=logprob)
        x = out.sample
        visited.append(x)
        log_probs.append(out.log_prob)
        stds.append(out.std)
        trainable.append(out.trainable)
        if keep_means:
            means.append(out.mean)
        if progress is not None:
            progress.update(1)
    steps = torch.arange(start_step, end_step)
    return Trajectory(
        latents=torch.stack(visited, dim=1),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else torch.zeros(batch, 0),
        means=torch.stack(means, dim=1) if means else None,
        stds=torch.stack(stds, dim=1) if stds else torch.zeros(batch, 0),
        noise_levels=levels[start_step:end_step],
        trainable=torch.stack(trainable, dim=1) if trainable else torch.zeros(batch, 0, dtype=torch.bool),
        step_indices=steps,
        sigmas=sigmas,
        images=adapter.decode(x) if decode and end_step == num_steps else None,
    )
