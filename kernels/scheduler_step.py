"""Triton kernels for one sampler step with classifier-free guidance, in one elementwise pass.

Every supported scheduler update (DDIM, Euler, DPM-Solver++(2M), flow-matching Euler,
UniPC's corrector + predictor) is, per element, one or two linear combinations with
per-step scalar coefficients (see mmfast/ops/scheduler_step.py for the math and where
the coefficients come from):

    m    = u + s * (c - u)                        guidance (or m = the model output)
    m   *= phi * std_b(c) / std_b(m) + 1 - phi    guidance rescale, per sample b
    x0   = px * x + pm * m                        predicted clean sample
    x0   = clamp(x0, -clip, clip)                 (DDIM clip_sample only)
    xc   = kx * last + k0 * x0_prev + k1 * x0_older + kt * x0
                                                  UniPC's corrector (UniC; CORRECT only):
                                                  the sample x is replaced by xc, stored
    prev = cx * x + cm * m + c0 * x0 + c1 * x0_prev + cn * noise

Tensors are flat: sample b of every [B, ...] operand is elements [b * N, (b + 1) * N).
Everything is computed in float32 and rounded once on store.

Passes:
  * without guidance rescale: one pass, `_guided_step_kernel`, grid (cdiv(N, BLOCK), B).
  * with guidance rescale: `_cfg_stats_kernel` first reads u and c once and writes, per
    (sample, chunk), the mean and the sum of squared deviations of c and of the guided m
    (Chan's parallel form: no cancellation of large sums of squares); then the step pass
    merges the chunk partials of its sample (a few hundred floats) and applies the factor.
    The standard deviation is over all of a sample's elements at once, so it cannot be
    known before the first element is written: the rescale costs one extra read of u and c.

Coefficients come either as scalar arguments (host mode) or from row STEP[0] of a
float32 table [rows, 8] on the device (FROM_TABLE, for CUDA-graph capture; a row index
past the end reads the last row, which StepTable fills with NaN). In table mode the last
program to finish advances STEP[0] by one (STEP[1] counts finished programs and is reset
to 0), so a captured step replays the next row each time.
"""

import torch
import triton
import triton.language as tl

from ._launch import multiprocessor_count

