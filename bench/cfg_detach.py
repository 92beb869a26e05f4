"""Training through CFG, v_u detached (the published code) or not, on the gmm world: `python bench/cfg_detach.py`

Both arms run `flow_grpo.py --preset gmm` with CFG 3 in rollouts, training and evaluation, for the
preset's 150 epochs (no wall-clock cut: `--max-minutes None`, so both arms train the same number of
epochs), evaluating every 25 epochs, seeds 0-4, one run at a time: `--train-cfg-detach-uncond`
(gradient w·∇v_c) against `--no-train-cfg-detach-uncond` ((1 - w)·∇v_u + w·∇v_c). Same seed =
same prompts, initial noise and SDE noise, so the epoch-0 rollouts are identical and the arms are
paired by seed.

Prints a markdown table: mean ± 95 % t-interval over seeds of the eval reward (ODE, test split; at
epoch 0 the base's, the same for both arms) and the exact marginal KL to the base at mid-run
(epoch 75) and at the end (epoch 150), the training reward (SDE rollouts) over the last 10 epochs
and the wall time (a shared machine: noise); the last column is the paired difference (detached −
both halves). Runs already finished under --out are reused; each run's
resolved arguments are kept beside it (args.json) and must agree across runs but for seed and arm.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.outputs import read_metrics  # noqa: E402

ARMS = {"detached (published, default)": "--train-cfg-detach-uncond",
        "both halves": "--no-train-cfg-detach-uncond"}
NUM_EPOCHS, EVAL_EVERY, MID_EPOCH = 150, 25, 75


def summary(run_dir):
    """The numbers compared, from one run's metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = {r["epoch"]: r for r in records if r.get("eval/reward_mean") is not None}
    train = [r["reward/mean"] for r in records if r.get("reward/mean") is not None and r["epoch"] >= NUM_EPOCHS - 10]
    return {"eval reward, epoch 0 (the base)": evals[0]["eval/reward_mean"],
            "eval reward, epoch 75": evals[MID_EPOCH]["eval/reward_mean"],
            "eval reward, final": evals[NUM_EPOCHS]["eval/reward_mean"],
            "eval KL to base, epoch 75": evals[MID_EPOCH]["eval/kl_marginal"],
            "eval KL to base, final": evals[NUM_EPOCHS]["eval/kl_marginal"],
            "train reward, last 10 epochs": float(np.mean(train)),
            "wall minutes": records[-1]["perf/wall_min"]}


def interval(values):
    values = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():.3f} ± {half:.3f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", default="runs/cfg_detach")
    cli = parser.parse_args()
    import flow_grpo

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results, resolved = {arm: [] for arm in ARMS}, []
    for seed in cli.seeds:  # arms interleaved, so a slower machine late in the sweep hits both
        for arm, flag in ARMS.items():
            run_dir = Path(cli.out) / flag.lstrip("-") / f"seed{seed}"
            argv = ["--preset", "gmm", "--guidance", str(cli.guidance), "--eval-guidance", str(cli.guidance),
                    "--num-epochs", str(NUM_EPOCHS), "--eval-every", str(EVAL_EVERY), "--max-minutes", "None",
                    "--seed", str(seed), "--track", "none", flag, "--output-dir", str(run_dir)]
            if not (run_dir / "final").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                # the preset as this run reads it (other people edit presets while a sweep runs)
                args = dataclasses.asdict(flow_grpo.parse_args(argv))
                (run_dir / "args.json").write_text(json.dumps(args, default=str, indent=1))
                print("flow_grpo.py " + " ".join(argv), flush=True)
                with open(run_dir.parent / f"seed{seed}.log", "w") as log:
                    subprocess.run([sys.executable, str(ROOT / "flow_grpo.py"), *argv], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, check=True)
            if (run_dir / "args.json").exists():
                args = json.loads((run_dir / "args.json").read_text())
                resolved.append({k: v for k, v in args.items() if k not in ("seed", "output_dir",
                                                                             "train_cfg_detach_uncond")})
            results[arm].append(summary(run_dir))
    if any(r != resolved[0] for r in resolved):
        print("WARNING: the runs' resolved arguments differ (a preset changed during the sweep)")

    names = list(ARMS)
    print(f"\ngmm world, flow_grpo --preset gmm, CFG {cli.guidance:g} in rollouts, training and evaluation, "
          f"{NUM_EPOCHS} epochs, seeds {cli.seeds} (mean ± 95 % t-interval over seeds)\n")
    print(f"| metric | {names[0]} | {names[1]} | paired difference |\n|---|---|---|---|")
    for metric in results[names[0]][0]:
        a = [r[metric] for r in results[names[0]]]
        b = [r[metric] for r in results[names[1]]]
        print(f"| {metric} | {interval(a)} | {interval(b)} | {interval(np.subtract(a, b))} |")


if __name__ == "__main__":
    main()
