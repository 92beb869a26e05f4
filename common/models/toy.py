"""The toy world's adapter (`--model toy`): the embedded base model, loaded offline.

Same interface and the same `SD3Transformer2DModel` class as the sd3 adapter, but the
"latent" is the 3x32x32 image in [-1, 1] and the text encoder is the tiny word-level one of
`common.toy.model`. Without `--pretrained` it loads the committed weights in
`common/toy/weights/` (see the card there).
"""

from pathlib import Path

import torch

from common.models.base import ModelAdapter, PromptEmbeds, prompt_texts
from common.models.sd3 import sd3_transformer_call
from common.toy.world import IMAGE_SIZE

# diffusers and the toy networks are imported inside the methods: `validate` imports this module to
# check prompts, and importing diffusers takes seconds

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "toy" / "weights"


class ToyAdapter(ModelAdapter):
    name = "toy"
    lora_rank, lora_alpha = 16, 32
    default_resolution = IMAGE_SIZE
    default_pretrained = str(WEIGHTS_DIR)  # committed (the card in that directory)

    def __init__(self, transformer, text_encoder, device="cpu", dtype=torch.float32):
        from common.toy.model import SCHEDULER_CONFIG, WordTokenizer

        self.transformer, self.text_encoder = transformer, text_encoder
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
        if not (directory / "transformer").is_dir():
            raise FileNotFoundError(f"--pretrained {directory}: no toy model there (expected transformer/ and "
                                    "text_encoder/; create one with `python -m common.toy.pretrain`)")

    @classmethod
    def load(cls, pretrained=None, device="cpu", dtype=torch.float32):
        cls.check_pretrained(pretrained)
        directory = Path(pretrained or cls.default_pretrained)
        from diffusers import SD3Transformer2DModel

        from common.toy.model import ToyTextEncoder

        transformer = SD3Transformer2DModel.from_pretrained(directory / "transformer", dtype=dtype).to(device).eval()
        text_encoder = ToyTextEncoder.from_pretrained(directory / "text_encoder").to(device).requires_grad_(False)
        return cls(transformer, text_encoder, device, dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        hidden, pooled = self.text_encoder(self.tokenizer(prompt_texts(prompts)).to(self.device))
        return PromptEmbeds(hidden=hidden.to(self.dtype), pooled=pooled.to(self.dtype))

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        return sd3_transformer_call(self.forward_module, latents, sigma, embeds)

    def decode(self, latents):
        from common.toy.model import latents_to_images

        return latents_to_images(latents)

    def latent_shape(self, batch, resolution=None):
        return (batch, 3, IMAGE_SIZE, IMAGE_SIZE)
