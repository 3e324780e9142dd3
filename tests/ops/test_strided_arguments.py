"""Every op family on its Triton backend takes parameters and inputs with any strides: a
strided view (``[::2]``), a stride-0 one (``expand``) and a transposed one give the
numbers of ``backend="torch"``, outputs and gradients (issue 16, item 1: the launchers
used to read 1-D parameters as if contiguous, off by 7.66 up to 2.9e23 and NaN).

Each case builds its strided arguments as views of leaf tensors, so gradients flow back
through the view to the leaf, and compares the leaves' gradients too.
"""

import pytest
import torch

import mmfast

triton = pytest.importorskip("triton")

F32 = torch.float32


def _strided(shape, device, *, kind):
    """(leaf, view of ``shape``): ``every_other`` reads every second element of a twice
    wider leaf; ``broadcast`` expands a leaf of size 1 in the last dim (stride 0)."""
    if kind == "every_other":
        leaf = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=F32)
        return leaf, lambda t: t[..., ::2]
    if kind == "broadcast":
        leaf = torch.randn(*shape[:-1], 1, device=device, dtype=F32) + 0.5
        return leaf, lambda t: t.expand(*shape)
    raise AssertionError(kind)


def _check(run, leaves, views, *, grads=True, constant=()):
    """run(backend, *args) with the args built from ``leaves`` through ``views``, on
    triton and torch: same outputs and (with ``grads``) the same gradients of the leaves
    (but those whose index is in ``constant``)."""
    results = {}
    for backend in ("triton", "torch"):
        inputs = [leaf.detach().clone().requires_grad_(grads and leaf.is_floating_point() and i not in constant)
                  for i, leaf in enumerate(leaves)]
        out = run(backend, *(view(t) for view, t in zip(views, inputs)))
        outs = out if isinstance(out, tuple) else (out,)
        outs = tuple(o for o in outs if o is not None)
        grad_list = []
        if grads:
            total = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum()
                        for o in outs if o.is_floating_point())
            total.backward()
            grad_list = [t.grad for t in inputs if t.requires_grad]
        results[backend] = (outs, grad_list)
    (outs_t, grads_t), (outs_r, grads_r) = results["triton"], results["torch"]
    for got, want in zip(outs_t, outs_r):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads_t, grads_r):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


KINDS = ["every_other", "broadcast"]
same = lambda t: t  # noqa: E731


@pytest.mark.parametrize("kind", KINDS)
def test_rms_norm(kind, device):
    x = torch.randn(5, 64, device=device)
    w, view = _strided((64,), device, kind=kind)
    _check(lambda b, x, w: mmfast.ops.rms_norm(x, w, backend=b), [x, w], [same, view])


@pytest.mark.parametrize("kind", KINDS)
def test_layer_norm_weight_bias_and_residual(kind, device):
    x = torch.randn(5, 64, device=device)
    w, view_w = _strided((64,), device, kind=kind)
    b, view_b = _strided((64,), device, kind=kind)
    res, view_res = _strided((5, 64), device, kind="every_other")
    _check(lambda be, x, w, b, r: mmfast.ops.layer_norm(x, w, b, residual=r, backend=be),
           [x, w, b, res], [same, view_w, view_b, view_res])


@pytest.mark.parametrize("kind", KINDS)
def test_group_norm(kind, device):
    x = torch.randn(2, 8, 3, 5, device=device)
    w, view_w = _strided((8,), device, kind=kind)
    b, view_b = _strided((8,), device, kind=kind)
    _check(lambda be, x, w, b: mmfast.ops.group_norm(x, 4, w, b, activation="silu", backend=be),
           [x, w, b], [same, view_w, view_b])


def test_group_norm_other_strides(device):
    # Neither NCHW nor channels-last: the launcher copies rather than misreads.
    x = torch.randn(2, 3, 5, 8, device=device)
    _check(lambda be, x: mmfast.ops.group_norm(x, 4, backend=be), [x], [lambda t: t.permute(0, 3, 1, 2)])


@pytest.mark.parametrize("kind", KINDS)
def test_patch_embed_bias_position_and_class(kind, device):
    pixels = torch.randn(2, 3, 8, 8, device=device)
    weight = torch.randn(16, 3, 4, 4, device=device) * 0.1
    bias, view_b = _strided((16,), device, kind=kind)
    pos, view_pos = _strided((5, 16), device, kind=kind)
    cls, view_cls = _strided((16,), device, kind=kind)
    _check(lambda be, x, w, b, p, c: mmfast.ops.patch_embed(x, w, b, p, c, backend=be),
           [pixels, weight, bias, pos, cls], [same, same, view_b, view_pos, view_cls])


