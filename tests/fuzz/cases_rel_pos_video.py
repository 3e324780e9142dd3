"""Fuzz variants of the SAM and Wan ops: attention with a decomposed relative-position
bias, the bias pieces from their tables, and the channel-first RMS norm (+SiLU)."""

from __future__ import annotations

import torch

import mmfast.ops as ops

from tests.fuzz.inputs import randn, strided, with_inf, with_nan
from tests.fuzz.spec import V, cases


def _rel_pos_variants() -> list[V]:
    def make(b=2, grid=(3, 4), key_grid=None, heads=2, dim=16, dtype=torch.float32, q_view=None, k_view=None,
             nan_query=False, inf_bias=False, rel_w_cols=None, scale=None):
        kh, kw = key_grid or grid
        tq, tk = grid[0] * grid[1], kh * kw

        def build(g):
            q, k, v = (randn(g, b, t, heads, dim, dtype=dtype) for t in (tq, tk, tk))
            rel_h = randn(g, b, tq, heads, kh, dtype=dtype)
            rel_w = randn(g, b, tq, heads, rel_w_cols or kw, dtype=dtype)
            if nan_query:
                q = with_nan(q, (0, 1, 0, 3))
            if inf_bias:
                rel_h = with_inf(rel_h, (1, 0, 1, 0))  # +inf on one key row: the softmax is NaN there
            if q_view:
                q = q_view(q)
            if k_view:
                k = k_view(k)
            return (q, k, v, rel_h, rel_w), ({} if scale is None else {"scale": scale})
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)),
        V("window_14x14_hd64", make(b=1, grid=(14, 14), dim=64)),
        V("fewer_queries_than_keys", make(grid=(2, 3), key_grid=(4, 5))),
        V("one_key", make(grid=(1, 1), key_grid=(1, 1))),
        V("head_dim_8", make(dim=8)),
        V("zero_batch", make(b=0)),
        V("q_strided", make(q_view=lambda t: strided(t, -1))),
        V("k_heads_strided", make(k_view=lambda t: strided(t, 2))),
        V("nan_query_isolated", make(nan_query=True)),
        V("inf_bias", make(inf_bias=True)),
        V("scale_given", make(scale=0.5)),
        V("rel_w_not_the_key_grid", make(rel_w_cols=5), expect="error"),
    ]


def _decomposed_variants() -> list[V]:
    def make(b=2, grid=(3, 4), key_grid=(5, 2), heads=2, dim=8, dtype=torch.float32, bad_grid=None, bad_h=False):
        def build(g):
            q = randn(g, b, grid[0] * grid[1], heads, dim, dtype=dtype)
            table_h = randn(g, grid[0] + (1 if bad_h else 0), key_grid[0], dim, dtype=dtype)
            table_w = randn(g, grid[1], key_grid[1], dim, dtype=dtype)
            return (q, table_h, table_w, bad_grid or grid), {}
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("fp64", make(dtype=torch.float64)),
        V("zero_batch", make(b=0)),
        V("grid_not_the_tokens", make(bad_grid=(4, 4)), expect="error"),
        V("table_h_rows_wrong", make(bad_h=True), expect="error"),
    ]


def _channel_rms_variants() -> list[V]:
    def make(shape=(2, 8, 3, 4, 5), dtype=torch.float32, activation="silu", bias=True, x_view=None,
             nan=False, weight_len=None):
        def build(g):
            x = randn(g, *shape, dtype=dtype)
            if nan:
                x = with_nan(x, (0, 1, 0, 0, 0))  # one position's channel vector: only it goes NaN
            if x_view:
                x = x_view(x)
            weight = randn(g, weight_len or shape[1], dtype=dtype)
            b = randn(g, shape[1], dtype=dtype) if bias else None
            return (x, weight, b, activation), {}
        return build

    return [
        V("fp32_silu", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("no_activation", make(activation=None)),
        V("no_bias", make(bias=False)), V("image_4d", make(shape=(2, 8, 5, 6))),
        V("one_channel", make(shape=(2, 1, 3, 4, 5))), V("zero_frames", make(shape=(1, 8, 0, 4, 4))),
        V("x_channels_last", make(shape=(2, 8, 5, 6), x_view=lambda t: t.contiguous(memory_format=torch.channels_last))),
        V("x_strided", make(x_view=lambda t: strided(t, -1))),
        V("zero_vector", make(shape=(1, 4, 1, 1, 1), x_view=lambda t: t * 0)),
        V("nan_position_isolated", make(nan=True)),
        V("weight_wrong_length", make(weight_len=7), expect="error"),
        V("activation_bad", make(activation="relu"), expect="error"),
    ]


def all_cases():
    return (
        cases(ops.attention_rel_pos, "attention_rel_pos", _rel_pos_variants())
        + cases(ops.decomposed_rel_pos, None, _decomposed_variants())
        + cases(ops.channel_rms_norm, "channel_rms_norm", _channel_rms_variants())
    )
