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
   ``mmfast.set_backend("torch", op="norm")`` (one family), per thread and per async
   context (contextvars);
3. the environment variable ``MMFAST_BACKEND``: ``"triton"`` or
   ``"norm=torch,attention=triton"``.

A backend chosen by an override must take the call; otherwise the error lists its
reasons (never a silent fallback). When no backend fits, the error lists every
backend's reasons. Nothing here probes hardware at import time: compute capability is
read on the first call that needs it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable

import torch

from mmfast import tuning

logger = logging.getLogger("mmfast.dispatch")

ENV_VAR = "MMFAST_BACKEND"


@dataclass(frozen=True, init=False)
class Call:
    """What a backend may look at to decide whether it can take one call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    layout: str | None = None
    # Op-specific facts (hidden size, segment lengths, ...) for a backend's ``check``.
    facts: dict = field(default_factory=dict, compare=False)

    def __init__(self, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
                 layout: str | None = None, facts: dict | None = None):
        # One call per op call: the generated frozen __init__ sets each field through
        # object.__setattr__, which cost about 1.5 us more than this one update.
        self.__dict__.update(device=device, dtype=dtype, head_dim=head_dim, layout=layout,
                             facts={} if facts is None else facts)


_env_keys: dict[str, object] = {}


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read on every op call: that one raises and catches a
    KeyError for an unset variable (some 3 us; two reads a call were a third of the
    dispatch cost of a small op), so the variable is looked up in os.environ's own
    dict of encoded names and values instead, which os.environ keeps current."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None:  # not the standard os._Environ (replaced): ask it
        return environ.get(name)
    key = _env_keys.get(name)
    if key is None:
        key = _env_keys[name] = environ.encodekey(name)
    value = data.get(key)
    return None if value is None else environ.decodevalue(value)


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).

    Triton reads this variable when a kernel is defined, so it must be set before the
    first kernel module is imported (the test suite does so on CPU machines).
    """
    return getenv("TRITON_INTERPRET") not in (None, "", "0")


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


_CPU = torch.device("cpu")


def is_cpu(device: torch.device) -> bool:
    """``device.type == "cpu"``; ``device.type`` builds a new string each time (about 1 us,
    as much as the rest of a remembered dispatch), so the usual CPU device is compared first."""
    return device == _CPU or device.type == "cpu"


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


class NoBackendError(ValueError):
    """No backend of an op family can take a call; the message says why, per backend.

    A ValueError, so that callers catch every refusal of their input one way."""


class _BackendTable(dict):
    """A family's backends by name; ``version`` counts the changes (registration, or a
    test replacing one), which the remembered CPU choices are only valid for."""

    version = 0

    def __setitem__(self, name, backend):
        super().__setitem__(name, backend)
        self.version += 1

    def __delitem__(self, name):
        super().__delitem__(name)
        self.version += 1


class OpFamily:
    """The backends of one op family, in priority order."""

    def __init__(self, name: str):
        self.name = name
        self.backends: dict[str, Backend] = _BackendTable()
        # The default choice for CPU calls, by what decides it (see _cpu_default), for the
        # backends of version _cpu_version.
        self._cpu_choices: dict[tuple, Backend] = {}
        self._cpu_version = -1

    def register(self, backend: Backend) -> Backend:
        """Add ``backend`` after those already registered (lower priority)."""
        if backend.name in self.backends:
            raise ValueError(f"op family '{self.name}' already has a backend '{backend.name}'")
        self.backends[backend.name] = backend
        return backend

    def select(self, call: Call, backend: str | None = None) -> Backend:
        """The backend that runs ``call``: an override if any, else the first that fits."""
        if backend is None and is_cpu(call.device) and not torch.compiler.is_compiling() \
                and not _layers.get() and not getenv(ENV_VAR):  # (dynamo cannot trace _layers.get)
            return self._cpu_default(call)
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
        return self._first_fit(call)

    def _cpu_default(self, call: Call) -> Backend:
        """The default choice for a CPU call with no override in force, remembered by what
        decides it: every input of that choice is in the call (dtype, head dim, layout,
        facts) or fixed for the process (installed modules, cached when first asked),
        except TRITON_INTERPRET, which is part of the key. On a CPU the walk over the
        backends' reasons cost as much as a small op; this path is kept short for the same
        reason. (Other devices also depend on compute capability and the tuning tables.)"""
        version = getattr(self.backends, "version", None)
        if version != self._cpu_version:  # backends registered or replaced (tests do): decide afresh
            self._cpu_choices.clear()
            if version is None:  # not a _BackendTable: changes cannot be seen
                return self._first_fit(call)
            self._cpu_version = version
        key = (call.dtype, call.head_dim, call.layout, triton_interpreted(), tuple(call.facts.items()))
        try:
            cached = self._cpu_choices.get(key)
        except TypeError:  # a fact that cannot be a key: decide afresh
            return self._first_fit(call)
        if cached is None:
            if len(self._cpu_choices) >= _CPU_CHOICES_KEPT:
                self._cpu_choices.clear()
            return self._cpu_choices.setdefault(key, self._first_fit(call))
        _log_choice(self.name, cached.name, call)  # every decision is seen (profile's record_backends)
        return cached

    def _first_fit(self, call: Call) -> Backend:
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


