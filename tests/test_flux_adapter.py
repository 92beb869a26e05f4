"""The flux and flux_kontext adapters on tiny pipelines saved to disk: our rollout at noise 0 must
reproduce diffusers' own FluxPipeline / FluxKontextPipeline.__call__ from the same initial
(packed) latents, an exported LoRA must load into those pipelines and give our images, and one
epoch of flow_grpo.py must be on-policy (ratio 1)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import add_lora, export_lora
from common.data import Prompt
from common.models import load_adapter
from common.models.flux_kontext import FluxKontextAdapter
from common.rollout import initial_latents, rollout

PROMPTS = ["a photo of a cat", "two red dog on the left"]
EDITS = ["the cat on the left", "two blue dog"]
RESOLUTION, STEPS, TOKENS = 64, 6, 32  # 64 px -> a 4x4 grid of packed tokens with the tiny 8x VAE


def pipeline_sigmas(num_steps):
    """What FluxPipeline's `sigmas=` takes: the grid BEFORE its dynamic shift (its default)."""
    return list(np.linspace(1.0, 1 / num_steps, num_steps))


def write_sources(directory, size, count=2):
    """Random RGB pngs of `size` px (absolute paths) and an editing prompt file naming them."""
    directory = Path(directory)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(directory / f"source{i}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    prompts = directory / "edits.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": EDITS[i % len(EDITS)], "image": str(p)}) + "\n"
                               for i, p in enumerate(paths)))
    return paths, prompts


def load_tiny(name, directory):
    # sources are already at the generation size: no resampling
    adapter = load_adapter(name, str(directory), resolution=RESOLUTION)
    adapter.max_sequence_length = TOKENS
    return adapter


@pytest.fixture(scope="module")
def flux(tiny_model_dir):
    return load_tiny("flux", tiny_model_dir("flux"))


