"""Evaluation with the ODE sampler: fixed prompts, fixed seeds, per-category scores.

`evaluate` is what every algorithm calls in its loop (and what the toy base-model test and
card use): images are generated with noise level 0 (Euler ODE) and CFG, seeds are
`seed + image_index`, and for GenEval-style metadata the prompts are spread evenly so every
category gets `images_per_category` images (32 per category is too noisy to see ±0.05).

`python -m common.evaluate` is the standalone evaluation a paper's table comes from: a base
model plus optionally a LoRA (our diffusers export, a PEFT adapter, a training checkpoint) or a
merged transformer; prompts from the toy splits, a txt file, GenEval metadata or a
T2I-CompBench-style folder; images written as `{output_dir}/{category}/samples/{prompt}_{k:05d}.png`
(the layout T2I-CompBench's scorers read) and, with `--reward`, scored into `summary.json`.
Videos (`--model wan`, (F, 3, H, W) each) are saved losslessly as one PNG of their F frames stacked
top to bottom (F·H x W), same file names; scoring reads them back into (N, F, 3, H, W) with the
adapter's `num_frames` (image scorers such as T2I-CompBench's would see one tall picture).

Launch:
    # the toy base model the way its card and the in-loop evaluation measure it
    python -m common.evaluate --protocol balanced --images-per-category 64 --steps 20 --guidance 4 --seed 0 \
        --reward shapes --output-dir runs/eval/toy_base
    # a trained LoRA, 4 images per prompt (seeds seed + prompt_index·4 + k)
    python -m common.evaluate --lora runs/flow_grpo/final/diffusers --reward shapes --output-dir runs/eval/grpo
    # SD3.5-M on GenEval prompts, 8 GPUs (prompt batches sharded across ranks)
    accelerate launch --multi_gpu --num_processes 8 -m common.evaluate --model sd3 \
        --pretrained stabilityai/stable-diffusion-3.5-medium --lora runs/x/final/diffusers \
        --prompts path/to/evaluation_metadata.jsonl --steps 40 --guidance 4.5 --dtype fp16 --output-dir runs/eval/x
    # 2 CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 0 -m common.evaluate ...
"""

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from common.data import Prompt
from common.rollout import initial_latents, rollout


def balanced_eval_prompts(prompts, images_per_category=64):
    """Per category (metadata `tag`, or one category for plain prompts), cycle through its
    prompts until it has `images_per_category` entries. Deterministic order."""
    by_tag = defaultdict(list)
    for prompt in prompts:
        by_tag[prompt.metadata.get("tag", "all")].append(prompt)
    return [items[i % len(items)] for items in by_tag.values() for i in range(images_per_category)]


@torch.no_grad()
def generate_seeded(adapter, prompts, seeds, *, num_steps, guidance, resolution=None, negative=None):
    """ODE images (N, 3, H, W) (videos: (N, F, 3, H, W)) in [0, 1], one batch: prompt i starts from
    the noise of seeds[i]. `negative` (embeds) defaults to the adapter's empty-prompt embedding."""
    sigmas = adapter.make_sigmas(num_steps, resolution)
    if guidance > 1 and negative is None:
        negative = adapter.negative_embeds()
    embeds = adapter.encode_prompts(prompts)
    latents = initial_latents(adapter.latent_shape(len(prompts), resolution), seeds)
    trajectory = rollout(adapter, embeds, sigmas, latents, negative=negative if guidance > 1 else None,
                         guidance=guidance, noise_level=0.0, keep_means=False)
    return trajectory.images.cpu()


@torch.no_grad()
def generate(adapter, prompts, *, num_steps, guidance, seed=0, batch_size=None, resolution=None, progress=None):
    """ODE images (N, 3, H, W) (videos: (N, F, 3, H, W)) in [0, 1] for `prompts` (list of `Prompt`),
    seeds seed + index."""
    images = []
    batch_size = batch_size or adapter.eval_batch_size
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        images.append(generate_seeded(adapter, chunk, [seed + start + i for i in range(len(chunk))],
                                      num_steps=num_steps, guidance=guidance, resolution=resolution))
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(images)


