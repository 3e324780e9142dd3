"""One sampler step with classifier-free guidance, fused into one elementwise pass.

For a sample (latents) x: [B, ...], model outputs u (unconditional) and c (conditional):
[B, ...] each, or one [2B, ...] tensor with u first (as diffusers pipelines stack them),
and per-step scalar coefficients (:class:`StepCoefficients`):

    m    = u + s * (c - u)                         classifier-free guidance, scale s
    m    = phi * m * std(c) / std(m) + (1 - phi) * m
                                                   guidance rescale (diffusers'
                                                   ``rescale_noise_cfg``; unbiased std over
                                                   each sample's elements)
    x0   = px * x + pm * m                         the predicted clean sample
    x0   = clamp(x0, -clip, clip)                  when clip is finite (DDIM clip_sample)
    x    = kx * last + k0 * x0_prev + k1 * x0_older + kt * x0
                                                   UniPC's corrector (UniC), when a
                                                   :class:`CorrectorCoefficients` is given:
                                                   the sample is replaced by its corrected
                                                   value (written to ``corrected_out``)
    prev = cx * x + cm * m + c0 * x0 + c1 * x0_prev + cn * noise

Without guidance, m is the model output itself ([B, ...]). DDIM, Euler discrete,
DPM-Solver++(2M) and flow-matching Euler steps are each this update with coefficients
computed on the host from the schedule in float64 (see mmfast/schedulers/); ``x0_prev``
is the DPM-Solver state (the previous step's x0) and ``noise`` the DDIM eta > 0 /
stochastic-sampling noise. A UniPC step (bh1/bh2, orders 1-2) is the same update with
the corrector stage in front: ``last`` is the previous step's (corrected) sample,
``x0_prev`` and ``x0_older`` the two previous x0; the corrector uses x0 of this step and
the predictor the corrected sample, so one pass does both. ``x0_out`` receives x0 (the DPM-Solver state, or diffusers'
``pred_original_sample``); it may be ``x0_prev`` itself (updated in place). Everything is
computed in float32 (float64 for float64 inputs) and rounded once.

Coefficients either come from the host (a :class:`StepCoefficients`, passed as kernel
arguments) or from a :class:`StepTable` on the device: a float32 table [steps, 8] and an
int32 counter [2] on the device; the step uses row ``counter[0]`` and advances it, so a
step captured in a CUDA graph replays correctly (the guidance scale and rescale are then
fixed at capture time).

Passes over memory: one (reads u, c, x [, x0_prev, noise, last, x0_older]; writes prev
[, x0, the corrected sample]); with a
guidance rescale a stats pass first reads u and c once more (the per-sample std must be
known before the first element is written). No step reads the device back to the host.

Backends: ``cuda`` (CUDA C++, csrc/scheduler_step.cu: operands of one dtype, fp16, bf16 or
fp32; no guidance rescale, no UniPC corrector; built on first use; taken by default only where mmfast.tuning
measured it faster on the device), ``triton`` (fp16, bf16, fp32 operands; CUDA, or CPU
under TRITON_INTERPRET=1),
``torch`` (the reference below; any device and floating dtype). Inference only: there is
no backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Sequence

import torch
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family

# ---- coefficients ----------------------------------------------------------------


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one step (field order = the kernel's table columns)."""

    px: float = 0.0
    pm: float = 0.0
    cx: float = 0.0
    cm: float = 0.0
    c0: float = 0.0
    c1: float = 0.0
    cn: float = 0.0
    clip: float = math.inf

    def row(self) -> tuple[float, ...]:
        # Not dataclasses.astuple, which deep-copies every field: this runs on each host step.
        return (self.px, self.pm, self.cx, self.cm, self.c0, self.c1, self.cn, self.clip)

    @property
    def needs_x0(self) -> bool:
        return self.c0 != 0.0 or math.isfinite(self.clip)


@dataclass(frozen=True)
class CorrectorCoefficients:
    """UniPC's corrector (UniC) stage, host mode only: the corrected sample is
    ``kx * last_sample + k0 * prev_x0 + k1 * older_x0 + kt * x0``."""

    kx: float = 0.0
    k0: float = 0.0
    k1: float = 0.0
    kt: float = 0.0

    def row(self) -> tuple[float, float, float, float]:
        return (self.kx, self.k0, self.k1, self.kt)


