"""How much signal is in one Flow-GRPO update: `python bench/gradient_snr.py [--quick]`

For a recipe (model, prompts, reward, sampler, noise level, steps, CFG, group size, logprob
convention, `--same-latent`, trained steps) it computes flow_grpo.py's policy gradient at LoRA
init from many independent batches and reports how well they agree:

- the mean pairwise cosine between the gradients of independent batches (different prompts'
  draws, x_T and SDE noise), with its jackknife standard error, as a function of images per
  update. With E[g] = mu and per-image covariance Sigma, E[cos] ~ |mu|² / (|mu|² + tr Sigma / N):
  0 is pure noise, 0.5 means signal and noise are equal;
- the same per trained step j (the gradient of step j's loss term alone);
- each step's share |g_j|² / sum_k |g_k|² of the squared gradient norm;
- `N½`: the images per update at which the all-step cosine would reach 0.5, extrapolated from
  the group-level signal and noise (N½ = G·noise_G / signal, the signal |E g|² from pairs of
  distinct groups, with a jackknife SE over groups). Where the signal is not measured above
  2 SE the table gives the lower bound that signal + 2 SE implies.

The gradient is the one flow_grpo.py's loop takes at its first on-policy micro-step: rollouts
with `common.rollout.rollout`, group-relative advantages from `flow_grpo.group_advantages`,
each trained step rescored with `common.sde.sde_step` and differentiated through
`flow_grpo.ppo_clip_loss` against the rollout's log-probs (ratio 1, so PPO-clip reduces to the
advantage-weighted log-prob gradient). Sign: the ascent direction, -grad loss.

How batches are formed. A pool of groups is rolled out once; `policy_gradient` gives each group's
per-step gradient (advantages with the pool's global std); a batch of N images is N / G
consecutive groups, its gradient the group gradients averaged and rescaled by
(std_pool + 1e-4) / (std_batch + 1e-4), which is exactly flow_grpo's global-std advantage for
that batch (per-group std needs no rescaling). Disjoint batches share nothing, so they are
independent. Two simplifications, both tiny: the advantage clip (|A| <= 5) is applied with the
pool's std (the table counts the samples where a batch's std would put |A| past 5), and groups
are keyed by draw, not prompt: prompts are drawn independently per group, so a prompt drawn twice
in one batch gives two groups of G where the trainer (distinct prompts per batch) never draws it
twice (rare with the toy's 393 train prompts; common with 9 `colors` prompts). All inner products
are taken once between groups; every batch size, trained-step subset and step weighting below is
computed from them without new backward passes.

Candidate fixes for CPS's step domination, fixed before any result of this bench was seen.
Notation: step j maps sigma_j -> sigma_{j+1}, transition N(mu_j, s_j² I), c_j = d mu_j / d v (the
velocity's coefficient in the mean, read off `sde_step`). The exact per-element log-prob's
gradient is mean_D (z / s_j)·c_j·dv/dtheta (z ~ N(0, 1) the step's noise), so a step's noise
enters with weight |c_j| / s_j: CPS's step 8 (sigma 0.278 -> 0.009, s = 0.006, c = -0.27) has
|c| / s ~ 43 where steps 0-7 have 0.06-1.2.
  (a) `skip_small_std`: train step j only if s_j >= 0.1·|sigma_{j+1} - sigma_j|. A step whose
      noise is under a tenth of its deterministic move is nearly an ODE step (its log-prob is the
      sharpest and its noise the least able to explain the reward). Weight 1 or 0.
  (b) `unit_score`: weight step j's log-prob term by w_j = s_j / |c_j|, which makes every step's
      gradient mean_D z·sign(c_j)·dv/dtheta: the noise of each step enters with unit weight,
      so steps are comparable in expected gradient norm up to dv/dtheta itself. (1/sqrt(D) is
      common to all steps and so changes no cosine; s_j² alone still leaves |c_j|·s_j, which is
      tiny at sigma = 1.)
  (c) `cps_unnormalized`: the public CPS log-prob -mean (x' - mu)², whose gradient is the exact
      one times 2·s_j² (ALGORITHMS.md §2.5; tests/test_gradient_snr.py checks it against a real
      `logprob="cps_unnormalized"` backward).
Verdict rule, also fixed in advance: the best fix is the one with the highest all-step cosine of
the toy base recipe at the largest images-per-update measured; within 2 SE counts as a tie. The
table also gives each fix's cosine to the *unweighted* gradient of other batches, since a
reweighting may agree with itself while pointing somewhere else.

Runs on 2 CPU cores with one thread: `--quick` < 3 min, the default grid <= 20 min. Writes
docs/gradient_snr.md and docs/gradient_snr.json (`--out`). `--grid none` measures only the recipe
given by the flags (defaults: flow_grpo.py's preset for `--model`).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import flow_grpo  # noqa: E402
from common.data import category_weights, load_prompts  # noqa: E402
from common.rewards import MultiReward, parse_reward_spec  # noqa: E402
from common.rollout import derive_seed, initial_latents, rollout  # noqa: E402
from common.sde import sde_step  # noqa: E402

# `but_last`: a reference, not a fix (the recipe's trained steps without its last one)
SCHEMES = ("default", "but_last", "skip_small_std", "unit_score", "cps_unnormalized")
SMALL_STD_FRACTION = 0.1  # fix (a)'s threshold, fixed in advance


@dataclass
class Pool:
    """A rolled-out pool of groups (rows ordered group by group) and its rewards."""
    embeds: object            # PromptEmbeds (B, ...)
    latents: torch.Tensor     # (B, T + 1, ...)
    log_probs: torch.Tensor   # (B, T)
    rewards: np.ndarray       # (B,)
    group_ids: np.ndarray     # (B,) the draw index of each sample's group
    sigmas: torch.Tensor


def recipe_for(model, **overrides):
    """flow_grpo.py's preset for `model` with `overrides`: the bench measures the trainer's own recipe."""
    return dataclasses.replace(flow_grpo.PRESETS[flow_grpo.MODEL_PRESETS[model]], **overrides)


def trained_steps(recipe):
    """The steps flow_grpo trains for this recipe (its own `validate`, one group per batch)."""
    single = dataclasses.replace(recipe, batch_size=recipe.group_size, batches_per_epoch=1, updates_per_epoch=1)
    return flow_grpo.validate(single).train_steps


def load_model(recipe):
    from common.checkpoint import add_lora
    from common.models import load_adapter

    torch.manual_seed(recipe.seed)  # the LoRA's random A matrices
    adapter = load_adapter(recipe.model, recipe.pretrained)
    adapter.transformer.requires_grad_(False)
    add_lora(adapter.transformer, adapter.lora_rank, adapter.lora_alpha, adapter.lora_target_modules)
    params = [p for p in adapter.transformer.parameters() if p.requires_grad]
    return adapter, params


def draw_group_prompts(prompts, num_groups, recipe, generator):
    """One prompt index per group, drawn independently (category-balanced like the trainer). Independent
    draws, not blocks of distinct prompts: two groups of different batches must be as independent as two
    of the trainer's epochs, which may share a prompt (distinct-prompt pairs alone are biased low when
    prompts pull the LoRA different ways)."""
    weights = torch.tensor(category_weights(prompts) if recipe.balance_categories else [1.0] * len(prompts),
                           dtype=torch.float64)
    return torch.multinomial(weights, num_groups, replacement=True, generator=generator).tolist()


@torch.no_grad()
def roll_out_pool(adapter, recipe, num_groups, seed, groups_per_rollout=4):
    """`num_groups` groups of `recipe.group_size`, rolled out as flow_grpo does, and their rewards."""
    prompts = load_prompts(recipe.prompts, "train")
    reward_fn = MultiReward(parse_reward_spec(recipe.reward))
    sigmas = adapter.make_sigmas(recipe.num_steps)
    negative = adapter.negative_embeds() if recipe.guidance > 1 else None
    picks = draw_group_prompts(prompts, num_groups, recipe, torch.Generator().manual_seed(derive_seed(seed, "prompts")))
    size = recipe.group_size
    parts = {"embeds": [], "latents": [], "log_probs": [], "rewards": []}
    for first in range(0, num_groups, groups_per_rollout):
        groups = range(first, min(first + groups_per_rollout, num_groups))
        batch = [prompts[picks[g]] for g in groups for _ in range(size)]
        if recipe.same_latent:  # every member of a group starts from the same x_T
            seeds = [derive_seed(seed, "x_T", g) for g in groups for _ in range(size)]
        else:
            seeds = [derive_seed(seed, "x_T", g, k) for g in groups for k in range(size)]
        noise = [torch.Generator().manual_seed(derive_seed(seed, "sde", g, k)) for g in groups for k in range(size)]
        embeds = adapter.encode_prompts(batch)
        trajectory = rollout(adapter, embeds, sigmas, initial_latents(adapter.latent_shape(len(batch)), seeds),
                             negative=negative, guidance=recipe.guidance, noise_level=recipe.noise_level,
                             sampler=recipe.sampler, generator=noise, logprob=recipe.logprob, keep_means=False)
        scores = reward_fn(trajectory.images, [p.text for p in batch], [p.metadata for p in batch])
        parts["embeds"].append(embeds)
        parts["latents"].append(trajectory.latents)
        parts["log_probs"].append(trajectory.log_probs)
        parts["rewards"].append(np.asarray(scores["avg"], dtype=np.float64))
    from common.models.base import PromptEmbeds

    return Pool(PromptEmbeds.cat(parts["embeds"]), torch.cat(parts["latents"]), torch.cat(parts["log_probs"]),
                np.concatenate(parts["rewards"]), np.repeat(np.arange(num_groups), size), sigmas)


def policy_gradient(adapter, params, batch, advantages, recipe, steps):
    """flow_grpo's ascent direction on `batch` at its first on-policy micro-step, one flat vector
    per step in `steps` ((len(steps), P)), and the largest |ratio - 1| seen (0 up to rounding).

    `batch`: dict of embeds, latents (B, T + 1, ...), log_probs (B, T) from the rollout, sigmas."""
    x, old, sigmas = batch["latents"], batch["log_probs"], batch["sigmas"]
    negative = adapter.negative_embeds() if recipe.guidance > 1 else None
    size = x.shape[0]
    grads, deviation = [], 0.0
    for j in steps:
        velocity = adapter.predict_velocity(x[:, j], sigmas[j].expand(size), batch["embeds"], negative,
                                            recipe.guidance, detach_uncond=recipe.train_cfg_detach_uncond)
        out = sde_step(velocity, x[:, j], j, sigmas, recipe.noise_level, recipe.sampler, prev_sample=x[:, j + 1],
                       logprob=recipe.logprob)
        loss, stats = flow_grpo.ppo_clip_loss(out.log_prob, old[:, j], advantages, recipe.clip_range,
                                              recipe.adv_clip_max)
        step_grads = torch.autograd.grad(-loss, params, allow_unused=True)
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                for g, p in zip(step_grads, params)]))
        deviation = max(deviation, float((stats["ratio"] - 1).abs().max()))
    return torch.stack(grads), deviation


def step_coefficients(recipe, sigmas, steps):
    """Per step: sigma, sigma', std s_j and c_j = d mean / d velocity, read off `sde_step` itself."""
    rows = []
    x = torch.zeros(1, 1)
    for j in steps:
        zero = sde_step(torch.zeros(1, 1), x, j, sigmas, recipe.noise_level, recipe.sampler, prev_sample=x)
        one = sde_step(torch.ones(1, 1), x, j, sigmas, recipe.noise_level, recipe.sampler, prev_sample=x)
        rows.append(dict(step=j, sigma=float(sigmas[j]), sigma_next=float(sigmas[j + 1]), std=float(zero.std[0]),
                         coefficient=float(one.mean[0, 0] - zero.mean[0, 0])))
    return rows