def summarize(prompts, rewards, strict_key=None):
    """Metric dict: `eval/reward_mean`, each component's mean, and with `strict_key` the strict
    accuracy per category (`eval/accuracy/<tag>`) and overall (`eval/accuracy`). Images a remote
    reward could not score (NaN, `on_error=drop`) are left out of the means and counted in
    `eval/dropped`."""
    scored = np.asarray(rewards["avg"], dtype=np.float64)
    scored = scored[np.isfinite(scored)]
    metrics = {"eval/reward_mean": float(np.nanmean(rewards["avg"])),
               # the standard error of that mean over images (learning tests compare runs in its units)
               "eval/reward_se": float(scored.std(ddof=1) / np.sqrt(len(scored))) if len(scored) > 1 else float("nan")}
    for name, values in rewards.items():
        if name != "avg":
            metrics[f"eval/{name}_mean"] = float(np.nanmean(values))
    if strict_key is not None:
        tags = np.array([p.metadata.get("tag", "all") for p in prompts])
        correct = np.asarray(rewards[strict_key], dtype=np.float64)
        for tag in dict.fromkeys(tags):
            metrics[f"eval/accuracy/{tag}"] = float(np.nanmean(correct[tags == tag]))
        metrics["eval/accuracy"] = float(np.nanmean(correct))
    dropped = int((~np.isfinite(np.asarray(rewards["avg"], dtype=np.float64))).sum())
    if dropped:
        metrics["eval/dropped"] = dropped
    return metrics


def evaluate(adapter, prompts, reward_fn, *, num_steps=20, guidance=4.0, seed=0, batch_size=None,
             images_per_category=64, resolution=None, progress=None, picture=None, sde=None):
    """(metrics, images, eval prompts) for the balanced eval set built from `prompts`.

    `picture`: a path where the adapter pictures the samples with their scores (image models: a
    grid). `sde`: the run's rollout sampler (sampler, noise_level, num_steps, guidance) for the
    adapter's diagnostics that need it (the gmm world's path KL; ignored when noise_level is 0).
    The metrics also hold the adapter's exact diagnostics (`ModelAdapter.diagnostics`)."""
    eval_prompts = balanced_eval_prompts(prompts, images_per_category)
    images = generate(adapter, eval_prompts, num_steps=num_steps, guidance=guidance, seed=seed,
                      batch_size=batch_size, resolution=resolution, progress=progress)
    metrics, rewards = score(eval_prompts, images, reward_fn)
    metrics.update(adapter.diagnostics(eval_prompts, images, seed=seed, num_steps=num_steps, guidance=guidance,
                                       sde=sde if sde and sde["noise_level"] > 0 else None))
    if picture is not None:
        adapter.picture(picture, images, eval_prompts, np.asarray(rewards["avg"], dtype=np.float64))
    return metrics, images, eval_prompts


def evaluate_in_loop(adapter, reward_fn, test_prompts, train_prompts, args, *, epoch, ema=None, output_dir=None,
                     main_process=True, sde=None):
    """The algorithm files' periodic evaluation (under the EMA weights when the run keeps one):
    `evaluate` on the held-out test prompts (`eval/...`, with the picture every `args.grid_every`
    epochs and the adapter's diagnostics), and with `train_prompts` the same on the training prompts
    (`eval/train/...`): learning in distribution next to generalisation to unseen prompts. Both use
    seeds seed + image_index, which no rollout draws (rollout seeds are 63-bit `derive_seed` hashes).
    Reads args.eval_num_steps, eval_guidance, eval_images_per_category, seed, resolution, grid_every;
    `python -m common.evaluate --protocol balanced --split train|test` reproduces either."""
    from contextlib import nullcontext

    from tqdm import tqdm

    settings = dict(num_steps=args.eval_num_steps, guidance=args.eval_guidance, seed=args.seed,
                    images_per_category=args.eval_images_per_category, resolution=args.resolution)
    with ema.swapped() if ema is not None else nullcontext():
        bar = tqdm(desc=f"eval {epoch}", unit="img", disable=not main_process, leave=False)
        picture = (output_dir / "grids" / f"eval_epoch{epoch:04d}.png"
                   if main_process and output_dir is not None and args.grid_every and epoch % args.grid_every == 0
                   else None)
        metrics, _, _ = evaluate(adapter, test_prompts, reward_fn, progress=bar, picture=picture, sde=sde, **settings)
        if train_prompts is not None:
            eval_prompts = balanced_eval_prompts(train_prompts, args.eval_images_per_category)
            images = generate(adapter, eval_prompts, num_steps=settings["num_steps"], guidance=settings["guidance"],
                              seed=settings["seed"], resolution=settings["resolution"], progress=bar)
            train_metrics, _ = score(eval_prompts, images, reward_fn)
            metrics.update({"eval/train/" + key[len("eval/"):]: value for key, value in train_metrics.items()})
        bar.close()
    return metrics


