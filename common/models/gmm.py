"""The gmm world's adapter (`--model gmm`): points in R^D instead of images.

Same interface as the image adapters, so the five algorithm files run on it unchanged: the
"latents" are the points (B, D), `decode` is the identity (rewards score points), prompts are
encoded by the world's grammar (common/gmm/world.py), and the adapter pictures its samples as a
scatter plot where image models write grids. `diagnostics` adds this world's exact figures to
every evaluation (the KL to the base) and `report` plots a run against the optimal frontier
(common/gmm/frontier.py).

`--pretrained`: a directory written by `python -m common.gmm.pretrain`, or the name of a
committed base (`d2`, the default; `d16`, `d64`: the same world with nuisance dims).
"""

import copy
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from common.gmm.world import condition_vectors, parse_prompt
from common.models.base import ModelAdapter, PromptEmbeds, prompt_texts

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "gmm" / "weights"


def resolve_weights(pretrained):
    """A committed base's name (default: the adapter's) or a directory -> the directory."""
    pretrained = pretrained or GMMAdapter.default_pretrained
    if (WEIGHTS_DIR / pretrained / "config.json").is_file():
        return WEIGHTS_DIR / pretrained
    return Path(pretrained)


class GMMAdapter(ModelAdapter):
    name = "gmm"
    lora_rank, lora_alpha = 8, 16
    default_resolution = None
    default_pretrained = "d2"  # committed in common/gmm/weights (d16, d64: with nuisance dims)
    eval_batch_size = 4096  # points are cheap: one forward per step for a whole evaluation
    KL_SAMPLES = 1024  # points per exact marginal-KL estimate (its Monte Carlo SE at KL ~1: ~0.03)

    def __init__(self, transformer, device="cpu", dtype=torch.float32):
        from common.gmm.model import SCHEDULER_CONFIG  # lazily, as the network: `validate` imports this module

        self.transformer = transformer
        self.scheduler_config = dict(SCHEDULER_CONFIG)
        self.device, self.dtype = torch.device(device), dtype
        self.dim = transformer.config.dim
        # LoRA on every Linear layer (the network is small: all of it is the "attention")
        self.lora_target_modules = tuple(name for name, module in transformer.named_modules()
                                         if isinstance(module, torch.nn.Linear))
        self._negative = None
        self._base_picture = None
        # the base as loaded (kilobytes): the exact KL diagnostics compare against it whether the
        # run trains a LoRA or every weight
        self.base_copy = copy.deepcopy(transformer).requires_grad_(False).eval()

    @contextmanager
    def frozen_base_forward(self):
        """Forwards inside this block use the base as loaded."""
        saved, self._forward_module = self._forward_module, self.base_copy
        try:
            yield
        finally:
            self._forward_module = saved

    @classmethod
    def check_prompts(cls, prompts, source):
        """Every prompt must parse in the world's grammar (before any model loads)."""
        for prompt in prompts:
            try:
                parse_prompt(prompt.text)
            except ValueError as error:
                raise ValueError(f"--prompts {source}: {error}") from None

    @classmethod
    def check_pretrained(cls, pretrained):
        directory = resolve_weights(pretrained)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"--pretrained {pretrained}: no gmm base there (a committed name d2/d16/d64 "
                                    "or a directory from `python -m common.gmm.pretrain`)")

    @classmethod
    def load(cls, pretrained=None, device="cpu", dtype=torch.float32):
        from common.gmm.model import GMMVelocityNet

        cls.check_pretrained(pretrained)
        transformer = GMMVelocityNet.from_pretrained(resolve_weights(pretrained), dtype=dtype).to(device)
        return cls(transformer.eval(), device, dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts) -> PromptEmbeds:
        targets = [parse_prompt(p) if p else None for p in prompt_texts(prompts)]
        return PromptEmbeds(cond=torch.from_numpy(condition_vectors(targets)).to(self.device, self.dtype))

    def transformer_forward(self, latents, sigma, embeds: PromptEmbeds):
        return self.forward_module(latents, sigma, embeds.cond)

    def decode(self, latents):
        return latents.float()

    def latent_shape(self, batch, resolution=None):
        return (batch, self.dim)

    # ---- how this world's samples are pictured, measured and reported

    def picture(self, path, samples, prompts, scores):
        from common.gmm.plots import scatter_by_prompt

        samples = samples.detach().float().cpu().numpy()
        if self._base_picture is None:  # the first picture of a run is the base: drawn behind later ones
            self._base_picture = (samples, [p.text for p in prompts])
        scatter_by_prompt(path, samples, [p.text for p in prompts], np.asarray(scores), base=self._base_picture)

    def diagnostics(self, prompts, samples, *, seed, num_steps, guidance, sde=None):
        from common.gmm.frontier import marginal_kl, path_kl

        metrics = {}
        negative = self.negative_embeds() if guidance > 1 else None
        embeds = self.encode_prompts(prompts)
        if self.dim == 2:
            # on an evenly spaced subset of at most KL_SAMPLES (the eval list is grouped by category)
            # (common.evaluate draws image i from the noise of seed + i)
            from common.rollout import initial_latents

            keep = torch.linspace(0, len(samples) - 1, min(len(samples), self.KL_SAMPLES)).round().long()
            noise = initial_latents(self.latent_shape(len(keep)), [seed + int(i) for i in keep])
            metrics["eval/kl_marginal"] = marginal_kl(self, embeds[keep], samples[keep].to(self.device), num_steps,
                                                      guidance, negative, noise=noise)
        if sde is not None:
            metrics["eval/kl_path"] = path_kl(self, embeds, seed=seed, negative=negative, **sde)
        return metrics

    def report(self, output_dir, history, reward_fn, prompts, *, seed, num_steps, guidance, images_per_category):
        from common.evaluate import balanced_eval_prompts
        from common.gmm.frontier import plot_against_frontier

        plot_against_frontier(self, Path(output_dir) / "frontier.png", history, reward_fn,
                              balanced_eval_prompts(prompts, images_per_category),
                              seed=seed, num_steps=num_steps, guidance=guidance)
