"""bench/gradient_snr.py: its batch arithmetic is flow_grpo's, its numbers mean what they say.

On the gmm world (2-D points, strong signal): gradients assembled from groups equal gradients
taken on whole batches with flow_grpo's own advantages; the `cps_unnormalized` weighting equals a
real backward through that log-prob; shares sum to one; independent large batches agree far more
than tiny ones, as the extrapolated N½ predicts.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import gradient_snr  # noqa: E402

import flow_grpo  # noqa: E402


@pytest.fixture(scope="module")
def gmm():
    torch.set_num_threads(1)
    recipe = gradient_snr.recipe_for("gmm", seed=0)
    adapter, params = gradient_snr.load_model(recipe)
    return recipe, adapter, params


def test_pairwise_cosine_of_known_vectors():
    same = np.ones((4, 4))
    assert gradient_snr.pairwise_cosine(same) == (pytest.approx(1.0), pytest.approx(0.0))
    assert gradient_snr.pairwise_cosine(np.eye(5))[0] == pytest.approx(0.0)
    vectors = np.random.default_rng(0).normal(size=(6, 3))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = (unit @ unit.T)[np.triu_indices(6, 1)].mean()
    assert gradient_snr.pairwise_cosine(vectors @ vectors.T)[0] == pytest.approx(expected)


def test_batches_from_groups_equal_flow_grpo_batches(gmm):
    """A batch's gradient assembled from group gradients (pool std rescaled to the batch's) equals
    policy_gradient on the whole batch with group_advantages computed over that batch alone."""
    recipe, adapter, params = gmm
    recipe = gradient_snr.recipe_for("gmm", seed=0, group_size=8)
    steps = list(range(recipe.num_steps - 1))
    pool = gradient_snr.roll_out_pool(adapter, recipe, num_groups=4, seed=3)
    gram, deviation = gradient_snr.group_gram(adapter, params, pool, recipe, steps)
    assert deviation < recipe.clip_range  # on-policy: the unclipped branch
    assembled, _, skipped = gradient_snr.batch_gram(gram, pool, recipe, images=16)
    assert skipped == 0 and assembled.shape == (2, len(steps), 2, len(steps))
    direct = []
    for k in range(2):
        rows = list(range(16 * k, 16 * (k + 1)))
        advantages = flow_grpo.group_advantages(pool.rewards[rows], pool.group_ids[rows], recipe.global_std)
        batch = dict(embeds=pool.embeds[rows], latents=pool.latents[rows], log_probs=pool.log_probs[rows],
                     sigmas=pool.sigmas)
        grads, _ = gradient_snr.policy_gradient(adapter, params, batch, torch.tensor(advantages, dtype=torch.float32),
                                                recipe, steps)
        direct.append(grads.double())
    flat = torch.cat(direct)
    expected = (flat @ flat.T).numpy().reshape(2, len(steps), 2, len(steps))
    np.testing.assert_allclose(assembled, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_cps_unnormalized_weight_is_a_real_cps_unnormalized_backward(gmm):
    _, adapter, params = gmm
    exact = gradient_snr.recipe_for("gmm", seed=0, sampler="cps", noise_level=0.5, group_size=8)
    public = gradient_snr.recipe_for("gmm", seed=0, sampler="cps", noise_level=0.5, group_size=8,
                                     logprob="cps_unnormalized")
    steps = list(range(exact.num_steps - 1))
    pool = gradient_snr.roll_out_pool(adapter, exact, num_groups=1, seed=5)
    public_pool = gradient_snr.roll_out_pool(adapter, public, num_groups=1, seed=5)
    assert torch.equal(pool.latents, public_pool.latents)  # the convention changes scores, not samples
    advantages = torch.tensor(flow_grpo.group_advantages(pool.rewards, pool.group_ids), dtype=torch.float32)
    weights = gradient_snr.scheme_weights("cps_unnormalized", gradient_snr.step_coefficients(exact, pool.sigmas, steps),
                                          set(steps))

    def grads(recipe, p):
        batch = dict(embeds=p.embeds, latents=p.latents, log_probs=p.log_probs, sigmas=p.sigmas)
        return gradient_snr.policy_gradient(adapter, params, batch, advantages, recipe, steps)[0]

    np.testing.assert_allclose(grads(public, public_pool).numpy(),
                               (torch.tensor(weights, dtype=torch.float32)[:, None] * grads(exact, pool)).numpy(),
                               rtol=1e-3, atol=1e-7)


def test_large_gmm_batches_agree_and_tiny_ones_do_not(gmm):
    recipe, adapter, params = gmm
    cache = {(recipe.model, recipe.pretrained): (adapter, params)}
    result = gradient_snr.measure("gmm", recipe, 4096, (16, 1024), cache, log=lambda *a: None)
    for scheme in result["schemes"].values():
        for row in scheme["by_images"]:
            assert sum(row["shares"]) == pytest.approx(1.0)
    default = result["schemes"]["default"]
    tiny, large = default["by_images"]
    assert [(row["images"], row["batches"]) for row in result["by_images"]] == [(16, 256), (1024, 4)]
    assert abs(tiny["cosine"]) < 0.05
    assert large["cosine"] > 0.3
    assert large["cosine"] - tiny["cosine"] > 3 * np.hypot(large["cosine_se"], tiny["cosine_se"])
    # E[cos] ~ N / (N + N½): the group-level extrapolation predicts the batch-level measurement
    predicted = 1024 / (1024 + default["images_for_cos_half"])
    assert abs(large["cosine"] - predicted) < 3 * large["cosine_se"]
    # where the signal is strong (the 2 s²-weighted gradient, dominated by the high-noise steps)
    # independent batches of 1024 points agree closely
    public = result["schemes"]["cps_unnormalized"]["by_images"][1]
    assert public["cosine"] > 0.5 and public["cosine"] - 3 * public["cosine_se"] > large["cosine"]
