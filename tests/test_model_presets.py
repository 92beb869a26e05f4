"""`--model NAME` picks the model's preset and checkpoint in every algorithm file (issue 22): a real
model without a reachable checkpoint fails in validate with one line; `--model sd3` alone runs the
sd3 preset, an explicit `--preset` wins; every run prints its resolved recipe and writes
config.json."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flow_dpo
import flow_grpo
import flow_grpo_fast
import flow_opd
import grpo_guard
from common.models import ADAPTERS, get_adapter_class

ROOT = Path(__file__).resolve().parent.parent
MODULES = [flow_grpo, flow_grpo_fast, grpo_guard, flow_dpo, flow_opd]
SD3 = "stabilityai/stable-diffusion-3.5-medium"
# fields a run fills in or that a test run changes for reasons other than the recipe
RUNTIME = {"preset", "pretrained", "output_dir", "track", "num_processes", "train_steps", "grad_accumulation"}


def as_json(value):
    return json.loads(json.dumps(value, default=str))


def preset_fields(module, name, skip=()):
    fields = as_json(dataclasses.asdict(module.PRESETS[name]))
    return {k: v for k, v in fields.items() if k not in RUNTIME | set(skip)}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_model_has_a_preset_and_a_checkpoint(module):
    assert set(module.MODEL_PRESETS) == set(ADAPTERS)
    for model, preset in module.MODEL_PRESETS.items():
        assert module.PRESETS[preset].model == model
        assert get_adapter_class(model).default_pretrained
    assert get_adapter_class("sd3").default_pretrained == SD3


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_model_picks_its_preset_an_explicit_preset_wins_and_flags_override(module):
    for model, preset in module.MODEL_PRESETS.items():
        for argv in (["--model", model], [f"--model={model}"]):
            args = module.parse_args(argv)
            assert args.preset == preset
            assert dataclasses.replace(args, preset=None) == dataclasses.replace(module.PRESETS[preset], preset=None)
    args = module.parse_args(["--model", "sd3", "--learning-rate", "0.125", "--num-steps", "7"])
    assert (args.preset, args.learning_rate, args.num_steps) == (module.MODEL_PRESETS["sd3"], 0.125, 7)
    for argv in (["--preset", "toy", "--model", "sd3"], ["--model", "sd3", "--preset=toy"]):
        args = module.parse_args(argv)
        assert args.preset == "toy" and args.model == "sd3"
        assert dataclasses.replace(args, model="toy", preset=None) == dataclasses.replace(module.PRESETS["toy"],
                                                                                           preset=None)
    assert module.parse_args([]).preset == "toy"


@pytest.mark.parametrize("module", [flow_grpo, flow_dpo], ids=lambda m: m.__name__)
def test_help_says_which_preset_and_checkpoint_a_model_implies(module, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--model sd3: --preset {module.MODEL_PRESETS['sd3']}, checkpoint {SD3}" in text
    assert "--model gmm: --preset gmm, checkpoint d2" in text and "--pretrained /path/to/dir" in text


@pytest.mark.parametrize("script", ["flow_grpo.py", "flow_grpo_fast.py", "grpo_guard.py", "flow_dpo.py", "flow_opd.py"])
def test_sd3_without_a_reachable_checkpoint_fails_fast_with_one_line(tmp_path, script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache"), "OMP_NUM_THREADS": "1"}
    start = time.time()
    result = subprocess.run([sys.executable, script, "--model", "sd3", "--output-dir", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.time() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and elapsed < 5, (elapsed, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    assert SD3 in lines[0] and "--pretrained /path/to/dir" in lines[0]
    assert not (tmp_path / "out").exists()  # failed before accelerate or any output


def test_sd3_checkpoint_checks_name_what_is_wrong(tmp_path, tiny_sd3_dir, monkeypatch):
    from huggingface_hub import constants

    from common.models.sd3 import SD3Adapter

    SD3Adapter.check_pretrained(str(tiny_sd3_dir))  # a pipeline directory: fine
    with pytest.raises(FileNotFoundError, match="no such directory"):
        SD3Adapter.check_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        SD3Adapter.check_pretrained(str(tmp_path))
    # hub not offline but unreachable (a closed local port): the same one line, within the time limit
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    closed_port = "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed_port)
    start = time.time()
    with pytest.raises(FileNotFoundError, match=f"{SD3} .*cannot be reached.*--pretrained /path/to/dir"):
        SD3Adapter.check_pretrained(None)
    assert time.time() - start < 4


TINY_SD3 = ["--resolution", "64", "--num-epochs", "1", "--batch-size", "4", "--group-size", "2",
            "--eval-every", "0", "--track", "none"]
TINY_SD3_OVERRIDES = {"resolution", "num_epochs", "batch_size", "group_size", "eval_every", "model"}


def run_and_read(module, argv, capsys):
    out = Path(module.main(module.parse_args(argv)))
    printed = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    return config, printed


def run_script(script, argv, out):
    """The script as a user runs it (a subprocess: the sd3 preset's fp16 Accelerator would also fix
    the mixed precision of every later in-process run)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, script, *argv, "--output-dir", str(out)], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "config.json").read_text()), result.stdout


