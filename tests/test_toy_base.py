"""The committed toy base model: good but imperfect, leaving room for RL."""

import json

import pytest

from common.data import load_prompts
from common.evaluate import balanced_eval_prompts, evaluate
from common.models import load_adapter
from common.models.toy import WEIGHTS_DIR
from common.rewards import MultiReward, parse_reward_spec
from common.toy.world import TAGS


def test_balanced_eval_prompts_give_every_category_the_same_count():
    prompts = balanced_eval_prompts(load_prompts("toy", "test"), 64)
    assert len(prompts) == 64 * len(TAGS)
    assert all(sum(p.metadata["tag"] == tag for p in prompts) == 64 for tag in TAGS)


def test_weights_are_small_and_documented():
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    card = (WEIGHTS_DIR / "README.md").read_text()
    for word in ("seed", "steps", "wall time", "accuracy"):
        assert word in card


def test_base_accuracy_on_the_test_split_is_between_02_and_06():
    adapter = load_adapter("toy")
    reward = MultiReward(parse_reward_spec("shapes"))
    metrics, images, _ = evaluate(adapter, load_prompts("toy", "test"), reward, num_steps=20, guidance=4.0, seed=0,
                                  images_per_category=64)
    assert images.shape == (64 * len(TAGS), 3, 32, 32)
    assert 0.2 <= metrics["eval/accuracy"] <= 0.6, metrics
    # the card reports this very evaluation
    expected = json.loads((WEIGHTS_DIR / "base_eval.json").read_text())
    assert metrics["eval/accuracy"] == pytest.approx(expected["eval/accuracy"], abs=0.02)
