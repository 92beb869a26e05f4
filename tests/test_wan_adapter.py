"""The wan adapter on a tiny Wan2.1 pipeline saved to disk: our rollout at noise 0 must reproduce
diffusers' own WanPipeline.__call__ from the same initial latents, with and without CFG and with
an exported LoRA loaded by the pipeline; one flow_grpo epoch is on-policy.

The tiny pipeline carries a FlowMatchEulerDiscreteScheduler (shift 3) in place of the released
UniPCMultistepScheduler (tests/tiny_pipelines_wan.py), so WanPipeline.__call__ takes the same Euler
steps on the same sigmas as our rollout; the released UniPC grid and its integer time input are
pinned separately against the scheduler itself."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from common.models import get_adapter_class, load_adapter
from common.models.wan import WanAdapter
from common.rollout import initial_latents, rollout

PROMPTS = ["a photo of a cat", "two red dog on the left"]
HEIGHT, WIDTH, FRAMES, TOKENS = 32, 48, 5, 16  # non-square, to catch a height/width swap


@pytest.fixture(scope="module")
def wan_dir(tiny_model_dir):
    return tiny_model_dir("wan")


@pytest.fixture(scope="module")
def adapter(wan_dir):
    adapter = load_adapter("wan", str(wan_dir))
    adapter.num_frames, adapter.max_sequence_length = FRAMES, TOKENS
    return adapter


def pipeline(wan_dir):
    pipe = WanPipeline.from_pretrained(str(wan_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_video(pipe, latents, guidance, steps=4):
    return pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=steps,
                guidance_scale=guidance, latents=latents.clone(), output_type="pt",
                max_sequence_length=TOKENS).frames


def test_encoding_shapes_and_latent_shape(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    assert embeds.hidden.shape == (2, TOKENS, 32)  # UMT5 states, zero-padded to max_sequence_length
    assert (embeds.hidden[0, 6:] == 0).all() and (embeds.hidden[0, :6] != 0).any()  # 5 words + </s>
    assert len(adapter.negative_embeds()) == 1
    assert adapter.latent_shape(2, (HEIGHT, WIDTH)) == (2, 16, 2, 4, 6)  # (B, C, (F - 1)/4 + 1, H/8, W/8)
    assert adapter.latent_shape(3, 32) == (3, 16, 2, 4, 4)  # an int is a square
    with pytest.raises(ValueError, match="divisible by 16"):
        adapter.latent_shape(1, (40, 48))
    assert WanAdapter.default_resolution == (240, 416) and WanAdapter.num_frames == 33  # the published video


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_rollout_equals_the_diffusers_pipeline(adapter, wan_dir, guidance):
    latents = initial_latents(adapter.latent_shape(2, (HEIGHT, WIDTH)), [11, 12])
    expected = pipeline_video(pipeline(wan_dir), latents, guidance)
    # batched [uncond; cond] here, two forwards in the pipeline
    trajectory = rollout(adapter, adapter.encode_prompts(PROMPTS), adapter.make_sigmas(4, (HEIGHT, WIDTH)), latents,
                         negative=adapter.negative_embeds(), guidance=guidance, noise_level=0.0)
    assert trajectory.images.shape == expected.shape == (2, FRAMES, 3, HEIGHT, WIDTH)  # (B, F, 3, H, W)
    assert (trajectory.images - expected).abs().max().item() <= 1e-4
    assert trajectory.latents.shape == (2, 5, 16, 2, 4, 6) and not trajectory.trainable.any()


def test_exported_lora_loads_in_the_pipeline_and_matches_our_rollout(adapter, wan_dir, tmp_path):
    from common.checkpoint import add_lora, export_lora

    pipe = pipeline(wan_dir)
    ours = load_adapter("wan", str(wan_dir))
    ours.num_frames, ours.max_sequence_length = FRAMES, TOKENS
    add_lora(ours.transformer, 4, 8, ours.lora_target_modules)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ours.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    adapted = {name.split(".lora_A")[0] for name, _ in ours.transformer.named_parameters() if "lora_A" in name}
    assert adapted and all(name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
                           for name in adapted)
    export_lora(ours.transformer, tmp_path)
    latents = initial_latents(ours.latent_shape(2, (HEIGHT, WIDTH)), [3, 4])
    base = pipeline_video(pipe, latents, 4.5)
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    expected = pipeline_video(pipe, latents, 4.5)
    trajectory = rollout(ours, ours.encode_prompts(PROMPTS), ours.make_sigmas(4, (HEIGHT, WIDTH)), latents,
                         negative=ours.negative_embeds(), guidance=4.5, noise_level=0.0)
    assert (expected - base).abs().max().item() > 1e-3  # the LoRA changes the video
    assert (trajectory.images - expected).abs().max().item() <= 1e-4


def test_released_unipc_grid_and_integer_time_input(adapter):
    """The released checkpoints' scheduler: UniPC flow sigmas with flow_shift 3; our grid is its
    sigmas with sigma_0 = 1 (UniPC's 1 - 1e-6 is a guard for its own solver) and the time input its
    int64 timesteps, as flow_grpo's Wan rollout feeds them."""
    from diffusers import UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    final_sigmas_type="zero")
    released = WanAdapter(adapter.pipeline)
    released.scheduler_config = dict(unipc.config)
    released.integer_timesteps = True
    for steps in (20, 50):
        unipc.set_timesteps(steps)
        sigmas = released.make_sigmas(steps)
        assert len(sigmas) == steps + 1 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
        assert torch.equal(sigmas[1:], unipc.sigmas[1:].float())
        assert torch.equal(released.timestep(sigmas[:-1]).long(), unipc.timesteps)
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    assert sigmas[1].item() == pytest.approx(shift(1 - 0.999 / 50), abs=1e-6)
    assert adapter.timestep(torch.tensor([0.5])).item() == 500.0  # FlowMatchEuler: float 1000·sigma


