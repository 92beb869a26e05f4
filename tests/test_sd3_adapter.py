"""The sd3 adapter on a tiny SD3 pipeline saved to disk: our rollout at noise 0 must reproduce
diffusers' own StableDiffusion3Pipeline.__call__ from the same initial latents."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from common.models import get_adapter_class, load_adapter
from common.rollout import initial_latents, rollout

PROMPTS = ["a photo of a cat", "two red dog on the left"]


@pytest.fixture(scope="module")
def adapter(tiny_sd3_dir):
    adapter = load_adapter("sd3", str(tiny_sd3_dir))
    adapter.max_sequence_length = 32
    return adapter


def test_encoding_shapes(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    assert embeds.hidden.shape == (2, 77 + 32, 64)  # CLIP (padded to T5 width) + T5 on the sequence axis
    assert embeds.pooled.shape == (2, 64)           # CLIP-L pooled ++ CLIP-G pooled
    assert len(adapter.negative_embeds()) == 1
    assert adapter.latent_shape(2, 64) == (2, 16, 8, 8)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ode_rollout_equals_the_diffusers_pipeline(adapter, tiny_sd3_dir, guidance):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents(adapter.latent_shape(2, 64), [11, 12])
    expected = pipe(PROMPTS, num_inference_steps=8, height=64, width=64, guidance_scale=guidance, output_type="pt",
                    latents=latents.clone(), max_sequence_length=32).images
    trajectory = rollout(adapter, adapter.encode_prompts(PROMPTS), adapter.make_sigmas(8, 64), latents,
                         negative=adapter.negative_embeds(), guidance=guidance, noise_level=0.0)
    assert trajectory.images.shape == expected.shape == (2, 3, 64, 64)
    assert (trajectory.images - expected).abs().max().item() <= 1e-4
    assert not trajectory.trainable.any()


def test_sde_rollout_trajectory_contents(adapter):
    latents = initial_latents(adapter.latent_shape(2, 64), [1, 2])
    trajectory = rollout(adapter, adapter.encode_prompts(PROMPTS), adapter.make_sigmas(6, 64), latents,
                         negative=adapter.negative_embeds(), guidance=3.0, noise_level=0.7, sampler="flow",
                         generator=torch.Generator().manual_seed(0), sde_window=(1, 4))
    assert trajectory.latents.shape == (2, 7, 16, 8, 8) and trajectory.means.shape == (2, 6, 16, 8, 8)
    assert trajectory.trainable.tolist() == [[False, True, True, True, False, False]] * 2
    assert torch.isfinite(trajectory.log_probs).all() and (trajectory.log_probs[:, 1:4] != 0).all()
    assert trajectory.images.min() >= 0 and trajectory.images.max() <= 1


def test_unknown_model_and_missing_path_fail_before_loading(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(ValueError, match="unknown model 'sdxl'"):
        get_adapter_class("sdxl")
    # no --pretrained: the published checkpoint, absent from an empty cache with the hub offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="stabilityai/stable-diffusion-3.5-medium .*--pretrained /path/to/dir"):
        get_adapter_class("sd3").check_pretrained(None)
    with pytest.raises(FileNotFoundError, match="no toy model"):
        load_adapter("toy", str(tmp_path))