def test_model_sd3_alone_runs_the_sd3_preset(tmp_path, tiny_sd3_dir):
    config, printed = run_script("flow_grpo.py", ["--model", "sd3", "--pretrained", str(tiny_sd3_dir), *TINY_SD3],
                                 tmp_path / "run")
    args, recipe = config["args"], config["recipe"]
    assert (args["preset"], args["model"], args["pretrained"]) == ("sd3", "sd3", str(tiny_sd3_dir))
    expected = preset_fields(flow_grpo, "sd3", skip=TINY_SD3_OVERRIDES)  # every field the test did not override
    assert {k: args[k] for k in expected} == expected
    assert (args["mixed_precision"], args["sampler"], args["beta"], args["ema"]) == ("fp16", "flow", 0.04, True)
    # the arithmetic of the printed block: 4 batches of 4 images, 2 prompts x 2 each; 2 updates of 8
    assert recipe["checkpoint"] == str(tiny_sd3_dir) and recipe["dtype"] == "fp16" and recipe["resolution"] == 64
    assert (recipe["prompts_per_batch"], recipe["images_per_epoch"], recipe["images_per_update"]) == (2, 16, 8)
    assert recipe["trained_steps"] == list(range(9)) and recipe["micro_steps_per_update"] == 18
    assert "---- recipe: flow_grpo.py, preset sd3" in printed and "2 updates of 8 images each" in printed


def test_explicit_preset_wins_over_the_models(tmp_path, tiny_sd3_dir):
    config, printed = run_script("flow_grpo.py", ["--preset", "toy", "--model", "sd3", "--pretrained",
                                                  str(tiny_sd3_dir), *TINY_SD3], tmp_path / "run")
    args = config["args"]
    assert (args["preset"], args["model"], args["pretrained"]) == ("toy", "sd3", str(tiny_sd3_dir))
    expected = preset_fields(flow_grpo, "toy", skip=TINY_SD3_OVERRIDES)
    assert {k: args[k] for k in expected} == expected
    assert (args["mixed_precision"], args["sampler"], args["learning_rate"]) == ("no", "cps", 1e-3)
    assert "preset toy" in printed


# each file's gmm preset on 2 prompts x 16 points per batch (the gmm train split has 19 prompts)
TINY_GMM = ["--num-epochs", "1", "--eval-every", "0", "--track", "none", "--batch-size", "32", "--group-size", "16"]


