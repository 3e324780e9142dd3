"""Fuzz variants of patch embedding, the contrastive losses and retrieval, the fused
linear cross-entropy and the Qwen vision plumbing."""

from __future__ import annotations

import math

import torch

import mmfast.ops as ops

from tests.fuzz.inputs import randn, stride0_vector, strided, transposed, with_nan
from tests.fuzz.spec import V, cases


def _patch_variants() -> list[V]:
    def make(b=2, c=3, h=8, w=12, e=16, p=4, dtype=torch.float32, bias=True, cls=False, pos=False, view=None,
             bias_view=None, cls_view=None, pos_view=None, weight_shape=None):
        def build(g):
            x = randn(g, b, c, h, w, dtype=dtype)
            if view:
                x = view(x)
            weight = randn(g, *(weight_shape or (e, c, p, p)), dtype=dtype, scale=0.2)
            kw = {}
            if bias:
                kw["bias"] = bias_view(g, randn(g, e, dtype=dtype)) if bias_view else randn(g, e, dtype=dtype)
            if cls:
                kw["class_embed"] = cls_view(g, randn(g, e, dtype=dtype)) if cls_view else randn(g, e, dtype=dtype)
            if pos:
                rows = (h // p) * (w // p) + cls if p else 1
                kw["pos_embed"] = randn(g, rows, e, dtype=dtype)
                if pos_view:
                    kw["pos_embed"] = pos_view(kw["pos_embed"])
            return (x, weight), kw
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("cls_pos", make(cls=True, pos=True)), V("no_bias", make(bias=False)),
        V("patch_1", make(p=1, h=3, w=5)), V("patch_is_image", make(h=4, w=4)), V("zero_batch", make(b=0)),
        V("channels_last", make(view=lambda x: x.contiguous(memory_format=torch.channels_last))),
        V("pixels_strided", make(view=lambda x: strided(x, -1))),
        V("bias_stride2", make(bias_view=lambda g, t: strided(t)), features=("param_strided",)),
        V("bias_stride0", make(bias_view=lambda g, t: stride0_vector(g, t.shape[0])), features=("param_strided",)),
        V("class_embed_stride2", make(cls=True, cls_view=lambda g, t: strided(t)), features=("param_strided",)),
        V("class_embed_stride0", make(cls=True, cls_view=lambda g, t: stride0_vector(g, t.shape[0])),
          features=("param_strided",)),
        V("pos_embed_transposed", make(pos=True, pos_view=transposed)),
        V("pixels_nan", make(view=lambda x: with_nan(x, (0, 0, 1, 1)))),
        V("patch_size_0", make(p=0), expect="error"),
        V("image_not_multiple", make(h=9), expect="error"),
        V("channels_differ", make(weight_shape=(16, 4, 4, 4)), expect="error"),
        V("patch_not_square", make(weight_shape=(16, 3, 4, 2)), expect="error"),
        V("pos_wrong_rows", lambda g: ((randn(g, 1, 3, 8, 8), randn(g, 16, 3, 4, 4)), {"pos_embed": randn(g, 5, 16)}),
          expect="error"),
        V("pixels_int", lambda g: ((torch.ones(1, 3, 8, 8, dtype=torch.uint8), randn(g, 16, 3, 4, 4)), {}), expect="error"),
    ]


