"""The long tier's seeded random variants: shapes, dtypes, layouts, head and group
counts, segment lengths (0 and 1 included), windows, NaN placement. The structure of a
variant is drawn at catalog time from its id (so its features are known before it runs);
its values come from the case's generator, like every other case."""

from __future__ import annotations

import random
import zlib

import torch

import mmfast.ops as ops
from mmfast.ops.attention import attention_mask

from tests.fuzz.cases_attention import _packed, _padded
from tests.fuzz.harness import SEED
from tests.fuzz.inputs import cu, randn, stride0_vector, strided, transposed, with_nan
from tests.fuzz.spec import V, cases

PER_OP = 25
DTYPES = (torch.float32, torch.float16, torch.float32, torch.bfloat16)  # fp32 twice: most kernels' main case


def _rng(op: str, i: int) -> random.Random:
    return random.Random(zlib.crc32(f"{op}/{i}".encode()) ^ SEED)


def _view(r: random.Random):
    return r.choice([None, lambda t: strided(t, 0), lambda t: strided(t, -1),
                     lambda t: transposed(t) if t.dim() == 2 else t])


def _norm(i: int, layer: bool) -> V:
    r = _rng("norm", i)
    n, c, dtype = r.choice([0, 1, 3, 17]), r.choice([1, 7, 64, 130, 257]), r.choice(DTYPES)
    x_view, p_view = _view(r), r.choice([None, None, "stride2", "stride0"])
    residual, scale = r.random() < 0.3, r.choice([1.0, 1.0, 300.0])

    def build(g):
        x = randn(g, n, c, dtype=dtype, scale=scale)
        x = x_view(x) if x_view else x
        params = [randn(g, c, dtype=dtype) for _ in range(2 if layer else 1)]
        if p_view == "stride2":
            params = [strided(p) for p in params]
        elif p_view == "stride0":
            params = [stride0_vector(g, c, dtype) for _ in params]
        return (x, *params), ({"residual": randn(g, n, c, dtype=dtype)} if residual else {})

    # A strided parameter is read wrongly only where there is a row and more than one element.
    misread = p_view is not None and n > 0 and c > 1
    return V(f"random{i}_{n}x{c}_{str(dtype)[6:]}_{p_view}", build, features=("param_strided",) if misread else ())


def _activation(i: int, gated: bool) -> V:
    r = _rng("activation", i)
    shape = tuple(r.choice([0, 1, 2, 5, 33, 128]) for _ in range(r.choice([1, 2, 3])))
    if gated and shape and shape[-1] % 2:
        shape = shape[:-1] + (shape[-1] + 1,)
    dtype, view, nan = r.choice(DTYPES), _view(r) if len(shape) >= 2 else None, r.random() < 0.2

    def build(g):
        x = randn(g, *shape, dtype=dtype, scale=r.choice([1.0, 10.0]))
        if nan and x.numel():
            x = with_nan(x, tuple(0 for _ in shape))
        x = view(x) if view else x
        return ((x, randn(g, *x.shape, dtype=dtype)) if gated else (x,)), {}

    return V(f"random{i}_{'x'.join(map(str, shape))}_{str(dtype)[6:]}", build)


def _segments(r: random.Random, count: int, longest: int) -> tuple:
    lengths = [r.choice([0, 1, r.randint(2, longest)]) for _ in range(count)]
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return tuple(out)


def _attention(i: int, cross: bool) -> V:
    r = _rng("cross_attention" if cross else "attention", i)
    dtype = r.choice((torch.float32, torch.float16))
    d = r.choice([32, 40, 64, 72, 80, 128])
    h, hk = r.choice([(1, 1), (2, 1), (4, 2), (3, 3), (4, 1)])
    if r.random() < 0.2:
        build = _padded(b=r.randint(1, 3), tq=r.randint(1, 9), tk=r.randint(1, 9), h=h, hk=hk, d=d, dtype=dtype)
        return V(f"random{i}_padded_d{d}_h{h}/{hk}_{str(dtype)[6:]}", build)
    count = r.randint(1, 4)
    cu_q = _segments(r, count, 6 if cross else 30)
    cu_k = cu_q if (not cross and r.random() < 0.6) else _segments(r, count, 40)
    kwargs = {}
    if not cross:
        kwargs["causal"] = r.random() < 0.4
        if r.random() < 0.4:
            kwargs["window"] = (r.choice([-1, 0, 2, 7]), r.choice([-1, 0, 3]))
    lengths = [b - a for a, b in zip(cu_q, cu_q[1:])]
    if r.random() < 0.5:
        kwargs["max_seqlen_q"] = max(lengths, default=0) + r.choice([0, 0, 5])
        kwargs["max_seqlen_k"] = max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0) + r.choice([0, 0, 9])
    view = r.choice([None, None, "q", "kv"])
    q_view = (lambda t: strided(t, r.choice([0, 1, 2]))) if view == "q" else None
    k_view = (lambda t: strided(t, 2)) if view == "kv" else None
    nan_token, features = None, ()
    if r.random() < 0.25 and cu_k[-1] > 0:
        nan_token = r.randrange(cu_k[-1])
        # A query that does not see this key must stay finite (SDPA spreads it: item 5).
        left, right = kwargs.get("window", (-1, -1))
        right = 0 if kwargs.get("causal") else right
        sees = attention_mask(cu(*cu_q), cu(*cu_k), cu_q[-1], cu_k[-1], left, right, "cpu")
        if (~sees[:, nan_token]).any():
            features = ("nan_isolation",)
    build = _packed(cu_q=cu_q, cu_k=cu_k, h=h, hk=hk, d=d, dtype=dtype, kwargs=kwargs, q_view=q_view,
                    k_view=k_view, nan_k=(nan_token, 0, 1) if nan_token is not None else None)
    return V(f"random{i}_cu{list(cu_q)}_{list(cu_k)}_d{d}_h{h}/{hk}_{str(dtype)[6:]}", build, features=features)


