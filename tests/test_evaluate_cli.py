"""`python -m common.evaluate`: a trained LoRA reproduces its run's last in-loop evaluation, a
killed evaluation resumes without touching finished images, 2 processes give the same
summary.json as 1, prompt sources and the T2I-CompBench layout, bad input.

Every comparison below uses the same --batch-size on both sides: outputs can move by ~1e-6 with
the batch composition (PITFALLS §5), and the CLI keeps batches whole across ranks and resumes,
so equal batch sizes make the images, and hence the files, identical bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flow_grpo
from common import evaluate as ev
from common.outputs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
# 15 toy test prompts (up to 3 per category) x 2 images, 2 ODE steps, 8 batches of 4
SMALL = ["--max-prompts-per-category", "3", "--images-per-prompt", "2", "--steps", "2", "--batch-size", "4",
         "--reward", "shapes"]


def cli(*argv):
    return ev.main(ev.parse_args([str(a) for a in argv]))


def pngs(directory):
    return {p.relative_to(directory).as_posix(): p for p in sorted(Path(directory).rglob("*.png"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run of SMALL."""
    out = tmp_path_factory.mktemp("reference")
    cli(*SMALL, "--output-dir", out)
    return out


def test_layout_seeds_and_summary(reference):
    files = pngs(reference)
    assert len(files) == 30
    assert "single_object/samples/a photo of a circle_00001.png" in files  # {category}/samples/{prompt}_{k:05d}
    records = [json.loads(line) for line in (reference / "images.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == list(range(30))  # seed + prompt_index * N + k, seed 0
    assert records[1]["prompt"] == records[0]["prompt"] and records[1]["file"].endswith("_00001.png")
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["num_images"] == 30 and summary["settings"]["steps"] == 2
    assert summary["settings"]["negative_prompt"] == "" and summary["settings"]["sampler"] == "euler-ode"
    assert sum(row["images"] for row in summary["categories"].values()) == 30
    scores = [json.loads(line) for line in (reference / "scores.jsonl").read_text().splitlines()]
    assert summary["metrics"]["eval/accuracy"] == pytest.approx(sum(s["shapes_strict"] for s in scores) / 30)
    for tag, row in summary["categories"].items():
        assert row["accuracy"] == summary["metrics"][f"eval/accuracy/{tag}"]


def test_killed_evaluation_resumes_without_touching_finished_images(tmp_path, reference):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "common.evaluate", *SMALL, "--output-dir", str(out)]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not pngs(out) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in pngs(out).items()}
    assert 0 < len(before) < 30, f"the kill should land mid-run ({len(before)} of 30 images existed)"
    cli(*SMALL, "--output-dir", out)
    after = pngs(out)
    assert all((after[name].stat().st_ino, after[name].stat().st_mtime_ns) == stamp for name, stamp in before.items())
    assert not list(out.rglob("*.tmp"))
    ref = pngs(reference)
    assert after.keys() == ref.keys()
    assert all(after[name].read_bytes() == ref[name].read_bytes() for name in ref)
    assert (out / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()


def test_two_processes_give_the_same_summary_as_one(tmp_path, reference):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "common.evaluate", *SMALL, "--output-dir", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in result.stdout  # two ranks really ran
    assert (out / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()
    ref = pngs(reference)
    assert all(path.read_bytes() == ref[name].read_bytes() for name, path in pngs(out).items())


def test_exported_lora_reproduces_the_runs_last_in_loop_evaluation(tmp_path):
    """Acceptance: flow_grpo's exported LoRA, evaluated apart from training with the in-loop
    protocol (balanced list, seed + index, same steps/guidance/batch), gives the run's numbers."""
    run_dir = tmp_path / "run"
    reward = "shapes,jpeg_incompressibility"  # a continuous term: 3-step images rarely differ in shapes alone
    args = flow_grpo.parse_args(["--num-epochs", "1", "--batch-size", "4", "--group-size", "2",
                                 "--batches-per-epoch", "1", "--updates-per-epoch", "1", "--num-steps", "3",
                                 "--track", "none", "--eval-every", "1", "--eval-num-steps", "3",
                                 "--eval-images-per-category", "2", "--learning-rate", "0.05", "--save-every", "1",
                                 "--reward", reward, "--output-dir", str(run_dir)])
    flow_grpo.main(args)
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in r][-1]
    summary = cli("--protocol", "balanced", "--images-per-category", "2", "--steps", "3", "--guidance", "4",
                  "--seed", "42", "--batch-size", "64", "--reward", reward, "--lora", run_dir / "final" / "diffusers",
                  "--output-dir", tmp_path / "eval")
    eval_keys = {k: v for k, v in last.items() if k.startswith("eval/") and not k.startswith("eval/train/")}
    assert {k: summary["metrics"][k] for k in eval_keys} == eval_keys
    # and the in-loop evaluation on the training prompts (eval/train/..., the toy preset's --eval-train)
    on_train = cli("--protocol", "balanced", "--split", "train", "--images-per-category", "2", "--steps", "3",
                   "--guidance", "4", "--seed", "42", "--batch-size", "64", "--reward", reward,
                   "--lora", run_dir / "final" / "diffusers", "--output-dir", tmp_path / "eval_train")
    train_keys = {k: v for k, v in last.items() if k.startswith("eval/train/")}
    assert "eval/train/accuracy" in train_keys
    assert {k: on_train["metrics"]["eval/" + k[len("eval/train/"):]] for k in train_keys} == train_keys

    # the PEFT adapter, the checkpoint and the run directory load to the very same model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.3])

    def velocity(lora):
        adapter = ev.load_model(ev.Args(lora=None if lora is None else str(run_dir / lora)), "cpu")
        embeds = adapter.encode_prompts(["a photo of a circle", "a red square left of a blue triangle"])
        return adapter.predict_velocity(x, sigma, embeds, adapter.negative_embeds(), 4.0)

    exported = velocity("final/diffusers")
    for lora in ("final/peft", "checkpoint-000001", "."):
        assert torch.equal(velocity(lora), exported), lora
    assert (velocity(None) - exported).abs().max() > 1e-3  # and the LoRA is not a no-op


def test_prompt_sources_on_tiny_sd3_with_t2i_compbench_folder(tmp_path, tiny_sd3_dir):
    folder = tmp_path / "compbench"
    folder.mkdir()
    (folder / "color_val.txt").write_text("a red dog\na blue cat\n")
    (folder / "spatial_val.txt").write_text("a dog on the left of a cat\n")
    (folder / "color_train.txt").write_text("ignored\n")
    prompts = ev.load_eval_prompts(str(folder))
    assert [(p.text, p.metadata["tag"]) for p in prompts] == [("a red dog", "color"), ("a blue cat", "color"),
                                                             ("a dog on the left of a cat", "spatial")]
    out = tmp_path / "out"
    summary = cli("--model", "sd3", "--pretrained", tiny_sd3_dir, "--resolution", "64", "--prompts", folder,
                  "--images-per-prompt", "2", "--steps", "2", "--guidance", "4.5", "--negative-prompt", "blurry",
                  "--reward", "jpeg_compressibility", "--output-dir", out)
    assert sorted(pngs(out)) == ["color/samples/a blue cat_00000.png", "color/samples/a blue cat_00001.png",
                                 "color/samples/a red dog_00000.png", "color/samples/a red dog_00001.png",
                                 "spatial/samples/a dog on the left of a cat_00000.png",
                                 "spatial/samples/a dog on the left of a cat_00001.png"]
    assert list(summary["categories"]) == ["color", "spatial"] and summary["settings"]["negative_prompt"] == "blurry"
    assert "accuracy" not in summary["overall"] and summary["overall"]["images"] == 6
    txt = tmp_path / "prompts.txt"
    txt.write_text("a red dog\n\na/b cat\n")
    assert [(p.text, p.metadata.get("tag", "all")) for p in ev.load_eval_prompts(str(txt))] == \
           [("a red dog", "all"), ("a/b cat", "all")]
    jobs = ev.build_jobs(ev.load_eval_prompts(str(txt)), ev.Args(images_per_prompt=1))
    assert [j.file for j in jobs] == ["all/samples/a red dog_00000.png", "all/samples/a b cat_00000.png"]


def test_changed_settings_in_an_existing_output_dir_are_refused(reference):
    with pytest.raises(SystemExit, match="steps"):
        cli(*SMALL, "--steps", "3", "--output-dir", reference)


BAD = [
    (ev.Args(model="sdxl"), "unknown model"),
    (ev.Args(reward="pickscor"), "unknown reward"),
    (ev.Args(prompts="/nonexistent/prompts.txt"), "--prompts"),
    (ev.Args(lora="/nonexistent/lora"), "--lora"),
    (ev.Args(transformer="/nonexistent/transformer"), "--transformer"),
    (ev.Args(images_per_prompt=0), "--images-per-prompt"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_arguments_fail_before_any_model_loads(args, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ev.validate(args)


def test_summary_leaves_unscored_images_out():
    from common.data import Prompt

    prompts = [Prompt("a", {"tag": "counting"}), Prompt("b", {"tag": "counting"}), Prompt("c", {"tag": "colors"})]
    rewards = {"shapes": [0.5, float("nan"), 1.0], "shapes_strict": [1.0, float("nan"), 0.0],
               "avg": [0.5, float("nan"), 1.0]}
    metrics = ev.summarize(prompts, rewards, "shapes_strict")
    assert metrics["eval/dropped"] == 1
    assert metrics["eval/reward_mean"] == 0.75 and metrics["eval/shapes_mean"] == 0.75
    assert metrics["eval/accuracy/counting"] == 1.0 and metrics["eval/accuracy/colors"] == 0.0
    assert metrics["eval/accuracy"] == 0.5
    assert "eval/dropped" not in ev.summarize(prompts[:1], {k: v[:1] for k, v in rewards.items()}, "shapes_strict")
