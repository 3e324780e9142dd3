"""Fuzz variants of the row-wise and element-wise ops: norms, activations, adaLN, group
norm, rotary, timestep embedding and the scheduler step."""

from __future__ import annotations

import math

import torch

import mmfast.ops as ops
from mmfast.ops import StepCoefficients

from tests.fuzz.inputs import broadcast, randn, stride0_vector, strided, transposed, with_inf, with_nan
from tests.fuzz.spec import V, cases


def _norm_variants(layer: bool) -> list[V]:
    def make(n=5, c=64, dtype=torch.float32, x_view=None, w_view=None, b_view=None, residual=False,
             nan_row=None, scale=1.0, no_weight=False, eps=None):
        def build(g):
            x = randn(g, n, c, dtype=dtype, scale=scale)
            if nan_row is not None:
                x = with_nan(x, (nan_row, 3))
            if x_view:
                x = x_view(x)
            w = None if no_weight else randn(g, c, dtype=dtype)
            if w is not None and w_view:
                w = w_view(g, w)
            args = [x, w]
            if layer:
                b = randn(g, c, dtype=dtype)
                args.append(b_view(g, b) if b_view else b)
            kwargs = {}
            if residual:
                kwargs["residual"] = randn(g, n, c, dtype=dtype)
            if eps is not None:
                kwargs["eps"] = eps
            return tuple(args), kwargs
        return build

    vs = [
        V("fp32", make()),
        V("fp16", make(dtype=torch.float16)),
        V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)),
        V("odd_hidden_67", make(c=67)),
        V("hidden_1", make(c=1)),
        V("rank3", make(n=6, c=40, x_view=lambda x: x.reshape(2, 3, 40))),
        V("zero_rows", make(n=0)),
        V("x_strided_rows", make(x_view=lambda x: strided(x, 0))),
        V("x_strided_cols", make(x_view=lambda x: strided(x, -1))),
        V("x_transposed", make(x_view=transposed)),
        V("weight_stride2", make(w_view=lambda g, w: strided(w)), features=("param_strided",)),
        V("weight_stride0", make(w_view=lambda g, w: stride0_vector(g, w.shape[0])), features=("param_strided",)),
        V("residual", make(residual=True)),
        V("no_weight", make(no_weight=True)),
        V("nan_row_isolated", make(nan_row=2)),
        V("fp16_large_values", make(dtype=torch.float16, scale=3e4)),
        V("eps_negative", make(eps=-1.0), expect="error"),
        V("eps_nan", make(eps=math.nan), expect="error"),
        V("weight_wrong_shape", lambda g: ((randn(g, 5, 64), randn(g, 63)) + ((randn(g, 64),) if layer else ()), {}),
          expect="error"),
        V("weight_int", lambda g: ((randn(g, 5, 64), torch.ones(64, dtype=torch.int64)) + ((randn(g, 64),) if layer else ()), {}),
          expect="error"),
        V("x_int", lambda g: ((torch.ones(5, 64, dtype=torch.int32), None) + ((None,) if layer else ()), {}),
          expect="error"),
        V("x_0d", lambda g: ((randn(g), None) + ((None,) if layer else ()), {}), expect="error"),
        V("residual_wrong_shape", lambda g: ((randn(g, 5, 64), None) + ((None,) if layer else ()),
                                             {"residual": randn(g, 4, 64)}), expect="error"),
    ]
    if layer:
        vs += [
            V("bias_stride0", make(b_view=lambda g, b: stride0_vector(g, b.shape[0])), features=("param_strided",)),
            V("bias_stride2", make(b_view=lambda g, b: strided(b)), features=("param_strided",)),
        ]
    return vs


def _activation_variants(gated: bool, approximate: bool) -> list[V]:
    def make(shape=(7, 33), dtype=torch.float32, view=None, nan=False, inf=False, scale=1.0, kwargs=None):
        def build(g):
            x = randn(g, *shape, dtype=dtype, scale=scale)
            if nan:
                x = with_nan(x, (0,) * x.dim())
            if inf:
                x = with_inf(x, (-1,) * x.dim())
            if view:
                x = view(x)
            if gated:
                up = randn(g, *x.shape, dtype=dtype)
                return (x, up), dict(kwargs or {})
            return (x,), dict(kwargs or {})
        return build

    vs = [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("rank1_prime", make(shape=(97,))),
        V("rank4", make(shape=(2, 3, 5, 7))), V("zero_size", make(shape=(0, 16))),
        V("last_dim_zero", make(shape=(5, 0))),  # gated Triton: reshape(-1, 0) raised
        V("strided", make(view=lambda x: strided(x, 0))), V("transposed", make(view=transposed)),
        V("stride0", make(shape=(1, 33), view=lambda x: broadcast(x, 0, 6))),
        V("nan", make(nan=True)), V("inf", make(inf=True)),
        V("fp16_large", make(dtype=torch.float16, scale=2e4)),
        V("int_input", lambda g: ((torch.ones(4, 4, dtype=torch.int64),) + ((torch.ones(4, 4),) if gated else ()), {}),
          expect="error"),
        V("not_a_tensor", lambda g: (([1.0, 2.0],) + ((torch.ones(2),) if gated else ()), {}), expect="error"),
    ]
    if approximate:
        vs += [V("tanh", make(kwargs={"approximate": "tanh"})),
               V("approximate_bad", make(kwargs={"approximate": "fast"}), expect="error")]
    if gated:
        vs += [
            V("one_tensor_halves", lambda g: ((randn(g, 5, 16), None), {})),
            V("one_tensor_halves_gate_second", lambda g: ((randn(g, 5, 16), None), {"gate_first": False})),
            V("one_tensor_odd", lambda g: ((randn(g, 5, 15), None), {}), expect="error"),
            V("up_shape_mismatch", lambda g: ((randn(g, 5, 16), randn(g, 5, 15)), {}), expect="error"),
            V("up_dtype_mismatch", lambda g: ((randn(g, 5, 16), randn(g, 5, 16, dtype=torch.float16)), {}),
              expect="either"),
        ]
    return vs


