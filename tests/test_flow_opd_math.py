"""flow_opd.py's maths on hand-built tensors: the per-step Gaussian KL against its closed form,
the sampled log-ratio as an unbiased KL estimate, pg's detached advantage and its expected
gradient (= the gkd gradient), the legacy hybrid's gradient, and the alternate schedule."""

import math

import numpy as np
import pytest
import torch

import flow_opd
from common import sde

SIGMAS = sde.make_sigmas(dict(num_train_timesteps=1000, shift=3.0), 10)


def two_velocities(seed=0, shape=(3, 4, 6, 6)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    return x, torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.mark.parametrize("j", [0, 3, 7])
def test_flow_sde_step_kl_matches_the_closed_form(j):
    x, v_a, v_b = two_velocities(j)
    a = 0.7
    out_a = sde.sde_step(v_a, x, j, SIGMAS, a, "flow", prev_sample=x)
    out_b = sde.sde_step(v_b, x, j, SIGMAS, a, "flow", prev_sample=x)
    sigma, dt = SIGMAS[j].double(), (SIGMAS[j + 1] - SIGMAS[j]).double()
    sigma_g = SIGMAS[1].double() if j == 0 else sigma
    g = a * torch.sqrt(sigma / (1 - sigma_g))
    # ALGORITHMS.md §2.6: KL = (|dt|/2)(1/g + g(1 - sigma)/(2 sigma))² ||v_a - v_b||², per element here
    closed = (dt.abs() / 2) * (1 / g + g * (1 - sigma) / (2 * sigma)) ** 2 * ((v_a - v_b).double() ** 2).mean(dim=(1, 2, 3))
    exact = sde.transition_kl(out_a.mean, out_b.mean, out_a, "exact")
    assert torch.allclose(exact.double(), closed, rtol=1e-4)
    public = sde.transition_kl(out_a.mean, out_b.mean, out_a, "flowgrpo")  # the public form: |dt|·KL
    assert torch.allclose(public.double(), closed * dt.abs(), rtol=1e-4)


@pytest.mark.parametrize("sampler", ["flow", "cps"])
def test_sampled_log_ratio_is_an_unbiased_kl_estimate(sampler):
    x, v_a, v_b = two_velocities(1, shape=(1, 3, 8, 8))
    v_b = v_a + 0.05 * (v_b - v_a)  # a teacher near the student
    j, n = 4, 4000
    student = sde.sde_step(v_a.expand(n, -1, -1, -1), x.expand(n, -1, -1, -1), j, SIGMAS, 0.7, sampler,
                           generator=torch.Generator().manual_seed(0))
    teacher = sde.sde_step(v_b.expand(n, -1, -1, -1), x.expand(n, -1, -1, -1), j, SIGMAS, 0.7, sampler,
                           prev_sample=student.sample)
    elements = x[0].numel()
    reward = flow_opd.pg_rewards(student.log_prob[:, None], teacher.log_prob[:, None], elements)[:, 0]
    kl_total = elements * sde.transition_kl(student.mean, teacher.mean, student, "exact")[0]
    standard_error = reward.std() / math.sqrt(n)
    assert abs(-reward.mean() - kl_total) < 4 * standard_error
    assert kl_total > 3 * standard_error  # the check has power


def test_pg_advantage_carries_no_gradient():
    log_prob = torch.randn(5, 3, requires_grad=True)
    teacher_log_prob = torch.randn(5, 3, requires_grad=True)
    advantage = flow_opd.pg_rewards(log_prob, teacher_log_prob, elements=12, return_to_go=True)
    assert not advantage.requires_grad and advantage.grad_fn is None
    # in the loss: the gradient reaches the student only through the ratio, -A/B at r = 1
    new_log_prob = log_prob[:, 0].detach().clone().requires_grad_(True)
    kl = (teacher_log_prob[:, 0] ** 2)  # a differentiable stand-in for the pathwise KL
    loss, _ = flow_opd.distillation_loss("pg", new_log_prob, log_prob[:, 0].detach(), kl, advantage[:, 0],
                                         clip_range=1e-3)
    grad_new, grad_teacher = torch.autograd.grad(loss, [new_log_prob, teacher_log_prob], allow_unused=True)
    assert torch.allclose(grad_new, -advantage[:, 0] / 5)
    assert grad_teacher is None  # neither the teacher nor the KL is differentiated
    with pytest.raises(RuntimeError):  # and the advantage alone has no graph at all
        torch.autograd.grad(advantage.sum(), [log_prob])


def test_return_to_go_sums_the_later_steps():
    old = torch.tensor([[1.0, 2.0, 3.0]])
    rewards = flow_opd.pg_rewards(old, torch.zeros(1, 3), elements=1, return_to_go=True)
    assert rewards.tolist() == [[-6.0, -5.0, -3.0]]


def test_legacy_kl_only_is_the_non_detached_hybrid():
    kl = torch.tensor([0.2, 0.5], requires_grad=True)
    log_prob = torch.zeros(2, requires_grad=True)
    loss, _ = flow_opd.distillation_loss("legacy_kl_only", log_prob, torch.zeros(2), kl, None, clip_range=1e-3)
    grad_kl, grad_logp = torch.autograd.grad(loss, [kl, log_prob])
    # loss = mean KL·max(r, clip r): pathwise weight r = 1 on KL, plus the score term KL·grad r
    assert torch.allclose(grad_kl, torch.full((2,), 0.5))
    assert torch.allclose(grad_logp, kl.detach() / 2)


def test_pg_expected_gradient_equals_the_gkd_gradient():
    """E[-A·grad log r] over x' ~ pi_old = grad KL (exact convention): pg and gkd share a scale."""
    x, v_a, v_b = two_velocities(2, shape=(1, 2, 4, 4))
    j, n = 5, 20000
    theta = v_a.clone().requires_grad_(True)
    student = sde.sde_step(theta.expand(n, -1, -1, -1), x.expand(n, -1, -1, -1), j, SIGMAS, 0.7, "flow",
                           generator=torch.Generator().manual_seed(1))
    teacher = sde.sde_step(v_b.expand(n, -1, -1, -1), x.expand(n, -1, -1, -1), j, SIGMAS, 0.7, "flow",
                           prev_sample=student.sample)
    advantage = flow_opd.pg_rewards(student.log_prob[:, None].detach(), teacher.log_prob[:, None], x[0].numel())[:, 0]
    pg_loss, _ = flow_opd.distillation_loss("pg", student.log_prob, student.log_prob.detach(), None, advantage,
                                            clip_range=1.0)
    (pg_grad,) = torch.autograd.grad(pg_loss, theta, retain_graph=True)
    gkd_loss, _ = flow_opd.distillation_loss("gkd", student.log_prob, student.log_prob.detach(),
                                             sde.transition_kl(student.mean[:1], teacher.mean[:1], student, "exact"),
                                             None, clip_range=1.0)
    (gkd_grad,) = torch.autograd.grad(gkd_loss, theta)
    cosine = torch.nn.functional.cosine_similarity(pg_grad.flatten(), gkd_grad.flatten(), dim=0)
    assert cosine > 0.9
    assert 0.8 < pg_grad.norm() / gkd_grad.norm() < 1.25


def test_alternate_schedule():
    # published: OCR 1 then GenEval 3 -> epochs 0 OCR, 1-3 GenEval, 4 OCR, ...
    assert [flow_opd.dataset_for_epoch(e, [1, 3]) for e in range(9)] == [0, 1, 1, 1, 0, 1, 1, 1, 0]
    assert [flow_opd.dataset_for_epoch(e, [2, 1, 1]) for e in range(6)] == [0, 0, 1, 2, 0, 0]


def test_parse_named_rejects_bad_entries():
    assert flow_opd.parse_named(("a=x", "b_2=tag:c+d"), "--t") == {"a": "x", "b_2": "tag:c+d"}
    for bad, message in ((("a",), "NAME=VALUE"), (("a.b=x",), "letters"), (("a=x", "a=y"), "twice")):
        with pytest.raises(ValueError, match=message):
            flow_opd.parse_named(bad, "--t")


def test_mixed_task_advantage_leaves_unscored_samples_out():
    rewards = np.array([1.0, 3.0, np.nan, 2.0, 0.0, 4.0])
    groups = np.array([7, 7, 7, 9, 5, 5])
    std = np.nanstd(rewards)
    expected = np.array([-1, 1, 0, 0, -2, 2]) / (std + 1e-4)
    assert np.allclose(flow_opd.group_advantages(rewards, groups), expected)
    per_group = flow_opd.group_advantages(rewards, groups, global_std=False)
    assert np.allclose(per_group, [-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0, 0, -2 / (2 + 1e-4), 2 / (2 + 1e-4)])
