"""Every algorithm file's `--preset gmm`, one after the other, as a user runs them: the README's
"See it learn in one minute" table and figures.

    python bench/gmm_presets.py                   # about 10 minutes on 2 cores
    python bench/gmm_presets.py --only flow_grpo  # one row

Flow-OPD first trains its two teachers with flow_grpo.py (the preset's comment lines). Each run
writes to runs/bench_gmm/<name>; the table (base -> final eval reward in SE of the difference, the
KL to the base, wall time) goes to stdout and docs/gmm_presets.md, and flow_grpo's scatter plot
and frontier figure are copied to docs/.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "bench_gmm"
TEACHERS = [("single", "gmm@tag:single", 96), ("multi", "gmm@tag:pair+half+any", 192)]
RUNS = {
    "flow_grpo": ["flow_grpo.py", "--preset", "gmm"],
    "flow_grpo_fast": ["flow_grpo_fast.py", "--preset", "gmm"],
    "grpo_guard": ["grpo_guard.py", "--preset", "gmm"],
    "online_dpo": ["flow_dpo.py", "--preset", "gmm"],
    "online_sft": ["flow_dpo.py", "--preset", "gmm_online_sft"],
    "flow_opd": ["flow_opd.py", "--preset", "gmm", "--teachers", *(f"{n}={OUT / ('teacher_' + n)}" for n, _, _ in TEACHERS)],
}


def run(name, command):
    start = time.time()
    subprocess.run([sys.executable, *command, "--track", "none", "--output-dir", str(OUT / name)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - start


def summary(name, wall):
    rows = [json.loads(line) for line in (OUT / name / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("eval/reward_mean") is not None]
    base, final = evals[0], evals[-1]
    se = math.hypot(base["eval/reward_se"], final["eval/reward_se"])
    best = max(evals, key=lambda r: r["eval/reward_mean"])
    return (f"| {name} | {base['eval/reward_mean']:.3f} | {final['eval/reward_mean']:.3f} "
            f"({(final['eval/reward_mean'] - base['eval/reward_mean']) / se:+.0f} SE) | "
            f"{best['eval/reward_mean']:.3f} (epoch {best['epoch']}) | {final.get('eval/accuracy', float('nan')):.3f} | "
            f"{final.get('eval/kl_marginal', float('nan')):.2f} | {final.get('eval/kl_path', float('nan')):.2f} | "
            f"{final['epoch']} | {wall:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to do (default: all)")
    args = parser.parse_args()
    lines = ["| preset | eval reward, base | final (rise) | best (epoch) | final accuracy | marginal KL | path KL | "
             "epochs | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.only or list(RUNS):
        if name == "flow_opd":
            for teacher, prompts, batch in TEACHERS:
                run(f"teacher_{teacher}", ["flow_grpo.py", "--preset", "gmm", "--prompts", prompts,
                                           "--batch-size", str(batch)])
        wall = run(name, RUNS[name])
        lines.append(summary(name, wall))
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if not args.only:
        (ROOT / "docs" / "gmm_presets.md").write_text(table + "\n")
        grids = sorted((OUT / "flow_grpo" / "grids").glob("eval_epoch*.png"))
        shutil.copy(grids[-1], ROOT / "docs" / "gmm_flow_grpo_scatter.png")
        shutil.copy(OUT / "flow_grpo" / "frontier.png", ROOT / "docs" / "gmm_flow_grpo_frontier.png")


if __name__ == "__main__":
    main()
