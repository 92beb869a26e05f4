"""Rewards: one call signature, a registry, and the weighted combiner.

A reward is `fn(images, prompts, metadata) -> {name: per-image scores (np.ndarray)}` with
images float [0, 1] NCHW. `--reward shapes=1.0,jpeg_compressibility=0.5` builds a combiner
returning every component plus `avg` = sum_k w_k·score_k (not divided by the weight sum, as
published, ALGORITHMS.md §16 #35); a weight of 0 still computes and logs the component (a "gold"
monitor).

Videos (B, F, 3, H, W) (the wan adapter's samples) reach an image reward as frames: every
`VIDEO_FRAME_STRIDE`-th frame is scored and each video gets the mean over its frames; a reward
marked `fn.scores_videos = True` (`video_ocr`) receives the videos whole.

Spec grammar: `name[:arg][=weight]`, comma-separated. `arg` (everything after the first `:` up to
a trailing `=<number>`) goes to the reward's factory: a local model directory or a server URL,
e.g. `pickscore:/models/PickScore_v1=1.0` or `unifiedreward:http://127.0.0.1:17140/v1`.

Registry values are factories `factory(arg=None) -> reward fn`, or "module:function" strings
imported only when that reward is used, so `import common.rewards` stays light and no weights
load at import time. Model-based rewards live in `common/reward_models.py`; their optional
dependencies are checked when the spec is parsed (before any model loads) so a missing extra
fails at start-up with the `pip install` line, not mid-run.
"""

import importlib
import importlib.util
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


def colour_coverage_reward():
    """The toy world's hackable proxy: share of pixels in the prompt's colours (/0.3, capped at 1).
    Flooding the canvas maxes it and breaks the shapes; for over-optimisation studies."""
    from common.toy.detector import colour_coverage

    return lambda images, prompts, metadata: {
        "colour_coverage": colour_coverage(images.detach().float().cpu().numpy(), metadata)}


def _jpeg_kilobytes(images):
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes, dtype=np.float32)


# the two published scales of the JPEG size: raw kB (DDPO both ways, flow_grpo's incompressibility)
# and kB / 500 (flow_grpo's compressibility only)
JPEG_SCALES = {"kB": 1, "kB/500": 500}  # name -> divisor


def _jpeg_scale(name, scale, default):
    scale = default if scale is None else scale
    if scale not in JPEG_SCALES:
        raise ValueError(f"{name} takes a scale, `{name}:kB` or `{name}:kB/500`; got {scale!r}")
    return JPEG_SCALES[scale]


def jpeg_compressibility_reward(scale=None):
    """-(JPEG size at quality 95 in kB) / 500 by default, flow_grpo's `jpeg_compressibility`: higher
    for simpler images. `jpeg_compressibility:kB` is DDPO's, -kB without the /500."""
    divisor = _jpeg_scale("jpeg_compressibility", scale, "kB/500")
    return lambda images, prompts, metadata: {"jpeg_compressibility": -_jpeg_kilobytes(images) / divisor}


def jpeg_incompressibility_reward(scale=None):
    """+(JPEG size at quality 95 in kB), DDPO's and flow_grpo's `jpeg_incompressibility`: higher for
    busier images. `jpeg_incompressibility:kB/500` divides by 500 (no published reward does)."""
    divisor = _jpeg_scale("jpeg_incompressibility", scale, "kB")
    return lambda images, prompts, metadata: {"jpeg_incompressibility": _jpeg_kilobytes(images) / divisor}


# Videos: image rewards score frames 0, 4, 8, ... (9 of Wan's 33 frames), the frames flow_grpo's
# `video_ocr` reads, and average them per video
VIDEO_FRAME_STRIDE = 4


def score_video_frames(fn, videos, prompts, metadata, stride=VIDEO_FRAME_STRIDE):
    """An image reward `fn` on videos (B, F, 3, H, W): every `stride`-th frame scored as an image
    (with its video's prompt and metadata), each component the mean over a video's frames (a NaN
    frame, one a remote reward could not score, leaves its video unscored)."""
    frames = videos[:, ::stride]
    batch, count = frames.shape[:2]
    scores = fn(frames.reshape(batch * count, *frames.shape[2:]), [p for p in prompts for _ in range(count)],
                [m for m in metadata for _ in range(count)])
    return {name: np.asarray(values, dtype=np.float64).reshape(batch, count).mean(axis=1)
            for name, values in scores.items()}


