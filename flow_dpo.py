# docs: README.md#flow_dpopy ; paper: https://arxiv.org/abs/2505.05470 (§5 baselines), https://arxiv.org/abs/2311.12908
"""Flow-DPO, OnlineDPO, SFT and OnlineSFT for flow-matching text-to-image models (the baselines
of Flow-GRPO, Liu et al., 2025; the DPO loss is Diffusion-DPO's, Wallace et al., 2023).

Objective. Two policies share the base model: the `learner` (trained) and the `ref`, which
generates the data. For each prompt c the ref samples a group of k images; only the final clean
sample x0 is kept and scored with a reward R. Every `ref_update_every` optimizer steps the
learner's weights are copied into the ref: never = offline (DPO, SFT), every ~40 steps = online
(OnlineDPO, OnlineSFT). Training is flow matching without CFG on x_s = (1 - s)·x0 + s·eps,
target v* = eps - x0, s = shift(u) with u ~ logit-normal(0, 1).
- DPO: per group the winner w = argmax R and the loser l = argmin R (all equal: index 1 wins,
  index 0 loses, as published); winner and loser share eps and s. With the per-sample errors
  e = mean_D (v(x_s) - v*)² of the learner (theta) and of the ref,
      z = -(beta/2)·[(e_theta,w - e_ref,w) - (e_theta,l - e_ref,l)],   L = mean -log sigmoid(z):
  the learner must lower its error on the winner more than on the loser, relative to the ref.
  beta = 100 as published (small beta collapses). z > 0 is a correctly ranked pair.
- SFT: A = 1 for the best image(s) of each group; L = mean A·mean_D (v_theta - v*)² plus, with
  beta > 0, beta·mean_D (v_theta - v_base)² (velocity KL to the frozen base, LoRA disabled).
Rollouts and rewards reuse common/ (rollout, reward registry, group sampler); this file is the
algorithm: sampling with the ref, pair/best selection, the two losses, the ref refresh.

Launch:
    python flow_dpo.py                                        # toy world on the CPU: OnlineDPO
    python flow_dpo.py --preset online_sft                    # toy OnlineSFT (also: dpo, sft)
    OMP_NUM_THREADS=1 python bench/flow_dpo_learning.py       # the four toy variants + plot
    # one GPU, the published recipes: --model sd3 = sd3_online_dpo on stabilityai/stable-diffusion-3.5-medium
    # (--preset sd3_dpo, sd3_sft, sd3_online_sft for the others)
    accelerate launch flow_dpo.py --model sd3
        --prompts path/to/geneval --reward geneval:http://127.0.0.1:18090   # GenEval server: see README
    # 8 GPUs on one node / the published multi-node set-up: as flow_grpo.py
    accelerate launch --multi_gpu --num_processes 8 flow_dpo.py --model sd3 ...
    # 2 CPU processes (gloo); note `--cpu --num_processes 2` silently starts only one
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
        --dynamo_backend no --main_process_port 0 flow_dpo.py
"""

import copy
import dataclasses
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import parse_with_presets
from common.data import GroupSampler, category_weights, load_prompts
from common.distributed import check_launch
from common.models import SAMPLING, check_model_inputs, model_recipe
from common.rewards import parse_reward_spec


