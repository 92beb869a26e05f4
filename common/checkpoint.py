"""LoRA set-up, training checkpoints (atomic, rotated, resumable) and the final export.

A checkpoint is one directory `checkpoint-XXXXXX/` holding `state.pt` (trainable weights,
optimizer, EMA, RNG states, the epoch and anything else the algorithm passes) and a
`COMPLETE` marker written last. It is written to a temporary name and renamed, so a crash
mid-save leaves the previous checkpoint loadable; `latest` is the newest complete one.

Export writes the LoRA in diffusers format (`pytorch_lora_weights.safetensors` with keys
`transformer.*` and the LoraConfig in its metadata, loadable by `pipe.load_lora_weights`),
the PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`), and on request the
merged full transformer.
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
# the SD3 LoRA loader's save (the same `transformer.*` format for every model of this library);
# the mixin, not the pipeline: importing the pipeline pulls in transformers' image processors
from diffusers.loaders import SD3LoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

CHECKPOINT_PREFIX = "checkpoint-"


def add_lora(transformer, rank, alpha, target_modules, adapter_name="default", init="gaussian"):
    """Add a peft LoRA adapter (base weights frozen); returns its config."""
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    transformer.add_adapter(config, adapter_name=adapter_name)
    return config


def trainable_state(model):
    """The trainable weights by name, full tensors on the CPU (gathered from the shards under
    `--fsdp`: a collective, so every rank calls it)."""
    from common.distributed import full_state

    return full_state({name: p for name, p in model.named_parameters() if p.requires_grad})


def training_state(model, optimizer, ema=None):
    """What a checkpoint holds of the training: trainable weights, optimizer and EMA states, as full
    tensors whether or not the model is sharded, so a sharded run saves the files one process would.
    Call on every rank (gathers under FSDP); the main process writes them."""
    from common.distributed import full_optimizer_state, is_sharded

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return {"trainable": trainable_state(model),
            "optimizer": full_optimizer_state(model, inner) if is_sharded(model) else optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None}


def restore_training_state(model, optimizer, ema, state):
    """Inverse of `training_state` on a freshly built (and possibly sharded) model and optimizer."""
    from common.distributed import is_sharded, load_full_optimizer_state, load_full_state

    load_full_state(dict(model.named_parameters()), state["trainable"])
    if is_sharded(model):
        load_full_optimizer_state(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])


def weights_agree(accelerator, params):
    """1.0 when every rank holds the same trainable weights, else 0.0 (logged as
    `dist/weights_agree`): a fingerprint of the weights in fp64 (their sum, sum of squares and a
    position-weighted sum), gathered and compared exactly. Ranks that stop synchronising (a model
    never wrapped for DDP, a rank that skips a step) show up at the next epoch, not as a silently
    worse curve."""
    from torch.distributed.tensor import DTensor

    # sharded (--fsdp): each weight lives on one rank and every rank all-gathers it from there, so
    # there is no second copy to disagree with (a fingerprint of the gathered weights is equal on
    # every rank by construction, and would cost an all-gather of every trainable weight)
    if accelerator.num_processes == 1 or any(isinstance(p, DTensor) for p in params):
        return 1.0
    flat = torch.cat([p.detach().double().flatten().cpu() for p in params])
    positions = torch.arange(len(flat), dtype=torch.float64).mul_(0.618).sin_()
    fingerprint = torch.stack([flat.sum(), (flat * flat).sum(), (flat * positions).sum()])
    gathered = accelerator.gather(fingerprint[None].to(accelerator.device)).cpu()
    return float(bool((gathered == gathered[0]).all()))


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def checkpoint_dirs(output_dir):
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    dirs = [d for d in root.glob(f"{CHECKPOINT_PREFIX}*") if (d / "COMPLETE").exists() and d.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(resume, output_dir):
    """`latest` -> newest complete checkpoint in output_dir (None if there is none), else a path."""
    if resume is None:
        return None
    if resume == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory (no COMPLETE marker)")
    return path


def save_checkpoint(output_dir, step, state, keep_last=3):
    """Atomically write `state` (a dict of tensors / picklable values) and rotate old ones."""
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    (tmp / "COMPLETE").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path):
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


def lora_state_dict(transformer, adapter_name="default"):
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def _lora_config_dict(config: LoraConfig):
    """LoraConfig as JSON-able data (it holds sets)."""
    out = {}
    for key, value in config.to_dict().items():
        out[key] = sorted(value) if isinstance(value, set) else value
    return out


def export_lora(transformer, directory, adapter_name="default", merged=False, write=True):
    """Diffusers-format LoRA + PEFT adapter (+ merged transformer) of the current weights. Under
    `--fsdp` every rank calls it (the LoRA is gathered from the shards) and only `write` ranks
    write; a merged export needs the unsharded transformer."""
    from common.distributed import full_state

    state = full_state(lora_state_dict(transformer, adapter_name))
    if not write:
        return Path(directory)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = transformer.peft_config[adapter_name]
    # as is: no convert_state_dict_to_diffusers (it drops SD3's attention LoRAs silently), and
    # the config in the metadata (without it, loading assumes lora_alpha == r)
    SD3LoraLoaderMixin.save_lora_weights(directory / "diffusers", transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=config.to_dict())
    peft_dir = directory / "peft"
    peft_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps(_lora_config_dict(config), indent=2))
    if merged:
        import copy

        fused = copy.deepcopy(transformer)
        fused.fuse_lora(adapter_names=[adapter_name])
        fused.unload_lora()
        fused.save_pretrained(directory / "merged_transformer")
    return directory


def save_transformer(transformer, directory, write=True):
    """A fully fine-tuned transformer, loadable with its class's `from_pretrained`. Under `--fsdp`
    every rank calls it (the weights are gathered from the shards) and `write` ranks write the
    config and one safetensors file, the layout `save_pretrained` gives an unsharded model."""
    from common.distributed import full_model_state, is_sharded

    directory = Path(directory)
    if not is_sharded(transformer):
        if write:
            transformer.save_pretrained(directory)
        return directory
    state = full_model_state(transformer)
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        transformer.save_config(directory)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "diffusion_pytorch_model.safetensors"))
    return directory


def export_final(transformer, directory, *, ema=None, use_lora=True, merged=False, write=True):
    """The run's final weights, the EMA's when it kept one: the LoRA (`export_lora`) or, fully fine-
    tuned, the whole transformer (`save_transformer`). Every rank calls it (under `--fsdp` the
    weights are gathered from the shards); `write` ranks write."""
    from contextlib import nullcontext

    import torch.distributed as dist

    with ema.swapped() if ema is not None else nullcontext():
        if use_lora:
            out = export_lora(transformer, directory, merged=merged, write=write)
        else:
            out = save_transformer(transformer, Path(directory) / "transformer", write=write)
    # the ranks leave together: one tearing its process group down while the main one still writes
    # aborted a 2-process gloo run at exit ("terminate called without an active exception", once in
    # five fully fine-tuned --fsdp runs, after every file was written)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


def copy_lora_adapter(transformer, source="default", target="ref"):
    """Copy one peft LoRA adapter's weights into another of the same shape, in place (e.g. the
    learner into the rollout/reference adapter of OnlineDPO); both stay loaded."""
    from peft import set_peft_model_state_dict

    with torch.no_grad():
        result = set_peft_model_state_dict(transformer, lora_state_dict(transformer, source), adapter_name=target)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapters {source!r} and {target!r} differ: {result.unexpected_keys[:3]}")


def resolve_lora(path):
    """(kind, directory) of a LoRA given as our diffusers export, a PEFT adapter directory, a
    training checkpoint, or a run's output directory / its `final/` (-> `final/diffusers`)."""
    root = Path(path)
    for directory in (root, root / "diffusers", root / "final" / "diffusers"):
        if (directory / "pytorch_lora_weights.safetensors").is_file():
            return "diffusers", directory
    if (root / "adapter_config.json").is_file():
        return "peft", root
    if (root / "state.pt").is_file():
        if not (root / "COMPLETE").exists():
            raise FileNotFoundError(f"--lora {path}: an incomplete checkpoint (no COMPLETE marker)")
        return "checkpoint", root
    raise FileNotFoundError(f"--lora {path}: expected a diffusers LoRA (pytorch_lora_weights.safetensors), a PEFT "
                            "adapter (adapter_config.json), a checkpoint (state.pt) or a run directory with final/")


