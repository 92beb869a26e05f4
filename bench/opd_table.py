"""Flow-OPD's table on the toy world, one command: `python bench/opd_table.py`

1. One flow_grpo.py teacher per task group (the toy train split filtered to the group's tags,
   written to OUTPUT/prompts/<group>/), `--teacher-minutes` each, one after the other.
2. GRPO-Mix: flow_grpo.py on every task (category-balanced draws), `--epochs` epochs.
3. Flow-OPD: flow_opd.py, delta-average merge init, category routing to the teachers, the same
   `--epochs`, batch and optimizer steps as GRPO-Mix (64 student rollouts, 2 updates per epoch):
   equal student compute; the teachers' forwards come on top (reported as wall time).
4. Test-split strict accuracy per category and the average (64 images per category, 20-step
   ODE, CFG 4, seed 42: flow_grpo's evaluation) for the base, each teacher, GRPO-Mix, the
   merged init alone and Flow-OPD; the table goes to OUTPUT/table.md and results.json.
Targets (the paper's claim): OPD average >= the mean of the teachers' averages, and > GRPO-Mix.

Existing runs are reused (a finished run directory with final/peft is not retrained), so an
interrupted bench resumes where it stopped; `--teacher NAME=DIR` uses a run you already have.
    python bench/opd_table.py --teacher-minutes 10 --epochs 40 --output-dir runs/opd_table_reduced
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GROUPS = ("objects=single_object+two_object+counting", "position=position", "colours=colors+color_attr")


@dataclass
class Args:
    output_dir: str = "runs/opd_table"
    """everything goes here: prompts/, teacher_<group>/, grpo_mix/, opd/, merge_init/, table.md"""
    groups: tuple[str, ...] = GROUPS
    """task groups NAME=TAG+TAG, one teacher each (together they should cover the six categories)"""
    teacher: tuple[str, ...] = ()
    """NAME=RUN_DIR: reuse an existing teacher run (its final/peft) instead of training it"""
    teacher_minutes: float = 30.0
    """flow_grpo.py wall-clock budget per teacher"""
    epochs: int = 100
    """epochs of GRPO-Mix and of Flow-OPD (equal student compute)"""
    objective: str = "gkd"
    """flow_opd.py objective"""
    opd_args: tuple[str, ...] = ()
    """extra flow_opd.py arguments (e.g. --learning-rate 3e-4)"""
    eval_images_per_category: int = 64
    """evaluation images per category"""
    seed: int = 42
    """training and evaluation seed"""
    threads: int = 1
    """torch threads for every run and the evaluation"""
    skip_training: bool = False
    """only evaluate the runs that exist"""
    mix_dir: Optional[str] = None
    """reuse an existing GRPO-Mix run directory"""
    opd_dir: Optional[str] = None
    """the Flow-OPD run directory (default OUTPUT/opd); another one trains another variant next to it,
    reusing the teachers, GRPO-Mix and their cached evaluations"""


def parse_pairs(entries):
    return dict(entry.split("=", 1) for entry in entries)


def write_group_prompts(directory, tags):
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = (ROOT / "common" / "toy" / "data" / f"{split}_metadata.jsonl").read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["tag"] in tags]
        (directory / f"{split}_metadata.jsonl").write_text("\n".join(kept) + "\n")
    return directory


def finished(run_dir):
    return (Path(run_dir) / "final" / "peft" / "adapter_config.json").is_file()


def launch(command, run_dir, args: Args):
    """Run a training script to completion (log in run_dir/train.log), unless it already finished."""
    run_dir = Path(run_dir)
    if finished(run_dir):
        print(f"reuse {run_dir}", flush=True)
        return 0.0
    if args.skip_training:
        raise SystemExit(f"{run_dir} has no final/peft and --skip-training is set")
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    resume = ["--resume", "latest"] if list(run_dir.glob("checkpoint-*")) else []
    print("$ " + " ".join(command + resume), flush=True)
    start = time.time()
    with open(run_dir / "train.log", "a") as log:
        subprocess.run([sys.executable, *command, *resume], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    minutes = (time.time() - start) / 60
    (run_dir / "wall_minutes.txt").write_text(f"{minutes:.2f}\n")
    return minutes


def evaluate_all(models, args: Args):
    """{label: metrics} for the base (label 'base', path None) and each LoRA, one model in memory."""
    import torch

    from common.data import load_prompts
    from common.evaluate import evaluate
    from common.lora_merge import load_lora_adapter
    from common.models import load_adapter
    from common.rewards import MultiReward, parse_reward_spec

    torch.set_num_threads(args.threads)
    adapter = load_adapter("toy")
    adapter.transformer.requires_grad_(False)
    prompts = load_prompts("toy", "test")
    reward = MultiReward(parse_reward_spec("shapes"))
    results = {}
    cache = Path(args.output_dir) / "eval_cache.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    for number, (label, path) in enumerate(models.items()):
        key = f"{label}|{path}|{args.eval_images_per_category}|{args.seed}"
        if key in cached:
            results[label] = cached[key]
            continue
        start = time.time()
        if path is None:
            if getattr(adapter.transformer, "peft_config", None):
                adapter.transformer.disable_adapters()
        else:
            name = f"model{number}"
            load_lora_adapter(adapter.transformer, path, name)
            adapter.transformer.enable_adapters()
            adapter.transformer.set_adapter(name)
        metrics, _, _ = evaluate(adapter, prompts, reward, num_steps=20, guidance=4.0, seed=args.seed,
                                 images_per_category=args.eval_images_per_category)
        results[label] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        cached[key] = results[label]
        cache.write_text(json.dumps(cached, indent=1))
        print(f"eval {label}: accuracy {results[label]['eval/accuracy']:.3f} ({time.time() - start:.0f} s)", flush=True)
    return results


def table(results, minutes):
    header = "| model | " + " | ".join(CATEGORIES) + " | avg | train min |"
    lines = [header, "|---" * (len(CATEGORIES) + 3) + "|"]
    for label, metrics in results.items():
        cells = [f"{metrics[f'eval/accuracy/{c}']:.3f}" for c in CATEGORIES]
        spent = minutes.get(label)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{metrics['eval/accuracy']:.3f}** | "
                     + (f"{spent:.1f}" if spent else "") + " |")
    return "\n".join(lines)


def main(args: Args):
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = {name: tags.split("+") for name, tags in parse_pairs(args.groups).items()}
    covered = sorted(t for tags in groups.values() for t in tags)
    if covered != sorted(CATEGORIES):
        print(f"note: the groups cover {covered}, not all six categories", flush=True)
    reused = parse_pairs(args.teacher)
    minutes, teachers = {}, {}
    for name, tags in groups.items():
        run_dir = Path(reused.get(name, out / f"teacher_{name}"))
        if name not in reused:
            prompts = write_group_prompts(out / "prompts" / name, set(tags))
            minutes[f"teacher {name}"] = launch(
                ["flow_grpo.py", "--prompts", str(prompts), "--output-dir", str(run_dir), "--exp-name", f"teacher_{name}",
                 "--max-minutes", str(args.teacher_minutes), "--eval-every", "0", "--track", "none", "--seed",
                 str(args.seed)], run_dir, args)
        teachers[name] = run_dir
    mix_dir = Path(args.mix_dir or out / "grpo_mix")
    minutes["GRPO-Mix"] = launch(["flow_grpo.py", "--output-dir", str(mix_dir), "--exp-name", "grpo_mix", "--num-epochs",
                                  str(args.epochs), "--max-minutes", "None", "--eval-every", "0", "--track", "none",
                                  "--seed", str(args.seed)], mix_dir, args)
    opd_dir = Path(args.opd_dir or out / "opd")
    minutes["Flow-OPD (merge init)"] = launch(
        ["flow_opd.py", "--output-dir", str(opd_dir), "--num-epochs", str(args.epochs), "--max-minutes", "None",
         "--eval-every", "0", "--track", "none", "--seed", str(args.seed), "--objective", args.objective,
         "--init", "delta_average", "--teachers", *(f"{n}={d}" for n, d in teachers.items()),
         "--teacher-prompts", *(f"{n}=tag:{'+'.join(t)}" for n, t in groups.items()), *args.opd_args], opd_dir, args)
    from common.lora_merge import merge_loras, save_lora

    merge_dir = out / "merge_init"
    if not finished(merge_dir):
        save_lora(merge_dir / "final", *merge_loras([teachers[n] for n in groups], "delta_average"))

    models = {"base": None, **{f"teacher {n}": teachers[n] for n in groups}, "GRPO-Mix": mix_dir,
              "merge init only": merge_dir, "Flow-OPD (merge init)": opd_dir}
    results = evaluate_all(models, args)
    teacher_mean = sum(results[f"teacher {n}"]["eval/accuracy"] for n in groups) / len(groups)
    opd, mix = results["Flow-OPD (merge init)"]["eval/accuracy"], results["GRPO-Mix"]["eval/accuracy"]
    text = (f"Toy world, test split, strict accuracy ({args.eval_images_per_category} images/category, 20-step ODE, "
            f"CFG 4, seed {args.seed}); teachers {args.teacher_minutes} min of flow_grpo.py each; GRPO-Mix and "
            f"Flow-OPD ({args.objective}) {args.epochs} epochs each.\n\n" + table(results, minutes)
            + f"\n\nmean of the teachers' averages: {teacher_mean:.3f}\n"
            f"target 1, OPD >= mean of teachers: {opd:.3f} vs {teacher_mean:.3f} -> {'met' if opd >= teacher_mean else 'NOT met'}\n"
            f"target 2, OPD > GRPO-Mix: {opd:.3f} vs {mix:.3f} -> {'met' if opd > mix else 'NOT met'}\n")
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": results, "minutes": minutes, "args": vars(args)}, indent=1,
                                                 default=str))
    print(text)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
