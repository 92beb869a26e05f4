"""Two evaluations in the loop (issue 20, item 4): `eval/...` on the held-out test prompts and, with
`--eval-train` (on in every toy preset), `eval/train/...` on the training prompts with the same ODE
protocol and seeds seed + image_index, which no rollout draws."""

import dataclasses

import pytest

import flow_dpo
import flow_grpo
import flow_grpo_fast
import grpo_guard
from common.data import load_prompts
from common.evaluate import evaluate, evaluate_in_loop
from common.models import load_adapter
from common.outputs import read_metrics
from common.rewards import MultiReward, parse_reward_spec

FILES = (flow_grpo, flow_grpo_fast, grpo_guard, flow_dpo)


@pytest.mark.parametrize("module", FILES, ids=lambda m: m.__name__)
def test_on_in_the_toy_preset_off_elsewhere(module):
    assert module.parse_args([]).eval_train
    assert not module.parse_args(["--preset", "gmm"]).eval_train
    assert not module.parse_args(["--model", "sd3"]).eval_train


def test_train_split_metrics_are_the_balanced_evaluation_of_the_training_prompts():
    adapter = load_adapter("toy")
    reward_fn = MultiReward(parse_reward_spec("shapes"))
    train, test = load_prompts("toy", "train"), load_prompts("toy", "test")
    args = dataclasses.replace(flow_grpo.parse_args([]), eval_num_steps=3, eval_images_per_category=2)
    metrics = evaluate_in_loop(adapter, reward_fn, test, train, args, epoch=0)
    settings = dict(num_steps=3, guidance=args.eval_guidance, seed=args.seed, images_per_category=2)
    on_test, _, _ = evaluate(adapter, test, reward_fn, **settings)
    on_train, _, _ = evaluate(adapter, train, reward_fn, **settings)
    assert {k: v for k, v in metrics.items() if not k.startswith("eval/train/")} == on_test
    train_metrics = {k: v for k, v in metrics.items() if k.startswith("eval/train/")}
    assert "eval/train/accuracy" in train_metrics and "eval/train/accuracy/colors" in train_metrics
    # the same numbers evaluate() gives on the training prompts, under eval/train/ (the adapter's
    # diagnostics are computed for the test split only)
    expected = {"eval/train/" + k[len("eval/"):]: v for k, v in on_train.items()}
    assert train_metrics.items() <= expected.items() and "eval/train/reward_mean" in train_metrics
    assert metrics["eval/train/reward_mean"] != metrics["eval/reward_mean"]  # other prompts, other images


def test_flow_grpo_logs_both_evaluations(tmp_path):
    args = flow_grpo.parse_args(["--num-epochs", "1", "--batch-size", "4", "--group-size", "2",
                                 "--batches-per-epoch", "1", "--updates-per-epoch", "1", "--num-steps", "4",
                                 "--eval-every", "1", "--eval-num-steps", "2", "--eval-images-per-category", "1",
                                 "--track", "none", "--output-dir", str(tmp_path / "run")])
    records = [r for r in read_metrics(flow_grpo.main(args) / "metrics.jsonl") if "eval/accuracy" in r]
    assert len(records) == 2  # epoch 0 and the final evaluation
    assert all("eval/train/accuracy" in r and "eval/train/accuracy/counting" in r for r in records)