@dataclass(frozen=True)
class StepTable:
    """Per-step coefficients on the device, indexed by a device step counter.

    ``table``: float32 [steps + 1, 8], the last row NaN: a counter past the end of the
    schedule or negative (which cannot be checked without a device->host sync) writes NaN
    instead of reading out of bounds. ``counter``: int32 [2] (the row of the next step, and a scratch
    count the kernel resets). ``clip`` and ``needs_x0`` hold for every row.
    """

    table: Tensor
    counter: Tensor
    clip: bool
    needs_x0: bool

    @classmethod
    def build(cls, rows: Sequence[StepCoefficients], device) -> "StepTable":
        if not rows:
            raise ValueError("rows: at least one step is needed")
        clips = {math.isfinite(r.clip) for r in rows}
        if len(clips) > 1:
            raise ValueError("rows: clipping must be on for every step or for none")
        sentinel = (math.nan,) * 8
        table = torch.tensor([r.row() for r in rows] + [sentinel], dtype=torch.float32, device=device)
        counter = torch.zeros(2, dtype=torch.int32, device=device)
        return cls(table, counter, clips.pop(), any(r.needs_x0 for r in rows))

    def reset(self, step: int = 0) -> None:
        """Point the counter at ``step`` in [0, steps] (a host->device copy; outside
        captured regions). ``steps`` is the NaN sentinel row: a step past the schedule."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.steps:
            raise ValueError(f"step: expected an int in [0, {self.steps}] (the schedule's steps), got {step!r}")
        self.counter.copy_(torch.tensor([step, 0], dtype=torch.int32))

    @property
    def steps(self) -> int:
        return self.table.shape[0] - 1


# ---- reference -------------------------------------------------------------------


def guided_model_output(uncond: Tensor, cond: Tensor | None, scale: float, rescale: float,
                        compute: torch.dtype) -> Tensor:
    """m of the docstring, in ``compute`` precision."""
    if cond is None:
        return uncond.to(compute)
    u, c = uncond.to(compute), cond.to(compute)
    m = u + scale * (c - u)
    if rescale != 0.0:
        dims = tuple(range(1, m.dim()))
        factor = c.std(dim=dims, keepdim=True) / m.std(dim=dims, keepdim=True)
        m = rescale * (m * factor) + (1.0 - rescale) * m
    return m


def guided_step_reference(sample, uncond, cond, prev_x0, noise, coefficients, guidance_scale: float,
                          guidance_rescale: float, clip: bool, need_x0: bool, out_dtype, x0_dtype,
                          corrector=None, last_sample=None, older_x0=None, corrected_dtype=None):
    """Plain PyTorch. ``coefficients``: 8 numbers or 0-d tensors in StepCoefficients order;
    ``need_x0``: whether the c0 term is present; ``corrector``: None or (kx, k0, k1, kt)
    with ``last_sample`` and ``prev_x0`` (``older_x0`` None when k1 is unused). Returns
    (prev, x0 or None), and with a corrector (prev, x0 or None, the corrected sample in
    ``corrected_dtype``)."""
    compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
    px, pm, cx, cm, c0, c1, cn, clip_value = coefficients
    x = sample.to(compute)
    m = guided_model_output(uncond, cond, guidance_scale, guidance_rescale, compute)
    x0 = None
    if need_x0 or clip or x0_dtype is not None or corrector is not None:
        x0 = px * x + pm * m
        if clip:
            x0 = x0.clamp(-clip_value, clip_value)
    if corrector is not None:
        kx, k0, k1, kt = corrector
        x = kx * last_sample.to(compute) + k0 * prev_x0.to(compute) + kt * x0
        if older_x0 is not None:
            x = x + k1 * older_x0.to(compute)
    prev = cx * x + cm * m
    if x0 is not None:
        prev = prev + c0 * x0
    if prev_x0 is not None:
        prev = prev + c1 * prev_x0.to(compute)
    if noise is not None:
        prev = prev + cn * noise.to(compute)
    x0 = x0.to(x0_dtype) if x0_dtype is not None else None
    if corrector is None:
        return prev.to(out_dtype), x0
    return prev.to(out_dtype), x0, x.to(corrected_dtype)


# ---- custom op (opaque to torch.compile, traced through its fake impl) ---------------


@torch.library.custom_op("mmfast::guided_step", mutates_args=("out", "x0_out", "step", "corrected_out"))
def _guided_step_op(
    sample: Tensor, uncond: Tensor, cond: Optional[Tensor], prev_x0: Optional[Tensor],
    noise: Optional[Tensor], out: Tensor, x0_out: Optional[Tensor], coefficients: list[float],
    table: Optional[Tensor], step: Optional[Tensor], guidance_scale: float,
    guidance_rescale: float, clip: bool, need_x0: bool, last_sample: Optional[Tensor],
    older_x0: Optional[Tensor], corrected_out: Optional[Tensor], corrector: Optional[list[float]],
) -> None:
    from mmfast.kernels.scheduler_step import guided_step_fwd

    guided_step_fwd(sample, uncond, cond, prev_x0, noise, out, x0_out, tuple(coefficients), table,
                    step, guidance_scale, guidance_rescale, clip, need_x0, last_sample, older_x0,
                    corrected_out, tuple(corrector) if corrector is not None else None)


@_guided_step_op.register_fake
def _(sample, uncond, cond, prev_x0, noise, out, x0_out, coefficients, table, step,
      guidance_scale, guidance_rescale, clip, need_x0, last_sample, older_x0, corrected_out, corrector):
    return None


# The CUDA C++ kernel builds on its first call, inside the op, where torch.compile never
# looks. No guidance rescale here: dispatch keeps such calls on Triton.
@torch.library.custom_op("mmfast::guided_step_cuda", mutates_args=("out", "x0_out", "step"))
def _guided_step_cuda_op(
    sample: Tensor, uncond: Tensor, cond: Optional[Tensor], prev_x0: Optional[Tensor],
    noise: Optional[Tensor], out: Tensor, x0_out: Optional[Tensor], coefficients: list[float],
    table: Optional[Tensor], step: Optional[Tensor], guidance_scale: float, clip: bool, need_x0: bool,
) -> None:
    from mmfast.cuda.scheduler_step import guided_step_fwd

    guided_step_fwd(sample, uncond, cond, prev_x0, noise, out, x0_out, coefficients, table, step,
                    guidance_scale, clip, need_x0)


@_guided_step_cuda_op.register_fake
def _(sample, uncond, cond, prev_x0, noise, out, x0_out, coefficients, table, step,
      guidance_scale, clip, need_x0):
    return None


# ---- backends --------------------------------------------------------------------


def _run_triton(args: "_Args") -> None:
    coef = args.coefficients
    host = isinstance(coef, StepCoefficients)
    torch.ops.mmfast.guided_step(
        args.sample, args.uncond, args.cond, args.prev_x0, args.noise, args.out, args.x0_out,
        list(coef.row()) if host else [0.0] * 8,
        None if host else coef.table, None if host else coef.counter,
        args.guidance_scale, args.guidance_rescale,
        math.isfinite(coef.clip) if host else coef.clip, coef.needs_x0,
        args.last_sample, args.older_x0, args.corrected_out,
        list(args.corrector.row()) if args.corrector is not None else None,
    )


def _run_cuda(args: "_Args") -> None:
    coef = args.coefficients
    host = isinstance(coef, StepCoefficients)
    torch.ops.mmfast.guided_step_cuda(
        args.sample, args.uncond, args.cond, args.prev_x0, args.noise, args.out, args.x0_out,
        list(coef.row()) if host else [0.0] * 8,
        None if host else coef.table, None if host else coef.counter, args.guidance_scale,
        math.isfinite(coef.clip) if host else coef.clip, coef.needs_x0,
    )


def _cuda_limits(call: Call):
    from mmfast.cuda import build

    if not call.facts["one_dtype"]:
        yield "operands of different dtypes"
    if call.facts["rescale"]:
        yield "guidance rescale (needs a statistics pass; the Triton backend has it)"
    if call.facts["corrector"]:
        yield "a UniPC corrector stage (the Triton backend has it)"
    reason = build.unavailable_reason(call.device)
    if reason is not None:
        yield f"CUDA C++ path unavailable: {reason}"


def _run_torch(args: "_Args") -> None:
    coef = args.coefficients
    compute = torch.float64 if args.sample.dtype == torch.float64 else torch.float32
    if isinstance(coef, StepCoefficients):
        row, clip = coef.row(), math.isfinite(coef.clip)
    else:
        # index_select keeps the row on the device: no host sync, capturable.
        # A counter outside [0, steps] reads the NaN sentinel row, as the kernels do.
        index = coef.counter[:1].long()
        index = torch.where((index < 0) | (index > coef.steps), coef.steps, index)
        row = coef.table.index_select(0, index)[0].to(compute).unbind()
        clip = coef.clip
    corrector = args.corrector
    results = guided_step_reference(
        args.sample, args.uncond, args.cond, args.prev_x0, args.noise, row,
        args.guidance_scale, args.guidance_rescale, clip, coef.needs_x0, args.out.dtype,
        args.x0_out.dtype if args.x0_out is not None else None,
        corrector=corrector.row() if corrector is not None else None, last_sample=args.last_sample,
        older_x0=args.older_x0,
        corrected_dtype=args.corrected_out.dtype if corrector is not None else None,
    )
    prev, x0 = results[:2]
    # Every result is computed before any output is written: outputs may alias inputs.
    if x0 is not None:
        args.x0_out.copy_(x0)
    if corrector is not None:
        args.corrected_out.copy_(results[2])
    args.out.copy_(prev)
    if not isinstance(coef, StepCoefficients):
        coef.counter[0] += 1


def _triton_limits(call: Call):
    if call.facts.get("float64"):
        yield "float64 operands (the kernel computes in float32)"


SCHEDULER_STEP = op_family("scheduler_step")
SCHEDULER_STEP.register(
    Backend("cuda", _run_cuda, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
            min_capability=(8, 0), check=_cuda_limits, measured=True)
)
SCHEDULER_STEP.register(
    Backend("triton", _run_triton, triton=True, dtypes=(torch.float16, torch.bfloat16, torch.float32),
            check=_triton_limits)
)
SCHEDULER_STEP.register(Backend("torch", _run_torch))


# ---- public function -------------------------------------------------------------


@dataclass
class _Args:
    sample: Tensor
    uncond: Tensor
    cond: Tensor | None
    prev_x0: Tensor | None
    noise: Tensor | None
    out: Tensor
    x0_out: Tensor | None
    coefficients: StepCoefficients | StepTable
    guidance_scale: float
    guidance_rescale: float
    corrector: CorrectorCoefficients | None = None
    last_sample: Tensor | None = None
    older_x0: Tensor | None = None
    corrected_out: Tensor | None = None


def _check_tensor(name: str, t, sample: Tensor, *, leading: int | None = None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if t.device != sample.device:
        raise ValueError(f"{name}: expected device {sample.device} (that of sample), got {t.device}")
    expected = tuple(sample.shape) if leading is None else (leading, *sample.shape[1:])
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected} (from sample {tuple(sample.shape)}), got {tuple(t.shape)}")


def _split_model_output(model_output, sample: Tensor, guided: bool) -> tuple[Tensor, Tensor | None]:
    if isinstance(model_output, (tuple, list)):
        if len(model_output) != 2:
            raise ValueError("model_output: expected a Tensor or an (uncond, cond) pair, "
                             f"got {len(model_output)} items")
        if not guided:
            raise ValueError("guidance_scale: required when model_output is an (uncond, cond) pair")
        uncond, cond = model_output
        _check_tensor("model_output[0] (uncond)", uncond, sample)
        _check_tensor("model_output[1] (cond)", cond, sample)
        if uncond.dtype != cond.dtype:
            raise TypeError(f"model_output: uncond and cond dtypes differ ({uncond.dtype}, {cond.dtype})")
        return uncond, cond
    if not isinstance(model_output, Tensor):
        raise TypeError(f"model_output: expected a Tensor or an (uncond, cond) pair, got {type(model_output).__name__}")
    if not guided:
        _check_tensor("model_output", model_output, sample)
        return model_output, None
    batch = model_output.shape[0] if model_output.dim() else 0
    if batch % 2:
        raise ValueError(f"model_output: guidance needs an even batch (uncond then cond halves), got {batch}")
    _check_tensor("model_output", model_output, sample, leading=2 * sample.shape[0])
    half = sample.shape[0]
    return model_output[:half], model_output[half:]


def _memory_order(sample: Tensor) -> list[int] | None:
    """The dims of ``sample`` from outermost to innermost in memory, batch first, when it
    is dense in that order and not plainly contiguous (channels_last: [0, 2, 3, 1]); None
    otherwise (then every operand is taken contiguous). The kernel sees flat operands in
    this order, sample b's elements one run (guidance rescale reduces over them)."""
    if sample.is_contiguous() or sample.dim() < 2:
        return None
    order = [0, *sorted(range(1, sample.dim()), key=lambda d: -sample.stride(d))]
    return order if sample.permute(order).is_contiguous() else None


