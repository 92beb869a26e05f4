"""Model-based rewards (OCR, CLIP family, ImageReward, HPS v2.1, VLM judges), loaded on demand.

Every factory here is registered by name in `common/rewards.py` and called as `factory(arg)`
with `arg` from the spec (`name:arg=weight`), usually a local model directory or a server URL;
`None` means the published checkpoint's hub id. Nothing heavy is imported or loaded at import
time: each factory imports its library and loads its weights when the run builds its rewards.
Scales follow ALGORITHMS.md §12 (the published code's, quirks included), and so do the pixels
each model sees: the preprocessing section writes out each published transform.

Threads. Rewards run in a thread beside sampling. Each model call runs under
`torch_threads(REWARD_THREADS)` (default 1, env `CLEANFLOW_REWARD_THREADS`). torch's
`set_num_threads` is not simply process-global: the OpenMP count is per OS thread, and the value
also becomes the default that each thread adopts on its first torch call. So setting it inside
the reward thread leaves an already-running sampler thread alone (the factories run in the
trainer's thread and fix its count first), and it is restored after every call so that threads
started later do not inherit 1. onnxruntime (OCR) gets `intra_op_num_threads` per session instead.
"""

import base64
import io
import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.rewards import check_requirements, to_uint8

REWARD_THREADS = int(os.environ.get("CLEANFLOW_REWARD_THREADS", "1"))
_thread_lock = threading.Lock()


def reward_device():
    """This process's GPU when there is one (accelerate sets it per rank), else the CPU. Called by
    every torch factory in the trainer's thread, which also fixes that thread's torch thread
    count now: torch reads the process-wide default lazily, once per OS thread, and the reward
    thread changes that default while it scores."""
    torch.get_num_threads()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@contextmanager
def torch_threads(num_threads=None):
    """Run the block with `num_threads` intra-op threads in this OS thread, then restore."""
    num_threads = num_threads or REWARD_THREADS
    with _thread_lock:
        previous = torch.get_num_threads()
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        with _thread_lock:
            torch.set_num_threads(previous)


def to_pil(images):
    """(B, 3, H, W) float [0, 1] -> list of RGB PIL images, rounded to uint8 as published."""
    return [Image.fromarray(array) for array in to_uint8(images)]


def _hub_or_path(arg, default):
    return str(arg) if arg else default


# ---------------------------------------------------------------------------------- preprocessing

