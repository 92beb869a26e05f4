"""Pictures of the gmm world: points scattered per prompt, coloured by reward, over the base."""

import math
from pathlib import Path

import numpy as np

from common.gmm.world import HIT_RADIUS, mode_centres, parse_prompt


def scatter_by_prompt(path, points, prompts, scores, base=None, max_panels=8):
    """One panel per distinct prompt (up to `max_panels`): the ring plane, target modes circled,
    points coloured by score; `base` = (points, prompts) of the base drawn in grey behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys(prompts))[:max_panels]
    columns = min(4, len(texts))
    rows = math.ceil(len(texts) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    centres = mode_centres()
    prompts, scores = np.asarray(prompts), np.asarray(scores, dtype=np.float64)
    for ax, text in zip(axes.flat, texts):
        if base is not None:
            base_points, base_prompts = base[0], np.asarray(base[1])
            mine = base_points[base_prompts == text]
            ax.scatter(mine[:, 0], mine[:, 1], s=3, color="0.75", label="base")
        for k in parse_prompt(text):
            ax.add_patch(plt.Circle(centres[k], HIT_RADIUS, fill=False, color="tab:green", lw=1))
        mask = prompts == text
        ax.scatter(points[mask, 0], points[mask, 1], s=3, c=scores[mask], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{text} [{np.nanmean(scores[mask]):.2f}]", fontsize=9)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(texts):]:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
