"""The committed latent toy base (`common/toy/weights_latent/`): its VAE keeps what the reward checks,
and its base accuracy is the card's, inside [0.2, 0.6] on both splits."""

import json

import numpy as np
import pytest
import torch

from common.data import load_prompts
from common.evaluate import evaluate
from common.models import load_adapter
from common.models.toy import LATENT_WEIGHTS_DIR as WEIGHTS_DIR
from common.rewards import MultiReward, parse_reward_spec
from common.toy.vae import LATENT_CHANNELS, LATENT_SIZE, encode, reconstruction_accuracy
from common.toy.world import split_prompts


def test_the_detector_reads_decoded_latents_as_it_reads_the_renders():
    adapter = load_adapter("toy", pretrained=str(WEIGHTS_DIR))
    train, test = split_prompts()
    for metas in (train[::4], test):
        accuracy, reference = reconstruction_accuracy(adapter.vae, metas, np.random.default_rng(7))
        assert reference == 1.0
        assert accuracy >= 0.95, accuracy
    # and the card states the figure measured when the VAE was trained
    measured = json.loads((WEIGHTS_DIR / "vae" / "train.json").read_text())["reconstruction_accuracy"]
    assert measured["train"] >= 0.95 and measured["test"] >= 0.95


def test_the_sampled_latent_is_standardised_and_decodes_through_the_adapter():
    adapter = load_adapter("toy", pretrained=str(WEIGHTS_DIR))
    train, _ = split_prompts()
    rng = np.random.default_rng(3)
    from common.toy.world import render_prompt

    images = torch.from_numpy(np.stack([render_prompt(train[i], rng) for i in rng.integers(len(train), size=256)]))
    with torch.no_grad():
        latents = encode(adapter.vae, images)
    assert latents.shape == (256, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE) == adapter.latent_shape(256)
    # the scaling and shift measured at training make the data ~N(0, 1) per value, as the flow assumes
    assert abs(latents.mean().item()) < 0.1 and 0.9 < latents.std().item() < 1.1
    decoded = adapter.decode(latents)
    assert decoded.shape == images.shape and 0 <= decoded.min() and decoded.max() <= 1
    assert (decoded - images).abs().mean() < 0.05


@pytest.mark.parametrize("split", ["test", "train"])
def test_latent_base_accuracy_on_both_splits_is_the_cards_and_between_02_and_06(split):
    adapter = load_adapter("toy", pretrained=str(WEIGHTS_DIR))
    reward = MultiReward(parse_reward_spec("shapes"))
    metrics, images, _ = evaluate(adapter, load_prompts("toy", split), reward, num_steps=20, guidance=4.0, seed=0,
                                  images_per_category=64)
    assert images.shape == (64 * 6, 3, 32, 32)
    assert 0.2 <= metrics["eval/accuracy"] <= 0.6, metrics
    expected = json.loads((WEIGHTS_DIR / "base_eval.json").read_text())
    key = "eval/accuracy" if split == "test" else "eval/train/accuracy"
    assert metrics["eval/accuracy"] == pytest.approx(expected[key], abs=0.02)