@dataclass
class Args:
    # ---- experiment
    exp_name: str = "flow_dpo"
    """name of the run (tracker run name)"""
    preset: Optional[str] = None
    """the preset these defaults came from: `--preset NAME`, else the --model's (listed above the options)"""
    seed: int = 42
    """seeds prompts, initial noise, training noise/timesteps and padding (derived from it and the epoch)"""
    output_dir: str = "runs/flow_dpo"
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
    """torch.compile the SDE step of the rollouts; default: on when CUDA is present"""
    eval_every: int = 20
    """evaluate every N epochs (and at epoch 0: the base, and after the last); 0 = never"""
    save_every: int = 20
    """checkpoint every N epochs"""
    keep_checkpoints: int = 2
    """how many checkpoints to keep"""
    grid_every: int = 20
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
    """autocast dtype for the transformer; sampler maths always runs in fp32"""
    use_lora: bool = True
    """train a LoRA (peft; the ref is a second adapter) instead of all weights (the ref is a frozen copy)"""
    lora_rank: Optional[int] = None
    """LoRA rank (default: the model's published one)"""
    lora_alpha: Optional[int] = None
    """LoRA alpha (default: the model's published one)"""
    fsdp: bool = False
    """shard the transformer over the processes with PyTorch FSDP2 (each keeps 1/N of every block's
    weights, gradients and optimizer state) instead of replicating it with DDP; CUDA or CPU"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in the backward pass (less memory, ~30 % more compute)"""

    # ---- sampling (by the ref policy)
    prompts: str = "toy"
    """dataset name (toy) or a txt / GenEval jsonl file or a directory with train/test files"""
    reward: str = "shapes"
    """reward spec, e.g. `shapes` or `pickscore=0.5,ocr=0.5` (weights are not normalised)"""
    num_steps: int = 10
    """denoising steps for the ref's rollouts"""
    guidance: float = 4.0
    """CFG scale in rollouts (1 = no CFG); training never uses CFG"""
    sampler: Literal["flow", "cps", "dance", "wan"] = "flow"
    """SDE type of the rollouts (when noise_level > 0): flow, cps, dance or wan"""
    noise_level: float = 0.0
    """a (eta): rollout SDE noise; 0 = Euler ODE. Published: flow SDE 0.7; the toy default is the ODE
    because SDE noise costs this pixel-space model half its accuracy (TOY_FEASIBILITY.md) and only
    the final image is kept, so the rollout need not be stochastic"""
    batch_size: int = 32
    """images per process per sampling batch"""
    group_size: int = 8
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
    algorithm: Literal["dpo", "sft"] = "dpo"
    """dpo: Diffusion-DPO on (best, worst) pairs; sft: flow matching on each group's best image(s)"""
    ref_update_every: Optional[int] = 4
    """copy the learner into the ref every N optimizer steps (online); None = never (offline)"""
    learning_rate: float = 3e-4
    """AdamW learning rate (toy: 1e-3 halved OnlineSFT's test accuracy in 20 epochs; a no-CFG update
    of the conditional velocity is amplified ~guidance-fold in the CFG sampler that rolls out and
    evaluates, and online it compounds: see README, flow_dpo.py on the toy world)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    beta: float = 100.0
    """dpo: the preference temperature (published 100); sft: weight of the velocity KL to the base (0 = none)"""
    timestep_samples: int = 8
    """fresh (noise, timestep) draws per training sample and micro-batch, accumulated into one update
    (published: int(40·0.99) = 39 for dpo, 1 for sft)"""
    logit_mean: float = 0.0
    """mean of the logit-normal timestep density"""
    logit_std: float = 1.0
    """std of the logit-normal timestep density"""
    skip_ties: bool = True
    """drop groups whose rewards are all equal (kept only if every group is tied). Published (the
    sd3 presets): dpo keeps them with the index-1 rule, sft trains on all their images (A = 1). On the
    toy the partial-credit reward is coarse: ~40 % of images were "best", mostly all-failed groups"""
    updates_per_epoch: int = 2
    """optimizer steps per epoch; batches_per_epoch / updates_per_epoch micro-batches each"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    ema: bool = False
    """keep an EMA of the trained weights (used for evaluation and export); the sd3 presets turn it on
    as published; the toy run makes too few optimizer steps for the published 8-step cadence"""
    ema_every: int = 8
    """update the EMA every N optimizer steps with decay min(0.9, (1+n)/(10+n)) (published: 8)"""
    max_nonfinite_steps: int = 20
    """stop after this many consecutive micro-steps with a non-finite loss"""

    # ---- filled at runtime
    num_processes: int = 1
    """(runtime) number of processes"""
    grad_accumulation: int = 1
    """(runtime) micro-steps per optimizer step: (batches_per_epoch / updates_per_epoch) x timestep_samples"""


