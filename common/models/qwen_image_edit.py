"""Qwen-Image-Edit adapter (diffusers `QwenImageEditPipeline`): Qwen-Image conditioned on a source image.

The source image comes from each prompt's metadata `image` (a path, as the data loader resolves it,
a PIL image or a (3, H, W) tensor in [0, 1]) and is resized to the square `default_resolution`
(the run's --resolution; published 512), as the published flow_grpo code does (diffusers' pipeline resizes to a 1024² area with the image's
aspect ratio; one square keeps every batch one shape, and 512² has 4x fewer source tokens).
It enters twice, as the pipeline does: the Qwen2.5-VL processor encodes the prompt together with
the image (so does the negative " ", each with its own source image: the uncond states are stored
in the same `PromptEmbeds`), and its normalised VAE latents, packed like the target, are appended
to the image tokens; the prediction is cut back to the target tokens.
"""

from functools import lru_cache

import torch

from common.models.base import PromptEmbeds, prompt_metadata, prompt_texts
from common.models.qwen_image import QwenImageAdapter, pad_tokens


@lru_cache(maxsize=None)
def image_only_processor_class():
    """Qwen2VLProcessor without its video processor (built on first use: transformers imports slowly).

    transformers 5 requires a `BaseVideoProcessor` in Qwen2VLProcessor's video slot, and that class
    needs torchvision, which cleanflow does not otherwise need (and no torchvision wheel imports beside
    the CPU build of torch 2.13). Images go through the inherited Qwen2-VL code unchanged: the image
    processor's patches and `image_grid_thw`, and the `<|image_pad|>` expansion in the text."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def source_pil(image):
    """A source image (path, PIL image, or (3, H, W) float tensor in [0, 1]) as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        array = (image.detach().float().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(array)
    with Image.open(image) as opened:
        return opened.convert("RGB")


class QwenImageEditAdapter(QwenImageAdapter):
    name = "qwen_image_edit"
    default_pretrained = "Qwen/Qwen-Image-Edit"
    pipeline_class = "QwenImageEditPipeline"
    max_sequence_length = 1024  # padded length: template + source-image tokens (324 at 512 px) + prompt

    @classmethod
    def pipeline_components(cls, pretrained):
        return {"processor": image_only_processor_class().from_pretrained(pretrained, subfolder="processor")}

    def source_images(self, prompts):
        images = []
        for metadata in prompt_metadata(prompts):
            if metadata.get("image") is None:
                raise ValueError("qwen_image_edit needs a source image per prompt: Prompt records with metadata "
                                 "'image' (in a jsonl prompt file: a path relative to that file)")
            images.append(self.pipeline.image_processor.resize(source_pil(metadata["image"]), self.default_resolution,
                                                               self.default_resolution))
        return images

    def _encode_texts(self, texts, images):
        hidden, mask = self.pipeline.encode_prompt(texts, image=images, device=self.device)
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return pad_tokens(hidden.to(self.dtype), mask, self.max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        texts, images = prompt_texts(prompts), self.source_images(prompts)
        hidden, mask = self._encode_texts(texts, images)
        neg_hidden, neg_mask = self._encode_texts([self.negative_prompt] * len(texts), images)
        pipe, side = self.pipeline, self.default_resolution
        pixels = pipe.image_processor.preprocess(images, side, side).unsqueeze(2)  # (B, 3, 1, H, W) in [-1, 1]
        latents = pipe._encode_vae_image(pixels.to(self.device, self.vae.dtype), generator=None)  # normalised
        packed = pipe._pack_latents(latents, *latents.shape[:2], *latents.shape[3:])
        return PromptEmbeds(hidden=hidden, mask=mask, neg_hidden=neg_hidden, neg_mask=neg_mask,
                            image_latents=packed.to(self.dtype))

    def negative_embeds(self) -> PromptEmbeds:
        """A marker: the negative " " is encoded with each prompt's own source image in `encode_prompts`."""
        if self._negative is None:
            self._negative = PromptEmbeds(negative_from_each_prompt=torch.ones(1))
        return self._negative

    def pair_negative(self, embeds: PromptEmbeds, negative: PromptEmbeds) -> PromptEmbeds:
        """The negative " " was encoded with each prompt's source image, into `embeds` itself."""
        if "negative_from_each_prompt" not in negative.fields():
            raise ValueError("qwen_image_edit encodes its negative prompt with each source image: pass "
                             "adapter.negative_embeds(), not another encoding")
        fields = embeds.fields()
        return PromptEmbeds(**{**fields, "hidden": fields["neg_hidden"], "mask": fields["neg_mask"]})

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        num_tokens, source = latents.shape[1], embeds.image_latents
        side, source_side = self._token_side(num_tokens), self._token_side(source.shape[1])
        shapes = [(1, side, side), (1, source_side, source_side)]  # RoPE: target grid, then source grid
        tokens = torch.cat([latents, source.to(latents.dtype)], dim=1)
        return self._forward(tokens, sigma, embeds.hidden, embeds.mask, [shapes] * len(latents))[:, :num_tokens]
