"""GroupNorm (+SiLU): every backend against the float64 reference, output and all
gradients, in NCHW and channels_last, at odd spatial sizes; the spatial split; errors."""

import pytest
import torch

import mmfast
from mmfast.ops.group_norm import group_norm_reference
from mmfast.testing import assert_matches_reference, random_tensor

BACKENDS = ["triton", "native", "torch"]
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
# (shape, groups, channels_last, dtype, activation): a group split over several programs
# (37 x 29 positions, 4 channels a group) in both layouts, a group wider than one channel
# block (96 > 64), tiny groups, 1-d and 3-d spatial extents; each dtype and activation.
CASES = [
    ((1, 8, 37, 29), 2, False, torch.float16, "silu"),
    ((1, 8, 37, 29), 2, True, torch.float16, "silu"),
    ((2, 96, 5, 7), 1, True, torch.bfloat16, "silu"),
    ((2, 6, 5, 3), 3, False, torch.bfloat16, None),
    ((2, 12, 11), 4, False, torch.float32, None),
    ((1, 4, 3, 5, 7), 2, True, torch.float16, None),
]


def _op(backend):
    def run(x, weight, bias, num_groups, eps, activation):
        return mmfast.ops.group_norm(x, num_groups, weight, bias, eps, activation, backend=backend)
    return run


def _inputs(shape, groups, dtype, device, channels_last=False, activation="silu"):
    x = random_tensor(shape, dtype, device, scale=2.0, offset=0.5)
    if channels_last:
        x = x.contiguous(memory_format=FORMATS[len(shape)])
    return {"x": x,
            "weight": random_tensor(shape[1:2], dtype, device, scale=0.5, offset=1.0),
            "bias": random_tensor(shape[1:2], dtype, device, scale=0.5),
            "num_groups": groups, "eps": 1e-5, "activation": activation}


def _check(inputs, backend):
    x = inputs["x"]
    rows = x.shape[0] * x[0, 0].numel()
    assert_matches_reference(_op(backend), group_norm_reference, inputs,
                             grad_inputs=("x", "weight", "bias"),
                             summed_over={"grad of weight": rows, "grad of bias": rows})


def _case_id(case):
    shape, groups, channels_last, dtype, activation = case
    layout = "cl" if channels_last else "nchw"
    return f"{'x'.join(map(str, shape))}-g{groups}-{layout}-{str(dtype)[6:]}-{activation}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_reference(case, device):
    shape, groups, channels_last, dtype, activation = case
    _check(_inputs(shape, groups, dtype, device, channels_last, activation), "triton")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_torch_matches_reference(channels_last, device):
    _check(_inputs((2, 8, 5, 7), 4, torch.float16, device, channels_last), "torch")


def test_split_over_spatial_extent_matches_one_program(device):
    from mmfast.kernels.group_norm import group_norm_bwd, group_norm_fwd, plan

    assert plan(1, 2, 4, 37 * 29, device)[2] > 1  # the shape above is really split
    x = random_tensor((1, 8, 37 * 29), torch.float32, device, scale=3.0, offset=100.0)
    w, b = random_tensor((8,), torch.float32, device), random_tensor((8,), torch.float32, device)
    dy = random_tensor(x.shape, torch.float32, device)
    one = group_norm_fwd(x, w, b, 2, 1e-5, True, splits=1)
    many = group_norm_fwd(x, w, b, 2, 1e-5, True, splits=3)
    for a, c in zip(one, many):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group_norm_bwd(dy, x, w, b, *one[1:], 2, True, splits=1),
                               group_norm_bwd(dy, x, w, b, *one[1:], 2, True, splits=3),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_memory_format_and_takes_strided_input(backend, device):
    x = random_tensor((2, 8, 6, 5), torch.float32, device).contiguous(memory_format=torch.channels_last)
    y = mmfast.ops.group_norm(x, 4, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, group_norm_reference(x, 4))
    strided = random_tensor((2, 8, 6, 10), torch.float32, device)[..., ::2]
    torch.testing.assert_close(mmfast.ops.group_norm(strided, 2, backend=backend),
                               group_norm_reference(strided, 2))


def test_empty_batch(device):
    x = torch.empty(0, 8, 3, 3, device=device, requires_grad=True)
    y = mmfast.ops.group_norm(x, 4, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()


@pytest.mark.parametrize("kwargs,match", [
    ({"num_groups": 3}, "num_groups: 3 does not divide the 8 channels"),
    ({"num_groups": 0}, "num_groups: expected an int >= 1"),
    ({"weight": torch.ones(4)}, r"weight: expected shape \(8,\)"),
    ({"bias": torch.ones(8, dtype=torch.int32)}, "bias: expected a floating dtype"),
    ({"activation": "gelu"}, "activation: expected None or 'silu'"),
    ({"eps": -1.0}, "eps: expected a finite number"),
    ({"x": torch.ones(8)}, r"x: expected \[B, C, \*spatial\]"),
])
def test_bad_arguments(kwargs, match):
    args = {"x": torch.randn(2, 8, 4, 4), "num_groups": 4, "weight": None, "bias": None,
            "eps": 1e-5, "activation": None} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        mmfast.ops.group_norm(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unet_shapes_on_gpu(dtype, channels_last, device):
    # SD1.5's largest GroupNorm+SiLU: batch 2, 320 channels at 64 x 64, and 2560 at 8 x 8.
    for shape in ((2, 320, 64, 64), (2, 2560, 8, 8), (2, 1920, 16, 16)):
        _check(_inputs(shape, 32, dtype, device, channels_last), "triton")


@pytest.mark.gpu
def test_compiles_and_captures_on_gpu(device):
    x = random_tensor((2, 64, 16, 16), torch.float16, device).contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(64, device=device, dtype=torch.float16), torch.zeros(64, device=device, dtype=torch.float16)
    fn = torch.compile(lambda t: mmfast.ops.group_norm(t, 32, w, b, 1e-6, "silu"), fullgraph=True)
    torch.testing.assert_close(fn(x), group_norm_reference(x, 32, w, b, 1e-6, "silu"), rtol=2e-3, atol=2e-3)
    graph = torch.cuda.CUDAGraph()
    y = mmfast.ops.group_norm(x, 32, w, b, 1e-6, "silu")  # warm-up (compiles the kernels)
    with torch.cuda.graph(graph):
        y = mmfast.ops.group_norm(x, 32, w, b, 1e-6, "silu")
    graph.replay()
    torch.testing.assert_close(y, group_norm_reference(x, 32, w, b, 1e-6, "silu"), rtol=2e-3, atol=2e-3)
