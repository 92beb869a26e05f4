"""Run outputs: `metrics.jsonl` (one record per epoch), accelerate trackers (TensorBoard by
default, wandb on request), captioned sample grids and the reward curve.

Metric names are shared by every algorithm file (README "Logged metrics"): `reward/mean`,
`reward/std`, `train/loss`, `train/ratio_mean`, `train/ratio_dev_max`, `train/approx_kl`,
`train/clipfrac`, `train/kl`, `train/zero_std_frac`, `eval/reward_mean`,
`eval/accuracy[/<tag>]`, `perf/epoch_s`, `perf/images_per_s`.
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


class MetricsLog:
    """Appends one JSON record per epoch; on resume, drops records from epochs not yet
    re-done so the file matches an uninterrupted run."""

    def __init__(self, output_dir, accelerator=None, resume_epoch=None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = accelerator is None or accelerator.is_main_process
        if self.enabled and resume_epoch is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] < resume_epoch]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.enabled and resume_epoch is None and self.path.exists():
            self.path.unlink()

    def log(self, epoch, metrics):
        record = {"epoch": epoch, **{k: _plain(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=epoch)
        return record


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_grid(path, images, captions, columns=8, scale=4):
    """A captioned PNG grid of [0, 1] images (B, 3, H, W)."""
    array = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    height, width = array.shape[1] * scale, array.shape[2] * scale
    caption_h = 30
    rows = math.ceil(len(array) / columns)
    cell_w = max(width, 150)
    grid = Image.new("RGB", (columns * cell_w, rows * (height + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(array, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (height + caption_h)
        grid.paste(Image.fromarray(image).resize((width, height), Image.NEAREST), (x, y))
        words, lines = caption.split(), [""]
        for word in words:  # wrap to the cell width
            if len(lines[-1]) + len(word) + 1 > cell_w // 6:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.text((x + 2, y + height + 1), "\n".join(lines[:3]), fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def plot_curves(path, series, xlabel="epoch", ylabel="reward", title=None):
    """series: {label: (xs, ys)} -> a PNG line plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ratio_distribution(path, per_step, title=None):
    """per_step: {denoising step: {"raw": values, "norm": values}} -> box plots of the raw and the
    normalised importance ratio side by side at each step (GRPO-Guard's diagnostic figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [j for j in sorted(per_step) if len(per_step[j]["raw"])]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(steps) + 2), 4))
    for offset, kind, color in ((-0.18, "raw", "tab:red"), (0.18, "norm", "tab:blue")):
        data = [np.asarray(per_step[j][kind], dtype=np.float64) for j in steps]
        box = ax.boxplot(data, positions=[i + offset for i in range(len(steps))], widths=0.3, showfliers=False,
                         patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.5)
        ax.plot([], [], color=color, lw=6, alpha=0.5, label={"raw": "raw ratio", "norm": "normalised ratio"}[kind])
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(steps)), [str(j) for j in steps])
    ax.set_xlabel("denoising step")
    ax.set_ylabel("importance ratio (off-policy micro-steps)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
