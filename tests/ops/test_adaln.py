"""adaLN modulation and the gated residual: every backend against the float64 reference,
outputs and all gradients; per-sample broadcasting; errors."""

import pytest
import torch

import mmfast
from mmfast.ops.adaln import adaln_modulate_reference, gated_residual_reference
from mmfast.testing import assert_matches_reference, random_tensor

# (backend, (B, T, C), dtype): odd token counts, widths that are not powers of two, one
# token, no token; every dtype through the kernels.
CASES = [
    ("triton", (2, 7, 80), torch.float32),
    ("triton", (3, 13, 72), torch.float16),
    ("triton", (1, 1, 129), torch.bfloat16),
    ("triton", (2, 0, 64), torch.float16),
    ("torch", (2, 7, 80), torch.float16),
]


def _case_id(case):
    backend, shape, dtype = case
    return f"{backend}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}"


def _modulate(backend):
    return lambda x, shift, scale, eps: mmfast.ops.adaln_modulate(x, shift, scale, eps, backend=backend)


def _gated(backend):
    return lambda x, gate, y: mmfast.ops.gated_residual(x, gate, y, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_modulate_matches_reference(case, device):
    backend, shape, dtype = case
    B, T, C = shape
    inputs = {"x": random_tensor(shape, dtype, device, scale=2.0, offset=0.5),
              "shift": random_tensor((B, C), dtype, device),
              "scale": random_tensor((B, C), dtype, device, scale=0.5),
              "eps": 1e-6}
    assert_matches_reference(_modulate(backend), adaln_modulate_reference, inputs,
                             grad_inputs=("x", "shift", "scale"),
                             summed_over={"grad of shift": T, "grad of scale": T})


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gated_residual_matches_reference(case, device):
    backend, shape, dtype = case
    B, T, C = shape
    inputs = {"x": random_tensor(shape, dtype, device), "gate": random_tensor((B, C), dtype, device),
              "y": random_tensor(shape, dtype, device)}
    assert_matches_reference(_gated(backend), gated_residual_reference, inputs,
                             grad_inputs=("x", "gate", "y"), summed_over={"grad of gate": T})


def test_matches_diffusers_formula_with_strided_modulation(device):
    # diffusers chunks one [B, 6C] projection: shift/scale/gate are strided views of it.
    B, T, C = 2, 5, 48
    x = random_tensor((B, T, C), torch.float32, device)
    shift, scale, gate = random_tensor((B, 6 * C), torch.float32, device).chunk(6, dim=1)[:3]
    expected = torch.nn.functional.layer_norm(x, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(mmfast.ops.adaln_modulate(x, shift, scale, backend="triton"), expected)
    torch.testing.assert_close(mmfast.ops.gated_residual(x, gate, expected, backend="triton"),
                               x + gate.unsqueeze(1) * expected)


@pytest.mark.parametrize("call,match", [
    (lambda x, m: mmfast.ops.adaln_modulate(x, m[:1], m), r"shift: expected shape \[B, C\] = \(2, 8\)"),
    (lambda x, m: mmfast.ops.adaln_modulate(x[0], m, m), r"x: expected \[B, T, C\]"),
    (lambda x, m: mmfast.ops.adaln_modulate(x, m, m.long()), "scale: expected a floating dtype"),
    (lambda x, m: mmfast.ops.adaln_modulate(x, m, m, eps=float("nan")), "eps: expected a finite"),
    (lambda x, m: mmfast.ops.gated_residual(x, m, x[:, :2]), r"y: expected shape \(2, 3, 8\)"),
    (lambda x, m: mmfast.ops.gated_residual(x, m[:, :4], x), r"gate: expected shape \[B, C\]"),
])
def test_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 3, 8), torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sd3_shapes_on_gpu(dtype, device):
    # SD3-medium at 1024 px: 4096 image tokens, 1536 channels.
    B, T, C = 2, 4096, 1536
    inputs = {"x": random_tensor((B, T, C), dtype, device), "shift": random_tensor((B, C), dtype, device),
              "scale": random_tensor((B, C), dtype, device), "eps": 1e-6}
    assert_matches_reference(_modulate("triton"), adaln_modulate_reference, inputs,
                             grad_inputs=("x", "shift", "scale"),
                             summed_over={"grad of shift": T, "grad of scale": T})
