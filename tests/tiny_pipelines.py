"""Tiny real pipelines built from config in-process (no hub), saved with `save_pretrained` so
tests load them through the same `from_pretrained` path a user's checkpoint takes."""

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
from transformers import T5Tokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "and", "the", "on", "left", "right", "two", "three"]


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable-unicode table (what CLIP's BPE operates on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_tokenizer():
    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in WORDS:  # merge each word left to right into a whole-word token
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_sd3(seed=0):
    """A StableDiffusion3Pipeline with every component tiny (about 0.2M parameters)."""
    torch.manual_seed(seed)
    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    clip = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok), projection_dim=32,
                max_position_embeddings=77)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=64, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=4, relative_attention_num_buckets=8,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tok, text_encoder_3=text_encoder_3, tokenizer_3=tok3)
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()  # built from config they start in train mode (T5 dropout would be active)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd3(directory, seed=0):
    pipe = build_tiny_sd3(seed)
    pipe.save_pretrained(directory)
    return directory
