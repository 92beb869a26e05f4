"""The KL term and the EMA, exercised for real: the KL's gradient against its closed form, its
pull towards the base in every file that has one, and the EMA's evaluation, export and resume."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flow_grpo
import flow_grpo_fast
import grpo_guard
from common import sde
from common.checkpoint import load_checkpoint, load_lora
from common.data import load_prompts
from common.evaluate import evaluate
from common.models import load_adapter
from common.outputs import read_metrics
from common.rewards import MultiReward, parse_reward_spec

SHORT = ["--preset", "gmm", "--track", "none", "--max-minutes", "None"]


def test_kl_gradient_equals_its_closed_form():
    """d/dmean of mean_D (mean - ref)² / (2 s²) = (mean - ref) / (D s²); flowgrpo: s -> g."""
    torch.manual_seed(0)
    batch, dim = 3, 5
    mean = torch.randn(batch, dim, requires_grad=True)
    ref = torch.randn(batch, dim)
    std, g = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    zeros = torch.zeros(batch)
    step = sde.StepOutput(sample=mean.detach(), log_prob=zeros, mean=mean, std=std, diffusion=g, sigma=zeros + 0.5,
                          sigma_next=zeros + 0.4, dt=zeros - 0.1, trainable=torch.tensor([True, True, False]))
    for convention, scale in (("exact", std), ("flowgrpo", g)):
        mean.grad = None
        sde.transition_kl(mean, ref, step, convention).sum().backward()
        expected = (mean - ref).detach() / (dim * scale[:, None] ** 2)
        expected[2] = 0  # not trainable: no KL, no gradient
        assert torch.allclose(mean.grad, expected, atol=1e-6), convention


def final_eval(module, tmp_path, name, *extra, epochs=40):
    out = module.main(module.parse_args([*SHORT, "--num-epochs", str(epochs), "--eval-every", str(epochs),
                                         "--save-every", str(epochs), "--grid-every", "0",
                                         "--output-dir", str(tmp_path / name), *extra]))
    return read_metrics(Path(out) / "metrics.jsonl")


@pytest.mark.parametrize("module", [flow_grpo, flow_grpo_fast, grpo_guard], ids=lambda m: m.__name__)
def test_a_large_kl_weight_keeps_the_run_near_its_base(module, tmp_path):
    free = final_eval(module, tmp_path, "beta0")
    anchored = final_eval(module, tmp_path, "beta", "--beta", "1.0")
    assert all(r["train/kl"] == 0.0 for r in free if "train/kl" in r)
    assert any((r.get("train/kl") or 0) > 0 for r in anchored)
    kl_free, kl_anchored = free[-1]["eval/kl_path"], anchored[-1]["eval/kl_path"]
    print(f"{module.__name__}: path KL {kl_free:.3f} (beta 0) vs {kl_anchored:.3f} (beta 1)")
    assert kl_anchored < 0.5 * kl_free, (kl_free, kl_anchored)


def strip_adapter_name(name):
    return name.replace(".default.", ".")


def test_ema_is_what_the_run_evaluates_and_exports_and_it_follows_the_recursion(tmp_path):
    epochs = 4
    out = flow_grpo.main(flow_grpo.parse_args([*SHORT, "--num-epochs", str(epochs), "--eval-every", str(epochs),
                                               "--save-every", "1", "--keep-checkpoints", "10", "--ema",
                                               "--ema-every", "1", "--output-dir", str(tmp_path / "ema")]))
    states = [load_checkpoint(out / f"checkpoint-{e:06d}") for e in range(1, epochs + 1)]
    names = list(states[0]["trainable"])
    # one optimizer step per epoch: step n = epoch n, decay min(0.9, (1 + n) / (10 + n))
    for n in range(1, epochs):
        decay = min(0.9, (1 + n) / (10 + n))
        for k, name in enumerate(names):
            previous, live = states[n - 1]["ema"]["shadow"][k], states[n]["trainable"][name]
            expected = previous + (1 - decay) * (live - previous)
            assert torch.allclose(states[n]["ema"]["shadow"][k], expected, atol=1e-7), (n, name)
    last = states[-1]
    assert any(not torch.equal(s, last["trainable"][name]) for s, name in zip(last["ema"]["shadow"], names))
    exported = load_file(str(out / "final" / "peft" / "adapter_model.safetensors"))
    for k, name in enumerate(names):
        assert torch.equal(exported[strip_adapter_name(name)], last["ema"]["shadow"][k]), name
    # the final evaluation is the EMA's: re-evaluated here from the checkpoint (EMA weights) it
    # matches, and the live weights give another number
    args = flow_grpo.parse_args(SHORT)
    reward_fn, prompts = MultiReward(parse_reward_spec(args.reward)), load_prompts(args.prompts, "test")

    def reward_of(adapter):
        metrics, _, _ = evaluate(adapter, prompts, reward_fn, num_steps=args.eval_num_steps,
                                 guidance=args.eval_guidance, seed=args.seed,
                                 images_per_category=args.eval_images_per_category)
        return metrics["eval/reward_mean"]

    ema_adapter = load_adapter("gmm")
    load_lora(ema_adapter.transformer, out / f"checkpoint-{epochs:06d}", default_alpha=ema_adapter.lora_alpha)
    live_adapter = load_adapter("gmm")
    load_lora(live_adapter.transformer, out / f"checkpoint-{epochs:06d}", default_alpha=live_adapter.lora_alpha)
    named = dict(live_adapter.transformer.named_parameters())
    with torch.no_grad():
        for name, value in last["trainable"].items():
            named[name].copy_(value)
    logged = read_metrics(out / "metrics.jsonl")[-1]["eval/reward_mean"]
    assert reward_of(ema_adapter) == pytest.approx(logged, abs=1e-6)
    assert reward_of(live_adapter) != pytest.approx(logged, abs=1e-4)


def test_resume_restores_the_ema_bitwise(tmp_path):
    common = [*SHORT, "--ema", "--ema-every", "1", "--save-every", "1", "--eval-every", "0"]
    full = flow_grpo.main(flow_grpo.parse_args([*common, "--num-epochs", "3", "--output-dir", str(tmp_path / "full")]))
    flow_grpo.main(flow_grpo.parse_args([*common, "--num-epochs", "2", "--output-dir", str(tmp_path / "split")]))
    split = flow_grpo.main(flow_grpo.parse_args([*common, "--num-epochs", "3", "--resume", "latest",
                                                 "--output-dir", str(tmp_path / "split")]))
    a, b = load_checkpoint(full / "checkpoint-000003"), load_checkpoint(split / "checkpoint-000003")
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]))
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
