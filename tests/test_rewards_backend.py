"""No model reward lets the environment choose its image preprocessing: transformers >= 5 picks
a torchvision backend for an image processor whenever torchvision imports (a different resize),
so every reward builds its pixels itself or names the PIL backend. torchvision does not import
beside this machine's torch, so its presence is simulated where transformers decides."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from transformers.models.auto import image_processing_auto

from common.rewards import MultiReward, parse_reward_spec
from tests.test_rewards_clip import aesthetic_dir, image_set, imagereward_dir, save_tiny_clip, uint8_pil
from tests.test_rewards_vlm import tiny_qwen_vl

ROOT = Path(__file__).resolve().parent.parent


def every_model_reward(tmp_path):
    """A spec naming every local model reward on tiny checkpoints, and metadata with a reference image."""
    clip = save_tiny_clip(tmp_path / "clip")
    aesthetic, _ = aesthetic_dir(clip, tmp_path)
    imagereward, *_ = imagereward_dir(tmp_path)
    qwenvl = tiny_qwen_vl(tmp_path / "qwenvl", "<Score>4</Score>", min_pixels=4 * 28 * 28,
                          max_pixels=16384 * 28 * 28)
    reference = tmp_path / "reference.png"
    uint8_pil(image_set()[0])[0].save(reference)
    spec = (f"clipscore:{clip},pickscore:{clip},hpsv2:{clip},image_similarity:{clip},aesthetic:{aesthetic},"
            f"imagereward:{imagereward},qwenvl:{qwenvl}")
    return spec, [{"reference_image": str(reference)}] * 2


def test_no_model_reward_lets_the_environment_choose_a_backend(tmp_path, monkeypatch):
    spec, metadata = every_model_reward(tmp_path)
    images = image_set()[2]
    plain = MultiReward(parse_reward_spec(spec))(images, ["a red cat", "a dog"], metadata)
    # from here on transformers believes torchvision imports, and records every backend it resolves
    # for a caller that named none
    resolved, resolve = [], image_processing_auto._resolve_backend
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(image_processing_auto, "_resolve_backend",
                        lambda *args, **kwargs: resolved.append(resolve(*args, **kwargs)) or resolved[-1])
    again = MultiReward(parse_reward_spec(spec))(images, ["a red cat", "a dog"], metadata)
    assert resolved == []
    assert set(again) == set(plain) == {"clipscore", "pickscore", "hpsv2", "image_similarity", "aesthetic",
                                        "imagereward", "qwenvl", "avg"}
    for name in plain:
        np.testing.assert_array_equal(again[name], plain[name])


def test_start_up_prints_no_torchvision_warning(tmp_path):
    """Built and scored in a fresh process (transformers warns once per process)."""
    spec, metadata = every_model_reward(tmp_path)
    code = ("import torch; from common.rewards import MultiReward, parse_reward_spec; "
            f"reward = MultiReward(parse_reward_spec({spec!r})); "
            f"print(sorted(reward(torch.rand(2, 3, 40, 56), ['a', 'b'], {metadata!r})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qwenvl" in result.stdout
    assert "torchvision" not in result.stderr and "backend" not in result.stderr, result.stderr