def _in_order(t: Tensor | None, order: list[int] | None) -> Tensor | None:
    """``t`` as a contiguous tensor in element order ``order`` (a view when it is)."""
    if t is None:
        return None
    if order is not None:
        t = t.permute(order)
    return t if t.is_contiguous() else t.contiguous()


def _writable(t: Tensor | None, order: list[int] | None, copies: list) -> Tensor | None:
    """What the kernel writes for output ``t``: ``t`` itself in element order ``order``
    when it is laid out that way, else a scratch tensor copied into ``t`` afterwards
    (any strides are accepted)."""
    if t is None:
        return None
    view = t.permute(order) if order is not None else t
    if view.is_contiguous():
        return view
    scratch = torch.empty(view.shape, dtype=view.dtype, device=view.device)
    copies.append((view, scratch))
    return scratch


def _check_corrector(corrector, coefficients, last_sample, prev_x0, older_x0, corrected_out) -> None:
    if corrector is None:
        for name, t in (("last_sample", last_sample), ("older_x0", older_x0), ("corrected_out", corrected_out)):
            if t is not None:
                raise ValueError(f"{name}: only used by a corrector stage (pass corrector=CorrectorCoefficients)")
        return
    if not isinstance(corrector, CorrectorCoefficients):
        raise TypeError(f"corrector: expected CorrectorCoefficients or None, got {type(corrector).__name__}")
    if not isinstance(coefficients, StepCoefficients):
        raise ValueError("corrector: needs host coefficients (StepCoefficients), not a StepTable")
    if last_sample is None or prev_x0 is None or corrected_out is None:
        missing = [n for n, t in (("last_sample", last_sample), ("prev_x0", prev_x0),
                                  ("corrected_out", corrected_out)) if t is None]
        raise ValueError(f"corrector: needs {', '.join(missing)}")
    if corrector.k1 != 0.0 and older_x0 is None:
        raise ValueError("older_x0: required when the corrector's k1 is not 0")


