"""The ``cuda`` backend of GroupNorm (+SiLU) (csrc/group_norm_silu.cu) through the checks
of the Triton backend (tests/ops/test_group_norm.py): float64 reference with the
flash-attention rule for the output and all gradients, NCHW and channels-last, aligned and
unaligned extents, UNet sizes, torch.compile and CUDA graphs, reproducible parameter
gradients. GPU only; skipped with the reason when the CUDA path cannot be built here."""

import pytest
import torch

import mmfast
from mmfast.cuda import build
from mmfast.ops.group_norm import group_norm_reference
from mmfast.testing import random_tensor
from tests.ops.test_group_norm import CASES, _case_id, _check, _inputs

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def _cuda_path():
    if torch.cuda.is_available() and not build.load(CUDA):
        pytest.skip(f"CUDA C++ path unavailable: {build.unavailable_reason(CUDA)}")


# Beyond the Triton cases: packs that are 16-byte aligned (S % 8 == 0, Cg % 8 == 0) in
# both layouts, a 2-d input (no spatial extent), and a spatial extent with no vector path.
EXTRA = [
    ((2, 64, 8, 16), 8, False, torch.bfloat16, "silu"),
    ((2, 64, 8, 16), 8, True, torch.bfloat16, "silu"),
    ((3, 32), 4, False, torch.float32, "silu"),
    ((1, 16, 1, 1), 4, True, torch.float16, None),
]


@pytest.mark.parametrize("case", CASES + EXTRA, ids=_case_id)
def test_matches_reference(case):
    shape, groups, channels_last, dtype, activation = case
    _check(_inputs(shape, groups, dtype, CUDA, channels_last, activation), "cuda")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unet_shapes(dtype, channels_last):
    for shape in ((2, 320, 64, 64), (2, 2560, 8, 8), (2, 1920, 16, 16)):
        _check(_inputs(shape, 32, dtype, CUDA, channels_last), "cuda")


def test_dy_in_another_layout_than_x():
    inputs = _inputs((2, 16, 6, 10), 4, torch.float32, CUDA, channels_last=True)
    x = inputs["x"].requires_grad_()
    y = mmfast.ops.group_norm(x, 4, inputs["weight"], inputs["bias"], 1e-5, "silu", backend="cuda")
    dy = random_tensor(y.shape, torch.float32, CUDA)  # NCHW while x is channels-last
    (dx,) = torch.autograd.grad(y, x, dy)
    x_ref = inputs["x"].detach().double().requires_grad_()
    y_ref = group_norm_reference(x_ref, 4, inputs["weight"].double(), inputs["bias"].double(), 1e-5, "silu")
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, dy.double())
    torch.testing.assert_close(dx, dx_ref.float(), rtol=1e-4, atol=1e-4)


def test_parameter_gradients_are_bitwise_reproducible():
    inputs = _inputs((2, 320, 32, 32), 32, torch.bfloat16, CUDA, channels_last=True)
    grads = []
    for _ in range(2):
        w = inputs["weight"].clone().requires_grad_()
        y = mmfast.ops.group_norm(inputs["x"], 32, w, inputs["bias"], 1e-5, "silu", backend="cuda")
        y.float().square().sum().backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_compiles_and_captures():
    x = random_tensor((2, 64, 16, 16), torch.float16, CUDA).contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(64, device=CUDA, dtype=torch.float16), torch.zeros(64, device=CUDA, dtype=torch.float16)

    def run(t):
        return mmfast.ops.group_norm(t, 32, w, b, 1e-6, "silu", backend="cuda")

    expected = group_norm_reference(x, 32, w, b, 1e-6, "silu")
    run(x)  # eager first: probes the CUDA path outside the trace
    torch.testing.assert_close(torch.compile(run, fullgraph=True)(x), expected, rtol=2e-3, atol=2e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run(x)
    graph.replay()
    torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_refuses_what_it_cannot_take():
    x = torch.randn(1, 512, 4, 4, device=CUDA, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with pytest.raises(mmfast.NoBackendError, match="channels-last groups of more than 256 channels"):
        mmfast.ops.group_norm(x, 1, backend="cuda")
    w32 = torch.ones(8, device=CUDA)
    with pytest.raises(mmfast.NoBackendError, match="weight and bias must have the dtype of x"):
        mmfast.ops.group_norm(torch.randn(1, 8, 4, device=CUDA, dtype=torch.bfloat16), 2, w32, backend="cuda")


def sanitizer_smoke():
    """Small calls of every code path, for compute-sanitizer (scripts/gpu_check_csrc.sh)."""
    for case in CASES + EXTRA:
        shape, groups, channels_last, dtype, activation = case
        inputs = _inputs(shape, groups, dtype, CUDA, channels_last, activation)
        x = inputs["x"].requires_grad_()
        w = inputs["weight"].requires_grad_()
        y = mmfast.ops.group_norm(x, groups, w, inputs["bias"], 1e-5, activation, backend="cuda")
        y.float().square().sum().backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    sanitizer_smoke()
    print("sanitizer smoke: done")
