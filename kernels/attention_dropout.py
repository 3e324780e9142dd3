"""Attention-probability dropout: the keep-mask, generated where it is used.

Flash-attention's approach: the mask is never stored. Each kernel that needs the mask of a
score tile (the forward, and each backward kernel) recomputes it from a counter-based
generator, Philox4x32-10 (``tl.philox``), so the backward sees exactly the forward's mask.

Indexing. The element (query row i, query head h, key position j) draws from Philox with

    key     = SEED[0]                       (64 bits: two 32-bit key words)
    counter = (j // 4, i, h, SEED[1] mod 2^32)

and takes output word j % 4 (one Philox call serves four neighbouring keys). i is the
query's row in the op's row view (token index of the packed layout; b * Tq + t for a
padded batch), j the key's position within its own segment (0-based), h the query head
(not the K/V head: GQA heads sharing K/V get independent masks). The mask therefore does
not depend on tiling, layout (a padded batch and the same tokens packed give the same
mask) nor on which Triton kernel runs it, and :func:`mmfast.ops.attention_dropout.keep_mask`
rebuilds it in plain torch.

Keep rule: with r the 32-bit output, keep when ``r >> 1 >= threshold``, threshold =
floor(p * 2^31) (an exact integer comparison, reproducible in torch); kept entries are
scaled by 1 / (1 - p).

SEED is an int64 device tensor [2] drawn by the op layer from a torch generator (a tiny
random kernel, no host sync; CUDA-graph safe, as torch's own RNG ops are under capture).
"""

import torch
import triton
import triton.language as tl

from ._launch import dense, empty


@triton.jit
def dropout_keep(SEED, rows, heads, quads, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] keep-mask. ``rows``, ``heads``: [BLOCK_M] query rows and heads;
    ``quads``: [BLOCK_N // 4] key positions // 4 of tile columns 0, 4, 8, ... (columns
    4q .. 4q + 3 must be consecutive key positions)."""
    seed = tl.load(SEED)
    offset = tl.load(SEED + 1)
    c0 = tl.broadcast_to(quads.to(tl.uint32)[None, :], (BLOCK_M, BLOCK_N // 4))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BLOCK_M, BLOCK_N // 4))
    c2 = tl.broadcast_to(heads.to(tl.uint32)[:, None], (BLOCK_M, BLOCK_N // 4))
    c3 = tl.broadcast_to((offset & 0xFFFFFFFF).to(tl.uint32), (BLOCK_M, BLOCK_N // 4))
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    # Column 4q + w takes word w of quad q: (r0 r2 r0 r2 ..) and (r1 r3 r1 r3 ..) interleaved.
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return (r >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _dropout_mask_kernel(SEED, OUT, rows_start, n_rows, n_cols, head, threshold,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask of rows [rows_start, + n_rows) x key positions [0, n_cols)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    quads = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    keep = dropout_keep(SEED, rows_start + offs_m, head + offs_m * 0, quads, threshold, BLOCK_M, BLOCK_N)
    ok = (offs_m < n_rows)[:, None] & (offs_n < n_cols)[None, :]
    tl.store(OUT + offs_m[:, None] * n_cols + offs_n[None, :], keep.to(tl.int8), mask=ok)


def dropout_mask(seed, rows_start: int, n_rows: int, n_cols: int, head: int, threshold: int):
    """The kernels' keep-mask for one head, as a bool [n_rows, n_cols] tensor (for tests:
    it checks the torch rebuild of the mask against the Triton generator itself)."""
    seed = dense(seed)
    out = empty((n_rows, n_cols), dtype=torch.int8, device=seed.device)
    BLOCK_M, BLOCK_N = 16, 16
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(n_cols, BLOCK_N))
    if n_rows and n_cols:
        _dropout_mask_kernel[grid](seed, out, rows_start, n_rows, n_cols, head, threshold,
                                   BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out.bool()