def guided_step(sample: Tensor, model_output, coefficients, *, guidance_scale: float | None = None,
                guidance_rescale: float = 0.0, prev_x0: Tensor | None = None, noise: Tensor | None = None,
                x0_out: Tensor | None = None, out: Tensor | None = None, out_dtype: torch.dtype | None = None,
                corrector: CorrectorCoefficients | None = None, last_sample: Tensor | None = None,
                older_x0: Tensor | None = None, corrected_out: Tensor | None = None,
                backend: str | None = None) -> Tensor:
    """One fused guidance + scheduler update; returns ``prev`` (written into ``out`` if given).

    ``model_output``: [B, ...] (no guidance), or with ``guidance_scale``: [2B, ...] with the
    unconditional half first, or an ``(uncond, cond)`` pair. ``coefficients``: a
    :class:`StepCoefficients` or a :class:`StepTable` (device-side, advanced by each call).
    Operands may have any strides. ``out`` may be ``sample`` and ``x0_out`` may be ``prev_x0``
    (in place). The result has ``out_dtype`` (default: the model output's dtype, diffusers'
    rule) and sample's layout when it is dense with the batch outermost (e.g. channels_last),
    else is contiguous.

    UniPC: ``corrector`` (host coefficients only) with ``last_sample`` (the previous step's
    sample), ``prev_x0`` and, when its k1 is not 0, ``older_x0``; ``corrected_out`` (required)
    receives the corrected sample, from which the update starts. ``corrected_out`` may be
    ``last_sample`` and ``x0_out`` may be ``older_x0`` (in place).

    Example::

        >>> x = torch.randn(2, 4, 8, 8)
        >>> eps = torch.randn(4, 4, 8, 8)                 # [uncond; cond]
        >>> coef = StepCoefficients(cx=1.0, cm=-0.1)      # an Euler step, dt = -0.1
        >>> mmfast.ops.guided_step(x, eps, coef, guidance_scale=7.5).shape
        torch.Size([2, 4, 8, 8])
    """
    if not isinstance(sample, Tensor):
        raise TypeError(f"sample: expected a Tensor, got {type(sample).__name__}")
    if sample.dim() == 0 or not sample.dtype.is_floating_point:
        raise ValueError(f"sample: expected a floating tensor [B, ...], got {sample.dtype} "
                         f"of shape {tuple(sample.shape)}")
    guided = guidance_scale is not None
    if guided and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real)
                   or not math.isfinite(guidance_scale)):
        raise ValueError(f"guidance_scale: expected a finite number or None, got {guidance_scale!r}")
    if (isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, Real)
            or not math.isfinite(guidance_rescale)):
        raise ValueError(f"guidance_rescale: expected a finite number, got {guidance_rescale!r}")
    if guidance_rescale != 0.0 and not guided:
        raise ValueError("guidance_rescale: needs guidance (a guidance_scale and both model output halves)")
    uncond, cond = _split_model_output(model_output, sample, guided)
    for name, t in (("prev_x0", prev_x0), ("noise", noise), ("x0_out", x0_out), ("out", out),
                    ("last_sample", last_sample), ("older_x0", older_x0), ("corrected_out", corrected_out)):
        _check_tensor(name, t, sample)
    _check_corrector(corrector, coefficients, last_sample, prev_x0, older_x0, corrected_out)
    if isinstance(coefficients, StepTable):
        if coefficients.table.device != sample.device or coefficients.counter.device != sample.device:
            raise ValueError(f"coefficients: StepTable must be on {sample.device} (that of sample)")
        if coefficients.table.dtype != torch.float32 or coefficients.table.shape[1:] != (8,):
            raise ValueError(f"coefficients: StepTable.table must be float32 [steps, 8], got "
                             f"{coefficients.table.dtype} {tuple(coefficients.table.shape)}")
        if coefficients.counter.dtype != torch.int32 or coefficients.counter.shape != (2,):
            raise ValueError("coefficients: StepTable.counter must be int32 [2]")
    elif not isinstance(coefficients, StepCoefficients):
        raise TypeError(f"coefficients: expected StepCoefficients or StepTable, got {type(coefficients).__name__}")
    out_dtype = out_dtype or (out.dtype if out is not None else uncond.dtype)
    if out is not None and out.dtype != out_dtype:
        raise TypeError(f"out: expected dtype {out_dtype}, got {out.dtype}")
    order = _memory_order(sample)
    if out is None:  # in sample's layout when the kernel can take it (channels_last), else contiguous
        out = (torch.empty_like(sample, dtype=out_dtype) if order is not None
               else torch.empty(sample.shape, dtype=out_dtype, device=sample.device))
    copies: list = []
    args = _Args(
        sample=_in_order(sample, order), uncond=_in_order(uncond, order), cond=_in_order(cond, order),
        prev_x0=_in_order(prev_x0, order), noise=_in_order(noise, order), out=_writable(out, order, copies),
        x0_out=_writable(x0_out, order, copies), coefficients=coefficients,
        guidance_scale=float(guidance_scale) if guided else 1.0, guidance_rescale=float(guidance_rescale),
    )
    args.corrector = corrector
    if corrector is not None:
        args.last_sample, args.older_x0 = _in_order(last_sample, order), _in_order(older_x0, order)
        args.corrected_out = _writable(corrected_out, order, copies)
    operands = (sample, uncond, prev_x0, noise, out, x0_out, last_sample, older_x0, corrected_out)
    float64 = any(t is not None and t.dtype == torch.float64 for t in operands)
    one_dtype = all(t is None or t.dtype == uncond.dtype for t in operands)
    facts = {"float64": float64, "one_dtype": one_dtype, "rescale": guidance_rescale != 0.0,
             "corrector": corrector is not None, "numel": out.numel()}
    call = Call(device=sample.device, dtype=uncond.dtype, facts=facts)
    SCHEDULER_STEP.select(call, backend).run(args)
    for target, scratch in copies:
        target.copy_(scratch)
    return out
