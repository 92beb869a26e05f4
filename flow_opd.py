# docs: README.md#flow_opdpy ; paper: https://arxiv.org/abs/2605.08063 (Flow-OPD), on Flow-GRPO 2505.05470
"""Flow-OPD: on-policy distillation of task teachers into one flow-matching student.

Objective. The student pi_theta (a LoRA on a frozen base) samples with the SDE on its own
trajectory. At every stored state (x_j, c) each teacher pi_T (another LoRA on the same base,
e.g. a flow_grpo.py run on one task) gives its transition N(mu_T, s²I) under the same sigma
grid, CFG, negative prompt and noise level, so the per-step reverse KL is Gaussian with equal
covariance: KL_j = mean_D (mu_theta - mu_T)² / (2 s²) (`--kl-convention exact`; `flowgrpo`
divides by 2g², the public code's form). Objectives (ALGORITHMS.md §7.1):
- `gkd`: minimise  mean_{b,j} KL_j  directly, the gradient flowing through mu_theta (pathwise).
- `pg`: policy gradient with the *detached* dense reward of LLM on-policy distillation: the
  sampled log-ratio of the stored transition, A_{b,j} = -stopgrad(log pi_old(x'|x) - log pi_T(x'|x))
  for the whole latent (D x the per-element mean the sampler returns), with PPO-clip on the
  per-element ratio r = pi_theta / pi_old. For x' ~ pi_old its expectation is D·KL_j, and
  E[-A·grad log r] = grad KL_j: the same expected gradient as `gkd` (exact convention), so
  learning rates and beta carry over, without differentiating the teacher's target.
  `--return-to-go` sums A over the later trained steps.
- `legacy_kl_only`: the public `kl_only` reproduced for comparison, NOT recommended: the KL is
  used as the advantage *without* detaching, A = clamp(-w·norm(KL), ±5), loss = PPO(A); its
  gradient is the pathwise grad KL (weight ≈ r ≈ 1) plus a score term KL·grad r.
- `mixed`: `pg` plus the Flow-GRPO group advantage of the task reward,
  A_{b,j} = task_weight·clamp(A_task_b, ±5) + w·A_pg_{b,j}. Nothing is masked on the task
  reward (equal-reward groups still carry the teacher signal, §16 #22).
Plus MAR: beta·mean_D (mu_theta - mu_anchor)² / (2 s²) toward a frozen anchor (the base with
every adapter disabled, or `--mar-lora`). Teachers and the anchor are named peft adapters on
the student's own transformer (switched with `set_adapter`): one LoRA of memory per teacher.
Routing: `category` sends each prompt to the teacher of its metadata tag group within every
batch; `alternate` trains epoch e on one dataset (and its teacher and reward) in cycles of
`--epochs-per-cycle` epochs per dataset. Cold start: the student's LoRA starts as a merge of
the teachers' (common/lora_merge.py: `delta_average`, or the public `factor_average`).

Launch:
    # toy world on the CPU: three teachers (flow_grpo.py runs), delta-average merge init
    python flow_opd.py --teachers objects=runs/t_obj position=runs/t_pos colours=runs/t_col \
        --teacher-prompts objects=tag:single_object+two_object+counting colours=tag:colors+color_attr
    # the whole table (teachers, GRPO-Mix, OPD, evaluation): python bench/opd_table.py
    # one GPU, the published single-teacher recipe (general_ocr_sd3_8gpu_opd scaled to 1 GPU)
    accelerate launch flow_opd.py --model sd3 \
        --prompts path/to/ocr --reward ocr --teachers ocr=path/to/SD3.5M-FlowGRPO-Text/peft
    # 8 GPUs, two datasets alternating OCR 1 : GenEval 3 (the published mix recipe)
    accelerate launch --multi_gpu --num_processes 8 flow_opd.py --model sd3 --preset sd3_mix \
        --teachers ocr=... geneval=... --teacher-prompts ocr=path/to/ocr geneval=path/to/geneval \
        --teacher-rewards ocr=ocr geneval=geneval --epochs-per-cycle ocr=1 geneval=3
    # 2 CPU processes (gloo); note `--cpu --num_processes 2` silently starts only one
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 0 flow_opd.py --teachers ...
"""

import dataclasses
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from common.cli import parse_with_presets
from common.data import GroupSampler, category_weights, load_prompts
from common.lora_merge import resolve_lora_dir
from common.distributed import check_launch
from common.models import check_model_inputs, model_recipe
from common.rewards import parse_reward_spec


