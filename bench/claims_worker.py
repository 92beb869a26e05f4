"""One (arm, seed) of bench/claims.py, run in-process and instrumented; the statistics it reports.

A worker calls an algorithm file's `main(parse_args(argv))`, exactly as a user's run, with three
bench-side instruments patched in for the duration (no algorithm file or common/ module changes):

- **compute**: every forward of the gmm velocity net outside evaluation adds its batch size in
  *forward-equivalents* (1 per point; 3 when it runs with gradients, forward + backward), read
  at each evaluation: the compute each evaluation's reward cost to reach (claim b);
- **diagnostics schedule**: the exact marginal KL (Newton inversion of every ODE step, the
  evaluation's only costly part) is computed only at the epochs an arm needs it; evaluations in
  between score the reward alone;
- **report**: the end-of-run frontier figure only for the arms whose claim reads it.

After training a worker can also score the final model per task (claim f) and measure its
rollout sampler's final samples (claim c). Everything returned is plain JSON.
"""

import importlib
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"single": "gmm@tag:single", "multi": "gmm@tag:pair+half+any"}  # the two Flow-OPD teachers' tasks


# ------------------------------------------------------------------------------- statistics


def mean_ci(values, level=0.95):
    """(mean, half-width of the Student-t interval, n) over seeds; NaNs are left out."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), 0
    if len(values) == 1:
        return float(values[0]), float("nan"), 1
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half), len(values)


def standard_error(values):
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def crossing(xs, ys, level):
    """The first x at which y reaches `level`, linearly interpolated between the bracketing
    points; None if it never does (the run is censored at its last x)."""
    for i, y in enumerate(ys):
        if y >= level:
            if i == 0:
                return float(xs[0])
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], y
            return float(x0 + (level - y0) * (x1 - x0) / (y1 - y0))
    return None


def value_at(xs, ys, x):
    """y at x by linear interpolation (None outside the range)."""
    if x is None or not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


# ------------------------------------------------------------------------------- instruments


@contextmanager
def patched(target, name, value):
    saved = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, saved)


class Instruments:
    """Forward counting, the KL-diagnostics schedule and the report switch for one run."""

    def __init__(self, eval_every, kl_epochs, report):
        self.eval_every, self.kl_epochs, self.report = eval_every, set(kl_epochs), report
        self.compute = 0.0
        self.in_eval = False
        self.eval_compute = []  # training compute at each evaluation call, in call order
        self.diagnostics_on = True

    @contextmanager
    def installed(self):
        import common.evaluate
        from common.gmm.model import GMMVelocityNet
        from common.models.gmm import GMMAdapter

        forward, evaluate = GMMVelocityNet.forward, common.evaluate.evaluate
        diagnostics, report = GMMAdapter.diagnostics, GMMAdapter.report
        meter = self

        def counted_forward(net, sample, sigma, cond):
            out = forward(net, sample, sigma, cond)
            if not meter.in_eval:
                meter.compute += sample.shape[0] * (3 if out.requires_grad else 1)
            return out

        def timed_evaluate(*args, **kwargs):
            call = len(meter.eval_compute)
            meter.eval_compute.append(meter.compute)
            meter.diagnostics_on = call * max(meter.eval_every, 1) in meter.kl_epochs
            meter.in_eval = True
            try:
                return evaluate(*args, **kwargs)
            finally:
                meter.in_eval = False

        def scheduled_diagnostics(adapter, *args, **kwargs):
            return diagnostics(adapter, *args, **kwargs) if meter.diagnostics_on else {}

        def optional_report(adapter, *args, **kwargs):
            if meter.report:
                meter.in_eval = True
                try:
                    return report(adapter, *args, **kwargs)
                finally:
                    meter.in_eval = False

        with patched(GMMVelocityNet, "forward", counted_forward), \
                patched(common.evaluate, "evaluate", timed_evaluate), \
                patched(GMMAdapter, "diagnostics", scheduled_diagnostics), \
                patched(GMMAdapter, "report", optional_report):
            yield self


# ------------------------------------------------------------------------------- after training


def load_policy(run_dir, pretrained):
    """The gmm adapter with a run's final LoRA (run_dir None: the base)."""
    from common.checkpoint import load_lora
    from common.models import load_adapter

    adapter = load_adapter("gmm", pretrained)
    if run_dir is not None:
        load_lora(adapter.transformer, str(run_dir), default_alpha=adapter.lora_alpha)
    adapter.transformer.requires_grad_(False).eval()
    return adapter


def task_rewards(run_dir, pretrained, seed, images_per_category):
    """{task: (eval reward, its SE)} of a run's final model on each Flow-OPD task's test prompts
    (the in-loop evaluation: 20 ODE steps, balanced categories, seeds seed + index)."""
    import common.evaluate
    from common.data import load_prompts
    from common.rewards import MultiReward, parse_reward_spec

    adapter = load_policy(run_dir, pretrained)
    reward = MultiReward(parse_reward_spec("gmm_target"))
    out = {}
    for task, spec in TASKS.items():
        metrics, _, _ = common.evaluate.evaluate(adapter, load_prompts(spec, "test"), reward, num_steps=20,
                                                 guidance=1.0, seed=seed, images_per_category=images_per_category)
        out[task] = [metrics["eval/reward_mean"], metrics["eval/reward_se"]]
    return out


