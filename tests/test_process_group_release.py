"""`common.distributed.release_process_groups`: at exit, a destroyed process group must really be
freed (its gloo threads stopped) before interpreter teardown. DTensor's caches keep the groups of
every mesh they saw; freed during teardown instead, a rank now and then aborted after writing its
outputs (2 of ~6 CI runs of the 2-process --fsdp tests). Each case runs in its own process: a
1-process gloo group, DTensor ops to fill the caches, then destroy_process_group."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.distributed import OUTLIVED

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = textwrap.dedent("""
    import gc, sys
    import torch
    import torch.distributed as dist
    from common.distributed import gloo_threads, release_process_groups

    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    x = distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)])
    (x @ x.T).full_tensor()  # sharding propagation and a redistribution: both cached
    keep = [dist.group.WORLD] if sys.argv[1] == "keep" else []
    del x, mesh
    dist.destroy_process_group()
    gc.collect()
    print("after destroy:", len(gloo_threads()))
    if sys.argv[1] != "no-release":
        release_process_groups()
    print("after release:", len(gloo_threads()))
""")


def run(mode, tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path / "store")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts native threads through /proc (Linux)")
def test_destroyed_group_outlives_destroy_through_dtensor_caches_and_release_frees_it(tmp_path):
    released = run("release", tmp_path)
    # destroy_process_group alone leaves the group and its threads alive (the caches hold it) ...
    assert "after destroy: 0" not in released.stdout
    # ... until release_process_groups drops the caches' references
    assert "after release: 0" in released.stdout and OUTLIVED not in released.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts native threads through /proc (Linux)")
def test_a_group_still_referenced_is_reported(tmp_path):
    kept = run("keep", tmp_path)
    assert "after release: 0" not in kept.stdout and OUTLIVED in kept.stderr
