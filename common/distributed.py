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

import torch
from torch import nn


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
    if sharded:
        return transformer, accelerator.prepare(optimizer)
    return accelerator.prepare(transformer, optimizer)


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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


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