def _patchified_variants() -> list[V]:
    def make(n=10, k=24, e=16, dtype=torch.float32, view=None, bias_view=None, grid=None, w5=False):
        def build(g):
            x = randn(g, n, k, dtype=dtype)
            if view:
                x = view(x)
            weight = randn(g, e, 3, 2, 2, 2, dtype=dtype) if w5 else randn(g, e, k, dtype=dtype, scale=0.2)
            b = randn(g, e, dtype=dtype)
            kw = {"bias": bias_view(g, b) if bias_view else b}
            if grid is not None:
                kw["grid_thw"] = torch.tensor(grid)
            return (x, weight), kw
        return build

    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("conv3d_weight", make(w5=True)),
        V("zero_rows", make(n=0)), V("x_strided", make(view=lambda x: strided(x, 0))),
        V("x_transposed", make(view=transposed)),
        V("bias_stride0", make(bias_view=lambda g, t: stride0_vector(g, t.shape[0])), features=("param_strided",)),
        V("bias_stride2", make(bias_view=lambda g, t: strided(t)), features=("param_strided",)),
        V("grid_matches", make(grid=[[1, 2, 5]])),
        V("grid_mismatch", make(grid=[[1, 2, 4]]), expect="error"),
        V("grid_negative", make(grid=[[-1, 2, -5]]), expect="error"),
        V("k_mismatch", make(k=23, w5=True), expect="error"),
    ]


def _features(b=6, d=16, dtype=torch.float32, view=None, nan=False, scale=1.0):
    def pair(g):
        x, y = randn(g, b, d, dtype=dtype, scale=scale), randn(g, b, d, dtype=dtype, scale=scale)
        if nan:
            x = with_nan(x, (1, 2))
        if view:
            x, y = view(x), view(y)
        return x, y
    return pair


def _contrastive_variants(kind: str) -> list[V]:
    def make(logit=10.0, bias=-2.0, kwargs=None, **feature_args):
        def build(g):
            x, y = _features(**feature_args)(g)
            if kind == "nt_xent":
                return (torch.cat([x, y]), 0.5 if logit == 10.0 else logit), dict(kwargs or {})
            scale = logit(g) if callable(logit) else logit
            args = (x, y, scale) + ((bias,) if kind == "siglip" else ())
            return args, dict(kwargs or {})
        return build

    vs = [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("batch_1", make(b=1)), V("odd_batch_odd_dim", make(b=7, d=13)),
        V("features_strided", make(view=lambda t: strided(t, -1))), V("features_transposed", make(view=transposed)),
        V("scale_tensor", make(logit=lambda g: torch.tensor(7.0))),
        V("fp16_large", make(dtype=torch.float16, scale=30.0)),
        V("nan_feature", make(nan=True)),
        V("batch_0", make(b=0), expect="error"),
        V("features_1d", lambda g: ((randn(g, 8), randn(g, 8), 1.0) + ((0.0,) if kind == "siglip" else ())
                                    if kind != "nt_xent" else (randn(g, 8), 0.5), {}), expect="error"),
        V("scale_inf", make(logit=math.inf), expect="error"),
        V("scale_nan", make(logit=math.nan), expect="error"),
        V("scale_two_elements", make(logit=lambda g: torch.ones(2)), expect="error"),
    ]
    if kind == "clip":
        vs += [V("reduction_sum", make(kwargs={"reduction": "sum"})),
               V("reduction_bad", make(kwargs={"reduction": "none"}), expect="error"),
               V("shapes_differ", lambda g: ((randn(g, 4, 8), randn(g, 5, 8), 1.0), {}), expect="error")]
    if kind == "nt_xent":
        vs = [v for v in vs if v.what not in ("scale_tensor", "scale_two_elements")]
        vs += [V("odd_rows", lambda g: ((randn(g, 5, 8), 0.5), {}), expect="error"),
               V("temperature_zero", lambda g: ((randn(g, 6, 8), 0.0), {}), expect="error")]
    return vs


def _retrieval_variants() -> list[V]:
    def make(ks=(1, 5), **feature_args):
        def build(g):
            return _features(**feature_args)(g), {"ks": ks}
        return build

    return [
        V("fp32", make()), V("batch_1", make(b=1)), V("fp16", make(dtype=torch.float16)),
        V("features_strided", make(view=lambda t: strided(t, -1))),
        V("ks_zero", make(ks=(0,)), expect="error"), V("ks_int", make(ks=5), expect="error"),
        V("batch_0", make(b=0), expect="error"),
    ]


