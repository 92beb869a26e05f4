"""Wan2.1 text-to-video adapter (Wan-AI/Wan2.1-T2V-1.3B-Diffusers; the 14B loads the same way).

Text: UMT5 last hidden states, `max_sequence_length` tokens (512, as flow_grpo's Wan script), each
prompt's states cut at its length and zero-padded back (no mask reaches the transformer, so the
padding length changes the output); diffusers' `encode_prompt` does exactly this. Negative: "".
Latents: 5-D video latents (B, 16, (F - 1)/4 + 1, H/8, W/8) from AutoencoderKLWan, normalised per
channel with the VAE's `latents_mean` / `latents_std`. Time input: the scheduler's raw timestep
t = 1000·sigma; the released UniPC scheduler stores it as int64 (truncated), and so does the
published rollout, so with that scheduler we feed floor(1000·sigma) (ALGORITHMS.md §1, §11.2).

Videos: `decode` returns (B, F, 3, H, W) in [0, 1], the layout of WanPipeline's
`output_type="pt"` and of flow_grpo's `video_ocr`; `images[:, f]` is an ordinary image batch.
Rewards score videos frame-wise (common/rewards.py), `picture` draws frame strips.

Resolution: `resolution` is an int (square) or (height, width); None = the published 240 x 416,
33 frames (`num_frames`; set the attribute to change it).
"""

import torch

from common.models.base import PipelineAdapter, PromptEmbeds, prompt_texts


def _size(resolution, default):
    """(height, width) from None (the default), an int (square) or a pair."""
    resolution = default if resolution is None else resolution
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = resolution
    return int(height), int(width)


class WanAdapter(PipelineAdapter):
    name = "wan"
    # published (flow_grpo train_wan2_1.py): r32/a64 on the SD3 list of names; in the T2V
    # WanTransformer3DModel only attn1/attn2 `to_q/to_k/to_v/to_out.0` exist (the `add_*`
    # projections belong to the image-to-video model's image cross-attention)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_rank, lora_alpha = 32, 64
    default_resolution = (240, 416)  # (height, width), flow_grpo general_ocr_wan2_1
    num_frames = 33
    max_sequence_length = 512
    default_pretrained = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    eval_batch_size = 2  # flow_grpo's Wan test batch; a batch of 33-frame videos is memory-bound
    pipeline_class = "WanPipeline"

    def __init__(self, pipeline, device="cpu", dtype=torch.float32):
        super().__init__(pipeline, device, dtype)
        # UniPCMultistepScheduler (the released checkpoints) truncates its timesteps to int64
        self.integer_timesteps = bool(self.scheduler_config.get("use_flow_sigmas", False))

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        hidden, _ = self.pipeline.encode_prompt(prompt=prompt_texts(prompts), do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length, device=self.device)
        return PromptEmbeds(hidden=hidden.to(self.dtype))

    def timestep(self, sigma):
        """The transformer's time input at sigma (B,): the scheduler's raw timestep."""
        if not self.integer_timesteps:
            return sigma * 1000
        # UniPC's grid starts at 1 - 1e-6 (t = 999) and stores t = int64(1000·sigma): truncate in
        # float64 so that fp32 sigmas land on the scheduler's integers
        return torch.floor(sigma.double().clamp(max=1 - 1e-6) * 1000).to(sigma.dtype)

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        return self.forward_module(hidden_states=latents, timestep=self.timestep(sigma),
                                   encoder_hidden_states=embeds.hidden, return_dict=False)[0]

    def decode(self, latents):
        """Video latents -> (B, F, 3, H, W) in [0, 1] (WanPipeline's `output_type="pt"` layout)."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device).view(shape)
        latents = latents.float() * std + mean
        video = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def latent_shape(self, batch, resolution=None):
        height, width = _size(resolution, self.default_resolution)
        spatial, temporal = self.pipeline.vae_scale_factor_spatial, self.pipeline.vae_scale_factor_temporal
        if height % 16 or width % 16 or (self.num_frames - 1) % temporal:
            raise ValueError(f"Wan needs height and width divisible by 16 and num_frames = 4k + 1; got {height} x "
                             f"{width}, {self.num_frames} frames")
        frames = (self.num_frames - 1) // temporal + 1
        return (batch, self.transformer.config.in_channels, frames, height // spatial, width // spatial)

    def make_sigmas(self, num_steps, resolution=None):
        """The released UniPC scheduler's flow sigmas (shift(linspace(1, 1/1000, N + 1)[:-1]), then 0),
        on which we take Euler/SDE steps as flow_grpo's Wan rollout does; any other scheduler
        config (e.g. FlowMatchEulerDiscrete) goes through `common.sde.make_sigmas`."""
        if not self.scheduler_config.get("use_flow_sigmas", False):
            return super().make_sigmas(num_steps, resolution)
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_steps)
        sigmas = scheduler.sigmas.float().clone()
        # UniPC lowers sigma_0 to 1 - 1e-6 only to keep its own log(alpha) finite; our samplers
        # want sigma_0 = 1 (Flow-SDE's g = a·sqrt(sigma/(1 - sigma)) would be ~1000·a at 1 - 1e-6).
        # The time input keeps t = 999 there (`timestep`)
        sigmas[0] = 1.0
        return sigmas

    def picture(self, path, samples, prompts, scores, max_items=16, frames=4):
        """A frame strip per video: `frames` evenly spaced frames side by side, captioned."""
        from common.outputs import save_frame_strips

        step = max(1, len(samples) // max_items)
        picked = list(range(0, len(samples), step))[:max_items]
        texts = [p if isinstance(p, str) else p.text for p in prompts]
        save_frame_strips(path, samples[picked], [f"{texts[i]} [{scores[i]:.2f}]" for i in picked], frames=frames)
