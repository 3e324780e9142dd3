"""Activations (GELU erf/tanh, QuickGELU) and gated activations (SwiGLU, GeGLU, two
tensors or one split in halves): every backend against the float64 reference, outputs and
gradients, with the flash-attention rule; conventions against torch and diffusers;
argument errors; compile."""

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.ops.activation import activation_reference, gated_reference
from mmfast.testing import assert_matches_reference, random_tensor

BACKENDS = ["triton", "native", "torch"]
# (dtype, shape): every dtype; any leading shape: one element, odd widths, several rows
# per program, a width wider than one tile of the gated kernel, no elements at all.
CASES = [
    (torch.float32, (1,)), (torch.float16, (3, 7, 80)), (torch.bfloat16, (33, 129)),
    (torch.float32, (2, 1100)), (torch.bfloat16, (0, 16)),
]
CASE_IDS = [f"{str(d).removeprefix('torch.')}-{'x'.join(map(str, s))}" for d, s in CASES]
# The torch backend is the reference itself: one case checks that dispatch reaches it.
BACKEND_CASES = [("triton", d, s) for d, s in CASES] + [("torch", torch.float16, (3, 7, 80))]
BACKEND_IDS = [f"triton-{i}" for i in CASE_IDS] + ["torch-float16-3x7x80"]


def _plain_op(name, backend):
    def run(x):
        if name == "quick_gelu":
            return mmfast.ops.quick_gelu(x, backend=backend)
        return mmfast.ops.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none", backend=backend)
    return run


def _gated_op(kind, backend, split, gate_first=True):
    def run(gate, up=None):
        if kind == "silu":
            return mmfast.ops.swiglu(gate, up, gate_first=gate_first, backend=backend)
        return mmfast.ops.geglu(gate, up, gate_first=gate_first, backend=backend,
                                approximate="tanh" if kind == "gelu_tanh" else "none")
    return run


@pytest.mark.parametrize("backend,dtype,shape", BACKEND_CASES, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "quick_gelu"])
def test_plain_matches_reference(kind, dtype, shape, backend, device):
    # Scale 3: the tails, where erf/tanh/sigmoid saturate, are exercised too.
    inputs = {"x": random_tensor(shape, dtype, device, scale=3.0)}
    assert_matches_reference(_plain_op(kind, backend), lambda x: activation_reference(x, kind),
                             inputs, grad_inputs=("x",))


@pytest.mark.parametrize("backend,dtype,shape", BACKEND_CASES, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh"])
def test_gated_matches_reference(kind, dtype, shape, backend, device):
    inputs = {"gate": random_tensor(shape, dtype, device, scale=3.0), "up": random_tensor(shape, dtype, device)}
    assert_matches_reference(_gated_op(kind, backend, False), lambda gate, up: gated_reference(gate, up, kind),
                             inputs, grad_inputs=("gate", "up"))


@pytest.mark.parametrize("kind,dtype,gate_first", [
    ("silu", torch.float32, True), ("gelu", torch.bfloat16, False), ("gelu_tanh", torch.float16, True)])
def test_gated_split_matches_reference(kind, dtype, gate_first, device):
    inputs = {"gate": random_tensor((3, 5, 2 * 72), dtype, device, scale=3.0)}
    assert_matches_reference(
        _gated_op(kind, "triton", True, gate_first),
        lambda gate: gated_reference(gate, None, kind, gate_first), inputs, grad_inputs=("gate",))


def test_conventions_match_torch_and_diffusers(device):
    x = random_tensor((4, 2 * 48), torch.float64, device, scale=2.0)
    first, second = x.chunk(2, dim=-1)
    exact = {
        "gelu": F.gelu(x), "gelu_tanh": F.gelu(x, approximate="tanh"),
        "quick_gelu": x * torch.sigmoid(1.702 * x),  # transformers' QuickGELUActivation
        "swiglu": F.silu(first) * second,  # gate_up_proj: gate first
        "geglu_diffusers": first * F.gelu(second),  # diffusers: hidden_states, gate = chunk(2)
    }
    for backend in BACKENDS:
        x32 = x.float()
        got = {
            "gelu": mmfast.ops.gelu(x32, backend=backend),
            "gelu_tanh": mmfast.ops.gelu(x32, approximate="tanh", backend=backend),
            "quick_gelu": mmfast.ops.quick_gelu(x32, backend=backend),
            "swiglu": mmfast.ops.swiglu(x32, backend=backend),
            "geglu_diffusers": mmfast.ops.geglu(x32, gate_first=False, backend=backend),
        }
        for name, want in exact.items():
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-6, msg=f"{name} ({backend})")


