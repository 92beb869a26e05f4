"""The qwen_image adapter on a tiny Qwen-Image pipeline saved to disk: our rollout at noise 0 must
reproduce diffusers' own QwenImagePipeline.__call__ (two forwards, cond then uncond, each with its
own text length) from the same packed initial latents, with and without a LoRA."""

from pathlib import Path

import pytest
import torch

import flow_grpo
from common.checkpoint import add_lora, export_lora
from common.models import get_adapter_class, load_adapter
from common.outputs import read_metrics
from common.rollout import initial_latents, rollout

PROMPTS = ["a photo of a cat", "two red dog on the left and the blue cat"]  # different token lengths
RES = 32  # 8x8 VAE latents, 4x4 = 16 packed tokens of 16 channels


@pytest.fixture(scope="module")
def qwen_dir(tiny_model_dir):
    return tiny_model_dir("qwen_image")


@pytest.fixture(scope="module")
def adapter(qwen_dir):
    adapter = load_adapter("qwen_image", str(qwen_dir))
    adapter.max_sequence_length = 48
    return adapter


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(qwen_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe, latents, guidance, steps=6):
    cfg = dict(negative_prompt=" ", true_cfg_scale=guidance) if guidance > 1 else dict(true_cfg_scale=1.0)
    return pipe(PROMPTS, height=RES, width=RES, num_inference_steps=steps, latents=latents.clone(), output_type="pt",
                max_sequence_length=48, **cfg).images


def test_encoding_shapes_and_padding(adapter):
    embeds = adapter.encode_prompts(PROMPTS)
    assert embeds.hidden.shape == (2, 48, 32) and embeds.mask.shape == (2, 48) and embeds.mask.dtype == torch.bool
    lengths = embeds.mask.sum(1).tolist()
    assert lengths[0] < lengths[1]  # padding trimmed per prompt, as the pipeline's encode_prompt
    assert (embeds.hidden[0, lengths[0]:] == 0).all()
    # the published pipeline's own numbers, before our padding to a common length
    hidden, _ = adapter.pipeline.encode_prompt(PROMPTS, device="cpu", max_sequence_length=48)
    assert torch.equal(embeds.hidden[:, :hidden.shape[1]], hidden)
    negative = adapter.negative_embeds()
    assert len(negative) == 1 and negative.hidden.shape[1] == 48  # concatenates with any batch
    assert adapter.latent_shape(2, RES) == (2, 16, 16) and adapter.image_seq_len(RES) == 16


