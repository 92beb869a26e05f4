"""The toy world's prompts, renderer and `shapes` reward."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from common.data import load_prompts
from common.rewards import MultiReward, parse_reward_spec
from common.toy.detector import detect, geneval_score
from common.toy.world import COLORS, DATA_DIR, TAGS, render_prompt, split_prompts


def test_splits_are_disjoint_cover_every_tag_and_match_the_committed_files():
    train, test = split_prompts()
    assert not {m["prompt"] for m in train} & {m["prompt"] for m in test}
    assert set(Counter(m["tag"] for m in test)) == set(TAGS) == set(Counter(m["tag"] for m in train))
    for name, rows in (("train", train), ("test", test)):
        committed = [json.loads(line) for line in (DATA_DIR / f"{name}_metadata.jsonl").read_text().splitlines()]
        assert committed == rows
    loaded = load_prompts("toy", "test")
    assert [p.text for p in loaded] == [m["prompt"] for m in test]


def test_metadata_follows_the_geneval_schema():
    for meta in split_prompts()[0]:
        assert meta["tag"] in TAGS and isinstance(meta["prompt"], str)
        for clause in meta["include"]:
            assert set(clause) <= {"class", "count", "color", "position"} and clause["count"] >= 1
            if "position" in clause:
                relation, reference = clause["position"]
                assert relation in ("left of", "right of", "above", "below") and reference == 0


def test_reward_on_ground_truth_renders_is_at_least_099():
    rng = np.random.default_rng(0)
    train, test = split_prompts()
    metas = [m for m in train + test for _ in range(2)]  # every prompt, twice: 1050 images
    images = torch.from_numpy(np.stack([render_prompt(m, rng) for m in metas]))
    reward = MultiReward(parse_reward_spec("shapes"))
    out = reward(images, [m["prompt"] for m in metas], metas)
    assert out["shapes_strict"].mean() >= 0.99
    for tag in TAGS:  # no category is left behind
        assert out["shapes_strict"][[m["tag"] == tag for m in metas]].mean() >= 0.99
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert reward(noisy, [m["prompt"] for m in metas], metas)["shapes_strict"].mean() >= 0.99


def test_reward_on_noise_is_about_zero():
    g = torch.Generator().manual_seed(0)
    metas = [m for m in split_prompts()[1] for _ in range(3)]
    reward = MultiReward(parse_reward_spec("shapes"))
    for images in (torch.rand(len(metas), 3, 32, 32, generator=g),
                   (0.5 + 0.5 * torch.randn(len(metas), 3, 32, 32, generator=g)).clamp(0, 1),
                   torch.zeros(len(metas), 3, 32, 32)):
        out = reward(images, [m["prompt"] for m in metas], metas)
        assert out["shapes_strict"].mean() <= 0.01
        assert out["shapes"].mean() <= 0.1


def test_partial_credit_follows_geneval_rules():
    meta = {"include": [{"class": "square", "count": 1, "color": "red"},
                        {"class": "circle", "count": 1, "color": "blue", "position": ["left of", 0]}]}
    from common.toy.detector import Detection
    square, circle_left, circle_right = (Detection("square", "red", (10, 20)), Detection("circle", "blue", (10, 5)),
                                         Detection("circle", "blue", (10, 28)))
    assert geneval_score(meta, [square, circle_left]) == (1.0, True)
    # failed position: count 1, colour 1, then 0 and 1 appended -> (1+1+1+1+0+1)/6
    assert geneval_score(meta, [square, circle_right]) == (pytest.approx(5 / 6), False)
    # reference clause missing: 0 (count) + 0 (its colour), then circle 1, 1, 0 -> 2/5
    assert geneval_score(meta, [circle_left]) == (pytest.approx(2 / 5), False)
    counting = {"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    five = [Detection("circle", "red", (i, i)) for i in range(5)]
    assert geneval_score(counting, five)[0] == pytest.approx(1 - 3 / 2)  # negative when |F| > 2n (published)


def test_detector_reads_geometry():
    rng = np.random.default_rng(1)
    meta = {"include": [{"class": "triangle", "count": 3, "color": "yellow"}], "prompt": ""}
    found = detect(render_prompt(meta, rng))
    assert sorted((d.shape, d.color) for d in found) == [("triangle", "yellow")] * 3


def test_bad_reward_specs_fail_clearly():
    with pytest.raises(ValueError, match="unknown reward 'pickscor'"):
        parse_reward_spec("pickscor=1.0")
    with pytest.raises(ValueError, match="must be a number"):
        parse_reward_spec("shapes=high")


def test_colour_coverage_proxy_is_hackable():
    # renders score well below the cap; flooding the canvas with the prompt's colour maxes it
    from common.toy.detector import colour_coverage

    metas = [json.loads(line) for line in (DATA_DIR / "test_metadata.jsonl").read_text().splitlines()][:60]
    rng = np.random.default_rng(0)
    renders = np.stack([render_prompt(meta, rng) for meta in metas])
    flooded = renders.copy()
    for image, meta in zip(flooded, metas):
        colour = next((c["color"] for c in meta["include"] if c.get("color")), "red")
        image[:] = np.array(COLORS[colour], dtype=np.float32)[:, None, None]
    assert 0.2 < colour_coverage(renders, metas).mean() < 0.6
    assert colour_coverage(flooded, metas).min() == 1.0