def _adaln_variants(gated: bool) -> list[V]:
    def make(b=2, t=7, c=48, dtype=torch.float32, per_view=None, x_view=None, nan=False):
        def build(g):
            x = randn(g, b, t, c, dtype=dtype)
            if nan:
                x = with_nan(x, (1, 2, 3))
            if x_view:
                x = x_view(x)
            p1, p2 = randn(g, b, c, dtype=dtype), randn(g, b, c, dtype=dtype)
            if per_view:
                p1, p2 = per_view(p1), per_view(p2)
            if gated:
                return (x, p1, randn(g, b, t, c, dtype=dtype)), {}
            return (x, p1, p2), {}
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("odd_c_37", make(c=37)), V("zero_tokens", make(t=0)),
        V("x_strided", make(x_view=lambda x: strided(x, 1))),
        V("per_sample_strided", make(per_view=lambda p: strided(p, -1)), features=("param_strided",)),
        V("per_sample_stride0", make(b=3, per_view=lambda p: broadcast(p[:1], 0, 3)), features=("param_strided",)),
        V("per_sample_transposed", make(per_view=transposed), features=("param_strided",)),
        V("nan_isolated", make(nan=True)),
        V("per_sample_wrong_shape", lambda g: ((randn(g, 2, 7, 48), randn(g, 2, 47), randn(g, 2, 47 if not gated else 7, 48 if gated else 47)), {}),
          expect="error"),
        V("x_rank2", lambda g: ((randn(g, 7, 48), randn(g, 7, 48), randn(g, 7, 48)), {}), expect="error"),
    ]


def _group_norm_variants() -> list[V]:
    def make(n=2, c=8, h=5, w=3, groups=4, dtype=torch.float32, cl=False, w_view=None, b_view=None,
             nan=False, activation=None, affine=True):
        def build(g):
            x = randn(g, n, c, h, w, dtype=dtype)
            if nan:
                x = with_nan(x, (0, 0, 1, 1))
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            wt = randn(g, c, dtype=dtype) if affine else None
            bs = randn(g, c, dtype=dtype) if affine else None
            if w_view:
                wt = w_view(g, wt)
            if b_view:
                bs = b_view(g, bs)
            return (x, groups, wt, bs), ({"activation": activation} if activation else {})
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("channels_last", make(cl=True)), V("silu", make(activation="silu")),
        V("one_group", make(groups=1)), V("group_per_channel", make(groups=8)), V("no_affine", make(affine=False)),
        V("zero_batch", make(n=0)), V("prime_spatial", make(h=7, w=11)),
        V("one_value_per_group", make(n=1, c=4, h=1, w=1, groups=4)),  # F.group_norm refused it
        V("weight_stride2", make(w_view=lambda g, t: strided(t)), features=("param_strided",)),
        V("weight_stride0", make(w_view=lambda g, t: stride0_vector(g, t.shape[0])), features=("param_strided",)),
        V("bias_stride0", make(b_view=lambda g, t: stride0_vector(g, t.shape[0])), features=("param_strided",)),
        V("nan_group_isolated", make(nan=True)),
        V("groups_not_dividing", make(groups=3), expect="error"),
        V("groups_zero", make(groups=0), expect="error"),
        V("activation_bad", make(activation="relu"), expect="error"),
        V("weight_wrong_shape", make(w_view=lambda g, t: t[:7]), expect="error"),
    ]


