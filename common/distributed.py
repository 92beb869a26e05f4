"""Sharded training with PyTorch FSDP2 (`fully_shard`): `--fsdp` in an algorithm file.

Each process keeps 1/N of every transformer block's weights, gradients and optimizer state; a
block's weights are all-gathered for its forward and backward and freed after, and gradients are
reduce-scattered (averaged, as DDP does). One code path on CUDA (NCCL) and on CPU (gloo): accelerate
applies its own FSDP plugin only on accelerators, so the algorithm files shard the transformer
themselves and hand accelerate the optimizer alone.

What changes for the loop, and what these helpers do about it:
- parameters become DTensors: shard *before* the optimizer is built and before `params` is taken;
- every collective must be entered by every rank: checkpoint and export states are gathered to
  full tensors on all ranks (`full_state`, `full_optimizer_state`), then the main process writes;
- resume scatters the saved full tensors back into the shards (`load_full_state`,
  `load_full_optimizer_state`), so a sharded run writes and reads the same files as one process.
"""

import atexit

import torch
from torch import nn

if torch.distributed.is_available():
    # Imported before any process group exists, on purpose: torch.distributed.nn.functional binds
    # `group=group.WORLD` as default arguments when first imported, so an import *after*
    # init_process_group (torch._dynamo does it, e.g. when the first optimizer is built) keeps the
    # world group alive past destroy_process_group. Its gloo threads then run into interpreter exit,
    # where one rank now and then aborts ("terminate called without an active exception") after the
    # run has written everything. Every algorithm file imports this module before it starts accelerate.
    import torch.distributed.nn  # noqa: F401


def shard_units(module: nn.Module):
    """The modules FSDP wraps one by one: every entry of each `nn.ModuleList` directly under the
    model (the transformer blocks of SD3, FLUX, Qwen-Image, Wan; the toy's joint blocks)."""
    return [block for child in module.children() if isinstance(child, nn.ModuleList) for block in child]


