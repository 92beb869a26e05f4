"""The smoke matrix: every algorithm file runs one epoch on every real model family's tiny pipeline
(random weights built from config, saved and loaded through `from_pretrained`), with the same
flags: the run finishes, its training loss is finite, the first on-policy micro-step of the PPO
files has ratio 1, and the LoRA export is written. Parity with each model's own pipeline, the
LoRA export's `load_lora_weights` round trip and the conditioning details are each adapter's own
test file (tests/test_{sd3,flux,qwen,wan}_adapter.py); this file is about the algorithm files
never naming a model."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flow_dpo
import flow_grpo
import flow_grpo_fast
import flow_opd
import grpo_guard
from common.outputs import read_metrics

# image side per model: the smallest the tiny VAEs and 2x2 patching allow
MODELS = {"sd3": 64, "flux": 64, "flux_kontext": 64, "qwen_image": 32, "qwen_image_edit": 32, "wan": 32}
EDITING = {"flux_kontext", "qwen_image_edit"}
FILES = {"flow_grpo": flow_grpo, "flow_grpo_fast": flow_grpo_fast, "grpo_guard": grpo_guard, "flow_dpo": flow_dpo,
         "flow_opd": flow_opd}
PPO = {"flow_grpo", "flow_grpo_fast", "grpo_guard", "flow_opd"}  # a first micro-step with an on-policy ratio
TEXTS = ["a photo of a cat", "a red dog", "two blue cat", "the dog on the left"]
TINY = ["--num-epochs", "1", "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1",
        "--updates-per-epoch", "1", "--eval-every", "0", "--track", "none", "--num-steps", "6",
        "--reward", "jpeg_compressibility", "--lora-rank", "4", "--lora-alpha", "8"]


@pytest.fixture
def small_video(monkeypatch):
    """Wan at 5 frames and 16 text tokens (the published 33 frames, 512 tokens), as its own tests."""
    from common.models.wan import WanAdapter

    monkeypatch.setattr(WanAdapter, "num_frames", 5)
    monkeypatch.setattr(WanAdapter, "max_sequence_length", 16)


def prompt_file(directory, model):
    """Plain prompts, or (editing models) a counting_edit-style jsonl whose `image`s are relative paths."""
    directory.mkdir(parents=True, exist_ok=True)
    if model not in EDITING:
        (directory / "prompts.txt").write_text("\n".join(TEXTS) + "\n")
        return directory / "prompts.txt"
    side, rows = MODELS[model], []
    for i, text in enumerate(TEXTS):
        pixels = np.random.RandomState(i).randint(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"source{i}.png")
        rows.append({"image": f"source{i}.png", "t2i_prompt": "a photo of a cat", "prompt": text})
    (directory / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory / "prompts.jsonl"


def teacher(directory, model, pretrained, resolution):
    """One rank-4 teacher LoRA (small random B) exported as a flow_grpo.py run's final/."""
    from common.checkpoint import add_lora, export_lora
    from common.models import load_adapter

    adapter = load_adapter(model, pretrained, resolution=resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_lora(adapter.transformer, 4, 8, adapter.lora_target_modules)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    export_lora(adapter.transformer, directory / "final")
    return directory


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("script", list(FILES))
def test_one_epoch_of_every_file_on_every_model(tmp_path, tiny_model_dir, small_video, script, model):
    pretrained, resolution = str(tiny_model_dir(model)), MODELS[model]
    prompts = prompt_file(tmp_path / "data", model)
    argv = ["--preset", "toy", "--model", model, "--pretrained", pretrained, "--resolution", str(resolution),
            "--prompts", str(prompts), *TINY, "--output-dir", str(tmp_path / "run")]
    if script == "flow_opd":
        argv += ["--teachers", f"t={teacher(tmp_path / 'teacher', model, pretrained, resolution)}",
                 "--teacher-prompts", f"t={prompts}", "--init", "base"]
    module = FILES[script]
    if hasattr(module.Args, "filter_zero_std"):  # a 2-image group may tie: train on it anyway
        argv.append("--no-filter-zero-std")
    out = Path(module.main(module.parse_args(argv)))
    records = read_metrics(out / "metrics.jsonl")
    assert np.isfinite(records[0]["train/loss"])
    if script in PPO:
        assert records[0]["train/ratio_dev_max"] <= 1e-6
    assert (out / "final" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
