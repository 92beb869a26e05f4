"""The toy world's networks: a word-level tokenizer over the closed vocabulary, a tiny text
encoder, and a diffusers `SD3Transformer2DModel`, in one of two spaces:

- pixel space (the committed default base, `common/toy/weights/`): the "latent" is the image
  itself mapped to [-1, 1] (3 x 32 x 32, patch 4: 64 tokens);
- latent space (`common/toy/weights_latent/`): the 4 x 8 x 8 latent of the toy VAE
  (`common.toy.vae`) with SD3's patch size 2 (16 image tokens), decoded by the VAE before the
  reward, the shape of a real latent pipeline. It samples 256 values instead of 3,072 (the
  policy gradient's noise grows with the sampled dimension: docs/gradient_snr.md).

The transformer is the same class as SD3's, so LoRA targets, the adapter code path and the
export format are the real ones.
"""

import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from common.toy.vae import LATENT_CHANNELS, LATENT_SIZE
from common.toy.world import IMAGE_SIZE, VOCAB

MAX_TOKENS = 16
TEXT_WIDTH = 64
TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE, patch_size=4, in_channels=3, out_channels=3, num_layers=4,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=TEXT_WIDTH,
    caption_projection_dim=128, pooled_projection_dim=TEXT_WIDTH, pos_embed_max_size=IMAGE_SIZE // 4,
)
LATENT_TRANSFORMER_CONFIG = dict(
    TRANSFORMER_CONFIG, sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS, pos_embed_max_size=LATENT_SIZE // 2,
)
# the schedule the toy model samples with (a FlowMatchEulerDiscreteScheduler config)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


class WordTokenizer:
    """Maps a prompt of known words to ids: `<s>` first, then the words, `<pad>` to MAX_TOKENS."""

    def __init__(self, vocab=VOCAB, max_length=MAX_TOKENS):
        self.vocab = {word: i for i, word in enumerate(vocab)}
        self.max_length = max_length

    def __call__(self, prompts):
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.vocab]
            if unknown:
                raise ValueError(f"words {unknown} are not in the toy vocabulary; prompt: {prompt!r}")
            if len(words) + 1 > self.max_length:
                raise ValueError(f"prompt longer than {self.max_length - 1} words: {prompt!r}")
            ids = [self.vocab["<s>"]] + [self.vocab[w] for w in words]
            rows.append(ids + [self.vocab["<pad>"]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class ToyTextEncoder(nn.Module):
    """Embedding + a 2-layer transformer. Returns per-token states (B, L, width), used as the
    transformer's `encoder_hidden_states`, and the `<s>` state as the pooled vector (B, width)."""

    def __init__(self, vocab_size=len(VOCAB), width=TEXT_WIDTH, num_layers=2, num_heads=4, max_length=MAX_TOKENS):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, width=width, num_layers=num_layers, num_heads=num_heads,
                           max_length=max_length)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        layer = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    def forward(self, ids):
        hidden = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        padding = ids == 0
        hidden = self.final_norm(self.encoder(hidden, src_key_padding_mask=padding))
        hidden = hidden.masked_fill(padding[..., None], 0.0)
        return hidden, hidden[:, 0]

    def save_pretrained(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory):
        directory = Path(directory)
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def build_transformer(seed=0, latent=False):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**(LATENT_TRANSFORMER_CONFIG if latent else TRANSFORMER_CONFIG))


def images_to_latents(images):
    """[0, 1] images -> the toy model's pixel-space latents in [-1, 1]."""
    return images * 2 - 1


def latents_to_images(latents):
    return ((latents.float() + 1) / 2).clamp(0, 1)
