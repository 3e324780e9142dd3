"""CLIP / SigLIP / NT-Xent losses: every backend against the dense float64 formulas,
loss and every gradient (both features, scale, bias, temperature), with the
flash-attention rule; batch sizes 1, 3, one with a ragged tile tail, ~1000; scales 100
and 1e-3; unnormalised features (rows of norm ~4); argument errors. open_clip drop-in:
tests/nn/test_contrastive.py.
Feature dims stay small: on CPU the Triton kernels run under the interpreter."""

import pytest
import torch

import mmfast
from mmfast.ops.contrastive import clip_loss_reference, nt_xent_reference, siglip_loss_reference
from mmfast.testing import assert_matches_reference, random_tensor

BACKENDS = ["triton", "torch"]
# (batch, logit scale, dtype): a lone pair, three, 37 (two 16-row tiles and a tail of 5)
# at both extreme scales, each dtype at each scale.
CASES = [(1, 100.0, torch.float32), (3, 1e-3, torch.float16),
         (37, 100.0, torch.float16), (37, 1e-3, torch.float32)]
DIM = 24  # not a power of two: masked loads along the feature dim


def _features(b, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Unnormalised rows (norm ~ sqrt(d)), as a model emits before its final norm.
    return {"image_features": random_tensor((b, d), dtype, device, generator=gen),
            "text_features": random_tensor((b, d), dtype, device, generator=gen)}


def _scalar(value, device):
    return torch.tensor(value, dtype=torch.float32, device=device)


def _clip(backend):
    def run(image_features, text_features, logit_scale):
        return mmfast.ops.clip_loss(image_features, text_features, logit_scale, backend=backend)
    return run


def _siglip(backend):
    def run(image_features, text_features, logit_scale, logit_bias):
        return mmfast.ops.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=backend)
    return run


def _summed(b, d, *names):
    # The scale and bias gradients sum B^2 D products with cancelling signs, in another
    # order than eager: allow the summation error of B D terms (see assert_matches_reference).
    return {f"grad of {name}": b * d for name in names}


def _check_clip(b, scale, dtype, backend, device, d=DIM):
    inputs = {**_features(b, d, dtype, device), "logit_scale": _scalar(scale, device)}
    assert_matches_reference(_clip(backend), clip_loss_reference, inputs,
                             grad_inputs=("image_features", "text_features", "logit_scale"),
                             summed_over=_summed(b, d, "logit_scale"))