# Columns of a coefficient row, in table order.
COEFFICIENT_FIELDS = ("px", "pm", "cx", "cm", "c0", "c1", "cn", "clip")
# Elements per tile of the stats pass; the step pass picks its own (see _step_block).
STATS_BLOCK = 1024
# The stats pass writes at most this many chunk partials per sample.
MAX_CHUNKS = 256


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) summaries."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _cfg_stats_kernel(
    U, C, PARTIAL, N, chunk, scale,
    BLOCK: tl.constexpr,
):
    chunk_id = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(0)
    start = chunk_id * chunk
    base = b * N
    n_c = 0.0
    mean_c = 0.0
    m2_c = 0.0
    mean_g = 0.0
    m2_g = 0.0
    for off in range(start, tl.minimum(start + chunk, N), BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < N
        u = tl.load(U + base + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = u + scale * (c - u)
        n_t = tl.sum(mask.to(tl.float32), axis=0)
        t_mean_c = tl.sum(c, axis=0) / n_t
        t_mean_g = tl.sum(g, axis=0) / n_t
        dc = tl.where(mask, c - t_mean_c, 0.0)
        dg = tl.where(mask, g - t_mean_g, 0.0)
        n_prev = n_c
        n_c, mean_c, m2_c = _chan_merge(n_prev, mean_c, m2_c, n_t, t_mean_c, tl.sum(dc * dc, axis=0))
        _, mean_g, m2_g = _chan_merge(n_prev, mean_g, m2_g, n_t, t_mean_g, tl.sum(dg * dg, axis=0))
    row = PARTIAL + (b * n_chunks + chunk_id) * 4
    tl.store(row + 0, mean_c)
    tl.store(row + 1, m2_c)
    tl.store(row + 2, mean_g)
    tl.store(row + 3, m2_g)


@triton.jit
def _rescale_factor(PARTIAL, b, N, n_chunks, chunk, phi, CHUNKS_POW2: tl.constexpr):
    """phi * std(c) / std(m) + 1 - phi for sample b, from its chunk partials."""
    ids = tl.arange(0, CHUNKS_POW2)
    ok = ids < n_chunks
    rows = PARTIAL + (b * n_chunks + ids) * 4
    counts = tl.where(ok, tl.minimum(chunk, N - ids * chunk), 0).to(tl.float32)
    mean_c = tl.load(rows + 0, mask=ok, other=0.0)
    m2_c = tl.load(rows + 1, mask=ok, other=0.0)
    mean_g = tl.load(rows + 2, mask=ok, other=0.0)
    m2_g = tl.load(rows + 3, mask=ok, other=0.0)
    total = tl.sum(counts, axis=0)
    all_c = tl.sum(counts * mean_c, axis=0) / total
    all_g = tl.sum(counts * mean_g, axis=0) / total
    dc = tl.where(ok, mean_c - all_c, 0.0)
    dg = tl.where(ok, mean_g - all_g, 0.0)
    var_c = tl.sum(m2_c + counts * dc * dc, axis=0)
    var_g = tl.sum(m2_g + counts * dg * dg, axis=0)
    # The (N - 1) of the unbiased std cancels in the ratio.
    return phi * tl.sqrt(var_c / var_g) + (1.0 - phi)


@triton.jit
def _guided_step_kernel(
    X, U, C, X0_PREV, NOISE, OUT, X0_OUT, PARTIAL, TABLE, STEP, LAST, X0_OLDER, XC_OUT,
    px, pm, cx, cm, c0, c1, cn, clip, scale, phi, kx, k0, k1, kt,
    N, n_chunks, chunk, rows,
    GUIDED: tl.constexpr, RESCALE: tl.constexpr, NEED_X0: tl.constexpr, CLIP: tl.constexpr,
    HAS_PREV: tl.constexpr, HAS_NOISE: tl.constexpr, STORE_X0: tl.constexpr,
    FROM_TABLE: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_POW2: tl.constexpr,
    CORRECT: tl.constexpr, HAS_OLDER: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    idx = b * N + offs

    if FROM_TABLE:
        # Past the last row (or negative), the table's NaN sentinel row: visible, never
        # out of bounds.
        step = tl.load(STEP)
        row = TABLE + tl.where((step < 0) | (step >= rows), rows - 1, step) * 8
        px = tl.load(row + 0)
        pm = tl.load(row + 1)
        cx = tl.load(row + 2)
        cm = tl.load(row + 3)
        c0 = tl.load(row + 4)
        c1 = tl.load(row + 5)
        cn = tl.load(row + 6)
        clip = tl.load(row + 7)

    x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        u = tl.load(U + idx, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C + idx, mask=mask, other=0.0).to(tl.float32)
        m = u + scale * (c - u)
        if RESCALE:
            m = m * _rescale_factor(PARTIAL, b, N, n_chunks, chunk, phi, CHUNKS_POW2)
    else:
        m = tl.load(U + idx, mask=mask, other=0.0).to(tl.float32)

    if NEED_X0:
        x0 = px * x + pm * m
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    if HAS_PREV:
        x0_prev = tl.load(X0_PREV + idx, mask=mask, other=0.0).to(tl.float32)
    if CORRECT:
        # UniC (the launcher guarantees NEED_X0 and HAS_PREV): x0 was predicted from the
        # uncorrected sample, the update starts from the corrected one.
        x = kx * tl.load(LAST + idx, mask=mask, other=0.0).to(tl.float32) + k0 * x0_prev + kt * x0
        if HAS_OLDER:
            x += k1 * tl.load(X0_OLDER + idx, mask=mask, other=0.0).to(tl.float32)
    prev = cx * x + cm * m
    if NEED_X0:
        prev += c0 * x0
    if HAS_PREV:
        prev += c1 * x0_prev
    if HAS_NOISE:
        prev += cn * tl.load(NOISE + idx, mask=mask, other=0.0).to(tl.float32)
    # Outputs are stored after every input was read: X0_OUT may be X0_PREV or X0_OLDER,
    # XC_OUT may be LAST and OUT may be X (the state and the sample, in place).
    if STORE_X0:
        tl.store(X0_OUT + idx, x0.to(X0_OUT.dtype.element_ty), mask=mask)
    if CORRECT:
        tl.store(XC_OUT + idx, x.to(XC_OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + idx, prev.to(OUT.dtype.element_ty), mask=mask)

    if FROM_TABLE:
        # The last program to finish advances the step; every program read it before.
        finished = tl.atomic_add(STEP + 1, 1, sem="acq_rel")
        last = finished == tl.num_programs(0) * tl.num_programs(1) - 1
        tl.store(STEP, step + 1, mask=last)
        tl.store(STEP + 1, 0, mask=last)


def _stats_layout(batch: int, n: int, device: torch.device) -> tuple[int, int]:
    """(chunk, n_chunks): chunks of whole tiles, about four programs per SM in all."""
    want = min(MAX_CHUNKS, max(1, 4 * multiprocessor_count(device) // max(batch, 1)))
    chunk = triton.cdiv(triton.cdiv(n, STATS_BLOCK), want) * STATS_BLOCK
    return chunk, triton.cdiv(n, chunk)


def _step_block(total: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) of the step pass: eight elements a thread (16-byte fp16 loads),
    and blocks small enough that even SD1.5-sized latents give every SM a program or two.
    A heuristic, not autotuned: autotuning reruns the launch, which would advance the
    device step counter and reapply in-place updates. The interpreter gets large blocks
    (fewer programs to simulate)."""
    if device.type != "cuda":
        return 1024, 4
    block = min(2048, max(512, triton.next_power_of_2(triton.cdiv(total, 2 * multiprocessor_count(device)))))
    return block, block // 256


def guided_step_fwd(
    sample, uncond, cond, prev_x0, noise, out, x0_out, coefficients, table, step,
    guidance_scale: float, guidance_rescale: float, clip: bool, need_x0: bool,
    last=None, x0_older=None, corrected_out=None, corrector=None,
):
    """Launch the step (and, with guidance rescale, the stats pass first).

    Operands are flat contiguous views, each [B * N] (``uncond`` is the model output when
    ``cond`` is None); ``out`` and ``x0_out`` (or None) are written. ``coefficients`` is a
    tuple in COEFFICIENT_FIELDS order, used when ``table`` is None; otherwise ``table``
    [steps, 8] float32 and ``step`` int32 [2] (row index, finished-program counter).
    ``corrector``: None, or the UniC coefficients (kx, k0, k1, kt) with ``last``,
    ``prev_x0``, ``corrected_out`` (flat like the others) and ``x0_older`` (None when k1
    is unused); host coefficients only.
    """
    if corrector is not None and (table is not None or last is None or prev_x0 is None or corrected_out is None):
        raise ValueError("corrector: needs host coefficients, last, prev_x0 and corrected_out")
    # Written (or, for the table, indexed) as flat arrays: a strided one would be copied
    # by reshape and the kernel's writes lost.
    for name, t in (("out", out), ("x0_out", x0_out), ("corrected_out", corrected_out), ("table", table),
                    ("step", step)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    batch = out.shape[0]
    n = out[0].numel() if batch else 0
    if batch == 0 or n == 0:
        if table is not None:
            step[0] += 1  # an empty step is still a step of the schedule
        return
    flat = [t.reshape(-1) if t is not None else None for t in
            (sample, uncond, cond, prev_x0, noise, out, x0_out, last, x0_older, corrected_out)]
    x, u, c, x0_prev, nz, o, x0o, lst, old, xco = flat
    correct = corrector is not None
    guided = c is not None
    rescale = guided and guidance_rescale != 0.0
    chunk, n_chunks = _stats_layout(batch, n, out.device)
    partial = torch.empty((batch * n_chunks * 4,) if rescale else (1,), dtype=torch.float32, device=out.device)
    if rescale:
        _cfg_stats_kernel[(n_chunks, batch)](u, c, partial, n, chunk, guidance_scale, BLOCK=STATS_BLOCK,
                                             num_warps=4)
    from_table = table is not None
    coef = coefficients if not from_table else (0.0,) * 8
    dummy = o
    block, num_warps = _step_block(batch * n, out.device)
    _guided_step_kernel[(triton.cdiv(n, block), batch)](
        x, u, c if guided else dummy, x0_prev if x0_prev is not None else dummy,
        nz if nz is not None else dummy, o, x0o if x0o is not None else dummy, partial,
        table if from_table else partial, step if from_table else partial,
        lst if correct else dummy, old if correct and old is not None else dummy, xco if correct else dummy,
        *coef, guidance_scale, guidance_rescale, *(corrector if correct else (0.0,) * 4),
        n, n_chunks, chunk, table.shape[0] if from_table else 1,
        GUIDED=guided, RESCALE=rescale, NEED_X0=need_x0 or x0o is not None or correct, CLIP=clip,
        HAS_PREV=x0_prev is not None, HAS_NOISE=nz is not None, STORE_X0=x0o is not None,
        FROM_TABLE=from_table, BLOCK=block, CHUNKS_POW2=triton.next_power_of_2(n_chunks),
        CORRECT=correct, HAS_OLDER=correct and old is not None, num_warps=num_warps,
    )
