import os
import sys
from pathlib import Path

import pytest
import torch

# the repository root holds `common/` and the algorithm files (they are not installed)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("CLEANFLOW_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from tests.tiny_pipelines import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))
