"""Issued / useful tensor-core work of a launch at its case's shape.

Useful work is the multiply-adds the math needs (each dot's M x N x K once, at the true
sizes); issued is what the tiles compute: every dot dimension rounded up to its tile
(head dim 80 in a 128-wide tile issues 1.6x, 72 in 128 1.78x), block-diagonal tiles
of packed short segments, and score tiles recomputed for each feature-dim chunk.
Sequence ends are counted as padded; causal and window skipping are not modelled (the
ratio is that of a full score matrix). Returns None for kernels without a ``tl.dot``.
"""

from __future__ import annotations

from .record import Launch


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def _head_dim_tile(c: dict) -> int:
    # The head-dim tile: BLOCK_D (one tile), or the pieces HEAD_D0 + HEAD_D1 a split head
    # dim uses (kernels/_head_dim.py). A kernel with neither has no head-dim tile to model.
    tile = sum(v for k, v in c.items() if k.startswith(("BLOCK_D", "HEAD_D")) and k != "BLOCK_DO")
    if not tile:
        raise KeyError(f"no head-dim tile (BLOCK_D or HEAD_D0/HEAD_D1) among the constexprs {sorted(c)}")
    return tile


def _attention(c: dict, d: dict) -> tuple[int, int]:
    issued = _pad(d["seq_q"], c["BLOCK_M"]) * _pad(d["seq_k"], c["BLOCK_N"]) * _head_dim_tile(c)
    return issued * d["segments"], d["seq_q"] * d["seq_k"] * d["head_dim"] * d["segments"]


def _attention_short(c: dict, d: dict) -> tuple[int, int]:
    segs = c["SEGS"]
    programs = -(-d["segments"] // segs) * c["SPLIT"]
    issued = programs * (segs * c["ROWS"]) * (segs * c["SLOT_K"]) * _head_dim_tile(c)
    return issued, d["segments"] * d["seq_q"] * d["seq_k"] * d["head_dim"]


def _gemm(c: dict, d: dict) -> tuple[int, int]:
    issued = _pad(d["m"], c["BLOCK_M"]) * _pad(d["n"], c["BLOCK_N"]) * _pad(d["k"], c["BLOCK_K"])
    return issued, d["m"] * d["n"] * d["k"]


def _scores(c: dict, d: dict) -> tuple[int, int]:
    return _gemm(c, {"m": d["m"], "n": d["n"], "k": d["d"]})


def _contrastive_bwd(c: dict, d: dict) -> tuple[int, int]:
    # Scores, then G' times the other side's features, for each BLOCK_DO chunk of the dim.
    chunks = -(-d["d"] // c["BLOCK_DO"])
    scores, useful = _scores(c, d)
    tiles = _pad(d["m"], c["BLOCK_M"]) * _pad(d["n"], c["BLOCK_N"])
    return chunks * (scores + tiles * c["BLOCK_DO"]), 2 * useful


def _attention_rel_pos_dq(c: dict, d: dict) -> tuple[int, int]:
    # The dq kernel's three head-dim dots (s, dp, dq) plus, unless its key blocks are whole
    # grid rows (WHOLE_ROWS: no dots), two one-hot dots scattering ds over the key grid's
    # rows and columns (BLOCK_GH, BLOCK_GW wide): issued work that the useful count (the
    # three dots at the true sizes) leaves out.
    issued, useful = _attention(c, d)
    if c.get("WHOLE_ROWS"):
        return issued, useful
    scatter = _pad(d["seq_q"], c["BLOCK_M"]) * _pad(d["seq_k"], c["BLOCK_N"]) * (c["BLOCK_GH"] + c["BLOCK_GW"])
    return issued + scatter * d["segments"] // 3, useful


_MODELS = {
    "_attention_fwd_kernel": _attention,
    "_attention_bwd_dkdv_kernel": _attention,
    "_attention_bwd_dq_kernel": _attention,
    "_attention_short_fwd_kernel": _attention_short,
    "_attention_short_bwd_kernel": _attention_short,
    "_attention_rel_pos_fwd_kernel": _attention,
    "_attention_rel_pos_bwd_dkdv_kernel": _attention,
    "_attention_rel_pos_bwd_dq_kernel": _attention_rel_pos_dq,
    "_cross_attention_fwd_kernel": _attention,
    "_cross_attention_bwd_dkdv_kernel": _attention,
    "_cross_attention_bwd_dq_kernel": _attention,
    "_softmax_lse_rows_kernel": _scores,
    "_softmax_lse_cols_kernel": _scores,
    "_sigmoid_rows_kernel": _scores,
    "_count_above_kernel": _scores,
    "_bwd_rows_kernel": _contrastive_bwd,
    "_bwd_cols_kernel": _contrastive_bwd,
    "_patch_embed_fwd_kernel": _gemm,
    "_patch_embed_bwd_input_kernel": _gemm,
    "_patch_embed_bwd_weight_kernel": _gemm,
}


def has_model(kernel_name: str) -> bool:
    return kernel_name in _MODELS


def head_dim_padding(launch: Launch, dims: dict) -> float | None:
    """The head-dim tile over the head dim of an attention kernel (the part of the
    padding a head-dim split can remove; sequence ends are the shape's), else None."""
    if _MODELS.get(launch.name) not in (_attention, _attention_short) or "head_dim" not in dims:
        return None
    return round(_head_dim_tile(launch.constexprs) / dims["head_dim"], 3)


def work_ratio(launch: Launch, dims: dict) -> float | None:
    """issued / useful multiply-adds, or None when the kernel has no work model."""
    model = _MODELS.get(launch.name)
    if model is None or not dims:
        return None
    issued, useful = model(launch.constexprs, dims)
    return round(issued / useful, 3)