@dataclass
class Args:
    # ---- experiment
    exp_name: str = "flow_opd"
    """name of the run (tracker run name)"""
    preset: Optional[str] = None
    """the preset these defaults came from: `--preset NAME`, else the --model's (listed above the options)"""
    seed: int = 42
    """seeds prompts, initial noise, SDE noise and shuffles (everything is derived from it and the epoch)"""
    output_dir: str = "runs/flow_opd"
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
    """torch.compile the SDE step (rollout, teacher scoring and training alike); default: on with CUDA"""
    eval_every: int = 20
    """evaluate every N epochs (and at epoch 0: the initial student, and after the last); 0 = never"""
    save_every: int = 10
    """checkpoint every N epochs"""
    keep_checkpoints: int = 2
    """how many checkpoints to keep"""
    grid_every: int = 10
    """write a captioned sample grid every N epochs (from the evaluation images)"""
    export_merged: bool = False
    """also export the merged full transformer at the end"""

    # ---- model (the student is always a LoRA: teachers and the anchor are adapters on its base)
    model: str = "toy"
    """model adapter: toy, gmm (both offline), sd3, flux, flux_kontext, qwen_image, qwen_image_edit or wan;
    without --preset, also its preset (MODEL_PRESETS)"""
    pretrained: Optional[str] = None
    """hub id or local directory (default: the model's checkpoint, listed above the options)"""
    resolution: Optional[int] = None
    """image size in pixels (default: the model's)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """autocast dtype for the transformer; SDE maths always runs in fp32"""
    lora_rank: Optional[int] = None
    """student LoRA rank (init base: default the model's; delta_average: the SVD rank, default the teachers')"""
    lora_alpha: Optional[int] = None
    """student LoRA alpha with --init base (default: the model's published one)"""
    fsdp: bool = False
    """shard the transformer over the processes with PyTorch FSDP2 (each keeps 1/N of every block's
    weights, gradients and optimizer state) instead of replicating it with DDP; CUDA or CPU"""
    gradient_checkpointing: bool = False
    """recompute each transformer block's activations in the backward pass (less memory, ~30 % more compute)"""

    # ---- teachers, routing, cold start
    teachers: tuple[str, ...] = ()
    """NAME=LORA, one per teacher: a PEFT adapter dir, a diffusers export or a run directory (its final/peft)"""
    teacher_prompts: tuple[str, ...] = ()
    """NAME=tag:T1+T2 (the --prompts records with those metadata tags) or NAME=PROMPTS (a dataset/file);
    default tag:NAME"""
    teacher_rewards: tuple[str, ...] = ()
    """NAME=REWARD_SPEC (alternate routing only): the dataset's task reward, default --reward"""
    routing: Literal["category", "alternate"] = "category"
    """category: every prompt goes to its dataset's teacher inside each batch; alternate: epoch e trains
    one dataset (cycles of --epochs-per-cycle), the published multi-teacher schedule"""
    epochs_per_cycle: tuple[str, ...] = ()
    """NAME=N (alternate routing): consecutive epochs of that dataset per cycle, default 1"""
    init: Literal["base", "delta_average", "factor_average", "lora"] = "delta_average"
    """student start: base (LoRA B = 0), a merge of the teachers (common/lora_merge.py), or --init-lora"""
    init_lora: Optional[str] = None
    """with --init lora: the student's initial LoRA (e.g. written by `python -m common.lora_merge`)"""
    mar_lora: Optional[str] = None
    """MAR anchor LoRA (e.g. an aesthetic LoRA); default: the base model, every adapter disabled"""

    # ---- sampling
    prompts: str = "toy"
    """dataset name (toy) or a txt / GenEval jsonl file or a directory with train/test files"""
    reward: str = "shapes"
    """task reward spec (logged; the `mixed` objective trains on it; evaluation uses it)"""
    num_steps: int = 10
    """denoising steps for training rollouts"""
    guidance: float = 4.0
    """CFG scale in rollouts, teacher and anchor forwards alike (1 = no CFG)"""
    sampler: Literal["flow", "cps", "dance", "wan"] = "flow"
    """SDE type: flow (Flow-GRPO Eq. 9, the paper's), cps, dance. Not cps by default: its std
    sigma'·sin(a·pi/2) -> 0 at the last trained step, where the KL's 1/(2s²) then outweighs the
    first step's ~10^4 times (flow: ~10 times), so the loss would train one step only"""
    noise_level: float = 0.7
    """a (eta): the SDE noise knob; 0 = ODE"""
    final_step_ode: bool = False
    """take the last step with the ODE (the public code noises it though it is never trained)"""
    batch_size: int = 32
    """images per process per sampling batch"""
    group_size: int = 4
    """images per prompt; the dense teacher signal needs no groups (only `mixed` uses them), so the
    toy default spends the batch on more distinct prompts than flow_grpo's 16"""
    batches_per_epoch: int = 2
    """sampling batches per epoch (nb)"""
    balance_categories: bool = True
    """draw training prompts so every metadata `tag` inside a dataset is equally likely"""
    same_latent: bool = False
    """same initial noise for every copy of a prompt (across processes too)"""
    eval_num_steps: int = 20
    """ODE steps for evaluation"""
    eval_guidance: float = 4.0
    """CFG scale for evaluation"""
    eval_images_per_category: int = 64
    """evaluation images per category (GenEval tags), or in total for plain prompts"""

    # ---- algorithm
    objective: Literal["gkd", "pg", "legacy_kl_only", "mixed"] = "gkd"
    """gkd (pathwise KL), pg (detached sampled log-ratio, PPO), legacy_kl_only (public hybrid), mixed (pg + task)"""
    distill_weight: float = 1.0
    """weight w of the distillation signal (legacy_kl_only: |kl_scale| of the public code)"""
    distill_norm: Literal["none", "zscore"] = "none"
    """pg/mixed: z-score the epoch's distillation advantages; legacy: the micro-batch KL (public kl_norm)"""
    return_to_go: bool = False
    """pg/mixed: the advantage of step j sums the log-ratio rewards of the trained steps k >= j"""
    task_weight: float = 1.0
    """mixed: weight of the task reward's group advantage"""
    learning_rate: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    clip_range: float = 1e-3
    """PPO clip epsilon (pg, legacy_kl_only, mixed)"""
    adv_clip_max: float = 5.0
    """task and legacy advantages are clipped to ±this (the pg log-ratio reward is not: it would bias it)"""
    beta: float = 0.0
    """MAR weight: KL of the student's transition to the frozen anchor's (0 = no anchor forward)"""
    kl_convention: Literal["exact", "flowgrpo"] = "exact"
    """exact per-element KL (2s²), or the public form without |dt| (2g²; published betas assume it)"""
    global_std: bool = True
    """mixed: normalise task advantages by the std of all rewards (True) or of each group (False)"""
    timestep_fraction: float = 0.99
    """train the first int(num_steps·fraction) steps (the last step never)"""
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
    """keep an EMA of the student's LoRA (used for evaluation and export)"""
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


_SD3 = dict(model="sd3", resolution=512, mixed_precision="fp16", num_steps=10, guidance=4.5, sampler="flow",
            noise_level=0.7, group_size=16, eval_num_steps=40, eval_guidance=4.5, clip_range=1e-4, beta=0.04,
            kl_convention="flowgrpo", ema=True, balance_categories=False, eval_every=60, save_every=60, grid_every=60,
            num_epochs=100000, max_minutes=None, objective="pg")
# `--preset gmm`: the gmm world (common/gmm), learning in about a minute on 2 CPU cores: 256 points
# per epoch, no CFG, 512 ODE points per category per evaluation (SE ~0.01). The algorithm fields are
# this file's published ones (scaled to one process); chosen before any run of it was seen.
_GMM = dict(model="gmm", prompts="gmm", reward="gmm_target", num_steps=10, guidance=1.0, eval_num_steps=20,
            eval_guidance=1.0, eval_images_per_category=512, num_epochs=150, max_minutes=2.0, eval_every=25,
            save_every=50, grid_every=50)
# general_ocr_sd3_8gpu_opd: 8 GPUs x bs 8, k 16, nb 4, G 2, lr 3e-4 (objective: ours, not the public kl_only)
_ONE_TEACHER = dict(batch_size=8, batches_per_epoch=4, updates_per_epoch=2, learning_rate=3e-4)
PRESETS = {
    # two teachers, each `python flow_grpo.py --preset gmm` on its task's prompts (bench/claims.py trains them):
    #   --prompts gmm@tag:single --batch-size 96 --output-dir runs/gmm_teacher_single
    #   --prompts gmm@tag:pair+half+any --batch-size 192 --output-dir runs/gmm_teacher_multi
    "gmm": Args(**_GMM, exp_name="flow_opd_gmm", output_dir="runs/flow_opd_gmm", sampler="flow", noise_level=0.7,
                teachers=("single=runs/gmm_teacher_single", "multi=runs/gmm_teacher_multi"),
                teacher_prompts=("single=tag:single", "multi=tag:pair+half+any"), batch_size=256, group_size=16,
                batches_per_epoch=1, updates_per_epoch=1, learning_rate=1e-3),
    "toy": Args(),
    "sd3": Args(**_SD3, **_ONE_TEACHER),
    # mix_opd_8gpu: bs 4, nb 8, G 4, lr 1e-4, alternate schedule (pass --epochs-per-cycle ocr=1 geneval=3)
    "sd3_mix": Args(**_SD3, batch_size=4, batches_per_epoch=8, updates_per_epoch=2, learning_rate=1e-4,
                    routing="alternate"),
    # no Flow-OPD recipe was published for the other model families: the single-teacher sd3 recipe with
    # the model's sampling
    "flux": Args(**model_recipe("flux", _SD3, **_ONE_TEACHER)),
    "flux_kontext": Args(**model_recipe("flux_kontext", _SD3, **_ONE_TEACHER)),
    "qwen_image": Args(**model_recipe("qwen_image", _SD3, **_ONE_TEACHER)),
    "qwen_image_edit": Args(**model_recipe("qwen_image_edit", _SD3, **_ONE_TEACHER)),
    "wan": Args(**model_recipe("wan", _SD3, **_ONE_TEACHER)),
}


# `--model NAME` without `--preset`: that model's preset here (sd3: the published single-teacher
# recipe, general_ocr_sd3_8gpu_opd; --preset sd3_mix for the two-dataset one)
MODEL_PRESETS = {"toy": "toy", "gmm": "gmm", "sd3": "sd3", **{m: m for m in ("flux", "flux_kontext", "qwen_image",
                                                                "qwen_image_edit", "wan")}}


def parse_args(argv=None):
    """`--preset NAME` (or the --model's preset) picks the defaults, then tyro parses the rest on top of them."""
    return parse_with_presets(Args, PRESETS, argv, description=__doc__, model_presets=MODEL_PRESETS)


# ------------------------------------------------------------------------------- teachers and datasets


@dataclass
class Dataset:
    """One teacher's share of the training data: its prompts, task reward and schedule slot."""

    name: str
    lora: str
    selector: str
    reward: str
    epochs_per_cycle: int
    train: list
    test: list

    @property
    def adapter_name(self):
        return f"teacher_{self.name}"


def parse_named(entries, flag):
    """('a=x', 'b=y') -> {'a': 'x', 'b': 'y'}, names checked."""
    named = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or not value:
            raise ValueError(f"{flag} {entry!r}: expected NAME=VALUE")
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"{flag} {entry!r}: a name may use letters, digits and _ only (it names a peft adapter)")
        if name in named:
            raise ValueError(f"{flag}: {name!r} given twice")
        named[name] = value
    return named


