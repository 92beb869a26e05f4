"""Flow-GRPO against Flow-GRPO-Fast on the toy world, side by side: `python bench/fast_vs_grpo_learning.py`

Both run their toy defaults at equal guidance (CFG 4) at the same time, one CPU thread each, for
the same wall-clock budget, evaluating the test split (ODE, 64 images per category, seed 42)
about every 4 minutes. Prints each curve and the time Fast needed to reach the best accuracy
flow_grpo reached, as a fraction of the time flow_grpo needed; writes one plot of test accuracy
against wall-clock minutes.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.outputs import plot_curves, read_metrics  # noqa: E402


def accuracy_curve(run_dir):
    """[(wall minutes, test accuracy)]: an evaluation logged at epoch e ran before epoch e trained,
    so its time is the end of epoch e - 1 (0 for the base)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    ends = {r["epoch"] + 1: r["perf/wall_min"] for r in records if "perf/epoch_s" in r}
    return [(ends.get(r["epoch"], 0.0), r["eval/accuracy"]) for r in records if r.get("eval/accuracy") is not None]


def first_time_at_least(points, level):
    return next((t for t, a in points if a >= level), None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", default="runs/fast_vs_grpo")
    parser.add_argument("--figure", default="docs/fast_vs_grpo_learning.png")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--grpo-args", default="", help="extra flow_grpo.py arguments, e.g. '--learning-rate 3e-4'")
    parser.add_argument("--fast-args", default="", help="extra flow_grpo_fast.py arguments")
    cli = parser.parse_args()
    out = Path(cli.out)
    common = ["--max-minutes", str(cli.minutes), "--seed", str(cli.seed), "--track", "none"]
    runs = {"flow_grpo": ["flow_grpo.py", "--eval-every", "10", *cli.grpo_args.split()],
            "flow_grpo_fast (branch)": ["flow_grpo_fast.py", "--eval-every", "20", *cli.fast_args.split()]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, (script, *extra) in runs.items():
        run_dir = out / name.split()[0]
        if (run_dir / "final").exists():
            continue
        log = open(out / f"{run_dir.name}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / script), *common, *extra, "--output-dir",
                                       str(run_dir)], env=env, stdout=log, stderr=subprocess.STDOUT))
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"a run failed: {proc.args}")

    curves = {name: accuracy_curve(out / name.split()[0]) for name in runs}
    for name, points in curves.items():
        print(name, [(round(t, 1), round(a, 3)) for t, a in points])
    grpo, fast = curves["flow_grpo"], curves["flow_grpo_fast (branch)"]
    best_time, best = min(((t, a) for t, a in grpo if a == max(a for _, a in grpo)))
    fast_time = first_time_at_least(fast, best)
    print(f"flow_grpo best {best:.3f} at {best_time:.1f} min; Fast reaches it at "
          f"{'never' if fast_time is None else f'{fast_time:.1f} min'}"
          + ("" if fast_time is None or best_time == 0 else f" = {fast_time / best_time:.2f} of flow_grpo's time"))
    Path(cli.figure).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(cli.figure, {name: tuple(zip(*points)) for name, points in curves.items()},
                xlabel="wall-clock minutes (one CPU thread each, side by side)", ylabel="test accuracy (strict)",
                title="toy world, CFG 4")


if __name__ == "__main__":
    main()
