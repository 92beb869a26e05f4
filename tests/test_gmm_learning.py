"""Every algorithm learns on the gmm world, and its counterfeit does not.

Each test runs the file's `--preset gmm` (fewer epochs, evaluating only the base and the end)
and asserts the rise of `eval/reward_mean` over the base in standard errors of the difference,
sqrt(se_base² + se_final²) over 2048 ODE points each. Its control is the same run with the
learning signal destroyed at the loss: advantages shuffled within each micro-batch (GRPO files),
winner and loser swapped (DPO), the worst sample trained instead of the best (SFT), the
distillation signal's sign flipped (OPD). The controls must not rise by 3 SE: that is what makes
the 10-SE rise a test of direction rather than of drift.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flow_dpo
import flow_grpo
import flow_grpo_fast
import flow_opd
import grpo_guard
from common.outputs import read_metrics

SHORT = ["--track", "none", "--max-minutes", "None"]


def rise_in_se(module, tmp_path, name, preset="gmm", epochs=60, extra=()):
    """(rise of eval/reward_mean over the base in SE of the difference, base, final)."""
    args = module.parse_args(["--preset", preset, *SHORT, "--num-epochs", str(epochs), "--eval-every", str(epochs),
                              "--save-every", str(epochs), "--grid-every", str(epochs),
                              "--output-dir", str(tmp_path / name), *extra])
    out = module.main(args)
    evals = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r.get("eval/reward_mean") is not None]
    base, final = evals[0], evals[-1]
    se = math.hypot(base["eval/reward_se"], final["eval/reward_se"])
    rise = (final["eval/reward_mean"] - base["eval/reward_mean"]) / se
    print(f"{module.__name__} {name}: {base['eval/reward_mean']:.3f} -> {final['eval/reward_mean']:.3f} "
          f"({rise:+.1f} SE)")
    return rise, base, final


def shuffled_advantages(loss_fn, position):
    """`loss_fn` with its advantage argument (positional index `position`) permuted in the micro-batch."""
    generator = torch.Generator().manual_seed(0)

    def wrapped(*args, **kwargs):
        args = list(args)
        advantages = args[position]
        args[position] = advantages[torch.randperm(len(advantages), generator=generator).to(advantages.device)]
        return loss_fn(*args, **kwargs)

    return wrapped


def assert_learns_and_control_does_not(learned, control):
    assert learned[0] >= 10, f"rise {learned[0]:.1f} SE < 10 SE"
    assert control[0] <= 3, f"the control rose {control[0]:.1f} SE: the test cannot tell signal from drift"


def test_flow_grpo_learns_and_its_shuffled_control_does_not(tmp_path, monkeypatch):
    learned = rise_in_se(flow_grpo, tmp_path, "learn")
    monkeypatch.setattr(flow_grpo, "ppo_clip_loss", shuffled_advantages(flow_grpo.ppo_clip_loss, 2))
    assert_learns_and_control_does_not(learned, rise_in_se(flow_grpo, tmp_path, "control"))


def test_flow_grpo_fast_learns_and_its_shuffled_control_does_not(tmp_path, monkeypatch):
    learned = rise_in_se(flow_grpo_fast, tmp_path, "learn", epochs=100)
    monkeypatch.setattr(flow_grpo_fast, "ppo_clip_loss", shuffled_advantages(flow_grpo_fast.ppo_clip_loss, 2))
    assert_learns_and_control_does_not(learned, rise_in_se(flow_grpo_fast, tmp_path, "control", epochs=100))


def test_grpo_guard_learns_and_its_shuffled_control_does_not(tmp_path, monkeypatch):
    learned = rise_in_se(grpo_guard, tmp_path, "learn")
    monkeypatch.setattr(grpo_guard, "guard_loss", shuffled_advantages(grpo_guard.guard_loss, 1))
    assert_learns_and_control_does_not(learned, rise_in_se(grpo_guard, tmp_path, "control"))


def test_online_dpo_learns_and_its_swapped_control_does_not(tmp_path, monkeypatch):
    learned = rise_in_se(flow_dpo, tmp_path, "learn", epochs=80)
    original = flow_dpo.dpo_loss
    monkeypatch.setattr(flow_dpo, "dpo_loss", lambda w, l, rw, rl, beta: original(l, w, rl, rw, beta))
    assert_learns_and_control_does_not(learned, rise_in_se(flow_dpo, tmp_path, "control", epochs=80))


def test_online_sft_learns_and_its_worst_sample_control_does_not(tmp_path, monkeypatch):
    learned = rise_in_se(flow_dpo, tmp_path, "learn", preset="gmm_online_sft")
    original = flow_dpo.select_best
    monkeypatch.setattr(flow_dpo, "select_best", lambda rewards, ids: original(-np.asarray(rewards), ids))
    assert_learns_and_control_does_not(learned, rise_in_se(flow_dpo, tmp_path, "control", preset="gmm_online_sft"))


@pytest.fixture(scope="module")
def gmm_teachers(tmp_path_factory):
    """Two flow_grpo.py teachers on the gmm world's tasks: single modes, and sets of modes."""
    root = tmp_path_factory.mktemp("teachers")
    for name, prompts, batch in (("single", "gmm@tag:single", 96), ("multi", "gmm@tag:pair+half+any", 192)):
        args = flow_grpo.parse_args(["--preset", "gmm", *SHORT, "--num-epochs", "60", "--eval-every", "0",
                                     "--save-every", "60", "--prompts", prompts, "--batch-size", str(batch),
                                     "--output-dir", str(root / name)])
        flow_grpo.main(args)
    return [f"single={root / 'single'}", f"multi={root / 'multi'}"]


def test_flow_opd_student_learns_from_its_teachers_and_the_flipped_control_does_not(tmp_path, monkeypatch,
                                                                                   gmm_teachers):
    # from the base (LoRA B = 0), not the preset's merge cold start: the merge of these two teachers
    # already scores 0.80 at epoch 0 (measured), so a rise over the start would measure nothing
    teachers = ["--teachers", *gmm_teachers, "--init", "base"]
    learned = rise_in_se(flow_opd, tmp_path, "learn", extra=teachers)
    original = flow_opd.distillation_loss

    def flipped(*args, distill_weight=1.0, **kwargs):
        return original(*args, distill_weight=-distill_weight, **kwargs)

    monkeypatch.setattr(flow_opd, "distillation_loss", flipped)
    assert_learns_and_control_does_not(learned, rise_in_se(flow_opd, tmp_path, "control", extra=teachers))
