"""Over-optimisation on the toy world, Flow-GRPO against GRPO-Guard: `python bench/guard_overopt.py`

Both algorithms train on a proxy that can be hacked, `colour_coverage` (the share of pixels in
the prompt's colours: flooding the canvas with colour maxes it and destroys the shapes), while
two gold scores are watched:
  - strict GenEval accuracy on the test split (the in-loop ODE evaluation; `shapes` rides along
    in the reward spec with weight 0, so it is logged but never trained on), and
  - fidelity to the base model: 1 - mean |x - x_base| between each checkpoint's ODE evaluation
    images and the base model's images from the same noise (computed here, after training).
One figure: proxy, strict accuracy and fidelity against epochs for both algorithms.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import flow_grpo  # noqa: E402
import grpo_guard  # noqa: E402
from common.checkpoint import add_lora, load_checkpoint  # noqa: E402
from common.data import load_prompts  # noqa: E402
from common.evaluate import balanced_eval_prompts, generate  # noqa: E402
from common.models import load_adapter  # noqa: E402
from common.outputs import read_metrics  # noqa: E402

ALGORITHMS = {"flow_grpo": flow_grpo, "grpo_guard": grpo_guard}


def fidelity_curve(run_dir, base_images, eval_prompts, cli):
    """[(epoch, fidelity)] for every checkpoint of a run, against the base model's images."""
    points = [(0, 1.0)]
    for checkpoint in sorted(run_dir.glob("checkpoint-*")):
        adapter = load_adapter("toy")
        add_lora(adapter.transformer, adapter.lora_rank, adapter.lora_alpha, adapter.lora_target_modules)
        named = dict(adapter.transformer.named_parameters())
        with torch.no_grad():
            for name, value in load_checkpoint(checkpoint)["trainable"].items():
                named[name].copy_(value)
        images = generate(adapter, eval_prompts, num_steps=20, guidance=4.0, seed=cli.seed)
        points.append((int(checkpoint.name.split("-")[1]), 1 - (images - base_images).abs().mean().item()))
    return points


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="evaluate and checkpoint every N epochs")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="runs/guard_overopt")
    parser.add_argument("--figure", default="docs/guard_overoptimisation.png")
    cli = parser.parse_args()
    out = Path(cli.out)
    for name, module in ALGORITHMS.items():
        if (out / name / "final").exists():
            continue  # already trained: re-plot only
        argv = ["--reward", "colour_coverage=1.0,shapes=0", "--num-epochs", str(cli.epochs), "--eval-every",
                str(cli.every), "--save-every", str(cli.every), "--keep-checkpoints", "1000", "--learning-rate",
                str(cli.learning_rate), "--max-minutes", "1000", "--eval-images-per-category", "32", "--seed",
                str(cli.seed), "--track", "none", "--output-dir", str(out / name)]
        module.main(module.parse_args(argv))

    eval_prompts = balanced_eval_prompts(load_prompts("toy", "test"), 16)
    base_images = generate(load_adapter("toy"), eval_prompts, num_steps=20, guidance=4.0, seed=cli.seed)
    curves = {}
    for name in ALGORITHMS:
        history = read_metrics(out / name / "metrics.jsonl")
        evals = [r for r in history if r.get("eval/accuracy") is not None]
        curves[name] = {
            "proxy": [(r["epoch"], r["reward/colour_coverage"]) for r in history if "reward/colour_coverage" in r],
            "gold_partial": [(r["epoch"], r["reward/shapes"]) for r in history if "reward/shapes" in r],
            "accuracy": [(r["epoch"], r["eval/accuracy"]) for r in evals],
            "fidelity": fidelity_curve(out / name, base_images, eval_prompts, cli),
        }
    (out / "curves.json").write_text(json.dumps(curves, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("proxy", "proxy: colour coverage (train, SDE)"), ("accuracy", "gold: strict test accuracy (ODE)"),
              ("fidelity", "gold: fidelity to the base (ODE)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, panels):
        for name, colour in (("flow_grpo", "tab:red"), ("grpo_guard", "tab:blue")):
            xs, ys = zip(*curves[name][key])
            if key == "proxy":  # per-epoch values are noisy: a 5-epoch running mean
                ys = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, marker="o" if key != "proxy" else None, markersize=3, color=colour, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(cli.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(cli.figure, dpi=110)
    for name in ALGORITHMS:
        c = curves[name]
        print(f"{name}: proxy {c['proxy'][0][1]:.3f} -> {c['proxy'][-1][1]:.3f}; accuracy "
              f"{c['accuracy'][0][1]:.3f} -> {c['accuracy'][-1][1]:.3f}; fidelity -> {c['fidelity'][-1][1]:.3f}")


if __name__ == "__main__":
    main()
