"""How the attention kernels tile the head dim: at most two power-of-two pieces.

A tl.dot side must be a power of two of at least 16, so a head dim D that is not one
used to be padded to next_pow2(D): 80 and 72 to 128, 1.6x and 1.78x the useful
tensor-core work on every dot that reduces over D or produces D columns. Instead the
kernels cover [0, D) with a main piece of HEAD_D0 columns and, where D is not a power of
two, a tail piece of HEAD_D1 columns after it (columns >= D masked):

    80 = 64 + 16,  72 = 64 + 16 (8 masked: cuDNN pads 72 to 80 too),  96 = 64 + 32,
    160 = 128 + 32,  40 = 32 + 16,  24 -> 32,  8 -> 16 (as flash-attn 2)

A dot that reduces over D (q k^T, dO v^T) is the sum of the two pieces' dots; one that
produces D columns (p v, ds k, p^T dO, ds^T q) keeps one accumulator per piece. Where a
tail would make the pair as wide as next_pow2(D) (D = 112: 64 + 64) one piece is used.
"""

import triton

MIN_PIECE = 16  # tl.dot's smallest side


def head_dim_pieces(head_dim: int) -> tuple[int, int]:
    """(HEAD_D0, HEAD_D1): the main piece and the tail piece (0: none) covering head_dim."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    whole = max(MIN_PIECE, triton.next_power_of_2(head_dim))
    if whole == head_dim or head_dim <= MIN_PIECE:
        return whole, 0
    main = whole // 2  # the largest power of two below head_dim
    tail = max(MIN_PIECE, triton.next_power_of_2(head_dim - main))
    if main + tail >= whole:
        return whole, 0
    return main, tail


def issued_over_useful(head_dim: int) -> float:
    """Tensor-core work the pieces issue per unit of useful work, for every dot of the
    kernels (each reduces over, or produces, HEAD_D0 + HEAD_D1 columns for head_dim)."""
    d0, d1 = head_dim_pieces(head_dim)
    return (d0 + d1) / head_dim


def row_align(*tensors) -> int:
    """The largest power of two up to 8 that divides every stride but the last of every
    tensor: the kernels tell the compiler their row strides are multiples of it, so rows
    of a [T, H, 72] layout (head stride 72, which Triton's argument specialisation sees
    only as "not a multiple of 16") still load and store as whole 16-byte vectors."""
    align = 8
    for t in tensors:
        for stride in t.stride()[:-1]:
            while stride % align:
                align //= 2
    return align
