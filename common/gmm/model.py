"""The gmm world's velocity network: an MLP v(x, sigma, c) over points in R^D.

It is a diffusers `ModelMixin` (with `PeftAdapterMixin`), so `from_pretrained` /
`save_pretrained`, peft LoRA on its Linear layers (`add_adapter`, `disable_adapters`), the
diffusers-format LoRA export and `load_lora_adapter` are the same calls as for the image
models. Conditioning is the prompt's target distribution over the 8 modes (zeros = the
unconditional branch, trained by caption dropout for CFG).
"""

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from torch import nn

from common.gmm.world import NUM_MODES

# the schedule the base samples with (FlowMatchEulerDiscreteScheduler config); no shift: in two
# dimensions the noise-to-data path needs no extra time at high sigma
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def time_features(sigma, num_frequencies):
    """sin/cos of sigma at geometric frequencies 1 .. 1000 (B, 2F)."""
    frequencies = torch.exp(torch.linspace(0, math.log(1000.0), num_frequencies, device=sigma.device))
    angles = sigma.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class GMMVelocityNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """v = MLP([x, time features, condition]); SiLU between `num_layers` hidden Linear layers."""

    @register_to_config
    def __init__(self, dim: int = 2, cond_dim: int = NUM_MODES, width: int = 256, num_layers: int = 3,
                 time_frequencies: int = 16):
        super().__init__()
        self.input = nn.Linear(dim + 2 * time_frequencies + cond_dim, width)
        self.hidden = nn.ModuleList([nn.Linear(width, width) for _ in range(num_layers - 1)])
        self.output = nn.Linear(width, dim)

    def forward(self, sample, sigma, cond):
        h = torch.cat([sample, time_features(sigma, self.config.time_frequencies).to(sample.dtype),
                       cond.to(sample.dtype)], dim=1)
        h = nn.functional.silu(self.input(h))
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        return self.output(h)