@torch.no_grad()
def sampler_measures(adapter, sampler, noise_level, seed, points=4096, num_steps=10, tail=2):
    """The rollout sampler's final samples (10 steps, as in training) on the test prompts:
    - residual noise: RMS per dim of the SDE's final sample minus the ODE's continuation from the
      same SDE state `tail` steps before the end (sigma 0.112 on the gmm grid, where the modes,
      std 0.2, are resolved): the noise the last steps leave that denoising would have removed
      (the oracle table's "residual noise", there the final std for point-mass data);
    - terminal variance: the within-mode variance per ring-plane dim (each point to its nearest
      mode), against the truth's MODE_STD² = 0.04, for the SDE and for the same model's ODE;
    - the SDE samples' mean reward (what the rollout scores)."""
    from common.data import load_prompts
    from common.evaluate import balanced_eval_prompts
    from common.gmm import world
    from common.rollout import derive_seed, initial_latents, rollout

    prompts = balanced_eval_prompts(load_prompts("gmm", "test"), points // 4)
    embeds = adapter.encode_prompts(prompts)
    sigmas = adapter.make_sigmas(num_steps)
    seeds = [derive_seed(seed, "claims_sampler", i) for i in range(len(prompts))]
    latents = initial_latents(adapter.latent_shape(len(prompts)), seeds)

    def path(start, level, start_step=0):
        return rollout(adapter, embeds, sigmas, start, guidance=1.0, noise_level=level, sampler=sampler,
                       generator=torch.Generator().manual_seed(derive_seed(seed, "claims_sde", start_step)),
                       keep_means=False, start_step=start_step).latents

    def within_mode_variance(x):
        xy = x[:, :2].double().numpy()
        d2 = ((xy[:, None] - world.mode_centres()[None]) ** 2).sum(-1).min(1)
        return float(d2.mean() / 2)

    sde_path, ode_path = path(latents, noise_level), path(latents, 0.0)
    denoised = path(sde_path[:, -(tail + 1)], 0.0, start_step=num_steps - tail)[:, -1]
    final = sde_path[:, -1]
    targets = [world.parse_prompt(p.text) for p in prompts]
    return {"residual_noise": float(((final - denoised) ** 2).mean().sqrt()),
            "terminal_var_sde": within_mode_variance(final), "terminal_var_ode": within_mode_variance(ode_path[:, -1]),
            "sde_reward": float(world.soft_target(final.numpy(), targets).mean())}


# ------------------------------------------------------------------------------- one task


def init_worker():
    torch.set_num_threads(1)


def run_task(task):
    """Train one arm at one seed; return its curves and measures (see module docstring)."""
    started = time.time()
    module = importlib.import_module(task["file"])
    args = module.parse_args(task["argv"])
    meter = Instruments(task["eval_every"], task["kl_epochs"], task["report"])
    with meter.installed():
        out = Path(module.main(args))
        # training compute and the evaluations' snapshots, before any post-training measurement
        train_compute, eval_compute = meter.compute, list(meter.eval_compute)
        meter.diagnostics_on = False
        from common.outputs import read_metrics

        rows = read_metrics(out / "metrics.jsonl")
        samples_per_epoch = args.batch_size * args.batches_per_epoch
        evals = [r for r in rows if r.get("eval/reward_mean") is not None]
        aligned = len(eval_compute) == len(evals)
        curve = [{"epoch": r["epoch"], "samples": r["epoch"] * samples_per_epoch,
                  "compute": eval_compute[k] if aligned else None,
                  "reward": r["eval/reward_mean"], "se": r["eval/reward_se"], "gold": r.get("eval/gmm_target_mean"),
                  "kl_marginal": r.get("eval/kl_marginal"), "kl_path": r.get("eval/kl_path")}
                 for k, r in enumerate(evals)]
        train = [[r["epoch"], r["reward/mean"]] for r in rows if r.get("reward/mean") is not None]
        result = {"arm": task["arm"], "seed": task["seed"], "out": str(out), "curve": curve, "train": train,
                  "samples_per_epoch": samples_per_epoch,
                  "compute_per_epoch": train_compute / args.num_epochs if args.num_epochs else 0.0}
        if task["report"] and (out / "frontier.json").exists():
            frontier = json.loads((out / "frontier.json").read_text())
            result["frontier"] = {"betas": frontier["betas"], "kl": frontier["frontier_kl"], "reward": frontier["frontier_reward"],
                                  "run": frontier["run"].get("eval/kl_marginal")}
        pretrained = task.get("pretrained")
        if "tasks" in task["post"]:
            result["tasks"] = task_rewards(out, pretrained, task["seed"], task["task_images"])
            if task.get("with_base"):
                result["base_tasks"] = task_rewards(None, pretrained, task["seed"], task["task_images"])
        if "sampler" in task["post"]:
            result["sampler"] = sampler_measures(load_policy(out, pretrained), args.sampler, args.noise_level,
                                                 task["seed"])
            result["base_sampler"] = sampler_measures(load_policy(None, pretrained), args.sampler, args.noise_level,
                                                      task["seed"])
    result["wall_s"] = time.time() - started
    (out / "claims_result.json").write_text(json.dumps(result))
    return result