def score(eval_prompts, images, reward_fn):
    """(`summarize`'s metrics, the reward dict) of images generated for `eval_prompts`."""
    rewards = reward_fn(images, [p.text for p in eval_prompts], [p.metadata for p in eval_prompts])
    strict_key = next((k for k in rewards if k.endswith("_strict")), None)
    return summarize(eval_prompts, rewards, strict_key), rewards


# ------------------------------------------------------------------- standalone evaluation CLI


@dataclass
class Args:
    # ---- model
    model: str = "toy"
    """model adapter: toy (embedded, offline), gmm, sd3, flux, flux_kontext, qwen_image, qwen_image_edit or
    wan (videos, saved as frame-stacked PNGs)"""
    pretrained: Optional[str] = None
    """hub id or local directory of the base model (toy: the committed weights when unset)"""
    lora: Optional[str] = None
    """LoRA to apply: our diffusers export (`final/diffusers`), a PEFT adapter directory (`final/peft`),
    a run's output directory (its `final/diffusers`) or a training checkpoint (`checkpoint-XXXXXX`; its
    EMA weights when it kept an EMA, as the in-loop evaluation and the export use)"""
    transformer: Optional[str] = None
    """a merged or fully fine-tuned transformer directory (`final/merged_transformer`, `final/transformer`)
    that replaces the base model's"""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """weights dtype of the model (the ODE maths runs in fp32 whatever it is)"""

    # ---- prompts
    prompts: str = "toy"
    """dataset name (toy), a txt file, a GenEval metadata jsonl, a directory with `{split}` files, or a
    T2I-CompBench-style folder of per-category prompt files (`<category>.txt`, or `<category>_val.txt`)"""
    split: Literal["train", "test"] = "test"
    """split of a dataset name or a directory with split files"""
    protocol: Literal["per-prompt", "balanced"] = "per-prompt"
    """per-prompt: `--images-per-prompt` images of every prompt, seeds seed + prompt_index·N + k;
    balanced: the in-loop evaluation (`evaluate()`), each category cycled to `--images-per-category`
    images, seeds seed + image_index (what the algorithm files log and the toy card reports)"""
    images_per_prompt: int = 4
    """images per prompt (per-prompt protocol; GenEval uses 4, T2I-CompBench 10)"""
    images_per_category: int = 64
    """images per category (balanced protocol)"""
    max_prompts_per_category: Optional[int] = None
    """keep only the first N prompts of each category (quick looks; not for tables)"""

    # ---- inference
    steps: int = 20
    """Euler ODE steps (the sd3 preset evaluates with 40)"""
    guidance: float = 4.0
    """CFG scale, 1 = no CFG (the sd3 preset evaluates with 4.5)"""
    resolution: Optional[int] = None
    """image size in pixels (default: the model's)"""
    negative_prompt: str = ""
    """negative prompt for CFG (the algorithm files use the empty prompt)"""
    seed: int = 0
    """base seed: image i of the generation list starts from the noise of seed + i"""
    batch_size: int = 64
    """images per forward batch; outputs can move by ~1e-6 with the batch composition, so keep it
    fixed to reproduce a run bit for bit (64 is what the in-loop evaluation uses)"""

    # ---- output
    output_dir: str = "runs/eval"
    """images go to {output_dir}/{category}/samples/, then images.jsonl and summary.json; existing
    images are kept (an interrupted evaluation resumes)"""
    reward: Optional[str] = None
    """score the images with this reward spec (e.g. `shapes`); None = only generate"""


@dataclass
class Job:
    """One image to generate: its position in the generation list, prompt, seed and file."""

    index: int
    prompt: Prompt
    category: str
    seed: int
    file: str


def _category_files(directory):
    """T2I-CompBench-style folder: `<category>_val.txt` files if any (its evaluation split; the
    `_train` files are ignored), else every `<category>.txt`."""
    val = sorted(directory.glob("*_val.txt"))
    if val:
        return [(p.stem[:-len("_val")], p) for p in val]
    return [(p.stem, p) for p in sorted(directory.glob("*.txt"))]


