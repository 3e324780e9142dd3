"""Record the kernel launches a launcher makes, instead of running them.

Inside :func:`recording`, ``kernel[grid](...)`` stores a :class:`Launch` (the kernel, its
arguments reduced to what Triton specialises on, and its compile-time constants and
options) and returns. An autotuned kernel records one launch per config in its list:
every config the autotuner could choose is compiled, not only the one it would pick.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Where the fake allocations start: the caching allocator hands out 512-byte aligned
# blocks, so a tensor's alignment is that of its storage offset.
_BASE_ADDRESS = 1 << 32
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class PointerArg:
    """A tensor argument as Triton sees it: element type and address (for alignment)."""

    dtype: torch.dtype
    offset_bytes: int

    def data_ptr(self) -> int:
        return _BASE_ADDRESS + self.offset_bytes


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple          # PointerArg | int | float | bool | None, in parameter order
    constexprs: dict     # compile-time constants passed by keyword
    options: dict        # num_warps, num_stages, ...
    autotuned: bool = False
    case: dict = field(default_factory=dict)  # filled in by the caller: which shape

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def module(self) -> str:
        return self.kernel.fn.__module__.rsplit(".", 1)[-1]

    def specialization(self) -> tuple:
        """What decides the compiled binary (as Triton's launch cache keys it): pointer
        dtypes and 16-byte alignment, integers' value class (1, multiple of 16, 64-bit),
        and every constant and option exactly."""
        def spec(a):
            if isinstance(a, PointerArg):
                return ("*", str(a.dtype), a.offset_bytes % 16 == 0)
            if isinstance(a, bool) or a is None:
                return a
            if isinstance(a, int):
                wide = not -2**31 <= a < 2**31
                return ("i", a == 1, a % 16 == 0, wide)
            if isinstance(a, float):
                return "f"
            return repr(a)
        return (self.module, self.name, tuple(spec(a) for a in self.args),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted(self.options.items())))


def _arg(a):
    if isinstance(a, torch.Tensor):
        return PointerArg(a.dtype, a.storage_offset() * a.element_size())
    return a


def _record(sink: list, kernel: JITFunction, args, kwargs, autotuned: bool) -> None:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    names = [p.name for p in kernel.params]
    positional = list(args)
    # Keyword arguments that are not constexprs are positional parameters passed by name.
    for name in names[len(positional):]:
        if name in kwargs and not kernel.params[names.index(name)].is_constexpr:
            positional.append(kwargs.pop(name))
    sink.append(Launch(kernel, tuple(_arg(a) for a in positional), kwargs, options, autotuned))


@contextlib.contextmanager
def recording():
    """Yields the list that the launches made inside the block are appended to."""
    launches: list[Launch] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        _record(launches, self, args, kwargs, autotuned=False)

    def autotuner_run(self, *args, **kwargs):
        if not isinstance(self.fn, JITFunction):
            raise TypeError(f"{self.fn}: the gate records autotuned JIT functions only")
        for config in self.configs:
            _record(launches, self.fn, args, {**kwargs, **config.all_kwargs()}, autotuned=True)

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved
