"""Exact figures of the gmm world: the base's log-likelihood, a run's KL to its base, and the
optimal frontier of the KL-regularised objective for the base you actually have.

- `ode_log_likelihood`: the exact log-density of the discrete Euler-ODE sampler's output (the
  evaluation distribution): each step x' = x + dt·v(x) is inverted by Newton's method and
  log p(x_N) = log N(x_0; 0, I) - sum_j log|det(I + dt_j ∂v/∂x)|, with the Jacobian by autograd
  (D backward passes). Newton stops at a residual < 1e-5 (max-norm), so the log-density is exact
  to about 1e-5·|∂ log p/∂x| per step; meant for D = 2.
- `marginal_kl`: KL(p_theta || p_base) = E_{x ~ p_theta}[log p_theta(x) - log p_base(x)] over
  the evaluation's own ODE samples (a Monte Carlo mean: its standard error is logged beside it).
- `path_kl`: sum over steps of the per-step transition KL (full, summed over dims) along the
  policy's own SDE trajectories, against the base's transitions from the same states: the KL of
  the path measures, an upper bound on the KL of the marginals of the stochastic steps' outputs.
- `frontier`: the KL-regularised optimum is the tilted base p*(x|c) ∝ p_base(x|c)·exp(r(x)/beta).
  From N samples of the base with rewards r_i, self-normalised weights w_i ∝ exp(r_i/beta) give
  E_p*[r] = sum w_i r_i and KL(p*||p_base) = sum w_i log(N w_i), per prompt. With a reward in
  [0, 1] the weights are within a factor exp(1/beta) of each other, so the estimate is tame for
  beta >= 0.05; `frontier_error` measures how many samples make it exact to 3 decimals.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

from common.sde import sde_step

NEWTON_TOL = 1e-5


def _velocity(adapter, x, sigma, embeds, guidance, negative):
    return adapter.predict_velocity(x, sigma.expand(x.shape[0]), embeds, negative, guidance)


def _jacobian(adapter, x, sigma, embeds, guidance, negative):
    """(B, D, D) ∂v/∂x per sample (samples are independent, so one backward per output dim)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = _velocity(adapter, x, sigma, embeds, guidance, negative)
        rows = [torch.autograd.grad(v[:, i].sum(), x, retain_graph=i + 1 < v.shape[1])[0] for i in range(v.shape[1])]
    return v.detach(), torch.stack(rows, dim=1)


def _log_normal(x):
    return (-0.5 * (x.double() ** 2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi))


def ode_log_likelihood(adapter, embeds, points, num_steps, guidance=1.0, negative=None, max_iterations=50):
    """log p(points) (B,) under the adapter's Euler-ODE sampler, and the largest Newton residual."""
    sigmas = adapter.make_sigmas(num_steps)
    y = points.detach().float()
    log_det = torch.zeros(len(y), dtype=torch.float64)
    worst = 0.0
    for j in reversed(range(num_steps)):
        sigma, dt = sigmas[j], float(sigmas[j + 1] - sigmas[j])
        x = y - dt * _velocity(adapter, y, sigma, embeds, guidance, negative).detach()
        eye = torch.eye(y.shape[1])
        for _ in range(max_iterations):
            v, jac = _jacobian(adapter, x, sigma, embeds, guidance, negative)
            residual = x + dt * v - y
            if residual.abs().max() < NEWTON_TOL:
                break
            x = x - torch.linalg.solve(eye + dt * jac, residual.unsqueeze(-1)).squeeze(-1)
        v, jac = _jacobian(adapter, x, sigma, embeds, guidance, negative)
        worst = max(worst, float((x + dt * v - y).abs().max()))
        log_det += torch.linalg.slogdet((eye + dt * jac).double())[1]
        y = x.detach()
    return _log_normal(y) - log_det, worst


def ode_sample_log_likelihood(adapter, embeds, noise, num_steps, guidance=1.0, negative=None):
    """(samples, log p(samples)) of the Euler ODE run forward from `noise`: the log-det of every
    step's Jacobian accumulated along the way, no inversion needed (half the cost of
    `ode_log_likelihood` for the policy's own samples)."""
    sigmas = adapter.make_sigmas(num_steps)
    x = noise.detach().float().to(adapter.device)
    log_p = _log_normal(x)
    eye = torch.eye(x.shape[1])
    for j in range(num_steps):
        sigma, dt = sigmas[j], float(sigmas[j + 1] - sigmas[j])
        v, jac = _jacobian(adapter, x, sigma, embeds, guidance, negative)
        log_p = log_p - torch.linalg.slogdet((eye + dt * jac).double())[1]
        x = (x + dt * v).detach()
    return x, log_p


@torch.no_grad()
def marginal_kl(adapter, embeds, samples, num_steps, guidance=1.0, negative=None, with_error=False, noise=None):
    """Monte Carlo KL(p_theta || p_base) of the ODE distributions over `samples` ~ p_theta (or,
    given their initial `noise`, over the samples the policy draws from it: the same points, up to
    the ~1e-6 a different batch composition moves them, at half the cost)."""
    if noise is not None:
        samples, log_policy = ode_sample_log_likelihood(adapter, embeds, noise, num_steps, guidance, negative)
    else:
        log_policy, _ = ode_log_likelihood(adapter, embeds, samples, num_steps, guidance, negative)
    with adapter.frozen_base_forward():
        log_base, _ = ode_log_likelihood(adapter, embeds, samples, num_steps, guidance, negative)
    diff = (log_policy - log_base).numpy()
    kl = float(diff.mean())
    return (kl, float(diff.std() / math.sqrt(len(diff)))) if with_error else kl


@torch.no_grad()
def path_kl(adapter, embeds, *, seed, negative, sampler, noise_level, num_steps, guidance):
    """Mean over samples of sum_j KL(pi_theta(.|x_j) || pi_base(.|x_j)) along the policy's SDE."""
    from common.rollout import derive_seed, initial_latents

    sigmas = adapter.make_sigmas(num_steps)
    seeds = [derive_seed(seed, "path_kl", i) for i in range(len(embeds))]
    x = initial_latents(adapter.latent_shape(len(embeds)), seeds).to(adapter.device)
    generator = torch.Generator().manual_seed(derive_seed(seed, "path_kl", "sde"))
    total = torch.zeros(len(embeds), dtype=torch.float64)
    for j in range(num_steps):
        sigma = sigmas[j].expand(len(x))
        out = sde_step(adapter.predict_velocity(x, sigma, embeds, negative, guidance), x, j, sigmas, noise_level,
                       sampler, generator=generator)
        with adapter.frozen_base_forward():
            base_velocity = adapter.predict_velocity(x, sigma, embeds, negative, guidance)
        base = sde_step(base_velocity, x, j, sigmas, noise_level, sampler, prev_sample=out.sample)
        safe = torch.where(out.trainable, out.std, torch.ones_like(out.std))
        step_kl = ((out.mean - base.mean) ** 2).flatten(1).sum(1) / (2 * safe**2)
        total += torch.where(out.trainable, step_kl, torch.zeros_like(step_kl)).double().cpu()
        x = out.sample
    return float(total.mean())


# --------------------------------------------------------------------------------- the frontier


def tilted(rewards, beta):
    """(E_p*[r], KL(p* || p_base)) of the base tilted by exp(r/beta), from base samples' rewards."""
    rewards = np.asarray(rewards, dtype=np.float64)
    logits = rewards / beta
    logits -= logits.max()
    weights = np.exp(logits)
    weights /= weights.sum()
    expected = float((weights * rewards).sum())
    kl = float(np.sum(weights * np.log(np.maximum(weights * len(weights), 1e-300))))
    return expected, kl


def frontier(rewards_by_prompt, prompt_weights, betas):
    """Per beta: (E[r], KL) averaged over prompts with `prompt_weights` (the evaluation's mix)."""
    weights = np.asarray(prompt_weights, dtype=np.float64) / np.sum(prompt_weights)
    points = []
    for beta in betas:
        pairs = np.array([tilted(r, beta) for r in rewards_by_prompt])
        points.append((float(weights @ pairs[:, 0]), float(weights @ pairs[:, 1])))
    return np.array(points)


def frontier_error(rewards, beta, sizes, repeats=200, seed=0):
    """Std of the tilted estimates (E[r], KL) from `size` of the given base rewards, per size:
    how many samples make the frontier exact to 3 decimals."""
    rng = np.random.default_rng(seed)
    rewards = np.asarray(rewards)
    out = {}
    for size in sizes:
        draws = np.array([tilted(rng.choice(rewards, size=size, replace=True), beta) for _ in range(repeats)])
        out[size] = draws.std(axis=0).tolist()
    return out


