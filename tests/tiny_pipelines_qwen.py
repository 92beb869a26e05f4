"""Tiny Qwen-Image and Qwen-Image-Edit pipelines built from config in-process (no hub), saved with
`save_pretrained` so tests load them through the same `from_pretrained` path a real checkpoint takes.

The text encoder is a real Qwen2.5-VL (2 layers, width 32, a 1-block vision tower); the tokenizer a
byte-level BPE (Qwen2Tokenizer) with the chat-template special tokens and whole-word merges for the
pipeline's prompt templates, so the tokens the pipelines drop are exactly the templates' system
prefix as with the real tokenizer (34 for Qwen-Image; 64 for the edit template, up to <|vision_start|>).
Each pipeline has about 0.3M parameters.
"""

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from tokenizers import AddedToken
# ProcessorMixin: diffusers finds a custom component's load method by this name in the component's module
from transformers import ProcessorMixin, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer  # noqa: F401
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from common.models.qwen_image_edit import image_only_processor_class
from tests.tiny_pipelines import WORDS, _bytes_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
Z_DIM = 4  # VAE latent channels; packed 2x2 tokens have 4 * Z_DIM channels
SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                 max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential", shift=1.0)  # Qwen-Image's


def qwen_tokenizer(texts=()):
    """Byte-level BPE with a merge chain per pre-token of `texts` and WORDS (each becomes one token)."""
    chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    plain = Qwen2Tokenizer(vocab=dict(vocab), merges=[])
    merges = []
    pieces_of = plain.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    text = " ".join(WORDS) + " " + " ".join(texts)
    for special in SPECIAL_TOKENS:
        text = text.replace(special, "\n")  # specials split pre-tokens as a newline does
    for piece, _ in pieces_of(text):
        parts = list(piece)
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS[1:]])
    return tokenizer


def tiny_text_encoder(tokenizer, seed):
    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_transformer_and_vae(seed):
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(8, 4, 4))
    # non-trivial latents_mean / std so that the (de)normalisation is exercised
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    return transformer.eval(), vae.eval()


def build_tiny_qwen_image(seed=0):
    from diffusers import QwenImagePipeline

    transformer, vae = tiny_transformer_and_vae(seed)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    tokenizer = qwen_tokenizer([pipe.prompt_template_encode])  # the template is set in the pipeline's __init__
    pipe.register_modules(tokenizer=tokenizer, text_encoder=tiny_text_encoder(tokenizer, seed + 1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_qwen_image(directory, seed=0):
    build_tiny_qwen_image(seed).save_pretrained(directory)
    return directory


class ImageOnlyQwen2VLProcessor(image_only_processor_class()):
    """The adapter's Qwen2VLProcessor without a video processor (transformers wants torchvision for
    that), at module level so that the saved model_index.json names a class diffusers can load."""


def build_tiny_qwen_image_edit(seed=0):
    from diffusers import QwenImageEditPipeline

    transformer, vae = tiny_transformer_and_vae(seed)
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                                 tokenizer=None, processor=None, transformer=transformer)
    tokenizer = qwen_tokenizer([pipe.prompt_template_encode])
    # patch 4 x merge 2: a 32 px source image is 8 x 8 patches, 16 image tokens after the 2x2 merge
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                               max_pixels=64 * 64)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=tiny_text_encoder(tokenizer, seed + 1),
                          processor=ImageOnlyQwen2VLProcessor(image_processor, tokenizer))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_qwen_image_edit(directory, seed=0):
    build_tiny_qwen_image_edit(seed).save_pretrained(directory)
    return directory


SAVERS = {"qwen_image": save_tiny_qwen_image, "qwen_image_edit": save_tiny_qwen_image_edit}