def test_picture_writes_a_frame_strip_per_video(adapter, tmp_path):
    from PIL import Image

    from common.data import Prompt

    videos = torch.rand(3, FRAMES, 3, HEIGHT, WIDTH)
    path = tmp_path / "strips.png"
    adapter.picture(path, videos, [Prompt(p, {}) for p in PROMPTS + ["a dog"]], np.array([0.1, 0.5, 0.9]))
    picture = Image.open(path)
    assert picture.height == 3 * (2 * HEIGHT + 30)  # one row per video
    assert picture.width >= 4 * 2 * WIDTH  # 4 frames side by side


def test_one_flow_grpo_epoch_is_on_policy(tmp_path, wan_dir, monkeypatch):
    import flow_grpo
    from common.outputs import read_metrics

    monkeypatch.setattr(WanAdapter, "num_frames", FRAMES)
    monkeypatch.setattr(WanAdapter, "max_sequence_length", TOKENS)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\ntwo blue cat\nthe dog on the left\n")
    args = flow_grpo.parse_args([
        "--preset", "toy", "--model", "wan", "--pretrained", str(wan_dir), "--resolution", "32",
        "--prompts", str(prompts), "--reward", "jpeg_compressibility", "--sampler", "flow", "--noise-level", "0.7",
        "--guidance", "4.5", "--no-filter-zero-std", "--lora-rank", "4", "--lora-alpha", "8", "--num-epochs", "1",
        "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1", "--updates-per-epoch", "1",
        "--eval-every", "0", "--track", "none", "--num-steps", "4", "--output-dir", str(tmp_path / "run")])
    out = flow_grpo.main(args)
    records = read_metrics(Path(out) / "metrics.jsonl")
    assert records[0]["train/ratio_dev_max"] <= 1e-6
    assert np.isfinite(records[0]["train/loss"]) and np.isfinite(records[0]["reward/mean"])
    assert (Path(out) / "final" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


def test_missing_checkpoint_fails_before_loading(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="Wan-AI/Wan2.1-T2V-1.3B-Diffusers .*--pretrained /path/to/dir"):
        get_adapter_class("wan").check_pretrained(None)
