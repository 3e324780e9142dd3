"""Test-wide setup: the same tests run on CPU (Triton under its interpreter, small
shapes) and on CUDA when a GPU is present.

The environment is set here, before any test imports mmfast.kernels, because Triton
reads TRITON_INTERPRET when a kernel is defined and mmfast.kernels reads the poisoning
and autotuning switches at import.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Outputs start as NaN, so an element a kernel forgets to write fails the comparison.
os.environ.setdefault("MMFAST_POISON_OUTPUTS", "1")
# One autotune config: reproducible and quick.
os.environ.setdefault("MMFAST_AUTOTUNE", "0")

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets its share of
# the cores: torch's default of one thread per core in every worker oversubscribes them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_addoption(parser):
    parser.addoption("--device", default=None, choices=("cpu", "cuda"),
                     help="device the tests run on (default: cuda when available, else cpu)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device") or ("cuda" if HAS_CUDA else "cpu")
    if name == "cuda" and not HAS_CUDA:
        pytest.skip("--device cuda given but no CUDA device is present")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