def select_prompts(selector, prompts_spec, split):
    """`tag:T1+T2` -> the records of --prompts with those tags (file order kept); else a prompts spec."""
    if selector.startswith("tag:"):
        tags = set(selector[4:].split("+"))
        chosen = [p for p in load_prompts(prompts_spec, split) if p.metadata.get("tag") in tags]
        if not chosen:
            raise ValueError(f"{selector}: no {split} prompt of --prompts {prompts_spec} has tag(s) {sorted(tags)}")
        return chosen
    return load_prompts(selector, split)


def build_datasets(args: Args):
    """The teachers' datasets, validated (no model loads)."""
    teachers = parse_named(args.teachers, "--teachers")
    if not teachers:
        raise ValueError("give at least one teacher: --teachers NAME=LORA_DIR (e.g. a flow_grpo.py run directory)")
    selectors = parse_named(args.teacher_prompts, "--teacher-prompts")
    rewards = parse_named(args.teacher_rewards, "--teacher-rewards")
    epochs = parse_named(args.epochs_per_cycle, "--epochs-per-cycle")
    for flag, named in (("--teacher-prompts", selectors), ("--teacher-rewards", rewards), ("--epochs-per-cycle", epochs)):
        unknown = sorted(set(named) - set(teachers))
        if unknown:
            raise ValueError(f"{flag} names {unknown}, which are not in --teachers {sorted(teachers)}")
    if args.routing == "category" and (rewards or epochs):
        raise ValueError("--teacher-rewards and --epochs-per-cycle need --routing alternate (category routing mixes "
                         "datasets in every batch under the one --reward)")
    datasets = []
    for name, lora in teachers.items():
        resolve_lora_dir(lora)  # raises with the path if nothing is there
        count = epochs.get(name, "1")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--epochs-per-cycle {name}={count}: must be a positive integer")
        reward = rewards.get(name, args.reward)
        parse_reward_spec(reward)
        selector = selectors.get(name, f"tag:{name}")
        datasets.append(Dataset(name, lora, selector, reward, int(count), select_prompts(selector, args.prompts, "train"),
                                select_prompts(selector, args.prompts, "test")))
    tag_sets = [set(d.selector[4:].split("+")) for d in datasets if d.selector.startswith("tag:")]
    if tag_sets and sum(len(t) for t in tag_sets) != len(set().union(*tag_sets)):
        raise ValueError("a tag is routed to two teachers: make the tag:... groups of --teacher-prompts disjoint")
    return datasets


