"""flow_dpo.py end to end on the toy model, one smoke run per mode (DPO, OnlineDPO, SFT,
OnlineSFT, full fine-tuning): finite losses, the artifacts, a learner that moved, a ref that equals
the learner right after a refresh and differs between refreshes; bitwise resume; bad input."""

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import flow_dpo
from common.checkpoint import load_checkpoint
from common.outputs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
# 2 prompts x 2 images per epoch, 1 optimizer step per epoch (2 micro-batches x 2 noise draws)
TINY = ["--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "2", "--updates-per-epoch", "1",
        "--timestep-samples", "2", "--eval-every", "0", "--track", "none", "--num-steps", "2", "--save-every", "1",
        "--keep-checkpoints", "3", "--learning-rate", "1e-2"]


def run(tmp_path, *extra, name="run"):
    args = flow_dpo.parse_args([*TINY, "--output-dir", str(tmp_path / name), *extra])
    out = flow_dpo.main(args)
    return read_metrics(Path(out) / "metrics.jsonl"), Path(out)


MODES = [("dpo", "None"), ("dpo", "2"), ("sft", "None"), ("sft", "2")]


@pytest.mark.parametrize("algorithm,ref_update_every", MODES)
def test_smoke_per_mode(tmp_path, algorithm, ref_update_every):
    extra = ["--beta", "0.5"] if algorithm == "sft" else []  # the sft run exercises the KL to the base
    records, out = run(tmp_path, "--algorithm", algorithm, "--ref-update-every", ref_update_every,
                       "--num-epochs", "3", *extra)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in records)
    keys = ["dpo/implicit_acc", "dpo/winner_err", "dpo/loser_err", "dpo/winner_diff", "dpo/loser_diff"] \
        if algorithm == "dpo" else ["sft/fm_loss", "train/kl"]
    for key in ["reward/mean", "reward/std", "perf/epoch_s", "perf/images_per_s", *keys]:
        assert all(r[key] is not None and math.isfinite(r[key]) for r in records), key
    for path in ["metrics.jsonl", "reward_curve.png", "checkpoint-000001/COMPLETE", "checkpoint-000003/COMPLETE",
                 "final/diffusers/pytorch_lora_weights.safetensors", "final/peft/adapter_model.safetensors",
                 "final/peft/adapter_config.json"]:
        assert (out / path).exists(), path
    states = {e: load_checkpoint(out / f"checkpoint-{e:06d}") for e in (1, 2, 3)}
    init_b = {n: v for n, v in states[1]["ref"].items() if "lora_B" in n}  # the ref of epoch 1 is the init
    assert all(v.abs().max() == 0 for v in init_b.values())  # peft's init: B = 0

    def differs(state):
        return max((state["trainable"][n] - state["ref"][n]).abs().max().item() for n in state["ref"])

    # the learner moved away from its init (LoRA B was 0) and from the ref in the first epoch
    assert max(states[3]["trainable"][n].abs().max().item() for n in init_b) > 0
    assert differs(states[1]) > 0
    if ref_update_every == "None":  # offline: the ref stays the base forever
        assert [r["ref/refreshes"] for r in records] == [0, 0, 0]
        for n, v in states[3]["ref"].items():
            assert torch.equal(v, states[1]["ref"][n])
    else:  # refresh after optimizer step 2 (end of epoch 1): equal right after, different after step 3
        assert [r["ref/refreshes"] for r in records] == [0, 1, 1]
        assert records[1]["ref/diff_after_refresh"] == 0.0 and records[1]["ref/max_diff"] == 0.0
        assert differs(states[2]) == 0.0
        assert differs(states[3]) > 0 and records[2]["ref/max_diff"] > 0
    if algorithm == "dpo":
        # epoch 0 trains from learner == ref == base: every micro-step has z = 0, loss log 2 exactly;
        # the same holds for the epoch right after a refresh (one optimizer step per epoch)
        assert records[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert records[0]["dpo/z_mean"] == 0.0
        if ref_update_every != "None":
            assert records[2]["train/loss"] == pytest.approx(math.log(2), abs=1e-7)
        else:
            assert records[2]["train/loss"] != pytest.approx(math.log(2), abs=1e-7)


def test_full_finetuning_online_dpo(tmp_path):
    records, out = run(tmp_path, "--no-use-lora", "--learning-rate", "1e-4", "--ref-update-every", "2",
                       "--num-epochs", "3")
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert records[1]["ref/diff_after_refresh"] == 0.0 and records[2]["ref/max_diff"] > 0
    assert (out / "final" / "transformer" / "config.json").exists()


def test_resume_is_bitwise_exact(tmp_path):
    common = ["--ref-update-every", "2", "--eval-every", "2", "--eval-images-per-category", "1", "--eval-num-steps", "2"]
    full, _ = run(tmp_path, *common, "--num-epochs", "3", name="full")
    run(tmp_path, *common, "--num-epochs", "2", name="split")
    resumed, _ = run(tmp_path, *common, "--num-epochs", "3", "--resume", "latest", name="split")
    assert len(full) == len(resumed) == 4  # 3 epochs + the final evaluation
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == \
               {k: v for k, v in b.items() if not k.startswith("perf/")}


BAD = [
    (["--group-size", "1"], "--group-size"),
    (["--ref-update-every", "0"], "--ref-update-every"),
    (["--algorithm", "dpo", "--beta", "0"], "--beta"),
    (["--updates-per-epoch", "3", "--batches-per-epoch", "4"], "--updates-per-epoch"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_arguments_fail_validation_with_a_message(argv, message):
    start = time.time()
    with pytest.raises(ValueError, match=message):
        flow_dpo.validate(flow_dpo.parse_args(argv))
    assert time.time() - start < 5


def test_bad_arguments_fail_fast_on_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "flow_dpo.py", "--output-dir", str(tmp_path / "bad"), "--group-size",
                             "3", "--batch-size", "4"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "error: --group-size 3 must divide" in result.stderr
    assert not (tmp_path / "bad").exists()  # nothing started


def test_presets_parse_and_validate():
    for name in flow_dpo.PRESETS:
        args = flow_dpo.parse_args(["--preset", name, "--prompts", "toy", "--model", "toy"])
        checked = flow_dpo.validate(args)
        assert checked.grad_accumulation == (args.batches_per_epoch // args.updates_per_epoch) * args.timestep_samples
    assert flow_dpo.PRESETS["sd3_online_dpo"].beta == 100.0 and flow_dpo.PRESETS["sd3_online_dpo"].timestep_samples == 39
    assert flow_dpo.PRESETS["sd3_dpo"].ref_update_every is None and flow_dpo.PRESETS["sd3_sft"].timestep_samples == 1
    assert np.isclose(flow_dpo.PRESETS["sd3_online_sft"].learning_rate, 3e-4)
