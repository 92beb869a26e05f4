"""The toy world's adapter (`--model toy`): the embedded base model, loaded offline.

Same interface and the same `SD3Transformer2DModel` class as the sd3 adapter; the text encoder
is the word-level one of `common.toy.model`. A model directory with a `vae/` samples that VAE's
4x8x8 latent (`common.toy.vae`, decoded in fp32 like SD3's VAE: `--pretrained
common/toy/weights_latent`); without one the "latent" is the 3x32x32 image in [-1, 1]. Without
`--pretrained` it loads the committed pixel-space base in `common/toy/weights/` (see the cards).
"""

from pathlib import Path

import torch

from common.models.base import ModelAdapter, PromptEmbeds, prompt_texts
from common.models.sd3 import sd3_transformer_call
from common.toy.world import IMAGE_SIZE

# diffusers and the toy networks are imported inside the methods: `validate` imports this module to
# check prompts, and importing diffusers takes seconds

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "toy" / "weights"
LATENT_WEIGHTS_DIR = WEIGHTS_DIR.with_name("weights_latent")


class ToyAdapter(ModelAdapter):
    name = "toy"
    lora_rank, lora_alpha = 16, 32
    default_resolution = IMAGE_SIZE
    default_pretrained = str(WEIGHTS_DIR)  # committed (the card in that directory)

    def __init__(self, transformer, text_encoder, vae, device="cpu", dtype=torch.float32):
        from common.toy.model import SCHEDULER_CONFIG, WordTokenizer

        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae
        self.tokenizer = WordTokenizer()
        self.scheduler_config = dict(SCHEDULER_CONFIG)
        self.device, self.dtype = torch.device(device), dtype
        self._negative = None

    @classmethod
    def check_prompts(cls, prompts, source):
        from common.toy.world import VOCAB

        for prompt in prompts:
            unknown = [w for w in prompt.text.lower().split() if w not in VOCAB]
            if unknown:
                raise ValueError(f"--prompts {source}: words {unknown} are not in the toy vocabulary "
                                 f"(prompt {prompt.text!r})")

    @classmethod
    def check_pretrained(cls, pretrained):
        directory = Path(pretrained or cls.default_pretrained)
        if not all((directory / part).is_dir() for part in ("transformer", "text_encoder")):
            raise FileNotFoundError(f"--pretrained {directory}: no toy model there (expected transformer/ and "
                                    "text_encoder/, and vae/ for a latent one; create one with "
                                    "`python -m common.toy.pretrain`)")

    @classmethod
    def load(cls, pretrained=None, device="cpu", dtype=torch.float32):
        cls.check_pretrained(pretrained)
        directory = Path(pretrained or cls.default_pretrained)
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        from common.toy.model import ToyTextEncoder

        transformer = SD3Transformer2DModel.from_pretrained(directory / "transformer", dtype=dtype).to(device).eval()
        text_encoder = ToyTextEncoder.from_pretrained(directory / "text_encoder").to(device).requires_grad_(False)
        vae = None
        if (directory / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(directory / "vae").to(device).eval().requires_grad_(False)
        return cls(transformer, text_encoder, vae, device, dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        hidden, pooled = self.text_encoder(self.tokenizer(prompt_texts(prompts)).to(self.device))
        return PromptEmbeds(hidden=hidden.to(self.dtype), pooled=pooled.to(self.dtype))

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        return sd3_transformer_call(self.forward_module, latents, sigma, embeds)

    def decode(self, latents):
        if self.vae is None:
            from common.toy.model import latents_to_images

            return latents_to_images(latents)
        from common.toy.vae import decode

        with torch.no_grad():
            return torch.cat([decode(self.vae, chunk.float()) for chunk in latents.split(256)])

    def latent_shape(self, batch, resolution=None):
        config = self.transformer.config
        return (batch, config.in_channels, config.sample_size, config.sample_size)
