"""The gmm world's rewards (registered in common/rewards.py). Each reads the target modes from
the prompt text itself, so plain prompt files work, and scores points (B, D), the adapter's
decoded samples. Every one has a known optimum: 1 on a target mode for the bounded ones.

- `gmm_target`: the soft bump (the training reward), with the hard hit as `gmm_target_strict`
  (the world's accuracy, `eval/accuracy`);
- `gmm_hit`: the hard indicator alone;
- `gmm_proxy`: the hackable proxy (projection past the target mode, off the data); log the
  gold score beside it with `--reward gmm_proxy,gmm_target=0`.
"""

import numpy as np

from common.gmm import world


def _points_and_targets(points, prompts):
    array = points.detach().float().cpu().numpy() if hasattr(points, "detach") else np.asarray(points)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"gmm rewards score points (B, D >= 2), got shape {tuple(array.shape)}: use --model gmm")
    return array, [world.parse_prompt(p) for p in prompts]


def target_reward():
    def fn(points, prompts, metadata):
        array, targets = _points_and_targets(points, prompts)
        return {"gmm_target": world.soft_target(array, targets),
                "gmm_target_strict": world.hard_target(array, targets)}
    return fn


def hit_reward():
    def fn(points, prompts, metadata):
        array, targets = _points_and_targets(points, prompts)
        return {"gmm_hit": world.hard_target(array, targets)}
    return fn


def proxy_reward():
    def fn(points, prompts, metadata):
        array, targets = _points_and_targets(points, prompts)
        return {"gmm_proxy": world.proxy_projection(array, targets)}
    return fn
