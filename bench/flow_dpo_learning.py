"""The flow_dpo.py learning benchmark on the toy world: DPO, OnlineDPO, SFT and OnlineSFT, one run
at a time (each --minutes of wall clock), then one plot of test-split strict accuracy against
epochs for all four.

    OMP_NUM_THREADS=1 python bench/flow_dpo_learning.py                      # all four, 30 min each
    python bench/flow_dpo_learning.py --variants online_sft online_dpo --minutes 30
    python bench/flow_dpo_learning.py --plot-only                            # re-plot finished runs
Extra flow_dpo.py arguments go after `--`, e.g. `-- --learning-rate 3e-4`.
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.outputs import plot_curves, read_metrics  # noqa: E402

VARIANTS = {"dpo": "DPO (offline)", "online_dpo": "OnlineDPO", "sft": "SFT (offline)", "online_sft": "OnlineSFT"}


def summarize(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [(r["epoch"], r["eval/accuracy"]) for r in records if r.get("eval/accuracy") is not None]
    wall = max((r.get("perf/wall_min") or 0.0) for r in records)
    return evals, wall


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="*", default=["online_sft", "online_dpo", "dpo", "sft"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--root", default="runs/flow_dpo_bench")
    parser.add_argument("--out", default="docs/flow_dpo_toy_learning.png")
    parser.add_argument("--plot-only", action="store_true")
    cli, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    root = ROOT / cli.root
    if not cli.plot_only:
        for variant in cli.variants:
            cmd = [sys.executable, "flow_dpo.py", "--preset", variant, "--max-minutes", str(cli.minutes),
                   "--output-dir", str(root / variant), "--track", "none", *extra]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
    series = {}
    for variant, label in VARIANTS.items():
        if not (root / variant / "metrics.jsonl").exists():
            continue
        evals, wall = summarize(root / variant)
        if not evals:
            continue
        accuracies = [a for _, a in evals]
        print(f"{label}: base {accuracies[0]:.3f} -> best {max(accuracies):.3f} -> final {accuracies[-1]:.3f}; "
              f"{evals[-1][0]} epochs in {wall:.1f} min; curve {[(e, round(a, 3)) for e, a in evals]}")
        series[label] = ([e for e, _ in evals], accuracies)
    if series:
        Path(ROOT / cli.out).parent.mkdir(parents=True, exist_ok=True)
        plot_curves(ROOT / cli.out, series, xlabel="epoch", ylabel="test strict accuracy (ODE, CFG 4)",
                    title="flow_dpo.py on the toy world (2 CPU cores)")


if __name__ == "__main__":
    main()
