"""Evaluation with the ODE sampler: fixed prompts, fixed seeds, per-category scores.

`evaluate` is what every algorithm calls in its loop (and what the toy base-model test and
card use): images are generated with noise level 0 (Euler ODE) and CFG, seeds are
`seed + image_index`, and for GenEval-style metadata the prompts are spread evenly so every
category gets `images_per_category` images (32 per category is too noisy to see ±0.05).
"""

from collections import defaultdict

import numpy as np
import torch

from common.rollout import initial_latents, rollout


def balanced_eval_prompts(prompts, images_per_category=64):
    """Per category (metadata `tag`, or one category for plain prompts), cycle through its
    prompts until it has `images_per_category` entries. Deterministic order."""
    by_tag = defaultdict(list)
    for prompt in prompts:
        by_tag[prompt.metadata.get("tag", "all")].append(prompt)
    return [items[i % len(items)] for items in by_tag.values() for i in range(images_per_category)]


@torch.no_grad()
def generate(adapter, prompts, *, num_steps, guidance, seed=0, batch_size=64, resolution=None, progress=None):
    """ODE images (N, 3, H, W) in [0, 1] for `prompts` (list of `Prompt`), seeds seed + index."""
    sigmas = adapter.make_sigmas(num_steps, resolution)
    negative = adapter.negative_embeds() if guidance > 1 else None
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        embeds = adapter.encode_prompts([p.text for p in chunk])
        latents = initial_latents(adapter.latent_shape(len(chunk), resolution),
                                  [seed + start + i for i in range(len(chunk))])
        trajectory = rollout(adapter, embeds, sigmas, latents, negative=negative, guidance=guidance, noise_level=0.0,
                             keep_means=False)
        images.append(trajectory.images.cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(images)


def summarize(prompts, rewards, strict_key=None):
    """Metric dict: `eval/reward_mean`, each component's mean, and with `strict_key` the strict
    accuracy per category (`eval/accuracy/<tag>`) and overall (`eval/accuracy`)."""
    metrics = {"eval/reward_mean": float(np.mean(rewards["avg"]))}
    for name, values in rewards.items():
        if name != "avg":
            metrics[f"eval/{name}_mean"] = float(np.mean(values))
    if strict_key is not None:
        tags = np.array([p.metadata.get("tag", "all") for p in prompts])
        correct = np.asarray(rewards[strict_key], dtype=np.float64)
        for tag in dict.fromkeys(tags):
            metrics[f"eval/accuracy/{tag}"] = float(correct[tags == tag].mean())
        metrics["eval/accuracy"] = float(correct.mean())
    return metrics


def evaluate(adapter, prompts, reward_fn, *, num_steps=20, guidance=4.0, seed=0, batch_size=64,
             images_per_category=64, resolution=None, progress=None):
    """(metrics, images, eval prompts) for the balanced eval set built from `prompts`."""
    eval_prompts = balanced_eval_prompts(prompts, images_per_category)
    images = generate(adapter, eval_prompts, num_steps=num_steps, guidance=guidance, seed=seed,
                      batch_size=batch_size, resolution=resolution, progress=progress)
    rewards = reward_fn(images, [p.text for p in eval_prompts], [p.metadata for p in eval_prompts])
    strict_key = next((k for k in rewards if k.endswith("_strict")), None)
    return summarize(eval_prompts, rewards, strict_key), images, eval_prompts