def _topk_variants() -> list[V]:
    def make(b=9, c=7, d=16, k=3, chunk=4, dtype=torch.float32, view=None):
        def build(g):
            x, classes = randn(g, b, d, dtype=dtype), randn(g, c, d, dtype=dtype)
            if view:
                x = view(x)
            return (x, classes), {"k": k, "chunk": chunk}
        return build

    scores = {"outputs": lambda out: out[0]}  # indices of near-ties may swap between dtypes
    return [
        V("fp32", make(), extra=scores), V("chunk_1", make(chunk=1), extra=scores),
        V("chunk_larger_than_batch", make(chunk=100), extra=scores), V("no_images", make(b=0), extra=scores),
        V("k_all_classes", make(k=7), extra=scores), V("strided", make(view=lambda t: strided(t, 0)), extra=scores),
        V("chunk_0", make(chunk=0), expect="error"), V("chunk_negative", make(chunk=-1), expect="error"),
        V("k_0", make(k=0), expect="error"), V("k_too_big", make(k=8), expect="error"),
        V("dims_differ", lambda g: ((randn(g, 3, 8), randn(g, 4, 9)), {}), expect="error"),
    ]


def _lce_variants() -> list[V]:
    def make(n=9, c=16, v=23, dtype=torch.float32, kwargs=None, target=None, h_view=None, w_view=None,
             t_view=None, bias=False, bias_view=None):
        def build(g):
            h, w = randn(g, n, c, dtype=dtype), randn(g, v, c, dtype=dtype, scale=0.5)
            if h_view:
                h = h_view(h)
            if w_view:
                w = w_view(w)
            t = torch.randint(0, v, (n,), generator=g) if target is None else target(g)
            if t_view:
                t = t_view(t)
            kw = dict(kwargs or {})
            if bias:
                b = randn(g, v, dtype=dtype)
                kw["bias"] = bias_view(b) if bias_view else b
            return (h, w, t), kw
        return build

    ignored = lambda g: torch.tensor([1, -100, 3, -100, 0, 22, 5, -100, 7])  # noqa: E731
    return [
        V("fp32", make()), V("fp16", make(dtype=torch.float16)), V("bf16", make(dtype=torch.bfloat16)),
        V("fp64", make(dtype=torch.float64)), V("ignore_some", make(target=ignored)),
        V("all_ignored", make(target=lambda g: torch.full((9,), -100))),
        V("reduction_sum", make(kwargs={"reduction": "sum"})), V("reduction_none", make(kwargs={"reduction": "none"})),
        V("smoothing_zloss", make(kwargs={"label_smoothing": 0.1, "z_loss": 1e-3})), V("bias", make(bias=True)),
        V("zero_rows", make(n=0, kwargs={"reduction": "sum"})), V("vocab_1", make(v=1)),
        V("hidden_strided", make(h_view=lambda h: strided(h, -1))),
        V("weight_transposed", make(w_view=transposed)),
        V("weight_stride0_rows", make(w_view=lambda w: w[:1].expand(23, -1))),
        V("target_strided", make(t_view=lambda t: strided(t, 0))),
        V("bias_stride0", make(bias=True, bias_view=lambda b: b[:1].expand(23))),
        V("target_uint8", make(t_view=lambda t: t.to(torch.uint8))),
        V("target_int32", make(t_view=lambda t: t.to(torch.int32))),
        V("target_out_of_range", make(target=lambda g: torch.tensor([1, 2, 3, 99, 0, -7, 5, 6, 7]))),
        V("hidden_nan_row", make(h_view=lambda h: with_nan(h, (2, 3)), kwargs={"reduction": "none"})),
        V("target_float", make(t_view=lambda t: t.float()), expect="error"),
        V("ignore_index_2_63", make(kwargs={"ignore_index": 2 ** 63}), expect="error"),
        V("ignore_index_float", make(kwargs={"ignore_index": -100.0}), expect="error"),
        V("label_smoothing_2", make(kwargs={"label_smoothing": 2.0}), expect="error"),
        V("target_wrong_length", make(t_view=lambda t: t[:-1]), expect="error"),
        V("weight_dim_differs", lambda g: ((randn(g, 4, 8), randn(g, 10, 9), torch.zeros(4, dtype=torch.long)), {}),
          expect="error"),
    ]