def test_split_gradient_is_one_tensor(device):
    # The two halves' gradients land in one [.., 2N] tensor, equal to autograd through chunk.
    x = random_tensor((6, 2 * 40), torch.float32, device, requires_grad=True)
    mmfast.ops.swiglu(x, gate_first=False, backend="triton").square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    up, gate = x_ref.chunk(2, dim=-1)
    (F.silu(gate) * up).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_strided_inputs(device):
    # Rows that are not contiguous, a transposed tensor, an expanded upstream gradient.
    wide = random_tensor((9, 100), torch.float32, device, scale=2.0)
    gate, up = wide[:, 3:35], wide.t()[:32, :9].t()
    inputs = {"gate": gate, "up": up}
    assert_matches_reference(_gated_op("gelu", "triton", False), lambda gate, up: gated_reference(gate, up, "gelu"),
                             inputs, grad_inputs=("gate", "up"))
    x = random_tensor((32, 9), torch.float16, device).t().requires_grad_()
    mmfast.ops.quick_gelu(x, backend="triton").sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    activation_reference(x_ref, "quick_gelu").sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_float64_goes_to_the_reference(device):
    x = random_tensor((3, 40), torch.float64, device)
    torch.testing.assert_close(mmfast.ops.swiglu(x), gated_reference(x, None, "silu"), rtol=0, atol=0)
    with pytest.raises(mmfast.NoBackendError, match="dtype float64 not supported"):
        mmfast.ops.gelu(x, backend="triton")


def test_compile_fullgraph(device):
    def mlp(x, w):
        h = x @ w
        return mmfast.ops.geglu(h, approximate="tanh", backend="triton") + mmfast.ops.quick_gelu(h[..., :16])

    x = random_tensor((5, 24), torch.float32, device)
    w = random_tensor((24, 32), torch.float32, device)
    # aot_eager traces forward and backward through the fake impls without compiling C++.
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (mlp, compiled):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


# ---- argument errors -------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: mmfast.ops.gelu(torch.ones(3, dtype=torch.int32)), TypeError, "x: expected a floating dtype"),
    (lambda: mmfast.ops.gelu([1.0]), TypeError, "x: expected a Tensor"),
    (lambda: mmfast.ops.gelu(torch.ones(3), approximate="erf"), ValueError, "approximate: expected 'none' or 'tanh'"),
    (lambda: mmfast.ops.swiglu(torch.ones(4, 7)), ValueError, "gate: with up=None, expected a last dim of even"),
    (lambda: mmfast.ops.swiglu(torch.ones(4, 8), torch.ones(4, 9)), ValueError, r"up: expected shape \(4, 8\)"),
    (lambda: mmfast.ops.swiglu(torch.ones(4, 8), torch.ones(4, 8, dtype=torch.float16)), ValueError,
     "up: expected .* dtype torch.float32"),
    (lambda: mmfast.ops.geglu(torch.ones(4, 8), gate_first=1), TypeError, "gate_first: expected a bool"),
    (lambda: mmfast.ops.swiglu(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "gate: expected at least one"),
])
def test_bad_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- GPU-only: real sizes in bf16 --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_real_sizes_bf16(kind):
    cuda = torch.device("cuda")
    inputs = {"gate": random_tensor((4096, 2 * 3420), torch.bfloat16, cuda, scale=3.0)}
    assert_matches_reference(_gated_op(kind, "triton", True), lambda gate: gated_reference(gate, None, kind),
                             inputs, grad_inputs=("gate",))
    inputs = {"x": random_tensor((8192, 4304), torch.bfloat16, cuda, scale=3.0)}
    assert_matches_reference(_plain_op("gelu_tanh", "triton"), lambda x: activation_reference(x, "gelu_tanh"),
                             inputs, grad_inputs=("x",))
