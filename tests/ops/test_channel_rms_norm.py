"""Channel-first RMSNorm (+SiLU), Wan's VAE norm: every backend against the float64
reference, output and gradients (the flash-attention rule), in NCDHW, channels-last and
image layouts at odd sizes; a position whose channels are all zero; diffusers'
WanRMS_norm itself; errors."""

import pytest
import torch

import mmfast
from mmfast.ops.channel_rms_norm import channel_rms_norm_reference
from mmfast.testing import assert_matches_reference, random_tensor

# (shape, channels_last, dtype, activation, bias): video and image maps, channel counts
# that are not powers of two; wide channel counts whose positions are split over several
# programs, the last one partial (200 and 130 channels: 32 positions a program).
CASES = [
    ((1, 200, 1, 7, 11), False, torch.float16, "silu", True),
    ((1, 130, 2, 5, 9), True, torch.bfloat16, "silu", False),
    ((1, 12, 3, 13, 11), False, torch.float16, "silu", False),
    ((2, 24, 2, 5, 7), True, torch.bfloat16, "silu", True),
    ((2, 96, 1, 3, 5), False, torch.float32, None, False),
    ((3, 6, 9, 7), False, torch.float16, None, True),
    ((1, 5, 2, 3, 3), True, torch.float32, "silu", False),
]
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _op(backend):
    def run(x, weight, bias, activation):
        return mmfast.ops.channel_rms_norm(x, weight, bias, activation, backend=backend)
    return run


def _inputs(shape, dtype, device, channels_last=False, activation="silu", bias=False):
    x = random_tensor(shape, dtype, device, scale=2.0, offset=0.3)
    if channels_last:
        x = x.contiguous(memory_format=FORMATS[len(shape)])
    return {"x": x, "weight": random_tensor(shape[1:2], dtype, device, scale=0.5, offset=1.0),
            "bias": random_tensor(shape[1:2], dtype, device, scale=0.5) if bias else None,
            "activation": activation}


def _case_id(case):
    shape, channels_last, dtype, activation, bias = case
    return f"{'x'.join(map(str, shape))}-{'cl' if channels_last else 'cf'}-{str(dtype)[6:]}-{activation}-b{int(bias)}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, backend, device):
    shape, channels_last, dtype, activation, bias = case
    inputs = _inputs(shape, dtype, device, channels_last, activation, bias)
    rows = shape[0] * inputs["x"][0, 0].numel()
    grads = ("x", "weight") + (("bias",) if bias else ())
    assert_matches_reference(_op(backend), channel_rms_norm_reference, inputs, grad_inputs=grads,
                             summed_over={"grad of weight": rows, "grad of bias": rows})


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_zero_position_gives_bias_not_nan(backend, device):
    # F.normalize clamps the norm at 1e-12: a zero vector normalises to zero, not NaN.
    x = random_tensor((1, 8, 2, 3, 3), torch.float32, device)
    x[:, :, 1, 2, 0] = 0
    bias = random_tensor((8,), torch.float32, device)
    y = mmfast.ops.channel_rms_norm(x, torch.ones(8, device=device), bias, backend=backend)
    torch.testing.assert_close(y[0, :, 1, 2, 0], bias)
    torch.testing.assert_close(y, channel_rms_norm_reference(x, torch.ones(8, device=device), bias))


@pytest.mark.parametrize("images", [False, True])
def test_equals_diffusers_wan_rms_norm(images, device):
    pytest.importorskip("diffusers")
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    norm = WanRMS_norm(12, images=images).to(device)
    with torch.no_grad():
        norm.gamma.normal_(1.0, 0.3)
    x = random_tensor((2, 12, 5, 7) if images else (2, 12, 3, 5, 7), torch.float32, device)
    with torch.no_grad():
        want = torch.nn.functional.silu(norm(x))
        got = mmfast.ops.channel_rms_norm(x, norm.gamma.reshape(-1), activation="silu", backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"weight": torch.ones(4)}, r"weight: expected shape \(8,\) \(the channels of x\)"),
    ({"bias": torch.ones(8, dtype=torch.int32)}, "bias: expected a floating dtype"),
    ({"activation": "gelu"}, "activation: expected one of"),
    ({"x": torch.ones(8)}, r"x: expected \[B, C, \*spatial\]"),
    ({"x": torch.ones(2, 8, 3, dtype=torch.int64)}, "x: expected a floating dtype"),
    ({"weight": "w"}, "weight: expected a Tensor"),
])
def test_bad_arguments(kwargs, match):
    args = {"x": torch.randn(2, 8, 3, 4, 4), "weight": torch.ones(8), "bias": None, "activation": None} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        mmfast.ops.channel_rms_norm(**args)


def test_too_many_channels_for_triton_go_to_torch():
    from mmfast.ops.channel_rms_norm import CHANNEL_RMS_NORM, TRITON_MAX_CHANNELS
    from mmfast.dispatch import Call

    call = Call(device=torch.device("cpu"), dtype=torch.float32, facts={"channels": TRITON_MAX_CHANNELS + 1})
    assert CHANNEL_RMS_NORM.select(call, None).name == "torch"
