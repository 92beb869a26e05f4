"""flow_opd.py end to end on the toy model with tiny hand-made teacher LoRAs: gkd and pg smoke
runs (teachers loaded as adapters, merge init, on-policy ratio, export), the alternate
multi-teacher schedule (which teacher scored each epoch's data), resume, and bad arguments."""

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import flow_opd
from common.outputs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--num-epochs", "1", "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1",
        "--updates-per-epoch", "1", "--eval-every", "0", "--track", "none", "--num-steps", "4"]
TEACHERS = {"counting": 1, "position": 2}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two rank-4 LoRAs with random (small) B, exported like a flow_grpo.py run's final/."""
    from common.checkpoint import add_lora, export_lora
    from common.models import load_adapter

    root = tmp_path_factory.mktemp("teachers")
    adapter = load_adapter("toy")
    for name, seed in TEACHERS.items():
        with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
            warnings.simplefilter("ignore")
            add_lora(adapter.transformer, 4, 8, adapter.lora_target_modules, adapter_name=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in adapter.transformer.named_parameters():
                if f"lora_B.{name}." in param_name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        export_lora(adapter.transformer, root / name / "final", adapter_name=name)
    return {name: root / name for name in TEACHERS}


def teacher_args(teachers):
    return ["--teachers", *(f"{name}={path}" for name, path in teachers.items())]


def run(tmp_path, teachers, *extra, name="run"):
    args = flow_opd.parse_args([*TINY, *teacher_args(teachers), "--output-dir", str(tmp_path / name), *extra])
    out = flow_opd.main(args)
    return read_metrics(Path(out) / "metrics.jsonl"), Path(out)


@pytest.mark.parametrize("objective", ["gkd", "pg"])
def test_smoke_merge_init_student_moves_and_exports(tmp_path, teachers, objective):
    from common.lora_merge import lora_deltas, merge_loras, read_lora

    records, out = run(tmp_path, teachers, "--objective", objective, "--init", "delta_average",
                       "--no-shuffle", "--beta", "0.04", "--learning-rate", "1e-2")
    record = records[0]
    assert record["train/ratio_dev_max"] <= 1e-6  # the student's own rollout: on-policy ratio 1
    assert record["train/kl"] > 0 and np.isfinite(record["train/loss"]) and record["opd/mar"] > 0
    assert record["opd/rows/counting"] + record["opd/rows/position"] == 4
    assert set(record["opd/tags"]) <= {"counting", "position"}
    # the exported student started at the teachers' delta average and moved away from it (that it
    # learns, i.e. gets closer to its teachers on their tasks, is tests/test_gmm_learning.py's claim)
    start = lora_deltas(*merge_loras(list(teachers.values()), "delta_average"))
    final = lora_deltas(*read_lora(out / "final" / "peft"))
    moved = max((final[m] - start[m]).abs().max().item() for m in start)
    assert 0 < moved < 1.0
    assert (out / "final" / "diffusers" / "pytorch_lora_weights.safetensors").exists()


def test_zero_epochs_exports_the_merge_cold_start(tmp_path, teachers):
    """`--num-epochs 0 --eval-every 0`: no metrics at all, and the export is the merge itself
    (the cold start alone, a baseline of the Flow-OPD table)."""
    from common.lora_merge import lora_deltas, merge_loras, read_lora

    records, out = run(tmp_path, teachers, "--init", "delta_average", "--num-epochs", "0")
    assert records == []
    start = lora_deltas(*merge_loras(list(teachers.values()), "delta_average"))
    final = lora_deltas(*read_lora(out / "final" / "peft"))
    assert set(final) == set(start)
    assert max((final[m] - start[m]).abs().max().item() for m in start) <= 1e-6


def test_multi_teacher_alternate_schedule_routes_each_epoch(tmp_path, teachers):
    records, _ = run(tmp_path, teachers, "--routing", "alternate", "--epochs-per-cycle", "counting=1",
                     "position=2", "--num-epochs", "4", "--objective", "gkd", "--init", "base",
                     "--lora-rank", "2", "--lora-alpha", "4", "--teacher-rewards", "position=colour_coverage",
                     "--eval-every", "4", "--eval-images-per-category", "1")
    final_eval = records.pop()
    # evaluation per dataset, each with its own reward
    assert "eval/counting/accuracy/counting" in final_eval and "eval/position/colour_coverage_mean" in final_eval
    assert "eval/counting/colour_coverage_mean" not in final_eval
    assert [r["opd/dataset"] for r in records] == ["counting", "position", "position", "counting"]
    assert ["reward/shapes" in r for r in records] == [True, False, False, True]  # the epoch's task reward
    for r in records:  # every row of the epoch came from that dataset and was scored by its teacher
        assert r["opd/tags"] == [r["opd/dataset"]]
        assert r[f"opd/rows/{r['opd/dataset']}"] == 4
        other = "position" if r["opd/dataset"] == "counting" else "counting"
        assert r[f"opd/rows/{other}"] == 0 and f"opd/logratio/{other}" not in r


def test_teacher_adapter_is_the_teacher(tmp_path, teachers):
    """The student initialised as one teacher (factor_average of one LoRA) has KL 0 to it."""
    one = {"counting": teachers["counting"]}
    records, _ = run(tmp_path, one, "--init", "factor_average", "--learning-rate", "1e-9", "--objective", "gkd")
    assert records[0]["train/kl"] < 1e-10
    assert abs(records[0]["opd/logratio"]) < 1e-3


def test_resume_is_exact(tmp_path, teachers):
    common = ["--save-every", "1", "--objective", "pg", "--init", "base"]
    full, _ = run(tmp_path, teachers, *common, "--num-epochs", "2", name="full")
    run(tmp_path, teachers, *common, "--num-epochs", "1", name="split")
    resumed, _ = run(tmp_path, teachers, *common, "--num-epochs", "2", "--resume", "latest", name="split")
    assert len(full) == len(resumed) == 2
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
               {k: v for k, v in b.items() if not k.startswith("perf/")}


BAD = [
    ([], "at least one teacher"),
    (["--teachers", "counting=/nonexistent"], "/nonexistent"),
    (["--teachers", "nosuchtag=T"], "nosuchtag"),
    (["--teachers", "counting=T", "--epochs-per-cycle", "counting=2"], "--routing alternate"),
    (["--teachers", "counting=T", "--teacher-prompts", "other=tag:position"], "not in --teachers"),
    (["--teachers", "counting=T", "--init", "lora"], "--init-lora"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_arguments_are_rejected_before_any_model_loads(tmp_path, teachers, argv, message):
    argv = [a.replace("=T", f"={teachers['counting']}") for a in argv]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        flow_opd.validate(flow_opd.parse_args(["--output-dir", str(tmp_path / "bad"), *argv]))


def test_command_line_fails_fast_with_the_message(tmp_path):
    start = time.time()
    result = subprocess.run([sys.executable, "flow_opd.py", "--output-dir", str(tmp_path / "bad"), "--teachers",
                             "counting=/nonexistent"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "/nonexistent" in result.stderr
    assert time.time() - start < 15
    assert not (tmp_path / "bad").exists()
