"""Fuzz variants of attention and cross_attention: layouts, dtypes, head dims, strides,
empty and one-token segments, NaN isolation between segments, and every cu_seqlens /
max_seqlen / window violation."""

from __future__ import annotations

import torch

import mmfast.ops as ops

from tests.fuzz.inputs import cu, randn, strided, with_nan
from tests.fuzz.spec import V, cases

SEGMENTS = (0, 3, 7, 12)  # lengths 3, 4, 5


def _packed(cu_q=SEGMENTS, cu_k=None, h=2, hk=2, d=32, dtype=torch.float32, kwargs=None, q_view=None, k_view=None,
            cu_view=None, nan_k=None, tokens_q=None, tokens_k=None, scale=1.0):
    cu_k = cu_q if cu_k is None else cu_k

    def build(g):
        tq = cu_q[-1] if tokens_q is None else tokens_q
        tk = cu_k[-1] if tokens_k is None else tokens_k
        q = randn(g, tq, h, d, dtype=dtype, scale=scale)
        k = randn(g, tk, hk, d, dtype=dtype, scale=scale)
        v = randn(g, tk, hk, d, dtype=dtype)
        if nan_k is not None:
            k = with_nan(k, nan_k)
        if q_view:
            q = q_view(q)
        if k_view:
            k, v = k_view(k), k_view(v)
        cq, ck = cu(*cu_q), cu(*cu_k)
        if cu_view:
            cq, ck = cu_view(cq), cu_view(ck)
        kw = {"cu_seqlens_q": cq, "cu_seqlens_k": ck}
        kw.update(kwargs or {})
        return (q, k, v), kw
    return build


def _padded(b=2, tq=5, tk=5, h=2, hk=2, d=32, dtype=torch.float32, kwargs=None, q_view=None):
    def build(g):
        q = randn(g, b, tq, h, d, dtype=dtype)
        if q_view:
            q = q_view(q)
        return (q, randn(g, b, tk, hk, d, dtype=dtype), randn(g, b, tk, hk, d, dtype=dtype)), dict(kwargs or {})
    return build


def _strided_cu(c: torch.Tensor) -> torch.Tensor:
    return torch.stack([c, c], 1)[:, 0]  # issue 16's example: stride 2


