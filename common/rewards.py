"""Rewards: one call signature, a registry, and the weighted combiner.

A reward is `fn(images, prompts, metadata) -> {name: per-image scores (np.ndarray)}` with
images float [0, 1] NCHW. `--reward shapes=1.0,jpeg_compressibility=0.5` builds a combiner
returning every component plus `avg` = sum_k w_k·score_k (not divided by the weight sum, as
published); a weight of 0 still computes and logs the component (a "gold" monitor).
"""

import io

import numpy as np
from PIL import Image


def to_uint8(images):
    """(B, 3, H, W) float [0, 1] tensor -> (B, H, W, 3) uint8 array."""
    array = images.detach().float().clamp(0, 1).cpu().numpy()
    return (array * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def shapes_reward():
    """The toy world's GenEval: partial credit as the score (the published training reward),
    strict correctness as `shapes_strict`."""
    from common.toy.detector import score_images

    def fn(images, prompts, metadata):
        if any(not meta or "include" not in meta for meta in metadata):
            raise ValueError("the shapes reward needs GenEval metadata (`include`) for every prompt")
        scores, strict = score_images(images.detach().float().cpu().numpy(), metadata)
        return {"shapes": scores, "shapes_strict": strict.astype(np.float32)}

    return fn


def _jpeg_kilobytes(images):
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes, dtype=np.float32)


def jpeg_compressibility_reward():
    """-(JPEG size at quality 95 in kB) / 500: higher for simpler images (DDPO's reward)."""
    return lambda images, prompts, metadata: {"jpeg_compressibility": -_jpeg_kilobytes(images) / 500}


def jpeg_incompressibility_reward():
    """+(JPEG size at quality 95 in kB) / 500: higher for busier images (DDPO's other reward)."""
    return lambda images, prompts, metadata: {"jpeg_incompressibility": _jpeg_kilobytes(images) / 500}


REWARDS = {"shapes": shapes_reward, "jpeg_compressibility": jpeg_compressibility_reward,
           "jpeg_incompressibility": jpeg_incompressibility_reward}


def parse_reward_spec(spec):
    """'shapes' or 'shapes=1.0,jpeg_compressibility=0.5' -> {name: weight}; unknown names fail."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward weight for {name!r} must be a number, got {weight!r}") from None
    return weights


class MultiReward:
    """Weighted sum of registered rewards; `__call__` returns every component and `avg`."""

    def __init__(self, weights):
        self.weights = dict(weights)
        self.fns = {name: REWARDS[name]() for name in self.weights}

    def __call__(self, images, prompts, metadata):
        out = {}
        for name, fn in self.fns.items():
            out.update(fn(images, prompts, metadata))
        out["avg"] = sum(w * out[name] for name, w in self.weights.items()).astype(np.float32)
        return out