_CPU_CHOICES_KEPT = 4096  # distinct CPU calls remembered per family (max_seqlen facts vary)


_families: dict[str, OpFamily] = {}


def op_family(name: str) -> OpFamily:
    """The op family called ``name``, created on first use."""
    if name not in _families:
        _families[name] = OpFamily(name)
    return _families[name]


def op_families() -> dict[str, OpFamily]:
    return dict(_registered())


def _registered() -> dict[str, OpFamily]:
    """Every op family, its backends registered: ``import mmfast`` is lazy (the ``mmfast``
    command starts without torch), so questions about the whole registry import the ops
    first. During that import this returns the families registered so far."""
    importlib.import_module("mmfast.ops")
    return _families


# ---- overrides -------------------------------------------------------------------
#
# set_backend overrides live in a contextvars.ContextVar, so they are per thread and per
# async task: a thread starts with none, a task sees a copy of its creator's. The value
# is an immutable tuple of layers (id, family or _GLOBAL, backend name or None = cleared);
# the last layer naming a family wins. A ``with`` block removes its own layer and the
# statement-form layers set after it, so it restores what it found even when two blocks
# exit out of order (another block's layer stays until that block exits).

_GLOBAL = "*"
_layers: contextvars.ContextVar[tuple] = contextvars.ContextVar("mmfast_backend_overrides", default=())
_layer_ids = itertools.count(1)
_parsed_env: tuple[str, dict[str, str] | ValueError] = ("", {})


def _known_backends() -> list[str]:
    return sorted({name for family in _registered().values() for name in family.backends})


def _check_name(name: str, op: str | None, source: str) -> None:
    """A ValueError naming the valid backends when ``name`` is not one (of family ``op``)."""
    if op is not None:
        if op not in _registered():
            raise ValueError(f"{source}: unknown op family '{op}' (known: {', '.join(_families)})")
        if name not in _families[op].backends:
            known = ", ".join(_families[op].backends)
            raise ValueError(f"{source}: op family '{op}' has no backend '{name}' (known: {known})")
    elif name not in _known_backends():
        raise ValueError(f"{source}: no op family has a backend '{name}' (known: {', '.join(_known_backends())})")


def _parse_env(value: str) -> dict[str, str]:
    overrides = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        op, sep, name = item.rpartition("=")
        op, name = (op.strip() if sep else None), name.strip()
        _check_name(name, op, ENV_VAR)
        overrides[op if op is not None else _GLOBAL] = name
    return overrides


def _env_overrides() -> dict[str, str]:
    global _parsed_env
    value = getenv(ENV_VAR) or ""
    if value != _parsed_env[0]:
        try:
            parsed: dict[str, str] | ValueError = _parse_env(value)
        except ValueError as error:  # raised again on every call until the variable changes
            parsed = error
        _parsed_env = (value, parsed)
    if isinstance(_parsed_env[1], ValueError):
        raise ValueError(str(_parsed_env[1]))
    return _parsed_env[1]


# torch.compile cannot trace ContextVar.get: a traced call reads the layers as a constant
# and guards on _generation, which every set_backend (in any thread) bumps, so a change
# retraces. (A graph traced in one thread is reused by another thread whose overrides
# differ only until the next set_backend anywhere: backends compute the same function,
# only the choice among them would be stale.)
_generation = 0