def load_eval_prompts(spec, split="test"):
    """`Prompt`s whose category is `metadata["tag"]`: GenEval's tag, the file name in a category
    folder, none (category `all`) for plain prompt files."""
    from common.data import SPLITS, load_prompts

    path = Path(spec)
    has_split_files = path.is_dir() and any((path / f"{split}{suffix}").is_file()
                                            for suffix in ("_metadata.jsonl", ".jsonl", ".txt"))
    if not path.is_dir() or has_split_files or split not in SPLITS:
        return load_prompts(spec, split)
    files = _category_files(path)
    if not files:
        raise FileNotFoundError(f"--prompts {spec}: a directory needs {split}_metadata.jsonl / {split}.txt or "
                                "per-category <category>.txt files")
    prompts = []
    for category, file in files:
        lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"prompt file {file} contains no prompts")
        prompts += [Prompt(text, {"tag": category}) for text in lines]
    return prompts


def file_stem(text, max_bytes=200):
    """A prompt as a file name: path separators replaced, cut to `max_bytes` of UTF-8."""
    name = text.replace(os.sep, " ").replace("\0", " ").strip()
    return name.encode()[:max_bytes].decode(errors="ignore")


def build_jobs(prompts, args: Args):
    """The generation list. per-prompt: prompt p, image k -> position p·N + k; balanced: the
    in-loop list. Either way the seed is seed + position and files are numbered per
    (category, prompt) in list order, so `{prompt}_{k:05d}` is the prompt's k-th image."""
    if args.max_prompts_per_category is not None:
        kept, seen = [], defaultdict(int)
        for prompt in prompts:
            tag = prompt.metadata.get("tag", "all")
            if seen[tag] < args.max_prompts_per_category:
                kept.append(prompt)
                seen[tag] += 1
        prompts = kept
    if args.protocol == "balanced":
        ordered = balanced_eval_prompts(prompts, args.images_per_category)
    else:
        ordered = [prompt for prompt in prompts for _ in range(args.images_per_prompt)]
    jobs, counts = [], defaultdict(int)
    for index, prompt in enumerate(ordered):
        category = prompt.metadata.get("tag", "all")
        stem = file_stem(prompt.text)
        k = counts[category, stem]
        counts[category, stem] += 1
        jobs.append(Job(index, prompt, category, args.seed + index, f"{file_stem(category)}/samples/{stem}_{k:05d}.png"))
    return jobs


def generation_settings(args: Args):
    """Everything that determines the images (a resumed run must match it)."""
    from common.models import get_adapter_class

    def absolute(path):
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path

    settings = {"model": args.model, "pretrained": absolute(args.pretrained), "lora": absolute(args.lora),
                "transformer": absolute(args.transformer), "dtype": args.dtype, "prompts": absolute(args.prompts),
                "split": args.split, "protocol": args.protocol,
                "max_prompts_per_category": args.max_prompts_per_category, "sampler": "euler-ode",
                "steps": args.steps, "guidance": args.guidance,
                "resolution": args.resolution or get_adapter_class(args.model).default_resolution,
                "negative_prompt": args.negative_prompt, "seed": args.seed}
    frames = video_frames(args.model)
    if frames is not None:  # a video model: the frame count shapes every file
        settings["num_frames"] = frames
    if args.protocol == "balanced":
        settings["images_per_category"] = args.images_per_category
    else:
        settings["images_per_prompt"] = args.images_per_prompt
    return settings


