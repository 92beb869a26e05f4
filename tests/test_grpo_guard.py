"""grpo_guard.py: RatioNorm and the |dt| reweighting on hand-built tensors with known answers,
then the script end to end (on-policy ratio, per-step logs, the ratio-distribution plot)."""

import math
from pathlib import Path

import pytest
import torch

import grpo_guard
from common.outputs import read_metrics


def gaussian_log_prob(x, mean, std):
    """Per-element-mean log N(x; mean, std²) for a (B,) std, the sampler's convention."""
    s = std.view(-1, 1)
    return (-((x - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).mean(dim=1)


@pytest.mark.parametrize("bias", ["per_sample", "batch"])
def test_on_policy_normalized_ratio_is_exactly_one(bias):
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 64, generator=generator)
    std = torch.tensor([0.3, 0.3, 0.3, 0.3])
    x = mean + std.view(-1, 1) * torch.randn(4, 64, generator=generator)
    log_prob = gaussian_log_prob(x, mean, std)
    log_ratio = grpo_guard.normalized_log_ratio(log_prob, log_prob.clone(), mean, mean.clone(), std, bias)
    assert torch.equal(torch.exp(log_ratio), torch.ones(4))


def test_per_sample_normalized_log_ratio_is_mean_d_times_xi():
    # s·(dlogp + bias) = mean_D(d·xi) for x' = mu_old + s·xi, d = mu_theta - mu_old (ALGORITHMS.md §5)
    generator = torch.Generator().manual_seed(1)
    old_mean = torch.randn(3, 32, generator=generator, dtype=torch.float64)
    d = 0.05 * torch.randn(3, 32, generator=generator, dtype=torch.float64)
    xi = torch.randn(3, 32, generator=generator, dtype=torch.float64)
    std = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    x = old_mean + std.view(-1, 1) * xi
    log_ratio = grpo_guard.normalized_log_ratio(gaussian_log_prob(x, old_mean + d, std),
                                                gaussian_log_prob(x, old_mean, std), old_mean + d, old_mean, std)
    assert torch.allclose(log_ratio, (d * xi).mean(dim=1), atol=1e-12)


def test_batch_bias_is_the_public_scalar():
    generator = torch.Generator().manual_seed(2)
    old_mean = torch.randn(2, 16, generator=generator, dtype=torch.float64)
    mean = old_mean + 0.1 * torch.randn(2, 16, generator=generator, dtype=torch.float64)
    std = torch.tensor([0.2, 0.2], dtype=torch.float64)
    log_prob, old_log_prob = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-1.5, -1.0],
                                                                                            dtype=torch.float64)
    bias = ((mean - old_mean) ** 2 / (2 * 0.2**2)).mean()  # one scalar over batch x D
    expected = 0.2 * (log_prob - old_log_prob + bias)
    assert torch.allclose(grpo_guard.normalized_log_ratio(log_prob, old_log_prob, mean, old_mean, std, "batch"),
                          expected, atol=1e-12)


def test_normalized_ratio_is_unbiased_where_the_raw_ratio_is_not():
    # many draws x' = mu_old + s·xi at one step: E[raw ratio] = exp(-mean(d²)/(2s²)·(1 - 1/D)) < 1,
    # E[normalised ratio] = exp(mean(d²)/(2D)) ≈ 1
    generator = torch.Generator().manual_seed(3)
    draws, dim, s = 20000, 256, 0.1
    old_mean = torch.zeros(draws, dim, dtype=torch.float64)
    d = torch.full((draws, dim), 0.02, dtype=torch.float64)
    std = torch.full((draws,), s, dtype=torch.float64)
    x = old_mean + s * torch.randn(draws, dim, generator=generator, dtype=torch.float64)
    log_prob, old_log_prob = gaussian_log_prob(x, old_mean + d, std), gaussian_log_prob(x, old_mean, std)
    raw = torch.exp(log_prob - old_log_prob).mean().item()
    norm = torch.exp(grpo_guard.normalized_log_ratio(log_prob, old_log_prob, old_mean + d, old_mean, std)).mean().item()
    assert raw < 0.985  # exp(-0.02) ≈ 0.980: left-shifted
    assert abs(norm - 1) < 1e-3


def test_guard_loss_known_values_and_dt_reweighting():
    log_ratio = torch.tensor([math.log(1.5), 0.0])
    advantages = torch.tensor([1.0, 2.0])
    dt = torch.tensor([-0.1, -0.1])
    # sample 1: max(-1·1.5, -1·1.2) = -1.2; sample 2: max(-2, -2) = -2; mean -1.6, then / |dt| = 0.1
    plain, stats = grpo_guard.guard_loss(log_ratio, advantages, dt, 0.2, 5.0, reweight=False)
    reweighted, _ = grpo_guard.guard_loss(log_ratio, advantages, dt, 0.2, 5.0, reweight=True)
    assert plain.item() == pytest.approx(-1.6)
    assert reweighted.item() == pytest.approx(-16.0)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_script_runs_on_policy_logs_per_step_ratios_and_plots(tmp_path):
    argv = ["--num-epochs", "1", "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "2",
            "--updates-per-epoch", "2", "--eval-every", "0", "--track", "none", "--num-steps", "4",
            "--no-filter-zero-std", "--learning-rate", "1e-2", "--reward", "jpeg_compressibility",
            "--output-dir", str(tmp_path / "guard")]
    out = Path(grpo_guard.main(grpo_guard.parse_args(argv)))
    record = read_metrics(out / "metrics.jsonl")[0]
    assert record["train/ratio_dev_max"] <= 1e-6  # the first, on-policy update
    # the second update is off-policy: at every step the normalised ratio spreads around 1, while
    # the raw one is left-shifted, most where the step's std is small (late steps)
    for j in range(3):
        assert record[f"guard/norm_ratio_std/t={j}"] > 0
        assert abs(record[f"guard/norm_ratio_mean/t={j}"] - 1) < 0.01
        assert record[f"guard/ratio_mean/t={j}"] < record[f"guard/norm_ratio_mean/t={j}"]
    assert record["guard/ratio_mean/t=2"] < 0.5
    assert (out / "ratio_distribution.png").stat().st_size > 1000
