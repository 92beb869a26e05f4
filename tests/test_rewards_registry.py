"""The reward registry: spec grammar, start-up errors, the weighted combiner (weight 0 logs but
does not move advantages), and a multi-reward flow_grpo run on the toy world."""

import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import flow_grpo
from common import rewards
from common.outputs import read_metrics
from common.rewards import MultiReward, parse_reward_spec

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ["shapes", "jpeg_compressibility", "jpeg_incompressibility", "ocr", "aesthetic", "clipscore", "pickscore",
             "image_similarity", "imagereward", "hpsv2", "qwenvl", "unifiedreward", "remote", "geneval", "deqa"]


def test_every_reward_is_registered_and_model_modules_stay_unimported():
    assert set(PUBLISHED) <= set(rewards.REWARDS)
    for name, factory in rewards.REWARDS.items():
        if isinstance(factory, str):
            module, _, attribute = factory.partition(":")
            assert module.startswith("common.") and attribute.endswith("_reward"), name


def test_spec_grammar():
    assert parse_reward_spec("shapes") == {"shapes": 1.0}
    assert parse_reward_spec("shapes=1, jpeg_compressibility=0") == {"shapes": 1.0, "jpeg_compressibility": 0.0}
    assert parse_reward_spec("pickscore:/models/PickScore_v1=0.5,clipscore") == {
        "pickscore:/models/PickScore_v1": 0.5, "clipscore": 1.0}
    assert parse_reward_spec("unifiedreward:http://127.0.0.1:17140/v1=1e-1") == {
        "unifiedreward:http://127.0.0.1:17140/v1": 0.1}
    # an `=` inside the argument (a URL query) is not a weight unless what follows is a number
    assert parse_reward_spec("remote:http://h:1/?mode=fast") == {"remote:http://h:1/?mode=fast": 1.0}
    assert parse_reward_spec("remote:http://h:1/?mode=fast=2") == {"remote:http://h:1/?mode=fast": 2.0}


@pytest.mark.parametrize("spec, message", [
    ("pickscor=1", "unknown reward 'pickscor'; choose from"),
    ("shapes=heavy", "must be a number"),
    ("shapes,shapes=2", "appears twice"),
    ("pickscore:=1", "empty argument"),
])
def test_bad_specs_fail_before_any_model_loads(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_spec(spec)


def test_a_missing_extra_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rapidocr" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'cleanflow\[ocr\]'"):
        parse_reward_spec("shapes=1,ocr=0.2")
    # and through the trainer's validation, before anything loads
    with pytest.raises(ImportError, match=r"cleanflow\[ocr\]"):
        flow_grpo.validate(flow_grpo.parse_args(["--reward", "ocr"]))


def toy_batch():
    from common.data import load_prompts

    prompts = load_prompts("toy", "test")[:6]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(len(prompts), 3, 64, 64, generator=generator)
    return images, [p.text for p in prompts], [p.metadata for p in prompts]


