"""Qwen-Image adapter (diffusers `QwenImagePipeline`).

Text: the last hidden states of Qwen2.5-VL over the pipeline's chat template, the template's system
prefix dropped and padding trimmed, with their attention mask (the pipeline's `encode_prompt`).
Every encoding is zero-padded (mask 0) to `max_sequence_length` tokens so encodings of different
batches concatenate, and each forward trims the batch back to its longest prompt: the transformer
masks padded text keys and the text RoPE positions do not depend on the padded length, so results
equal the pipeline's unpadded calls. Latents are the packed 2x2 token sequence (B, L, 4·z_dim); the
VAE is 5-D (a frames axis of 1) with per-channel latents_mean / latents_std. The transformer takes
sigma itself (the pipeline passes timestep / 1000). True CFG with the negative prompt " " and the
published norm rescale (`combine_guidance`); dynamically shifted schedule.
"""

import math

import torch

from common.models.base import PipelineAdapter, PromptEmbeds, prompt_texts

# LoRA on every attention projection (image and text streams) and both streams' MLPs
QWEN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def pad_tokens(hidden, mask, length):
    """(B, L, D) states and (B, L) mask zero-padded (mask False) to `length` tokens."""
    if hidden.shape[1] > length:
        raise ValueError(f"a prompt encodes to {hidden.shape[1]} tokens, more than max_sequence_length={length}")
    extra = length - hidden.shape[1]
    return (torch.nn.functional.pad(hidden, (0, 0, 0, extra)),
            torch.nn.functional.pad(mask.bool(), (0, extra), value=False))


def trimmed(hidden, mask):
    """Cut the padding columns every row shares; None for an all-valid mask (as the pipeline passes)."""
    length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    hidden, mask = hidden[:, :length], mask[:, :length]
    return hidden, (None if bool(mask.all()) else mask)


class QwenImageAdapter(PipelineAdapter):
    name = "qwen_image"
    lora_target_modules = QWEN_LORA_TARGETS
    lora_rank, lora_alpha = 64, 128
    default_resolution = 512
    default_pretrained = "Qwen/Qwen-Image"
    negative_prompt = " "  # the published recipes' negative: a single space
    max_sequence_length = 512  # text tokens kept (the pipeline's __call__ default) and the padded length
    pipeline_class = "QwenImagePipeline"

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        hidden, mask = self.pipeline.encode_prompt(prompt_texts(prompts), device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        hidden, mask = pad_tokens(hidden.to(self.dtype), mask, self.max_sequence_length)
        return PromptEmbeds(hidden=hidden, mask=mask)

    def negative_embeds(self) -> PromptEmbeds:
        if self._negative is None:
            self._negative = self.encode_prompts([self.negative_prompt])
        return self._negative

    def _forward(self, tokens, sigma, hidden, mask, img_shapes):
        hidden, mask = trimmed(hidden, mask)
        return self.forward_module(hidden_states=tokens, timestep=sigma.to(tokens.dtype), encoder_hidden_states=hidden,
                                   encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0]

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        side = self._token_side(latents.shape[1])
        return self._forward(latents, sigma, embeds.hidden, embeds.mask, [[(1, side, side)]] * latents.shape[0])

    def combine_guidance(self, uncond, cond, guidance):
        """Qwen-Image's true CFG: comb = v_n + w·(v_p - v_n), rescaled per token to the norm of v_p."""
        combined = uncond + guidance * (cond - uncond)
        return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    @staticmethod
    def _token_side(num_tokens):
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"expected a square packed latent, got {num_tokens} tokens")
        return side

    def unpack(self, latents):
        """Packed (B, h·w, 4C) -> VAE latents (B, C, 1, 2h, 2w) (the pipeline's `_unpack_latents`)."""
        batch, num_tokens, channels = latents.shape
        side = self._token_side(num_tokens)
        latents = latents.view(batch, side, side, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(batch, channels // 4, 1, 2 * side, 2 * side)

    def decode(self, latents):
        config = self.vae.config
        latents = self.unpack(latents.float()).to(self.vae.dtype)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        images = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, batch, resolution=None):
        return (batch, self.image_seq_len(resolution), self.transformer.config.in_channels)

    def image_seq_len(self, resolution=None):
        resolution = resolution or self.default_resolution
        return (resolution // self.pipeline.vae_scale_factor // 2) ** 2