def _vision_variants() -> list[V]:
    def grid(values, **kwargs):
        return lambda g: ((torch.tensor(values),), kwargs)

    return [
        V("huge_grid", grid([[1, 2 ** 20, 2 ** 20]]), expect="error"),
        V("negative", grid([[1, -2, 4]]), expect="error"),
        V("not_multiple_of_merge", grid([[1, 3, 4]]), expect="error"),
        V("float_grid", lambda g: ((torch.ones(1, 3),), {}), expect="error"),
        V("wrong_shape", grid([[1, 2]]), expect="error"),
        V("window_too_small", grid([[1, 4, 4]], window_size=10), expect="error"),
        V("merge_zero", grid([[1, 4, 4]], spatial_merge_size=0), expect="error"),
    ]


def _packed_patch_variants() -> list[V]:
    def make(sizes=((8, 12), (4, 4)), p=4, dtype=torch.float32, images=None):
        def build(g):
            imgs = [randn(g, 3, h, w, dtype=dtype) for h, w in sizes] if images is None else images
            return (imgs, randn(g, 16, 3, p, p, dtype=dtype, scale=0.2)), {"bias": randn(g, 16, dtype=dtype)}
        return build

    return [
        V("two_sizes", make()), V("one_image", make(sizes=((4, 8),))), V("fp16", make(dtype=torch.float16)),
        V("empty_list", make(images=[]), expect="error"),
        V("tensor_not_list", make(images=torch.zeros(2, 3, 4, 4)), expect="error"),
        V("image_2d", make(images=[torch.zeros(4, 4)]), expect="error"),
        V("size_not_multiple", make(sizes=((8, 12), (5, 4))), expect="error"),
    ]


def _vision_rotary_variants() -> list[V]:
    def make(tokens=6, head_dim=16, ids=None, **kwargs):
        def build(g):
            position_ids = torch.randint(0, 8, (tokens, 2), generator=g) if ids is None else ids
            return (position_ids, head_dim), kwargs
        return build

    return [
        V("basic", make()), V("no_tokens", make(tokens=0)), V("theta", make(theta=500.0)),
        V("head_dim_not_multiple_of_4", make(head_dim=18), expect="error"),
        V("ids_float", make(ids=torch.zeros(3, 2)), expect="either"),
        V("ids_bool", make(ids=torch.zeros(3, 2, dtype=torch.bool)), expect="error"),
        V("head_dim_0", make(head_dim=0), expect="error"),
        V("ids_wrong_shape", make(ids=torch.zeros(3, 3, dtype=torch.long)), expect="error"),
    ]


def all_cases():
    return (
        cases(ops.patch_embed, "patch_embed", _patch_variants())
        + cases(ops.patch_embed_patchified, "patch_embed", _patchified_variants())
        + cases(ops.patch_embed_packed, "patch_embed", _packed_patch_variants())
        + cases(ops.vision_rotary_cos_sin, None, _vision_rotary_variants())
        + cases(ops.clip_loss, "contrastive", _contrastive_variants("clip"))
        + cases(ops.siglip_loss, "contrastive", _contrastive_variants("siglip"))
        + cases(ops.nt_xent_loss, "contrastive", _contrastive_variants("nt_xent"))
        + cases(ops.retrieval_metrics, "contrastive", _retrieval_variants())
        + cases(ops.zero_shot_topk, None, _topk_variants())
        + cases(ops.linear_cross_entropy, "linear_cross_entropy", _lce_variants())
        + cases(ops.qwen_vision_indices, None, _vision_variants())
    )