def test_weight_zero_is_logged_but_does_not_change_the_average():
    images, prompts, metadata = toy_batch()
    alone = MultiReward(parse_reward_spec("shapes"))(images, prompts, metadata)
    both = MultiReward(parse_reward_spec("shapes=1,jpeg_compressibility=0"))(images, prompts, metadata)
    assert set(both) == {"shapes", "shapes_strict", "jpeg_compressibility", "avg"}
    np.testing.assert_array_equal(both["avg"], alone["avg"])
    assert np.all(both["jpeg_compressibility"] < 0)  # computed although its weight is 0
    # so the advantages are those of shapes alone
    ids = np.array([0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(flow_grpo.group_advantages(both["avg"], ids),
                                  flow_grpo.group_advantages(alone["avg"], ids))


def test_weighted_average_is_not_normalised():
    images, prompts, metadata = toy_batch()
    out = MultiReward(parse_reward_spec("shapes=0.5,jpeg_compressibility=2"))(images, prompts, metadata)
    np.testing.assert_allclose(out["avg"], 0.5 * out["shapes"] + 2 * out["jpeg_compressibility"], rtol=1e-6)


def test_jpeg_scale_matches_the_reference():
    """§12: -(kB at quality 95)/500, about -0.05 ... -0.3 at 512 px; noise is the incompressible end."""
    flat, noise = torch.full((1, 3, 512, 512), 0.5), torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    fn = rewards.jpeg_compressibility_reward()
    assert -0.02 < fn(flat, [""], [{}])["jpeg_compressibility"][0] < 0
    assert fn(noise, [""], [{}])["jpeg_compressibility"][0] < -0.3


def published_kilobytes(images):
    """DDPO's / flow_grpo's jpeg_incompressibility: (x·255).round().clamp -> uint8, PIL JPEG at
    quality 95, bytes / 1000."""
    import io

    from PIL import Image

    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes)


def test_jpeg_rewards_are_the_published_values():
    """incompressibility = +kB (DDPO and flow_grpo alike); compressibility = -kB/500 (flow_grpo's)
    or, named, -kB (DDPO's). The 512 px noise image is ~ 300 kB: 300, not 0.6."""
    images = torch.rand(3, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    images[1] = 0.5
    images[2, :, :, 256:] = 0.2
    kilobytes = published_kilobytes(images)
    assert kilobytes[0] > 250 and kilobytes[1] < 10
    out = MultiReward(parse_reward_spec("jpeg_incompressibility,jpeg_compressibility"))(images, [""] * 3, [{}] * 3)
    np.testing.assert_allclose(out["jpeg_incompressibility"], kilobytes, rtol=1e-6)
    np.testing.assert_allclose(out["jpeg_compressibility"], -kilobytes / 500, rtol=1e-6)
    ddpo = MultiReward(parse_reward_spec("jpeg_compressibility:kB"))(images, [""] * 3, [{}] * 3)
    np.testing.assert_allclose(ddpo["jpeg_compressibility"], -kilobytes, rtol=1e-6)
    scaled = rewards.jpeg_incompressibility_reward("kB/500")(images, [""] * 3, [{}] * 3)
    np.testing.assert_allclose(scaled["jpeg_incompressibility"], kilobytes / 500, rtol=1e-6)
    with pytest.raises(ValueError, match="`jpeg_incompressibility:kB` or `jpeg_incompressibility:kB/500`"):
        MultiReward(parse_reward_spec("jpeg_incompressibility:MB"))


def test_multi_reward_run_on_the_toy_world_logs_every_component(tmp_path):
    args = flow_grpo.parse_args(["--num-epochs", "1", "--batch-size", "4", "--group-size", "2", "--batches-per-epoch",
                                 "1", "--updates-per-epoch", "1", "--eval-every", "0", "--track", "none",
                                 "--num-steps", "2", "--reward", "shapes=1.0,jpeg_compressibility=0",
                                 "--output-dir", str(tmp_path / "run")])
    record = read_metrics(Path(flow_grpo.main(args)) / "metrics.jsonl")[0]
    for key in ("reward/shapes", "reward/shapes_strict", "reward/jpeg_compressibility", "reward/avg", "reward/mean"):
        assert np.isfinite(record[key]), key
    assert record["reward/jpeg_compressibility"] < 0
    assert record["reward/avg"] == pytest.approx(record["reward/shapes"], abs=1e-6)  # weight 0 adds nothing
    assert record["reward/mean"] == pytest.approx(record["reward/avg"], abs=1e-6)


def test_importing_the_registry_loads_no_model_library():
    code = ("import sys, common.rewards as r; r.parse_reward_spec('shapes=1,ocr=0,pickscore:/x=1,qwenvl=1'); "
            "print(sorted(m for m in ('torch', 'transformers', 'rapidocr', 'onnxruntime', 'common.reward_models') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_reward_thread_count_is_pinned_without_touching_the_caller():
    from common.reward_models import reward_device, torch_threads

    torch.set_num_threads(2)
    reward_device()  # what every model factory does in the trainer's thread
    seen = {}

    def reward_thread():
        with torch_threads(1):
            seen["inside"] = torch.get_num_threads()
            seen["main_meanwhile"] = main_count.wait(5)
        seen["after"] = torch.get_num_threads()

    main_count = threading.Event()
    worker = threading.Thread(target=reward_thread)
    worker.start()
    while "inside" not in seen:
        time.sleep(0.01)
    seen["main"] = torch.get_num_threads()  # torch's intra-op count is per OS thread
    main_count.set()
    worker.join()
    assert seen["inside"] == 1 and seen["main"] == 2 and seen["after"] == 2
    assert torch.get_num_threads() == 2


def test_gathered_reward_metrics_leave_unscored_samples_out():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    batches = [{"shapes": np.array([1.0, np.nan], dtype=np.float32), "avg": np.array([0.5, np.nan], dtype=np.float32)},
               {"shapes": np.array([0.0, 1.0], dtype=np.float32), "avg": np.array([0.0, 1.5], dtype=np.float32)}]
    all_reward, scored, metrics = rewards.gather_reward_metrics(batches, accelerator, epoch=3)
    assert scored.tolist() == [True, False, True, True]
    assert metrics["reward/dropped"] == 1
    assert metrics["reward/mean"] == pytest.approx(2 / 3) and metrics["reward/avg"] == pytest.approx(2 / 3)
    assert metrics["reward/std"] == pytest.approx(np.std([0.5, 0.0, 1.5]))
    assert metrics["reward/shapes"] == pytest.approx(2 / 3)
    # more than half unscored: the reward service is down; stop with the reason
    down = [{"avg": np.array([np.nan, np.nan, 1.0], dtype=np.float32)}]
    with pytest.raises(SystemExit, match="could not score 2 of 3 samples at epoch 5"):
        rewards.gather_reward_metrics(down, accelerator, epoch=5)
