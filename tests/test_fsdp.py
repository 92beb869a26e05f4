"""`--fsdp` (PyTorch FSDP2 `fully_shard`, common/distributed.py) with 2 CPU processes over gloo,
launched with the repository's accelerate config (configs/accelerate/cpu_2proc.yaml), for every
algorithm file, LoRA and full fine-tuning: both ranks draw the same prompts, the first micro-step
is on-policy (ratio 1), and the sharded run writes the files a replicated one does — its LoRA
equals a DDP run's with the same seed and data, flow_grpo's also a 1-process run's (it seeds every
sample's noise by its global index); resume continues bitwise; the toy and a real adapter's tiny
pipeline (sd3) shard their transformer blocks. Slow (each case is a 2-process launch)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import flow_grpo
from common.outputs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")]
GMM = ["--preset", "gmm", "--track", "none", "--max-minutes", "None", "--num-epochs", "2", "--eval-every", "0",
       "--group-size", "16", "--save-every", "1"]
PER_PROCESS = ["--batch-size", "32"]  # 2 processes x 32 = one process x 64
FILES = {"flow_grpo.py": [], "flow_grpo_fast.py": [],
         "grpo_guard.py": ["--batches-per-epoch", "2", "--updates-per-epoch", "2"], "flow_dpo.py": [],
         "flow_opd.py": None}
PPO = {"flow_grpo.py", "flow_grpo_fast.py", "grpo_guard.py", "flow_opd.py"}

pytestmark = pytest.mark.slow


def launch(script, out, *flags, processes=2):
    command = [*LAUNCH, script] if processes == 2 else [sys.executable, script]
    result = subprocess.run([*command, *flags, "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def lora(out):
    return load_file(str(out / "final" / "peft" / "adapter_model.safetensors"))


def max_difference(a, b):
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    flow_grpo.main(flow_grpo.parse_args([*GMM, *PER_PROCESS, "--num-epochs", "1", "--output-dir", str(out)]))
    return out


def file_flags(script, teacher):
    if FILES[script] is None:
        return ["--teachers", f"single={teacher}", f"multi={teacher}", "--init", "base"]
    return FILES[script]


def check_records(script, records, epochs=2):
    assert [r["epoch"] for r in records] == list(range(epochs))
    for record in records:
        assert record["dist/num_processes"] == 2 and record["dist/ranks_agree"] == 1.0
        assert record["dist/weights_agree"] == 1.0
    if script in PPO:
        assert records[0]["train/ratio_dev_max"] <= 1e-6


def test_sharded_flow_grpo_equals_replicated_and_one_process_and_resumes_bitwise(tmp_path):
    flags = [*GMM, *PER_PROCESS, "--no-filter-zero-std"]
    full = launch("flow_grpo.py", tmp_path / "full", *flags, "--fsdp")
    check_records("flow_grpo.py", full)
    launch("flow_grpo.py", tmp_path / "ddp", *flags)
    launch("flow_grpo.py", tmp_path / "one", *GMM, "--no-filter-zero-std", "--batch-size", "64", processes=1)
    moved = max(v.abs().max().item() for k, v in lora(tmp_path / "ddp").items() if "lora_B" in k)
    # LoRA gradients are accumulated locally and reduced once per update, as DDP does: bitwise equal
    # (reduce-scattering every micro-step instead sums in another order: 2.0e-6 after one update)
    assert moved > 1e-4 and max_difference(lora(tmp_path / "full"), lora(tmp_path / "ddp")) == 0.0
    # one process sums the whole batch's gradient in one backward: float rounding (DDP's: 5e-7)
    assert max_difference(lora(tmp_path / "full"), lora(tmp_path / "one")) <= 1e-5
    launch("flow_grpo.py", tmp_path / "split", *flags, "--fsdp", "--num-epochs", "1")
    resumed = launch("flow_grpo.py", tmp_path / "split", *flags, "--fsdp", "--resume", "latest")
    assert [r["reward/mean"] for r in resumed] == [r["reward/mean"] for r in full]
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in full]
    assert max_difference(lora(tmp_path / "split"), lora(tmp_path / "full")) == 0.0


@pytest.mark.parametrize("script", [s for s in FILES if s != "flow_grpo.py"])
def test_every_file_runs_sharded_with_the_replicated_result(tmp_path, script, teacher):
    """Each file's loop under --fsdp: same prompts on both ranks, on-policy first micro-step, and
    the LoRA a DDP run writes (flow_dpo's: its ref adapter is sharded too; flow_opd's: its teachers)."""
    flags = [*GMM, *PER_PROCESS, *file_flags(script, teacher)]
    check_records(script, launch(script, tmp_path / "fsdp", *flags, "--fsdp", "--num-epochs", "1"), epochs=1)
    launch(script, tmp_path / "ddp", *flags, "--num-epochs", "1")
    assert max_difference(lora(tmp_path / "fsdp"), lora(tmp_path / "ddp")) <= 1e-6
    # resume under --fsdp (the saved full state scattered back into the shards, the optimizer's too)
    # continues bitwise as the run that never stopped
    resumed = launch(script, tmp_path / "fsdp", *flags, "--fsdp", "--resume", "latest")
    straight = launch(script, tmp_path / "straight", *flags, "--fsdp")
    check_records(script, straight)
    logged = [k for k in straight[1] if k.startswith(("train/", "reward/")) and isinstance(straight[1][k], float)]
    assert logged and len(resumed) == len(straight) == 2
    assert all(a[k] == b[k] or a[k] != a[k] and b[k] != b[k] for a, b in zip(resumed, straight) for k in logged)
    assert max_difference(lora(tmp_path / "fsdp"), lora(tmp_path / "straight")) == 0.0


# flow_dpo: its frozen ref copy is sharded too; flow_opd trains a LoRA student only (its teachers are
# LoRAs on the same base), so it has no full fine-tuning
@pytest.mark.parametrize("script", ["flow_grpo.py", "flow_grpo_fast.py", "grpo_guard.py", "flow_dpo.py"])
def test_sharded_full_finetuning_equals_replicated(tmp_path, script, teacher):
    from common.gmm.model import GMMVelocityNet

    flags = [*GMM, *PER_PROCESS, "--num-epochs", "1", "--no-use-lora", "--learning-rate", "1e-4",
             *file_flags(script, teacher)]
    check_records(script, launch(script, tmp_path / "fsdp", *flags, "--fsdp"), epochs=1)
    launch(script, tmp_path / "ddp", *flags)
    sharded, replicated, base = (GMMVelocityNet.from_pretrained(path).state_dict() for path in (
        tmp_path / "fsdp" / "final" / "transformer", tmp_path / "ddp" / "final" / "transformer",
        ROOT / "common" / "gmm" / "weights" / "d2"))
    assert max_difference(replicated, base) > 1e-6  # it trained
    # full weights reduce-scatter every micro-step (memory), so the sums run in another order
    assert max_difference(sharded, replicated) <= 1e-5


@pytest.mark.parametrize("model", ["toy", "sd3"])
def test_sharded_transformer_blocks_of_the_toy_and_sd3(tmp_path, tiny_sd3_dir, model):
    from common.distributed import shard_units
    from common.models import load_adapter

    extra = [] if model == "toy" else ["--preset", "toy", "--model", "sd3", "--pretrained", str(tiny_sd3_dir),
                                       "--resolution", "64", "--reward", "jpeg_compressibility",
                                       "--lora-rank", "4", "--lora-alpha", "8"]
    assert len(shard_units(load_adapter(model, None if model == "toy" else str(tiny_sd3_dir)).transformer)) >= 2
    flags = ["--num-epochs", "1", "--batch-size", "4", "--group-size", "2", "--batches-per-epoch", "1",
             "--updates-per-epoch", "1", "--num-steps", "4", "--eval-every", "0", "--track", "none",
             "--no-filter-zero-std", *extra]
    check_records("flow_grpo.py", launch("flow_grpo.py", tmp_path / "fsdp", *flags, "--fsdp"), epochs=1)
    assert (tmp_path / "fsdp" / "final" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()


def test_fsdp_with_a_merged_export_fails_before_any_model_loads():
    args = flow_grpo.parse_args(["--fsdp", "--export-merged"])
    with pytest.raises(ValueError, match="--export-merged"):
        flow_grpo.validate(args)


@pytest.mark.parametrize("env,message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO stage 3.*--fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "ZeRO stage 2.*--fsdp"),
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP plugin.*--fsdp")])
@pytest.mark.parametrize("script", list(FILES))
def test_unsupported_launches_fail_in_validate_naming_what_to_launch(monkeypatch, script, env, message):
    """What `accelerate launch --use_deepspeed --zero_stage N` or `--use_fsdp` put in the environment
    is refused before any model loads, pointing at the tested path."""
    import importlib

    module = importlib.import_module(script[:-3])
    args = module.parse_args(["--preset", "gmm"] if script != "flow_opd.py" else ["--preset", "gmm", "--teachers",
                                                                                   "single=/x", "multi=/y"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        module.validate(args)


def test_every_accelerate_config_parses_as_its_launch_line_says():
    """The configs the README's launch lines use, read by accelerate's own loader; cpu_2proc.yaml is
    the one every test above launches with."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu.yaml": ("NO", 1, 1), "multi_gpu.yaml": ("MULTI_GPU", 1, 8),
                "multi_node.yaml": ("MULTI_GPU", 4, 32), "cpu_2proc.yaml": ("MULTI_GPU", 1, 2)}
    folder = ROOT / "configs" / "accelerate"
    assert {p.name for p in folder.glob("*.yaml")} == set(expected)
    for name, (kind, machines, processes) in expected.items():
        config = load_config_from_file(str(folder / name))
        assert (config.distributed_type.value, config.num_machines, config.num_processes) == (kind, machines, processes)