@pytest.fixture(scope="module")
def gmm_run_dir(tmp_path_factory):
    """One tiny flow_grpo gmm run: its recipe, and its final/peft as flow_opd's teachers."""
    out = tmp_path_factory.mktemp("gmm") / "flow_grpo"
    flow_grpo.main(flow_grpo.parse_args(["--preset", "gmm", *TINY_GMM, "--output-dir", str(out)]))
    return out


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_file_prints_its_recipe_and_writes_config_json(module, gmm_run_dir, tmp_path, capsys):
    argv = ["--preset", "gmm", *TINY_GMM, "--output-dir", str(tmp_path / "run")]
    if module is flow_opd:
        argv += ["--teachers", f"single={gmm_run_dir}", f"multi={gmm_run_dir}"]
    config, printed = run_and_read(module, argv, capsys)
    recipe, args = config["recipe"], config["args"]
    block = [line for line in printed.splitlines() if line.startswith("---- recipe:")]
    assert block == [f"---- recipe: {module.__name__}.py, preset gmm (also in {tmp_path / 'run' / 'config.json'})"]
    lines = printed.splitlines()
    start = lines.index(block[0])
    assert [line.split()[0] for line in lines[start + 1:start + 7]] == ["model", "sampling", "batch", "epoch",
                                                                          "training", "run"]
    assert args == as_json(dataclasses.asdict(module.validate(module.parse_args(argv))))  # the full resolved Args
    assert (recipe["model"], recipe["checkpoint"], recipe["preset"], recipe["processes"]) == ("gmm", "d2", "gmm", 1)
    assert recipe["images_per_epoch"] == args["batch_size"] * args["batches_per_epoch"]
    assert recipe["images_per_update"] == recipe["images_per_epoch"] // args["updates_per_epoch"]
    assert recipe["prompts_per_batch"] == args["batch_size"] // args["group_size"]
    assert recipe["learning_rate"] == module.PRESETS["gmm"].learning_rate and recipe["beta"] == args["beta"]


# the published recipes of the other model families (ALGORITHMS.md §15.1), spot-checked field by field
PUBLISHED = {
    (flow_grpo, "pickscore_flux"): dict(model="flux", mixed_precision="bf16", num_steps=6, eval_num_steps=28,
                                        sampler="flow", noise_level=0.9, guidance=1.0, group_size=24, batch_size=3,
                                        batches_per_epoch=12, updates_per_epoch=2, clip_range=1e-4, beta=0.0,
                                        reward="pickscore"),
    (flow_grpo, "counting_flux_kontext"): dict(model="flux_kontext", group_size=21, batch_size=3, noise_level=0.9,
                                               reward="image_similarity=0.5,geneval=0.5"),
    (flow_grpo, "counting_qwenimage_edit"): dict(model="qwen_image_edit", num_steps=10, eval_num_steps=50,
                                                 guidance=4.0, noise_level=1.0, group_size=16, batch_size=4, ema=False,
                                                 reward="image_similarity=0.2,geneval=0.8"),
    (flow_grpo, "general_ocr_wan2_1"): dict(model="wan", resolution=None, sampler="wan", noise_level=1.0,
                                            num_steps=20, eval_num_steps=50,
                                            guidance=4.5, group_size=4, batch_size=8, batches_per_epoch=2,
                                            learning_rate=1e-4, clip_range=1e-3, beta=0.004, kl_convention="exact",
                                            global_std=False, reward="video_ocr"),
    (flow_grpo_fast, "pickscore_flux_fast"): dict(model="flux", sampler="cps", noise_level=0.8, sde_window_size=3,
                                                  sde_window_range=(0, 3), clip_range=1e-5, global_std=False,
                                                  reward="pickscore"),
    (flow_grpo_fast, "geneval_flux_fast"): dict(model="flux", sampler="cps", global_std=True, reward="geneval"),
    (flow_grpo_fast, "pickscore_qwenimage"): dict(model="qwen_image", sampler="flow", noise_level=1.2, guidance=4.0,
                                                  sde_window_size=2, sde_window_range=(0, 5), group_size=16,
                                                  batch_size=4, reward="pickscore"),
    (flow_grpo_fast, "counting_qwenimage_edit_fast"): dict(model="qwen_image_edit", noise_level=1.5,
                                                           sde_window_size=4, sde_window_range=(0, 5)),
}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_preset_parses_to_itself(module):
    for name, preset in module.PRESETS.items():
        args = module.parse_args(["--preset", name])
        assert dataclasses.replace(args, preset=None) == dataclasses.replace(preset, preset=None), name


@pytest.mark.parametrize("key", list(PUBLISHED), ids=lambda k: f"{k[0].__name__}:{k[1]}")
def test_published_model_presets_carry_the_published_values(key):
    module, name = key
    args = module.parse_args(["--preset", name])
    assert {field: getattr(args, field) for field in PUBLISHED[key]} == PUBLISHED[key]