def _lce(i: int) -> V:
    r = _rng("linear_cross_entropy", i)
    n, c, v = r.choice([0, 1, 5, 33]), r.choice([8, 24, 65]), r.choice([1, 2, 30, 257])
    dtype = r.choice((torch.float32, torch.float16, torch.bfloat16))
    kwargs = {"reduction": r.choice(["mean", "sum", "none"])}
    if r.random() < 0.3:
        kwargs["label_smoothing"] = r.choice([0.1, 1.0])
    if r.random() < 0.3:
        kwargs["z_loss"] = 1e-3
    ignore = r.random() < 0.5
    h_view, w_view = _view(r), r.choice([None, transposed])

    def build(g):
        h, w = randn(g, n, c, dtype=dtype), randn(g, v, c, dtype=dtype, scale=0.3)
        target = torch.randint(0, v, (n,), generator=g)
        if ignore and n:
            target[::2] = -100
        return ((h_view(h) if h_view else h), (w_view(w) if w_view else w), target), dict(kwargs)

    return V(f"random{i}_{n}x{c}_v{v}_{str(dtype)[6:]}_{kwargs['reduction']}", build)


def _contrastive(i: int, kind: str) -> V:
    r = _rng(kind, i)
    b, d, dtype = r.choice([1, 2, 7, 33, 70]), r.choice([3, 16, 64]), r.choice(DTYPES)
    view, logit = _view(r), r.choice([1.0, 14.3, 100.0])

    def build(g):
        x, y = randn(g, b, d, dtype=dtype), randn(g, b, d, dtype=dtype)
        x, y = (view(x), view(y)) if view else (x, y)
        return ((x, y, logit, -5.0) if kind == "siglip" else (x, y, logit)), {}

    return V(f"random{i}_{b}x{d}_{str(dtype)[6:]}", build)


def _group_norm(i: int) -> V:
    r = _rng("group_norm", i)
    groups = r.choice([1, 2, 4, 8])
    c = groups * r.choice([1, 2, 3])
    n, h, w = r.choice([1, 2]), r.choice([1, 3, 8]), r.choice([1, 5, 9])
    dtype, cl, p_view = r.choice(DTYPES), r.random() < 0.4, r.choice([None, None, "stride2"])

    def build(g):
        x = randn(g, n, c, h, w, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        weight, bias = randn(g, c, dtype=dtype), randn(g, c, dtype=dtype)
        if p_view:
            weight, bias = strided(weight), strided(bias)
        return (x, groups, weight, bias), {"activation": r.choice([None, "silu"])}

    misread = p_view is not None and c > 1  # a strided one-element parameter reads right
    return V(f"random{i}_{n}x{c}x{h}x{w}_g{groups}_{str(dtype)[6:]}_{'cl' if cl else 'nchw'}_{p_view}", build,
             features=("param_strided",) if misread else ())


def all_cases():
    n = range(PER_OP)
    return (
        cases(ops.rms_norm, "norm", [_norm(i, False) for i in n])
        + cases(ops.layer_norm, "norm", [_norm(i + 1000, True) for i in n])
        + cases(ops.gelu, "activation", [_activation(i, False) for i in n])
        + cases(ops.swiglu, "activation", [_activation(i + 1000, True) for i in n])
        + cases(ops.attention, "attention", [_attention(i, False) for i in n])
        + cases(ops.cross_attention, "cross_attention", [_attention(i, True) for i in n])
        + cases(ops.linear_cross_entropy, "linear_cross_entropy", [_lce(i) for i in n])
        + cases(ops.clip_loss, "contrastive", [_contrastive(i, "clip") for i in n])
        + cases(ops.siglip_loss, "contrastive", [_contrastive(i, "siglip") for i in n])
        + cases(ops.group_norm, "group_norm", [_group_norm(i) for i in n])
    )