# Every model reward turns images into model pixels the way its published code does, written here
# with PIL and torch: no transformers image processor picks a backend for us (transformers >= 5
# switches CLIP/BLIP processors to torchvision when it is importable, another resize), so the same
# image gives the same tensor with or without torchvision.

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalise(pixels, mean, std):
    """(x - mean) / std per channel, in float32 (torchvision's Normalize)."""
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _shortest_edge_size(height, width, size):
    """(height, width) with the shorter side `size` and the longer one truncated to an int, the rule
    of torchvision's Resize(int) and transformers' `shortest_edge` alike."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _uint8_to_pixels(pil_images):
    """RGB PIL images of one size -> (B, 3, H, W) float32 in [0, 1] (torchvision's ToTensor)."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in pil_images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def float_resize_crop(images, size, crop, mean, std):
    """flow_grpo's ClipScorer (`clipscore`, `image_similarity`): the float [0, 1] image, never
    rounded; shorter side to `size` bilinearly with antialiasing (torchvision's Resize on a tensor
    is this `interpolate` call), centre crop at torchvision's rounded offset, normalise."""
    images = images.detach().float().cpu()
    height, width = images.shape[-2:]
    new_size = _shortest_edge_size(height, width, size)
    if new_size != (height, width):
        images = torch.nn.functional.interpolate(images, size=new_size, mode="bilinear", align_corners=False,
                                                 antialias=True)
    top, left = (int(round((n - c) / 2.0)) for n, c in zip(new_size, crop))
    return _normalise(images[..., top:top + crop[0], left:left + crop[1]], mean, std)


def uint8_resize_crop(pil_images, size, crop, mean, std, offset="floor"):
    """The uint8 image resized with PIL's bicubic filter (shorter side to `size`), centre-cropped,
    /255 and normalised: transformers 4.x's CLIPImageProcessor (`pickscore`, `aesthetic`; offset
    (n - c) // 2) and ImageReward's torchvision transform on PIL (`imagereward`; offset rounded)."""
    cropped = []
    for image in pil_images:
        height, width = _shortest_edge_size(image.height, image.width, size)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        if offset == "floor":
            top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
        else:
            top, left = int(round((height - crop[0]) / 2.0)), int(round((width - crop[1]) / 2.0))
        cropped.append(image.crop((left, top, left + crop[1], top + crop[0])))
    return _normalise(_uint8_to_pixels(cropped), mean, std)


def uint8_resize_pad(pil_images, size, mean, std):
    """HPS v2's transform (open_clip `ResizeMaxSize`): longer side to `size` with PIL's bicubic
    filter (sides rounded), black padding to a square (the odd pixel at the bottom/right), /255,
    normalised. Published: an image whose longer side already is `size` is left unpadded, which a
    non-square one then fails in the ViT; it is padded here (square ones are unchanged)."""
    padded = []
    for image in pil_images:
        scale = size / float(max(image.height, image.width))
        height, width = round(image.height * scale), round(image.width * scale)
        if scale != 1.0:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(image.convert("RGB"), ((size - width) // 2, (size - height) // 2))
        padded.append(canvas)
    return _normalise(_uint8_to_pixels(padded), mean, std)


def clip_image_config(path):
    """(shortest edge, (crop height, crop width), mean, std) from a checkpoint's image processor
    config, read as a plain dict (no processor class is built, so no backend is chosen). Legacy
    configs give `size` and `crop_size` as ints."""
    from transformers.image_processing_base import ImageProcessingMixin

    config = ImageProcessingMixin.get_image_processor_dict(str(path))[0]
    size, crop = config.get("size", 224), config.get("crop_size", 224)
    size = size if isinstance(size, int) else size.get("shortest_edge", size.get("height"))
    crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
    mean, std = config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
    return size, crop, tuple(mean), tuple(std)


# ---------------------------------------------------------------------------------------- OCR

def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_target(prompt):
    """The first double-quoted span of the prompt (ALGORITHMS.md §16 #33)."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f"the ocr reward needs the target text in double quotes in every prompt; got {prompt!r}")
    return parts[1]


def ocr_score(recognized, target):
    """Published rule (§12): lower-case, no spaces; d = 0 if the target is a substring of all
    recognised lines joined, else min(Levenshtein, len(target)); score 1 - d/len(target)."""
    recognized = "".join(recognized).replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        return 0.0
    distance = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1.0 - distance / len(target)


# DB text-detector settings: the published PaddleOCR 2.9's (det_db_thresh, det_db_box_thresh,
# det_db_unclip_ratio, use_dilation, det_db_score_mode) and rapidocr's own defaults
OCR_DETECTORS = {
    "paddleocr": {"Det.thresh": 0.3, "Det.box_thresh": 0.6, "Det.unclip_ratio": 1.5, "Det.use_dilation": False,
                  "Det.score_mode": "fast"},
    "rapidocr": {"Det.thresh": 0.3, "Det.box_thresh": 0.5, "Det.unclip_ratio": 1.6, "Det.use_dilation": True,
                 "Det.score_mode": "fast"},
}


def ocr_reward(arg=None):
    """Text rendering: rapidocr (PP-OCR detection + recognition ONNX models shipped in its wheel,
    onnxruntime on CPU or, with onnxruntime-gpu, CUDA) and the published Levenshtein score on the
    first quoted text. Published: PaddleOCR `lang="en"`; here the wheel's PP-OCR recogniser
    (Chinese + English). Lines below confidence 0.5 are dropped, as PaddleOCR's `drop_score`.
    The detector runs with PaddleOCR's settings (`OCR_DETECTORS`); `ocr:rapidocr` keeps
    rapidocr's own (bench/ocr_settings.py compares the two)."""
    detector = arg or "paddleocr"
    if detector not in OCR_DETECTORS:
        raise ValueError(f"ocr takes `ocr` (PaddleOCR's detector settings) or `ocr:rapidocr` (rapidocr's); "
                         f"got ocr:{arg}")
    check_requirements("ocr")
    import onnxruntime
    from rapidocr import RapidOCR

    # published: PaddleOCR(use_angle_cls=False), whose detector resizes only images larger than
    # 960 px (rapidocr's default instead upscales every image to a 736 px short side)
    params = {"Global.log_level": "error", "Global.use_cls": False, "Det.limit_type": "max", "Det.limit_side_len": 960,
              **OCR_DETECTORS[detector],
              "EngineConfig.onnxruntime.intra_op_num_threads": REWARD_THREADS,
              "EngineConfig.onnxruntime.inter_op_num_threads": 1,
              "EngineConfig.onnxruntime.use_cuda": "CUDAExecutionProvider" in onnxruntime.get_available_providers()}
    engine = RapidOCR(params=params)
    engine(Image.new("RGB", (32, 32), "white"))  # loads the detector now: a broken install fails at start-up

    def fn(images, prompts, metadata):
        targets = [ocr_target(p) for p in prompts]
        scores = []
        for image, target in zip(to_pil(images), targets):
            try:
                result = engine(image)
                scores.append(ocr_score(result.txts or (), target))
            except Exception as error:  # published: an OCR failure scores 0; we also say so
                warnings.warn(f"ocr reward: OCR failed ({error!r}); scoring 0")
                scores.append(0.0)
        return {"ocr": np.array(scores, dtype=np.float32)}

    fn.engine = engine  # its detector's settings are what the tests check
    return fn


# ---------------------------------------------------------------------------------- CLIP family

class RewardHead(torch.nn.Module):
    """The LAION aesthetic / ImageReward MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout);
    the layer indices match the published state dicts (`layers.0.weight`, ..., `layers.7.bias`)."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class Clip:
    """A transformers CLIP (any checkpoint in its format) and its tokenizer: L2-normalised image
    embeddings of preprocessed pixels, text embeddings, and the model's logit scale."""

    def __init__(self, model_path, tokenizer_path=None):
        from transformers import AutoTokenizer, CLIPModel

        self.device = reward_device()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        self.model = CLIPModel.from_pretrained(model_path).eval().to(self.device)

    @torch.no_grad()
    def image_embeds(self, pixels):
        embeds = self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output.float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, texts):
        # padded to the longest prompt (flow_grpo's ClipScorer pads to 77: the same embedding, as
        # CLIP's text encoder is causal and pools at the end-of-text token)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        embeds = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                              attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        embeds = embeds.float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def logit_scale(self):
        return float(self.model.logit_scale.detach().exp())


def _text_image_cosine(clip, pixels, prompts):
    with torch_threads():
        return (clip.image_embeds(pixels) * clip.text_embeds(prompts)).sum(-1).cpu().numpy()


def _with_pixels(fn, pixels):
    """The reward fn, carrying the exact preprocessing it applies as `fn.pixels(images, metadata)`
    (the golden tests compare it with the published formulas)."""
    fn.pixels = pixels
    return fn


def clipscore_reward(arg=None):
    """CLIP ViT-L/14: logit_scale·cos(image, prompt) / 30 (logit_scale = 100 for that model;
    the /30 is the published scaling, §16 #28). ≈ 0.8–1.1. Pixels: `float_resize_crop`."""
    path = _hub_or_path(arg, "openai/clip-vit-large-patch14")
    clip, geometry = Clip(path), clip_image_config(path)

    def pixels(images, metadata=None):
        return float_resize_crop(images, *geometry)

    return _with_pixels(lambda images, prompts, metadata: {
        "clipscore": (clip.logit_scale() * _text_image_cosine(clip, pixels(images), prompts) / 30).astype(np.float32)},
        pixels)


PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pickscore_reward(arg=None):
    """PickScore_v1 (a CLIP-H fine-tune) with the CLIP-H processor's geometry and tokenizer:
    exp(logit_scale)·cos / 26 (§12, §16 #28): ≈ 0.8–0.9, x26 the paper's 21.7–23.6. Pixels:
    `uint8_resize_crop` (the published code hands PIL images to CLIPProcessor). `arg`: a local
    PickScore directory; its processor files are used when present, else the CLIP-H hub ones."""
    model_path = _hub_or_path(arg, "yuvalkirstain/PickScore_v1")
    has_processor = arg and any((Path(arg) / f).exists() for f in ("preprocessor_config.json", "processor_config.json"))
    processor_path = model_path if has_processor else PICKSCORE_PROCESSOR
    clip, geometry = Clip(model_path, tokenizer_path=processor_path), clip_image_config(processor_path)

    def pixels(images, metadata=None):
        return uint8_resize_crop(to_pil(images), *geometry)

    return _with_pixels(lambda images, prompts, metadata: {
        "pickscore": (clip.logit_scale() * _text_image_cosine(clip, pixels(images), prompts) / 26).astype(np.float32)},
        pixels)


def hpsv2_reward(arg=None):
    """HPS v2.1: a CLIP ViT-H/14 fine-tuned on human preferences; the score is the raw cosine
    between image and prompt embeddings (hpsv2's `score`), ≈ 0.2–0.35. Pixels: `uint8_resize_pad`
    at the model's image size with open_clip's (OpenAI) mean and std. `arg`: a directory with the
    HPS v2.1 weights in transformers CLIP format; the published file is an open_clip checkpoint
    (`HPS_v2.1_compressed.pt`): convert it once with `convert_hpsv2`."""
    if not arg:
        raise ValueError("hpsv2 needs a local directory: convert HPS_v2.1_compressed.pt once with "
                         "common.reward_models.convert_hpsv2, then `--reward hpsv2:DIR`")
    clip = Clip(arg)
    size = clip.model.config.vision_config.image_size

    def pixels(images, metadata=None):
        return uint8_resize_pad(to_pil(images), size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    return _with_pixels(lambda images, prompts, metadata: {
        "hpsv2": _text_image_cosine(clip, pixels(images), prompts).astype(np.float32)}, pixels)


def open_clip_to_transformers(state):
    """An open_clip CLIP state dict (`visual.transformer.resblocks.0.attn.in_proj_weight`, ...)
    -> transformers `CLIPModel` keys: fused attention projections split into q/k/v, projections
    transposed into linear weights."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        tower, rest = ("vision_model.", key[len("visual."):]) if key.startswith("visual.") else ("text_model.", key)
        if rest.startswith("transformer.resblocks."):
            layer, _, name = rest[len("transformer.resblocks."):].partition(".")
            prefix = f"{tower}encoder.layers.{layer}."
            if name.startswith("attn.in_proj_"):
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.{name.rsplit('_', 1)[1]}"] = chunk.clone()
                continue
            for old, new in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                name = name.replace(old, new)
            out[prefix + name] = value
            continue
        renamed = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                   "visual.class_embedding": "vision_model.embeddings.class_embedding",
                   "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                   "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                   "positional_embedding": "text_model.embeddings.position_embedding.weight",
                   "logit_scale": "logit_scale"}
        if key in renamed:
            out[renamed[key]] = value
        elif key in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.t().contiguous()
        elif key.startswith(("visual.ln_pre.", "visual.ln_post.", "ln_final.")):
            group, _, param = key.rpartition(".")
            target = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
                      "ln_final": "text_model.final_layer_norm"}[group]
            out[f"{target}.{param}"] = value
        elif key != "attn_mask":
            raise KeyError(f"unexpected open_clip key {key!r}")
    return out


def convert_hpsv2(checkpoint, out_dir, base="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
    """Convert the published `HPS_v2.1_compressed.pt` (an open_clip ViT-H-14 checkpoint,
    `{"state_dict": ...}`) to the transformers directory `hpsv2:DIR` loads, with the
    architecture and tokenizer of `base` (the transformers port of the same CLIP-H)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = CLIPModel(CLIPConfig.from_pretrained(base))
    missing, unexpected = model.load_state_dict(open_clip_to_transformers(state.get("state_dict", state)), strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise KeyError(f"HPS checkpoint does not match {base}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)  # pixels come from `uint8_resize_pad`
    return out_dir


AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"


def aesthetic_reward(arg=None):
    """LAION aesthetic predictor v2: CLIP ViT-L/14 image embedding, L2-normalised, through the
    linear-MSE MLP head; raw output ≈ 1–10 (paper 5.4–6.2), not rescaled (§16 #28). Pixels:
    `uint8_resize_crop`, as CLIPProcessor on the published uint8 tensor. `arg`: a directory with
    the CLIP model in transformers format and the head file `sac+logos+ava1-l14-linearMSE.pth`
    (the published torch state dict); without `arg`, CLIP from the hub and the head from env
    CLEANFLOW_AESTHETIC_HEAD."""
    head_path = Path(arg) / AESTHETIC_HEAD if arg else os.environ.get("CLEANFLOW_AESTHETIC_HEAD")
    if not head_path or not Path(head_path).exists():
        raise FileNotFoundError(f"aesthetic needs the LAION head {AESTHETIC_HEAD} (improved-aesthetic-predictor): put "
                                f"it in the directory given as `aesthetic:DIR` or set CLEANFLOW_AESTHETIC_HEAD")
    path = _hub_or_path(arg, "openai/clip-vit-large-patch14")
    clip, geometry = Clip(path), clip_image_config(path)
    head = RewardHead(clip.model.config.projection_dim)
    head.load_state_dict(torch.load(head_path, map_location="cpu", weights_only=True))
    head = head.eval().to(clip.device)

    def pixels(images, metadata=None):
        return uint8_resize_crop(to_pil(images), *geometry)

    def fn(images, prompts, metadata):
        with torch_threads(), torch.no_grad():
            scores = head(clip.image_embeds(pixels(images))).squeeze(1)
        return {"aesthetic": scores.float().cpu().numpy()}

    return _with_pixels(fn, pixels)


def reference_image(meta):
    """The reference of `image_similarity` as a (3, H, W) float [0, 1] tensor: metadata
    `reference_image` or `image`, a path, PIL image or HWC uint8 array (/255, as published), or a
    CHW float tensor (taken as it is, like the images being scored)."""
    ref = meta.get("reference_image", meta.get("image")) if meta else None
    if ref is None:
        raise ValueError("image_similarity needs a reference image in each prompt's metadata "
                         "(`reference_image` or `image`)")
    if isinstance(ref, torch.Tensor):
        return ref.detach().float().cpu()
    if isinstance(ref, (str, Path)):
        ref = Image.open(ref)
    if isinstance(ref, Image.Image):
        ref = np.asarray(ref.convert("RGB"))
    return torch.from_numpy(np.array(ref, dtype=np.uint8)).permute(2, 0, 1).float() / 255


def image_similarity_reward(arg=None):
    """Cosine between the CLIP ViT-L/14 embeddings of the image and its reference image (editing
    recipes), in [-1, 1]. Pixels: `float_resize_crop` for both, as flow_grpo's ClipScorer."""
    path = _hub_or_path(arg, "openai/clip-vit-large-patch14")
    clip, geometry = Clip(path), clip_image_config(path)

    def pixels(images, metadata):
        """(pixels of the images, pixels of their references); references may differ in size."""
        refs = [float_resize_crop(reference_image(meta)[None], *geometry) for meta in metadata]
        return float_resize_crop(images, *geometry), torch.cat(refs)

    def fn(images, prompts, metadata):
        ours, refs = pixels(images, metadata)
        with torch_threads():
            similarity = (clip.image_embeds(ours) * clip.image_embeds(refs)).sum(-1)
        return {"image_similarity": similarity.cpu().numpy().astype(np.float32)}

    return _with_pixels(fn, pixels)


# --------------------------------------------------------------------------------- ImageReward

# ImageReward-v1.0 standardises the head's output with these constants (its ImageReward.py)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_HEAD = "imagereward_head.safetensors"
IMAGEREWARD_IMAGE_SIZE = 224  # ImageReward resizes to 224 (BLIP-large checkpoints on the hub use 384)


def imagereward_reward(arg=None):
    """ImageReward-v1.0: BLIP (ViT-L image encoder, BERT text encoder cross-attending to it) in
    transformers' `BlipForImageTextRetrieval` layout; the text [CLS] state goes through the MLP
    head and is standardised; raw ≈ −2…2. Prompts tokenised to 35 tokens as published. Pixels:
    `uint8_resize_crop` with rounded offsets at the ViT's size and CLIP's mean/std (ImageReward's
    `_transform`). `arg`: the directory `convert_imagereward` writes (model, tokenizer,
    `imagereward_head.safetensors`)."""
    if not arg:
        raise ValueError("imagereward needs a local directory: convert ImageReward.pt once with "
                         "common.reward_models.convert_imagereward, then `--reward imagereward:DIR`")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    device = reward_device()
    tokenizer = AutoTokenizer.from_pretrained(arg)
    model = BlipForImageTextRetrieval.from_pretrained(arg).eval().to(device)
    head = RewardHead(model.config.text_config.hidden_size)
    head.load_state_dict(load_file(str(Path(arg) / IMAGEREWARD_HEAD)))
    head = head.eval().to(device)
    size = model.config.vision_config.image_size

    def pixels(images, metadata=None):
        return uint8_resize_crop(to_pil(images), size, (size, size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, offset="round")

    def fn(images, prompts, metadata):
        with torch_threads(), torch.no_grad():
            tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_states = model.vision_model(pixel_values=pixels(images).to(device)).last_hidden_state
            text_states = model.text_encoder(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
                encoder_hidden_states=image_states,
                encoder_attention_mask=torch.ones(image_states.shape[:-1], dtype=torch.long, device=device),
            ).last_hidden_state
            scores = (head(text_states[:, 0].float()).squeeze(1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        return {"imagereward": scores.cpu().numpy().astype(np.float32)}

    return _with_pixels(fn, pixels)


def imagereward_key_to_transformers(key):
    """A key of the published ImageReward.pt (LAVIS-style BLIP) -> (module, transformers key);
    module is "blip" or "mlp", None for keys transformers has no use for."""
    if key.startswith("mlp."):
        return "mlp", key[len("mlp."):]
    if not key.startswith("blip."):
        return None, key
    key = key[len("blip."):]
    if key.startswith("text_encoder."):
        return "blip", key  # same BERT names in transformers' BlipTextModel
    if not key.startswith("visual_encoder."):
        return None, key  # itm head, projections, momentum encoders: unused by the reward
    key = "vision_model." + key[len("visual_encoder."):]
    for old, new in (("patch_embed.proj", "embeddings.patch_embedding"), ("pos_embed", "embeddings.position_embedding"),
                     ("cls_token", "embeddings.class_embedding"), ("blocks.", "encoder.layers."),
                     ("attn.proj", "self_attn.projection"), ("attn.qkv", "self_attn.qkv"), ("norm1", "layer_norm1"),
                     ("norm2", "layer_norm2"), ("vision_model.norm.", "vision_model.post_layernorm.")):
        key = key.replace(old, new)
    return "blip", key


def convert_imagereward(checkpoint, out_dir, base="Salesforce/blip-itm-large-coco"):
    """Convert the published `ImageReward.pt` to the directory `imagereward:DIR` loads: a
    `BlipForImageTextRetrieval` with the BLIP-large architecture at 224 px (ImageReward's size)
    and its tokenizer from `base`, plus the head. Fails if any vision/text weight is missing."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    blip, mlp = {}, {}
    for key, value in state.items():
        module, new_key = imagereward_key_to_transformers(key)
        if module == "blip":
            blip[new_key] = value
        elif module == "mlp":
            mlp[new_key] = value
    config = BlipConfig.from_pretrained(base)
    config.vision_config.image_size = IMAGEREWARD_IMAGE_SIZE
    model = BlipForImageTextRetrieval(config)
    missing, _ = model.load_state_dict(blip, strict=False)
    missing = [k for k in missing if k.startswith(("vision_model.", "text_encoder.")) and "position_ids" not in k]
    if missing:
        raise KeyError(f"ImageReward checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)  # pixels come from `uint8_resize_crop`
    save_file({k: v.contiguous() for k, v in mlp.items()}, str(Path(out_dir) / IMAGEREWARD_HEAD))
    return out_dir


# ---------------------------------------------------------------------------------- VLM judges

# flow_grpo's rubric (flow_grpo/qwenvl.py) character for character, its line breaks included: the
# model sees these tokens. Flow-OPD's copy unwraps the lines and drops the outer newlines.
QWENVL_TASK = """
Your role is to evaluate the aesthetic quality score of given images.
1. Bad: Extremely blurry, underexposed with significant noise, indiscernible
subjects, and chaotic composition.
2. Poor: Noticeable blur, poor lighting, washed-out colors, and awkward
composition with cut-off subjects.
3. Fair: In focus with adequate lighting, dull colors, decent composition but
lacks creativity.
4. Good: Sharp, good exposure, vibrant colors, thoughtful composition with
a clear focal point.
5. Excellent: Exceptional clarity, perfect exposure, rich colors, masterful
composition with emotional impact.

Please first provide a detailed analysis of the evaluation process, including the criteria for judging aesthetic quality, within the <Thought> tag. Then, give a final score from 1 to 5 within the <Score> tag.
<Thought>
[Analyze the evaluation process in detail here]
</Thought>
<Score>X</Score>
"""
QWENVL_MAX_NEW_TOKENS = 2048  # published; an analysis cut off before its <Score> tag scores 0
# qwen_vl_utils' defaults, which resize every image before the published processor sees it
QWENVL_FACTOR, QWENVL_MIN_PIXELS, QWENVL_MAX_PIXELS = 28, 4 * 28 * 28, 16384 * 28 * 28
QWENVL_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|>{image}<|vision_end|>{task}<|im_end|>\n<|im_start|>assistant\n")


def qwenvl_score(text):
    """`<Score>N</Score>` -> N/5, anything else 0 (published parsing, §12)."""
    match = re.search(r"<Score>(\d+)</Score>", text)
    return float(match.group(1)) / 5 if match else 0.0


def unifiedreward_question(prompt):
    """UnifiedReward's published request text (§13): alignment + quality, 1–5 after "Final Score:"."""
    return ("<image>\nYou are given a text caption and a generated image based on that caption. Your task is to "
            "evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this "
            "image aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, "
            "and attributes as described in the caption.\n2. Overall Image Quality: Examine the visual quality of "
            "this image, including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\n"
            "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as "
            f"follows:\nText Caption: [{prompt}]")


def unifiedreward_score(text):
    """`Final Score: x` (x in 1–5, decimals allowed) -> x/5, anything else 0 (published parsing)."""
    match = re.search(r"Final Score:\s*([1-5](?:\.\d+)?)", text)
    return float(match.group(1)) / 5 if match else 0.0


def png_data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (vLLM, sglang, ...) on the standard
    library: bounded retries and timeouts, and an error, never a silent zero, when the server is
    down or answers malformed JSON. Env CLEANFLOW_VLM_API_KEY sets the bearer token and
    CLEANFLOW_VLM_MODEL the model name (default: the first model the server lists)."""

    def __init__(self, base_url, timeout=120.0, retries=3, max_concurrency=16):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.retries, self.max_concurrency = timeout, retries, max_concurrency
        self.api_key = os.environ.get("CLEANFLOW_VLM_API_KEY")
        self.model = os.environ.get("CLEANFLOW_VLM_MODEL") or self._first_model()  # also checks the server is up

    def _request(self, path, body=None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        last_error = None
        for attempt in range(self.retries):
            request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                if error.code < 500:  # a client error will not go away by retrying
                    raise RuntimeError(f"{self.base_url}{path}: HTTP {error.code}: {error.read()[:300]!r}") from None
                last_error = error
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last_error = error
            except json.JSONDecodeError as error:
                raise RuntimeError(f"{self.base_url}{path}: the server's answer is not JSON ({error})") from None
            if attempt + 1 < self.retries:
                threading.Event().wait(self.backoff(attempt))
        raise RuntimeError(f"reward server {self.base_url}{path} failed after {self.retries} tries: {last_error!r}")

    def backoff(self, attempt):
        """Seconds to wait before retry `attempt + 1`."""
        return min(2.0 ** attempt, 10.0)

    def _first_model(self):
        models = self._request("/models").get("data") or []
        if not models:
            raise RuntimeError(f"{self.base_url}/models lists no model; set CLEANFLOW_VLM_MODEL")
        return models[0]["id"]

    def complete(self, content, max_tokens=None):
        """One user message (a list of OpenAI content parts) -> the reply text, temperature 0;
        `max_tokens` None leaves the server's default (as the published UnifiedReward request)."""
        body = {"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": content}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        answer = self._request("/chat/completions", body)
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"{self.base_url}: malformed chat completion {str(answer)[:300]}") from None

    def complete_all(self, contents, max_tokens=None):
        """One concurrent request per item (published: one request per image)."""
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(contents)))) as pool:
            return list(pool.map(lambda content: self.complete(content, max_tokens), contents))


def _is_url(arg):
    return bool(arg) and str(arg).startswith(("http://", "https://"))


def unifiedreward_reward(arg=None):
    """UnifiedReward-7b-v1.5 behind an OpenAI-compatible server (sglang in the published recipe):
    one request per image (resized to 512x512, PNG data URL), temperature 0, 1–5 "Final Score"
    / 5, in [0, 1]; 0 when the answer has no score. `arg`: the server's `/v1` base URL."""
    client = ChatClient(arg or "http://127.0.0.1:17140/v1")

    def fn(images, prompts, metadata):
        resized = (image.resize((512, 512), Image.Resampling.BICUBIC) for image in to_pil(images))  # PIL's default
        contents = [[{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                     {"type": "text", "text": unifiedreward_question(prompt)}]
                    for image, prompt in zip(resized, prompts)]
        return {"unifiedreward": np.array([unifiedreward_score(t) for t in client.complete_all(contents)],
                                          dtype=np.float32)}

    return fn


def qwenvl_smart_resize(height, width, factor=QWENVL_FACTOR, min_pixels=QWENVL_MIN_PIXELS,
                        max_pixels=QWENVL_MAX_PIXELS):
    """qwen_vl_utils' target size: both sides multiples of `factor` (rounded), scaled down to at
    most `max_pixels` (sides floored) or up to at least `min_pixels` (sides ceiled)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"qwenvl: aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = (math.floor(side / beta / factor) * factor for side in (height, width))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = (math.ceil(side * beta / factor) * factor for side in (height, width))
    return h_bar, w_bar


def qwenvl_resize(image):
    """What qwen_vl_utils' `fetch_image` does to each image of the published scorer: PIL's bicubic
    resize to `qwenvl_smart_resize`. The processor that follows then keeps the size."""
    height, width = qwenvl_smart_resize(image.height, image.width)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def qwenvl_reward(arg=None):
    """Qwen2.5-VL as an aesthetic judge with the published rubric (the prompt text is ignored):
    `<Score>N</Score>` -> N/5, else 0; greedy, at most 2048 new tokens. Images are resized by
    `qwenvl_resize` first, as published, so a server's own resize to Qwen's grid keeps the size.
    `arg`: a local model directory or hub id (transformers, default Qwen/Qwen2.5-VL-7B-Instruct),
    or an http(s) `/v1` URL of an OpenAI-compatible server."""
    if _is_url(arg):
        client = ChatClient(arg)

        def remote(images, prompts, metadata):
            contents = [[{"type": "image_url", "image_url": {"url": png_data_url(qwenvl_resize(image))}},
                         {"type": "text", "text": QWENVL_TASK}] for image in to_pil(images)]
            replies = client.complete_all(contents, max_tokens=QWENVL_MAX_NEW_TOKENS)
            return {"qwenvl": np.array([qwenvl_score(t) for t in replies], dtype=np.float32)}

        return remote

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen2.5-VL's transformers processor cannot be built without torchvision (its video half), so
    # the two halves it combines are used directly: the image processor (PIL backend, named, never
    # chosen by the environment) and the tokenizer, with the chat template's rendering of one image +
    # text written out (the default system turn included) and each image pad expanded to the
    # image's merged patch count, as the processor does.
    path, device = _hub_or_path(arg, "Qwen/Qwen2.5-VL-7B-Instruct"), reward_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")  # generation continues each row's end
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval().to(device)
    merge = image_processor.merge_size ** 2

    def pixels(images, metadata=None):
        """(pixel_values, image_grid_thw) of the published preprocessing."""
        vision = image_processor(images=[qwenvl_resize(image) for image in to_pil(images)], return_tensors="pt")
        return vision["pixel_values"], vision["image_grid_thw"]

    def local(images, prompts, metadata):
        pixel_values, grids = pixels(images)
        texts = [QWENVL_CHAT.format(image="<|image_pad|>" * (int(grid.prod()) // merge), task=QWENVL_TASK)
                 for grid in grids]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        with torch_threads(), torch.no_grad():
            # greedy; the published call samples with the checkpoint's top_k = 1, the same tokens
            generated = model.generate(input_ids=tokens["input_ids"].to(device),
                                       attention_mask=tokens["attention_mask"].to(device),
                                       pixel_values=pixel_values.to(device, dtype), image_grid_thw=grids.to(device),
                                       max_new_tokens=QWENVL_MAX_NEW_TOKENS, do_sample=False)
        replies = tokenizer.batch_decode(generated[:, tokens["input_ids"].shape[1]:], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)
        return {"qwenvl": np.array([qwenvl_score(r) for r in replies], dtype=np.float32)}

    return _with_pixels(local, pixels)
