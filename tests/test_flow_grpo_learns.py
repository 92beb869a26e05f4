"""CI's short learning check: on the toy world the training reward of flow_grpo.py must rise
by more than 3 standard errors within 3 minutes.

The reward here is `jpeg_incompressibility` (DDPO's, from the registry), not `shapes`: measured on
the committed base, the shapes partial-credit reward does not rise by 3 standard errors within 3
CPU minutes at any learning rate we tried (see the flow_grpo issue note and README), so a shapes
version of this test could only pass by luck. This one checks that the loop optimises the reward
it is given: sign, advantages, ratio and update all have to be right for it to pass.

Two fixed counting prompts, drawn every epoch (batch 32 in groups of 16 = both of them): the first
and last windows then compare the same prompts, so the rise measures the policy alone. With all 36
counting prompts the between-prompt spread of JPEG size (one object vs four) dominated: a draw
stream whose first epochs happened to hold four-object prompts started high and the test failed
with the policy learning fine (CI, after the category-balanced sampler changed the draws)."""

import json
import time

import numpy as np

import flow_grpo
from common.outputs import read_metrics
from common.toy.world import split_prompts

# epochs averaged at each end: 3, so that a host running at half speed (measured: 25-30 s per
# epoch instead of 12-15 on the same 2 cores) still fits two windows in the budget; fewer images
# per window only make the standard error, and so the bar, larger
WINDOW = 3
PROMPTS = ("a photo of two green squares", "a photo of three blue circles")


def test_training_reward_rises_by_more_than_three_standard_errors(tmp_path):
    prompts = tmp_path / "train_metadata.jsonl"
    rows = [m for m in split_prompts()[0] if m["prompt"] in PROMPTS]
    assert len(rows) == 2
    prompts.write_text("".join(json.dumps(m) + "\n" for m in rows))
    (tmp_path / "test_metadata.jsonl").write_text(prompts.read_text())
    start = time.time()
    args = flow_grpo.parse_args(["--prompts", str(tmp_path), "--output-dir", str(tmp_path / "run"),
                                 "--eval-every", "0", "--track", "none", "--max-minutes", "2.4",
                                 "--num-epochs", "200", *LEARN_ARGS])
    flow_grpo.main(args)
    wall = time.time() - start
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("reward/mean") is not None]
    assert len(records) >= 2 * WINDOW, f"only {len(records)} epochs ran"
    first, last = records[:WINDOW], records[-WINDOW:]
    images = args.batch_size * args.batches_per_epoch * WINDOW
    # standard error of each window's mean reward from the per-image spread within it
    se = np.sqrt(np.mean([r["reward/std"] ** 2 for r in first]) / images
                 + np.mean([r["reward/std"] ** 2 for r in last]) / images)
    rise = np.mean([r["reward/mean"] for r in last]) - np.mean([r["reward/mean"] for r in first])
    print(f"reward {np.mean([r['reward/mean'] for r in first]):.5f} -> "
          f"{np.mean([r['reward/mean'] for r in last]):.5f}, rise {rise:.5f}, SE {se:.5f}, {len(records)} epochs, "
          f"{wall:.0f} s")
    assert wall < 180
    assert rise > 3 * se


LEARN_ARGS = ["--batch-size", "32", "--group-size", "16", "--batches-per-epoch", "2", "--updates-per-epoch", "2",
              "--learning-rate", "6e-3", "--no-ema", "--reward", "jpeg_incompressibility"]
