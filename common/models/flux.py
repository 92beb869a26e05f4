"""FLUX.1-dev adapter.

Text: CLIP-L's pooled output (B, 768) and T5-XXL states (B, max_sequence_length, 4096): 128 tokens
as the published Flow-GRPO FLUX recipes train (diffusers' pipeline default is 512); the text
position ids are zeros. diffusers' `FluxPipeline.encode_prompt` implements exactly this, so we
call it. Latents are the VAE latents packed into 2x2 patches: a token sequence (B, L, 64) with
L = (resolution / 16)², and `latent_image_ids` (row, column) positions. FLUX.1-dev is
guidance-distilled: the transformer takes a guidance embedding (3.5) and is run WITHOUT
classifier-free guidance (`--guidance 1`); its time input is sigma (scaled by 1000 inside).
The sigma grid is shifted dynamically by the image token count. Decoding unpacks, undoes the
VAE's scaling and shift, decodes and maps [-1, 1] to [0, 1], as `FluxPipeline.__call__` does.
"""

import math

import torch

from common.models.base import PipelineAdapter, PromptEmbeds, prompt_texts


class FluxAdapter(PipelineAdapter):
    name = "flux"
    # the published FLUX recipe (flow_grpo `train_flux*.py`): attention and feed-forward of the
    # double-stream blocks; the single-stream blocks' q/k/v and MLP input (`proj_mlp`). peft
    # matches these as name suffixes, so "attn.to_q" hits both block kinds; the single blocks have
    # no `to_out` (their `proj_out` is left out, as published: a bare "proj_out" would also hit
    # the model's final projection)
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                           "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                           "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
    lora_rank, lora_alpha = 64, 128
    default_resolution = 512
    max_sequence_length = 128  # T5 tokens, as the published FLUX recipes train
    guidance_embedding = 3.5   # the distilled guidance the transformer is conditioned on (not CFG)
    default_pretrained = "black-forest-labs/FLUX.1-dev"  # gated on the hub
    pipeline_class = "FluxPipeline"
    eval_batch_size = 16  # the published FLUX recipes' test batch (pickscore_flux)

    def __init__(self, pipeline, device="cpu", dtype=torch.float32):
        super().__init__(pipeline, device, dtype)
        self._ids = {}

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        hidden, pooled, _ = self.pipeline.encode_prompt(prompt=prompt_texts(prompts), prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return PromptEmbeds(hidden=hidden.to(self.dtype), pooled=pooled.to(self.dtype))

    # ---- packed latents: (B, C, 2h, 2w) VAE latents <-> (B, h·w, 4C) tokens, square images

    def grid_side(self, tokens):
        """h = w of the packed grid of a square image with `tokens` tokens."""
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{tokens} image tokens are not a square grid (this adapter makes square images)")
        return side

    def position_ids(self, height, width, first=0.0):
        """(h·w, 3) rope positions (first, row, column) of an h x w token grid, cached."""
        key = (height, width, first)
        if key not in self._ids:
            ids = self.pipeline._prepare_latent_image_ids(1, height, width, self.device, self.dtype)
            ids[..., 0] = first
            self._ids[key] = ids
        return self._ids[key]

    def flux_call(self, tokens, sigma, embeds: PromptEmbeds, image_ids):
        """The transformer at sigma on a token sequence, as `FluxPipeline.__call__` calls it: the
        timestep its scheduler holds (1000·sigma, in the latents' dtype) divided by 1000, the
        guidance embedding, zero text ids."""
        scale = self.scheduler_config.get("num_train_timesteps", 1000)
        timestep = (sigma.float() * scale).to(tokens.dtype) / scale
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((tokens.shape[0],), self.guidance_embedding, device=tokens.device,
                                  dtype=torch.float32)
        text_ids = torch.zeros(embeds.hidden.shape[1], 3, device=tokens.device, dtype=self.dtype)
        return self.forward_module(hidden_states=tokens, timestep=timestep, guidance=guidance,
                                   pooled_projections=embeds.pooled, encoder_hidden_states=embeds.hidden,
                                   txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        side = self.grid_side(latents.shape[1])
        return self.flux_call(latents, sigma, embeds, self.position_ids(side, side))

    def decode(self, latents):
        side = self.grid_side(latents.shape[1])
        factor = self.pipeline.vae_scale_factor
        latents = self.pipeline._unpack_latents(latents.float(), side * 2 * factor, side * 2 * factor, factor)
        config = self.vae.config
        images = self.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, batch, resolution=None):
        return (batch, self.image_seq_len(resolution), self.transformer.config.in_channels)

    def image_seq_len(self, resolution=None):
        resolution = resolution or self.default_resolution
        return (resolution // (self.pipeline.vae_scale_factor * 2)) ** 2