def video_ocr_score(frame_texts, target):
    """flow_grpo's `video_ocr` rule for one video (ALGORITHMS.md §12): per frame, the recognised
    lines joined, lower-case, no spaces; d = min(Levenshtein, len(target)) with no substring
    shortcut (unlike `ocr`); frame score 1 - d/len(target). The video scores the mean of its frames
    that score > 0, or 0 if none does. `frame_texts`: one sequence of lines per frame (None: OCR
    failed on that frame, which scores 0)."""
    from common.reward_models import levenshtein

    target = target.replace(" ", "").lower()
    if not target:
        return 0.0
    kept = []
    for lines in frame_texts:
        if lines is None:
            continue
        text = "".join(lines).replace(" ", "").lower()
        score = 1.0 - min(levenshtein(text, target), len(target)) / len(target)
        if score > 0:
            kept.append(score)
    return sum(kept) / len(kept) if kept else 0.0


def video_ocr_reward(arg=None):
    """Text rendering in videos, flow_grpo's `video_ocr`: the `ocr` reward's engine (`arg` as
    there: `video_ocr:rapidocr` keeps rapidocr's detector settings) reads every
    `VIDEO_FRAME_STRIDE`-th frame of each (B, F, 3, H, W) video; `video_ocr_score` combines them.
    Images (B, 3, H, W) count as one-frame videos."""
    import warnings

    from common.reward_models import ocr_reward, ocr_target

    engine = ocr_reward(arg).engine

    def fn(images, prompts, metadata):
        videos = images if images.ndim == 5 else images[:, None]
        scores = []
        for video, prompt in zip(videos, prompts):
            target = ocr_target(prompt)
            texts = []
            for frame in to_uint8(video[::VIDEO_FRAME_STRIDE]):
                try:
                    texts.append(engine(Image.fromarray(frame)).txts or ())
                except Exception as error:  # published: a failed frame scores 0; we also say so
                    warnings.warn(f"video_ocr reward: OCR failed on a frame ({error!r}); it scores 0")
                    texts.append(None)
            scores.append(video_ocr_score(texts, target))
        return {"video_ocr": np.array(scores, dtype=np.float32)}

    fn.scores_videos = True
    fn.engine = engine
    return fn


REWARDS = {
    "shapes": shapes_reward,
    "colour_coverage": colour_coverage_reward,
    "jpeg_compressibility": jpeg_compressibility_reward,
    "jpeg_incompressibility": jpeg_incompressibility_reward,
    # the gmm world (--model gmm): points, not images
    "gmm_target": "common.gmm.rewards:target_reward",
    "gmm_hit": "common.gmm.rewards:hit_reward",
    "gmm_proxy": "common.gmm.rewards:proxy_reward",
    "ocr": "common.reward_models:ocr_reward",
    "video_ocr": video_ocr_reward,
    "aesthetic": "common.reward_models:aesthetic_reward",
    "clipscore": "common.reward_models:clipscore_reward",
    "pickscore": "common.reward_models:pickscore_reward",
    "image_similarity": "common.reward_models:image_similarity_reward",
    "imagereward": "common.reward_models:imagereward_reward",
    "hpsv2": "common.reward_models:hpsv2_reward",
    "qwenvl": "common.reward_models:qwenvl_reward",
    "unifiedreward": "common.reward_models:unifiedreward_reward",
    # HTTP reward servers (JSON protocol, ALGORITHMS.md §13), in common/reward_server.py
    "remote": "common.reward_server:remote_reward",
    "geneval": "common.reward_server:geneval_reward",
    "deqa": "common.reward_server:deqa_reward",
}

# name -> (importable modules it needs, the pyproject extra that installs them). Rewards not listed
# need only the core dependencies (torch, transformers, pillow).
REQUIREMENTS = {"ocr": (("rapidocr", "onnxruntime"), "ocr"), "video_ocr": (("rapidocr", "onnxruntime"), "ocr")}


def check_requirements(name):
    """Raise ImportError with the install line when `name`'s optional dependencies are missing
    (or its module, for a lazily registered reward). Imports nothing heavy."""
    factory = REWARDS[name]
    if isinstance(factory, str) and importlib.util.find_spec(factory.partition(":")[0]) is None:
        raise ImportError(f"the {name!r} reward's module {factory.partition(':')[0]} is missing from this checkout")
    modules, extra = REQUIREMENTS.get(name, ((), None))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the {name!r} reward needs {', '.join(missing)}: pip install 'cleanflow[{extra}]' "
                          f"(or pip install -e '.[{extra}]' in a checkout)")


def split_key(key):
    """'pickscore:/models/ps' -> ('pickscore', '/models/ps'); 'shapes' -> ('shapes', None)."""
    name, sep, arg = key.partition(":")
    return name, (arg if sep else None)