def scheme_weights(scheme, coefficients, trained):
    """Per-step weights (over the computed steps) of a step weighting; 0 on steps the recipe does not train."""
    weights = []
    for row in coefficients:
        s, c, move = row["std"], abs(row["coefficient"]), abs(row["sigma_next"] - row["sigma"])
        if row["step"] not in trained:
            w = 0.0
        elif scheme == "default":
            w = 1.0
        elif scheme == "but_last":
            w = 0.0 if row["step"] == max(trained) else 1.0
        elif scheme == "skip_small_std":
            w = 1.0 if s >= SMALL_STD_FRACTION * move else 0.0
        elif scheme == "unit_score":
            w = s / c
        elif scheme == "cps_unnormalized":
            w = 2 * s ** 2
        else:
            raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
        weights.append(w)
    return np.array(weights)


def group_gram(adapter, params, pool, recipe, steps):
    """Inner products between every (group, step) gradient of the pool: (groups, S, groups, S), fp64."""
    advantages = flow_grpo.group_advantages(pool.rewards, pool.group_ids, recipe.global_std)
    size, num_groups = recipe.group_size, len(np.unique(pool.group_ids))
    rows, deviation = [], 0.0
    for g in range(num_groups):
        part = slice(g * size, (g + 1) * size)
        batch = dict(embeds=pool.embeds[list(range(part.start, part.stop))], latents=pool.latents[part],
                     log_probs=pool.log_probs[part], sigmas=pool.sigmas)
        grads, dev = policy_gradient(adapter, params, batch, torch.tensor(advantages[part], dtype=torch.float32),
                                     recipe, steps)
        rows.append(grads)
        deviation = max(deviation, dev)
    flat = torch.cat(rows).double()
    gram = (flat @ flat.T).numpy().reshape(num_groups, len(steps), num_groups, len(steps))
    return gram, deviation


