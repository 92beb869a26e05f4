"""Model adapters by name. Imports are lazy so that an unknown name fails before any heavy
import or weight loading."""

import importlib

ADAPTERS = {
    "toy": "common.models.toy:ToyAdapter",
    "sd3": "common.models.sd3:SD3Adapter",
    "gmm": "common.models.gmm:GMMAdapter",
    "flux": "common.models.flux:FluxAdapter",
    "flux_kontext": "common.models.flux_kontext:FluxKontextAdapter",
    "qwen_image": "common.models.qwen_image:QwenImageAdapter",
    "qwen_image_edit": "common.models.qwen_image_edit:QwenImageEditAdapter",
    "wan": "common.models.wan:WanAdapter",
}

# Each model's published sampling conventions (ALGORITHMS.md §11.2, §15.1): resolution, autocast
# dtype, rollout / evaluation steps, CFG scale and SDE noise level. An algorithm file's preset for a
# model takes these where no recipe of that algorithm was published for the model, and its own
# algorithm fields (batch arithmetic, clip range, beta, lr) from its sd3 recipe. FLUX is guidance-
# distilled (its guidance embedding is the adapter's: 3.5, Kontext 2.5), so no CFG. Wan samples with its
# own SDE (`--sampler wan`, a = 1: g = sigma_min + (sigma_max - sigma_min) * sigma).
# Wan's resolution None: the adapter's (height, width) = (240, 416), 33 frames.
SAMPLING = {
    "flux": dict(resolution=512, mixed_precision="bf16", num_steps=6, eval_num_steps=28, guidance=1.0,
                 eval_guidance=1.0, sampler="flow", noise_level=0.9),
    "flux_kontext": dict(resolution=512, mixed_precision="bf16", num_steps=6, eval_num_steps=28, guidance=1.0,
                         eval_guidance=1.0, sampler="flow", noise_level=0.9),
    "qwen_image": dict(resolution=512, mixed_precision="bf16", num_steps=10, eval_num_steps=50, guidance=4.0,
                       eval_guidance=4.0, sampler="flow", noise_level=1.2, ema=False),
    "qwen_image_edit": dict(resolution=512, mixed_precision="bf16", num_steps=10, eval_num_steps=50, guidance=4.0,
                            eval_guidance=4.0, sampler="flow", noise_level=1.0, ema=False),
    "wan": dict(resolution=None, mixed_precision="bf16", num_steps=20, eval_num_steps=50, guidance=4.5,
                eval_guidance=4.5, sampler="wan", noise_level=1.0),
}


def model_recipe(name, base, **published):
    """Keyword arguments of an algorithm file's `Args` for model `name`: the file's sd3 recipe
    `base` (its algorithm fields), the model's sampling conventions (`SAMPLING`) over it, then the
    values published for this algorithm on this model, where there are any."""
    return {**base, **SAMPLING[name], "model": name, **published}


def check_model_name(name):
    if name not in ADAPTERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ADAPTERS)}")


def get_adapter_class(name):
    check_model_name(name)
    module, cls = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_adapter(name, pretrained=None, device="cpu", dtype=None, resolution=None):
    """The adapter of model `name`, loaded. `resolution`: the run's image size, which becomes the
    adapter's default (its latent shape, and the size editing models resize source images to)."""
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    adapter = get_adapter_class(name).load(pretrained, device=device, dtype=dtype or torch.float32)
    if resolution:
        adapter.default_resolution = resolution
    return adapter


def check_model_inputs(name, pretrained, prompt_spec):
    """Everything about the model that `validate` can check before a model loads: the name, the
    checkpoint (where the adapter can tell), and every train and test prompt against the model's
    vocabulary (closed-vocabulary worlds), each with a one-line error."""
    from common.data import load_prompts, resolve_prompt_file

    adapter = get_adapter_class(name)
    adapter.check_pretrained(pretrained)
    for split in ("train", "test"):
        adapter.check_prompts(load_prompts(prompt_spec, split), resolve_prompt_file(prompt_spec, split))
