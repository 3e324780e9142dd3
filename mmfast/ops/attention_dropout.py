"""Attention-probability dropout shared by ``attention`` and ``cross_attention``: argument
checks, the seed the kernels draw their masks from, and the same mask rebuilt in torch.

Dropout acts on the normalised probabilities P: out = (P * keep / (1 - p)) V, and the
log-sum-exp is that of the scores, unaffected. The Triton kernels (kernels/
attention_dropout.py) generate ``keep`` on the fly with Philox from a seed tensor and
regenerate it in the backward; :func:`keep_mask` rebuilds the identical mask here, so the
``torch`` backend (the reference) applies the very same dropout, and tests compare the
kernels with a float64 reference under that exact mask.

Seed: an int64 tensor [2] on the inputs' device, (Philox key, counter word), drawn with
:func:`draw_seed` from ``generator`` (torch's default generator of that device when
None). Drawing it is one tiny random kernel: no host sync, and under CUDA-graph capture
torch's generator hands each replay fresh values (register a non-default generator
with the graph, as for any torch random op). Each call draws exactly one seed, before
anything else random: seeding the generator and calling ``draw_seed`` after it gives
back the seed a call used.

Per element (query row i in the op's row view, query head h, key position j within its
segment), as kernels/attention_dropout.py documents:
    r = Philox4x32-10(key=seed[0], counter=(j // 4, i, h, seed[1] mod 2^32))[j % 4]
    keep = (r >> 1) >= floor(p * 2^31)
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

# Philox4x32 constants (Salmon et al., Random123), as tl.philox uses them.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_M32 = 0xFFFFFFFF


def check_dropout(dropout_p, generator, device: torch.device) -> float:
    """Returns dropout_p as a float; TypeError / ValueError naming the argument."""
    if type(dropout_p) is float and generator is None and 0.0 <= dropout_p < 1.0:
        return dropout_p  # the usual call: skips isinstance(dropout_p, Real), an ABC check (~1 us)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator: expected a generator on {device.type} (the device of q), "
                             f"got one on {generator.device}")
    return dropout_p


def threshold(dropout_p: float) -> int:
    """The drop threshold on 31-bit random integers: P(drop) = threshold / 2^31."""
    return int(dropout_p * 2**31)


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """int64 [2] on ``device``: (Philox key, counter word), from ``generator``. Values in
    [0, 2^62): a range whose width fits int64, which compiled random ops need."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=generator)


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for a 32-bit constant and int64 b in [0, 2^32),
    in int64 arithmetic without overflow (b split into 16-bit halves)."""
    low_part = a * (b & 0xFFFF)
    high_part = a * (b >> 16)
    t = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (t >> 32), t & _M32


def philox(seed: Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, ...]:
    """Philox4x32-10 in int64 torch arithmetic (words in [0, 2^32)); broadcasts c0..c3.
    ``seed``: an int64 scalar tensor, split into the two key words as tl.philox does."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def keep_elements(seed: Tensor, dropout_p: float, rows: Tensor, heads: Tensor, cols: Tensor) -> Tensor:
    """Bool keep-mask of the elements (query row, query head, key position), broadcast
    over the three integer tensors: what the kernels generate."""
    rows, heads, cols = (t.to(torch.int64) for t in (rows, heads, cols))
    seed = seed.to(torch.int64)
    words = philox(seed[0], cols >> 2, rows & _M32, heads & _M32, seed[1] & _M32)
    word = cols & 3
    r = torch.where(word == 0, words[0], torch.where(word == 1, words[1], torch.where(word == 2, words[2], words[3])))
    return (r >> 1) >= threshold(dropout_p)


def _key_positions(cu_seqlens_k: Tensor | None, tokens_k: int, device) -> Tensor:
    """Each key token's position within its own segment (all of them, packed or padded)."""
    index = torch.arange(tokens_k, device=device)
    if cu_seqlens_k is None:
        return index
    segment = torch.searchsorted(cu_seqlens_k[1:], index.to(cu_seqlens_k.dtype), right=True)
    return index - cu_seqlens_k[segment]


def keep_mask(seed: Tensor, dropout_p: float, q: Tensor, k: Tensor, cu_seqlens_k: Tensor | None = None) -> Tensor:
    """The kernels' keep-mask, dense, in the references' score layout: [Hq, Tq, Tk] for
    packed q [Tq, Hq, D], k [Tk, Hk, D] (entries across segments are meaningless: the
    attention mask removes them), [B, Hq, Tq, Tk] for padded q [B, Tq, Hq, D]."""
    device = q.device
    heads, tokens_q, tokens_k = q.shape[-2], q.shape[-3], k.shape[-3]
    cols = _key_positions(cu_seqlens_k, tokens_k, device)
    head_index = torch.arange(heads, device=device)
    if q.dim() == 3:
        rows = torch.arange(tokens_q, device=device)
        return keep_elements(seed, dropout_p, rows[None, :, None], head_index[:, None, None], cols[None, None, :])
    batch = q.shape[0]
    rows = torch.arange(batch * tokens_q, device=device).view(batch, 1, tokens_q, 1)
    return keep_elements(seed, dropout_p, rows, head_index[None, :, None, None], cols[None, None, None, :])


def apply_dropout(probs: Tensor, keep: Tensor, dropout_p: float) -> Tensor:
    """probs * keep / (1 - p), as the kernels apply it (the scale in the probs' dtype)."""
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))
