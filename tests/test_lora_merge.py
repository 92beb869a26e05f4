"""common.lora_merge: the merge maths on hand-built LoRAs (identical LoRAs, the factor-average
cross terms, exact delta averages), the file round trip and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.lora_merge import (delta_average, factor_average, lora_deltas, merge_loras, read_lora, save_lora)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "peft_type": "LORA", "init_lora_weights": "gaussian"}
MODULES = ("blocks.0.to_q", "blocks.1.to_q")


def random_lora(seed, shared_a=None, out_dim=12, in_dim=10, rank=4):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = (shared_a[m] if shared_a is not None
                                       else torch.randn(rank, in_dim, generator=generator))
        state[f"{m}.lora_B.weight"] = torch.randn(out_dim, rank, generator=generator)
    return state


@pytest.mark.parametrize("method", ["factor_average", "delta_average"])
def test_k_identical_loras_merge_to_that_lora(method):
    state = random_lora(0)
    merge = factor_average if method == "factor_average" else delta_average
    config, merged = merge([CONFIG] * 3, [state] * 3)
    expected = lora_deltas(CONFIG, state)
    got = lora_deltas(config, merged)
    for m in MODULES:
        assert torch.allclose(got[m], expected[m], atol=1e-5, rtol=1e-5)
    assert (config["r"], config["lora_alpha"]) == (4, 8)


def test_different_a_differ_by_the_predicted_cross_terms():
    one, two = random_lora(1), random_lora(2)
    factor = lora_deltas(*factor_average([CONFIG] * 2, [one, two]))
    delta = lora_deltas(*delta_average([CONFIG] * 2, [one, two], rank=8))  # rank 2r: no truncation
    scale = CONFIG["lora_alpha"] / CONFIG["r"]
    for m in MODULES:
        b1, a1, b2, a2 = (s[f"{m}.lora_{x}.weight"] for s in (one, two) for x in "BA")
        own = scale * (b1 @ a1 + b2 @ a2) / 2
        assert torch.allclose(delta[m], own, atol=1e-4)                   # delta_average: exactly the mean delta
        # factor_average: (B1+B2)(A1+A2)/4 = own deltas / 4 + cross terms B1A2, B2A1 / 4
        assert torch.allclose(factor[m], scale * (b1 @ a1 + b2 @ a2 + b1 @ a2 + b2 @ a1) / 4, atol=1e-4)
        assert torch.allclose(factor[m] - delta[m], -scale * (b1 - b2) @ (a1 - a2) / 4, atol=1e-4)
        assert (factor[m] - delta[m]).abs().max() > 1.0                    # and the cross terms are not small


def test_shared_a_makes_the_two_merges_agree():
    shared = {m: torch.randn(4, 10, generator=torch.Generator().manual_seed(7)) for m in MODULES}
    one, two = random_lora(3, shared), random_lora(4, shared)
    factor = lora_deltas(*factor_average([CONFIG] * 2, [one, two]))
    delta = lora_deltas(*delta_average([CONFIG] * 2, [one, two]))  # rank(ΔW) ≤ r: truncation is exact
    for m in MODULES:
        assert torch.allclose(factor[m], delta[m], atol=1e-4)


def test_delta_average_truncation_is_the_best_rank_r_approximation():
    one, two = random_lora(5), random_lora(6)
    config, merged = delta_average([CONFIG] * 2, [one, two], weights=[3, 1])
    scale = 2.0
    for m in MODULES:
        target = scale * (0.75 * one[f"{m}.lora_B.weight"] @ one[f"{m}.lora_A.weight"]
                          + 0.25 * two[f"{m}.lora_B.weight"] @ two[f"{m}.lora_A.weight"])
        u, s, vh = torch.linalg.svd(target.double())
        best = (u[:, :4] * s[:4]) @ vh[:4]
        got = lora_deltas(config, merged)[m]
        assert torch.allclose(got.double(), best, atol=1e-4)
        assert merged[f"{m}.lora_A.weight"].shape == (4, 10)


def test_mismatched_loras_are_rejected():
    with pytest.raises(ValueError, match="equal rank and alpha"):
        factor_average([CONFIG, dict(CONFIG, lora_alpha=4)], [random_lora(0), random_lora(1)])
    other = {k.replace("blocks.1", "blocks.2"): v for k, v in random_lora(1).items()}
    with pytest.raises(ValueError, match="other modules"):
        delta_average([CONFIG] * 2, [random_lora(0), other])


def test_save_read_round_trip_and_cli(tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        save_lora(tmp_path / name, CONFIG, random_lora(seed))
    config, state = read_lora(tmp_path / "a")                      # run-dir style: a/peft
    assert torch.equal(state[f"{MODULES[0]}.lora_B.weight"], random_lora(1)[f"{MODULES[0]}.lora_B.weight"])
    config_d, state_d = read_lora(tmp_path / "a" / "diffusers")     # diffusers export with its metadata
    assert config_d["lora_alpha"] == 8 and all(torch.equal(state[k], state_d[k]) for k in state)
    result = subprocess.run([sys.executable, "-m", "common.lora_merge", "--method", "delta_average", "--output",
                             str(tmp_path / "merged"), "--loras", str(tmp_path / "a"), str(tmp_path / "b")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = lora_deltas(*merge_loras([tmp_path / "a", tmp_path / "b"], "delta_average"))
    got = lora_deltas(*read_lora(tmp_path / "merged"))
    assert all(torch.allclose(got[m], expected[m], atol=1e-5) for m in MODULES)
