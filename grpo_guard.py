# docs: README.md#grpo_guardpy ; paper: https://arxiv.org/abs/2510.22319 (GRPO-Guard), on Flow-GRPO 2505.05470
"""GRPO-Guard: Flow-GRPO with a normalised importance ratio and per-step gradient reweighting.

The problem (Wang et al., 2025). With x' = mu_old + s·xi drawn by the old policy and
d = mu_theta - mu_old, the per-element-mean Gaussian log-ratio is
    dlogp = -mean_D(d²) / (2 s²) + mean_D(d·xi) / s:
its first term is <= 0 and grows as 1/s², so the ratio is biased below 1 (the upper clip is
rarely reached by positive-advantage samples) with a spread that differs by step, and the
proxy reward is over-optimised. The fix, two changes to flow_grpo.py's policy loss:
  RatioNorm  r = exp(s · (dlogp + bias)), bias = mean_D(d²) / (2 s²) per sample, so that
             s·(dlogp + bias) = mean_D(d·xi): zero-mean, equal scale at every step, exactly 1
             on-policy. (The public code averages the bias over the whole micro-batch, one
             scalar: `--bias batch` reproduces it.)
  Reweight   the step's PPO-clip loss is divided by |dt| so every noise level contributes a
             gradient of the same scale.
The rest is Flow-GRPO as in flow_grpo.py: the rollout additionally keeps mu_old per step.

Flow-GRPO's own objective, for reference:

Objective. For each prompt c, sample a group of k images with a stochastic sampler (the SDE
whose marginals match the flow's ODE), score them with a reward R, and give every image the
group-relative advantage A_i = (R_i - mean_group R) / (std R + 1e-4). Every denoising step j of
a trajectory is an action with a Gaussian policy pi_theta(x_{j+1} | x_j, c); maximise the
PPO-clip surrogate  mean_j min(r_j·A, clip(r_j, 1 ± eps)·A),  r_j = pi_theta / pi_old,
minus beta·KL(pi_theta || pi_base) on the transition means, pi_base being the frozen base
model (LoRA disabled). Samplers, log-probs and KL live in common/sde.py; this file is the
algorithm: sampling epoch, advantages, loss, update.

Launch:
    python grpo_guard.py                   # toy world on the CPU
    # one GPU: --model sd3 = the sd3 preset on stabilityai/stable-diffusion-3.5-medium (lower --batch-size
    # to fit; keep group_size dividing batch_size x processes)
    accelerate launch grpo_guard.py --model sd3
        --prompts path/to/geneval --reward geneval:http://127.0.0.1:18090   # GenEval server: see README
    # 8 GPUs on one node
    accelerate launch --multi_gpu --num_processes 8 grpo_guard.py --model sd3 ...
    # the published 32-GPU recipe: 4 nodes, run on each with its --machine_rank
    accelerate launch --multi_gpu --num_machines 4 --num_processes 32 --machine_rank R
        --main_process_ip HOST grpo_guard.py --model sd3 ...
    # 2 CPU processes (gloo); note `--cpu --num_processes 2` silently starts only one
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
        --dynamo_backend no --main_process_port 0 grpo_guard.py
"""

import dataclasses
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from common.cli import parse_with_presets
from common.data import GroupSampler, category_weights, load_prompts
from common.distributed import check_launch
from common.models import check_model_inputs, model_recipe
from common.rewards import parse_reward_spec


