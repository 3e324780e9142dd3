"""Launch helpers of mmfast.kernels: test-time output poisoning and single-config tuning."""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from mmfast.kernels import _launch, _tuning  # noqa: E402


def test_outputs_are_poisoned_under_test():
    # tests/conftest.py sets MMFAST_POISON_OUTPUTS=1 before mmfast.kernels is imported.
    assert _launch.POISON_OUTPUTS
    out = _launch.empty((3, 5), dtype=torch.float16, device=torch.device("cpu"))
    assert out.isnan().all()


def test_integer_outputs_are_not_poisoned(monkeypatch):
    out = _launch.empty((4,), dtype=torch.int32, device=torch.device("cpu"))
    assert out.shape == (4,) and out.dtype == torch.int32


def _double(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)


def test_autotune_collapses_to_first_config(monkeypatch, device):
    configs = [triton.Config({"BLOCK": 32}), triton.Config({"BLOCK": 64})]
    monkeypatch.setenv("MMFAST_AUTOTUNE", "0")
    kernel = _tuning.autotune(configs, key=["n"])(triton.jit(_double))
    assert [c.kwargs for c in kernel.configs] == [{"BLOCK": 32}]
    x = torch.arange(40, dtype=torch.float32, device=device)
    kernel[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, 40)
    assert torch.equal(x.cpu(), 2 * torch.arange(40, dtype=torch.float32))

    monkeypatch.setenv("MMFAST_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert len(_tuning.autotune(configs, key=["n"])(triton.jit(_double)).configs) == 2
    # The interpreter has no device to time configs on: one config, whatever the switch.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(_tuning.autotune(configs, key=["n"])(triton.jit(_double)).configs) == 1
    with pytest.raises(ValueError, match="configs: at least one"):
        _tuning.autotune([], key=["n"])


def test_cpu_program_count_is_small():
    assert 1 <= _launch.multiprocessor_count(torch.device("cpu")) <= 8
    assert math.isfinite(_launch.multiprocessor_count(torch.device("cpu")))
