"""Training throughput against the transformer's own cost (issue 21): `python bench/train_throughput.py`

    python bench/train_throughput.py --model sd3 --tiny                 # CPU, tiny SD3.5-shaped model: < 2 min
    python bench/train_throughput.py --model sd3                        # one GPU: SD3.5-M architecture, random
                                                                        # weights, the sd3 recipe (512 px, fp16,
                                                                        # LoRA r32, batch 9), SDE eager and compiled
    python bench/train_throughput.py --model sd3 --finetune full --dtype bf16

The model is the adapter (`common.models.sd3.SD3Adapter`) around a pipeline built from config with
random weights: the published architecture (SD3.5-M's transformer and VAE configs, written from its
model card; no hub) or `--tiny`, the sizes of tests/tiny_pipelines.py with SD3.5's qk-norm and one
dual-attention block. Prompts are random embeddings of the text encoders' output shapes (77 CLIP
+ 128 T5 tokens), as the encoders do not run in the loop's timed phases. The loop's settings come
from flow_grpo.py's `sd3` preset (10 steps, Flow-SDE a = 0.7, CFG 4.5 as one [uncond; cond]
forward, steps 0-8 trained, PPO clip 1e-4).

It also splits each call's time, timed inside the call (transformer, SDE step, the rest). On CPU with one
thread the clock is the process's CPU time (other jobs on the cores do not inflate it).

Measured, each variant timed in turn within every repeat (the order rotated, so background load
hits all alike) and reported as the median over repeats:
- rollout: `common.rollout.rollout`, as flow_grpo.py calls it, against the bare transformer forward on
  the same batches (the [uncond; cond] inputs built beforehand), steps x forward;
- training micro-step: flow_grpo.py's inner step (predict_velocity with CFG, the SDE step's
  log-prob of the stored transition, its PPO-clip loss and statistics, backward; no optimizer step,
  which runs once per update), against the bare forward+backward on the same batches;
- their ratios (the overhead of everything that is not the model), images or samples per second,
  peak memory (CUDA: max_memory_allocated; CPU: the resident set's high-water mark), FLOPs of the
  transformer calls (torch.utils.flop_counter) and MFU against the GPU's dense peak for the dtype.
On CUDA also: the SDE step's kernels and time per call eager vs compiled (torch.profiler),
recompilations after the first epoch (torch._dynamo counters; on CPU too with --compile), and the
on-policy ratio's
max |ratio - 1| per denoising step in fp32, fp16 and bf16, eager and compiled (the rollout, then the
training forward with gradients on the same batch, before any update).
"""

import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import tyro  # noqa: E402

from flow_grpo import PRESETS, ppo_clip_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_TOKENS = 77  # CLIP-L and CLIP-G states, concatenated on the feature axis; T5's follow on the sequence

# SD3.5-M (stabilityai/stable-diffusion-3.5-medium): transformer/config.json, vae/config.json and the
# scheduler's shift, as published with the model. MMDiT-X: blocks 0-12 add a second self-attention.
ARCHITECTURES = {
    "sd3": dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                 use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
        scheduler=dict(num_train_timesteps=1000, shift=3.0)),
    # tests/tiny_pipelines.py's sizes, plus SD3.5's qk rms-norm and a dual-attention block (its code path)
    "sd3-tiny": dict(
        transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                         caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                         qk_norm="rms_norm", dual_attention_layers=(0,)),
        vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8,) * 4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=1, norm_num_groups=4, sample_size=64, use_quant_conv=False,
                 use_post_quant_conv=False, scaling_factor=1.5035, shift_factor=0.0609),
        scheduler=dict(num_train_timesteps=1000, shift=3.0)),
}