def parse_reward_spec(spec):
    """'shapes' or 'pickscore:/dir=0.5,ocr=0.5' -> {key: weight} where key is `name` or `name:arg`.
    Unknown names, bad weights, repeated rewards and missing optional dependencies fail here."""
    weights, seen = {}, set()
    for part in spec.split(","):
        part = part.strip()
        key, weight = part, 1.0
        head, eq, tail = part.rpartition("=")
        if eq:
            try:
                key, weight = head, float(tail)
            except ValueError:
                if ":" not in head:  # `name=abc`; with an arg the `=` may belong to it (a URL query)
                    raise ValueError(f"reward weight in {part!r} must be a number, got {tail!r}") from None
        name, arg = split_key(key)
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
        if arg == "":
            raise ValueError(f"{part!r}: empty argument after ':' (write `{name}` or `{name}:PATH_OR_URL`)")
        if name in seen:
            raise ValueError(f"reward {name!r} appears twice in {spec!r}; each reward once")
        seen.add(name)
        check_requirements(name)
        weights[key] = weight
    return weights


def resolve(factory):
    """A registry value -> the factory callable (imports "module:function" strings)."""
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        return getattr(importlib.import_module(module), attribute)
    return factory


def build_reward(key):
    """'name' or 'name:arg' -> the reward fn (loads its model now, not at import)."""
    name, arg = split_key(key)
    factory = resolve(REWARDS[name])
    return factory() if arg is None else factory(arg)


class MultiReward:
    """Weighted sum of registered rewards; `__call__` returns every component and `avg`.
    `weights` is what `parse_reward_spec` returns ({name or name:arg: weight})."""

    def __init__(self, weights):
        self.weights = {split_key(key)[0]: w for key, w in weights.items()}
        self.fns = {split_key(key)[0]: build_reward(key) for key in weights}

    def __call__(self, images, prompts, metadata):
        """Scores of images (B, 3, H, W) or videos (B, F, 3, H, W): an image reward scores a
        video's every `VIDEO_FRAME_STRIDE`-th frame and averages (`score_video_frames`)."""
        out, avg = {}, np.zeros(len(prompts), dtype=np.float64)
        video = images.ndim == 5
        for name, fn in self.fns.items():
            if video and not getattr(fn, "scores_videos", False):
                scores = score_video_frames(fn, images, prompts, metadata)
            else:
                scores = fn(images, prompts, metadata)
            # the weight applies to the component named like the reward (a server reward may
            # answer under a single other name)
            primary = name if name in scores else (next(iter(scores)) if len(scores) == 1 else None)
            if primary is None:
                raise KeyError(f"reward {name!r} returned {sorted(scores)}, none named {name!r}")
            out.update({k: np.asarray(v, dtype=np.float32) for k, v in scores.items()})
            avg += self.weights[name] * out[primary]
        out["avg"] = avg.astype(np.float32)
        return out


def collect_rewards(futures, accelerator):
    """The results of an epoch's reward futures, in order. If the reward raised on any rank, every
    rank stops together with the error (a rank that carried on would wait forever in the next
    gather); nothing is written, so the last checkpoint stays the resumable state."""
    import torch

    results, error = [], None
    for future in futures:
        try:
            results.append(future.result())
        except Exception as exc:  # any reward failure stops the run: never a silent zero
            error = error or exc
    failed = torch.tensor([float(error is not None)], device=accelerator.device)
    if accelerator.gather(failed).sum().item() > 0:
        accelerator.end_training()
        reason = f"{type(error).__name__}: {error}" if error is not None else "on another rank"
        raise SystemExit(f"stopping: the reward failed ({reason}); the last checkpoint is intact, "
                         "continue with --resume latest") from error
    return results


def gather_reward_metrics(rewards, accelerator, epoch, max_unscored=0.5):
    """Gather an epoch's rewards (the list `collect_rewards` returned) from every rank.

    Returns (all_reward, scored, metrics): the weighted `avg` of every sample in rank order, a mask
    of the samples that were scored, and `reward/{component}`, `reward/mean`, `reward/std`,
    `reward/dropped`. A NaN is a sample the reward could not score (a remote reward with
    `on_error=drop`): it is left out of every statistic, and callers give it no training signal.
    If more than `max_unscored` of the epoch is unscored, every rank stops (the reward service is
    down, not flaky); nothing of this epoch is written, so the last checkpoint is intact."""
    import torch

    def gathered(name):
        local = torch.tensor(np.concatenate([r[name] for r in rewards]), device=accelerator.device)
        return accelerator.gather(local).cpu().numpy()

    all_reward = gathered("avg")
    scored = np.isfinite(all_reward)
    if (~scored).mean() > max_unscored:
        accelerator.end_training()
        raise SystemExit(f"stopping: the reward could not score {(~scored).sum()} of {len(scored)} samples at "
                         f"epoch {epoch}; the last checkpoint is intact, continue with --resume latest")
    metrics = {f"reward/{name}": float(np.nanmean(gathered(name))) for name in rewards[0] if name != "avg"}
    mean = float(all_reward[scored].mean())
    metrics.update({"reward/avg": mean, "reward/mean": mean, "reward/std": float(all_reward[scored].std()),
                    "reward/dropped": int((~scored).sum())})
    return all_reward, scored, metrics