def _check_siglip(b, scale, dtype, backend, device, d=DIM):
    inputs = {**_features(b, d, dtype, device), "logit_scale": _scalar(scale, device),
              "logit_bias": _scalar(-2.5, device)}
    assert_matches_reference(_siglip(backend), siglip_loss_reference, inputs,
                             grad_inputs=("image_features", "text_features", "logit_scale", "logit_bias"),
                             summed_over=_summed(b, d, "logit_scale", "logit_bias"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,scale,dtype", CASES, ids=str)
def test_clip_matches_reference(b, scale, dtype, backend, device):
    _check_clip(b, scale, dtype, backend, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,scale,dtype", CASES, ids=str)
def test_siglip_matches_reference(b, scale, dtype, backend, device):
    _check_siglip(b, scale, dtype, backend, device)


def test_clip_large_batch_triton(device):
    # 1000 rows: eight 128-row interpreter tiles, the last one 104 rows.
    _check_clip(1000, 100.0, torch.float16, "triton", device, d=16)


def test_siglip_large_batch_torch(device):
    # 600 rows: the torch backend's 512-row chunks and a tail of 88.
    _check_siglip(600, 10.0, torch.float32, "torch", device, d=16)


def test_clip_sum_reduction(device):
    inputs = {**_features(5, 16, torch.float32, device), "logit_scale": _scalar(7.0, device)}

    def op(image_features, text_features, logit_scale):
        return mmfast.ops.clip_loss(image_features, text_features, logit_scale, reduction="sum", backend="triton")

    def ref(image_features, text_features, logit_scale):
        return clip_loss_reference(image_features, text_features, logit_scale, reduction="sum")

    assert_matches_reference(op, ref, inputs, grad_inputs=("image_features", "text_features", "logit_scale"),
                             summed_over=_summed(5, 16, "logit_scale"))


def test_siglip_without_bias_and_with_number_scale(device):
    x, y = _features(6, 16, torch.float32, device).values()
    got = mmfast.ops.siglip_loss(x, y, 10.0, backend="triton")
    torch.testing.assert_close(got, siglip_loss_reference(x.double(), y.double(), 10.0).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (3, torch.float16), (20, torch.float32)], ids=str)
def test_nt_xent_matches_reference(n, dtype, backend, device):
    gen = torch.Generator().manual_seed(1)
    inputs = {"z": random_tensor((2 * n, DIM), dtype, device, generator=gen),
              "temperature": _scalar(0.1, device)}

    def op(z, temperature):
        return mmfast.ops.nt_xent_loss(z, temperature, backend=backend)

    assert_matches_reference(op, nt_xent_reference, inputs, grad_inputs=("z", "temperature"),
                             summed_over=_summed(2 * n, DIM, "temperature"))


def test_float64_runs_on_the_torch_backend(device):
    x, y = _features(9, 8, torch.float64, device).values()
    s = _scalar(3.0, device).double()
    torch.testing.assert_close(mmfast.ops.clip_loss(x, y, s), clip_loss_reference(x, y, s), rtol=1e-12, atol=0)


def test_strided_features(device):
    # Columns of a transposed tensor: rows are not contiguous; the op copies them.
    x = random_tensor((DIM, 10), torch.float32, device).t()
    y = random_tensor((10, 2 * DIM), torch.float32, device)[:, ::2]
    got = mmfast.ops.clip_loss(x, y, 5.0, backend="triton")
    torch.testing.assert_close(got, clip_loss_reference(x.double(), y.double(), 5.0).float())


# ---- bad input ---------------------------------------------------------------------------


def _bad_calls(device):
    x = torch.randn(4, 8, device=device)
    s = torch.tensor(2.0, device=device)
    return [
        (lambda: mmfast.ops.clip_loss(x, torch.randn(5, 8, device=device), s), ValueError, "text_features: expected shape"),
        (lambda: mmfast.ops.clip_loss(x, torch.randn(4, 9, device=device), s), ValueError, "text_features: expected shape"),
        (lambda: mmfast.ops.clip_loss(x[0], x[0], s), ValueError, "image_features: expected a 2-D"),
        (lambda: mmfast.ops.clip_loss(x, x, torch.ones(2, device=device)), ValueError, "logit_scale: expected a scalar"),
        (lambda: mmfast.ops.clip_loss(x, x.half(), s), TypeError, "text_features: expected dtype"),
        (lambda: mmfast.ops.clip_loss(x, x.to("meta"), s), ValueError, "text_features: expected device"),
        (lambda: mmfast.ops.clip_loss(x, x, s.to("meta")), ValueError, "logit_scale: expected device"),
        (lambda: mmfast.ops.clip_loss(x.long(), x.long(), s), TypeError, "image_features: expected a floating"),
        (lambda: mmfast.ops.clip_loss(x, x, s, reduction="none"), ValueError, "reduction"),
        (lambda: mmfast.ops.clip_loss(x[:0], x[:0], s), ValueError, "image_features: expected at least one row"),
        (lambda: mmfast.ops.clip_loss(x.tolist(), x, s), TypeError, "image_features: expected a Tensor"),
        (lambda: mmfast.ops.siglip_loss(x, x, s, torch.ones(1, 2, device=device)), ValueError, "logit_bias: expected a scalar"),
        (lambda: mmfast.ops.siglip_loss(x, x, s, "0"), TypeError, "logit_bias: expected a number"),
        (lambda: mmfast.ops.nt_xent_loss(x[:3], 0.1), ValueError, "z: expected an even number"),
        (lambda: mmfast.ops.nt_xent_loss(x, 0.0), ValueError, "temperature: expected > 0"),
    ]


def test_bad_input_names_the_argument(device):
    for call, error, message in _bad_calls(device):
        with pytest.raises(error, match=message):
            call()


# ---- GPU: bf16, memory ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bf16_on_gpu(kind, device):
    check = _check_clip if kind == "clip" else _check_siglip
    check(777, 50.0, torch.bfloat16, "triton", device, d=512)


@pytest.mark.gpu
def test_memory_is_linear_in_the_batch(device):
    # B = 32768: the dense logits alone would take 4 GiB in fp32. Allow the inputs, their
    # gradients, and 64 MiB for O(B) vectors and partials.
    b, d = 32768, 256
    x = torch.randn(b, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(b, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(10.0, device=device, requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mmfast.ops.clip_loss(x, y, s, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2 * x.numel() * x.element_size() + (64 << 20), f"{extra / 2**20:.0f} MiB extra"