def validate(args: Args):
    """Check everything that can be checked before a model loads; returns the prompts."""
    from common.models import check_model_name
    from common.rewards import parse_reward_spec

    check_model_name(args.model)
    if args.reward is not None:
        parse_reward_spec(args.reward)
    for name in ("steps", "images_per_prompt", "images_per_category", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_prompts_per_category is not None and args.max_prompts_per_category < 1:
        raise ValueError("--max-prompts-per-category must be at least 1")
    if args.lora is not None and args.transformer is not None:
        raise ValueError("give --lora or --transformer, not both (a merged transformer already holds the LoRA)")
    if args.lora is not None:
        from common.checkpoint import resolve_lora

        resolve_lora(args.lora)
    if args.transformer is not None and not (Path(args.transformer) / "config.json").is_file():
        raise FileNotFoundError(f"--transformer {args.transformer}: no config.json (expected a save_pretrained "
                                "directory such as final/merged_transformer)")
    return load_eval_prompts(args.prompts, args.split)


def load_model(args: Args, device):
    """The adapter with the LoRA or the replacement transformer applied."""
    from common.models import load_adapter

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    adapter = load_adapter(args.model, args.pretrained, device=device, dtype=dtype, resolution=args.resolution)
    if args.transformer is not None:
        transformer = type(adapter.transformer).from_pretrained(args.transformer, dtype=dtype).to(device).eval()
        adapter.transformer = transformer
        if hasattr(adapter, "pipeline"):  # the sd3 adapter keeps its pipeline's transformer in step
            adapter.pipeline.transformer = transformer
    if args.lora is not None:
        from common.checkpoint import load_lora

        load_lora(adapter.transformer, args.lora, default_alpha=adapter.lora_alpha)
    adapter.transformer.requires_grad_(False).eval()
    return adapter


def video_frames(model):
    """Frames per sample of a video model (its adapter class's `num_frames`), None for image models."""
    from common.models import get_adapter_class

    return getattr(get_adapter_class(model), "num_frames", None)


def save_png(image, path):
    """An image (3, H, W), or a video (F, 3, H, W) as its frames stacked top to bottom (F·H x W),
    in [0, 1] -> an 8-bit PNG (lossless, so `load_pngs` gets the uint8 pixels back exactly).
    Written under a temporary name and renamed: a killed run never leaves a truncated image
    that a resumed run would take for finished."""
    from PIL import Image

    from common.rewards import to_uint8

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frames = to_uint8(image if image.ndim == 4 else image[None])  # (F, H, W, 3), F = 1 for an image
    Image.fromarray(np.concatenate(list(frames), axis=0)).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_pngs(paths, frames=None):
    """PNG files -> (N, 3, H, W) float in [0, 1], or with `frames` the videos `save_png` stacked,
    (N, frames, 3, H, W): scores are always computed from the saved files, so a resumed run scores
    exactly what an uninterrupted one does."""
    from PIL import Image

    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # (N, rows, W, 3)
    if frames is None:
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    count, rows, width, _ = arrays.shape
    if rows % frames:
        raise ValueError(f"{paths[0]}: {rows} pixel rows do not stack {frames} frames of equal height")
    videos = arrays.reshape(count, frames, rows // frames, width, 3)
    return torch.from_numpy(videos).permute(0, 1, 4, 2, 3).float() / 255


def category_table(jobs, rewards, strict_key):
    """{category: {images, accuracy?, component means}} plus the overall rows."""
    tags = np.array([job.category for job in jobs])
    names = [name for name in rewards if name != "avg" and name != strict_key]
    if len(names) > 1:
        names.append("avg")

    def row(mask):
        out = {"images": int(mask.sum())}
        if strict_key is not None:
            out["accuracy"] = float(np.asarray(rewards[strict_key], dtype=np.float64)[mask].mean())
        for name in names:
            out[name] = float(np.asarray(rewards[name], dtype=np.float64)[mask].mean())
        return out

    categories = {tag: row(tags == tag) for tag in dict.fromkeys(tags)}
    columns = [c for c in next(iter(categories.values())) if c != "images"]
    category_mean = {c: float(np.mean([r[c] for r in categories.values()])) for c in columns}
    return categories, row(np.ones(len(jobs), dtype=bool)), category_mean


def markdown_table(summary):
    categories = summary["categories"]
    columns = list(next(iter(categories.values())))
    lines = ["| category | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def cell(value):
        return str(value) if isinstance(value, int) else f"{value:.3f}"

    for name, row in categories.items():
        lines.append(f"| {name} | " + " | ".join(cell(row[c]) for c in columns) + " |")
    lines.append("| **overall (images)** | " + " | ".join(cell(summary["overall"][c]) for c in columns) + " |")
    lines.append("| **overall (category mean)** | " + " | ".join(
        cell(summary["category_mean"][c]) if c in summary["category_mean"] else "" for c in columns) + " |")
    return "\n".join(lines)


def main(args: Args):
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    prompts = validate(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main_process = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    output_dir = Path(args.output_dir)
    jobs = build_jobs(prompts, args)
    settings = generation_settings(args)

    # a resumed run must have produced its images with the same settings
    settings_path = output_dir / "settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"error: {output_dir} holds images made with other settings ({', '.join(changed)}); "
                             "choose another --output-dir or delete it")
    accelerator.wait_for_everyone()
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")

    # whole batches go to ranks round-robin: every batch has the same composition (and so the same
    # images, bit for bit) whatever the number of processes
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    mine = batches[rank::world]
    todo = [batch for batch in mine if not all((output_dir / job.file).exists() for job in batch)]
    accelerator.print(f"{len(jobs)} images in {output_dir}; rank 0 of {world} has {len(todo)} of "
                      f"{len(mine)} batches to generate")
    start, adapter, negative, written = time.time(), None, None, 0
    bar = tqdm(total=sum(len(batch) for batch in todo), desc="generating", unit="img", disable=not main_process)
    for batch in todo:
        if adapter is None:  # loaded only when something is missing: rescoring needs no model
            adapter = load_model(args, accelerator.device)
            negative = adapter.encode_prompts([args.negative_prompt]) if args.negative_prompt else None
        # a batch cut short by a kill is generated whole again (the same composition gives the
        # same pixels, PITFALLS §5: alone its images could move by ~1e-6) and only its missing
        # files are written; existing images are never touched
        images = generate_seeded(adapter, [job.prompt for job in batch], [job.seed for job in batch],
                                 num_steps=args.steps, guidance=args.guidance, resolution=args.resolution,
                                 negative=negative)
        for job, image in zip(batch, images):
            if not (output_dir / job.file).exists():
                save_png(image, output_dir / job.file)
                written += 1
        bar.update(len(batch))
    bar.close()
    generate_s = time.time() - start
    accelerator.wait_for_everyone()

    if main_process:
        with open(output_dir / "images.jsonl", "w") as f:
            for job in jobs:
                f.write(json.dumps({"file": job.file, "prompt": job.prompt.text, "category": job.category,
                                    "seed": job.seed, "metadata": job.prompt.metadata}) + "\n")
    if args.reward is None:
        accelerator.print(f"rank 0 wrote {written} images in {generate_s:.1f} s; no --reward, nothing scored")
        accelerator.end_training()
        return None

    from common.rewards import MultiReward, parse_reward_spec

    reward_fn = MultiReward(parse_reward_spec(args.reward))
    frames = video_frames(args.model)
    scored = []
    for batch in tqdm(mine, desc="scoring", unit="batch", disable=not main_process):
        images = load_pngs([output_dir / job.file for job in batch], frames)
        rewards = reward_fn(images, [job.prompt.text for job in batch], [job.prompt.metadata for job in batch])
        scored += [(job.index, {name: float(values[i]) for name, values in rewards.items()})
                   for i, job in enumerate(batch)]
    scored = gather_object(scored) if world > 1 else scored
    summary = None
    if main_process:
        by_index = dict(scored)
        names = list(by_index[0])
        rewards = {name: np.array([by_index[job.index][name] for job in jobs], dtype=np.float32) for name in names}
        strict_key = next((k for k in rewards if k.endswith("_strict")), None)
        metrics = summarize([job.prompt for job in jobs], rewards, strict_key)
        categories, overall, category_mean = category_table(jobs, rewards, strict_key)
        summary = {"settings": {**settings, "reward": args.reward, "batch_size": args.batch_size},
                   "num_images": len(jobs), "categories": categories, "overall": overall,
                   "category_mean": category_mean, "metrics": metrics}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(output_dir / "scores.jsonl", "w") as f:
            for job in jobs:
                f.write(json.dumps({"file": job.file, **by_index[job.index]}) + "\n")
        print(markdown_table(summary))
        print(f"{len(jobs)} images ({written} written by rank 0 in {generate_s:.1f} s, {world} process(es)); "
              f"summary: {output_dir / 'summary.json'}")
    accelerator.end_training()
    return summary


def parse_args(argv=None):
    import tyro

    return tyro.cli(Args, args=argv, description=__doc__)


if __name__ == "__main__":
    cli_args = parse_args()
    try:
        validate(cli_args)  # fail fast on bad arguments, before accelerate or any model starts
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    main(cli_args)