def shard(module: nn.Module, param_dtype=torch.float32, reshard_after_forward=True):
    """`fully_shard` each block of `module` (`shard_units`), then the root (embeddings, norms, heads).
    In place; returns the module (now an FSDPModule). With a half `param_dtype` the weights are
    all-gathered in it (the frozen base is stored in it, the trainable weights stay fp32 in their
    shards) and gradients are reduced in fp32, as DDP with autocast keeps them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    broadcast_from_main(module)
    policy = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                                  reduce_dtype=torch.float32)
    for block in shard_units(module):
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(module, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return module


@torch.no_grad()
def broadcast_from_main(module: nn.Module):
    """Give every rank the main process's weights and buffers, as DDP does when it wraps a model.
    Each rank would otherwise keep its own slice of its *own* initialisation (a LoRA's A is drawn
    from each rank's seed): the sharded model would be a patchwork of N different inits."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def shard_for_training(adapter, param_dtype, *others):
    """`--fsdp`: shard the adapter's transformer, its frozen base copy (full fine-tuning with a KL)
    and any `others` (flow_dpo's ref copy); returns the trainable parameters, now DTensors, which
    the optimizer must be built on."""
    for module in (adapter.transformer, adapter.frozen_base, *others):
        if module is not None:
            shard(module, param_dtype=param_dtype)
    return [p for p in adapter.transformer.parameters() if p.requires_grad]


def prepare(accelerator, transformer, optimizer, sharded):
    """(the module forwards go through, the optimizer) from `accelerator.prepare`: DDP-wrapped, or,
    sharded, the transformer itself (FSDP reduce-scatters its gradients; accelerate wraps only the
    optimizer)."""
    if accelerator.num_processes > 1:
        atexit.register(release_process_groups)
    if sharded:
        return transformer, accelerator.prepare(optimizer)
    return accelerator.prepare(transformer, optimizer)


OUTLIVED = "cleanflow: a destroyed process group is still referenced at exit (its gloo threads still run)"


def release_process_groups():
    """At exit (atexit, while the interpreter is still whole): drop the last references to the
    process groups, so that they are freed now and not during interpreter teardown.

    `destroy_process_group` (accelerator.end_training) only forgets a group; the C++ object and its
    gloo threads live while anything references it, and DTensor's caches do: the sharding-propagation
    caches (Python and C++), the redistribute planners and `lru_cache`s keyed on DTensorSpecs or
    DeviceMeshes, each of which holds the mesh's groups. Freed during teardown instead, a gloo thread
    that wakes to release its last work can meet a half-finalised interpreter, and the rank aborts
    ("terminate called without an active exception", exit -6) after writing everything — measured
    on 2 of ~6 full CI runs of the 2-process --fsdp tests. Names a surviving group on stderr (Linux):
    in one full CI run 3 of ~40 sharded launches still had one here (a holder not found yet), so the
    multi-process tests do not assert its absence; tests/test_process_group_release.py checks the
    release itself."""
    import functools
    import gc
    import sys

    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import _redistribute
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
        _redistribute.clear_redistribute_planner_cache()
    for name, module in list(sys.modules.items()):
        if not name.startswith("torch.distributed") or module is None:
            continue
        for value in list(vars(module).values()):
            members = ([getattr(v, "__func__", v) for v in vars(value).values()] if isinstance(value, type)
                       else [value])
            for member in members:
                if isinstance(member, functools._lru_cache_wrapper):
                    member.cache_clear()
    gc.collect()
    if not torch.distributed.is_initialized() and gloo_threads():
        print(OUTLIVED, file=sys.stderr, flush=True)


def gloo_threads():
    """Names of this process's native gloo threads (Linux; elsewhere an empty list)."""
    from pathlib import Path

    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        try:
            name = task.read_text().strip()
        except OSError:
            continue
        if "gloo" in name:
            names.append(name)
    return names


def is_sharded(module: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_tensor(value):
    """A DTensor's full value (a collective: every rank must call it); other values as they are."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state(state: dict):
    """{name: tensor} with every DTensor gathered to its full value, detached on the CPU. Call on
    every rank (collectives), in the same order."""
    return {name: full_tensor(value.detach()).to("cpu", copy=True) for name, value in state.items()}


def load_full_state(named_params: dict, state: dict):
    """Copy full tensors `state` into parameters that may be DTensor shards (each rank keeps its
    own slice of the full value; no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, value in state.items():
            param = named_params[name]
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None)
            param.copy_(value)


def full_optimizer_state(model: nn.Module, optimizer):
    """The optimizer's state with full (unsharded) tensors keyed by parameter name, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state):
    """Inverse of `full_optimizer_state`: every rank keeps its slice of each saved full tensor (no
    communication), then the optimizer's own `load_state_dict`. Not torch.distributed.checkpoint's
    `set_optimizer_state_dict`: run from a script's `__main__` it left the sharded model referenced
    through interpreter exit, and with it the process group (see `release_process_groups`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    names = {id(p): name for name, p in model.named_parameters()}
    if len(optimizer.param_groups) != len(state["param_groups"]):
        raise ValueError(f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups, this one "
                         f"{len(optimizer.param_groups)}")
    standard, first = {"state": {}, "param_groups": []}, 0
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        params = group["params"]
        if [names[id(p)] for p in params] != list(saved["params"]):
            raise ValueError("the checkpoint's optimizer trains other parameters than this model's trainable ones")
        standard["param_groups"].append({**saved, "params": list(range(first, first + len(params)))})
        for index, param in enumerate(params, start=first):
            entry = state["state"].get(names[id(param)])
            if entry is None:
                continue
            standard["state"][index] = {
                key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape else value
                for key, value in entry.items()}
        first += len(params)
    optimizer.load_state_dict(standard)


def full_model_state(model: nn.Module):
    """The whole model's state dict with full tensors (for a fully fine-tuned export), on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_launch(fsdp):
    """Launch settings that cannot work, refused before any model loads (`validate`), from what
    `accelerate launch` put in the environment: DeepSpeed (any stage), and accelerate's own FSDP
    plugin in place of `--fsdp`."""
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "from its config file")
        # why not: ZeRO-2 keeps the optimizer state partitioned per rank and ZeRO-3 the weights too,
        # while the checkpoints, the EMA and the LoRA export read full tensors (they would save one
        # rank's slice, or empty placeholders); on CPU accelerate switches DeepSpeed off
        raise ValueError(f"DeepSpeed (ZeRO stage {stage}) is not supported: its partitioned optimizer state "
                         "(ZeRO-2) and weights (ZeRO-3) are not what the checkpoints, EMA and LoRA export read. "
                         "Launch a plain multi-GPU config (configs/accelerate/multi_gpu.yaml) and pass --fsdp: "
                         "it shards weights, gradients and optimizer state as ZeRO-3 does and gathers them to save")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError("accelerate's FSDP plugin (--use_fsdp or an FSDP config) is not how these files shard: "
                         "launch a plain multi-GPU config (configs/accelerate/multi_gpu.yaml) and pass --fsdp"
                         + (" (already given)" if fsdp else ""))
