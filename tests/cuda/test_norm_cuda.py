"""The ``cuda`` backend of RMSNorm / LayerNorm (csrc/norm.cu) through the same checks as
the Triton backend (tests/ops/test_norm.py): float64 reference with the flash-attention
rule for outputs and all gradients, NaN-poisoned outputs, awkward sizes (aligned and
unaligned rows take different code paths), strided inputs, torch.compile, CUDA graphs,
bitwise-reproducible weight gradients. GPU only; skipped with the reason when the CUDA
path cannot be built here."""

import pytest
import torch

import mmfast
from mmfast.cuda import build
from mmfast.testing import random_tensor
from tests.ops.test_norm import DTYPES, SHAPES, _check, _inputs, _op

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def _cuda_path():
    if torch.cuda.is_available() and not build.load(CUDA):
        pytest.skip(f"CUDA C++ path unavailable: {build.unavailable_reason(CUDA)}")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES + [(7, 8192), (3, 8191)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_matches_reference(is_rms, dtype, shape, residual):
    _check(_inputs(shape, dtype, CUDA, is_rms=is_rms, residual=residual), is_rms, "cuda")


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)], ids=["no-affine", "no-bias"])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_without_parameters(is_rms, affine, bias):
    inputs = _inputs((4, 7, 96), torch.float16, CUDA, is_rms=is_rms, residual=True, affine=affine, bias=bias)
    _check(inputs, is_rms, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_strided_and_unaligned_rows(is_rms, dtype):
    # x transposed (made contiguous by the op); the residual a slice of a wider tensor:
    # row stride 100, base 10 elements in, so not 16-byte aligned: the scalar path.
    x = random_tensor((48, 6), dtype, CUDA).t()
    wide = random_tensor((6, 100), dtype, CUDA)
    inputs = {"x": x, "weight": random_tensor((48,), dtype, CUDA, offset=1.0),
              "bias": None if is_rms else random_tensor((48,), dtype, CUDA),
              "residual": wide[:, 10:58], "eps": 1e-6}
    _check(inputs, is_rms, "cuda")


@pytest.mark.parametrize("rows,hidden", [(4096, 1280), (2048, 4096), (1024, 8192), (8192, 64)])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_real_sizes_bf16(is_rms, rows, hidden):
    _check(_inputs((rows, hidden), torch.bfloat16, CUDA, is_rms=is_rms, residual=True), is_rms, "cuda")


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_weight_gradient_is_bitwise_reproducible(is_rms):
    inputs = _inputs((3000, 1024), torch.bfloat16, CUDA, is_rms=is_rms, residual=True)
    grads = []
    for _ in range(2):
        weight = inputs["weight"].clone().requires_grad_()
        y, _ = _op(is_rms, "cuda")(**{**inputs, "weight": weight})
        y.float().square().sum().backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_only_residual_stream_used(is_rms):
    inputs = _inputs((5, 64), torch.float32, CUDA, is_rms=is_rms, residual=True)
    grads = []
    for backend in ("cuda", "torch"):
        x = inputs["x"].clone().requires_grad_()
        _, h = _op(is_rms, backend)(**{**inputs, "x": x})
        (h * 3.0).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_compile_fullgraph(is_rms):
    def block(x, weight, bias, residual):
        y, h = _op(is_rms, "cuda")(x, weight, bias, residual, 1e-6)
        return torch.tanh(y) * 2 + h

    inputs = _inputs((4, 9, 80), torch.float32, CUDA, is_rms=is_rms, residual=True)
    del inputs["eps"]
    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = {k: v.clone().requires_grad_() if v is not None else None for k, v in inputs.items()}
        out = fn(**leaves)
        out.backward(torch.ones_like(out))
        results.append([out] + [v.grad for v in leaves.values() if v is not None])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


def test_captured_in_cuda_graph():
    inputs = _inputs((256, 1024), torch.bfloat16, CUDA, is_rms=False, residual=True)
    x = inputs["x"].requires_grad_()
    run = _op(False, "cuda")

    def step():
        y, h = run(x, inputs["weight"], inputs["bias"], inputs["residual"], 1e-5)
        (y.float().square().sum() + h.float().sum()).backward()
        return y

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = step()
    graph.replay()
    expected_grad = x.grad.clone()
    x.grad = None
    y_eager = step()
    torch.testing.assert_close(y_graph, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(expected_grad, x.grad, rtol=0, atol=0)


def test_refuses_what_it_cannot_take():
    x = torch.ones(2, 8200, device=CUDA, dtype=torch.bfloat16)
    with pytest.raises(mmfast.NoBackendError, match="hidden size 8200 > 8192"):
        mmfast.ops.rms_norm(x, backend="cuda")
    w32 = torch.ones(64, device=CUDA)
    with pytest.raises(mmfast.NoBackendError, match="weight and bias must have the dtype of x"):
        mmfast.ops.rms_norm(torch.ones(2, 64, device=CUDA, dtype=torch.bfloat16), w32, backend="cuda")


def sanitizer_smoke():
    """Small calls of every code path, for compute-sanitizer (scripts/gpu_check_csrc.sh)."""
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((5, 72), (3, 129), (2, 1280), (33, 8)):
            for is_rms in (True, False):
                inputs = _inputs(shape, dtype, CUDA, is_rms=is_rms, residual=True)
                x = inputs["x"].requires_grad_()
                weight = inputs["weight"].requires_grad_()
                y, h = _op(is_rms, "cuda")(**{**inputs, "x": x, "weight": weight})
                (y.float().square().sum() + h.float().sum()).backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    sanitizer_smoke()
    print("sanitizer smoke: done")