def reward_at_kl(curve, kl):
    """The frontier's reward at a given KL (linear interpolation along the curve)."""
    order = np.argsort(curve[:, 1])
    return float(np.interp(kl, curve[order, 1], curve[order, 0]))


BETAS = np.geomspace(0.02, 20.0, 40)


@torch.no_grad()
def base_rewards(adapter, prompts, reward_fn, *, seed, num_steps, guidance, samples_per_prompt=4096):
    """Rewards of the frozen base's ODE samples, per distinct prompt: {text: rewards}."""
    from common.evaluate import generate_seeded

    out = {}
    for p_index, prompt in enumerate(dict.fromkeys(p.text for p in prompts)):
        item = next(p for p in prompts if p.text == prompt)
        seeds = [seed + 10**7 + p_index * samples_per_prompt + i for i in range(samples_per_prompt)]
        with adapter.frozen_base_forward():
            points = generate_seeded(adapter, [item] * samples_per_prompt, seeds, num_steps=num_steps,
                                     guidance=guidance)
        out[prompt] = np.asarray(reward_fn(points, [prompt] * samples_per_prompt,
                                           [item.metadata] * samples_per_prompt)["avg"], dtype=np.float64)
    return out


def plot_against_frontier(adapter, path, history, reward_fn, prompts, *, seed, num_steps, guidance):
    """frontier.png and frontier.json: the run's evaluations (KL, reward) against the frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_prompt = base_rewards(adapter, prompts, reward_fn, seed=seed, num_steps=num_steps, guidance=guidance)
    counts = {text: sum(p.text == text for p in prompts) for text in by_prompt}
    curve = frontier(list(by_prompt.values()), list(counts.values()), BETAS)
    evals = [r for r in history if r.get("eval/reward_mean") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve[:, 1], curve[:, 0], color="black", label="optimal frontier (tilted base)")
    run = {}
    for key, marker in (("eval/kl_marginal", "o"), ("eval/kl_path", "s")):
        rows = [r for r in evals if r.get(key) is not None]
        if rows:
            kls, rewards = [r[key] for r in rows], [r["eval/reward_mean"] for r in rows]
            ax.plot(kls, rewards, marker=marker, label=f"run ({key.split('/')[1].replace('kl_', '')} KL)")
            run[key] = {"epoch": [r["epoch"] for r in rows], "kl": kls, "reward": rewards,
                        "frontier_reward": [reward_at_kl(curve, k) for k in kls]}
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("KL to the base (nats)")
    ax.set_ylabel("eval reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    Path(path).with_suffix(".json").write_text(json.dumps(
        {"betas": BETAS.tolist(), "frontier_reward": curve[:, 0].tolist(), "frontier_kl": curve[:, 1].tolist(),
         "run": run}, indent=1))
    return curve


def precision_table(samples_per_prompt=(1024, 4096, 16384), betas=(1.0, 0.2, 0.05, 0.02), prompt="north", seed=0):
    """Monte Carlo std of the frontier's (E[r], KL) for one prompt of the committed base, per sample
    count and beta: `python -m common.gmm.frontier` prints it (the README quotes it)."""
    from common.data import Prompt
    from common.models import load_adapter
    from common.rewards import MultiReward, parse_reward_spec

    adapter = load_adapter("gmm")
    rewards = base_rewards(adapter, [Prompt(prompt)], MultiReward(parse_reward_spec("gmm_target")), seed=seed,
                           num_steps=20, guidance=1.0, samples_per_prompt=max(samples_per_prompt) * 4)[prompt]
    lines = ["| beta | E_p*[r] | KL | " + " | ".join(f"std at N = {n}" for n in samples_per_prompt) + " |",
             "|---|---|---|" + "---|" * len(samples_per_prompt)]
    for beta in betas:
        expected, kl = tilted(rewards, beta)
        errors = frontier_error(rewards, beta, samples_per_prompt, repeats=100, seed=seed)
        lines.append(f"| {beta} | {expected:.3f} | {kl:.3f} | "
                     + " | ".join(f"{errors[n][0]:.4f} / {errors[n][1]:.4f}" for n in samples_per_prompt) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(precision_table())
