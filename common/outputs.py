"""Run outputs: the resolved recipe (printed at the start, `config.json`), `metrics.jsonl` (one
record per epoch), accelerate trackers (TensorBoard by default, wandb on request), captioned
sample grids and the reward curve.

Metric names are shared by every algorithm file (README "Logged metrics"): `reward/mean`,
`reward/std`, `train/loss`, `train/ratio_mean`, `train/ratio_dev_max`, `train/approx_kl`,
`train/clipfrac`, `train/kl`, `train/zero_std_frac`, `eval/reward_mean`,
`eval/accuracy[/<tag>]`, `perf/epoch_s`, `perf/images_per_s`.
"""

import dataclasses
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def resolved_recipe(args, **extra):
    """The numbers that define a run, from its validated Args (the fields that Args has): model,
    checkpoint, preset, sizes, sampler, the batch and group arithmetic per process and in total,
    what one optimizer step sees, the trained steps and the optimiser. `extra`: entries the file
    adds (what it trains when that is not `train_steps`, its algorithm switches)."""
    from common.models import get_adapter_class

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    adapter = get_adapter_class(args.model)
    processes, batch, group = get("num_processes", 1), args.batch_size, args.group_size
    batches, updates = get("batches_per_epoch", 1), get("updates_per_epoch", 1)
    script = Path(sys.modules[type(args).__module__].__file__).name  # the algorithm file, run or imported
    recipe = {"script": script, "model": args.model,
              "checkpoint": args.pretrained or adapter.default_pretrained, "preset": get("preset"),
              "resolution": args.resolution or adapter.default_resolution,
              "dtype": {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[args.mixed_precision],
              "lora": (f"rank {args.lora_rank or adapter.lora_rank}, alpha {args.lora_alpha or adapter.lora_alpha}"
                       if get("use_lora", True) else "none: all transformer weights train"),
              "num_steps": args.num_steps, "sampler": args.sampler, "noise_level": args.noise_level,
              "guidance": args.guidance, "eval_num_steps": get("eval_num_steps"), "eval_guidance": get("eval_guidance"),
              "processes": processes, "images_per_batch_per_process": batch, "images_per_batch": batch * processes,
              "group_size": group, "prompts_per_batch": batch * processes // group, "batches_per_epoch": batches,
              "images_per_epoch_per_process": batch * batches, "images_per_epoch": batch * batches * processes,
              "updates_per_epoch": updates, "images_per_update": batch * batches * processes // updates,
              "parallel": ("FSDP2, the transformer sharded" if get("fsdp") else "DDP, the transformer replicated"
                           if processes > 1 else "one process")
                          + (", gradient checkpointing" if get("gradient_checkpointing") else "")}
    if get("train_steps"):
        recipe["trained_steps"] = list(args.train_steps)
    recipe["micro_steps_per_update"] = get("grad_accumulation")
    for name in ("num_inner_epochs", "learning_rate", "beta", "clip_range", "kl_convention"):
        if hasattr(args, name):
            recipe[name] = getattr(args, name)
    recipe["ema_every"] = args.ema_every if get("ema") else None
    recipe.update(extra)
    recipe.update(reward=args.reward, prompts=args.prompts, num_epochs=args.num_epochs, max_minutes=get("max_minutes"))
    return recipe


# recipe entries that `format_recipe` lays out in its own lines; the rest go on the training line
_LAID_OUT = {"script", "model", "checkpoint", "preset", "resolution", "dtype", "lora", "num_steps", "sampler",
             "noise_level", "guidance", "eval_num_steps", "eval_guidance", "processes", "images_per_batch_per_process",
             "images_per_batch", "group_size", "prompts_per_batch", "batches_per_epoch", "images_per_epoch_per_process",
             "images_per_epoch", "updates_per_epoch", "images_per_update", "reward", "prompts", "num_epochs",
             "max_minutes", "parallel"}


def format_recipe(r, path=None):
    """The recipe as one printed block of short lines, to check against the paper's numbers."""
    def count(n, word, plural=None):
        return f"{n} {word if n == 1 else plural or word + 's'}"

    def entry(name, value):
        if name == "trained_steps" and isinstance(value, list) and value == list(range(value[0], value[-1] + 1)):
            value = f"{value[0]}..{value[-1]} ({len(value)} of {r['num_steps']})"
        elif name == "ema_every":
            name, value = "ema", f"every {value} steps" if value else "off"
        return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"

    size = f"{r['resolution']} px, " if r["resolution"] else ""
    evaluation = (f"; eval {r['eval_num_steps']} ODE steps, guidance {r['eval_guidance']:g}"
                  if r.get("eval_num_steps") else "")
    limit = f" or {r['max_minutes']:g} min" if r.get("max_minutes") is not None else ""
    return "\n".join([
        f"---- recipe: {r['script']}, preset {r['preset']}" + (f" (also in {path})" if path else ""),
        f"model      {r['model']} from {r['checkpoint']}; {size}{r['dtype']}; LoRA {r['lora']}",
        f"sampling   {count(r['num_steps'], 'step')}, sampler {r['sampler']}, noise level {r['noise_level']:g}, "
        f"guidance {r['guidance']:g}{evaluation}",
        f"batch      {r['images_per_batch_per_process']} per process x {count(r['processes'], 'process', 'processes')} "
        f"= {r['images_per_batch']} images = {count(r['prompts_per_batch'], 'prompt')} x group {r['group_size']} "
        f"({r['parallel']})",
        f"epoch      {count(r['batches_per_epoch'], 'batch', 'batches')} = {r['images_per_epoch_per_process']} images "
        f"per process, {r['images_per_epoch']} in total; {count(r['updates_per_epoch'], 'update')} of "
        f"{r['images_per_update']} images each",
        "training   " + ", ".join(entry(name, value) for name, value in r.items() if name not in _LAID_OUT),
        f"run        {count(r['num_epochs'], 'epoch')}{limit}, reward {r['reward']}, prompts {r['prompts']}"])


def write_recipe(args, accelerator=None, **extra):
    """Print the resolved recipe as one block and write it with the full resolved Args to
    `output_dir/config.json`, on the main process only; returns the recipe."""
    recipe = resolved_recipe(args, **extra)
    if accelerator is None or accelerator.is_main_process:
        path = Path(args.output_dir) / "config.json"
        print(format_recipe(recipe, path), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"recipe": recipe, "args": dataclasses.asdict(args)}, indent=2, default=str) + "\n")
    return recipe


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
    """The records of a metrics.jsonl; [] when a run logged nothing (e.g. no epochs and no evaluation)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def frame_indices(num_frames, count):
    """`count` evenly spaced frame indices from the first frame to the last (all if fewer)."""
    if num_frames <= count:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, count).round().astype(int).tolist()


def save_frame_strips(path, videos, captions, frames=4, scale=2):
    """A PNG with one captioned row per video (B, F, 3, H, W) in [0, 1]: `frames` evenly spaced
    frames side by side, first to last (the video models' counterpart of `save_grid`)."""
    picked = frame_indices(videos.shape[1], frames)
    array = videos[:, picked].detach().float().clamp(0, 1).cpu().numpy()
    array = (array * 255).round().astype(np.uint8).transpose(0, 1, 3, 4, 2)  # (B, k, H, W, 3)
    height, width = array.shape[2] * scale, array.shape[3] * scale
    caption_h, gap = 30, 4
    row_w = max(len(picked) * (width + gap), 300)
    strip = Image.new("RGB", (row_w, len(array) * (height + caption_h)), "white")
    draw = ImageDraw.Draw(strip)
    for i, (video, caption) in enumerate(zip(array, captions)):
        y = i * (height + caption_h)
        for k, frame in enumerate(video):
            strip.paste(Image.fromarray(frame).resize((width, height), Image.NEAREST), (k * (width + gap), y))
        label = f"frames {', '.join(str(f) for f in picked)}: {caption}"
        draw.text((2, y + height + 1), "\n".join(textwrap.wrap(label, row_w // 6)[:2]), fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)


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