def dataset_for_epoch(epoch, epochs_per_cycle):
    """The alternate schedule (§7.3): the first dataset k with (epoch mod cycle) < sum_{i<=k} epochs_i."""
    position = epoch % sum(epochs_per_cycle)
    return int(np.searchsorted(np.cumsum(epochs_per_cycle), position, side="right"))


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
        raise ValueError("--noise-level must be > 0: the student samples with the SDE and the KL needs s > 0")
    if args.clip_range <= 0 or args.learning_rate <= 0:
        raise ValueError("--clip-range and --learning-rate must be > 0")
    if args.fsdp and args.export_merged:
        raise ValueError("--export-merged needs the whole transformer on one process: drop it under --fsdp and merge "
                         "the exported LoRA afterwards (python -m common.lora_merge)")
    if args.beta < 0 or args.distill_weight < 0:
        raise ValueError("--beta and --distill-weight must be >= 0")
    if args.objective == "mixed" and args.group_size < 2:
        raise ValueError("--objective mixed needs --group-size >= 2 (the task advantage is group-relative)")
    if (args.init == "lora") != (args.init_lora is not None):
        raise ValueError("--init lora and --init-lora go together")
    for flag, path in (("--init-lora", args.init_lora), ("--mar-lora", args.mar_lora)):
        if path is not None:
            resolve_lora_dir(path)
    if args.resume not in (None, "latest") and not (Path(args.resume) / "COMPLETE").exists():
        raise FileNotFoundError(f"--resume {args.resume}: not a complete checkpoint directory")
    datasets = build_datasets(args)
    prompts_per_draw = (args.batch_size * num_processes) // args.group_size
    pools = datasets if args.routing == "alternate" else [None]
    for d in pools:
        size = len(d.train) if d is not None else sum(len(x.train) for x in datasets)
        if prompts_per_draw > size:
            raise ValueError(f"each batch needs {prompts_per_draw} distinct prompts but "
                             f"{'dataset ' + d.name if d else 'the pool of all teachers'} has {size}: raise --group-size")
    last = args.num_steps - 1 if args.final_step_ode else args.num_steps
    steps = tuple(j for j in range(int(args.num_steps * args.timestep_fraction)) if j < min(last, args.num_steps - 1))
    if not steps:
        raise ValueError("no denoising step is trained: raise --timestep-fraction or --num-steps")
    micro_batches = args.batches_per_epoch // args.updates_per_epoch
    return dataclasses.replace(args, num_processes=num_processes, train_steps=steps,
                               grad_accumulation=micro_batches * len(steps))


# ------------------------------------------------------------------------------- ALGO LOGIC