# The published SD3.5-M recipes (flow_grpo `dpo` / `sft` configs): pass your --prompts and
# --reward. 24 images per GPU = one group, one pair and one optimizer step per epoch (nb = G = 1);
# online = ref refreshed every 40 steps, offline = never (public code: 10^7).
_SD3 = dict(model="sd3", resolution=512, mixed_precision="fp16", num_steps=40, guidance=4.5, sampler="flow",
            noise_level=0.7, batch_size=24, group_size=24, batches_per_epoch=1, updates_per_epoch=1,
            eval_num_steps=40, eval_guidance=4.5, learning_rate=3e-4, beta=100.0, ema=True,
            balance_categories=False, skip_ties=False, eval_every=60, save_every=60, grid_every=60, num_epochs=100000,
            max_minutes=None)
# `--preset gmm`: the gmm world (common/gmm), learning in about a minute on 2 CPU cores: 256 points
# per epoch, no CFG, 512 ODE points per category per evaluation (SE ~0.01). The algorithm fields are
# this file's published ones (scaled to one process); chosen before any run of it was seen.
_GMM = dict(model="gmm", prompts="gmm", reward="gmm_target", num_steps=10, guidance=1.0, eval_num_steps=20,
            eval_guidance=1.0, eval_images_per_category=512, num_epochs=150, max_minutes=2.0, eval_every=25,
            save_every=50, grid_every=50)
# The toy benchmark (bench/flow_dpo_learning.py): Args() is OnlineDPO.
PRESETS = {
    "gmm": Args(**_GMM, exp_name="online_dpo_gmm", output_dir="runs/online_dpo_gmm", batch_size=256, group_size=16,
                batches_per_epoch=1, updates_per_epoch=1, learning_rate=1e-3),
    "gmm_online_sft": Args(**_GMM, exp_name="online_sft_gmm", output_dir="runs/online_sft_gmm", algorithm="sft",
                           beta=0.0, batch_size=256, group_size=16, batches_per_epoch=1, updates_per_epoch=1,
                           learning_rate=1e-3),
    "toy": Args(eval_train=True),
    "online_dpo": Args(exp_name="online_dpo", output_dir="runs/online_dpo"),
    "dpo": Args(exp_name="dpo", output_dir="runs/dpo", ref_update_every=None),
    "online_sft": Args(exp_name="online_sft", output_dir="runs/online_sft", algorithm="sft", beta=0.0),
    "sft": Args(exp_name="sft", output_dir="runs/sft", algorithm="sft", beta=0.0, ref_update_every=None),
    "sd3_dpo": Args(**_SD3, algorithm="dpo", timestep_samples=39, ref_update_every=None),
    "sd3_online_dpo": Args(**_SD3, algorithm="dpo", timestep_samples=39, ref_update_every=40),
    "sd3_sft": Args(**_SD3, algorithm="sft", timestep_samples=1, ref_update_every=None),
    "sd3_online_sft": Args(**_SD3, algorithm="sft", timestep_samples=1, ref_update_every=40),
}
# no DPO / SFT recipe was published for the other model families: OnlineDPO as sd3's, with each model's
# sampling (every rollout step but the last a DPO timestep, as for sd3)
PRESETS.update({f"{m}_online_dpo": Args(**model_recipe(m, _SD3, algorithm="dpo", ref_update_every=40,
                                                       timestep_samples=SAMPLING[m]["num_steps"] - 1))
                for m in ("flux", "flux_kontext", "qwen_image", "qwen_image_edit", "wan")})


# `--model NAME` without `--preset`: that model's OnlineDPO preset here, as the toy default is
# (sd3: the published online `dpo` recipe; --preset sd3_dpo / sd3_sft / sd3_online_sft for the others)
MODEL_PRESETS = {"toy": "toy", "gmm": "gmm", "sd3": "sd3_online_dpo", **{m: f"{m}_online_dpo" for m in (
    "flux", "flux_kontext", "qwen_image", "qwen_image_edit", "wan")}}


def parse_args(argv=None):
    """`--preset NAME` (or the --model's preset) picks the defaults, then tyro parses the rest on top of them."""
    return parse_with_presets(Args, PRESETS, argv, description=__doc__, model_presets=MODEL_PRESETS)