@pytest.fixture(scope="module")
def kontext(tiny_model_dir):
    return load_tiny("flux_kontext", tiny_model_dir("flux_kontext"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    paths, _ = write_sources(tmp_path_factory.mktemp("flux_sources"), RESOLUTION)
    return paths


def pipeline(name, directory, lora=None):
    from diffusers import FluxKontextPipeline, FluxPipeline

    pipe = {"flux": FluxPipeline, "flux_kontext": FluxKontextPipeline}[name].from_pretrained(str(directory))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def pipeline_images(pipe, latents, guidance_embedding, cfg=1.0, images=None):
    extra = dict(true_cfg_scale=cfg, negative_prompt="") if cfg > 1 else {}
    if images is not None:  # Kontext: no resize to its preferred resolutions, no area rescaling
        extra.update(image=[Image.open(p) for p in images], max_area=RESOLUTION**2, _auto_resize=False)
    return pipe(prompt=EDITS if images is not None else PROMPTS, height=RESOLUTION, width=RESOLUTION,
                num_inference_steps=STEPS, sigmas=pipeline_sigmas(STEPS), guidance_scale=guidance_embedding,
                latents=latents.clone(), output_type="pt", max_sequence_length=TOKENS, **extra).images


def test_encoding_shapes(flux):
    embeds = flux.encode_prompts(PROMPTS)
    assert embeds.hidden.shape == (2, TOKENS, 64)  # T5 states
    assert embeds.pooled.shape == (2, 32)          # CLIP pooled
    assert flux.latent_shape(2, RESOLUTION) == (2, 16, 64)  # (64 / 16)² tokens of 16 channels x 2x2
    assert flux.image_seq_len(512) == 1024 and flux.latent_shape(1, 512) == (1, 1024, 64)
    assert flux.latent_shape(1) == flux.latent_shape(1, RESOLUTION)  # the run's --resolution is the default
    assert flux.guidance_embedding == 3.5
    assert [round(float(s), 3) for s in flux.make_sigmas(6, 512)] == [1.0, 0.904, 0.79, 0.652, 0.484, 0.273, 0.0]


def test_kontext_reference_encoding(kontext, sources):
    embeds = kontext.encode_prompts([Prompt(t, {"image": str(p)}) for t, p in zip(EDITS, sources)])
    assert embeds.reference.shape == (2, 16, 8, 8)  # 64 px through the 8x VAE
    # the same image as path, PIL image or [0, 1] tensor; repeated sources share one encoding
    pil = Image.open(sources[0]).convert("RGB")
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    again = kontext.encode_prompts([Prompt("a", {"image": pil}), Prompt("b", {"image": tensor}),
                                    Prompt("c", {"image": str(sources[0])})])
    assert (again.reference - embeds.reference[0]).abs().max() < 1e-5
    # plain strings (the negative): no reference tokens; a half-annotated batch is an error
    assert kontext.negative_embeds().reference.shape == (1, 16, 0, 0)
    with pytest.raises(ValueError, match="metadata 'image'"):
        kontext.encode_prompts([Prompt("a", {"image": str(sources[0])}), "b"])
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        kontext.encode_prompts([Prompt("a", {"image": "/nowhere.png"})])


@pytest.mark.parametrize("cfg", [1.0, 2.0])  # the recipe (no CFG), and true CFG against ""
def test_flux_ode_rollout_equals_the_diffusers_pipeline(flux, tiny_model_dir, cfg):
    pipe = pipeline("flux", tiny_model_dir("flux"))
    latents = initial_latents(flux.latent_shape(2, RESOLUTION), [11, 12])
    expected = pipeline_images(pipe, latents, flux.guidance_embedding, cfg)
    sigmas = flux.make_sigmas(STEPS, RESOLUTION)
    assert torch.equal(sigmas, pipe.scheduler.sigmas.cpu())  # the same dynamically shifted grid
    trajectory = rollout(flux, flux.encode_prompts(PROMPTS), sigmas, latents, negative=flux.negative_embeds(),
                         guidance=cfg, noise_level=0.0)
    assert trajectory.images.shape == expected.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert (trajectory.images - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_kontext_ode_rollout_equals_the_diffusers_pipeline(kontext, tiny_model_dir, sources, cfg):
    pipe = pipeline("flux_kontext", tiny_model_dir("flux_kontext"))
    latents = initial_latents(kontext.latent_shape(2, RESOLUTION), [5, 6])
    expected = pipeline_images(pipe, latents, kontext.guidance_embedding, cfg, images=sources)
    embeds = kontext.encode_prompts([Prompt(t, {"image": str(p)}) for t, p in zip(EDITS, sources)])
    trajectory = rollout(kontext, embeds, kontext.make_sigmas(STEPS, RESOLUTION), latents,
                         negative=kontext.negative_embeds(), guidance=cfg, noise_level=0.0)
    assert (trajectory.images - expected).abs().max().item() <= 1e-4
    # the reference tokens matter: text alone (FluxKontextPipeline without an image) differs
    text_only = rollout(kontext, kontext.encode_prompts(EDITS), kontext.make_sigmas(STEPS, RESOLUTION), latents,
                        noise_level=0.0).images
    without = pipe(prompt=EDITS, height=RESOLUTION, width=RESOLUTION, max_area=RESOLUTION**2,
                   num_inference_steps=STEPS, guidance_scale=kontext.guidance_embedding, latents=latents.clone(),
                   output_type="pt", max_sequence_length=TOKENS).images
    assert (text_only - without).abs().max().item() <= 1e-4
    assert (text_only - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["flux", "flux_kontext"])
def test_exported_lora_loads_into_the_diffusers_pipeline(tiny_model_dir, sources, tmp_path, name):
    adapter = load_tiny(name, tiny_model_dir(name))  # a fresh copy: the LoRA stays out of the shared fixtures
    add_lora(adapter.transformer, 4, 8, adapter.lora_target_modules)
    wrapped = {n.split(".lora_B")[0] for n, _ in adapter.transformer.named_parameters() if "lora_B" in n}
    assert any(n.startswith("single_transformer_blocks.") and n.endswith("proj_mlp") for n in wrapped)
    assert any(n.startswith("single_transformer_blocks.") and n.endswith("attn.to_q") for n in wrapped)
    assert any(n.startswith("transformer_blocks.") and n.endswith("ff_context.net.2") for n in wrapped)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in adapter.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    export_lora(adapter.transformer, tmp_path / "lora")
    images = sources if name == "flux_kontext" else None
    prompts = [Prompt(t, {"image": str(p)}) for t, p in zip(EDITS, sources)] if images else PROMPTS
    latents = initial_latents(adapter.latent_shape(2, RESOLUTION), [3, 4])
    ours = rollout(adapter, adapter.encode_prompts(prompts), adapter.make_sigmas(STEPS, RESOLUTION), latents,
                   noise_level=0.0).images
    base = pipeline_images(pipeline(name, tiny_model_dir(name)), latents, adapter.guidance_embedding, images=images)
    theirs = pipeline_images(pipeline(name, tiny_model_dir(name), lora=tmp_path / "lora" / "diffusers"), latents,
                             adapter.guidance_embedding, images=images)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (base - theirs).abs().max().item() > 1e-3  # and the LoRA changes the images


@pytest.mark.parametrize("name,guidance", [("flux", "1.0"), ("flux_kontext", "1.0"), ("flux_kontext", "2.0")])
def test_one_flow_grpo_epoch_is_on_policy(tiny_model_dir, tmp_path, monkeypatch, name, guidance):
    import flow_grpo
    from common.outputs import read_metrics

    resolution = 32
    if name == "flux_kontext":
        _, prompts = write_sources(tmp_path, resolution, count=4)  # resized to --resolution: no resampling
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a photo of a cat\na red dog\ntwo blue cat\nthe dog on the left\n")
    args = flow_grpo.parse_args([
        "--preset", "toy", "--model", name, "--pretrained", str(tiny_model_dir(name)), "--resolution",
        str(resolution), "--prompts", str(prompts), "--reward", "jpeg_compressibility", "--sampler", "flow",
        "--noise-level", "0.7", "--guidance", guidance, "--no-filter-zero-std", "--lora-rank", "4",
        "--lora-alpha", "8", "--num-epochs", "1", "--batch-size", "4", "--group-size", "2",
        "--batches-per-epoch", "1", "--updates-per-epoch", "1", "--eval-every", "0", "--track", "none",
        "--num-steps", "4", "--output-dir", str(tmp_path / "run")])
    records = read_metrics(Path(flow_grpo.main(args)) / "metrics.jsonl")
    assert records[0]["train/ratio_dev_max"] <= 1e-6
    assert np.isfinite(records[0]["train/loss"])


@pytest.mark.parametrize("name,hub_id", [("flux", "black-forest-labs/FLUX.1-dev"),
                                         ("flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev")])
def test_missing_published_checkpoint_fails_before_loading(tmp_path, monkeypatch, name, hub_id):
    from huggingface_hub import constants

    from common.models import get_adapter_class

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match=f"{hub_id} .*--pretrained /path/to/dir"):
        get_adapter_class(name).check_pretrained(None)