def _common(max_key: str) -> list[V]:
    """Variants both ops take (their q/k/v/cu_seqlens/max_seqlen contract is the same)."""
    return [
        V("fp32", _packed()), V("fp16", _packed(dtype=torch.float16)), V("bf16", _packed(dtype=torch.bfloat16)),
        V("fp64", _packed(dtype=torch.float64)), V("gqa", _packed(h=4, hk=2)), V("mqa", _packed(h=4, hk=1)),
        V("head_dim_72", _packed(d=72)), V("head_dim_16", _packed(d=16)),
        V("max_seqlen_given", _packed(kwargs={"max_seqlen_q": 5, "max_seqlen_k": 5})),
        V("max_seqlen_larger", _packed(kwargs={"max_seqlen_q": 64, "max_seqlen_k": 300})),
        V("segment_len_0_and_1", _packed(cu_q=(0, 0, 1, 6), cu_k=(0, 2, 3, 3))),
        V("no_tokens", _packed(cu_q=(0, 0), cu_k=(0, 0))),
        V("no_segments", _packed(cu_q=(0,), cu_k=(0,))),
        V("padded", _padded()), V("padded_tq_1", _padded(tq=1, tk=9)),
        V("q_strided_tokens", _packed(q_view=lambda q: strided(q, 0))),
        V("q_strided_heads", _packed(q_view=lambda q: strided(q, 1))),
        V("kv_strided_dim", _packed(k_view=lambda k: strided(k, 2))),
        V("padded_q_transposed", _padded(q_view=lambda q: q.transpose(1, 2).contiguous().transpose(1, 2))),
        V("scale", _packed(kwargs={"scale": 0.3})),
        V("fp16_large_logits", _packed(dtype=torch.float16, scale=30.0)),
        V("nan_in_one_segment", _packed(nan_k=(4, 0, 3)), features=("nan_isolation",)),
        # cu_seqlens / max_seqlen contract
        V("cu_strided", _packed(cu_view=_strided_cu), features=("cu_strided",)),
        V("cu_strided_max_given", _packed(cu_view=_strided_cu, kwargs={"max_seqlen_q": 5, "max_seqlen_k": 5}),
          features=("cu_strided",)),
        V("max_seqlen_too_small", _packed(cu_q=(0, 40, 80), kwargs={"max_seqlen_q": 8, "max_seqlen_k": 8}),
          expect="either", features=("max_seqlen_small",)),
        V("max_seqlen_zero", _packed(kwargs={"max_seqlen_q": 0, "max_seqlen_k": 0}), expect="either",
          features=("max_seqlen_small",)),
        V("max_seqlen_negative", _packed(kwargs={"max_seqlen_q": -1, "max_seqlen_k": 5}), expect="error"),
        V("max_seqlen_float", _packed(kwargs={"max_seqlen_q": 5.0, "max_seqlen_k": 5}), expect="error"),
        V("cu_last_past_tokens", _packed(tokens_q=12, cu_q=(0, 3, 7, 20), tokens_k=12, cu_k=(0, 3, 7, 12),
                                         kwargs={"max_seqlen_q": 13, "max_seqlen_k": 5}),
          expect="error", isolate=True, features=("cu_out_of_range",)),
        V("cu_negative_entry", _packed(tokens_q=12, cu_q=(0, -3, 7, 12), kwargs={"max_seqlen_q": 10, "max_seqlen_k": 5}),
          expect="error", isolate=True, features=("cu_out_of_range",)),
        V("cu_last_below_tokens", _packed(tokens_q=12, cu_q=(0, 3, 7, 10), tokens_k=12, cu_k=(0, 3, 7, 10),
                                          kwargs={"max_seqlen_q": 4, "max_seqlen_k": 4}),
          expect="error", isolate=True, features=("cu_out_of_range",)),
        V("cu_last_below_tokens_no_max", _packed(tokens_q=12, cu_q=(0, 3, 7, 10), tokens_k=12, cu_k=(0, 3, 7, 10)),
          expect="error"),
        V("cu_decreasing", _packed(cu_q=(0, 7, 3, 12)), expect="error"),
        V("cu_first_not_zero", _packed(tokens_q=12, cu_q=(2, 3, 7, 12)), expect="error"),
        V("cu_int64", _packed(cu_view=lambda c: c.long()), expect="error"),
        V("cu_2d", _packed(cu_view=lambda c: c[None]), expect="error"),
        V("cu_counts_differ", _packed(cu_k=(0, 12)), expect="error"),
        V("kv_heads_not_dividing", _packed(h=3, hk=2), expect="error"),
        V("head_dims_differ", lambda g: ((randn(g, 12, 2, 32), randn(g, 12, 2, 16), randn(g, 12, 2, 16)),
                                         {"cu_seqlens_q": cu(*SEGMENTS), "cu_seqlens_k": cu(*SEGMENTS)}), expect="error"),
        V("dtypes_differ", lambda g: ((randn(g, 12, 2, 32), randn(g, 12, 2, 32, dtype=torch.float16),
                                       randn(g, 12, 2, 32, dtype=torch.float16)),
                                      {"cu_seqlens_q": cu(*SEGMENTS), "cu_seqlens_k": cu(*SEGMENTS)}), expect="error"),
        V("int_q", lambda g: ((torch.ones(12, 2, 32, dtype=torch.int32),) * 3,
                              {"cu_seqlens_q": cu(*SEGMENTS), "cu_seqlens_k": cu(*SEGMENTS)}), expect="error"),
        V("packed_without_cu", lambda g: ((randn(g, 12, 2, 32),) * 3, {}), expect="error"),
        V("scale_nan", _packed(kwargs={"scale": float("nan")}), expect="error"),
        V("dropout_p_1.5", _packed(kwargs={"dropout_p": 1.5}), expect="error"),
    ]


def _attention_only() -> list[V]:
    return [
        V("causal", _packed(kwargs={"causal": True})),
        V("causal_cross_lengths", _packed(cu_q=(0, 2, 3, 6), cu_k=(0, 5, 7, 12), kwargs={"causal": True})),
        V("window_2_0", _packed(kwargs={"window": (2, 0)})), V("window_0_0", _packed(kwargs={"window": (0, 0)})),
        V("window_1_3", _packed(kwargs={"window": (1, 3)})), V("padded_causal", _padded(tq=3, tk=6, kwargs={"causal": True})),
        V("window_minus_5", _packed(kwargs={"window": (-5, 0)}), expect="error"),
        V("window_not_pair", _packed(kwargs={"window": 3}), expect="error"),
        V("window_float", _packed(kwargs={"window": (2.0, 0)}), expect="error"),
        V("causal_not_bool", _packed(kwargs={"causal": "yes"}), expect="either"),
    ]


def _cross_only() -> list[V]:
    def gated(g):
        args, kw = _packed(h=4, hk=2)(g)
        kw.update({"gate": randn(g, 4), "residual": randn(g, *args[0].shape)})
        return args, kw

    return [
        V("few_queries_many_keys", _packed(cu_q=(0, 2, 4), cu_k=(0, 40, 75))),
        V("sample_without_keys", _packed(cu_q=(0, 2, 4), cu_k=(0, 0, 9))),
        V("gate_residual", gated),
        V("gate_wrong_size", lambda g: (_packed(h=4)(g)[0], {**_packed(h=4)(g)[1], "gate": randn(g, 3)}), expect="error"),
    ]


def all_cases():
    return (cases(ops.attention, "attention", _common("attention") + _attention_only())
            + cases(ops.cross_attention, "cross_attention", _common("cross_attention") + _cross_only()))
