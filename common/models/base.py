"""The model-adapter interface: everything an algorithm needs from a text-to-image flow model.

An adapter loads a model (hub id or local dir, through diffusers' `from_pretrained`), encodes
prompts, predicts the velocity at (latents, sigma) with or without classifier-free guidance,
decodes latents to [0, 1] images, and names its LoRA targets and sigma schedule. Adding a
model means writing one subclass in one file and registering it in `common/models/__init__.py`;
no algorithm file changes.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from common.sde import make_sigmas


@dataclass
class PromptEmbeds:
    """Encoded prompts: per-token states (B, L, D) and a pooled vector (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor

    def __len__(self):
        return self.hidden.shape[0]

    def __getitem__(self, index):
        return PromptEmbeds(self.hidden[index], self.pooled[index])

    def repeat(self, batch):
        """The same (single) embedding repeated `batch` times."""
        return PromptEmbeds(self.hidden.expand(batch, *self.hidden.shape[1:]),
                            self.pooled.expand(batch, *self.pooled.shape[1:]))

    @staticmethod
    def cat(items):
        return PromptEmbeds(torch.cat([e.hidden for e in items]), torch.cat([e.pooled for e in items]))

    def to(self, *args, **kwargs):
        return PromptEmbeds(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


class ModelAdapter:
    """Base class; subclasses fill in loading, encoding, the transformer call and decoding."""

    name = "base"
    # peft LoRA defaults (the published recipe for the model family)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_rank, lora_alpha = 32, 64
    default_resolution = 512

    transformer: torch.nn.Module
    scheduler_config: dict
    device = torch.device("cpu")
    dtype = torch.float32
    # what `transformer_forward` calls: the transformer itself, or its distributed wrapper
    # (set by `wrap`), or a frozen copy while `reference()` is active
    _forward_module = None
    frozen_base = None

    @property
    def forward_module(self):
        return self._forward_module if self._forward_module is not None else self.transformer

    def wrap(self, module):
        """Route forwards through `module` (e.g. the DDP-wrapped transformer)."""
        self._forward_module = module

    def keep_frozen_copy(self):
        """For full fine-tuning: keep a frozen copy of the base transformer for `reference()`."""
        import copy

        self.frozen_base = copy.deepcopy(self.transformer).requires_grad_(False).eval()

    @contextmanager
    def reference(self):
        """Forwards inside this block use the frozen base model: the LoRA adapters disabled
        (on the unwrapped transformer, whatever wraps it), or the frozen copy when fully fine-tuning."""
        if self.frozen_base is not None:
            saved, self._forward_module = self._forward_module, self.frozen_base
            try:
                yield
            finally:
                self._forward_module = saved
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    @classmethod
    def load(cls, pretrained=None, device="cpu", dtype=torch.float32):
        raise NotImplementedError

    def encode_prompts(self, prompts) -> PromptEmbeds:
        raise NotImplementedError

    def negative_embeds(self) -> PromptEmbeds:
        """The empty prompt's embedding (batch 1), encoded once and cached."""
        if getattr(self, "_negative", None) is None:
            self._negative = self.encode_prompts([""])
        return self._negative

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        """The raw model call: velocity for latents (B, ...) at sigma (B,)."""
        raise NotImplementedError

    def predict_velocity(self, latents, sigma, embeds: PromptEmbeds, negative: PromptEmbeds = None, guidance=1.0):
        """Velocity in fp32. With guidance > 1 and a negative, CFG as one batched forward of
        [uncond; cond] (as the published code and diffusers' pipeline do): v_u + w·(v_c - v_u)."""
        latents = latents.to(self.dtype)
        sigma = sigma.to(latents.device).float().expand(latents.shape[0])
        if guidance > 1 and negative is not None:
            if len(negative) == 1:
                negative = negative.repeat(latents.shape[0])
            both = self.transformer_forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                                            PromptEmbeds.cat([negative, embeds]))
            uncond, cond = both.float().chunk(2)
            return self.combine_guidance(uncond, cond, guidance)
        return self.transformer_forward(latents, sigma, embeds).float()

    def combine_guidance(self, uncond, cond, guidance):
        return uncond + guidance * (cond - uncond)

    def decode(self, latents):
        """Latents -> float images (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def latent_shape(self, batch, resolution=None):
        raise NotImplementedError

    def image_seq_len(self, resolution=None):
        """Image tokens seen by the transformer (for dynamically shifted schedules)."""
        return None

    def make_sigmas(self, num_steps, resolution=None):
        return make_sigmas(self.scheduler_config, num_steps, self.image_seq_len(resolution))
