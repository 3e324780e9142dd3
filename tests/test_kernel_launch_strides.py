"""Every launcher of mmfast.kernels takes its tensor arguments with any strides (issue 16,
item 1): a kernel either receives a tensor's strides or the launcher makes the tensor
contiguous first, so memory safety and correctness do not depend on the op layer.

Each case runs a launcher twice: on contiguous arguments, and on twins of them whose last
dim has stride 2, with NaN (integers: 0) in the gaps, so that a kernel reading the twin
as contiguous reads the gaps. The results must be identical, bit for bit
(the launcher's copy computes exactly what the contiguous call does).
"""

import pytest
import torch

pytest.importorskip("triton")

from mmfast.kernels import (activation, adaln, attention, attention_dropout, attention_rel_pos,  # noqa: E402
                            attention_short, channel_rms_norm, contrastive, cross_attention, group_norm,
                            linear_cross_entropy, norm, patch_embed, rotary, scheduler_step)


def _twin(t):
    """``t``'s values in a view with stride 2 in the last dim, the gaps NaN (integers: 0,
    in range, so that a misreading kernel gives wrong numbers rather than a crash)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    fill = float("nan") if t.is_floating_point() else 0
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in _flat(r)]
    return []


def _same_with_strided_twins(launch, *args, keep=()):
    """launch(*args) == launch(*twins) bit for bit; args at indices in ``keep`` are not twinned."""
    want = _flat(launch(*args))
    got = _flat(launch(*(a if i in keep else _twin(a) for i, a in enumerate(args))))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0)) and torch.equal(g.isnan(), w.isnan()), (
            f"max difference {(g.double() - w.double()).abs().nan_to_num(float('inf')).max()}")


def _r(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


def test_norm(device):
    x, res, w, b = _r(5, 64, device=device), _r(5, 64, device=device), _r(64, device=device), _r(64, device=device)
    for is_rms in (True, False):
        _same_with_strided_twins(lambda *a: norm.norm_fwd(*a, 1e-5, is_rms), x, w, b, res)
        _, h, mean, rstd = norm.norm_fwd(x, w, b, None, 1e-5, is_rms)
        h = x
        stats = (mean if not is_rms else rstd, rstd)
        _same_with_strided_twins(lambda dy, h, w, m, r, dres: norm.norm_bwd(dy, h, w, True, m, r, dres, is_rms),
                                 _r(5, 64, device=device), h, w, *stats, _r(5, 64, device=device))


def test_group_norm(device):
    x, w, b = _r(2, 8, 3, 5, device=device), _r(8, device=device), _r(8, device=device)
    _same_with_strided_twins(lambda *a: group_norm.group_norm_fwd(*a, 4, 1e-5, True), x, w, b)
    _, mean, rstd = group_norm.group_norm_fwd(x, w, b, 4, 1e-5, True)
    _same_with_strided_twins(lambda *a: group_norm.group_norm_bwd(*a, 4, True),
                             _r(2, 8, 3, 5, device=device), x, w, b, mean, rstd)


def test_channel_rms_norm(device):
    x, w, b = _r(2, 6, 3, 4, 5, device=device), _r(6, device=device), _r(6, device=device)
    for silu in (False, True):
        _same_with_strided_twins(lambda *a: channel_rms_norm.channel_rms_norm_fwd(*a, silu), x, w, b)
        _same_with_strided_twins(lambda x, w: channel_rms_norm.channel_rms_norm_fwd(x, w, None, silu), x, w)


def test_patch_embed(device):
    pixels, w2 = _r(2, 3, 8, 8, device=device), _r(16, 48, device=device)
    bias, pos, cls = _r(16, device=device), _r(5, 16, device=device), _r(16, device=device)
    _same_with_strided_twins(lambda *a: patch_embed.patch_embed_fwd(*a, 4), pixels, w2, bias, pos, cls)
    rows = _r(10, 48, device=device)
    _same_with_strided_twins(lambda *a: patch_embed.patch_embed_fwd(*a, None, None, 4), rows, w2, bias)
    _same_with_strided_twins(lambda *a: patch_embed.patch_embed_bwd(*a, 4, True, True, True),
                             _r(2, 5, 16, device=device), pixels, w2)
    _same_with_strided_twins(lambda *a: patch_embed.patch_embed_bwd(*a, 4, False, True, True),
                             _r(10, 16, device=device), rows, w2)


def test_activation(device):
    x, dy = _r(4, 24, device=device), _r(4, 24, device=device)
    _same_with_strided_twins(lambda x: activation.act_fwd(x, "gelu"), x)
    _same_with_strided_twins(lambda dy, x: activation.act_bwd(dy, x, "gelu"), dy, x)
    _same_with_strided_twins(lambda g, u: activation.gated_fwd(g, u, "silu"), x, _r(4, 24, device=device))
    _same_with_strided_twins(lambda d, g, u: activation.gated_bwd(d, g, u, "silu"), dy, x, _r(4, 24, device=device))
    _same_with_strided_twins(lambda x: activation.gated_split_fwd(x, "silu", True), _r(4, 48, device=device))
    _same_with_strided_twins(lambda d, x: activation.gated_split_bwd(d, x, "silu", True), dy, _r(4, 48, device=device))


def test_adaln(device):
    x, shift, scale = _r(2, 5, 32, device=device), _r(2, 32, device=device), _r(2, 32, device=device)
    _same_with_strided_twins(lambda *a: adaln.adaln_fwd(*a, 1e-6), x, shift, scale)
    _, mean, rstd = adaln.adaln_fwd(x, shift, scale, 1e-6)
    _same_with_strided_twins(adaln.adaln_bwd, _r(2, 5, 32, device=device), x, scale, mean, rstd)
    _same_with_strided_twins(adaln.gated_residual_fwd, x, shift, _r(2, 5, 32, device=device))
    _same_with_strided_twins(adaln.gated_residual_bwd, _r(2, 5, 32, device=device), shift, x)


def test_rotary(device):
    q, k = _r(6, 2, 16, device=device), _r(6, 1, 16, device=device)
    cos, sin = _r(6, 8, device=device), _r(6, 8, device=device)
    _same_with_strided_twins(lambda *a: rotary.rotary(*a, False, False), q, k, cos, sin)


def test_contrastive(device):
    x, y, scale, bias = _r(6, 32, device=device), _r(5, 32, device=device), torch.tensor(2.0), torch.tensor(-1.0)
    _same_with_strided_twins(lambda x, y: contrastive.softmax_lse_rows(x, y, scale, 0), x, y)
    _same_with_strided_twins(lambda x, y: contrastive.softmax_lse_cols(x, y, scale, 0), x, y)
    _same_with_strided_twins(lambda x, y: contrastive.sigmoid_rows(x, y, scale, bias, 0), x, y)
    stats_r, _ = contrastive.softmax_lse_rows(x, y, scale, 0)
    stats_c, _ = contrastive.softmax_lse_cols(x, y, scale, 0)
    coef = torch.tensor([0.5, 0.25])
    for fn in (contrastive.contrastive_bwd_rows, contrastive.contrastive_bwd_cols):
        _same_with_strided_twins(lambda x, y, sr, sc, c: fn(x, y, scale, None, sr, sc, c, 0, None, "clip", False,
                                                            torch.float32), x, y, stats_r, stats_c, coef)
    _same_with_strided_twins(lambda x, y, t: contrastive.count_above(x, y, t, False), x, y, _r(6, device=device))


def test_linear_cross_entropy(device):
    logits, target = _r(7, 40, device=device), torch.randint(0, 40, (7,), device=device)
    scale = torch.ones(7, device=device)
    # logits with a non-unit stride are refused (see the op); the target is read flat.
    _same_with_strided_twins(lambda l, t, s: linear_cross_entropy.linear_cross_entropy_fwd(l, t, s, -100, 0.0, 0.0,
                                                                                          False),
                             logits, target, scale, keep=(0,))


def test_attention_dropout_mask(device):
    seed = torch.tensor([5, 7], dtype=torch.int64, device=device)
    _same_with_strided_twins(lambda s: attention_dropout.dropout_mask(s, 0, 8, 16, 1, 2**30), seed)


def _packed(device, lengths=(3, 9, 5)):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    t = sum(lengths)
    return _r(t, 2, 32, device=device), _r(t, 1, 32, device=device), _r(t, 1, 32, device=device), cu


@pytest.mark.parametrize("kernels", ["general", "short"])
def test_attention(kernels, device):
    fwd, bwd = {"general": (attention.attention_fwd, attention.attention_bwd),
                "short": (attention_short.attention_short_fwd, attention_short.attention_short_bwd)}[kernels]
    q, k, v, cu = _packed(device)
    scale = 32**-0.5
    _same_with_strided_twins(lambda q, k, v, cq, ck: fwd(q, k, v, cq, ck, 9, 9, 4, 0, scale), q, k, v, cu, cu)
    out, lse = fwd(q, k, v, cu, cu, 9, 9, 4, 0, scale)
    _same_with_strided_twins(lambda do, q, k, v, o, lse, dlse, cq, ck: bwd(do, q, k, v, o, lse, dlse, cq, ck, 9, 9, 4,
                                                                           0, scale),
                             _r(*q.shape, device=device), q, k, v, out, lse, _r(*lse.shape, device=device), cu, cu)


def test_attention_rotary_tables(device):
    q, k, v, cu = _packed(device)
    cos, sin = _r(17, 8, device=device), _r(17, 8, device=device)
    _same_with_strided_twins(lambda c, s: attention.attention_fwd(q, k, v, cu, cu, 9, 9, -1, -1, 0.2, c, s), cos, sin)


def test_cross_attention(device):
    q, k, v, cu = _packed(device)
    residual, alpha = _r(*q.shape, device=device), _r(2, device=device)
    scale = 32**-0.5

    def fwd(q, k, v, cq, ck, a, r):
        return cross_attention.cross_attention_fwd(q, k, v, cq, ck, 3, 0, 0, 9, 9, None, a, r, scale)
    _same_with_strided_twins(fwd, q, k, v, cu, cu, alpha, residual)
    out, o, lse = fwd(q, k, v, cu, cu, alpha, residual)
    _same_with_strided_twins(lambda do, q, k, v, o, lse, cq, ck, a: cross_attention.cross_attention_bwd(
        do, q, k, v, o, lse, cq, ck, 3, 0, 0, 9, 9, None, a, scale), _r(*q.shape, device=device), q, k, v, o, lse,
        cu, cu, alpha)


def test_guided_step_refuses_strided_outputs(device):
    n = 8
    sample, model_out = _r(2, n, device=device), _r(2, n, device=device)
    out = torch.empty(2, 2 * n, device=device)[:, ::2]
    with pytest.raises(ValueError, match="out: expected a contiguous tensor"):
        scheduler_step.guided_step_fwd(sample, model_out, None, None, None, out, None, (0.0,) * 8, None, None,
                                       1.0, 0.0, False, False)


def test_attention_rel_pos(device):
    q, k, v = (_r(2, 6, 2, 16, device=device) for _ in range(3))
    rel_h, rel_w = _r(2, 6, 2, 2, device=device), _r(2, 6, 2, 3, device=device)
    _same_with_strided_twins(lambda *a: attention_rel_pos.attention_rel_pos_fwd(*a, 0.25), q, k, v, rel_h, rel_w)
    out, stats = attention_rel_pos.attention_rel_pos_fwd(q, k, v, rel_h, rel_w, 0.25)
    _same_with_strided_twins(lambda *a: attention_rel_pos.attention_rel_pos_bwd(*a, 0.25),
                             _r(2, 6, 2, 16, device=device), q, k, v, rel_h, rel_w, out, stats)