# Dense tensor-core peaks in TFLOP/s from NVIDIA's datasheets (no sparsity). fp32 is the non-tensor
# figure: PyTorch leaves TF32 matmuls off by default. Matched in order against the device name.
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", {"fp16": 756, "bf16": 756, "fp32": 51}),
    ("H800 PCIe", {"fp16": 756, "bf16": 756, "fp32": 51}),
    ("H100", {"fp16": 989, "bf16": 989, "fp32": 67}),
    ("H800", {"fp16": 989, "bf16": 989, "fp32": 67}),
    ("H200", {"fp16": 989, "bf16": 989, "fp32": 67}),
    ("GH200", {"fp16": 989, "bf16": 989, "fp32": 67}),
    ("A100", {"fp16": 312, "bf16": 312, "fp32": 19.5}),
    ("A800", {"fp16": 312, "bf16": 312, "fp32": 19.5}),
    ("L40S", {"fp16": 362, "bf16": 362, "fp32": 91.6}),
    ("L40", {"fp16": 181, "bf16": 181, "fp32": 90.5}),
    ("L4", {"fp16": 121, "bf16": 121, "fp32": 30.3}),
    ("A10G", {"fp16": 70, "bf16": 70, "fp32": 31.2}),
    ("A10", {"fp16": 125, "bf16": 125, "fp32": 31.2}),
    ("RTX 4090", {"fp16": 165, "bf16": 165, "fp32": 82.6}),
    ("RTX 3090", {"fp16": 71, "bf16": 71, "fp32": 35.6}),
    ("V100", {"fp16": 125, "fp32": 15.7}),
]


@dataclass
class Args:
    model: Literal["sd3"] = "sd3"
    """model adapter; its architecture is built from config with random weights"""
    tiny: bool = False
    """the tiny config (CPU, seconds) instead of the published architecture"""
    resolution: Optional[int] = None
    """image size in pixels (default: the recipe's 512; --tiny: 128)"""
    dtype: Optional[Literal["fp32", "fp16", "bf16"]] = None
    """autocast dtype of the transformer, base weights stored in it (default: the recipe's fp16 on CUDA, fp32
    on CPU); trainable weights and the SDE maths stay fp32, as in flow_grpo.py"""
    finetune: Literal["lora", "full"] = "lora"
    """train a LoRA (the adapter's targets) or every transformer weight"""
    lora_rank: Optional[int] = None
    """LoRA rank, alpha = 2 x rank (default: the adapter's 32; --tiny: 4)"""
    batch: Optional[int] = None
    """images per rollout = the training micro-batch; CFG doubles each forward (default: the recipe's 9 per
    GPU; --tiny: 8)"""
    compile: Optional[Literal["off", "on", "both"]] = None
    """the SDE step eager, torch.compile'd, or both side by side (default: both on CUDA, off on CPU)"""
    repeats: Optional[int] = None
    """timed repeats of every variant, medians reported (default: 7 with --tiny, else 3)"""
    precision_batch: Optional[int] = None
    """batch of the on-policy ratio table (default: --batch with --tiny, else 2: an fp32 forward with
    gradients at the recipe's 18 images per forward may not fit)"""
    peak_tflops: Optional[float] = None
    """the device's peak TFLOP/s for the dtype (default: the GPU table; on CPU MFU is n/a without it)"""
    threads: Optional[int] = None
    """CPU threads (default 1: on a shared machine two OpenMP threads spin against other jobs and single
    timings swing by 10x)"""
    seed: int = 0
    """seeds the random weights, embeddings and noise"""
    json: Optional[str] = None
    """also write every figure to this JSON file"""


# ------------------------------------------------------------------------------- building the model


