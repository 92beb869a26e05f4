"""Flow-GRPO's pure functions on hand-built values."""

import numpy as np
import pytest
import torch

from flow_grpo import group_advantages, ppo_clip_loss, zero_std_keep_mask


def test_group_advantages_global_and_per_group_std():
    rewards = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    groups = np.array([7, 7, 9, 9, 5, 5])
    std_all = rewards.std()  # population std, as published
    expected = np.array([-1, 1, 0, 0, -2, 2]) / (std_all + 1e-4)
    assert np.allclose(group_advantages(rewards, groups, global_std=True), expected)
    per_group = group_advantages(rewards, groups, global_std=False)
    assert np.allclose(per_group, [-1 / 1.0001, 1 / 1.0001, 0, 0, -2 / 2.0001, 2 / 2.0001])
    # group size 1 (k = 1): a group of one has no relative signal
    assert np.allclose(group_advantages([1.0, 2.0], [0, 1]), [0.0, 0.0])


def test_zero_std_filter_pads_to_a_multiple_of_the_batch_count():
    advantages = np.array([0.5, -0.5, 0, 0, 1.0, 0, 0, -1.0, 0.2, 0])  # 5 informative
    keep = zero_std_keep_mask(advantages, 4, np.random.default_rng(0))
    assert keep.sum() == 8 and keep[advantages != 0].all()
    assert zero_std_keep_mask(advantages, 5, np.random.default_rng(0)).sum() == 5
    assert zero_std_keep_mask(np.zeros(6), 2, np.random.default_rng(0)).all()


def test_ppo_clip_loss_values():
    old = torch.zeros(4)
    advantages = torch.tensor([1.0, -1.0, 2.0, 9.0])
    loss, stats = ppo_clip_loss(old.clone(), old, advantages, clip_range=0.1, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(1 - 1 + 2 + 5) / 4)  # ratio 1; the 9 is clipped to 5
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    log_prob = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    loss, stats = ppo_clip_loss(log_prob, old, torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.1, 5.0)
    # max(-A r, -A clip(r)): A>0,r=1.5 -> -1.1; A<0,r=1.5 -> 1.5; A>0,r=0.5 -> -0.5; A<0,r=0.5 -> 0.9
    assert loss.item() == pytest.approx((-1.1 + 1.5 - 0.5 + 0.9) / 4)
    assert stats["clipfrac"].item() == 1.0


def test_policy_gradient_pushes_the_mean_towards_positive_advantage_samples():
    mean = torch.zeros(2, requires_grad=True)
    sample = torch.tensor([1.0, 1.0])
    log_prob = -((sample - mean) ** 2) / 2
    loss, _ = ppo_clip_loss(log_prob, log_prob.detach(), torch.tensor([1.0, -1.0]), 0.2, 5.0)
    loss.backward()
    assert mean.grad[0] < 0 < mean.grad[1]  # gradient descent moves mean 0 up, mean 1 down


def test_unscored_samples_are_left_out_and_never_kept():
    # NaN = a sample the reward could not score (remote reward with on_error=drop)
    rewards = np.array([1.0, 3.0, np.nan, 2.0, 0.0, 4.0])
    groups = np.array([7, 7, 7, 9, 5, 5])
    valid = np.isfinite(rewards)
    std_valid = rewards[valid].std()
    expected = np.array([-1, 1, 0, 0, -2, 2]) / (std_valid + 1e-4)  # group 9 has one valid member
    assert np.allclose(group_advantages(rewards, groups), expected)
    keep = zero_std_keep_mask(expected, 2, np.random.default_rng(0), valid)
    assert not keep[2] and keep.sum() % 2 == 0 and keep[[0, 1, 4, 5]].all()
    # too few valid samples to pad to a multiple of 4: drop kept ones instead, never the NaN one
    keep = zero_std_keep_mask(expected, 4, np.random.default_rng(0), valid)
    assert not keep[2] and keep.sum() == 4
    keep = zero_std_keep_mask(np.array([1.0, -1.0, 0.0]), 4, np.random.default_rng(0), np.array([True, True, False]))
    assert keep.tolist() == [True, True, False]  # nothing reaches a multiple: every valid sample
