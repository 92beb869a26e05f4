"""A tiny Wan2.1 text-to-video pipeline built from config in-process (no hub), saved with
`save_pretrained` so the adapter loads it through the same `from_pretrained` path as a real
checkpoint. The T5 sentencepiece tokenizer (and vocabulary) of the tiny SD3 pipeline stands in
for UMT5's.

Scheduler: the real checkpoints ship a UniPCMultistepScheduler (flow sigmas, flow_shift 3), a
multistep solver our Euler rollout does not reproduce. The tiny pipeline carries a
FlowMatchEulerDiscreteScheduler with the same shift instead, so that WanPipeline.__call__ itself
takes plain Euler steps on the grid that `WanAdapter.make_sigmas` returns for this config: that
is what the parity test compares against.
"""

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from tests.tiny_pipelines import t5_tokenizer


def build_tiny_wan(seed=0):
    """A WanPipeline with every component tiny (about 0.1M parameters): a 1-layer UMT5, two
    transformer blocks (head dim 12 = Wan's rope axes split 4/4/4), and a Wan VAE with Wan's
    8x spatial and 4x temporal down-sampling and 16 latent channels."""
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    for module in (transformer, vae, text_encoder):
        module.eval()  # built from config they start in train mode (T5 dropout would be active)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_wan(directory, seed=0):
    build_tiny_wan(seed).save_pretrained(directory)
    return directory


SAVERS = {"wan": save_tiny_wan}