@dataclass
class Args:
    # ---- experiment
    exp_name: str = "grpo_guard"
    """name of the run (tracker run name)"""
    preset: Optional[str] = None
    """the preset these defaults came from: `--preset NAME`, else the --model's (listed above the options)"""
    seed: int = 42
    """seeds prompts, initial noise, SDE noise and shuffles (everything is derived from it and the epoch)"""
    output_dir: str = "runs/grpo_guard"
    """metrics.jsonl, checkpoints, grids, the reward curve and the final export go here"""
    num_epochs: int = 1000
    """sampling + training epochs"""
    max_minutes: Optional[float] = 30.0
    """stop after the epoch that exceeds this wall-clock budget (then evaluate and export); None = no limit"""
    resume: Optional[str] = None
    """`latest` (newest complete checkpoint in output_dir) or a checkpoint directory"""
    track: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """experiment tracker (through accelerate); metrics.jsonl is always written"""
    compile: bool = torch.cuda.is_available()
    """torch.compile the SDE step (rollout and training alike); default: on when CUDA is present"""
    eval_every: int = 20
    """evaluate every N epochs (and at epoch 0: the base, and after the last); 0 = never"""
    save_every: int = 10
    """checkpoint every N epochs"""
    keep_checkpoints: int = 2
    """how many checkpoints to keep"""
    grid_every: int = 10
    """write a captioned sample grid every N epochs (from the evaluation images)"""
    export_merged: bool = False
    """also export the merged full transformer at the end"""

    # ---- model
    model: str = "toy"
    """model adapter: toy, gmm (both offline), sd3, flux, flux_kontext, qwen_image, qwen_image_edit or wan;
    without --preset, also its preset (MODEL_PRESETS)"""
    pretrained: Optional[str] = None
    """hub id or local directory (default: the model's checkpoint, listed above the options)"""
    resolution: Optional[int] = None
    """image size in pixels (default: the model's)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """autocast dtype for the transformer; SDE maths always runs in fp32"""
    use_lora: bool = True
    """train a LoRA (peft) instead of all transformer weights"""
    lora_rank: Optional[int] = None
    """LoRA rank (default: the model's published one)"""
    lora_alpha: Optional[int] = None
    """LoRA alpha (default: the model's published one)"""
    fsdp: bool = False
    """shard the transformer over the processes with PyTorch FSDP2 (each keeps 1/N of every block's
    weights, gradients and optimizer state) instead of replicating it with DDP; CUDA or CPU"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in the backward pass (less memory, ~30 % more compute)"""

    # ---- sampling
    prompts: str = "toy"
    """dataset name (toy) or a txt / GenEval jsonl file or a directory with train/test files"""
    reward: str = "shapes"
    """reward spec, e.g. `shapes` or `pickscore=0.5,ocr=0.5` (weights are not normalised)"""
    num_steps: int = 10
    """denoising steps for training rollouts"""
    guidance: float = 4.0
    """CFG scale in rollouts (1 = no CFG)"""
    sampler: Literal["flow", "cps", "dance", "wan"] = "cps"
    """SDE type: flow (Flow-GRPO Eq. 9), cps (coefficients-preserving), dance (DanceGRPO), wan (flow_grpo's
    Wan2.1 SDE: g = a·(sigma_min + (sigma_max - sigma_min)·sigma))"""
    noise_level: float = 0.5
    """a (eta): the SDE noise knob; 0 = ODE"""
    logprob: Literal["exact", "cps_unnormalized"] = "exact"
    """exact Gaussian log-density (mean over dims) or the public CPS surrogate (parity only)"""
    final_step_ode: bool = False
    """take the last step with the ODE (the public code noises it though it is never trained)"""
    batch_size: int = 32
    """images per process per sampling batch"""
    group_size: int = 16
    """images per prompt (k); must divide batch_size x processes"""
    batches_per_epoch: int = 2
    """sampling batches per epoch (nb)"""
    balance_categories: bool = True
    """draw training prompts so every metadata `tag` (GenEval category) is equally likely; the
    toy train split is 73 % `position` while the eval averages the six categories equally"""
    same_latent: bool = False
    """same initial noise for every copy of a prompt (across processes too)"""
    eval_num_steps: int = 20
    """ODE steps for evaluation"""
    eval_guidance: float = 4.0
    """CFG scale for evaluation"""
    eval_images_per_category: int = 64
    """evaluation images per category (GenEval tags), or in total for plain prompts"""
    eval_train: bool = False
    """also evaluate on the training prompts (`eval/train/...`, seeds no rollout draws), beside the test
    prompts (`eval/...`): learning in distribution next to generalisation (on in the toy preset)"""

    # ---- algorithm
    learning_rate: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    clip_range: float = 3e-4
    """PPO clip epsilon on the normalised ratio (its log is ~s times the raw one's: s ≈ 0.1-0.7 here,
    so flow_grpo's toy 1e-3 scaled by a typical s; the published SD3 configs use 2e-6 / 4e-6)"""
    ratio_norm: bool = True
    """RatioNorm: r = exp(s·(dlogp + bias)); False = the raw ratio exp(dlogp) (Flow-GRPO)"""
    bias: Literal["per_sample", "batch"] = "per_sample"
    """RatioNorm bias mean_D(d²)/(2s²) per sample (the paper's intent) or one scalar over the
    micro-batch (the public code, whose mean over an empty dim tuple reduces every dim)"""
    reweight: bool = True
    """divide each step's policy loss by |dt| (equal gradient scale across noise levels)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to ±this"""
    beta: float = 0.0
    """weight of the KL to the frozen base (0 = no reference forward)"""
    kl_convention: Literal["exact", "flowgrpo"] = "exact"
    """exact per-element KL, or the public form without |dt| (published betas assume it)"""
    global_std: bool = False
    """normalise advantages by the std of all rewards (True) or of each group (False)"""
    filter_zero_std: bool = True
    """drop samples whose advantage is exactly 0 (groups with equal rewards)"""
    timestep_fraction: float = 0.99
    """train the first int(num_steps·fraction) steps (the last step never)"""
    train_cfg: bool = True
    """recompute CFG in training (must match rollouts for an on-policy ratio of 1)"""
    train_cfg_detach_uncond: bool = True
    """with CFG in training, no gradient through v_u: w·∇v_c, as published since 2025-07-15 (off: (1 - w)·∇v_u + w·∇v_c)"""
    updates_per_epoch: int = 2
    """optimizer steps per epoch; batches_per_epoch / updates_per_epoch micro-batches each"""
    num_inner_epochs: int = 1
    """passes over each epoch's samples"""
    shuffle: bool = True
    """shuffle samples before splitting them into micro-batches"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    ema: bool = False
    """keep an EMA of the trained weights (used for evaluation and export); the published recipes
    do (the sd3 preset turns it on), but the toy run makes too few optimizer steps for the
    published 8-step cadence: its EMA would still be the base at the first evaluations"""
    ema_every: int = 8
    """update the EMA every N optimizer steps with decay min(0.9, (1+n)/(10+n)) (published: 8)"""
    max_nonfinite_steps: int = 20
    """stop after this many consecutive micro-steps with a non-finite loss"""

    # ---- filled at runtime
    num_processes: int = 1
    """(runtime) number of processes"""
    train_steps: tuple = ()
    """(runtime) the denoising steps that are trained"""
    grad_accumulation: int = 1
    """(runtime) micro-steps per optimizer step: (batches_per_epoch / updates_per_epoch) x len(train_steps)"""


# The published GRPO-Guard SD3.5-M recipe (`*_rationorm`, 16 GPUs): `--preset sd3`: Flow-SDE
# a = 0.7, CFG 4.5, k 24, bs 9, nb 8 with 4 updates, lr 1e-4, per-group std, beta 0, clip 2e-6
# (the OCR config; GenEval / PickScore use 4e-6). Pass your --prompts and --reward.
_SD3 = dict(model="sd3", resolution=512, mixed_precision="fp16", num_steps=10, guidance=4.5, sampler="flow",
            noise_level=0.7, batch_size=9, group_size=24, batches_per_epoch=8, updates_per_epoch=4,
            eval_num_steps=40, eval_guidance=4.5, learning_rate=1e-4, clip_range=2e-6, beta=0.0, global_std=False,
            ema=True, balance_categories=False, eval_every=60, save_every=60, grid_every=60, num_epochs=100000,
            max_minutes=None)
# `--preset gmm`: the gmm world (common/gmm), learning in about a minute on 2 CPU cores: 256 points
# per epoch, no CFG, 512 ODE points per category per evaluation (SE ~0.01). The algorithm fields are
# this file's published ones (scaled to one process); chosen before any run of it was seen.
_GMM = dict(model="gmm", prompts="gmm", reward="gmm_target", num_steps=10, guidance=1.0, eval_num_steps=20,
            eval_guidance=1.0, eval_images_per_category=512, num_epochs=150, max_minutes=2.0, eval_every=25,
            save_every=50, grid_every=50)
PRESETS = {
    # off-policy micro-steps (2 updates per epoch), where RatioNorm acts
    "gmm": Args(**_GMM, exp_name="grpo_guard_gmm", output_dir="runs/grpo_guard_gmm", sampler="flow", noise_level=0.7,
                batch_size=128, group_size=16, batches_per_epoch=2, updates_per_epoch=2, learning_rate=1e-3,
                global_std=False),
    "toy": Args(eval_train=True),
    "sd3": Args(**_SD3),
    # no GRPO-Guard recipe was published for the other model families: the sd3 recipe with each model's sampling
    "flux": Args(**model_recipe("flux", _SD3)),
    "flux_kontext": Args(**model_recipe("flux_kontext", _SD3)),
    "qwen_image": Args(**model_recipe("qwen_image", _SD3)),
    "qwen_image_edit": Args(**model_recipe("qwen_image_edit", _SD3)),
    "wan": Args(**model_recipe("wan", _SD3)),
}


# `--model NAME` without `--preset`: that model's preset here (sd3: the published *_rationorm recipe)
MODEL_PRESETS = {"toy": "toy", "gmm": "gmm", "sd3": "sd3", **{m: m for m in ("flux", "flux_kontext", "qwen_image",
                                                                "qwen_image_edit", "wan")}}


def parse_args(argv=None):
    """`--preset NAME` (or the --model's preset) picks the defaults, then tyro parses the rest on top of them."""
    return parse_with_presets(Args, PRESETS, argv, description=__doc__, model_presets=MODEL_PRESETS)


def validate(args: Args, num_processes: int = 1):
    """Check everything that can be checked before a model loads; errors say what to change."""
    # the model name, its checkpoint and every prompt against its vocabulary (closed-vocabulary worlds)
    check_model_inputs(args.model, args.pretrained, args.prompts)
    check_launch(args.fsdp)  # DeepSpeed or accelerate's FSDP plugin: refused, with what to launch instead
    parse_reward_spec(args.reward)
    if args.batch_size < 1 or args.group_size < 1:
        raise ValueError("--batch-size and --group-size must be positive")
    if (args.batch_size * num_processes) % args.group_size:
        raise ValueError(f"--group-size {args.group_size} must divide --batch-size x processes = "
                         f"{args.batch_size} x {num_processes}; change --group-size or --batch-size")
    if args.batches_per_epoch % args.updates_per_epoch:
        raise ValueError(f"--updates-per-epoch {args.updates_per_epoch} must divide --batches-per-epoch "
                         f"{args.batches_per_epoch}")
    if args.num_steps < 2:
        raise ValueError("--num-steps must be at least 2 (the last step is never trained)")
    if not 0 < args.timestep_fraction <= 1:
        raise ValueError("--timestep-fraction must be in (0, 1]")
    if args.noise_level <= 0:
        raise ValueError("--noise-level must be > 0 for a trainable SDE rollout")
    if args.clip_range <= 0 or args.learning_rate <= 0:
        raise ValueError("--clip-range and --learning-rate must be > 0")
    if args.fsdp and args.export_merged:
        raise ValueError("--export-merged needs the whole transformer on one process: drop it under --fsdp and merge "
                         "the exported LoRA afterwards (python -m common.lora_merge)")
    if args.resume not in (None, "latest") and not (Path(args.resume) / "COMPLETE").exists():
        raise FileNotFoundError(f"--resume {args.resume}: not a complete checkpoint directory")
    train_prompts = load_prompts(args.prompts, "train")  # raises on a missing, empty or malformed file
    if (args.batch_size * num_processes) // args.group_size > len(train_prompts):
        raise ValueError(f"each batch needs {(args.batch_size * num_processes) // args.group_size} distinct prompts "
                         f"but --prompts {args.prompts} has {len(train_prompts)}")
    last = args.num_steps - 1 if args.final_step_ode else args.num_steps
    steps = tuple(j for j in range(int(args.num_steps * args.timestep_fraction)) if j < min(last, args.num_steps - 1))
    if not steps:
        raise ValueError("no denoising step is trained: raise --timestep-fraction or --num-steps")
    micro_batches = args.batches_per_epoch // args.updates_per_epoch
    return dataclasses.replace(args, num_processes=num_processes, train_steps=steps,
                               grad_accumulation=micro_batches * len(steps))


# ------------------------------------------------------------------------------- ALGO LOGIC


def group_advantages(rewards, group_ids, global_std=True, eps=1e-4):
    """A_i = (R_i - mean of i's group) / (std + eps); std over all rewards or over the group
    (population std, ddof 0, as published). A group of one gets A = 0. NaN rewards (samples
    the reward could not score) are left out of every statistic and get A = 0."""
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    valid = np.isfinite(rewards)
    advantages = np.zeros_like(rewards)
    all_std = rewards[valid].std() if valid.any() else 0.0
    for group in np.unique(group_ids):
        members = (group_ids == group) & valid
        values = rewards[members]
        std = all_std if global_std else values.std()
        advantages[members] = (values - values.mean()) / (std + eps)
    return advantages


def zero_std_keep_mask(advantages, num_batches, rng, valid=None):
    """Keep samples with a non-zero advantage; if the kept count is not a multiple of
    `num_batches`, re-enable random dropped samples (advantage 0) until it is (published rule).
    Samples marked not `valid` (unscored) are never kept; if too few valid ones are left to pad,
    random kept ones are dropped down to a multiple instead."""
    advantages = np.asarray(advantages)
    valid = np.ones(len(advantages), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    keep = (advantages != 0) & valid
    dropped = np.flatnonzero(~keep & valid)
    missing = (-int(keep.sum())) % num_batches
    if missing and len(dropped) >= missing:
        keep[rng.choice(dropped, size=missing, replace=False)] = True
    elif missing:
        keep[rng.choice(np.flatnonzero(keep), size=num_batches - missing, replace=False)] = False
    if not keep.any():  # nothing informative at all: train on every valid sample (all A = 0)
        keep = valid.copy()
    return keep


def normalized_log_ratio(log_prob, old_log_prob, mean, old_mean, std, bias="per_sample"):
    """RatioNorm's log-ratio s·(dlogp + bias), bias = mean_D (mu_theta - mu_old)² / (2 s²).

    Per sample this equals mean_D(d·xi) for x' = mu_old + s·xi: exactly 0 on-policy and with no
    1/s scale. `bias="batch"` is the public code's one scalar over the micro-batch, with s the
    batch-mean std. `std` is the (B,) transition std; log-probs are per-element means (B,).
    """
    shape = (-1,) + (1,) * (mean.ndim - 1)
    dims = tuple(range(1, mean.ndim))
    squared = (mean.float() - old_mean.float()) ** 2
    if bias == "per_sample":
        scale = std
        offset = (squared / (2 * std.view(shape) ** 2)).mean(dim=dims)
    elif bias == "batch":
        scale = std.mean().expand_as(std)
        offset = (squared / (2 * scale.view(shape) ** 2)).mean().expand_as(std)
    else:
        raise ValueError(f"unknown bias {bias!r}; choose per_sample or batch")
    return scale * (log_prob - old_log_prob + offset)


def guard_loss(log_ratio, advantages, dt, clip_range, adv_clip_max, reweight=True):
    """PPO-clip on r = exp(log_ratio), divided by |dt| of the step when `reweight` (GRPO-Guard)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if reweight:
        per_sample = per_sample / dt.abs()
    stats = {"ratio": ratio.detach(), "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
             "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean()}
    return per_sample.mean(), stats


def ratio_step_metrics(step_ratios):
    """Per denoising step K, mean and std of the raw ratio (`guard/ratio_mean/t=K`, ...) and of
    the normalised one (`guard/norm_ratio_mean/t=K`, ...) over an epoch's off-policy micro-steps."""
    metrics = {}
    for j, values in step_ratios.items():
        for kind, prefix in (("raw", "guard/ratio"), ("norm", "guard/norm_ratio")):
            if values[kind]:
                flat = torch.cat(values[kind]).double()
                metrics[f"{prefix}_mean/t={j}"] = float(flat.mean())
                metrics[f"{prefix}_std/t={j}"] = float(flat.std(unbiased=False))
    return metrics


# ------------------------------------------------------------------------------- main loop


def main(args: Args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object

    from common import sde

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                              log_with=None if args.track == "none" else args.track,
                              project_config=ProjectConfiguration(project_dir=args.output_dir))
    args = validate(args, accelerator.num_processes)

    from tqdm.auto import tqdm

    from common.checkpoint import (add_lora, export_final, load_checkpoint, resolve_resume, restore_training_state,
                                   rng_states, save_checkpoint, set_rng_states, training_state, weights_agree)
    from common.distributed import prepare, shard_for_training
    from common.ema import EMA
    from common.evaluate import evaluate_in_loop
    from common.models import load_adapter
    from common.models.base import PromptEmbeds
    from common.outputs import MetricsLog, plot_curves, plot_ratio_distribution, read_metrics, write_recipe
    from common.rewards import MultiReward, collect_rewards, gather_reward_metrics
    from common.rollout import derive_seed, initial_latents, noise_schedule, rollout

    main_process, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # the recipe, printed and in config.json, before any weights load
    write_recipe(args, accelerator, ratio_norm=args.ratio_norm, bias=args.bias, reweight=args.reweight)
    sde.use_compile(args.compile)
    torch.manual_seed(args.seed + rank)

    # --- model, LoRA, optimizer
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    adapter = load_adapter(args.model, args.pretrained, device=accelerator.device, dtype=weight_dtype,
                           resolution=args.resolution)
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    if args.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    if args.use_lora:
        add_lora(transformer, args.lora_rank or adapter.lora_rank, args.lora_alpha or adapter.lora_alpha,
                 adapter.lora_target_modules)
    else:
        if args.beta > 0:
            adapter.keep_frozen_copy()
        transformer.requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # trainable weights in fp32 under autocast
        p.data = p.data.float()
    if args.fsdp:  # FSDP2: every block sharded over the processes (common/distributed.py); its weights are now DTensors
        params = shard_for_training(adapter, weight_dtype)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  eps=1e-8)
    accelerator.gradient_accumulation_steps = args.grad_accumulation
    wrapped, optimizer = prepare(accelerator, transformer, optimizer, sharded=args.fsdp)  # DDP, or FSDP's own
    adapter.wrap(wrapped)
    ema = EMA(params, update_every=args.ema_every) if args.ema else None

    # --- data, reward
    train_prompts, test_prompts = load_prompts(args.prompts, "train"), load_prompts(args.prompts, "test")
    reward_fn = MultiReward(parse_reward_spec(args.reward))
    group_sampler = GroupSampler(len(train_prompts), args.batch_size, args.group_size, world, rank, args.seed,
                                 weights=category_weights(train_prompts) if args.balance_categories else None)
    sigmas = adapter.make_sigmas(args.num_steps, args.resolution)
    levels = noise_schedule(args.num_steps, args.noise_level,
                            (0, args.num_steps - 1) if args.final_step_ode else None)
    negative = adapter.negative_embeds() if args.guidance > 1 else None
    train_negative = negative if args.train_cfg else None
    train_guidance = args.guidance if args.train_cfg else 1.0

    # --- resume
    start_epoch, optimizer_step = 0, 0
    resume_dir = resolve_resume(args.resume, output_dir)
    if resume_dir is not None:
        state = load_checkpoint(resume_dir)
        restore_training_state(transformer, optimizer, ema, state)
        set_rng_states(state["rng"])
        start_epoch, optimizer_step = state["epoch"], state["optimizer_step"]
        accelerator.print(f"resumed from {resume_dir} at epoch {start_epoch}")
    log = MetricsLog(output_dir, accelerator, resume_epoch=start_epoch if resume_dir is not None else None)
    if args.track != "none":
        accelerator.init_trackers(args.exp_name, config={k: str(v) for k, v in vars(args).items()})

    # the rollout policy's SDE, for evaluation diagnostics that need it (the gmm world's path KL)
    rollout_sde = dict(sampler=args.sampler, noise_level=args.noise_level, num_steps=args.num_steps,
                       guidance=args.guidance)

    def run_eval(epoch):  # ODE samples of the test prompts (eval/...) and, with --eval-train, the training ones
        return evaluate_in_loop(adapter, reward_fn, test_prompts, train_prompts if args.eval_train else None, args,
                                epoch=epoch, ema=ema, output_dir=output_dir, main_process=main_process, sde=rollout_sde)

    executor = ThreadPoolExecutor(max_workers=1)
    step_ratios = {}  # the epoch's off-policy ratios per denoising step; the last epoch's are plotted
    start_time, nonfinite_streak = time.time(), 0
    epoch = start_epoch
    for epoch in range(start_epoch, args.num_epochs):
        epoch_start = time.time()
        metrics = {}
        if args.eval_every > 0 and epoch % args.eval_every == 0:
            metrics.update(run_eval(epoch))
        transformer.eval()
        sampling_start = time.time()

        # --- sampling: rollouts with SDE log-probs; rewards computed while the next batch samples
        samples, futures, drawn, rollout_s = [], [], [], 0.0
        for i in tqdm(range(args.batches_per_epoch), desc=f"epoch {epoch}: sampling", disable=not main_process,
                      leave=False):
            group_sampler.set_epoch(epoch * args.batches_per_epoch + i)
            indices = group_sampler.indices()
            drawn.append(group_sampler.global_indices())
            batch = [train_prompts[j] for j in indices]
            embeds = adapter.encode_prompts(batch)
            if args.same_latent:  # every copy of a prompt, on any rank, starts from the same x_T
                seeds = [derive_seed(args.seed, epoch, i, j) for j in indices]
            else:
                seeds = [derive_seed(args.seed, epoch, i, rank * args.batch_size + k) for k in range(len(batch))]
            latents = initial_latents(adapter.latent_shape(len(batch), args.resolution), seeds)
            noise = torch.Generator().manual_seed(derive_seed(args.seed, epoch, i, rank, "sde"))
            rollout_start = time.time()
            with accelerator.autocast():
                trajectory = rollout(adapter, embeds, sigmas, latents, negative=negative, guidance=args.guidance,
                                     noise_level=args.noise_level, sampler=args.sampler, generator=noise,
                                     logprob=args.logprob, keep_means=True,
                                     sde_window=(0, args.num_steps - 1) if args.final_step_ode else None)
            rollout_s += time.time() - rollout_start
            futures.append(executor.submit(reward_fn, trajectory.images, [p.text for p in batch],
                                           [p.metadata for p in batch]))
            samples.append({"embeds": embeds, "latents": trajectory.latents, "log_probs": trajectory.log_probs,
                            "means": trajectory.means, "indices": torch.tensor(indices)})
        rewards = collect_rewards(futures, accelerator)
        sampling_s = time.time() - sampling_start

        # --- advantages over the gathered epoch (groups keyed by dataset index), this rank's slice.
        # An unscored sample (NaN reward: a remote reward with on_error=drop) gets advantage 0 and
        # is never trained on.
        all_reward, scored, reward_metrics = gather_reward_metrics(rewards, accelerator, epoch)
        metrics.update(reward_metrics)
        all_ids = accelerator.gather(torch.cat([s["indices"] for s in samples]).to(accelerator.device)).cpu().numpy()
        advantages = group_advantages(all_reward, all_ids, args.global_std)
        per_rank = len(all_reward) // world
        advantages = torch.tensor(advantages[rank * per_rank:(rank + 1) * per_rank], dtype=torch.float32)
        local_valid = scored[rank * per_rank:(rank + 1) * per_rank]
        # distributed bookkeeping: every rank must have drawn the same global prompt list, and the
        # gathered groups must be complete (a multiple of group_size per prompt)
        views = gather_object([drawn]) if world > 1 else [drawn]
        metrics["dist/num_processes"] = world
        metrics["dist/weights_agree"] = weights_agree(accelerator, params)  # after the last update
        metrics["dist/ranks_agree"] = float(all(view == views[0] for view in views))
        metrics["dist/complete_groups"] = float(all(c % args.group_size == 0 for c in np.unique(all_ids, return_counts=True)[1]))
        epoch_rng = np.random.default_rng([args.seed, epoch, rank])
        keep = (zero_std_keep_mask(advantages.numpy(), args.batches_per_epoch, epoch_rng, local_valid)
                if args.filter_zero_std else local_valid.copy())
        metrics["train/zero_std_frac"] = float(
            accelerator.gather(torch.tensor([float((advantages == 0).float().mean())], device=accelerator.device)).mean())

        # flatten the epoch's batches into per-sample tensors, keep the informative ones
        flat = {"embeds": PromptEmbeds.cat([s["embeds"] for s in samples]),
                "latents": torch.cat([s["latents"] for s in samples]),
                "log_probs": torch.cat([s["log_probs"] for s in samples]),
                "means": torch.cat([s["means"] for s in samples]), "advantages": advantages}
        keep_index = torch.from_numpy(np.flatnonzero(keep))
        flat = {k: v[keep_index] for k, v in flat.items()}

        # --- training: one accelerate micro-step per (micro-batch, trained step)
        transformer.train()
        stats = {"loss": [], "ratio": [], "approx_kl": [], "clipfrac": [], "kl": []}
        step_ratios = {j: {"raw": [], "norm": []} for j in args.train_steps}  # per denoising step, off-policy
        on_policy_dev = []
        micro_batch = len(keep_index) // args.batches_per_epoch
        train_start = time.time()
        for inner in range(args.num_inner_epochs):
            order = (torch.randperm(len(keep_index), generator=torch.Generator().manual_seed(
                derive_seed(args.seed, epoch, inner, rank, "shuffle"))) if args.shuffle else torch.arange(len(keep_index)))
            first_update = inner == 0
            bar = tqdm(total=args.batches_per_epoch * len(args.train_steps), desc=f"epoch {epoch}: training",
                       disable=not main_process, leave=False)
            for b in range(args.batches_per_epoch):
                rows = order[b * micro_batch:(b + 1) * micro_batch]
                embeds = flat["embeds"][rows]
                x_all, old_all, adv = flat["latents"][rows], flat["log_probs"][rows], flat["advantages"][rows]
                for j in args.train_steps:
                    with accelerator.accumulate(wrapped):
                        if args.fsdp:  # LoRA: accumulate locally, reduce once per update as DDP does (bitwise equal);
                            # full weights: reduce-scatter every micro-step (unsharded gradients would not fit)
                            wrapped.set_requires_gradient_sync(accelerator.sync_gradients or not args.use_lora)
                        with accelerator.autocast():
                            velocity = adapter.predict_velocity(x_all[:, j], sigmas[j].expand(len(rows)), embeds,
                                                                train_negative, train_guidance,
                                                                detach_uncond=args.train_cfg_detach_uncond)
                        out = sde.sde_step(velocity, x_all[:, j], j, sigmas, float(levels[j]), args.sampler,
                                           prev_sample=x_all[:, j + 1], logprob=args.logprob)
                        raw_log_ratio = out.log_prob - old_all[:, j]
                        log_ratio = (normalized_log_ratio(out.log_prob, old_all[:, j], out.mean, flat["means"][rows, j],
                                                          out.std, args.bias) if args.ratio_norm else raw_log_ratio)
                        policy_loss, step_stats = guard_loss(log_ratio, adv.to(out.log_prob.device), out.dt,
                                                             args.clip_range, args.adv_clip_max, args.reweight)
                        if not first_update:  # on-policy micro-steps have r = 1 exactly: log the others
                            step_ratios[j]["raw"].append(torch.exp(raw_log_ratio.detach()))
                            step_ratios[j]["norm"].append(step_stats["ratio"])
                        loss = policy_loss
                        if args.beta > 0:
                            with torch.no_grad(), adapter.reference(), accelerator.autocast():
                                ref_velocity = adapter.predict_velocity(x_all[:, j], sigmas[j].expand(len(rows)),
                                                                        embeds, train_negative, train_guidance)
                            ref = sde.sde_step(ref_velocity, x_all[:, j], j, sigmas, float(levels[j]), args.sampler,
                                               prev_sample=x_all[:, j + 1], logprob=args.logprob)
                            kl = sde.transition_kl(out.mean, ref.mean, out, args.kl_convention).mean()
                            loss = loss + args.beta * kl
                            stats["kl"].append(kl.item())
                        if not torch.isfinite(loss):
                            # keep every rank's backward count equal (DDP) with a zero-gradient loss
                            nonfinite_streak += 1
                            warnings.warn(f"non-finite loss at epoch {epoch}, step {j}: skipped "
                                          f"({nonfinite_streak} in a row)")
                            loss = sum(p.sum() * 0 for p in params)
                        else:
                            nonfinite_streak = 0
                            stats["loss"].append(loss.item())
                            stats["ratio"].append(step_stats["ratio"].mean().item())
                            stats["approx_kl"].append(step_stats["approx_kl"].item())
                            stats["clipfrac"].append(step_stats["clipfrac"].item())
                        if first_update:
                            on_policy_dev.append((step_stats["ratio"] - 1).abs().max().item())
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        if accelerator.sync_gradients:
                            first_update = False
                            if ema is not None:
                                ema.step(optimizer_step)
                            optimizer_step += 1
                    bar.update(1)
                    if nonfinite_streak >= args.max_nonfinite_steps:
                        accelerator.end_training()
                        raise SystemExit(f"stopping: {nonfinite_streak} consecutive non-finite losses at epoch "
                                         f"{epoch}; the last checkpoint in {output_dir} is intact")
            bar.close()
        train_s = time.time() - train_start

        # --- epoch metrics, checkpoint
        def mean(values):
            return float(np.mean(values)) if values else float("nan")

        epoch_s = time.time() - epoch_start
        metrics.update({"train/loss": mean(stats["loss"]), "train/ratio_mean": mean(stats["ratio"]),
                        "train/ratio_dev_max": max(on_policy_dev) if on_policy_dev else float("nan"),
                        "train/approx_kl": mean(stats["approx_kl"]), "train/clipfrac": mean(stats["clipfrac"]),
                        "train/kl": mean(stats["kl"]) if args.beta > 0 else 0.0,
                        **ratio_step_metrics(step_ratios),
                        "perf/epoch_s": epoch_s, "perf/sampling_s": sampling_s, "perf/rollout_s": rollout_s,
                        "perf/train_s": train_s,
                        "perf/images_per_s": args.batches_per_epoch * args.batch_size * world / sampling_s,
                        "perf/wall_min": (time.time() - start_time) / 60})
        record = log.log(epoch, metrics)
        if main_process:
            accelerator.print({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                               if k.startswith(("epoch", "reward/mean", "train/loss", "train/ratio_dev", "eval/acc",
                                                "perf/epoch"))})
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.num_epochs:
            state = training_state(transformer, optimizer, ema)  # on every rank: gathered from the shards under --fsdp
            if main_process:
                save_checkpoint(output_dir, epoch + 1, {
                    "epoch": epoch + 1, "optimizer_step": optimizer_step, **state, "rng": rng_states(),
                    "args": dataclasses.asdict(args)}, keep_last=args.keep_checkpoints)
            accelerator.wait_for_everyone()
        if args.max_minutes is not None and (time.time() - start_time) / 60 > args.max_minutes:
            epoch += 1
            break
    else:
        epoch = args.num_epochs

    # --- final evaluation, curves, export (EMA weights)
    if args.eval_every > 0 and (epoch > start_epoch or start_epoch == args.num_epochs):
        final = run_eval(epoch)
        log.log(epoch, {**final, "perf/wall_min": (time.time() - start_time) / 60})
    executor.shutdown()
    if main_process:
        history = read_metrics(output_dir / "metrics.jsonl")
        series = {"train reward (SDE)": ([r["epoch"] for r in history if r.get("reward/mean") is not None],
                                         [r["reward/mean"] for r in history if r.get("reward/mean") is not None])}
        evals = [r for r in history if r.get("eval/reward_mean") is not None]
        series["eval reward (ODE, test)"] = ([r["epoch"] for r in evals], [r["eval/reward_mean"] for r in evals])
        if evals and "eval/accuracy" in evals[0]:
            series["eval accuracy (ODE, test)"] = ([r["epoch"] for r in evals], [r["eval/accuracy"] for r in evals])
        plot_curves(output_dir / "reward_curve.png", series, title=args.exp_name)
        if args.eval_every > 0 and not args.fsdp:  # the model's own end-of-run figures (gmm: the optimal
            # frontier); they run forwards on this process alone, which sharded weights cannot
            adapter.report(output_dir, history, reward_fn, test_prompts, seed=args.seed, num_steps=args.eval_num_steps,
                           guidance=args.eval_guidance, images_per_category=args.eval_images_per_category)
        if any(values["raw"] for values in step_ratios.values()):  # the last epoch's per-step distribution
            plot_ratio_distribution(output_dir / "ratio_distribution.png",
                                    {j: {kind: torch.cat(v).cpu().numpy() if v else [] for kind, v in values.items()}
                                     for j, values in step_ratios.items()}, title=args.exp_name)
    # every rank: under --fsdp the weights are gathered from the shards, the main process writes
    export_final(transformer, output_dir / "final", ema=ema, use_lora=args.use_lora, merged=args.export_merged,
                 write=main_process)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    args = parse_args()
    try:
        validate(args)  # fail fast on bad arguments, before accelerate or any model starts
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    main(args)
