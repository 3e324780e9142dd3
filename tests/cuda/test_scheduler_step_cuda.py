"""The ``cuda`` backend of the fused guidance + sampler step (csrc/scheduler_step.cu)
against the PyTorch reference backend: guided and unguided, every operand, clipping,
channels-last, in place, unaligned lengths (scalar path), the device coefficient table
advancing under CUDA-graph replay. GPU only; skipped with the reason when the CUDA path
cannot be built here."""

import math

import pytest
import torch

import mmfast
from mmfast.cuda import build
from mmfast.ops.scheduler_step import StepCoefficients, StepTable
from mmfast.testing import random_tensor

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
COEF = StepCoefficients(px=1.02, pm=-0.31, cx=0.5, cm=-0.12, c0=0.41, c1=-0.07, cn=0.03, clip=1.5)


@pytest.fixture(scope="module", autouse=True)
def _cuda_path():
    if torch.cuda.is_available() and not build.load(CUDA):
        pytest.skip(f"CUDA C++ path unavailable: {build.unavailable_reason(CUDA)}")


def _step(backend, shape, dtype, *, guided=True, coef=COEF, channels_last=False):
    torch.manual_seed(0)
    x = random_tensor(shape, dtype, CUDA)
    out_rows = 2 * shape[0] if guided else shape[0]
    model_output = random_tensor((out_rows, *shape[1:]), dtype, CUDA)
    prev_x0, noise = random_tensor(shape, dtype, CUDA), random_tensor(shape, dtype, CUDA)
    if channels_last:
        x, model_output, prev_x0, noise = (t.contiguous(memory_format=torch.channels_last)
                                           for t in (x, model_output, prev_x0, noise))
    x0_out = torch.full_like(x, float("nan"))
    prev = mmfast.ops.guided_step(x, model_output, coef, guidance_scale=7.5 if guided else None,
                                  prev_x0=prev_x0, noise=noise, x0_out=x0_out, backend=backend)
    return prev, x0_out


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 3, 7, 5)], ids=["aligned", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "plain"])
def test_matches_reference_backend(guided, dtype, shape):
    got = _step("cuda", shape, dtype, guided=guided)
    want = _step("torch", shape, dtype, guided=guided)
    for a, b in zip(got, want):
        # Both compute in float32 and round once; only contraction order may differ.
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


def test_channels_last_and_no_clip():
    coef = StepCoefficients(px=1.0, pm=-0.5, cx=0.9, cm=0.1, c0=0.2, clip=math.inf)
    for got, want in zip(_step("cuda", (2, 8, 6, 6), torch.float16, coef=coef, channels_last=True),
                         _step("torch", (2, 8, 6, 6), torch.float16, coef=coef, channels_last=True)):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_device_table_advances_under_graph_replay():
    rows = [StepCoefficients(cx=1.0, cm=-0.1 * (i + 1)) for i in range(3)]
    x = random_tensor((2, 4, 8, 8), torch.bfloat16, CUDA)
    eps = random_tensor((4, 4, 8, 8), torch.bfloat16, CUDA)
    expected = [mmfast.ops.guided_step(x, eps, r, guidance_scale=5.0, backend="torch") for r in rows]
    table = StepTable.build(rows, CUDA)
    out = torch.empty_like(x)
    mmfast.ops.guided_step(x, eps, table, guidance_scale=5.0, out=out, backend="cuda")  # row 0, eagerly
    torch.testing.assert_close(out, expected[0], rtol=1e-2, atol=1e-5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mmfast.ops.guided_step(x, eps, table, guidance_scale=5.0, out=out, backend="cuda")
    table.reset(1)
    for i in (1, 2):
        graph.replay()
        torch.testing.assert_close(out, expected[i], rtol=1e-2, atol=1e-5)


def test_refuses_what_it_cannot_take():
    x = random_tensor((1, 4, 4, 4), torch.float32, CUDA)
    eps = random_tensor((2, 4, 4, 4), torch.float16, CUDA)
    with pytest.raises(mmfast.NoBackendError, match="operands of different dtypes"):
        mmfast.ops.guided_step(x, eps, COEF, guidance_scale=2.0, backend="cuda")
    with pytest.raises(mmfast.NoBackendError, match="guidance rescale"):
        mmfast.ops.guided_step(x.half(), eps, COEF, guidance_scale=2.0, guidance_rescale=0.7, backend="cuda")


def sanitizer_smoke():
    """Small calls of every code path, for compute-sanitizer (scripts/gpu_check_csrc.sh)."""
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((2, 4, 16, 16), (1, 3, 7, 5)):
            for guided in (True, False):
                _step("cuda", shape, dtype, guided=guided)
    table = StepTable.build([COEF, COEF], CUDA)
    x = random_tensor((1, 4, 8, 8), torch.float16, CUDA)
    mmfast.ops.guided_step(x, x.repeat(2, 1, 1, 1), table, guidance_scale=3.0, backend="cuda")
    torch.cuda.synchronize()


if __name__ == "__main__":
    sanitizer_smoke()
    print("sanitizer smoke: done")