def _rotary_variants() -> list[V]:
    def make(t=9, h=4, hk=2, d=32, r=32, dtype=torch.float32, q_view=None, table_view=None, k=True,
             padded=False, kwargs=None):
        def build(g):
            shape = (2, t) if padded else (t,)
            q = randn(g, *shape, h, d, dtype=dtype)
            kk = randn(g, *shape, hk, d, dtype=dtype) if k else None
            angles = randn(g, t, r // 2, dtype=torch.float32)
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            if q_view:
                q = q_view(q)
            if table_view:
                cos, sin = table_view(cos), table_view(sin)
            return (q, kk, cos, sin), dict(kwargs or {})
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("q_only", make(k=False)), V("partial_r16", make(r=16)),
        V("interleaved", make(kwargs={"interleaved": True})), V("padded", make(padded=True)),
        V("odd_tokens_1", make(t=1)), V("zero_tokens", make(t=0)),
        V("q_strided_heads", make(q_view=lambda q: strided(q, -2))),
        V("q_strided_dim", make(q_view=lambda q: strided(q, -1))),
        V("tables_strided", make(table_view=lambda c: strided(c, -1)), features=("param_strided",)),
        V("tables_transposed", make(table_view=transposed), features=("param_strided",)),
        V("tables_stride0", make(table_view=lambda c: broadcast(c[:1], 0, c.shape[0])), features=("param_strided",)),
        V("rotary_dim_too_big", make(r=34), expect="error"),
        V("tables_wrong_tokens", make(table_view=lambda c: c[:-1]), expect="error"),
        V("interleaved_not_bool", make(kwargs={"interleaved": 1}), expect="error"),
    ]


def _timestep_variants() -> list[V]:
    def make(n=6, dim=32, dtype=torch.float32, kwargs=None, values=None):
        def build(g):
            t = (torch.rand(n, generator=g, dtype=torch.float64) * 1000).to(dtype) if values is None else values
            return (t, dim), dict(kwargs or {})
        return build

    return [
        V("fp32", make()), V("odd_dim", make(dim=33)), V("int_steps", make(dtype=torch.int64)),
        V("fp16_steps", make(dtype=torch.float16)), V("flip", make(kwargs={"flip_sin_to_cos": True, "downscale_freq_shift": 0})),
        V("zero_n", make(n=0)),
        V("dim_zero", make(dim=0), expect="error"), V("steps_2d", make(values=torch.ones(2, 3)), expect="error"),
        V("shift_div_zero", make(dim=4, kwargs={"downscale_freq_shift": 2}), expect="error"),
        V("max_period_zero", make(kwargs={"max_period": 0}), expect="error"),
    ]


def _step_variants() -> list[V]:
    coef = StepCoefficients(px=0.0, pm=0.0, cx=0.9, cm=-0.1, c0=0.05, c1=0.0, cn=0.02)

    def make(b=2, shape=(4, 5, 3), dtype=torch.float32, guided=True, pair=False, cl=False, view=None, nan=False,
             kwargs=None):
        def build(g):
            x = randn(g, b, *shape, dtype=dtype)
            m = randn(g, (2 * b if guided and not pair else b), *shape, dtype=dtype)
            if nan:
                m = with_nan(m, (0, 1, 1, 1))
            if cl:
                x, m = (t.contiguous(memory_format=torch.channels_last) for t in (x, m))
            if view:
                m = view(m)
            noise = randn(g, b, *shape, dtype=dtype)
            model_output = (m, randn(g, b, *shape, dtype=dtype)) if pair else m
            kw = {"noise": noise, "prev_x0": randn(g, b, *shape, dtype=dtype)}
            if guided:
                kw["guidance_scale"] = 5.0
            kw.update(kwargs or {})
            return (x, model_output, coef), kw
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("unguided", make(guided=False)), V("pair", make(pair=True)),
        V("channels_last", make(cl=True)), V("model_output_strided", make(view=lambda m: strided(m, -1))),
        V("rescale", make(kwargs={"guidance_rescale": 0.7})), V("nan_isolated", make(nan=True)),
        V("zero_spatial", make(shape=(4, 0, 3))),
        V("odd_batch", make(view=lambda m: m[:3]), expect="error"),
        V("guidance_inf", make(kwargs={"guidance_scale": math.inf}), expect="error"),
        V("noise_wrong_shape", make(kwargs={"noise": torch.zeros(2, 4, 5)}), expect="error"),
        V("coefficients_dict", lambda g: ((randn(g, 1, 4), randn(g, 1, 4), {"cx": 1.0}), {}), expect="error"),
    ]


def all_cases():
    return (
        cases(ops.rms_norm, "norm", _norm_variants(False))
        + cases(ops.layer_norm, "norm", _norm_variants(True))
        + cases(ops.gelu, "activation", _activation_variants(False, True))
        + cases(ops.quick_gelu, "activation", _activation_variants(False, False))
        + cases(ops.swiglu, "activation", _activation_variants(True, False))
        + cases(ops.geglu, "activation", _activation_variants(True, True))
        + cases(ops.adaln_modulate, "adaln", _adaln_variants(False))
        + cases(ops.gated_residual, "adaln", _adaln_variants(True))
        + cases(ops.group_norm, "group_norm", _group_norm_variants())
        + cases(ops.apply_rotary, "rotary", _rotary_variants())
        + cases(ops.timestep_embedding, None, _timestep_variants())
        + cases(ops.guided_step, "scheduler_step", _step_variants())
    )
