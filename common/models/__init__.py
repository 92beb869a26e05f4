"""Model adapters by name. Imports are lazy so that an unknown name fails before any heavy
import or weight loading."""

import importlib

ADAPTERS = {
    "toy": "common.models.toy:ToyAdapter",
    "sd3": "common.models.sd3:SD3Adapter",
    "gmm": "common.models.gmm:GMMAdapter",
}


def check_model_name(name):
    if name not in ADAPTERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ADAPTERS)}")


def get_adapter_class(name):
    check_model_name(name)
    module, cls = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_adapter(name, pretrained=None, device="cpu", dtype=None):
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    return get_adapter_class(name).load(pretrained, device=device, dtype=dtype or torch.float32)


def check_model_inputs(name, pretrained, prompt_spec):
    """Everything about the model that `validate` can check before a model loads: the name, the
    checkpoint (where the adapter can tell), and every train and test prompt against the model's
    vocabulary (closed-vocabulary worlds), each with a one-line error."""
    from common.data import load_prompts, resolve_prompt_file

    adapter = get_adapter_class(name)
    adapter.check_pretrained(pretrained)
    for split in ("train", "test"):
        adapter.check_prompts(load_prompts(prompt_spec, split), resolve_prompt_file(prompt_spec, split))
