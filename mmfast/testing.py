"""Test helpers shared by mmfast's test suite (and usable by anyone testing a backend).

The accuracy rule is flash-attention's: compute a float64 reference, run PyTorch eager in
the tested dtype, and require the op's error against float64 to be at most ``factor``
(2) times eager's error, plus one unit in the last place of the output dtype at the
largest magnitude of the exact answer. That unit is what rounding the answer once costs;
without it, an output eager happens to round correctly (a sum over a few rows, say)
would leave no room for a different but equally valid summation order. The rule applies
to every output and every input gradient.

The Triton interpreter converts float32 to bfloat16 by truncation, where GPUs round to
nearest even, so an interpreted bf16 result may be off by one more unit in the last
place than the same kernel on a GPU; under TRITON_INTERPRET=1 that unit is allowed per
element, for bf16 only.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mmfast.dispatch import triton_interpreted


def random_tensor(shape, dtype, device, *, scale: float = 1.0, offset: float = 0.0,
                  requires_grad: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Normal(offset, scale) values: random, never all zeros, rounded to ``dtype``."""
    t = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + offset
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _run(fn, inputs: Mapping[str, Any], grad_names, grads_out: tuple | None, dtype):
    """Copy tensor inputs into ``dtype`` (None: keep), run ``fn``, backprop ``grads_out``."""
    leaves = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor):
            value = value.detach().to(dtype or value.dtype).requires_grad_(name in grad_names)
        leaves[name] = value
    outs = _as_tuple(fn(**leaves))
    if grads_out is None:  # first run: draw the upstream gradients once, for all runs
        gen = torch.Generator().manual_seed(1234)
        grads_out = tuple(random_tensor(o.shape, o.dtype, o.device, generator=gen) for o in outs)
    if grad_names:
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads_out) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = tuple(leaves[name].grad for name in grad_names)
    return tuple(o.detach() for o in outs), grads, grads_out


def _max_err(a: Tensor, exact: Tensor, allowance: Tensor | float = 0.0) -> float:
    if not exact.numel():
        return 0.0
    return ((a.double() - exact).abs() - allowance).clamp(min=0).max().item()


def _spacing(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Elementwise spacing of ``dtype`` numbers at |values|: |x| in [2^(e-1), 2^e) has
    spacing eps * 2^(e-1)."""
    _, exponent = torch.frexp(values.double())
    return torch.finfo(dtype).eps * torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - 1)


def _unit_in_last_place(exact: Tensor, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` numbers at the largest finite magnitude in ``exact``."""
    finite = exact[exact.isfinite()]
    largest = finite.abs().max() if finite.numel() else None
    if largest is None or largest == 0:
        return 0.0
    return _spacing(largest, dtype).item()


def _truncation_allowance(exact: Tensor, dtype: torch.dtype) -> Tensor | float:
    """One bf16 unit in the last place of each element, when the interpreter truncates."""
    if dtype != torch.bfloat16 or not triton_interpreted():
        return 0.0
    return _spacing(exact, dtype)


def reference_errors(
    op: Callable,
    reference: Callable,
    inputs: Mapping[str, Any],
    *,
    grad_inputs: tuple[str, ...] = (),
    factor: float = 2.0,
    summed_over: Mapping[str, int] | None = None,
) -> list[dict]:
    """The measurements behind :func:`assert_matches_reference`, one dict per output and
    input gradient: ``what``, ``error`` (max vs float64), ``eager_error``, ``bound``,
    ``nan`` (NaN where the exact answer has none: an unwritten element), ``ok``, and
    ``problem`` (why it fails, else None). Same arguments as the assert."""
    summed_over = dict(summed_over or {})
    grad_inputs = tuple(grad_inputs)
    out_op, grad_op, grads_out = _run(op, inputs, grad_inputs, None, None)
    out_eager, grad_eager, _ = _run(reference, inputs, grad_inputs, grads_out, None)
    out_ref, grad_ref, _ = _run(reference, inputs, grad_inputs, grads_out, torch.float64)

    checks = [(f"output {i}", *t) for i, t in enumerate(zip(out_op, out_eager, out_ref))]
    checks += [(f"grad of {n}", *t) for n, t in zip(grad_inputs, zip(grad_op, grad_eager, grad_ref))]
    results = []
    for what, got, eager, exact in checks:
        row = {"what": what, "error": None, "eager_error": None, "bound": None, "nan": False, "problem": None}
        results.append(row)
        if got is None or exact is None:
            if not (got is None and exact is None):
                row["problem"] = f"{what}: op gave {got is not None}, reference {exact is not None}"
            continue
        if got.shape != exact.shape:
            row["problem"] = f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
            continue
        if got.dtype != eager.dtype:
            row["problem"] = f"{what}: dtype {got.dtype}, expected {eager.dtype}"
            continue
        row["nan"] = bool(got.isnan().any()) and not bool(exact.isnan().any())
        unit = _unit_in_last_place(exact, got.dtype)
        if what in summed_over and exact.numel():
            unit += summed_over[what] * torch.finfo(got.dtype).eps * exact.abs().max().item()
        row["error"] = _max_err(got, exact, _truncation_allowance(exact, got.dtype))
        row["eager_error"] = _max_err(eager, exact)
        row["bound"] = factor * row["eager_error"] + unit
        if row["nan"]:
            row["problem"] = f"{what}: NaN (unwritten or overflowed elements)"
        elif not row["error"] <= row["bound"]:
            row["problem"] = (
                f"{what}: max error {row['error']:.3e} vs float64 exceeds {factor} x eager's "
                f"{row['eager_error']:.3e} + one unit in the last place {unit:.3e} "
                f"(dtype {got.dtype}, shape {tuple(got.shape)})")
    for row in results:
        row["ok"] = row["problem"] is None
    return results


def assert_matches_reference(
    op: Callable,
    reference: Callable,
    inputs: Mapping[str, Any],
    *,
    grad_inputs: tuple[str, ...] = (),
    factor: float = 2.0,
    summed_over: Mapping[str, int] | None = None,
) -> None:
    """Check ``op(**inputs)`` and its gradients with the flash-attention rule.

    ``reference`` is plain PyTorch with the same signature and outputs; it runs once in
    float64 (the exact answer) and once in the inputs' own dtypes (eager). Gradients are
    taken for the inputs named in ``grad_inputs`` against random upstream gradients.

    ``summed_over`` names checks ("grad of weight") that are sums of n terms which the op
    may add in another order than eager (a weight gradient summed over rows, in per-program
    partials): their floor grows by the worst-case error of summing n terms,
    n * eps * max|exact|. Without it, a float32 sum that eager happens to round correctly
    fails on summation order alone.
    """
    for row in reference_errors(op, reference, inputs, grad_inputs=grad_inputs, factor=factor,
                                summed_over=summed_over):
        assert row["ok"], row["problem"]
