"""Training through CFG (issue 15): with `detach_uncond` the LoRA gradient of a per-step log-prob
is w·∇v_c, as the published flow_grpo `compute_log_prob` (v_u detached since 2025-07-15);
without it, (1 - w)·∇v_u + w·∇v_c. Checked in closed form on the toy transformer and the gmm
MLP, then wired through every algorithm file that trains with CFG, the on-policy ratio 1 both ways."""

import warnings
from pathlib import Path

import pytest
import torch

import flow_dpo
import flow_grpo
import flow_grpo_fast
import flow_opd
import grpo_guard
from common.checkpoint import add_lora
from common.data import load_prompts
from common.models import load_adapter
from common.models.base import ModelAdapter
from common.outputs import read_metrics
from common.sde import sde_step

GUIDANCE = 4.5
TINY = ["--num-epochs", "1", "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1",
        "--updates-per-epoch", "1", "--eval-every", "0", "--track", "none", "--num-steps", "4",
        "--guidance", "4.0", "--no-filter-zero-std"]


def tiny_lora_model(name):
    """The adapter with a LoRA whose B is random (at B = 0 the gradient w.r.t. A vanishes), one
    CFG SDE transition x -> x_next at step 1 of 6, and the LoRA parameters."""
    torch.manual_seed(0)
    adapter = load_adapter(name)
    add_lora(adapter.transformer, 4, 8, adapter.lora_target_modules)
    params = [p for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in adapter.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn_like(p))
    texts = [p.text for p in load_prompts(name, "train")[:3]]
    embeds, negative = adapter.encode_prompts(texts), adapter.negative_embeds()
    sigmas = adapter.make_sigmas(6)
    x = torch.randn(adapter.latent_shape(len(texts)), generator=torch.Generator().manual_seed(1))
    sigma = sigmas[1].expand(len(texts))
    with torch.no_grad():
        velocity = adapter.predict_velocity(x, sigma, embeds, negative, GUIDANCE)
        x_next = sde_step(velocity, x, 1, sigmas, 0.7, "flow", generator=torch.Generator().manual_seed(2)).sample
    return adapter, params, embeds, negative, sigmas, x, sigma, x_next


def log_prob_gradient(adapter, params, embeds, negative, sigmas, x, sigma, x_next, detach_uncond):
    velocity = adapter.predict_velocity(x, sigma, embeds, negative, GUIDANCE, detach_uncond=detach_uncond)
    log_prob = sde_step(velocity, x, 1, sigmas, 0.7, "flow", prev_sample=x_next).log_prob
    return velocity.detach(), torch.autograd.grad(log_prob.sum(), params)


def closed_form(adapter, params, embeds, negative, sigmas, x, sigma, x_next):
    """g = ∂ log p/∂v at the CFG velocity, then the chain rule through each half's own forward
    (unbatched): (J_u^T g, J_c^T g), J = ∂v/∂θ."""
    velocity = adapter.predict_velocity(x, sigma, embeds, negative, GUIDANCE).detach().requires_grad_(True)
    g, = torch.autograd.grad(sde_step(velocity, x, 1, sigmas, 0.7, "flow", prev_sample=x_next).log_prob.sum(),
                             velocity)
    uncond = adapter.transformer_forward(x, sigma, negative.repeat(len(x))).float()
    cond = adapter.transformer_forward(x, sigma, embeds).float()
    return torch.autograd.grad(uncond, params, g), torch.autograd.grad(cond, params, g)


def assert_close(actual, expected):
    scale = max(e.abs().max().item() for e in expected)
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-5 * scale), (a - e).abs().max().item() / scale


@pytest.mark.parametrize("model", ["toy", "gmm"])
def test_detached_cfg_gradient_is_w_times_the_conditional_gradient(model):
    setup = tiny_lora_model(model)
    velocity, grads = log_prob_gradient(*setup, detach_uncond=True)
    grad_uncond, grad_cond = closed_form(*setup)
    assert_close(grads, [GUIDANCE * c for c in grad_cond])
    # the value is the rollout's, bitwise: rollouts and the on-policy ratio cannot tell the settings apart
    adapter, _, embeds, negative, _, x, sigma, _ = setup
    with torch.no_grad():
        assert torch.equal(velocity, adapter.predict_velocity(x, sigma, embeds, negative, GUIDANCE))


@pytest.mark.parametrize("model", ["toy", "gmm"])
def test_cfg_gradient_through_both_halves_includes_the_unconditional_term(model):
    setup = tiny_lora_model(model)
    _, grads = log_prob_gradient(*setup, detach_uncond=False)
    grad_uncond, grad_cond = closed_form(*setup)
    assert_close(grads, [(1 - GUIDANCE) * u + GUIDANCE * c for u, c in zip(grad_uncond, grad_cond)])
    # and the unconditional term is not negligible: the two settings really differ
    unconditional = torch.sqrt(sum(((1 - GUIDANCE) * u).pow(2).sum() for u in grad_uncond))
    total = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    assert unconditional > 0.1 * total