def test_padding_does_not_change_the_velocity(adapter):
    """The transformer masks padded text keys, and text RoPE positions do not depend on the padded
    length: a prompt padded inside a batch with a longer one (and to max_sequence_length) predicts
    what it predicts alone, unpadded, as in the pipeline's separate cond / uncond calls."""
    latents, sigma = torch.randn(2, 16, 16), torch.tensor([0.7, 0.7])
    batched = adapter.transformer_forward(latents, sigma, adapter.encode_prompts(PROMPTS))
    for i, text in enumerate(PROMPTS):
        hidden, mask = adapter.pipeline.encode_prompt([text], device="cpu", max_sequence_length=48)
        assert mask is None  # a batch of one has no padding
        alone = adapter.transformer(hidden_states=latents[i:i + 1], timestep=sigma[:1], encoder_hidden_states=hidden,
                                    img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
        assert (batched[i:i + 1] - alone).abs().max().item() <= 1e-5


def test_norm_rescaled_guidance(adapter):
    uncond, cond = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    guided = adapter.combine_guidance(uncond, cond, 4.0)
    combined = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(guided.norm(dim=-1), cond.norm(dim=-1), atol=1e-5)  # per token, channel norm
    assert torch.allclose(guided / guided.norm(dim=-1, keepdim=True), combined / combined.norm(dim=-1, keepdim=True),
                          atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_ode_rollout_equals_the_diffusers_pipeline(adapter, pipe, guidance):
    latents = initial_latents(adapter.latent_shape(2, RES), [11, 12])
    expected = pipeline_images(pipe, latents, guidance)
    trajectory = rollout(adapter, adapter.encode_prompts(PROMPTS), adapter.make_sigmas(6, RES), latents,
                         negative=adapter.negative_embeds(), guidance=guidance, noise_level=0.0)
    assert trajectory.images.shape == expected.shape == (2, 3, RES, RES)
    assert (trajectory.images - expected).abs().max().item() <= 1e-4


def test_sde_rollout_trajectory_contents(adapter):
    latents = initial_latents(adapter.latent_shape(2, RES), [1, 2])
    trajectory = rollout(adapter, adapter.encode_prompts(PROMPTS), adapter.make_sigmas(6, RES), latents,
                         negative=adapter.negative_embeds(), guidance=4.0, noise_level=1.2, sampler="flow",
                         generator=torch.Generator().manual_seed(0), sde_window=(0, 2))
    assert trajectory.latents.shape == (2, 7, 16, 16)
    assert trajectory.trainable.tolist() == [[True, True, False, False, False, False]] * 2
    assert torch.isfinite(trajectory.log_probs).all()


def test_exported_lora_loads_in_the_pipeline(adapter, pipe, tmp_path):
    names = {n for n, _ in adapter.transformer.named_modules()}
    for target in adapter.lora_target_modules:  # every published target exists in every block
        assert sum(n.endswith("." + target) for n in names) == adapter.transformer.config.num_layers
    latents = initial_latents(adapter.latent_shape(2, RES), [3, 4])
    base = pipeline_images(pipe, latents, 4.0)
    add_lora(adapter.transformer, 4, 8, adapter.lora_target_modules)
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in adapter.transformer.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        export_lora(adapter.transformer, tmp_path / "lora")
        ours = rollout(adapter, adapter.encode_prompts(PROMPTS), adapter.make_sigmas(6, RES), latents,
                       negative=adapter.negative_embeds(), guidance=4.0, noise_level=0.0).images
    finally:
        adapter.transformer.delete_adapters("default")
    pipe.load_lora_weights(str(tmp_path / "lora" / "diffusers"))
    try:
        theirs = pipeline_images(pipe, latents, 4.0)
    finally:
        pipe.unload_lora_weights()
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (base - theirs).abs().max().item() > 1e-3  # the LoRA changes the images


@pytest.mark.parametrize("sampler", ["flow", "cps"])
def test_flow_grpo_on_policy_ratio_is_one(tmp_path, qwen_dir, sampler):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\ntwo blue cat on the left\nthe dog\n")
    args = flow_grpo.parse_args([
        "--preset", "toy", "--model", "qwen_image", "--pretrained", str(qwen_dir), "--resolution", str(RES),
        "--prompts", str(prompts), "--reward", "jpeg_compressibility", "--sampler", sampler, "--noise-level", "1.0",
        "--guidance", "4.0", "--no-filter-zero-std", "--lora-rank", "4", "--lora-alpha", "8", "--num-epochs", "1",
        "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1", "--updates-per-epoch", "1",
        "--eval-every", "0", "--track", "none", "--num-steps", "4", "--output-dir", str(tmp_path / "run")])
    records = read_metrics(Path(flow_grpo.main(args)) / "metrics.jsonl")
    assert records[0]["train/ratio_dev_max"] <= 1e-6


def test_missing_checkpoint_fails_before_loading(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen-Image .*--pretrained /path/to/dir"):
        get_adapter_class("qwen_image").check_pretrained(None)


# ---- qwen_image_edit: the prompt is encoded with its source image; the source latents join the image tokens


def source_images(folder):
    """Two distinct 32 px source images on disk and the counting_edit-style jsonl that names them."""
    import json

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(PROMPTS):
        pixels = np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "t2i_prompt": "a photo of a cat", "prompt": text})
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / "prompts.jsonl"


@pytest.fixture(scope="module")
def edit_dir(tiny_model_dir):
    return tiny_model_dir("qwen_image_edit")


@pytest.fixture(scope="module")
def edit_adapter(edit_dir):
    adapter = load_adapter("qwen_image_edit", str(edit_dir))
    adapter.max_sequence_length, adapter.default_resolution = 64, RES
    return adapter


@pytest.fixture(scope="module")
def edit_prompts(tmp_path_factory):
    from common.data import load_prompts

    return load_prompts(str(source_images(tmp_path_factory.mktemp("edit_data"))))


@pytest.fixture
def edit_pipe(edit_dir, monkeypatch):
    """diffusers' pipeline with the source resized to RES x RES (it hard-codes a 1024² area)."""
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (RES, RES, None))
    pipe = QwenImageEditPipeline.from_pretrained(str(edit_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit_pipeline_images(pipe, prompts, latents, guidance, steps=6):
    """One pipeline call per prompt (each has its own source image)."""
    from PIL import Image

    cfg = dict(negative_prompt=" ", true_cfg_scale=guidance) if guidance > 1 else dict(true_cfg_scale=1.0)
    return torch.cat([pipe(image=Image.open(p.metadata["image"]).convert("RGB"), prompt=p.text, height=RES, width=RES,
                           num_inference_steps=steps, latents=latents[i:i + 1].clone(), output_type="pt", **cfg).images
                      for i, p in enumerate(prompts)])


def test_edit_encoding_shapes(edit_adapter, edit_prompts):
    embeds = edit_adapter.encode_prompts(edit_prompts)
    assert embeds.hidden.shape == embeds.neg_hidden.shape == (2, 64, 32)
    # 16 VL image tokens (8x8 patches of 4 px, merged 2x2) are part of every text encoding, the negative's too
    assert (embeds.neg_mask.sum(1) > 16).all() and (embeds.mask.sum(1) > embeds.neg_mask.sum(1)).all()
    assert embeds.image_latents.shape == (2, 16, 16)  # the source's packed VAE latents
    assert not torch.equal(embeds.image_latents[0], embeds.image_latents[1])
    with pytest.raises(ValueError, match="metadata 'image'"):
        edit_adapter.encode_prompts(["a photo of a cat"])


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_edit_ode_rollout_equals_the_diffusers_pipeline(edit_adapter, edit_pipe, edit_prompts, guidance):
    latents = initial_latents(edit_adapter.latent_shape(2, RES), [21, 22])
    expected = edit_pipeline_images(edit_pipe, edit_prompts, latents, guidance)
    trajectory = rollout(edit_adapter, edit_adapter.encode_prompts(edit_prompts), edit_adapter.make_sigmas(6, RES),
                         latents, negative=edit_adapter.negative_embeds(), guidance=guidance, noise_level=0.0)
    assert trajectory.images.shape == expected.shape == (2, 3, RES, RES)
    assert (trajectory.images - expected).abs().max().item() <= 1e-4


def test_edit_exported_lora_loads_in_the_pipeline(edit_adapter, edit_pipe, edit_prompts, tmp_path):
    latents = initial_latents(edit_adapter.latent_shape(2, RES), [5, 6])
    base = edit_pipeline_images(edit_pipe, edit_prompts, latents, 4.0, steps=4)
    add_lora(edit_adapter.transformer, 4, 8, edit_adapter.lora_target_modules)
    try:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in edit_adapter.transformer.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        export_lora(edit_adapter.transformer, tmp_path / "lora")
        ours = rollout(edit_adapter, edit_adapter.encode_prompts(edit_prompts), edit_adapter.make_sigmas(4, RES),
                       latents, negative=edit_adapter.negative_embeds(), guidance=4.0, noise_level=0.0).images
    finally:
        edit_adapter.transformer.delete_adapters("default")
    edit_pipe.load_lora_weights(str(tmp_path / "lora" / "diffusers"))
    theirs = edit_pipeline_images(edit_pipe, edit_prompts, latents, 4.0, steps=4)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (base - theirs).abs().max().item() > 1e-3


def test_edit_flow_grpo_on_policy_ratio_is_one(tmp_path, edit_dir):
    prompts = source_images(tmp_path / "data")
    args = flow_grpo.parse_args([
        "--preset", "toy", "--model", "qwen_image_edit", "--pretrained", str(edit_dir), "--resolution", str(RES),
        "--prompts", str(prompts), "--reward", "jpeg_compressibility", "--sampler", "flow", "--noise-level", "1.0",
        "--guidance", "4.0", "--no-filter-zero-std", "--lora-rank", "4", "--lora-alpha", "8", "--num-epochs", "1",
        "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1", "--updates-per-epoch", "1",
        "--eval-every", "0", "--track", "none", "--num-steps", "4", "--output-dir", str(tmp_path / "run")])
    records = read_metrics(Path(flow_grpo.main(args)) / "metrics.jsonl")
    assert records[0]["train/ratio_dev_max"] <= 1e-6
