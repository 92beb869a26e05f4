"""Tiny FLUX.1 and FLUX.1-Kontext pipelines built from config in-process (no hub), saved with
`save_pretrained` so the adapters load them through the same `from_pretrained` path as a real
checkpoint. Same tokenizers (and vocabulary) as the tiny SD3 pipeline."""

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline
from diffusers import FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from tests.tiny_pipelines import clip_tokenizer, t5_tokenizer


def build_tiny_flux(pipeline_class=FluxPipeline, seed=0):
    """A FLUX pipeline of `pipeline_class` with every component tiny (about 0.2M parameters): two
    double-stream and two single-stream blocks, a guidance embedding, FLUX.1-dev's scheduler
    (dynamic shift) and a 4-level VAE (8x down-sampling, 16 latent channels, as FLUX's)."""
    torch.manual_seed(seed)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                                intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                                vocab_size=len(tok), max_position_embeddings=77))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=64, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=4, relative_attention_num_buckets=8,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    # head dim 8 = the rope axes (2, 2, 4); in_channels 64 = 16 latent channels x the 2x2 packing
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = pipeline_class(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                          text_encoder_2=text_encoder_2, tokenizer_2=tok2, transformer=transformer)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()  # built from config they start in train mode (T5 dropout would be active)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_flux(directory, seed=0):
    build_tiny_flux(FluxPipeline, seed).save_pretrained(directory)
    return directory


def save_tiny_flux_kontext(directory, seed=1):
    build_tiny_flux(FluxKontextPipeline, seed).save_pretrained(directory)
    return directory


SAVERS = {"flux": save_tiny_flux, "flux_kontext": save_tiny_flux_kontext}