def _traced_layers(generation: int) -> tuple:
    return _layers.get()


# What torch.compiler.assume_constant_result does; calling it would import torch._dynamo
# (and with it Triton) when mmfast is imported. tests/test_dispatch_context.py checks that
# compiled code still follows the overrides.
_traced_layers._dynamo_marked_constant = True


def _current_layers() -> tuple:
    if torch.compiler.is_compiling():
        return _traced_layers(_generation)
    return _layers.get()


def _set_layers(layers: tuple) -> None:
    global _generation
    _layers.set(layers)
    _generation += 1


def env_override_error() -> str | None:
    """Why MMFAST_BACKEND is invalid, or None (for ``mmfast info``)."""
    try:
        _env_overrides()
    except ValueError as error:
        return str(error)
    return None


def current_overrides() -> dict[str, str]:
    """The set_backend overrides of this thread / async context: {family or '*': name}."""
    overrides: dict[str, str | None] = {}
    for _, key, name in _current_layers():
        overrides[key] = name
    return {key: name for key, name in overrides.items() if name is not None}


def _override_for(family: OpFamily) -> tuple[str | None, str]:
    for overrides, source in ((current_overrides(), "set_backend"), (_env_overrides(), ENV_VAR)):
        if family.name in overrides:
            return overrides[family.name], source
        # A global override applies only to the families that have such a backend.
        if overrides.get(_GLOBAL) in family.backends:
            return overrides[_GLOBAL], source
    return None, ""


def _compact(layers: tuple) -> tuple:
    """Drop statement-form layers that nothing can reveal again: those above the last
    ``with`` layer that a newer layer for the same family shadows."""
    last_scoped = max((i for i, layer in enumerate(layers) if layer[0] in _scoped), default=-1)
    keep, seen = [], set()
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        if i > last_scoped and layer[0] not in _scoped:
            if layer[1] in seen:
                continue
            seen.add(layer[1])
        keep.append(layer)
    return tuple(reversed(keep))


# Ids of the layers of the ``with`` blocks now open, in any thread (ids are never reused).
_scoped: set[int] = set()


class _Override(contextlib.AbstractContextManager):
    """One set_backend call; as a ``with`` block it undoes itself on exit."""

    def __init__(self, layer_id: int):
        self._id = layer_id

    def __enter__(self) -> "_Override":
        _scoped.add(self._id)
        return self

    def __exit__(self, *exc) -> None:
        _scoped.discard(self._id)
        layers = _layers.get()
        ids = [layer[0] for layer in layers]
        if self._id not in ids:  # exited in another context: nothing of ours is here
            return
        mine = ids.index(self._id)
        # Our layer and the statements made after it go; other open blocks' layers stay.
        _set_layers(layers[:mine] + tuple(layer for layer in layers[mine + 1:] if layer[0] in _scoped))


def set_backend(name: str | None, op: str | None = None) -> contextlib.AbstractContextManager:
    """Force backend ``name`` for op family ``op`` (or every family that has it), in this
    thread / async context only.

    ``name=None`` removes the override. Works as a statement or, to restore exactly the
    overrides it found on exit, as a context manager::

        mmfast.set_backend("torch", op="norm")
        with mmfast.set_backend("triton"):
            ...

    An unknown family or backend name is a ValueError listing the valid ones.
    """
    if op is not None and not isinstance(op, str):
        raise TypeError(f"op: expected an op family name or None, got {type(op).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name: expected a backend name or None, got {type(name).__name__}")
    if op is not None and op not in _registered():
        raise ValueError(f"op: unknown op family '{op}' (known: {', '.join(_families)})")
    if name is not None:
        _check_name(name, op, "name")
    layer = (next(_layer_ids), op if op is not None else _GLOBAL, name)
    _set_layers(_compact(_layers.get()) + (layer,))
    return _Override(layer[0])


# ---- logging ---------------------------------------------------------------------

_logged: set[tuple] = set()


def _log_choice(op: str, backend: str, call: Call) -> None:
    key = (op, backend, call.device, call.dtype)  # the device, not its type: see is_cpu
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.debug("%s: backend %s for %s %s", op, backend, call.device.type, _dtype_name(call.dtype))

