"""Plot test-split accuracy against wall-clock minutes for one or more runs.

    python bench/plot_learning.py runs/flow_grpo_bench --out docs/flow_grpo_learning.png
    python bench/plot_learning.py runs/a runs/b --labels GRPO Fast --x epoch
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.outputs import plot_curves, read_metrics  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--metric", default="eval/accuracy")
    parser.add_argument("--x", choices=["wall", "epoch"], default="wall")
    parser.add_argument("--title", default=None)
    cli = parser.parse_args()
    series = {}
    for i, run in enumerate(cli.runs):
        records = [r for r in read_metrics(Path(run) / "metrics.jsonl") if r.get(cli.metric) is not None]
        # an evaluation logged at the start of epoch e happened before that epoch's training:
        # its wall time is the previous record's end time (0 for the base)
        wall, xs, ys = {}, [], []
        for r in read_metrics(Path(run) / "metrics.jsonl"):
            wall[r["epoch"] + 1] = r.get("perf/wall_min", 0.0)
        for r in records:
            xs.append(wall.get(r["epoch"], 0.0) if cli.x == "wall" else r["epoch"])
            ys.append(r[cli.metric])
        label = cli.labels[i] if cli.labels and i < len(cli.labels) else Path(run).name
        series[label] = (xs, ys)
        print(label, [(round(x, 1), round(y, 3)) for x, y in zip(xs, ys)])
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(cli.out, series, xlabel="wall-clock minutes (2 CPU cores)" if cli.x == "wall" else "epoch",
                ylabel=cli.metric, title=cli.title)


if __name__ == "__main__":
    main()
