import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# NOTE: the CPU tests run single-threaded: on a small, busy machine torch's default thread pool
# oversubscribes the cores and single files slow down by an order of magnitude or more.
# DGEMMA_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("DGEMMA_TEST_THREADS", "1")))


def _cuda_ready() -> str | None:
    from dgemma import _ext

    return _ext.cuda_status()


def pytest_collection_modifyitems(config, items):
    reason = _cuda_ready()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(path, transformers model) for an architecture and dtype, built once per session."""
    from hf_checkpoints import save_hf_checkpoint

    made = {}

    def get(arch: str, dtype=torch.float32, max_shard_size=None):
        key = (arch, dtype, max_shard_size)
        if key not in made:
            path = tmp_path_factory.mktemp(f"hf_{arch}")
            save_hf_checkpoint(arch, path, dtype=dtype, max_shard_size=max_shard_size)
            made[key] = path
        return made[key]

    return get


def load_hf(path, dtype):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    ).eval()