def test_patch_embed_transposed_weight(device):
    pixels = torch.randn(2, 8, 8, 3, device=device)  # NHWC -> an [B, C, H, W] view
    weight = torch.randn(4, 4, 3, 16, device=device) * 0.1  # [P, P, C, E] -> [E, C, P, P] view
    _check(lambda be, x, w: mmfast.ops.patch_embed(x, w, backend=be),
           [pixels, weight], [lambda t: t.permute(0, 3, 1, 2), lambda t: t.permute(3, 2, 0, 1)])


@pytest.mark.parametrize("kind", KINDS)
def test_adaln_modulate(kind, device):
    x = torch.randn(2, 5, 32, device=device)
    shift, view_s = _strided((2, 32), device, kind=kind)
    scale, view_c = _strided((2, 32), device, kind=kind)
    _check(lambda be, x, s, c: mmfast.ops.adaln_modulate(x, s, c, backend=be),
           [x, shift, scale], [same, view_s, view_c])


@pytest.mark.parametrize("kind", KINDS)
def test_gated_residual(kind, device):
    x, y = torch.randn(2, 5, 32, device=device), torch.randn(2, 5, 32, device=device)
    gate, view_g = _strided((2, 32), device, kind=kind)
    _check(lambda be, x, g, y: mmfast.ops.gated_residual(x, g, y, backend=be), [x, gate, y], [same, view_g, same])


@pytest.mark.parametrize("kind", KINDS)
def test_activations(kind, device):
    gate, view_g = _strided((4, 24), device, kind=kind)
    up, view_u = _strided((4, 24), device, kind="every_other")
    _check(lambda be, g, u: mmfast.ops.swiglu(g, u, backend=be), [gate, up], [view_g, view_u])
    _check(lambda be, g, u: mmfast.ops.geglu(g, u, backend=be), [gate, up], [view_g, view_u])
    _check(lambda be, g: mmfast.ops.gelu(g, backend=be), [gate], [view_g])


@pytest.mark.parametrize("kind", KINDS)
def test_apply_rotary_tables(kind, device):
    q, k = torch.randn(6, 2, 16, device=device), torch.randn(6, 1, 16, device=device)
    cos, view_c = _strided((6, 8), device, kind=kind)
    sin, view_s = _strided((6, 8), device, kind=kind)
    _check(lambda be, q, k, c, s: mmfast.ops.apply_rotary(q, k, c, s, backend=be),
           [q, k, cos, sin], [same, same, view_c, view_s], constant=(2, 3))


def test_contrastive_losses_strided_features(device):
    image, view_i = _strided((6, 32), device, kind="every_other")
    text, view_t = _strided((6, 32), device, kind="every_other")
    scale = torch.tensor(2.0, device=device)
    _check(lambda be, i, t: mmfast.ops.clip_loss(i, t, scale, backend=be), [image, text], [view_i, view_t])
    _check(lambda be, i, t: mmfast.ops.siglip_loss(i, t, scale, torch.tensor(-1.0, device=device), backend=be),
           [image, text], [view_i, view_t])


def test_linear_cross_entropy_strided_target_weight_bias(device):
    hidden = torch.randn(7, 16, device=device)
    weight, view_w = _strided((40, 16), device, kind="every_other")
    bias, view_b = _strided((40,), device, kind="broadcast")
    target_leaf = torch.randint(0, 40, (14,), device=device)
    _check(lambda be, h, w, t, b: mmfast.ops.linear_cross_entropy(h, w, t, bias=b, backend=be),
           [hidden, weight, target_leaf, bias], [same, view_w, lambda t: t[::2], view_b])


@pytest.mark.parametrize("kind", KINDS)
def test_cross_attention_gate_and_residual(kind, device):
    q = torch.randn(2, 5, 2, 32, device=device)
    k, v = torch.randn(2, 7, 1, 32, device=device), torch.randn(2, 7, 1, 32, device=device)
    gate, view_g = _strided((2,), device, kind=kind)
    residual, view_r = _strided((2, 5, 2, 32), device, kind="every_other")
    _check(lambda be, q, k, v, g, r: mmfast.ops.cross_attention(q, k, v, gate=g, residual=r, backend=be),
           [q, k, v, gate, residual], [same, same, same, view_g, view_r])


def test_attention_strided_heads_and_rotary(device):
    q, view_q = _strided((12, 2, 32), device, kind="every_other")
    k, view_k = _strided((12, 1, 32), device, kind="every_other")
    v = torch.randn(12, 1, 32, device=device)
    cos, view_c = _strided((12, 8), device, kind="every_other")
    sin, view_s = _strided((12, 8), device, kind="broadcast")
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    _check(lambda be, q, k, v, c, s: mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, rotary=(c, s),
                                                            backend=be),
           [q, k, v, cos, sin], [view_q, view_k, same, view_c, view_s], constant=(3, 4))
