"""The gmm world: grammar, rewards, the base against its card, the exact likelihood and the
frontier against closed forms, the adapter through the real algorithm files (LoRA, full
fine-tuning, export, resume), and bad input rejected before any model loads."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import flow_grpo
from common.data import load_prompts
from common.gmm import world
from common.gmm.frontier import frontier_error, ode_log_likelihood, tilted
from common.models import load_adapter
from common.oracle import GaussianOracleAdapter, exact_moments
from common.outputs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "gmm", "--track", "none", "--max-minutes", "None", "--num-epochs", "2", "--eval-every", "2",
        "--eval-images-per-category", "16", "--batch-size", "32", "--group-size", "8"]


def test_grammar_names_the_right_modes_and_rejects_unknown_words():
    assert world.parse_prompt("north") == (0,)
    assert world.parse_prompt("east or west") == (2, 6)
    assert world.parse_prompt("the south half") == (3, 4, 5)
    assert world.parse_prompt("any mode") == tuple(range(8))
    with pytest.raises(ValueError, match=r"\['norht'\]"):
        world.parse_prompt("norht")
    with pytest.raises(ValueError, match="not a gmm prompt"):
        world.parse_prompt("north north")
    train, test = load_prompts("gmm", "train"), load_prompts("gmm", "test")
    assert {p.text for p in train} & {p.text for p in test} == {"any mode"}  # held-out strings, but 'any'
    assert all(tuple(p.metadata["targets"]) == world.parse_prompt(p.text) for p in train + test)
    assert len(load_prompts("gmm@tag:single", "train")) == 6


def test_rewards_have_their_optimum_on_the_target_mode():
    centre = world.mode_centres()[2]  # east
    on, beside, past = np.array([centre]), np.array([world.mode_centres()[1]]), np.array([centre * 1.5])
    targets = [(2,)]
    assert world.soft_target(on, targets)[0] == 1.0 and world.hard_target(on, targets)[0] == 1.0
    assert world.soft_target(beside, targets)[0] < 1e-5 and world.hard_target(beside, targets)[0] == 0.0
    # the proxy keeps rising past the mode, off the data, where the gold (soft target) falls
    assert world.proxy_projection(past, targets)[0] == pytest.approx(1.5)
    assert world.soft_target(past, targets)[0] < 0.01  # exp(-1 / (2·0.3²)) at distance 1


def test_true_data_hits_its_targets_as_the_mixture_says():
    rng = np.random.default_rng(0)
    targets = [(0, 4)] * 20000
    points, _ = world.sample_data(targets, 2, rng)
    hit_within_radius = 1 - math.exp(-world.HIT_RADIUS**2 / (2 * world.MODE_STD**2))  # Rayleigh CDF
    expected = world.target_mass((0, 4)) * hit_within_radius
    assert world.hard_target(points, targets).mean() == pytest.approx(expected, abs=3 * math.sqrt(0.25 / 20000))


def test_committed_base_matches_its_card():
    """The card's numbers are reproducible: the hit rate of 'north' and of 'any mode' within 3 SE."""
    from common.gmm.card import measure

    card = (ROOT / "common/gmm/weights/d2/CARD.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in card.splitlines() if line.startswith("| ")}
    adapter = load_adapter("gmm")
    n = 4000
    measured = {r["prompt"]: r for r in measure(adapter, samples=n, seed=1, only=("north", "any mode"), with_kl=False)}
    for prompt in ("north", "any mode"):
        stated = float(rows[prompt][3])
        se = math.sqrt(stated * (1 - stated) * (1 / n + 1 / 10000))
        assert abs(measured[prompt]["hit_base"] - stated) <= 3 * se, (prompt, measured[prompt]["hit_base"], stated)


def test_ode_log_likelihood_is_exact_on_the_gaussian_oracle():
    """The Euler-ODE pushforward of N(0, I) under the oracle's affine velocity is N(mean_N, var_N)."""
    adapter = GaussianOracleAdapter(0.8, 0.09, shape=(2,), scheduler_config=dict(num_train_timesteps=1000, shift=1.0))
    mean, var = exact_moments(adapter.make_sigmas(10), 0.0, "flow", 0.8, 0.09)[-1]
    points = torch.tensor([[0.8, 0.8], [0.5, 1.1], [1.2, 0.3]])
    log_p, residual = ode_log_likelihood(adapter, adapter.encode_prompts([""] * 3), points, num_steps=10)
    exact = (-((points.double() - mean) ** 2).sum(1) / (2 * var) - math.log(2 * math.pi * var))
    assert residual < 1e-5
    assert torch.allclose(log_p, exact, atol=1e-4), (log_p, exact)


def test_tilted_base_matches_the_closed_form_for_a_binary_reward():
    """r in {0, 1} with base rate p: p* = p·e^(1/beta) / (p·e^(1/beta) + 1 - p), KL = kl(p* || p)."""
    p, beta = 0.3, 0.5
    rewards = np.r_[np.ones(3000), np.zeros(7000)]
    star = p * math.exp(1 / beta) / (p * math.exp(1 / beta) + 1 - p)
    kl = star * math.log(star / p) + (1 - star) * math.log((1 - star) / (1 - p))
    expected, measured_kl = tilted(rewards, beta)
    assert expected == pytest.approx(star, abs=1e-9) and measured_kl == pytest.approx(kl, abs=1e-9)
    # and the Monte Carlo error of the estimate shrinks as 1/sqrt(N)
    errors = frontier_error(np.random.default_rng(0).random(8192), 0.1, sizes=(512, 8192))
    assert errors[8192][0] < errors[512][0] / 2.5


def test_lora_and_full_fine_tuning_run_export_and_log_the_kl_keys(tmp_path):
    for name, extra in (("lora", []), ("full", ["--no-use-lora"])):
        out = flow_grpo.main(flow_grpo.parse_args([*TINY, "--output-dir", str(tmp_path / name), *extra]))
        records = read_metrics(Path(out) / "metrics.jsonl")
        final = records[-1]
        assert final["eval/kl_marginal"] > 0 and final["eval/kl_path"] > 0, final
        # the base against itself: the policy's log-density by the forward pass, the base's by the Newton
        # inversion (residual < 1e-5 per step), so they agree to that precision, not bitwise (4e-6 seen)
        assert records[0]["eval/kl_marginal"] == pytest.approx(0.0, abs=1e-4)
        assert (Path(out) / "frontier.png").is_file() and (Path(out) / "grids" / "eval_epoch0000.png").is_file()
        frontier = json.loads((Path(out) / "frontier.json").read_text())
        assert frontier["frontier_reward"][0] > frontier["frontier_reward"][-1]  # small beta: more reward
        exported = Path(out) / "final" / ("diffusers" if name == "lora" else "transformer")
        assert exported.is_dir(), list((Path(out) / "final").iterdir())


def test_resume_is_bitwise_exact_on_the_gmm_world(tmp_path):
    common = [*TINY, "--save-every", "1", "--eval-every", "3"]
    full = read_metrics(flow_grpo.main(flow_grpo.parse_args([*common, "--num-epochs", "3",
                                                             "--output-dir", str(tmp_path / "full")])) / "metrics.jsonl")
    flow_grpo.main(flow_grpo.parse_args([*common, "--num-epochs", "2", "--output-dir", str(tmp_path / "split")]))
    resumed = read_metrics(flow_grpo.main(flow_grpo.parse_args(
        [*common, "--num-epochs", "3", "--resume", "latest", "--output-dir", str(tmp_path / "split")])) / "metrics.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("perf/")}  # noqa: E731
    assert [strip(r) for r in full] == [strip(r) for r in resumed]


@pytest.mark.parametrize("model,prompt,word", [("toy", "a photo of a purple hexagon", "purple"),
                                                ("gmm", "norht or south", "norht")])
def test_out_of_vocabulary_prompts_fail_before_any_model_loads(tmp_path, model, prompt, word):
    prompts = tmp_path / "bad.txt"
    prompts.write_text(prompt + "\n")
    start = time.time()
    result = subprocess.run([sys.executable, "flow_grpo.py", "--model", model, "--prompts", str(prompts),
                             "--output-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and time.time() - start < 15
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and word in last and str(prompts) in last, result.stderr[-500:]
    assert "Traceback" not in result.stderr


def test_forward_and_inverted_log_likelihoods_agree_on_the_gmm_base():
    """The policy's KL uses the forward pass (log-dets along its own path), the base's the Newton
    inversion: on the same points the two give the same log-density."""
    from common.gmm.frontier import ode_sample_log_likelihood
    from common.rollout import initial_latents

    adapter = load_adapter("gmm")
    embeds = adapter.encode_prompts(["north", "the east half", "any mode", "east or west"] * 16)
    noise = initial_latents(adapter.latent_shape(64), range(64))
    points, forward = ode_sample_log_likelihood(adapter, embeds, noise, num_steps=20)
    inverted, residual = ode_log_likelihood(adapter, embeds, points, num_steps=20)
    assert residual < 1e-5
    assert torch.allclose(forward, inverted, atol=1e-3), (forward - inverted).abs().max()