def build_adapter(model, tiny, device, dtype):
    """The model's adapter around a pipeline built from config with random weights (no text encoders)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline

    from diffusers.utils import logging

    from common.models.sd3 import SD3Adapter

    logging.set_verbosity_error()  # `.to(dtype)` warns about fp32-kept modules, and SD3 has none
    config = ARCHITECTURES[model + ("-tiny" if tiny else "")]
    with torch.device(device):  # initialise on the device: the published model has 2.2 B weights
        transformer = SD3Transformer2DModel(**config["transformer"])
        vae = AutoencoderKL(**config["vae"])
    pipeline = StableDiffusion3Pipeline(transformer=transformer.to(dtype), vae=vae,  # VAE in fp32, as load() does
                                        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
                                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        text_encoder_3=None, tokenizer_3=None)
    for module in (transformer, vae):
        module.requires_grad_(False).eval()
    return SD3Adapter(pipeline, device, dtype)


def make_trainable(adapter, finetune, rank):
    """flow_grpo.py's set-up: a LoRA on the adapter's targets or every weight; trainable weights in fp32."""
    from common.checkpoint import add_lora

    transformer = adapter.transformer
    transformer.requires_grad_(False)
    if finetune == "lora":
        add_lora(transformer, rank, 2 * rank, adapter.lora_target_modules)
    else:
        transformer.requires_grad_(True)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def random_embeds(adapter, batch, generator):
    """Prompt embeddings of the SD3 encoders' output shapes: (B, 77 + T5 tokens, joint dim) and (B, pooled)."""
    from common.models.base import PromptEmbeds

    config = adapter.transformer.config
    tokens = CLIP_TOKENS + adapter.max_sequence_length
    hidden = torch.randn(batch, tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    return PromptEmbeds(hidden=hidden, pooled=pooled).to(device=adapter.device, dtype=adapter.dtype)


# ------------------------------------------------------------------------------- measuring


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# On CPU with one thread, time this process's CPU time: on a shared machine other jobs take the
# cores in slices and wall time swings by +-30 % between two calls of the same work; CPU time counts
# only the work done (equal to wall time on an idle machine). CUDA, or several threads: wall time.
_now = time.perf_counter


def use_cpu_time(enabled):
    global _now
    _now = time.process_time if enabled else time.perf_counter


def timed(fn, device):
    synchronize(device)
    start = _now()
    fn()
    synchronize(device)
    return _now() - start


def peak_memory(fn, device):
    """Peak bytes while `fn` runs: CUDA max_memory_allocated; CPU the resident set's high-water mark
    (VmHWM, reset through /proc/self/clear_refs; else ru_maxrss, the process's lifetime peak)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device), "allocated"
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        fn()
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
        return kib * 1024, "RSS"
    except OSError:
        import resource

        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS, process lifetime"


def _cpu_sdpa_flops():
    """FlopCounterMode counts the CUDA attention kernels but not CPU's fused one; the same formulas for it."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(fn):
    """FLOPs of the matmuls, convolutions and attention `fn` runs (elementwise ops count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter:
        fn()
    return counter.get_total_flops()


def device_peak_flops(device, dtype_name, override_tflops):
    """(peak FLOP/s or None, where it came from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if device.type != "cuda":
        return None, "n/a on CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in name:
            if dtype_name not in peaks:
                return None, f"n/a: {name} has no {dtype_name} peak in the table (pass --peak-tflops)"
            return peaks[dtype_name] * 1e12, f"{name}: {peaks[dtype_name]:g} TFLOP/s {dtype_name} dense"
    return None, f"n/a: {name} is not in the peak table (pass --peak-tflops)"


def compiled_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def sde_step_profile(shape, sigmas, recipe, device, compiled, mode, calls=20):
    """Kernels and wall time per SDE step call, eager or compiled: `rollout` draws a sample without
    gradients; `training` scores a stored one and back-propagates its log-prob into the velocity."""
    from torch.profiler import ProfilerActivity, profile

    from common import sde

    sde.use_compile(compiled)
    generator = [torch.Generator().manual_seed(k) for k in range(shape[0])]  # one per sample, as flow_grpo.py
    velocity = torch.randn(shape, device=device, requires_grad=mode == "training")
    x, prev = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def call():
        if mode == "rollout":
            with torch.no_grad():
                sde.sde_step(velocity, x, 3, sigmas, recipe.noise_level, recipe.sampler, generator=generator,
                             logprob=recipe.logprob)
        else:
            out = sde.sde_step(velocity, x, 3, sigmas, recipe.noise_level, recipe.sampler, prev_sample=prev,
                               logprob=recipe.logprob)
            out.log_prob.sum().backward()

    for _ in range(3):  # compiles
        call()
    per_call = statistics.median(timed(call, device) for _ in range(calls))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        synchronize(device)
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    sde.use_compile(False)
    return {"kernels_per_call": len(kernels) / calls, "copies_per_call": (len(device_events) - len(kernels)) / calls,
            "us_per_call": per_call * 1e6}


# ------------------------------------------------------------------------------- the loop's calls


class Workload:
    """The rollout and training calls of flow_grpo.py's loop and their bare-transformer counterparts,
    on fixed batches."""

    def __init__(self, adapter, recipe, batch, resolution, train_steps, generator):
        from common.rollout import initial_latents, noise_schedule

        self.adapter, self.recipe, self.batch, self.train_steps = adapter, recipe, batch, train_steps
        self.resolution = resolution
        self.sigmas = adapter.make_sigmas(recipe.num_steps, resolution)
        self.levels = noise_schedule(recipe.num_steps, recipe.noise_level)
        self.embeds = random_embeds(adapter, batch, generator)
        self.negative = random_embeds(adapter, 1, generator)  # the empty prompt's, batch 1 as flow_grpo.py holds it
        self.latents = initial_latents(adapter.latent_shape(batch, resolution), range(batch))
        self.advantages = torch.randn(batch, generator=generator).to(adapter.device)
        self.autocast = (nullcontext if adapter.dtype == torch.float32 else
                         lambda: torch.autocast(adapter.device.type, dtype=adapter.dtype))
        self.trajectory = None

    def rollout(self, decode=False):
        from common.rollout import rollout

        self.adapter.transformer.eval()
        with self.autocast():
            return rollout(self.adapter, self.embeds, self.sigmas, self.latents, negative=self.negative,
                           guidance=self.recipe.guidance, noise_level=self.recipe.noise_level,
                           sampler=self.recipe.sampler, generator=self.noise(),
                           logprob=self.recipe.logprob, keep_means=False, decode=decode)

    def noise(self):
        """One SDE noise generator per sample, as flow_grpo.py draws them."""
        return [torch.Generator().manual_seed(10_000 + k) for k in range(self.batch)]

    def keep(self, trajectory):
        """Store a rollout for training, and the bare calls' inputs built from its batches."""
        from common.models.base import PromptEmbeds

        self.trajectory = trajectory
        batch, dtype = self.batch, self.adapter.dtype
        self.both = PromptEmbeds.cat([self.negative.repeat(batch), self.embeds])
        x = trajectory.latents.to(self.adapter.device)
        self.bare_inputs = [(torch.cat([x[:, j], x[:, j]]).to(dtype),
                             self.sigmas[j].expand(2 * batch).to(self.adapter.device))
                            for j in range(self.recipe.num_steps)]

    def decode(self):
        with torch.no_grad():
            return self.adapter.decode(self.trajectory.latents[:, -1].to(self.adapter.device))

    def micro_step(self, j, backward=True, clock=None):
        """flow_grpo.py's training micro-step at denoising step j (accelerate's wrappers aside); returns
        the ratio. `clock` (a dict): add the seconds of each piece to it."""
        from common import sde

        adapter, recipe, trajectory = self.adapter, self.recipe, self.trajectory
        mark = marker(clock, adapter.device)
        x_all = trajectory.latents.to(adapter.device)
        old = trajectory.log_probs.to(adapter.device)
        with self.autocast():
            velocity = adapter.predict_velocity(x_all[:, j], self.sigmas[j].expand(self.batch), self.embeds,
                                                self.negative, recipe.guidance,
                                                detach_uncond=recipe.train_cfg_detach_uncond)
        mark("predict_velocity")
        out = sde.sde_step(velocity, x_all[:, j], j, self.sigmas, float(self.levels[j]), recipe.sampler,
                           prev_sample=x_all[:, j + 1], logprob=recipe.logprob)
        loss, stats = ppo_clip_loss(out.log_prob, old[:, j], self.advantages, recipe.clip_range, recipe.adv_clip_max)
        if not backward:
            return stats["ratio"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {j}: the random weights overflow in this dtype")
        # the statistics flow_grpo.py logs every micro-step (each .item() waits for the device)
        loss.item(), stats["ratio"].mean().item(), stats["approx_kl"].item(), stats["clipfrac"].item()
        (stats["ratio"] - 1).abs().max().item()
        mark("SDE log-prob, PPO loss, statistics")
        loss.backward()
        mark("backward")
        return stats["ratio"]

    def training_pass(self, clock=None):
        self.adapter.transformer.train()
        for j in self.train_steps:
            self.micro_step(j, clock=clock)

    def bare_forwards(self):
        with torch.no_grad(), self.autocast():
            for x2, sigma2 in self.bare_inputs:
                self.adapter.transformer_forward(x2, sigma2, self.both)

    def bare_forward_backwards(self, clock=None):
        self.adapter.transformer.train()
        mark = marker(clock, self.adapter.device)
        for j in self.train_steps:
            x2, sigma2 = self.bare_inputs[j]
            with self.autocast():
                out = self.adapter.transformer_forward(x2, sigma2, self.both)
            mark("forward")
            out.backward(torch.ones_like(out))
            mark("backward")


def marker(clock, device):
    """mark(name): add the seconds since the previous mark (or since this call) to clock[name]."""
    last = [_now()]

    def mark(name):
        if clock is None:
            return
        synchronize(device)
        now = _now()
        clock[name] = clock.get(name, 0.0) + now - last[0]
        last[0] = now

    if clock is not None:
        synchronize(device)
        last[0] = _now()
    return mark


def breakdown(workload):
    """Where one rollout's and one training pass's time goes, timed inside the calls (the device
    synchronised around each piece, which on CUDA removes their overlap): background load slows the
    pieces of one call alike, so these shares are steadier than ratios of separate calls. Per step."""
    import common.rollout as rollout_module

    adapter, device = workload.adapter, workload.adapter.device
    clock = {}

    def clocked(name, fn):
        def call(*args, **kwargs):
            synchronize(device)
            start = _now()
            out = fn(*args, **kwargs)
            synchronize(device)
            clock[name] = clock.get(name, 0.0) + _now() - start
            return out
        return call

    sde_step = rollout_module.sde_step
    adapter.transformer_forward = clocked("transformer", adapter.transformer_forward)  # shadows the method
    rollout_module.sde_step = clocked("sde_step", sde_step)
    try:
        total = timed(workload.rollout, device)
        steps = workload.recipe.num_steps
        rollout = {"transformer forward": clock.pop("transformer") / steps, "SDE step": clock.pop("sde_step") / steps}
        rollout["CFG concat, casts, guidance, bookkeeping"] = total / steps - sum(rollout.values())
        workload.training_pass(clock)
        trained = len(workload.train_steps)
        forward = clock.pop("transformer")
        training = {"transformer forward": forward / trained,
                    "CFG concat, casts, guidance": (clock.pop("predict_velocity") - forward) / trained,
                    "SDE log-prob, PPO loss, statistics": clock.pop("SDE log-prob, PPO loss, statistics") / trained,
                    "backward (transformer + SDE step)": clock.pop("backward") / trained}
        workload.bare_forward_backwards(clock)
        bare = {"forward": clock.pop("forward") / trained, "backward": clock.pop("backward") / trained}
    finally:
        del adapter.transformer_forward
        rollout_module.sde_step = sde_step
    return {"rollout": rollout, "training": training, "bare forward+backward": bare}


def zero_grads(params):
    for p in params:
        p.grad = None


def on_policy_deviation(workload, modes, params):
    """max |ratio - 1| per trained step: a rollout, then flow_grpo.py's training forward (with gradients,
    same batch, same [uncond; cond] layout) before any update, per dtype and SDE-step mode."""
    from common import sde

    adapter, table = workload.adapter, {}
    frozen = [p for p in adapter.transformer.parameters() if not p.requires_grad]
    embeds, negative = workload.embeds, workload.negative
    for name, dtype in DTYPES.items():
        for p in frozen:  # the base weights are stored in the dtype; trainable ones stay fp32
            p.data = p.data.to(dtype)
        adapter.dtype = dtype
        workload.embeds, workload.negative = embeds.to(dtype=dtype), negative.to(dtype=dtype)
        workload.autocast = nullcontext if dtype == torch.float32 else (
            lambda dtype=dtype: torch.autocast(adapter.device.type, dtype=dtype))
        for mode in modes:
            sde.use_compile(mode == "compiled")
            workload.trajectory = workload.rollout()
            adapter.transformer.train()
            deviations = []
            for j in workload.train_steps:
                ratio = workload.micro_step(j, backward=False)
                deviations.append(float((ratio.detach() - 1).abs().max()))
            table[f"{name} {mode}"] = deviations
            zero_grads(params)
    sde.use_compile(False)
    return table


# ------------------------------------------------------------------------------- the report


def fmt_bytes(n):
    return f"{n / 2**20:,.0f} MiB" if n < 2**34 else f"{n / 2**30:,.1f} GiB"


def fmt_time(seconds):
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds:,.3f} s"


def resolve(args):
    """Fill the defaults that depend on the device and --tiny; errors say what to change."""
    cuda = torch.cuda.is_available()
    recipe = PRESETS[args.model]
    resolution = args.resolution or (128 if args.tiny else recipe.resolution)
    dtype = args.dtype or ("fp32" if args.tiny or not cuda else recipe.mixed_precision)
    batch = args.batch or (8 if args.tiny else recipe.batch_size)
    compile_mode = args.compile or ("both" if cuda else "off")
    patch = ARCHITECTURES[args.model + ("-tiny" if args.tiny else "")]["transformer"]
    tokens_per_side = resolution // 8 // patch["patch_size"]
    if resolution % (8 * patch["patch_size"]) or tokens_per_side > patch["pos_embed_max_size"]:
        raise SystemExit(f"--resolution {resolution}: must be a multiple of {8 * patch['patch_size']} and at most "
                         f"{8 * patch['patch_size'] * patch['pos_embed_max_size']} for this config")
    precision_batch = args.precision_batch or (batch if args.tiny else min(batch, 2))
    rank = args.lora_rank or (4 if args.tiny else None)
    repeats = args.repeats or (7 if args.tiny else 3)
    if batch < 1 or repeats < 1:
        raise SystemExit("--batch and --repeats must be at least 1")
    return recipe, resolution, dtype, batch, compile_mode, precision_batch, rank, repeats


def main(args: Args):
    from common import sde
    from common.models import get_adapter_class

    recipe, resolution, dtype_name, batch, compile_mode, precision_batch, rank, repeats = resolve(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    use_cpu_time(device.type == "cpu" and torch.get_num_threads() == 1)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    rank = rank or get_adapter_class(args.model).lora_rank
    modes = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[compile_mode]
    num_steps = recipe.num_steps
    last = num_steps - 1 if recipe.final_step_ode else num_steps
    train_steps = [j for j in range(int(num_steps * recipe.timestep_fraction)) if j < min(last, num_steps - 1)]

    build_start = time.perf_counter()
    adapter = build_adapter(args.model, args.tiny, device, DTYPES[dtype_name])
    params = make_trainable(adapter, args.finetune, rank)
    build_s = time.perf_counter() - build_start
    workload = Workload(adapter, recipe, batch, resolution, train_steps, generator)

    # first epoch: every variant once (compiles the SDE step's graphs), then the trajectory training uses
    def run_mode(mode, fn):
        def call():
            sde.use_compile(mode == "compiled")
            fn()
        return call

    for mode in modes:
        sde.use_compile(mode == "compiled")
        workload.keep(workload.rollout())
        workload.training_pass()
        zero_grads(params)
    graphs_first_epoch = compiled_graphs()
    sde.use_compile(modes[0] == "compiled")
    workload.keep(workload.rollout())
    workload.decode()
    workload.bare_forwards()
    workload.bare_forward_backwards()
    zero_grads(params)

    rollout_variants = {f"rollout {mode}": run_mode(mode, workload.rollout) for mode in modes}
    rollout_variants["bare forward"] = workload.bare_forwards
    rollout_variants["decode"] = workload.decode
    train_variants = {f"training {mode}": run_mode(mode, workload.training_pass) for mode in modes}
    train_variants["bare forward+backward"] = workload.bare_forward_backwards
    times = {name: [] for name in [*rollout_variants, *train_variants]}
    pieces = {mode: [] for mode in modes}
    for repeat in range(repeats):  # every repeat is one more epoch of the same calls
        for variants in (rollout_variants, train_variants):
            names = list(variants)
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed(variants[name], device))
                zero_grads(params)
        for mode in modes:
            sde.use_compile(mode == "compiled")
            pieces[mode].append(breakdown(workload))
            zero_grads(params)
    recompilations = compiled_graphs() - graphs_first_epoch
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {}
    for mode in modes:
        ratios[f"rollout {mode}"] = statistics.median(
            r / b for r, b in zip(times[f"rollout {mode}"], times["bare forward"]))
        ratios[f"training {mode}"] = statistics.median(
            t / b for t, b in zip(times[f"training {mode}"], times["bare forward+backward"]))

    split = {mode: {part: {name: statistics.median(r[part][name] for r in runs) for name in runs[0][part]}
                    for part in runs[0]} for mode, runs in pieces.items()}
    memory = {}
    for name, fn in [*rollout_variants.items(), *train_variants.items()]:
        memory[name] = peak_memory(fn, device)
        zero_grads(params)
    synchronize(device)
    at_rest = torch.cuda.memory_allocated(device) if device.type == "cuda" else peak_memory(lambda: None, device)[0]

    # FLOPs of the transformer calls, counted on the loop's own calls (SDE step eager: the counter is a
    # dispatch mode, which compiled code does not go through; the step has no matmuls to count)
    sde.use_compile(False)
    flops = {"rollout": count_flops(workload.rollout), "bare forward": count_flops(workload.bare_forwards),
             "training": count_flops(workload.training_pass),
             "bare forward+backward": count_flops(workload.bare_forward_backwards)}
    zero_grads(params)
    peak, peak_source = device_peak_flops(device, dtype_name, args.peak_tflops)

    profiles = None
    if device.type == "cuda":
        shape = workload.latents.shape
        profiles = {f"{mode} {kind}": sde_step_profile(shape, workload.sigmas, recipe, device, mode == "compiled", kind)
                    for kind in ("rollout", "training") for mode in ("eager", "compiled")}

    # last: it recasts the base weights to each dtype in turn
    if precision_batch != batch:
        workload = Workload(adapter, recipe, precision_batch, resolution, train_steps, generator)
    precision = on_policy_deviation(workload, ["eager", "compiled"] if device.type == "cuda" else modes, params)

    # ---- print
    config = adapter.transformer.config
    total_params = sum(p.numel() for p in adapter.transformer.parameters())
    trainable = sum(p.numel() for p in params)
    latent = resolution // 8
    image_tokens = (latent // config.patch_size) ** 2
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} thread(s)")
    timer = "CPU time of this process" if _now is time.process_time else "wall time"
    print(f"cleanflow training throughput: {args.model}{' --tiny' if args.tiny else ' (SD3.5-M architecture)'}, "
          f"random weights ({total_params / 1e6:,.4g} M transformer parameters, {trainable / 1e6:,.3g} M trained: "
          f"{'LoRA r' + str(rank) if args.finetune == 'lora' else 'full fine-tuning'}), built in {build_s:.1f} s")
    print(f"{resolution} px (latent {latent}x{latent}: {image_tokens} image + "
          f"{CLIP_TOKENS + adapter.max_sequence_length} text tokens), {dtype_name}, batch {batch} (CFG {recipe.guidance:g}: "
          f"{2 * batch} per forward), {num_steps} steps, {len(train_steps)} trained, {recipe.sampler} a = "
          f"{recipe.noise_level:g}; {device_name}; {timer}, medians of {repeats} interleaved repeats")
    print()
    print("| measured | time | throughput | TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|")

    def row(label, seconds, count, unit, flop_count, memory_entry):
        achieved = flop_count / seconds if flop_count else None
        mfu = f"{100 * achieved / peak:.1f} %" if peak and achieved else ("–" if not flop_count else peak_source)
        tflops = f"{achieved / 1e12:.3g}" if achieved else "–"
        mem = f"{fmt_bytes(memory_entry[0])} ({memory_entry[1]})" if memory_entry else "–"
        print(f"| {label} | {fmt_time(seconds)} | {count / seconds:,.2f} {unit} | {tflops} | {mfu} | {mem} |")
        return {"time_s": seconds, f"{unit.replace('/', '_per_')}": count / seconds,
                "tflops": achieved / 1e12 if achieved else None,
                "mfu": achieved / peak if peak and achieved else None,
                "peak_memory_bytes": memory_entry[0] if memory_entry else None}

    figures = {}
    for mode in modes:
        figures[f"rollout {mode}"] = row(f"rollout images/s ({num_steps} steps, SDE step {mode})",
                                         median[f"rollout {mode}"], batch, "images/s", flops["rollout"],
                                         memory[f"rollout {mode}"])
    figures["bare forward"] = row(f"bare forward x {num_steps} (same batches)", median["bare forward"], batch,
                                  "images/s", flops["bare forward"], memory["bare forward"])
    figures["decode"] = row("VAE decode (fp32)", median["decode"], batch, "images/s", None, memory["decode"])
    for mode in modes:
        figures[f"rollout+decode {mode}"] = row(f"rollout images/s incl. decode (SDE step {mode})",
                                                median[f"rollout {mode}"] + median["decode"], batch, "images/s",
                                                None, None)
    per_step = len(train_steps)
    for mode in modes:
        figures[f"training {mode}"] = row(f"training samples/s per trained step (SDE step {mode})",
                                          median[f"training {mode}"] / per_step, batch, "samples/s",
                                          flops["training"] / per_step, memory[f"training {mode}"])
    figures["bare forward+backward"] = row("bare forward+backward (same batches)",
                                           median["bare forward+backward"] / per_step, batch, "samples/s",
                                           flops["bare forward+backward"] / per_step, memory["bare forward+backward"])
    print()
    print(f"resident at rest (weights, inputs): {fmt_bytes(at_rest)}; MFU peak: {peak_source}; FLOPs per "
          f"[uncond; cond] forward: {flops['bare forward'] / num_steps / 1e9:,.3g} GFLOP, per forward+backward: "
          f"{flops['bare forward+backward'] / per_step / 1e9:,.3g} GFLOP")
    if flops["rollout"] != flops["bare forward"] or flops["training"] != flops["bare forward+backward"]:
        print(f"note: the loop's calls count {flops['rollout']:.4g} / {flops['training']:.4g} FLOPs against the bare "
              f"{flops['bare forward']:.4g} / {flops['bare forward+backward']:.4g}")
    print()
    print(f"overhead ratios (median over {repeats} repeats of each repeat's pair):")
    for mode in modes:
        print(f"  rollout / (steps x bare forward), SDE step {mode}: {ratios[f'rollout {mode}']:.3f}  (target <= 1.05)")
        print(f"  training step / bare forward+backward, SDE step {mode}: {ratios[f'training {mode}']:.3f}  "
              f"(target <= 1.10)")
    epoch = {mode: recipe.batches_per_epoch * (median[f"rollout {mode}"] + median["decode"]
                                                + median[f"training {mode}"]) for mode in modes}
    print(f"  an epoch of the recipe ({recipe.batches_per_epoch} batches x (rollout + decode + {per_step} micro-steps), "
          f"rewards, optimizer steps and beta > 0's reference forward left out): "
          + ", ".join(f"{mode} {fmt_time(s)}" for mode, s in epoch.items()))
    print()
    print(f"where the time goes, per step (timed inside the calls, the device synchronised at each piece; "
          f"median of {repeats}):")
    for mode in modes:
        for part, names in split[mode].items():
            total = sum(names.values())
            shares = ", ".join(f"{name} {fmt_time(t)} ({100 * t / total:.1f} %)" for name, t in names.items())
            print(f"  {part} (SDE step {mode}): {shares}")
        rollout_split, training_split = split[mode]["rollout"], split[mode]["training"]
        outside = sum(training_split.values()) - training_split["transformer forward"] - training_split[
            "backward (transformer + SDE step)"]
        print(f"  in-call (SDE step {mode}): rollout / its own transformer forwards "
              f"{sum(rollout_split.values()) / rollout_split['transformer forward']:.3f}; training micro-step outside "
              f"the transformer's forward and the backward: {100 * outside / sum(training_split.values()):.1f} %")
    print()
    if profiles is None:
        print("compiled SDE step, kernels and time per call (eager vs compiled): n/a on CPU")
    else:
        print("compiled SDE step, kernels and time per call (torch.profiler, latents "
              f"{tuple(workload.latents.shape)}):")
        for name, p in profiles.items():
            print(f"  {name}: {p['kernels_per_call']:.0f} kernels + {p['copies_per_call']:.0f} copies, "
                  f"{p['us_per_call']:.0f} us per call")
    if "compiled" in modes:
        print(f"recompilations after the first epoch: {recompilations} ({graphs_first_epoch} graphs compiled in the "
              f"first; {repeats} more epochs)")
    else:
        print("recompilations after the first epoch: n/a (SDE step eager; --compile on or both)")
    print()
    columns = list(precision)
    print(f"on-policy max |ratio - 1| per denoising step (batch {workload.batch}, before any update"
          + ("" if any("compiled" in c for c in columns) else "; compiled: n/a on CPU without --compile on or both")
          + "):")
    print("| step | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, j in enumerate(train_steps):
        print(f"| {j} | " + " | ".join(f"{precision[c][i]:.2e}" for c in columns) + " |")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": {"model": args.model, "tiny": args.tiny, "resolution": resolution, "dtype": dtype_name,
                       "finetune": args.finetune, "lora_rank": rank if args.finetune == "lora" else None,
                       "batch": batch, "compile": compile_mode, "repeats": repeats, "device": device_name, "timer": timer,
                       "transformer_params": total_params, "trainable_params": trainable},
            "figures": figures, "ratios": ratios, "flops": flops, "times": times, "peak": peak_source,
            "sde_step_profile": profiles, "recompilations": recompilations if "compiled" in modes else None,
            "on_policy_ratio_dev_max": precision, "breakdown": split, "epoch_s": epoch}, indent=1))
    return figures, ratios


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
