"""Group sampler, EMA schedule, checkpoint rotation/atomicity, metrics log."""

import json

import pytest
import torch

from common.checkpoint import checkpoint_dirs, load_checkpoint, resolve_resume, save_checkpoint
from common.data import GroupSampler
from common.ema import EMA
from common.outputs import MetricsLog, read_metrics


def test_group_sampler_keeps_groups_whole_across_ranks():
    world, batch, group = 3, 4, 6
    samplers = [GroupSampler(50, batch, group, world, rank, seed=1) for rank in range(world)]
    for epoch in range(5):
        for s in samplers:
            s.set_epoch(epoch)
        views = [s.global_indices() for s in samplers]
        assert all(v == views[0] for v in views)  # every rank agrees on the global draw
        gathered = sum((s.indices() for s in samplers), [])
        assert gathered == views[0]
        counts = torch.bincount(torch.tensor(gathered))
        assert set(counts[counts > 0].tolist()) == {group} and len(gathered) == world * batch
    with pytest.raises(ValueError, match="must divide"):
        GroupSampler(50, 4, 3, 1, 0)


def test_ema_follows_the_published_schedule():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], max_decay=0.9, update_every=2)
    param.data.fill_(1.0)
    ema.step(0)  # (0 + 1) % 2 != 0: no update
    assert torch.equal(ema.shadow[0], torch.zeros(3))
    ema.step(1)  # decay min(0.9, 2/11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 2 / 11))
    with ema.swapped():
        assert torch.allclose(param.data, torch.full((3,), 1 - 2 / 11))
    assert torch.equal(param.data, torch.ones(3))
    assert ema.decay(1000) == 0.9


def test_checkpoints_rotate_and_a_partial_write_is_ignored(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"epoch": step, "w": torch.full((2,), float(step))}, keep_last=2)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["checkpoint-000002", "checkpoint-000003"]
    # a crash mid-save leaves a directory without the COMPLETE marker: never chosen
    (tmp_path / "checkpoint-000004").mkdir()
    (tmp_path / "checkpoint-000004" / "state.pt").write_bytes(b"truncated")
    latest = resolve_resume("latest", tmp_path)
    assert latest.name == "checkpoint-000003" and load_checkpoint(latest)["epoch"] == 3
    assert resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        resolve_resume(str(tmp_path / "checkpoint-000004"), tmp_path)


def test_metrics_log_truncates_to_the_resume_epoch(tmp_path):
    log = MetricsLog(tmp_path)
    for epoch in range(4):
        log.log(epoch, {"reward/mean": float(epoch), "eval/x": float("nan")})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["eval/x"] is None  # NaN is written as null
    MetricsLog(tmp_path, resume_epoch=2)
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
    MetricsLog(tmp_path)  # a fresh (non-resumed) run starts a new file
    assert not (tmp_path / "metrics.jsonl").exists()
    json.dumps({})


def test_category_weights_balance_draws():
    from common.data import Prompt, category_weights

    prompts = [Prompt(f"p{i}", {"tag": "big"}) for i in range(90)] + [Prompt(f"q{i}", {"tag": "small"}) for i in range(10)]
    sampler = GroupSampler(len(prompts), 8, 4, 1, 0, seed=3, weights=category_weights(prompts))
    small = 0
    for epoch in range(400):
        sampler.set_epoch(epoch)
        small += sum(i >= 90 for i in dict.fromkeys(sampler.global_indices()))
    # 2 prompts per draw, 800 in all; uniform sampling would give ~80 from "small", balanced ~400
    assert 340 < small < 460
