"""Backend dispatch: which implementation runs a given call of an op family.

Each op family (``norm``, ``attention``, ...) owns an ordered list of backends. A
backend declares what it supports (devices, dtypes, head dims, layouts, minimum
compute capability, importable modules) and, for anything more specific, a
``check`` that returns human-readable reasons it cannot take a call. Dispatch takes
the first backend, in priority order, with no reasons. A backend marked ``measured``
(the CUDA C++ ones) is skipped by that default choice unless the device's tuning table
(mmfast.tuning) says it measured faster for such a call; an override still takes it.

Overrides, strongest first:

1. ``backend="..."`` on the call;
2. ``mmfast.set_backend("triton")`` (every family that has such a backend) or
   ``mmfast.set_backend("torch", op="norm")`` (one family);
3. the environment variable ``MMFAST_BACKEND``: ``"triton"`` or
   ``"norm=torch,attention=triton"``.

A backend chosen by an override must take the call; otherwise the error lists its
reasons (never a silent fallback). When no backend fits, the error lists every
backend's reasons. Nothing here probes hardware at import time: compute capability is
read on the first call that needs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable

import torch

from mmfast import tuning

logger = logging.getLogger("mmfast.dispatch")

ENV_VAR = "MMFAST_BACKEND"


@dataclass(frozen=True)
class Call:
    """What a backend may look at to decide whether it can take one call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    layout: str | None = None
    # Op-specific facts (hidden size, segment lengths, ...) for a backend's ``check``.
    facts: dict = field(default_factory=dict, compare=False)


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).

    Triton reads this variable when a kernel is defined, so it must be set before the
    first kernel module is imported (the test suite does so on CPU machines).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_module_found: dict[str, bool] = {}


def module_available(name: str) -> bool:
    """Whether ``name`` (a module, or a dotted path to a submodule) can be imported; cached.

    A top-level module is looked up without importing it. Finding a submodule imports its
    parent package, which fails in its own ways when a compiled extension does not match:
    such a library counts as missing.
    """
    if name not in _module_found:
        try:
            _module_found[name] = importlib.util.find_spec(name) is not None
        except Exception:  # the parent package is missing or broken
            _module_found[name] = False
    return _module_found[name]


_capability: dict[int, tuple[int, int]] = {}


def cuda_capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)
    return _capability[index]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Backend:
    """One implementation of an op family and what it supports.

    ``run`` is the implementation; its signature is the op family's own. ``triton=True``
    marks a Triton backend: it needs the ``triton`` module, and on a CPU device it runs
    only under the Triton interpreter. ``dot=True`` marks kernels built on ``tl.dot``:
    the interpreter multiplies bfloat16 operands as raw bits, so such a backend refuses
    bfloat16 there rather than return a wrong answer.
    """

    name: str
    run: Callable
    devices: Collection[str] = ("cpu", "cuda")
    dtypes: Collection[torch.dtype] | None = None
    head_dims: Callable[[int], bool] | Collection[int] | None = None
    layouts: Collection[str] | None = None
    min_capability: tuple[int, int] | None = None
    requires: tuple[str, ...] = ()
    triton: bool = False
    dot: bool = False
    check: Callable[[Call], Iterable[str]] | None = None
    # Taken by default only where mmfast.tuning says it measured faster on the device.
    measured: bool = False

    def unavailable_reasons(self) -> list[str]:
        """Reasons that hold for every call on this machine (missing modules)."""
        needed = self.requires + (("triton",) if self.triton else ())
        return [f"module '{m}' is not installed" for m in needed if not module_available(m)]

    def reasons(self, call: Call) -> list[str]:
        """Why this backend cannot take ``call``; empty when it can."""
        reasons = self.unavailable_reasons()
        device = call.device.type
        if self.triton and device == "cpu":
            if not triton_interpreted():
                reasons.append("device cpu runs Triton only under TRITON_INTERPRET=1")
            elif self.dot and call.dtype == torch.bfloat16:
                reasons.append("the Triton interpreter computes bfloat16 tl.dot wrongly")
        elif device not in self.devices:
            reasons.append(f"device {device} not supported (supports {', '.join(self.devices)})")
        if self.dtypes is not None and call.dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            reasons.append(f"dtype {_dtype_name(call.dtype)} not supported (supports {names})")
        if self.head_dims is not None and call.head_dim is not None:
            accepted = (
                self.head_dims(call.head_dim)
                if callable(self.head_dims)
                else call.head_dim in self.head_dims
            )
            if not accepted:
                reasons.append(f"head dim {call.head_dim} not supported")
        if self.layouts is not None and call.layout not in self.layouts:
            reasons.append(f"layout {call.layout} not supported (supports {', '.join(self.layouts)})")
        if self.min_capability is not None and device == "cuda":
            have = cuda_capability(call.device)
            if have < self.min_capability:
                need = "%d.%d" % self.min_capability
                reasons.append(f"needs compute capability >= {need}, device has {have[0]}.{have[1]}")
        if self.check is not None and not reasons:
            reasons.extend(self.check(call))
        return reasons


