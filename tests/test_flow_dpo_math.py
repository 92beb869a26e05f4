"""flow_dpo.py's pure functions on hand-built tensors with known answers: the Diffusion-DPO and
SFT losses, pair/best selection (published tie rule), padding, timesteps, noising; and the ref
policy (second LoRA adapter or frozen copy): a refresh makes it equal to the learner."""

import math

import numpy as np
import pytest
import torch

import flow_dpo


def test_dpo_loss_is_exactly_log2_when_learner_equals_ref():
    err_w, err_l = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    loss, stats = flow_dpo.dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=100.0)
    assert torch.equal(stats["z"], torch.zeros(5, dtype=torch.float64))
    assert loss.item() == math.log(2)
    assert stats["implicit_acc"].item() == 0.0  # z > 0 is strict: an untrained pair is not "correct"
    loss32, _ = flow_dpo.dpo_loss(err_w.float(), err_l.float(), err_w.float(), err_l.float(), beta=100.0)
    assert loss32.item() == torch.tensor(math.log(2), dtype=torch.float32).item()


def test_dpo_loss_known_values():
    # pair 1: the winner's error dropped by 1 vs the ref -> z = +1; pair 2: the loser's did -> z = -1
    err_w, ref_w = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])
    err_l, ref_l = torch.tensor([3.0, 1.0]), torch.tensor([3.0, 2.0])
    loss, stats = flow_dpo.dpo_loss(err_w, err_l, ref_w, ref_l, beta=2.0)
    assert torch.allclose(stats["z"], torch.tensor([1.0, -1.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["implicit_acc"].item() == 0.5
    assert stats["winner_diff"].item() == pytest.approx(-0.5)
    assert stats["loser_diff"].item() == pytest.approx(-0.5)


def test_dpo_gradient_lowers_winner_error_and_raises_loser_error():
    err_w, err_l = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    loss, _ = flow_dpo.dpo_loss(err_w, err_l, torch.tensor([0.5]), torch.tensor([0.5]), beta=100.0)
    loss.backward()
    # at z = 0: dL/de_w = beta/4 = 25, dL/de_l = -25
    assert err_w.grad.item() == pytest.approx(25.0)
    assert err_l.grad.item() == pytest.approx(-25.0)


def test_sft_loss_known_values():
    velocity = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    target, base = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    advantages = torch.tensor([1.0, 0.0])
    loss, fm, kl = flow_dpo.sft_loss(velocity, target, advantages)
    assert loss.item() == pytest.approx(0.5)  # mean(A·fm) = mean([1·1, 0·9])
    assert fm.item() == pytest.approx(5.0) and kl.item() == 0.0
    # beta > 0: the velocity KL to the base (A = 0 samples contribute only through it)
    loss, fm, kl = flow_dpo.sft_loss(velocity, target, advantages, beta=0.5, base_velocity=base)
    assert kl.item() == pytest.approx(5.0)
    assert loss.item() == pytest.approx(0.5 + 0.5 * 5.0)


def test_select_pairs_argmax_argmin_and_published_tie_rule():
    # groups keyed by dataset index, members interleaved as the sampler shuffles them
    ids = np.array([7, 3, 7, 3, 7, 3, 9, 9])
    rewards = np.array([0.1, 0.2, 0.9, 0.2, 0.4, 0.2, 0.0, 1.0])
    winners, losers, ties = flow_dpo.select_pairs(rewards, ids)
    assert winners.tolist() == [2, 3, 7]   # group 3 is all equal: its 2nd member (index 3) wins
    assert losers.tolist() == [0, 1, 6]    # ... and its 1st (index 1) loses
    assert ties.tolist() == [False, True, False]


def test_select_best_keeps_every_maximum():
    ids = np.array([0, 0, 0, 1, 1])
    rewards = np.array([0.5, 0.9, 0.9, 0.1, 0.0])
    assert flow_dpo.select_best(rewards, ids).tolist() == [1, 2, 3]


def test_unscored_samples_never_win_lose_or_count_as_best():
    # NaN = a sample the reward could not score (remote reward with on_error=drop); np.argmax
    # alone would pick the NaN as the winner
    ids = np.array([7, 7, 7, 3, 3, 9, 9])
    rewards = np.array([0.1, np.nan, 0.9, np.nan, 0.5, 0.3, 0.3])
    winners, losers, ties = flow_dpo.select_pairs(rewards, ids)
    assert winners.tolist() == [2, 6]      # group 3 has one scored member: no pair
    assert losers.tolist() == [0, 5]
    assert ties.tolist() == [False, True]
    assert flow_dpo.select_best(rewards, ids).tolist() == [2, 4, 5, 6]


def test_pad_to_multiple_duplicates_existing_entries():
    rng = np.random.default_rng(0)
    padded = flow_dpo.pad_to_multiple(np.array([4, 5, 6]), 4, rng)
    assert len(padded) == 4 and padded[:3].tolist() == [4, 5, 6] and padded[3] in (4, 5, 6)
    assert flow_dpo.pad_to_multiple(np.array([1, 2]), 2, rng).tolist() == [1, 2]


def test_training_sigmas_and_noisy_inputs():
    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(flow_dpo.training_sigmas(u, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert torch.equal(flow_dpo.training_sigmas(u, 1.0), u)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    x, target = flow_dpo.noisy_inputs(x0, eps, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(x[0], x0[0]) and torch.equal(x[1], eps[1])
    assert torch.allclose(x[2], 0.75 * x0[2] + 0.25 * eps[2])
    assert torch.equal(target, eps - x0)


@pytest.mark.parametrize("use_lora", [True, False])
def test_ref_policy_refresh_copies_the_learner_exactly(use_lora):
    from common.checkpoint import add_lora, trainable_state
    from common.models import load_adapter

    adapter = load_adapter("toy")
    transformer = adapter.transformer.requires_grad_(False)
    if use_lora:
        add_lora(transformer, 4, 8, adapter.lora_target_modules)
    else:
        transformer.requires_grad_(True)
    trainable = set(trainable_state(transformer))
    ref = flow_dpo.RefPolicy(adapter, use_lora, (4, 8, adapter.lora_target_modules))
    assert set(trainable_state(transformer)) == trainable  # the ref adds nothing trainable
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma, embeds = torch.full((2,), 0.6), adapter.encode_prompts(["a red circle", "two blue squares"])
    assert ref.max_diff() == 0.0
    with torch.no_grad():
        for p in transformer.parameters():
            if p.requires_grad:
                p.add_(0.01)
        learner_v = adapter.predict_velocity(x, sigma, embeds)
        with ref.active():
            ref_v = adapter.predict_velocity(x, sigma, embeds)
        assert ref.max_diff() > 0 and (learner_v - ref_v).abs().max() > 1e-4
        assert set(trainable_state(transformer)) == trainable  # active() restores requires_grad
        ref.refresh()
        assert ref.max_diff() == 0.0
        with ref.active():
            assert torch.equal(adapter.predict_velocity(x, sigma, embeds), learner_v)
    saved = ref.state_dict()
    assert set(saved) == trainable
