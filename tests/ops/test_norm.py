"""RMSNorm / LayerNorm: every backend against the float64 reference, outputs and all
gradients, with the flash-attention rule; awkward shapes; argument errors; compile."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmfast
from mmfast.ops.norm import norm_reference
from mmfast.testing import assert_matches_reference, random_tensor

BACKENDS = ["triton", "native", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims..., hidden): a single element, head-dim-like widths, primes, one row per
# program and many rows per program, a row that is not a power of two, no rows at all.
SHAPES = [(1, 1), (3, 7, 80), (5, 72), (2, 3, 129), (300, 33), (2, 1280), (3, 4099), (0, 64)]


def _op(is_rms, backend):
    def run(x, weight, bias, residual, eps):
        if is_rms:
            return mmfast.ops.rms_norm(x, weight, eps, residual=residual, backend=backend)
        return mmfast.ops.layer_norm(x, weight, bias, eps, residual=residual, backend=backend)
    return run


def _reference(is_rms):
    def run(x, weight, bias, residual, eps):
        y, h = norm_reference(x, weight, bias, residual, eps, is_rms)
        return y if residual is None else (y, h)
    return run


def _inputs(shape, dtype, device, *, is_rms, residual, affine=True, bias=True):
    n = shape[-1]
    return {
        "x": random_tensor(shape, dtype, device, scale=2.0, offset=0.5),
        "weight": random_tensor((n,), dtype, device, scale=0.5, offset=1.0) if affine else None,
        "bias": random_tensor((n,), dtype, device, scale=0.5) if affine and bias and not is_rms else None,
        "residual": random_tensor(shape, dtype, device) if residual else None,
        "eps": 1e-5,
    }


def _check(inputs, is_rms, backend):
    grads = tuple(k for k in ("x", "weight", "bias", "residual") if inputs[k] is not None)
    rows = inputs["x"].numel() // max(1, inputs["x"].shape[-1])
    assert_matches_reference(_op(is_rms, backend), _reference(is_rms), inputs, grad_inputs=grads,
                             summed_over={"grad of weight": rows, "grad of bias": rows})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_matches_reference(is_rms, dtype, shape, residual, backend, device):
    inputs = _inputs(shape, dtype, device, is_rms=is_rms, residual=residual)
    if backend == "native" and not is_rms and shape[-1] == 1:
        # F.layer_norm's backward leaves rounding noise where the gradient of x is exactly 0
        with pytest.raises(mmfast.NoBackendError, match="LayerNorm over 1 element"):
            _op(is_rms, backend)(**inputs)
        return
    _check(inputs, is_rms, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)], ids=["no-affine", "no-bias"])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_without_parameters(is_rms, affine, bias, backend, device):
    inputs = _inputs((4, 7, 96), torch.float16, device, is_rms=is_rms, residual=True, affine=affine, bias=bias)
    _check(inputs, is_rms, backend)


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_float64_goes_to_the_reference(is_rms, device):
    inputs = _inputs((3, 40), torch.float64, device, is_rms=is_rms, residual=True)
    y, h = _op(is_rms, None)(**inputs)
    y_ref, h_ref = _reference(is_rms)(**inputs)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_strided_inputs(is_rms, device):
    # A transposed x and a residual sliced out of a wider tensor: rows are not contiguous.
    x = random_tensor((48, 6), torch.float32, device).t()
    wide = random_tensor((6, 100), torch.float32, device)
    inputs = {"x": x, "weight": random_tensor((48,), torch.float32, device, offset=1.0),
              "bias": None if is_rms else random_tensor((48,), torch.float32, device),
              "residual": wide[:, 10:58], "eps": 1e-6}
    _check(inputs, is_rms, "triton")


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_only_residual_stream_used(is_rms, device):
    # Backward then gets no gradient for y: the residual input still gets one.
    inputs = _inputs((5, 64), torch.float32, device, is_rms=is_rms, residual=True)
    grads = []
    for backend in BACKENDS:
        x = inputs["x"].clone().requires_grad_()
        _, h = _op(is_rms, backend)(**{**inputs, "x": x})
        (h * 3.0).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


# Derandomised: the same examples on every machine, so CI cannot flake.
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(0, 70), hidden=st.integers(1, 300), is_rms=st.booleans(),
       residual=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_random_shapes(rows, hidden, is_rms, residual, dtype, device):
    _check(_inputs((rows, hidden), dtype, device, is_rms=is_rms, residual=residual), is_rms, "triton")


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_compile_fullgraph(is_rms, device):
    def block(x, weight, bias, residual):
        y, h = _op(is_rms, "triton")(x, weight, bias, residual, 1e-6)
        return torch.tanh(y) * 2 + h

    inputs = _inputs((4, 9, 80), torch.float32, device, is_rms=is_rms, residual=True)
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


# ---- argument errors -------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    ({"x": torch.ones(4, 8, dtype=torch.int32)}, TypeError, "x: expected a floating dtype"),
    ({"x": torch.tensor(1.0)}, ValueError, "x: expected at least one dimension"),
    ({"weight": torch.ones(7)}, ValueError, r"weight: expected shape \(8,\)"),
    ({"weight": torch.ones(8, dtype=torch.int64)}, TypeError, "weight: expected a floating dtype"),
    ({"weight": torch.ones(8, device="meta")}, ValueError, "weight: expected device cpu"),
    ({"bias": torch.ones(4, 8)}, ValueError, r"bias: expected shape \(8,\)"),
    ({"residual": torch.ones(4, 9)}, ValueError, "residual: expected shape"),
    ({"residual": torch.ones(4, 8, dtype=torch.float16)}, ValueError, "residual: expected shape .* dtype"),
    ({"eps": -1.0}, ValueError, "eps: expected a finite number"),
    ({"eps": float("nan")}, ValueError, "eps: expected a finite number"),
    ({"eps": "1e-5"}, ValueError, "eps: expected a finite number"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = {"x": torch.ones(4, 8), "weight": torch.ones(8), "bias": torch.ones(8),
            "residual": None, "eps": 1e-5, **kwargs}
    with pytest.raises(error, match=match):
        mmfast.ops.layer_norm(**args)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_rows_wider_than_a_block_are_looped(is_rms, residual, affine, device, monkeypatch):
    # Rows wider than MAX_BLOCK_N (16384; 8192 backward) take the looped kernels (whole
    # rows that wide in registers spilled on sm_90a); a small limit sends small rows there:
    # several chunks, a ragged last one, and more rows than programs in the backward.
    from mmfast.kernels import norm as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_N", 32)
    monkeypatch.setattr(kernels, "MAX_BLOCK_N_BWD", 32)
    launched = []
    for name in ("_norm_fwd_looped_kernel", "_norm_bwd_looped_kernel"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, _Spy(kernel, launched, name))
    inputs = _inputs((9, 77), torch.float16, device, is_rms=is_rms, residual=residual, affine=affine)
    _check(inputs, is_rms, "triton")
    assert launched == ["_norm_fwd_looped_kernel", "_norm_bwd_looped_kernel"]


class _Spy:
    """A kernel that notes its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel, launched, name):
        self.kernel, self.launched, self.name = kernel, launched, name

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_triton_refuses_rows_too_wide():
    x = torch.ones(1, 65537)
    with pytest.raises(mmfast.NoBackendError, match="hidden size 65537 > 65536"):
        mmfast.ops.rms_norm(x, backend="triton")


# ---- GPU-only: real sizes, CUDA graphs ---------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", [(4096, 1280), (2048, 4096), (1024, 8192), (16, 65536)])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "layer"])
def test_real_sizes_bf16(is_rms, rows, hidden):
    inputs = _inputs((rows, hidden), torch.bfloat16, torch.device("cuda"), is_rms=is_rms, residual=True)
    _check(inputs, is_rms, "triton")


@pytest.mark.gpu
def test_captured_in_cuda_graph():
    # No host synchronisation inside the op: capture forward and backward, replay, compare.
    inputs = _inputs((256, 1024), torch.bfloat16, torch.device("cuda"), is_rms=False, residual=True)
    x = inputs["x"].requires_grad_()
    run = _op(False, "triton")

    def step():
        y, h = run(x, inputs["weight"], inputs["bias"], inputs["residual"], 1e-5)
        (y.float().square().sum() + h.float().sum()).backward()
        return y

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
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
