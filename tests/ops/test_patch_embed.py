"""Patch embedding: Conv2d style (bias, position embedding, class token fused) and
pre-patchified Conv3d style, every backend against the float64 reference with all
gradients; position-table interpolation against Hugging Face's; argument errors."""

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.ops.patch_embed import (
    grid_cu_seqlens, interpolate_pos_embed, patch_embed_patchified_reference, patch_embed_reference,
)
from mmfast.testing import assert_matches_reference, random_tensor


def _image_inputs(B, C, H, W, E, P, dtype, device, *, bias=True, pos=True, cls=True):
    L = (H // P) * (W // P) + cls
    return {
        "pixels": random_tensor((B, C, H, W), dtype, device),
        "weight": random_tensor((E, C, P, P), dtype, device, scale=0.1),
        "bias": random_tensor((E,), dtype, device) if bias else None,
        "pos_embed": random_tensor((L, E), dtype, device) if pos else None,
        "class_embed": random_tensor((E,), dtype, device) if cls else None,
    }


def _image_op(backend):
    def run(pixels, weight, bias, pos_embed, class_embed):
        return mmfast.ops.patch_embed(pixels, weight, bias, pos_embed, class_embed, backend=backend)
    return run


def _check_image(inputs):
    grads = tuple(k for k, v in inputs.items() if v is not None)
    B, L = inputs["pixels"].shape[0], inputs["pos_embed"].shape[0] if inputs["pos_embed"] is not None else 1
    rows = B * L
    assert_matches_reference(_image_op("triton"), patch_embed_reference, inputs, grad_inputs=grads,
                             summed_over={"grad of weight": rows, "grad of bias": rows,
                                          "grad of pos_embed": B, "grad of class_embed": B})


# (B, C, H, W, E, P, dtype, bias, pos, cls): CLIP-like (class token, no bias), SigLIP-like
# (bias, no class token), a non-square image, odd embedding width and patch, one channel.
IMAGE_CASES = [
    (2, 3, 28, 28, 48, 14, torch.float32, False, True, True),
    (2, 3, 16, 24, 40, 8, torch.float16, True, True, False),
    (1, 3, 35, 21, 37, 7, torch.float32, True, True, True),
    (3, 1, 10, 15, 24, 5, torch.float16, True, False, False),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-E{c[4]}-P{c[5]}")
def test_image_matches_reference(case, device):
    B, C, H, W, E, P, dtype, bias, pos, cls = case
    _check_image(_image_inputs(B, C, H, W, E, P, dtype, device, bias=bias, pos=pos, cls=cls))


def test_image_strided_pixels(device):
    # Channels-last pixels: the kernel reads them through their strides, no copy.
    inputs = _image_inputs(2, 3, 14, 21, 32, 7, torch.float32, device)
    inputs["pixels"] = inputs["pixels"].contiguous(memory_format=torch.channels_last)
    _check_image(inputs)


def test_interpreter_refuses_bf16():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter")
    inputs = _image_inputs(1, 3, 8, 8, 16, 4, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(mmfast.NoBackendError, match="the Triton interpreter computes bfloat16 tl.dot wrongly"):
        _image_op("triton")(**inputs)
    torch.testing.assert_close(_image_op(None)(**inputs), patch_embed_reference(**inputs), rtol=0, atol=0)


def test_image_torch_backend(device):
    inputs = _image_inputs(1, 3, 14, 14, 16, 7, torch.float16, device)
    out = _image_op("torch")(**inputs)
    torch.testing.assert_close(out, patch_embed_reference(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,K,E,bias", [(torch.float32, 3 * 2 * 4 * 4, 40, False),
                                            (torch.float16, 1 * 2 * 5 * 5, 24, True)])
def test_patchified_matches_reference(dtype, K, E, bias, device):
    inputs = {"x": random_tensor((37, K), dtype, device),
              "weight": random_tensor((E, K), dtype, device, scale=0.1),
              "bias": random_tensor((E,), dtype, device) if bias else None}
    grads = tuple(k for k, v in inputs.items() if v is not None)
    op = lambda x, weight, bias: mmfast.ops.patch_embed_patchified(x, weight, bias, backend="triton")
    assert_matches_reference(op, patch_embed_patchified_reference, inputs, grad_inputs=grads,
                             summed_over={"grad of weight": 37, "grad of bias": 37})


def test_patchified_is_the_conv3d_of_hugging_face(device):
    # Qwen2-VL: x.view(-1, C, T, P, P) through Conv3d(kernel = stride = (T, P, P), no bias).
    C, T, P, E = 3, 2, 4, 32
    conv = torch.nn.Conv3d(C, E, kernel_size=(T, P, P), stride=(T, P, P), bias=False).to(device)
    grid = torch.tensor([[1, 2, 3], [2, 2, 2]])
    x = random_tensor((int(grid.prod(1).sum()), C * T * P * P), torch.float32, device)
    want = conv(x.view(-1, C, T, P, P)).view(-1, E)
    got = mmfast.ops.patch_embed_patchified(x, conv.weight, grid_thw=grid, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid_cu_seqlens(grid), torch.tensor([0, 6, 10, 14], dtype=torch.int32))


def test_packed_images_of_different_sizes(device):
    # Two images, two grids, each with its own position table and the class token; the
    # packed stream equals the per-image embeddings laid end to end, gradients included.
    E, P = 24, 4
    images = [random_tensor((3, 8, 12), torch.float32, device), random_tensor((3, 4, 4), torch.float32, device)]
    weight = random_tensor((E, 3, P, P), torch.float32, device, scale=0.1)
    cls = random_tensor((E,), torch.float32, device)
    tables = [random_tensor((1 + 6, E), torch.float32, device), random_tensor((1 + 1, E), torch.float32, device)]

    def packed(image0, image1, weight, class_embed, pos0, pos1):
        return mmfast.ops.patch_embed_packed([image0, image1], weight, None, [pos0, pos1], class_embed,
                                             backend="triton")[0]

    def reference(image0, image1, weight, class_embed, pos0, pos1):
        return torch.cat([patch_embed_reference(image[None], weight, None, pos, class_embed)[0]
                          for image, pos in ((image0, pos0), (image1, pos1))])

    inputs = {"image0": images[0], "image1": images[1], "weight": weight, "class_embed": cls,
              "pos0": tables[0], "pos1": tables[1]}
    assert_matches_reference(packed, reference, inputs, grad_inputs=tuple(inputs),
                             summed_over={"grad of weight": 9, "grad of class_embed": 2})
    _, cu = mmfast.ops.patch_embed_packed(images, weight, None, tables, cls)
    assert cu.tolist() == [0, 7, 9] and cu.dtype == torch.int32
    with pytest.raises(ValueError, match=r"images\[1\]: expected a \[C, H, W\] tensor"):
        mmfast.ops.patch_embed_packed([images[0], images[1][None]], weight)
    with pytest.raises(ValueError, match="pos_embeds: expected None or one table per image"):
        mmfast.ops.patch_embed_packed(images, weight, None, tables[:1], cls)


@pytest.mark.parametrize("grid_hw,cls", [((3, 5), True), ((6, 6), False), ((4, 4), True)])
def test_interpolation_matches_hugging_face(grid_hw, cls):
    # Hugging Face CLIP/SigLIP interpolate_pos_encoding, written out: 4x4 table.
    E, side = 8, 4
    table = torch.randn(side * side + cls, E)
    got = interpolate_pos_embed(table, grid_hw, cls)
    patches = table[cls:].reshape(1, side, side, E).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid_hw, mode="bicubic", align_corners=False)
    want = patches.permute(0, 2, 3, 1).reshape(-1, E)
    want = torch.cat([table[:1], want]) if cls else want
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_fullgraph(device):
    inputs = _image_inputs(1, 3, 8, 12, 16, 4, torch.float32, device)
    fn = lambda **kw: mmfast.ops.patch_embed(**kw, backend="triton").square().sum()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    compiled(**leaves).backward()
    expect = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    fn(**expect).backward()
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad, expect[k].grad)


# ---- argument errors -------------------------------------------------------------


def _image_args(**kw):
    args = {"pixels": torch.ones(1, 3, 28, 28), "weight": torch.ones(8, 3, 14, 14), "bias": torch.ones(8),
            "pos_embed": torch.ones(5, 8), "class_embed": torch.ones(8)}
    return {**args, **kw}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"pixels": torch.ones(1, 3, 30, 28)}, ValueError,
     "pixels: image size 30x28 is not a multiple of the patch size 14"),
    ({"pixels": torch.ones(1, 4, 28, 28)}, ValueError, "pixels: expected 3 channels"),
    ({"pixels": torch.ones(3, 28, 28)}, ValueError, "pixels: expected a 4-d tensor"),
    ({"pixels": torch.ones(1, 3, 28, 28, dtype=torch.float16)}, TypeError, "pixels: expected dtype torch.float32"),
    ({"pixels": torch.ones(1, 3, 28, 28, dtype=torch.uint8)}, TypeError, "pixels: expected a floating dtype"),
    ({"weight": torch.ones(8, 3, 14, 7)}, ValueError, "weight: expected a square patch"),
    ({"bias": torch.ones(9)}, ValueError, r"bias: expected shape \(8,\)"),
    ({"pos_embed": torch.ones(4, 8)}, ValueError, r"pos_embed: expected shape \(5, 8\) for a 2x2 patch grid plus"),
    ({"pos_embed": torch.ones(1, 5, 8)}, ValueError, "pos_embed: expected a 2-d tensor"),
    ({"class_embed": torch.ones(8, dtype=torch.float64)}, TypeError, "class_embed: expected dtype torch.float32"),
])
def test_bad_image_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        mmfast.ops.patch_embed(**_image_args(**kwargs))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"x": torch.ones(6, 100)}, ValueError, r"x: expected 96 values per row \(C\*T\*P\*P"),
    ({"grid_thw": torch.tensor([[1, 2, 2]])}, ValueError, "grid_thw: its patches sum to 4 .* x has 6 rows"),
    ({"grid_thw": torch.tensor([1, 2, 3])}, ValueError, r"grid_thw: expected an integer tensor \[images, 3\]"),
    ({"grid_thw": torch.tensor([[1.0, 2.0, 3.0]])}, TypeError, "grid_thw: expected an integer dtype"),
    ({"x": torch.ones(6, 96, dtype=torch.bfloat16)}, TypeError, "x: expected dtype torch.float32"),
])
def test_bad_patchified_arguments_name_the_argument(kwargs, error, match):
    args = {"x": torch.ones(6, 96), "weight": torch.ones(8, 2, 3, 4, 4), "grid_thw": torch.tensor([[1, 2, 3]]),
            **kwargs}
    with pytest.raises(error, match=match):
        mmfast.ops.patch_embed_patchified(**args)


# ---- GPU-only: real sizes in bf16 --------------------------------------------------


@pytest.mark.gpu
def test_clip_vit_l_336_bf16():
    inputs = _image_inputs(4, 3, 336, 336, 1024, 14, torch.bfloat16, torch.device("cuda"), bias=False)
    _check_image(inputs)


@pytest.mark.gpu
def test_qwen25_vl_patchified_bf16():
    cuda = torch.device("cuda")
    inputs = {"x": random_tensor((4096, 1176), torch.bfloat16, cuda),
              "weight": random_tensor((1280, 3, 2, 14, 14), torch.bfloat16, cuda, scale=0.05), "bias": None}
    op = lambda x, weight, bias: mmfast.ops.patch_embed_patchified(x, weight, bias, backend="triton")
    assert_matches_reference(op, patch_embed_patchified_reference, inputs, grad_inputs=("x", "weight"),
                             summed_over={"grad of weight": 4096})