def pg_rewards(old_log_prob, teacher_log_prob, elements, return_to_go=False):
    """Dense per-step reward of on-policy distillation, DETACHED: -(log pi_old(x'|x) - log pi_T(x'|x))
    of each stored transition (B, S). The sampler's log-probs are per-element means, so x D gives
    the whole transition's log-ratio; its mean under x' ~ pi_old is -D·KL (per element)."""
    reward = -(old_log_prob.detach() - teacher_log_prob.detach()) * elements
    if return_to_go:
        reward = reward.flip(1).cumsum(1).flip(1)
    return reward


def zscore(values, eps=1e-4):
    return (values - values.mean()) / (values.std(unbiased=False) + eps)


def group_advantages(rewards, group_ids, global_std=True, eps=1e-4):
    """Flow-GRPO's A_i = (R_i - mean of i's group) / (std + eps) (population std), for `mixed`.
    NaN rewards (unscored samples) are left out of every statistic and get A = 0."""
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    scored = np.isfinite(rewards)
    advantages = np.zeros_like(rewards)
    all_std = rewards[scored].std() if scored.any() else 0.0
    for group in np.unique(group_ids):
        members = (group_ids == group) & scored
        std = all_std if global_std else rewards[members].std()
        advantages[members] = (rewards[members] - rewards[members].mean()) / (std + eps)
    return advantages


def ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO-clip loss (to minimise) on per-sample log-probs (B,), and its statistics."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
    stats = {"ratio": ratio.detach(), "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
             "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean()}
    return loss, stats


def distillation_loss(objective, log_prob, old_log_prob, kl, advantage, *, clip_range, adv_clip_max=5.0,
                      distill_weight=1.0, distill_norm="none"):
    """The loss of one (micro-batch, step). `kl` (B,): the differentiable per-step KL to the
    teacher; `advantage` (B,): the precomputed detached advantage of pg / mixed (else unused)."""
    if objective == "gkd":
        log_ratio = (log_prob - old_log_prob).detach()
        return distill_weight * kl.mean(), {"ratio": torch.exp(log_ratio), "approx_kl": 0.5 * (log_ratio**2).mean(),
                                            "clipfrac": torch.zeros(())}
    if objective == "legacy_kl_only":
        # public kl_only: NOT detached; the loss is then mean KL·max(r, clip(r)) (kl_scale = -w)
        signal = zscore(kl) if distill_norm == "zscore" else kl
        advantage = (-distill_weight * signal).clamp(-adv_clip_max, adv_clip_max)
    elif objective in ("pg", "mixed"):
        advantage = advantage.detach()
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return ppo_clip_loss(log_prob, old_log_prob, advantage, clip_range)


@contextmanager
def adapter_active(transformer, adapter_name):
    """Forwards inside use the named peft adapter alone; the student ('default') comes back after
    (peft's set_adapter also restores requires_grad: student trainable, the others frozen)."""
    transformer.set_adapter(adapter_name)
    try:
        yield
    finally:
        transformer.set_adapter("default")


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
    from common.evaluate import evaluate
    from common.lora_merge import attach_lora, load_lora_adapter, merge_loras, read_lora
    from common.models import load_adapter
    from common.models.base import PromptEmbeds
    from common.outputs import MetricsLog, plot_curves, read_metrics, write_recipe
    from common.rewards import MultiReward, collect_rewards, gather_reward_metrics
    from common.rollout import derive_seed, initial_latents, noise_schedule, rollout

    main_process, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # the recipe, printed and in config.json, before any weights load
    write_recipe(args, accelerator, objective=args.objective, routing=args.routing, teachers=list(args.teachers))
    sde.use_compile(args.compile)
    torch.manual_seed(args.seed + rank)
    datasets = build_datasets(args)
    # the cold start is computed before the model loads: mismatched teachers fail here
    initial = None
    if args.init in ("delta_average", "factor_average"):
        initial = merge_loras([d.lora for d in datasets], args.init, rank=args.lora_rank)
    elif args.init == "lora":
        initial = read_lora(args.init_lora)

    # --- the student LoRA ('default'), then one adapter per teacher (+ the MAR anchor) on the same base
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    adapter = load_adapter(args.model, args.pretrained, device=accelerator.device, dtype=weight_dtype,
                           resolution=args.resolution)
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    if args.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    if initial is not None:
        attach_lora(transformer, *initial, "default")
    else:
        add_lora(transformer, args.lora_rank or adapter.lora_rank, args.lora_alpha or adapter.lora_alpha,
                 adapter.lora_target_modules)
    for d in datasets:
        load_lora_adapter(transformer, d.lora, d.adapter_name)
    if args.mar_lora is not None:
        load_lora_adapter(transformer, args.mar_lora, "mar")
    transformer.set_adapter("default")
    params = [p for p in transformer.parameters() if p.requires_grad]
    assert all(".default." in n for n, p in transformer.named_parameters() if p.requires_grad)
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

    # --- data: one pool of every dataset's prompts; `owner` = the dataset (teacher) of each
    pool = [p for d in datasets for p in d.train]
    owner = np.concatenate([np.full(len(d.train), k) for k, d in enumerate(datasets)])
    if args.routing == "category":
        samplers = [GroupSampler(len(pool), args.batch_size, args.group_size, world, rank, args.seed,
                                 weights=category_weights(pool) if args.balance_categories else None)]
        offsets = [0]
    else:
        samplers = [GroupSampler(len(d.train), args.batch_size, args.group_size, world, rank, args.seed,
                                 weights=category_weights(d.train) if args.balance_categories else None)
                    for d in datasets]
        offsets = np.cumsum([0] + [len(d.train) for d in datasets[:-1]]).tolist()
    reward_fns = {spec: MultiReward(parse_reward_spec(spec)) for spec in {args.reward, *(d.reward for d in datasets)}}
    # evaluation: one set per task reward; tag-selected datasets of --prompts are evaluated on
    # the test split filtered to their tags in file order, the set flow_grpo.py evaluates
    eval_sets = {}
    for d in datasets:
        eval_sets.setdefault(d.reward, []).append(d)
    eval_prompts_by_reward = {}
    for spec, members in eval_sets.items():
        if all(m.selector.startswith("tag:") for m in members):
            tags = {t for m in members for t in m.selector[4:].split("+")}
            eval_prompts_by_reward[spec] = [p for p in load_prompts(args.prompts, "test") if p.metadata.get("tag") in tags]
        else:
            eval_prompts_by_reward[spec] = [p for m in members for p in m.test]
    sigmas = adapter.make_sigmas(args.num_steps, args.resolution)
    levels = noise_schedule(args.num_steps, args.noise_level, (0, args.num_steps - 1) if args.final_step_ode else None)
    negative = adapter.negative_embeds() if args.guidance > 1 else None
    steps = list(args.train_steps)
    elements = int(np.prod(adapter.latent_shape(1, args.resolution)[1:]))

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

    def run_eval(epoch):
        metrics = {}
        context = ema.swapped() if ema is not None else nullcontext()
        with context:
            for spec, prompts in eval_prompts_by_reward.items():
                bar = tqdm(desc=f"eval {epoch}", unit="img", disable=not main_process, leave=False)
                tag = "" if len(eval_prompts_by_reward) == 1 else "_" + "+".join(d.name for d in eval_sets[spec])
                picture = (output_dir / "grids" / f"eval{tag}_epoch{epoch:04d}.png"
                           if main_process and args.grid_every and epoch % args.grid_every == 0 else None)
                result, _, _ = evaluate(adapter, prompts, reward_fns[spec], num_steps=args.eval_num_steps,
                                        guidance=args.eval_guidance, seed=args.seed,
                                        images_per_category=args.eval_images_per_category, resolution=args.resolution,
                                        progress=bar, picture=picture, sde=rollout_sde)
                bar.close()
                if len(eval_prompts_by_reward) > 1:  # per dataset group, each with its own reward
                    prefix = "eval/" + "+".join(d.name for d in eval_sets[spec]) + "/"
                    result = {prefix + k[len("eval/"):]: v for k, v in result.items()}
                metrics.update(result)
        if len(eval_prompts_by_reward) > 1:
            metrics["eval/reward_mean"] = float(np.mean([v for k, v in metrics.items() if k.endswith("/reward_mean")]))
        return metrics

    @torch.no_grad()
    def teacher_targets(latents, embeds, owners):
        """Each teacher's (and the anchor's) transition on the student's own states x_j -> x_{j+1}:
        means (B, S, ...) and the teacher's log-prob of the stored x_{j+1} (B, S)."""
        batch, shape = latents.shape[0], latents.shape[2:]
        teacher_mean = torch.zeros(batch, len(steps), *shape)
        teacher_logp = torch.zeros(batch, len(steps))
        anchor_mean = torch.zeros(batch, len(steps), *shape) if args.beta > 0 else None

        def score(rows, into_mean, into_logp=None):
            index = torch.as_tensor(rows)
            x, emb = latents[index].to(accelerator.device), embeds[index]
            for s, j in enumerate(steps):
                with accelerator.autocast():
                    velocity = adapter.predict_velocity(x[:, j], sigmas[j].expand(len(index)), emb, negative, args.guidance)
                out = sde.sde_step(velocity, x[:, j], j, sigmas, float(levels[j]), args.sampler, prev_sample=x[:, j + 1])
                into_mean[index, s] = out.mean.cpu()
                if into_logp is not None:
                    into_logp[index, s] = out.log_prob.cpu()

        for k, d in enumerate(datasets):
            rows = np.flatnonzero(owners == k)
            if len(rows):
                with adapter_active(transformer, d.adapter_name):
                    score(rows, teacher_mean, teacher_logp)
            elif args.fsdp:  # sharded weights: every rank runs every teacher's forwards (they all-gather);
                # a rank without this teacher's rows scores one row into scratch
                with adapter_active(transformer, d.adapter_name):
                    score(np.arange(1), torch.zeros_like(teacher_mean[:1]))
        if anchor_mean is not None:
            every = np.arange(batch)
            if args.mar_lora is not None:
                with adapter_active(transformer, "mar"):
                    score(every, anchor_mean)
            else:
                with adapter.reference():
                    score(every, anchor_mean)
        return teacher_mean, teacher_logp, anchor_mean

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
        # routing: alternate = one dataset (teacher, reward) for the whole epoch; category = the pool
        current = dataset_for_epoch(epoch, [d.epochs_per_cycle for d in datasets]) if args.routing == "alternate" else None
        sampler, offset = (samplers[0], 0) if current is None else (samplers[current], offsets[current])
        reward_spec = args.reward if current is None else datasets[current].reward

        # --- sampling on the student's own SDE trajectory, then the teachers score its states
        samples, futures, drawn, rollout_s, teacher_s = [], [], [], 0.0, 0.0
        for i in tqdm(range(args.batches_per_epoch), desc=f"epoch {epoch}: sampling", disable=not main_process,
                      leave=False):
            sampler.set_epoch(epoch * args.batches_per_epoch + i)
            indices = [offset + j for j in sampler.indices()]
            drawn.append(sampler.global_indices())
            batch = [pool[j] for j in indices]
            embeds = adapter.encode_prompts(batch)
            if args.same_latent:
                seeds = [derive_seed(args.seed, epoch, i, j) for j in indices]
            else:
                seeds = [derive_seed(args.seed, epoch, i, rank * args.batch_size + k) for k in range(len(batch))]
            latents = initial_latents(adapter.latent_shape(len(batch), args.resolution), seeds)
            noise = torch.Generator().manual_seed(derive_seed(args.seed, epoch, i, rank, "sde"))
            rollout_start = time.time()
            with accelerator.autocast():
                trajectory = rollout(adapter, embeds, sigmas, latents, negative=negative, guidance=args.guidance,
                                     noise_level=args.noise_level, sampler=args.sampler, generator=noise,
                                     keep_means=False,
                                     sde_window=(0, args.num_steps - 1) if args.final_step_ode else None)
            rollout_s += time.time() - rollout_start
            futures.append(executor.submit(reward_fns[reward_spec], trajectory.images, [p.text for p in batch],
                                           [p.metadata for p in batch]))
            owners = owner[indices]
            teacher_start = time.time()
            teacher_mean, teacher_logp, anchor_mean = teacher_targets(trajectory.latents, embeds, owners)
            teacher_s += time.time() - teacher_start
            samples.append({"embeds": embeds, "latents": trajectory.latents.cpu(), "log_probs": trajectory.log_probs.cpu(),
                            "indices": torch.tensor(indices), "owners": torch.tensor(owners),
                            "teacher_mean": teacher_mean, "teacher_logp": teacher_logp, "anchor_mean": anchor_mean})
        rewards = collect_rewards(futures, accelerator)
        sampling_s = time.time() - sampling_start

        # --- task reward (logged; `mixed` trains on its group advantage), gathered as in flow_grpo
        all_reward, _, reward_metrics = gather_reward_metrics(rewards, accelerator, epoch)
        metrics.update(reward_metrics)
        local_ids = torch.cat([s["indices"] for s in samples])
        all_ids = accelerator.gather(local_ids.to(accelerator.device)).cpu().numpy()
        per_rank = len(all_reward) // world
        task_adv = torch.tensor(group_advantages(all_reward, all_ids, args.global_std)[rank * per_rank:(rank + 1) * per_rank],
                                dtype=torch.float32)
        views = gather_object([drawn]) if world > 1 else [drawn]
        metrics["dist/num_processes"] = world
        metrics["dist/weights_agree"] = weights_agree(accelerator, params)  # after the last update
        metrics["dist/ranks_agree"] = float(all(view == views[0] for view in views))

        flat = {"embeds": PromptEmbeds.cat([s["embeds"].to("cpu") for s in samples]),
                "latents": torch.cat([s["latents"] for s in samples]),
                "log_probs": torch.cat([s["log_probs"] for s in samples])[:, steps],
                "teacher_mean": torch.cat([s["teacher_mean"] for s in samples]),
                "teacher_logp": torch.cat([s["teacher_logp"] for s in samples]),
                "owners": torch.cat([s["owners"] for s in samples])}
        if args.beta > 0:
            flat["anchor_mean"] = torch.cat([s["anchor_mean"] for s in samples])
        # the detached dense reward: sampled log-ratio of every stored transition (B, S)
        logratio = -pg_rewards(flat["log_probs"], flat["teacher_logp"], elements)
        if args.objective in ("pg", "mixed"):
            distill_adv = pg_rewards(flat["log_probs"], flat["teacher_logp"], elements, args.return_to_go)
            if args.distill_norm == "zscore":
                distill_adv = zscore(distill_adv)
            advantage = args.distill_weight * distill_adv
            if args.objective == "mixed":
                advantage = advantage + args.task_weight * task_adv.clamp(-args.adv_clip_max, args.adv_clip_max)[:, None]
            flat["advantages"] = advantage
        owners_epoch = flat["owners"].numpy()
        for k, d in enumerate(datasets):
            metrics[f"opd/rows/{d.name}"] = int((owners_epoch == k).sum())
            if (owners_epoch == k).any():
                metrics[f"opd/logratio/{d.name}"] = float(logratio[owners_epoch == k].mean())
        metrics["opd/dataset"] = datasets[current].name if current is not None else "all"
        metrics["opd/tags"] = sorted({str(pool[j].metadata.get("tag")) for j in local_ids.cpu().tolist()})
        metrics["opd/logratio"] = float(logratio.mean())  # ≈ D x the per-element KL (its unbiased estimate)

        # --- training: one accelerate micro-step per (micro-batch, trained step); nothing is masked
        transformer.train()
        stats = {"loss": [], "ratio": [], "approx_kl": [], "clipfrac": [], "kl": [], "mar": []}
        on_policy_dev = []
        count = len(flat["owners"])
        micro_batch = count // args.batches_per_epoch
        train_start = time.time()
        for inner in range(args.num_inner_epochs):
            order = (torch.randperm(count, generator=torch.Generator().manual_seed(
                derive_seed(args.seed, epoch, inner, rank, "shuffle"))) if args.shuffle else torch.arange(count))
            first_update = inner == 0
            bar = tqdm(total=args.batches_per_epoch * len(steps), desc=f"epoch {epoch}: training",
                       disable=not main_process, leave=False)
            for b in range(args.batches_per_epoch):
                rows = order[b * micro_batch:(b + 1) * micro_batch]
                embeds = flat["embeds"][rows].to(accelerator.device)
                x_all = flat["latents"][rows].to(accelerator.device)
                for s, j in enumerate(steps):
                    with accelerator.accumulate(wrapped):
                        if args.fsdp:  # accumulate locally, reduce once per update as DDP does (bitwise equal)
                            wrapped.set_requires_gradient_sync(accelerator.sync_gradients)
                        with accelerator.autocast():
                            velocity = adapter.predict_velocity(x_all[:, j], sigmas[j].expand(len(rows)), embeds,
                                                                negative, args.guidance,
                                                                detach_uncond=args.train_cfg_detach_uncond)
                        out = sde.sde_step(velocity, x_all[:, j], j, sigmas, float(levels[j]), args.sampler,
                                           prev_sample=x_all[:, j + 1])
                        device = out.mean.device
                        kl = sde.transition_kl(out.mean, flat["teacher_mean"][rows, s].to(device), out, args.kl_convention)
                        loss, step_stats = distillation_loss(
                            args.objective, out.log_prob, flat["log_probs"][rows, s].to(device), kl,
                            flat["advantages"][rows, s].to(device) if "advantages" in flat else None,
                            clip_range=args.clip_range, adv_clip_max=args.adv_clip_max,
                            distill_weight=args.distill_weight, distill_norm=args.distill_norm)
                        if args.beta > 0:
                            mar = sde.transition_kl(out.mean, flat["anchor_mean"][rows, s].to(device), out,
                                                    args.kl_convention).mean()
                            loss = loss + args.beta * mar
                            stats["mar"].append(mar.item())
                        if not torch.isfinite(loss):
                            # keep every rank's backward count equal (DDP) with a zero-gradient loss
                            nonfinite_streak += 1
                            warnings.warn(f"non-finite loss at epoch {epoch}, step {j}: skipped "
                                          f"({nonfinite_streak} in a row)")
                            loss = sum(p.sum() * 0 for p in params)
                        else:
                            nonfinite_streak = 0
                            stats["loss"].append(loss.item())
                            stats["kl"].append(kl.mean().item())
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
                        "train/kl": mean(stats["kl"]), "opd/mar": mean(stats["mar"]) if args.beta > 0 else 0.0,
                        "perf/epoch_s": epoch_s, "perf/sampling_s": sampling_s, "perf/rollout_s": rollout_s,
                        "perf/teacher_s": teacher_s, "perf/train_s": train_s,
                        "perf/images_per_s": args.batches_per_epoch * args.batch_size * world / sampling_s,
                        "perf/wall_min": (time.time() - start_time) / 60})
        record = log.log(epoch, metrics)
        if main_process:
            accelerator.print({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                               if k.startswith(("epoch", "reward/mean", "train/loss", "train/kl", "opd/dataset",
                                                "eval/acc", "perf/epoch"))})
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

    # --- final evaluation, curves, export of the student's LoRA (EMA weights)
    if args.eval_every > 0 and (epoch > start_epoch or start_epoch == args.num_epochs):
        final = run_eval(epoch)
        log.log(epoch, {**final, "perf/wall_min": (time.time() - start_time) / 60})
    executor.shutdown()
    if main_process:
        history = read_metrics(output_dir / "metrics.jsonl")
        series = {"teacher KL (train)": ([r["epoch"] for r in history if r.get("train/kl") is not None],
                                         [r["train/kl"] for r in history if r.get("train/kl") is not None]),
                  "task reward (SDE)": ([r["epoch"] for r in history if r.get("reward/mean") is not None],
                                        [r["reward/mean"] for r in history if r.get("reward/mean") is not None])}
        evals = [r for r in history if r.get("eval/accuracy") is not None]
        if evals:
            series["eval accuracy (ODE, test)"] = ([r["epoch"] for r in evals], [r["eval/accuracy"] for r in evals])
        plot_curves(output_dir / "reward_curve.png", series, title=args.exp_name)
        # the model's own figures (gmm: the frontier); they run forwards on this process alone, which sharded
        # weights cannot
        if args.eval_every > 0 and len(eval_prompts_by_reward) == 1 and not args.fsdp:
            (spec, prompts), = eval_prompts_by_reward.items()
            adapter.report(output_dir, history, reward_fns[spec], prompts, seed=args.seed, num_steps=args.eval_num_steps,
                           guidance=args.eval_guidance, images_per_category=args.eval_images_per_category)
    # every rank: under --fsdp the LoRA is gathered from the shards, the main process writes
    export_final(transformer, output_dir / "final", ema=ema, merged=args.export_merged, write=main_process)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    args = parse_args()
    try:
        validate(args)  # fail fast on bad arguments, before accelerate or any model starts
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    main(args)