def batch_gram(gram, pool, recipe, images):
    """Inner products between the per-step gradients of the pool's disjoint batches of `images`:
    (K, S, K, S); the share of samples whose batch-level |A| would exceed the clip; and how many
    batches were left out because every group in them had equal rewards (all A = 0: no gradient,
    no direction to compare; flow_grpo steps on a zero gradient there)."""
    size = recipe.group_size
    per_batch = images // size
    eps = 1e-4  # flow_grpo.group_advantages' eps
    pool_std = pool.rewards.std()
    mix, clipped, seen, skipped = [], 0, 0, 0
    for k in range(gram.shape[0] // per_batch):
        groups = np.arange(k * per_batch, (k + 1) * per_batch)
        rows = slice(groups[0] * size, (groups[-1] + 1) * size)
        batch_adv = flow_grpo.group_advantages(pool.rewards[rows], pool.group_ids[rows], recipe.global_std)
        if not np.any(batch_adv):
            skipped += 1
            continue
        scale = (pool_std + eps) / (pool.rewards[rows].std() + eps) if recipe.global_std else 1.0
        weights = np.zeros(gram.shape[0])
        weights[groups] = scale / per_batch
        mix.append(weights)
        clipped += int((np.abs(batch_adv) > recipe.adv_clip_max).sum())
        seen += images
    mix = np.array(mix)
    left = np.tensordot(mix, gram, axes=(1, 0))                      # (K, S, groups, S)
    both = np.tensordot(left, mix, axes=(2, 1)).transpose(0, 1, 3, 2)  # (K, S, K, S)
    return both, clipped / max(seen, 1), skipped


def pairwise_cosine(gram):
    """Mean cosine over pairs of a (K, K) Gram matrix and its jackknife SE (over batches)."""
    norms = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    cos = gram / np.outer(norms, norms)
    k = len(gram)
    upper = cos[np.triu_indices(k, 1)]
    mean = float(upper.mean()) if len(upper) else float("nan")
    if k < 3:
        return mean, float("nan")
    total = cos.sum() - np.trace(cos)
    leave_out = np.array([(total - 2 * (cos[i].sum() - cos[i, i])) / ((k - 1) * (k - 2)) for i in range(k)])
    se = math.sqrt((k - 1) / k * ((leave_out - leave_out.mean()) ** 2).sum())
    return mean, se


def weighted(gram4, weights_a, weights_b=None):
    """(K, K) Gram of sum_j w_j g_j (and cross with weights_b) from a (K, S, K, S) Gram."""
    weights_b = weights_a if weights_b is None else weights_b
    return np.tensordot(np.tensordot(gram4, weights_b, axes=(3, 0)), weights_a, axes=(1, 0))


def cross_cosine(gram4, weights_a, weights_b):
    """Mean cosine between sum_j a_j g_j of one batch and sum_j b_j g_j of another (distinct batches)."""
    cross = weighted(gram4, weights_a, weights_b)
    norms_a, norms_b = np.sqrt(np.diag(weighted(gram4, weights_a))), np.sqrt(np.diag(weighted(gram4, weights_b)))
    cos = cross / np.outer(norms_a, norms_b)
    off = ~np.eye(len(cos), dtype=bool)
    return float(cos[off].mean())


def mean_off_diagonal(matrix):
    """Mean of the off-diagonal entries of an (n, n) matrix and its jackknife SE (leaving out one
    group: its row and its column)."""
    n = len(matrix)
    total = matrix.sum() - np.trace(matrix)
    diag = np.diag(matrix)
    leave_out = (total - (matrix.sum(axis=1) - diag) - (matrix.sum(axis=0) - diag)) / ((n - 1) * (n - 2))
    se = math.sqrt((n - 1) / n * ((leave_out - leave_out.mean()) ** 2).sum())
    return total / (n * (n - 1)), se


def images_for_half(gram, weights, group_size):
    """N½ = G·noise_G / signal from the group-level Gram: signal = |E g|² per group (mean over pairs
    of distinct groups), noise_G = E|g_group|² - signal. Returns N½ (inf where the measured signal
    is not positive), a lower bound from signal + 2 SE (inf where even that is not positive), and
    the signal in units of its SE."""
    g = weighted(gram, weights)
    signal, se = mean_off_diagonal(g)
    noise = np.diag(g).mean() - signal
    estimate = group_size * noise / signal if signal > 0 else math.inf
    upper = signal + 2 * se
    lower_bound = group_size * (np.diag(g).mean() - upper) / upper if upper > 0 else math.inf
    return estimate, lower_bound, float(signal / se) if se > 0 else float("nan")


def alignment(gram, weights, reference):
    """cos(E g_w, E g_ref): the direction a weighting's expected gradient keeps of the unweighted
    (unbiased) one, each inner product of means estimated from pairs of distinct groups; NaN
    unless both squared norms of the means are measured above 2 SE."""
    (cross, _), (own, own_se) = mean_off_diagonal(weighted(gram, weights, reference)), \
        mean_off_diagonal(weighted(gram, weights))
    ref, ref_se = mean_off_diagonal(weighted(gram, reference))
    if own <= 2 * own_se or ref <= 2 * ref_se:
        return float("nan")
    return float(cross / math.sqrt(own * ref))


def measure(name, recipe, pool_images, images_per_update, adapter_cache, schemes=SCHEMES, log=print, gram_dir=None):
    """Everything this bench reports for one recipe, as a dict. `gram_dir`: keep each recipe's
    group inner products there, and reuse them when the same recipe is measured again."""
    start = time.time()
    key = (recipe.model, recipe.pretrained)
    if key not in adapter_cache:
        adapter_cache[key] = load_model(recipe)
    adapter, params = adapter_cache[key]
    steps = list(range(recipe.num_steps - 1))  # every trainable step; the recipe's subset is a weighting
    trained = set(trained_steps(recipe))
    num_groups = pool_images // recipe.group_size
    cached = Path(gram_dir) / f"{derive_seed(name, repr(recipe), num_groups)}.pt" if gram_dir else None
    if cached is not None and cached.exists():  # the same recipe, pool and name: reuse its inner products
        pool, gram, deviation = torch.load(cached, weights_only=False)
        rolled = time.time()
    else:
        pool = roll_out_pool(adapter, recipe, num_groups, seed=derive_seed(recipe.seed, name))
        rolled = time.time()
        gram, deviation = group_gram(adapter, params, pool, recipe, steps)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            light = dataclasses.replace(pool, embeds=None, latents=None, log_probs=None)
            torch.save((light, gram, deviation), cached)
    coefficients = step_coefficients(recipe, pool.sigmas, steps)
    weights = {s: scheme_weights(s, coefficients, trained) for s in schemes}
    result = dict(name=name, recipe=dict(model=recipe.model, pretrained=recipe.pretrained, prompts=recipe.prompts,
                                         reward=recipe.reward, sampler=recipe.sampler,
                                         noise_level=recipe.noise_level, num_steps=recipe.num_steps,
                                         guidance=recipe.guidance, group_size=recipe.group_size,
                                         same_latent=recipe.same_latent, logprob=recipe.logprob,
                                         timestep_fraction=recipe.timestep_fraction, global_std=recipe.global_std,
                                         trained_steps=sorted(trained)),
                  pool_images=num_groups * recipe.group_size, reward_mean=float(pool.rewards.mean()),
                  reward_std=float(pool.rewards.std()),
                  zero_std_groups=float(np.mean([pool.rewards[pool.group_ids == g].std() == 0
                                                 for g in range(num_groups)])),
                  max_ratio_deviation=deviation, steps=coefficients, by_images=[], schemes={})
    for scheme, w in weights.items():
        n_half, n_half_lower, signal_z = images_for_half(gram, w, recipe.group_size)
        result["schemes"][scheme] = dict(weights=w.tolist(), images_for_cos_half=n_half,
                                         images_for_cos_half_lower_bound=n_half_lower, signal_z=signal_z,
                                         alignment=alignment(gram, w, weights["default"]), by_images=[])
    for images in images_per_update:
        if images % recipe.group_size or pool_images // images < 2:
            continue
        gram4, clipped, skipped = batch_gram(gram, pool, recipe, images)
        if len(gram4) < 2:
            continue
        per_step = [pairwise_cosine(gram4[:, j, :, j]) for j in range(len(steps))]
        result["by_images"].append(dict(images=images, batches=len(gram4), skipped_batches=skipped,
                                        clipped_share=clipped,
                                        step_cosine=[c for c, _ in per_step], step_cosine_se=[s for _, s in per_step]))
        for scheme, w in weights.items():
            cos, se = pairwise_cosine(weighted(gram4, w))
            energy = np.array([w[j] ** 2 * np.diag(gram4[:, j, :, j]) for j in range(len(steps))])  # (S, K)
            shares = (energy / energy.sum(axis=0, keepdims=True)).mean(axis=1)
            result["schemes"][scheme]["by_images"].append(dict(
                images=images, cosine=cos, cosine_se=se, shares=shares.tolist(),
                cosine_to_default=cross_cosine(gram4, w, weights["default"])))
    log(f"[{name}] rollout {rolled - start:.0f} s, gradients {time.time() - rolled:.0f} s; "
        f"reward {result['reward_mean']:.3f} ± {result['reward_std']:.3f}, |ratio - 1| <= {deviation:.1e}")
    return result


# ------------------------------------------------------------------------------- grids and report

IMAGES = (16, 32, 64, 128, 256)


def grid(kind):
    """(name, model, recipe overrides, pool images, images per update) of each measured recipe."""
    if kind == "quick":
        return [("toy base", "toy", {}, 128, (16, 32, 64)),
                ("gmm d2", "gmm", {}, 512, (16, 64, 256))]
    base = [("toy base (cps 0.5, G16)", "toy", {}, 1024, IMAGES)]
    toy = [("toy G8", "toy", dict(group_size=8), 384, IMAGES[:4]),
           ("toy same-latent", "toy", dict(same_latent=True), 384, IMAGES[:4]),
           ("toy cps 0.8", "toy", dict(noise_level=0.8), 384, IMAGES[:4]),
           ("toy flow 0.7", "toy", dict(sampler="flow", noise_level=0.7), 384, IMAGES[:4]),
           ("toy dance 0.3", "toy", dict(sampler="dance", noise_level=0.3), 384, IMAGES[:4]),
           ("toy colors cps 0.5, G8", "toy", dict(prompts="toy@tag:colors", group_size=8), 384, (24, 48, 96)),
           ("toy colors flow 0.7, G8", "toy", dict(prompts="toy@tag:colors", group_size=8, sampler="flow",
                                                  noise_level=0.7), 384, (24, 48, 96))]
    gmm = [("gmm d2 (flow 0.7)", "gmm", {}, 4096, (16, 64, 256, 1024)),
           ("gmm d2 cps 0.5", "gmm", dict(sampler="cps", noise_level=0.5), 4096, (16, 64, 256, 1024)),
           ("gmm d64 (flow 0.7)", "gmm", dict(pretrained="d64"), 4096, (16, 64, 256, 1024))]
    if kind == "default":
        return base + toy + gmm
    return []


def fmt(mean, se):
    return f"{mean:+.3f} ± {se:.3f}" if np.isfinite(se) else f"{mean:+.3f}"


def fmt_images(scheme):
    """N½ where the signal is measured (> 2 SE), else the 2-SE lower bound."""
    n, lower, z = scheme["images_for_cos_half"], scheme["images_for_cos_half_lower_bound"], scheme["signal_z"]
    if np.isfinite(n) and z > 2:
        return f"{n:,.0f} (≥ {lower:,.0f}; signal {z:.1f} SE)"
    return f"≥ {lower:,.0f} (signal {z:+.1f} SE)" if np.isfinite(lower) else "no bound"


def report(results, command):
    lines = ["# Gradient SNR of Flow-GRPO's policy gradient", "",
             f"`{command}` (bench/gradient_snr.py; its docstring defines every number). Cosine = mean "
             "pairwise cosine between the gradients of independent batches at LoRA init, ± jackknife SE; "
             "N½ = images per update at which it would reach 0.5 (extrapolated from pairs of groups; a 2-SE "
             "lower bound where the signal is not measured).", "",
             "## All trained steps, by images per update", "",
             "| recipe | reward | images/update (batches) | cosine, all trained steps | cosine, trained steps but the "
             "last | N½ |", "|---|---|---|---|---|---|"]
    for r in results:
        default = r["schemes"]["default"]
        rows = zip(r["by_images"], default["by_images"], r["schemes"]["but_last"]["by_images"])
        for row, all_steps, but_last in rows:
            skipped = f", {row['skipped_batches']} all-zero A left out" if row["skipped_batches"] else ""
            lines.append(f"| {r['name']} | {r['reward_mean']:.3f} | {row['images']} ({row['batches']}{skipped}) | "
                         f"{fmt(all_steps['cosine'], all_steps['cosine_se'])} | "
                         f"{fmt(but_last['cosine'], but_last['cosine_se'])} | "
                         f"{fmt_images(default)} |")
    lines += ["", "## Per trained step (largest images per update of each recipe)", ""]
    for r in results:
        row = r["by_images"][-1]
        shares = r["schemes"]["default"]["by_images"][-1]["shares"]
        lines += [f"**{r['name']}** ({row['images']} images × {row['batches']} batches; trained steps "
                  f"{r['recipe']['trained_steps']})", "",
                  "| step | σ → σ' | s | |dμ/dv| | share of ‖g‖² | cosine of step alone |",
                  "|---|---|---|---|---|---|"]
        for j, step in enumerate(r["steps"]):
            lines.append(f"| {step['step']} | {step['sigma']:.3f} → {step['sigma_next']:.3f} | {step['std']:.4f} | "
                         f"{abs(step['coefficient']):.3f} | {100 * shares[j]:.2f} % | "
                         f"{fmt(row['step_cosine'][j], row['step_cosine_se'][j])} |")
        lines.append("")
    lines += ["## Candidate fixes (pre-registered in the docstring)", "",
              "| recipe | fix | weights per step | cosine by images per update | at the largest: cosine to the "
              "unweighted gradient of other batches | largest step share | N½ | cos(E g, E g unweighted) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for scheme in SCHEMES:
            s = r["schemes"][scheme]
            w = np.array(s["weights"])
            shown = " ".join(f"{v / w.max():.2g}" for v in w) if w.max() > 0 else "–"
            cosines = "<br>".join(f"{row['images']}: {fmt(row['cosine'], row['cosine_se'])}" for row in s["by_images"])
            last = s["by_images"][-1]
            top = int(np.argmax(last["shares"]))
            lines.append(f"| {r['name']} | {scheme} | {shown} | {cosines} | {last['cosine_to_default']:+.3f} | "
                         f"step {r['steps'][top]['step']}: {100 * last['shares'][top]:.1f} % | {fmt_images(s)} | "
                         f"{s['alignment']:+.2f} |")
    lines += ["", "## Share of the squared gradient norm per step under each fix (largest images per update)", "",
              "| recipe | fix | " + " | ".join(f"step {j}" for j in range(len(results[0]["steps"]))) + " |",
              "|---|---|" + "---|" * len(results[0]["steps"])]
    for r in results:
        for scheme in SCHEMES:
            shares = r["schemes"][scheme]["by_images"][-1]["shares"]
            lines.append(f"| {r['name']} | {scheme} | " + " | ".join(f"{100 * v:.1f} %" for v in shares) + " |")
    lines += ["", "Weights are shown relative to the largest. `cps_unnormalized` = 2 s² (the public CPS log-prob). "
              "The last column: how much of the unbiased gradient's direction a weighting keeps (from pairs of groups; "
              "nan where the unweighted mean gradient is not measurably non-zero).", ""]
    return "\n".join(lines)


def finite(value):
    """JSON has no inf or NaN: they become null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid (< 3 min on 2 cores)")
    parser.add_argument("--grid", default="default", choices=["default", "quick", "none"],
                        help="the recipes to measure; `none`: only the one given by the flags below")
    parser.add_argument("--model", default="toy", choices=sorted(flow_grpo.MODEL_PRESETS))
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--prompts", default=None, help="default: flow_grpo's preset for --model")
    parser.add_argument("--reward", default=None)
    parser.add_argument("--sampler", default=None, choices=["flow", "cps", "dance"])
    parser.add_argument("--noise-level", type=float, default=None)
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--same-latent", action="store_true")
    parser.add_argument("--logprob", default=None, choices=["exact", "cps_unnormalized"])
    parser.add_argument("--timestep-fraction", type=float, default=None)
    parser.add_argument("--per-group-std", action="store_true", help="advantages over the group's std, not the batch's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-images", type=int, default=512, help="with --grid none: images rolled out")
    parser.add_argument("--images-per-update", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--out", default="docs/gradient_snr", help="writes OUT.md and OUT.json")
    parser.add_argument("--gram-dir", default=None, help="keep (and reuse) each recipe's group inner products here")
    cli = parser.parse_args(argv)
    torch.set_num_threads(1)
    kind = "quick" if cli.quick else cli.grid
    fields = dict(pretrained=cli.pretrained, prompts=cli.prompts, reward=cli.reward, sampler=cli.sampler,
                  noise_level=cli.noise_level, num_steps=cli.num_steps, guidance=cli.guidance,
                  group_size=cli.group_size, logprob=cli.logprob, timestep_fraction=cli.timestep_fraction)
    flags = {k: v for k, v in fields.items() if v is not None}
    if cli.same_latent:
        flags["same_latent"] = True
    if cli.per_group_std:
        flags["global_std"] = False
    flags["seed"] = cli.seed
    if kind == "none":
        entries = [("recipe", cli.model, {}, cli.pool_images, tuple(cli.images_per_update))]
    else:
        entries = grid(kind)
    cache, results, start = {}, [], time.time()
    for name, model, overrides, pool_images, images in entries:
        # the flags shape the recipes of their --model; the other model's recipes keep its preset
        recipe = recipe_for(model, **({**flags, **overrides} if model == cli.model else
                                      {**overrides, "seed": cli.seed}))
        results.append(measure(name, recipe, pool_images, images, cache, gram_dir=cli.gram_dir))
    command = "python bench/gradient_snr.py" + (" --quick" if cli.quick else "" if kind == "default" else
                                                " " + " ".join(sys.argv[1:]))
    text = report(results, command)
    print(text)
    print(f"total {time.time() - start:.0f} s")
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(finite(dict(command=command, results=results)), indent=1))
    return results


if __name__ == "__main__":
    main()