def load_lora(transformer, path, adapter_name="default", default_alpha=None):
    """Load a LoRA (anything `resolve_lora` accepts) into `transformer` as the active adapter.
    A checkpoint's LoRA shapes come from its tensors, its alpha from the run's args
    (`default_alpha`, the adapter's published one, when the run left it unset); a checkpoint
    without LoRA tensors is a full fine-tune and overwrites the weights. EMA weights win when the
    checkpoint has them, as in the run's evaluation and export. Returns the kind loaded."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    kind, directory = resolve_lora(path)
    if kind == "diffusers":
        # reads the LoraConfig from the file's metadata (without it alpha would silently become r)
        transformer.load_lora_adapter(str(directory), prefix="transformer", adapter_name=adapter_name,
                                      weight_name="pytorch_lora_weights.safetensors")
        return kind
    if kind == "peft":
        config = LoraConfig.from_pretrained(str(directory))
        state = load_file(str(directory / "adapter_model.safetensors"))
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}  # peft's save_pretrained
        transformer.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"--lora {path} does not fit this model: {len(result.unexpected_keys)} unexpected and "
                             f"{len(missing)} missing LoRA tensors (e.g. {(result.unexpected_keys + missing)[:2]})")
        return kind
    checkpoint = load_checkpoint(directory)
    trainable = checkpoint["trainable"]
    if checkpoint.get("ema") is not None:
        trainable = dict(zip(trainable, checkpoint["ema"]["shadow"]))  # shadow follows the parameter order
    marker = f".lora_A.{adapter_name}.weight"
    lora_modules = [name[:-len(marker)] for name in trainable if name.endswith(marker)]
    if lora_modules:
        run_args = checkpoint.get("args", {})
        rank = trainable[lora_modules[0] + marker].shape[0]
        alpha = run_args.get("lora_alpha") or default_alpha or rank
        add_lora(transformer, rank, alpha, lora_modules, adapter_name=adapter_name)
    named = dict(transformer.named_parameters())
    unknown = [name for name in trainable if name not in named]
    if unknown:
        raise ValueError(f"--lora {path}: {len(unknown)} checkpoint tensors are not in this model (e.g. {unknown[:2]})")
    with torch.no_grad():
        for name, value in trainable.items():
            named[name].copy_(value)
    return kind
