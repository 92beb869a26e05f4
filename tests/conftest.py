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


# tiny pipelines of every model family: tests/tiny_pipelines*.py each define SAVERS
# {model name: save(directory) -> directory}; one saved copy per model per session
TINY_MODULES = ("tests.tiny_pipelines_flux", "tests.tiny_pipelines_qwen", "tests.tiny_pipelines_wan")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_sd3_dir):
    import importlib

    saved = {"sd3": tiny_sd3_dir}

    def get(name):
        if name not in saved:
            for module in TINY_MODULES:
                savers = getattr(importlib.import_module(module), "SAVERS", {})
                if name in savers:
                    saved[name] = savers[name](tmp_path_factory.mktemp(f"tiny_{name}"))
                    break
            else:
                raise KeyError(f"no tiny pipeline for {name!r} in {TINY_MODULES}")
        return saved[name]

    return get