class NoBackendError(RuntimeError):
    """No backend of an op family can take a call; the message says why, per backend."""


class OpFamily:
    """The backends of one op family, in priority order."""

    def __init__(self, name: str):
        self.name = name
        self.backends: dict[str, Backend] = {}

    def register(self, backend: Backend) -> Backend:
        """Add ``backend`` after those already registered (lower priority)."""
        if backend.name in self.backends:
            raise ValueError(f"op family '{self.name}' already has a backend '{backend.name}'")
        self.backends[backend.name] = backend
        return backend

    def select(self, call: Call, backend: str | None = None) -> Backend:
        """The backend that runs ``call``: an override if any, else the first that fits."""
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend: expected a backend name or None, got {type(backend).__name__}")
        name, source = backend, "backend="
        if name is None:
            name, source = _override_for(self)
        if name is not None:
            if name not in self.backends:
                known = ", ".join(self.backends)
                raise ValueError(f"{source}: op family '{self.name}' has no backend '{name}' (known: {known})")
            chosen = self.backends[name]
            reasons = chosen.reasons(call)
            if reasons:
                raise NoBackendError(
                    f"{self.name}: backend '{name}' (chosen by {source}) cannot take this call: "
                    + "; ".join(reasons)
                )
            _log_choice(self.name, chosen.name, call)
            return chosen
        report = []
        for candidate in self.backends.values():
            if candidate.measured:
                # Asked first: a backend the table does not pick is not probed at all.
                skip = tuning.not_measured_reason(self.name, candidate.name, call.device, call.dtype, call.facts)
                if skip is not None:
                    report.append(f"  {candidate.name}: {skip}")
                    continue
            reasons = candidate.reasons(call)
            if not reasons:
                _log_choice(self.name, candidate.name, call)
                return candidate
            report.append(f"  {candidate.name}: " + "; ".join(reasons))
        raise NoBackendError(
            f"{self.name}: no backend can take a call on {call.device.type} "
            f"with dtype {_dtype_name(call.dtype)}:\n" + "\n".join(report)
        )


_families: dict[str, OpFamily] = {}


def op_family(name: str) -> OpFamily:
    """The op family called ``name``, created on first use."""
    if name not in _families:
        _families[name] = OpFamily(name)
    return _families[name]


def op_families() -> dict[str, OpFamily]:
    return dict(_families)


# ---- overrides -------------------------------------------------------------------

_GLOBAL = "*"
_set_overrides: dict[str, str] = {}
_parsed_env: tuple[str, dict[str, str]] = ("", {})


def _parse_env(value: str) -> dict[str, str]:
    overrides = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        op, sep, name = item.rpartition("=")
        overrides[op.strip() if sep else _GLOBAL] = name.strip()
    return overrides


def _env_overrides() -> dict[str, str]:
    global _parsed_env
    value = os.environ.get(ENV_VAR, "")
    if value != _parsed_env[0]:
        _parsed_env = (value, _parse_env(value))
    return _parsed_env[1]


def _override_for(family: OpFamily) -> tuple[str | None, str]:
    for overrides, source in ((_set_overrides, "set_backend"), (_env_overrides(), ENV_VAR)):
        if family.name in overrides:
            return overrides[family.name], source
        # A global override applies only to the families that have such a backend.
        if overrides.get(_GLOBAL) in family.backends:
            return overrides[_GLOBAL], source
    return None, ""


class _Restore(contextlib.AbstractContextManager):
    def __init__(self, key: str, previous: str | None):
        self._key, self._previous = key, previous

    def __exit__(self, *exc) -> None:
        if self._previous is None:
            _set_overrides.pop(self._key, None)
        else:
            _set_overrides[self._key] = self._previous


def set_backend(name: str | None, op: str | None = None) -> contextlib.AbstractContextManager:
    """Force backend ``name`` for op family ``op`` (or every family that has it).

    ``name=None`` removes the override. Works as a statement or, to restore the
    previous setting on exit, as a context manager::

        mmfast.set_backend("torch", op="norm")
        with mmfast.set_backend("triton"):
            ...
    """
    if op is not None and op not in _families:
        raise ValueError(f"op: unknown op family '{op}' (known: {', '.join(_families)})")
    key = op if op is not None else _GLOBAL
    previous = _set_overrides.get(key)
    if name is None:
        _set_overrides.pop(key, None)
    else:
        if op is not None and name not in _families[op].backends:
            known = ", ".join(_families[op].backends)
            raise ValueError(f"name: op family '{op}' has no backend '{name}' (known: {known})")
        _set_overrides[key] = name
    return _Restore(key, previous)


# ---- logging ---------------------------------------------------------------------

_logged: set[tuple] = set()


def _log_choice(op: str, backend: str, call: Call) -> None:
    key = (op, backend, call.device.type, call.dtype)
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.debug("%s: backend %s for %s %s", op, backend, call.device.type, _dtype_name(call.dtype))

