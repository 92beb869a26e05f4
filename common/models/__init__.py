"""Model adapters by name. Imports are lazy so that an unknown name fails before any heavy
import or weight loading."""

import importlib

ADAPTERS = {
    "toy": "common.models.toy:ToyAdapter",
    "sd3": "common.models.sd3:SD3Adapter",
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
