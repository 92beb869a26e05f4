"""Epoch time of Flow-GRPO-Fast against Flow-GRPO on the toy world: `python bench/fast_speed.py`

In one process, rounds of one short run per configuration, interleaved (A B C D, A B C D, ...)
so that machine load affects every configuration alike; each run is 1 + `--epochs` epochs
(the first, with warm-up, is dropped), evaluation off. The figure per configuration is the
median `perf/epoch_s` over all its measured epochs. Targets (issue 4), at 10 steps:
    Fast window, CFG 4 / flow_grpo CFG 4   <= 0.55
    Fast branch, CFG 4 / flow_grpo CFG 4   lower than window
    Fast no-CFG        / flow_grpo CFG 4   <= 0.30
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flow_grpo  # noqa: E402
import flow_grpo_fast  # noqa: E402
from common.outputs import read_metrics  # noqa: E402

CONFIGS = {
    "flow_grpo (CFG 4)": (flow_grpo, []),
    "fast window (CFG 4)": (flow_grpo_fast, ["--branch-mode", "window"]),
    "fast branch (CFG 4)": (flow_grpo_fast, ["--branch-mode", "branch"]),
    "fast window, no CFG": (flow_grpo_fast, ["--branch-mode", "window", "--guidance", "1", "--eval-guidance", "1"]),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per run")
    parser.add_argument("--rounds", type=int, default=3)
    cli = parser.parse_args()
    times = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(cli.rounds):
            for n, (name, (module, extra)) in enumerate(CONFIGS.items()):
                out = Path(tmp) / f"r{round_index}_{n}"
                argv = ["--num-epochs", str(cli.epochs + 1), "--eval-every", "0", "--track", "none",
                        "--save-every", "1000", "--output-dir", str(out), "--seed", str(round_index), *extra]
                module.main(module.parse_args(argv))
                epochs = read_metrics(out / "metrics.jsonl")[1:]
                times[name] += [r["perf/epoch_s"] for r in epochs]
                print(f"round {round_index} {name}: {[round(r['perf/epoch_s'], 2) for r in epochs]}", flush=True)
    base = statistics.median(times["flow_grpo (CFG 4)"])
    print("\n| configuration | median epoch s | ratio to flow_grpo (CFG 4) |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.3f} |")


if __name__ == "__main__":
    main()