def validate(args: Args, num_processes: int = 1):
    """Check everything that can be checked before a model loads; errors say what to change."""
    # the model name, its checkpoint and every prompt against its vocabulary (closed-vocabulary worlds)
    check_model_inputs(args.model, args.pretrained, args.prompts)
    check_launch(args.fsdp)  # DeepSpeed or accelerate's FSDP plugin: refused, with what to launch instead
    parse_reward_spec(args.reward)
    if args.batch_size < 1 or args.group_size < 2:
        raise ValueError("--batch-size must be positive and --group-size at least 2 (a pair needs two images)")
    if (args.batch_size * num_processes) % args.group_size:
        raise ValueError(f"--group-size {args.group_size} must divide --batch-size x processes = "
                         f"{args.batch_size} x {num_processes}; change --group-size or --batch-size")
    if args.batches_per_epoch % args.updates_per_epoch:
        raise ValueError(f"--updates-per-epoch {args.updates_per_epoch} must divide --batches-per-epoch "
                         f"{args.batches_per_epoch}")
    if args.fsdp and args.export_merged:
        raise ValueError("--export-merged needs the whole transformer on one process: drop it under --fsdp and merge "
                         "the exported LoRA afterwards (python -m common.lora_merge)")
    if args.num_steps < 1:
        raise ValueError("--num-steps must be at least 1")
    if args.noise_level < 0:
        raise ValueError("--noise-level must be >= 0 (0 = ODE rollouts)")
    if args.learning_rate <= 0 or args.timestep_samples < 1:
        raise ValueError("--learning-rate must be > 0 and --timestep-samples >= 1")
    if args.beta < 0 or (args.algorithm == "dpo" and args.beta == 0):
        raise ValueError("--beta must be > 0 for dpo (published 100) and >= 0 for sft")
    if args.ref_update_every is not None and args.ref_update_every < 1:
        raise ValueError("--ref-update-every must be >= 1, or None for never (offline)")
    if args.logit_std <= 0:
        raise ValueError("--logit-std must be > 0")
    if args.resume not in (None, "latest") and not (Path(args.resume) / "COMPLETE").exists():
        raise FileNotFoundError(f"--resume {args.resume}: not a complete checkpoint directory")
    train_prompts = load_prompts(args.prompts, "train")  # raises on a missing, empty or malformed file
    if (args.batch_size * num_processes) // args.group_size > len(train_prompts):
        raise ValueError(f"each batch needs {(args.batch_size * num_processes) // args.group_size} distinct prompts "
                         f"but --prompts {args.prompts} has {len(train_prompts)}")
    micro_batches = args.batches_per_epoch // args.updates_per_epoch
    return dataclasses.replace(args, num_processes=num_processes,
                               grad_accumulation=micro_batches * args.timestep_samples)


# ------------------------------------------------------------------------------- ALGO LOGIC


def select_pairs(rewards, group_ids):
    """(winner, loser, tie) index arrays, one pair per group in order of first appearance:
    winner = argmax, loser = argmin of the group's rewards; if all are equal, the group's
    second member wins and its first loses (the published tie rule). NaN rewards (unscored
    samples) take no part; a group with fewer than two scored members gives no pair."""
    rewards, group_ids = np.asarray(rewards, dtype=np.float64), np.asarray(group_ids)
    winners, losers, ties = [], [], []
    for group in dict.fromkeys(group_ids.tolist()):
        members = np.flatnonzero((group_ids == group) & np.isfinite(rewards))
        if len(members) < 2:
            continue
        values = rewards[members]
        tie = bool(values.max() == values.min())
        winners.append(members[1] if tie else members[np.argmax(values)])
        losers.append(members[0] if tie else members[np.argmin(values)])
        ties.append(tie)
    return np.array(winners, dtype=np.int64), np.array(losers, dtype=np.int64), np.array(ties, dtype=bool)


def select_best(rewards, group_ids):
    """Indices with A = 1: every scored sample whose reward equals its group's maximum (NaN
    rewards, unscored samples, are never selected)."""
    rewards, group_ids = np.asarray(rewards, dtype=np.float64), np.asarray(group_ids)
    scored = np.isfinite(rewards)
    best = [i for i in np.flatnonzero(scored) if rewards[i] == rewards[(group_ids == group_ids[i]) & scored].max()]
    return np.array(best, dtype=np.int64)