@pytest.fixture
def training_calls(monkeypatch):
    """Records `detach_uncond` of every CFG velocity computed with gradients (the training forwards)."""
    calls = []
    original = ModelAdapter.predict_velocity

    def spy(self, latents, sigma, embeds, negative=None, guidance=1.0, detach_uncond=False):
        if torch.is_grad_enabled() and negative is not None and guidance > 1:
            calls.append(detach_uncond)
        return original(self, latents, sigma, embeds, negative, guidance, detach_uncond=detach_uncond)

    monkeypatch.setattr(ModelAdapter, "predict_velocity", spy)
    return calls


@pytest.mark.parametrize("flag,detached", [([], True), (["--no-train-cfg-detach-uncond"], False)])
def test_flow_grpo_on_policy_ratio_is_one_both_ways(tmp_path, training_calls, flag, detached):
    args = flow_grpo.parse_args([*TINY, "--output-dir", str(tmp_path / "run"), *flag])
    record = read_metrics(Path(flow_grpo.main(args)) / "metrics.jsonl")[0]
    assert record["train/ratio_dev_max"] <= 1e-6
    assert training_calls and set(training_calls) == {detached}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """One rank-2 toy LoRA with a small random B, exported like a flow_grpo.py run's final/."""
    from common.checkpoint import export_lora

    root = tmp_path_factory.mktemp("teacher")
    adapter = load_adapter("toy")
    add_lora(adapter.transformer, 2, 4, adapter.lora_target_modules)
    with torch.no_grad():
        for n, p in adapter.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    export_lora(adapter.transformer, root / "final")
    return root


@pytest.mark.parametrize("script", ["flow_grpo_fast", "grpo_guard", "flow_opd"])
@pytest.mark.parametrize("detached", [True, False])
def test_every_cfg_trainer_passes_the_option(tmp_path, training_calls, teacher, script, detached):
    module, extra = {"flow_grpo_fast": (flow_grpo_fast, ["--num-steps", "6", "--sde-window-size", "2",
                                                         "--sde-window-range", "1", "5"]),
                     "grpo_guard": (grpo_guard, ["--no-filter-zero-std"]),
                     "flow_opd": (flow_opd, ["--teachers", f"counting={teacher}", "--init", "base"])}[script]
    argv = [*(a for a in TINY if a != "--no-filter-zero-std"), *extra, "--output-dir", str(tmp_path / script),
            "--train-cfg-detach-uncond" if detached else "--no-train-cfg-detach-uncond"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = read_metrics(Path(module.main(module.parse_args(argv))) / "metrics.jsonl")[0]
    assert record["train/ratio_dev_max"] <= 1e-6
    assert training_calls and set(training_calls) == {detached}


@pytest.mark.parametrize("module", [flow_grpo, flow_grpo_fast, grpo_guard, flow_opd])
def test_presets_train_through_cfg_as_published(module):
    for name in module.PRESETS:
        args = module.parse_args(["--preset", name])
        assert args.train_cfg_detach_uncond, f"{module.__name__} --preset {name}"


def test_flow_dpo_trains_without_cfg(tmp_path, training_calls):
    # its loss is flow matching on the conditional velocity alone, CFG only in rollouts: no option
    argv = ["--num-epochs", "1", "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1",
            "--updates-per-epoch", "1", "--timestep-samples", "1", "--eval-every", "0", "--track", "none",
            "--num-steps", "2", "--guidance", "4.0", "--output-dir", str(tmp_path / "dpo")]
    flow_dpo.main(flow_dpo.parse_args(argv))
    assert training_calls == [] and not hasattr(flow_dpo.Args, "train_cfg_detach_uncond")


def test_cfg_conditioning_is_built_once_per_pair_and_never_reused_for_another():
    """`cfg_embeds` caches [negative; embeds] for the pair a rollout passes at every step: the same
    pair gets the same object back (no per-step concatenation), and any other pair (a new batch,
    a training minibatch) gets its own, so the velocity is the uncached one either way."""
    from common.models.base import PromptEmbeds

    adapter = load_adapter("toy")
    texts = [p.text for p in load_prompts("toy", "train")[:4]]
    negative = adapter.negative_embeds()
    first, second = adapter.encode_prompts(texts[:2]), adapter.encode_prompts(texts[2:])
    both = adapter.cfg_embeds(first, negative)
    assert adapter.cfg_embeds(first, negative) is both
    assert adapter.cfg_embeds(second, negative) is not both
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        for embeds in (first, second, first[[1, 0]]):
            direct = adapter.transformer_forward(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                                 PromptEmbeds.cat([negative.repeat(2), embeds]))
            uncond, cond = direct.float().chunk(2)
            expected = uncond + GUIDANCE * (cond - uncond)
            assert torch.equal(adapter.predict_velocity(x, sigma, embeds, negative, GUIDANCE), expected)
