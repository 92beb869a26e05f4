"""The policy-gradient estimator of the GRPO files against the exact gradient (Gaussian oracle).

Setting: data N(m, s²) per element with the analytic velocity of common/oracle.py; the policy
adds a parameter theta_j to the velocity of every trained step j; the reward is r(x) = mean_d x_d.
E[x_N] is affine in theta, so dJ/dtheta follows exactly from the oracle's moment recursion
(`final_mean`, differentiated in fp64).

The estimator is the one the algorithm files use: real rollouts (common.rollout), advantages
r - group mean, per-step log-probs rescored by common.sde.sde_step at theta = 0 (on-policy, ratio
1), the gradient of flow_grpo.ppo_clip_loss summed over the trained steps. Its expectation is
    (G - 1)/G · dJ/dtheta / D:
(G - 1)/G because the group mean includes the sample itself (the other members are independent of
its score), 1/D because log-probs are averaged over the D dims (every published clip range assumes
it). With advantages normalised by the std of the rewards only the scale changes: cosine >= 0.99.
"""

import math

import numpy as np
import pytest
import torch

import flow_grpo
from common.oracle import GaussianOracleAdapter, final_mean
from common.rollout import initial_latents, rollout
from common.sde import make_sigmas, sde_step

DATA_MEAN, DATA_VAR = 0.8, 0.09
SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)
NUM_STEPS, GROUP = 10, 16
TRAINED = list(range(NUM_STEPS - 1))  # timestep_fraction 0.99: every step but the last
LEVELS = {"flow": 0.7, "cps": 0.8, "dance": 0.3}


def exact_gradient(sigmas, sampler):
    offsets = torch.zeros(NUM_STEPS, dtype=torch.float64, requires_grad=True)
    final_mean(sigmas, LEVELS[sampler], sampler, DATA_MEAN, DATA_VAR, offsets).backward()
    return offsets.grad[TRAINED].numpy()


def estimate(sampler, dim, groups, seed=0, score_pair=1, sign=1.0, normalise=False):
    """Per-group estimates (groups, len(TRAINED)) of d(-loss)/dtheta, from `groups` groups of GROUP."""
    adapter = GaussianOracleAdapter(DATA_MEAN, DATA_VAR, shape=(dim,), scheduler_config=SCHEDULE)
    sigmas = make_sigmas(SCHEDULE, NUM_STEPS)
    batch = groups * GROUP
    embeds = adapter.encode_prompts([""] * batch)
    latents = initial_latents(adapter.latent_shape(batch), [seed * 10**7 + i for i in range(batch)])
    trajectory = rollout(adapter, embeds, sigmas, latents, noise_level=LEVELS[sampler], sampler=sampler,
                         generator=torch.Generator().manual_seed(seed), keep_means=False)
    x = trajectory.latents
    rewards = x[:, -1].double().mean(dim=1).numpy()
    ids = np.repeat(np.arange(groups), GROUP)
    if normalise:
        advantages = flow_grpo.group_advantages(rewards, ids, global_std=True)
    else:
        advantages = rewards - np.repeat(rewards.reshape(groups, GROUP).mean(axis=1), GROUP)
    advantages = torch.tensor(advantages, dtype=torch.float32)
    # one theta per (sample, step) so the gradient keeps every sample's contribution apart
    theta = torch.zeros(batch, len(TRAINED), requires_grad=True)
    total = 0.0
    for k, j in enumerate(TRAINED):
        target = x[:, min(j + score_pair, NUM_STEPS)]
        velocity = adapter.transformer_forward(x[:, j], sigmas[j].expand(batch), embeds) + theta[:, k:k + 1]
        out = sde_step(velocity, x[:, j], j, sigmas, LEVELS[sampler], sampler, prev_sample=target)
        old = out.log_prob.detach()
        loss, stats = flow_grpo.ppo_clip_loss(out.log_prob, old, sign * advantages, clip_range=1e-3,
                                              adv_clip_max=1e9)
        assert float((stats["ratio"] - 1).abs().max()) == 0.0  # on-policy: the first micro-step
        total = total + loss
    (-total).backward()
    per_sample = theta.grad.double().numpy() * batch  # the loss is a mean over the batch
    return per_sample.reshape(groups, GROUP, -1).mean(axis=1)


def z_scores(per_group, expected):
    mean = per_group.mean(axis=0)
    se = per_group.std(axis=0, ddof=1) / math.sqrt(len(per_group))
    return (mean - expected) / se


@pytest.mark.parametrize("dim", [1, 16])
@pytest.mark.parametrize("sampler", ["flow", "cps", "dance"])
def test_estimator_equals_the_exact_gradient_within_3_se(sampler, dim):
    sigmas = make_sigmas(SCHEDULE, NUM_STEPS)
    expected = exact_gradient(sigmas, sampler) * (GROUP - 1) / GROUP / dim
    z = z_scores(estimate(sampler, dim, groups=2000), expected)
    assert np.abs(z).max() <= 3, (sampler, dim, np.round(z, 2))


@pytest.mark.parametrize("sampler", ["flow", "cps", "dance"])
def test_counterfeit_estimators_fail_the_oracle(sampler):
    """A flipped sign, and log-probs scored on the wrong pair (x_j, x_{j+2}), are told apart."""
    sigmas = make_sigmas(SCHEDULE, NUM_STEPS)
    expected = exact_gradient(sigmas, sampler) * (GROUP - 1) / GROUP
    flipped = z_scores(estimate(sampler, 1, groups=2000, sign=-1.0), expected)
    wrong_pair = z_scores(estimate(sampler, 1, groups=2000, score_pair=2), expected)
    assert np.abs(flipped).max() > 10, np.round(flipped, 1)
    assert np.abs(wrong_pair).max() > 10, np.round(wrong_pair, 1)


@pytest.mark.parametrize("sampler", ["flow", "cps", "dance"])
def test_normalised_advantages_point_along_the_exact_gradient(sampler):
    sigmas = make_sigmas(SCHEDULE, NUM_STEPS)
    expected = exact_gradient(sigmas, sampler)
    mean = estimate(sampler, 1, groups=2000, normalise=True).mean(axis=0)
    cosine = float(mean @ expected / (np.linalg.norm(mean) * np.linalg.norm(expected)))
    assert cosine >= 0.99, cosine
