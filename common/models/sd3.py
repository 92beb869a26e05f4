"""Stable Diffusion 3 / 3.5 adapter.

Text: CLIP-L and CLIP-G penultimate states (77 tokens each) concatenated and zero-padded to
T5's width, then T5 states (max_sequence_length tokens) appended on the sequence axis; pooled
= the two CLIPs' projected pooled outputs concatenated. diffusers' `encode_prompt` implements
exactly this, so we call it. Latents are VAE latents (16 channels, /8); decoding undoes the
VAE's scaling and shift factors. The transformer takes 1000·sigma as its timestep.
"""

import torch

from common.models.base import PipelineAdapter, PromptEmbeds, prompt_texts


def sd3_transformer_call(module, latents, sigma, embeds: PromptEmbeds):
    """An `SD3Transformer2DModel` (or its wrapper) at sigma: timestep 1000·sigma, token states and
    pooled vector as its text conditioning. Shared by the sd3 and toy adapters (same class)."""
    return module(hidden_states=latents, timestep=sigma * 1000, encoder_hidden_states=embeds.hidden,
                  pooled_projections=embeds.pooled, return_dict=False)[0]


class SD3Adapter(PipelineAdapter):
    name = "sd3"
    lora_rank, lora_alpha = 32, 64
    default_resolution = 512
    max_sequence_length = 128  # T5 tokens, as the published Flow-GRPO recipes train with
    default_pretrained = "stabilityai/stable-diffusion-3.5-medium"  # the published recipes' base (gated on the hub)
    pipeline_class = "StableDiffusion3Pipeline"

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        hidden, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompt_texts(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(hidden=hidden.to(self.dtype), pooled=pooled.to(self.dtype))

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        return sd3_transformer_call(self.forward_module, latents, sigma, embeds)

    def decode(self, latents):
        config = self.vae.config
        latents = latents.float() / config.scaling_factor + config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, batch, resolution=None):
        resolution = resolution or self.default_resolution
        factor = self.pipeline.vae_scale_factor
        return (batch, self.transformer.config.in_channels, resolution // factor, resolution // factor)

    def image_seq_len(self, resolution=None):
        resolution = resolution or self.default_resolution
        return (resolution // self.pipeline.vae_scale_factor // self.transformer.config.patch_size) ** 2
