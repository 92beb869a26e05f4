"""FLUX.1-Kontext-dev adapter (instruction editing): FLUX.1 plus the source image.

The source image (`metadata["image"]` of a prompt: a path, a PIL image, or a (3, H, W) / (1, 3, H, W)
tensor in [0, 1]) is resized to the square `default_resolution` (the run's --resolution, as the
published recipe resizes references to the training resolution), VAE-encoded once in
`encode_prompts` ((latent - shift) · scaling, the distribution's mode, as `FluxKontextPipeline`
does) and kept in the `PromptEmbeds` as `reference` (B, 16, h, w), so it travels with the text
through index/cat/repeat. Every forward packs it and appends its tokens after the generated ones,
with their own position ids whose first channel is 1; the prediction is cut back to the generated
tokens. Guidance embedding 2.5 (the published Kontext recipe), no CFG.

Prompts without an image (plain strings, e.g. the empty negative) get an empty reference (no
tokens): the transformer then generates from text alone, as `FluxKontextPipeline(image=None)`
does. With CFG (guidance > 1, not the FLUX recipe) the negative takes the conditional sample's
reference, as the pipeline's true CFG runs both branches on the same reference tokens.
"""

from pathlib import Path

import torch

from common.models.base import PromptEmbeds, prompt_metadata
from common.models.flux import FluxAdapter


class FluxKontextAdapter(FluxAdapter):
    name = "flux_kontext"
    guidance_embedding = 2.5
    default_pretrained = "black-forest-labs/FLUX.1-Kontext-dev"  # gated on the hub
    pipeline_class = "FluxKontextPipeline"

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        text = super().encode_prompts(prompts)
        sources = [m.get("image") for m in prompt_metadata(prompts)]
        if all(s is None for s in sources):
            channels = self.vae.config.latent_channels
            reference = torch.zeros(len(sources), channels, 0, 0, device=self.device, dtype=self.dtype)
        elif any(s is None for s in sources):
            raise ValueError("flux_kontext: some prompts of this batch have a source image and some do not "
                             "(every editing prompt needs metadata 'image')")
        else:
            reference = self.encode_references(sources)
        return PromptEmbeds(**text.fields(), reference=reference)

    def encode_references(self, sources):
        """(B, 16, h, w) VAE latents of the source images; each distinct image is encoded once."""
        keys = [str(s) if isinstance(s, (str, Path)) else id(s) for s in sources]
        unique = list(dict.fromkeys(keys))
        size = self.default_resolution
        first = {key: sources[keys.index(key)] for key in unique}
        pixels = torch.cat([self.pipeline.image_processor.preprocess(self.load_image(first[key]), size, size)
                            for key in unique])
        config = self.vae.config
        encoded = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mode()
        latents = ((encoded - config.shift_factor) * config.scaling_factor).to(self.dtype)
        return latents[torch.tensor([unique.index(key) for key in keys], device=latents.device)]

    @staticmethod
    def load_image(source):
        """A PIL image (RGB) or a tensor in [0, 1] from a path, PIL image or tensor."""
        if torch.is_tensor(source):
            return source.float().cpu()
        if isinstance(source, (str, Path)):
            from PIL import Image

            if not Path(source).is_file():
                raise FileNotFoundError(f"flux_kontext: source image {source} not found (a relative path is read "
                                        "from the working directory; give absolute paths in the prompt file)")
            with Image.open(source) as image:
                return image.convert("RGB")
        return source.convert("RGB")

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        tokens = latents.shape[1]
        side = self.grid_side(tokens)
        reference = embeds.reference.to(latents.dtype)
        batch, channels, height, width = reference.shape
        packed = self.pipeline._pack_latents(reference, batch, channels, height, width)
        ids = torch.cat([self.position_ids(side, side), self.position_ids(height // 2, width // 2, first=1.0)])
        return self.flux_call(torch.cat([latents, packed], dim=1), sigma, embeds, ids)[:, :tokens]

    def pair_negative(self, embeds: PromptEmbeds, negative: PromptEmbeds) -> PromptEmbeds:
        """The unconditional half sees each sample's own reference image."""
        negative = super().pair_negative(embeds, negative)
        return PromptEmbeds(**{**negative.fields(), "reference": embeds.reference})
