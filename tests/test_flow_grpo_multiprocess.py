"""A real 2-process CPU run through `accelerate launch` (gloo). `--cpu --num_processes 2` would
silently start one process, hence --multi_gpu with the script's Accelerator(cpu=True)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from common.outputs import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_run_an_epoch_with_complete_groups(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "flow_grpo.py", "--num-epochs", "2", "--batch-size", "4", "--group-size", "4", "--batches-per-epoch", "2",
           "--updates-per-epoch", "1", "--num-steps", "4", "--eval-every", "0", "--track", "none",
           "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        assert record["dist/num_processes"] == 2       # two ranks really ran
        assert record["dist/ranks_agree"] == 1.0       # both drew the same global prompt list
        assert record["dist/complete_groups"] == 1.0   # every group complete after the gather
        assert record["dist/weights_agree"] == 1.0     # both ranks hold the same weights after each update
        assert record["train/ratio_dev_max"] < 1e-4
    assert (out / "final" / "diffusers" / "pytorch_lora_weights.safetensors").exists()
    # the recipe is printed once (main process) and counts both processes
    assert result.stdout.count("---- recipe:") == 1, result.stdout[-3000:]
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert (recipe["processes"], recipe["images_per_batch"], recipe["images_per_update"]) == (2, 8, 16)
