"""bench/train_throughput.py on the tiny SD3.5-shaped model (CPU): every figure printed, and the
numbers behind them consistent (issue 21)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LABELS = [
    "rollout images/s (10 steps, SDE step eager)",
    "bare forward x 10 (same batches)",
    "VAE decode (fp32)",
    "rollout images/s incl. decode",
    "training samples/s per trained step (SDE step eager)",
    "bare forward+backward (same batches)",
    "| measured | time | throughput | TFLOP/s | MFU | peak memory |",
    "rollout / (steps x bare forward), SDE step eager:",
    "training step / bare forward+backward, SDE step eager:",
    "where the time goes",
    "compiled SDE step, kernels and time per call (eager vs compiled): n/a on CPU",
    "recompilations after the first epoch: n/a",
    "on-policy max |ratio - 1| per denoising step",
    "| step | fp32 eager | fp16 eager | bf16 eager |",
]


def test_tiny_run_prints_every_figure(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.time()
    result = subprocess.run([sys.executable, "bench/train_throughput.py", "--model", "sd3", "--tiny", "--repeats", "2",
                             "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 120, f"the tiny run took {elapsed:.0f} s (acceptance: < 2 min)"
    for label in LABELS:
        assert label in result.stdout, f"missing {label!r} in:\n{result.stdout}"
    assert result.stdout.count("n/a on CPU (pass --peak-tflops)") >= 4  # MFU of every transformer row

    report = json.loads(out.read_text())
    assert report["config"]["tiny"] and report["config"]["dtype"] == "fp32" and report["config"]["compile"] == "off"
    for name in ["rollout eager", "bare forward", "training eager", "bare forward+backward"]:
        figure = report["figures"][name]
        assert figure["time_s"] > 0 and figure["peak_memory_bytes"] > 2**20 and figure["tflops"] > 0
        assert figure["mfu"] is None  # no peak on CPU without --peak-tflops
    assert report["figures"]["rollout eager"]["images_per_s"] > 0
    assert report["figures"]["training eager"]["samples_per_s"] > 0
    # the loop's transformer calls are the bare ones: the SDE step and the loss add no matmuls
    assert report["flops"]["rollout"] == report["flops"]["bare forward"] > 0
    assert report["flops"]["training"] == report["flops"]["bare forward+backward"] > 2 * report["flops"]["rollout"] / 10
    # a sanity band, not the acceptance bound: two repeats on a shared machine swing by +-10 %
    for ratio in report["ratios"].values():
        assert 0.7 < ratio < 1.5
    shares = report["breakdown"]["eager"]["rollout"]
    assert shares["transformer forward"] > 0.8 * sum(shares.values())
    assert report["sde_step_profile"] is None and report["recompilations"] is None
    table = report["on_policy_ratio_dev_max"]
    assert set(table) == {"fp32 eager", "fp16 eager", "bf16 eager"}
    assert all(len(column) == 9 and all(math.isfinite(v) for v in column) for column in table.values())
    assert max(table["fp32 eager"]) <= 1e-6  # ALGORITHMS.md §9.2: on-policy r = 1 in fp32 on CPU