def pad_to_multiple(indices, multiple, rng):
    """Pad by random duplication to a multiple of `multiple` (published: of the world size)."""
    missing = (-len(indices)) % multiple
    return np.concatenate([indices, rng.choice(indices, size=missing)]) if missing else indices


def training_sigmas(u, shift):
    """Timesteps of the flow-matching loss: sigma = shift·u / (1 + (shift - 1)·u), the static
    shift of the SD3 scheduler applied to u in (0, 1) (published: the shifted training table)."""
    return shift * u / (1 + (shift - 1) * u)


def noisy_inputs(x0, eps, sigma):
    """x_s = (1 - s)·x0 + s·eps and the flow-matching target v* = eps - x0 (s per row)."""
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * eps, eps - x0


def flow_matching_errors(velocity, target):
    """Per-sample mean_D (v - v*)², in fp32."""
    return ((velocity.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def dpo_loss(err_winner, err_loser, ref_err_winner, ref_err_loser, beta):
    """Diffusion-DPO on velocity errors (to minimise) and its statistics; per-pair inputs (P,).
    z = -(beta/2)·[(e_w - e_ref,w) - (e_l - e_ref,l)]; loss = mean -log sigmoid(z)."""
    winner_diff, loser_diff = err_winner - ref_err_winner, err_loser - ref_err_loser
    z = -0.5 * beta * (winner_diff - loser_diff)
    loss = -F.logsigmoid(z).mean()
    stats = {"z": z.detach(), "implicit_acc": (z.detach() > 0).float().mean(),
             "winner_diff": winner_diff.detach().mean(), "loser_diff": loser_diff.detach().mean()}
    return loss, stats


def sft_loss(velocity, target, advantages, beta=0.0, base_velocity=None):
    """L = mean(A·mean_D (v - v*)²) + beta·mean(mean_D (v - v_base)²); returns (loss, fm, kl)."""
    fm = flow_matching_errors(velocity, target)
    loss = (advantages * fm).mean()
    kl = torch.zeros((), device=fm.device)
    if beta > 0:
        kl = flow_matching_errors(velocity, base_velocity.detach()).mean()
        loss = loss + beta * kl
    return loss, fm.detach().mean(), kl.detach()


class RefPolicy:
    """The rollout/reference policy. With LoRA it is a second peft adapter `ref` on the same base
    (no second model in memory); when fully fine-tuning, a frozen copy of the transformer.
    `refresh()` copies the learner's live weights into it exactly."""

    def __init__(self, adapter, use_lora, lora_args=None):
        from common.checkpoint import add_lora

        self.adapter, self.use_lora = adapter, use_lora
        transformer = adapter.transformer
        if use_lora:
            with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
                warnings.simplefilter("ignore")
                add_lora(transformer, *lora_args, adapter_name="ref")
            transformer.set_adapter("default")  # add_adapter activated `ref`; train the learner
        else:
            self.copy = copy.deepcopy(transformer).requires_grad_(False).eval()
        self.refresh()

    def _pairs(self):
        """(learner parameter name, ref tensor, learner tensor) for every weight the refresh copies."""
        named = dict(self.adapter.transformer.named_parameters())
        if self.use_lora:
            return [(n.replace(".ref.", ".default."), p, named[n.replace(".ref.", ".default.")])
                    for n, p in named.items() if ".ref." in n]
        return [(n, p, named[n]) for n, p in self.copy.named_parameters()]

    @torch.no_grad()
    def refresh(self):
        if self.use_lora:
            from common.checkpoint import copy_lora_adapter

            copy_lora_adapter(self.adapter.transformer, "default", "ref")
        else:
            for _, ref, learner in self._pairs():
                ref.copy_(learner)

    @torch.no_grad()
    def max_diff(self):
        """max |ref - learner| over the copied weights (0 right after a refresh)."""
        return max((ref.float() - learner.float()).abs().max().item() for _, ref, learner in self._pairs())

    @contextmanager
    def active(self):
        """Forwards inside this block use the ref (training mode and grads are left alone)."""
        if self.use_lora:
            self.adapter.transformer.set_adapter("ref")
            try:
                yield
            finally:  # also restores requires_grad: learner trainable, ref frozen
                self.adapter.transformer.set_adapter("default")
            return
        saved = self.adapter.forward_module
        self.adapter.wrap(self.copy)
        try:
            yield
        finally:
            self.adapter.wrap(saved)

    def state_dict(self):
        """The ref's weights keyed by the learner parameter they mirror (as in `trainable_state`), full
        tensors (gathered from the shards under --fsdp: every rank calls it)."""
        from common.distributed import full_state

        return full_state({name: ref for name, ref, _ in self._pairs()})

    def load_state_dict(self, state):
        from common.distributed import load_full_state

        load_full_state({name: ref for name, ref, _ in self._pairs()}, state)


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
    from common.outputs import MetricsLog, plot_curves, read_metrics, write_recipe
    from common.rewards import MultiReward, collect_rewards, gather_reward_metrics
    from common.rollout import derive_seed, initial_latents, rollout

    main_process, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # the recipe, printed and in config.json, before any weights load
    write_recipe(args, accelerator, algorithm=args.algorithm, timestep_samples=args.timestep_samples,
                 ref_update_every=args.ref_update_every)
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
    lora_args = (args.lora_rank or adapter.lora_rank, args.lora_alpha or adapter.lora_alpha,
                 adapter.lora_target_modules)
    if args.use_lora:
        add_lora(transformer, *lora_args)
    else:
        if args.algorithm == "sft" and args.beta > 0:
            adapter.keep_frozen_copy()
        transformer.requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # trainable weights in fp32 under autocast
        p.data = p.data.float()
    ref = RefPolicy(adapter, args.use_lora, lora_args)  # starts equal to the learner (the base)
    if args.fsdp:  # FSDP2: every block sharded over the processes (common/distributed.py); its weights are now DTensors
        params = shard_for_training(adapter, weight_dtype, getattr(ref, "copy", None))
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
    shift = float(adapter.scheduler_config.get("shift", 1.0))
    negative = adapter.negative_embeds() if args.guidance > 1 else None

    # --- resume
    start_epoch, optimizer_step, refreshes = 0, 0, 0
    resume_dir = resolve_resume(args.resume, output_dir)
    if resume_dir is not None:
        state = load_checkpoint(resume_dir)
        restore_training_state(transformer, optimizer, ema, state)
        ref.load_state_dict(state["ref"])
        set_rng_states(state["rng"])
        start_epoch, optimizer_step, refreshes = state["epoch"], state["optimizer_step"], state["refreshes"]
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

    def draw_noise(count, generator):
        """eps ~ N(0, I) and sigma = shift(u), u ~ logit-normal, one per row (CPU generator)."""
        u = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(count, generator=generator))
        eps = torch.randn(count, *all_x0.shape[1:], generator=generator)
        return eps.to(accelerator.device), training_sigmas(u, shift).to(accelerator.device)

    executor = ThreadPoolExecutor(max_workers=1)
    start_time, nonfinite_streak = time.time(), 0
    epoch = start_epoch
    for epoch in range(start_epoch, args.num_epochs):
        epoch_start = time.time()
        metrics = {}
        if args.eval_every > 0 and epoch % args.eval_every == 0:
            metrics.update(run_eval(epoch))
        transformer.eval()
        sampling_start = time.time()

        # --- sampling by the ref policy: only the final clean sample is kept
        finals, futures, drawn, local_ids, rollout_s = [], [], [], [], 0.0
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
            with ref.active(), accelerator.autocast():
                trajectory = rollout(adapter, embeds, sigmas, latents, negative=negative, guidance=args.guidance,
                                     noise_level=args.noise_level, sampler=args.sampler, generator=noise,
                                     keep_means=False)
            rollout_s += time.time() - rollout_start
            futures.append(executor.submit(reward_fn, trajectory.images, [p.text for p in batch],
                                           [p.metadata for p in batch]))
            finals.append(trajectory.latents[:, -1])
            local_ids.append(torch.tensor(indices))
        rewards = collect_rewards(futures, accelerator)
        sampling_s = time.time() - sampling_start

        # --- gather the epoch; every rank selects the same training set, then takes its slice
        all_reward, _, reward_metrics = gather_reward_metrics(rewards, accelerator, epoch)
        metrics.update(reward_metrics)
        all_ids = accelerator.gather(torch.cat(local_ids).to(accelerator.device)).cpu().numpy()
        all_x0 = accelerator.gather(torch.cat(finals).contiguous()).cpu()
        views = gather_object([drawn]) if world > 1 else [drawn]
        metrics["dist/num_processes"] = world
        metrics["dist/weights_agree"] = weights_agree(accelerator, params)  # after the last update
        metrics["dist/ranks_agree"] = float(all(view == views[0] for view in views))
        metrics["dist/complete_groups"] = float(all(c % args.group_size == 0 for c in np.unique(all_ids, return_counts=True)[1]))
        pad_rng = np.random.default_rng([args.seed, epoch])  # same on every rank
        if args.algorithm == "dpo":
            winners, losers, ties = select_pairs(all_reward, all_ids)
            metrics["dpo/tie_frac"] = float(ties.mean())
            metrics["dpo/reward_gap"] = float((all_reward[winners] - all_reward[losers]).mean())
            if args.skip_ties and not ties.all():
                winners, losers = winners[~ties], losers[~ties]
            rows = pad_to_multiple(np.arange(len(winners)), world * args.batches_per_epoch, pad_rng)
            winners, losers = winners[rows], losers[rows]
            share = len(rows) // world
            chosen = np.stack([winners, losers], axis=1)[rank * share:(rank + 1) * share]  # (P, 2)
        else:
            best = select_best(all_reward, all_ids)
            tied = np.array([np.nanmin(all_reward[all_ids == all_ids[i]]) == all_reward[i] for i in best])
            metrics["sft/tie_frac"] = float(tied.mean())
            if args.skip_ties and not tied.all():
                best = best[~tied]
            metrics["sft/best_frac"] = float(len(best) / len(all_reward))
            metrics["sft/best_reward"] = float(all_reward[best].mean())
            best = pad_to_multiple(best, world * args.batches_per_epoch, pad_rng)
            share = len(best) // world
            chosen = best[rank * share:(rank + 1) * share, None]  # (P, 1)
        metrics["train/samples"] = int(chosen.size)
        x0 = all_x0[torch.from_numpy(chosen)].to(accelerator.device)  # (P, 1 or 2, ...)
        train_embeds = adapter.encode_prompts([train_prompts[j] for j in all_ids[chosen].reshape(-1)])
        embed_rows = torch.arange(chosen.size).view(chosen.shape)  # train_embeds row of each chosen sample

        # --- training (no CFG): one accelerate micro-step per (micro-batch, noise draw)
        transformer.train()
        stats = {k: [] for k in ("loss", "implicit_acc", "winner_err", "loser_err", "winner_diff", "loser_diff",
                                 "z", "fm", "kl")}
        refresh_diffs = []
        per_micro = len(chosen) // args.batches_per_epoch
        train_start = time.time()
        bar = tqdm(total=args.batches_per_epoch * args.timestep_samples, desc=f"epoch {epoch}: training",
                   disable=not main_process, leave=False)
        for b in range(args.batches_per_epoch):
            rows = slice(b * per_micro, (b + 1) * per_micro)
            # winners then losers (dpo) in one forward: the same batch shape for learner and ref
            x_rows = x0[rows].transpose(0, 1).flatten(0, 1)
            embeds = train_embeds[embed_rows[rows].transpose(0, 1).flatten()]
            for d in range(args.timestep_samples):
                generator = torch.Generator().manual_seed(derive_seed(args.seed, epoch, b, d, rank, "train"))
                if args.algorithm == "dpo":  # winner and loser share eps and sigma
                    eps, s = draw_noise(per_micro, generator)
                    eps, s = torch.cat([eps, eps]), torch.cat([s, s])
                else:
                    eps, s = draw_noise(len(x_rows), generator)
                x_noisy, target = noisy_inputs(x_rows, eps, s)
                with accelerator.accumulate(wrapped):
                    if args.fsdp:  # LoRA: accumulate locally, reduce once per update as DDP does (bitwise equal);
                        # full weights: reduce-scatter every micro-step (unsharded gradients would not fit)
                        wrapped.set_requires_gradient_sync(accelerator.sync_gradients or not args.use_lora)
                    with accelerator.autocast():
                        velocity = adapter.predict_velocity(x_noisy, s, embeds)
                    if args.algorithm == "dpo":
                        with torch.no_grad(), ref.active(), accelerator.autocast():
                            ref_velocity = adapter.predict_velocity(x_noisy, s, embeds)
                        err, ref_err = flow_matching_errors(velocity, target), flow_matching_errors(ref_velocity, target)
                        loss, step_stats = dpo_loss(err[:per_micro], err[per_micro:], ref_err[:per_micro],
                                                    ref_err[per_micro:], args.beta)
                    else:
                        base_velocity = None
                        if args.beta > 0:
                            with torch.no_grad(), adapter.reference(), accelerator.autocast():
                                base_velocity = adapter.predict_velocity(x_noisy, s, embeds)
                        loss, fm, kl = sft_loss(velocity, target, torch.ones(len(x_noisy), device=velocity.device),
                                                args.beta, base_velocity)
                    if not torch.isfinite(loss):
                        # keep every rank's backward count equal (DDP) with a zero-gradient loss
                        nonfinite_streak += 1
                        warnings.warn(f"non-finite loss at epoch {epoch}, micro-batch {b}: skipped "
                                      f"({nonfinite_streak} in a row)")
                        loss = sum(p.sum() * 0 for p in params)
                    else:
                        nonfinite_streak = 0
                        stats["loss"].append(loss.item())
                        if args.algorithm == "dpo":
                            stats["implicit_acc"].append(step_stats["implicit_acc"].item())
                            stats["winner_err"].append(err[:per_micro].mean().item())
                            stats["loser_err"].append(err[per_micro:].mean().item())
                            stats["winner_diff"].append(step_stats["winner_diff"].item())
                            stats["loser_diff"].append(step_stats["loser_diff"].item())
                            stats["z"].append(step_stats["z"].mean().item())
                        else:
                            stats["fm"].append(fm.item())
                            stats["kl"].append(kl.item())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        if ema is not None:
                            ema.step(optimizer_step)
                        optimizer_step += 1
                        if args.ref_update_every is not None and optimizer_step % args.ref_update_every == 0:
                            ref.refresh()
                            refreshes += 1
                            refresh_diffs.append(ref.max_diff())
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
        metrics.update({"train/loss": mean(stats["loss"]), "ref/refreshes": refreshes,
                        "ref/max_diff": ref.max_diff(),
                        "ref/diff_after_refresh": max(refresh_diffs) if refresh_diffs else None,
                        "perf/epoch_s": epoch_s, "perf/sampling_s": sampling_s, "perf/rollout_s": rollout_s,
                        "perf/train_s": train_s,
                        "perf/images_per_s": args.batches_per_epoch * args.batch_size * world / sampling_s,
                        "perf/wall_min": (time.time() - start_time) / 60})
        if args.algorithm == "dpo":
            metrics.update({"dpo/implicit_acc": mean(stats["implicit_acc"]), "dpo/winner_err": mean(stats["winner_err"]),
                            "dpo/loser_err": mean(stats["loser_err"]), "dpo/winner_diff": mean(stats["winner_diff"]),
                            "dpo/loser_diff": mean(stats["loser_diff"]), "dpo/z_mean": mean(stats["z"])})
        else:
            metrics.update({"sft/fm_loss": mean(stats["fm"]), "train/kl": mean(stats["kl"])})
        record = log.log(epoch, metrics)
        if main_process:
            accelerator.print({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                               if k.startswith(("epoch", "reward/mean", "train/loss", "dpo/implicit", "eval/accuracy",
                                                "perf/epoch"))
                               and k.count("/") < 2})
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.num_epochs:
            # on every rank: gathered from the shards under --fsdp
            state = {**training_state(transformer, optimizer, ema), "ref": ref.state_dict()}
            if main_process:
                save_checkpoint(output_dir, epoch + 1, {
                    "epoch": epoch + 1, "optimizer_step": optimizer_step, "refreshes": refreshes, **state,
                    "rng": rng_states(), "args": dataclasses.asdict(args)}, keep_last=args.keep_checkpoints)
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
        series = {"train reward (ref rollouts)": ([r["epoch"] for r in history if r.get("reward/mean") is not None],
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
