"""The machinery behind ``mmfast.patch``: per-instance, reversible replacement.

A model family (one small file under ``integrations/transformers`` or
``integrations/diffusers``) declares a :class:`Family`: the model classes it recognises
and a table of :class:`Replacement` rows, each naming module classes (by name, so that
transformers and diffusers need not be imported to match) and a function that patches one
such module through the :class:`PatchHandle`. Every change goes through the handle, which
records how to reverse it, so ``handle.undo()`` restores the instance exactly: the
parameters are never copied or re-registered and the state_dict is unchanged. The records
are data (object, attribute, previous value), so a ``copy.deepcopy`` of a patched model
carries a handle that undoes the copy. Replacement names are qualified from the patched
object, so ``target.get_submodule(name)`` finds each.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

class _Missing:
    """Nothing was there. The same object through deepcopy and pickle, so that the undo
    records of a copied handle still recognise it."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


class PatchHandle:
    """What ``mmfast.patch`` did to one object, and how to undo it.

    ``replaced`` lists ``(qualified module name, what replaced it)``. Also a context
    manager: ``with mmfast.patch(model): ...`` undoes on exit.
    """

    def __init__(self, target: Any, family: str):
        self.target = target
        self.family = family
        self.replaced: list[tuple[str, str]] = []
        self._undo: list[Callable[[], None]] = []
        self.active = True
        # Set by mmfast.patch(..., sequence_parallel=group) while the families apply (not
        # kept: a process group does not deep-copy); the qualified names of the models a
        # family made sequence-parallel.
        self.sequence_parallel = None
        self.sequence_parallel_models: list[str] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` on this instance, remembering what was there."""
        previous = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        if isinstance(obj, nn.Module) and isinstance(value, nn.Module):
            previous = obj._modules.get(name, _MISSING)
        setattr(obj, name, value)
        # A record, not a closure: copy.deepcopy of the model (which copies this handle with
        # it) maps obj and previous to the copy's, so the copy's handle undoes the copy.
        self._undo.append((obj, name, previous))

    def set_forward(self, module: nn.Module, forward: Callable[..., Any], what: str,
                    qualified_name: str = "") -> None:
        """Give this instance its own ``forward(self, ...)``; its class is untouched."""
        self.set_attr(module, "forward", types.MethodType(forward, module))
        self.replaced.append((qualified_name, what))  # "" for the target itself: target.get_submodule("")

    def add_undo(self, restore: Callable[[], None], qualified_name: str, what: str) -> None:
        """Record a change made some other way (e.g. diffusers' ``set_attn_processor``)."""
        self._undo.append(restore)
        self.replaced.append((qualified_name, what))

    def undo(self) -> None:
        """Reverse every change, newest first. Calling it twice does nothing."""
        while self._undo:
            entry = self._undo.pop()
            entry() if callable(entry) else _restore(*entry)
        self.replaced.clear()
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"PatchHandle(family={self.family!r}, {len(self.replaced)} replacements, {state})"


def _restore(obj: Any, name: str, previous: Any) -> None:
    if previous is _MISSING:
        if isinstance(obj, nn.Module) and name in obj._modules:
            del obj._modules[name]
        else:
            obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, previous)


@dataclass(frozen=True)
class Replacement:
    """One row of a family's table: modules whose class is named in ``module_classes``
    get ``apply(module, handle, qualified_name)``."""

    module_classes: tuple[str, ...]
    apply: Callable[[nn.Module, PatchHandle, str], None]
    what: str = ""


@dataclass(frozen=True)
class Family:
    """A model family: the classes of the objects it patches, and its table.

    ``prepare(target, handle)``, when given, runs first, for changes that are not
    per-module (a pipeline's scheduler, say); it returns the module tree to walk (default:
    the target itself). ``sequence_parallel(model, handle)``, when given, runs last on a
    whole model when ``mmfast.patch`` was asked for sequence parallelism
    (``handle.sequence_parallel`` is the group); families without it refuse that.
    """

    name: str
    model_classes: tuple[str, ...]
    replacements: tuple[Replacement, ...] = ()
    prepare: Callable[[Any, PatchHandle], Any] | None = None
    sequence_parallel: Callable[[Any, PatchHandle], None] | None = None
    notes: str = field(default="", compare=False)

    def recognises(self, target: Any) -> bool:
        return any(cls.__name__ in self.model_classes for cls in type(target).__mro__)

    def holds(self, target: Any) -> bool:
        """Whether a module inside ``target`` (or itself) is of a class in the table: a
        sub-module of a model (a resampler, a tower) is patched by the table alone. Rows
        for torch's own classes (LayerNorm) do not count: every model holds those."""
        classes = {name for row in self.replacements for name in row.module_classes if not hasattr(nn, name)}
        return isinstance(target, nn.Module) and any(type(m).__name__ in classes for m in target.modules())

    def apply(self, target: Any, handle: PatchHandle, whole_model: bool = True) -> None:
        root = self.prepare(target, handle) if self.prepare is not None and whole_model else target
        if root is None:
            return
        roots = root if isinstance(root, (list, tuple)) else [root]
        by_class = {name: row for row in self.replacements for name in row.module_classes}
        for tree in roots:
            # Names relative to the target, so that target.get_submodule(name) finds them.
            prefix = module_name(target, tree)
            for qualified_name, module in list(tree.named_modules()):
                row = by_class.get(type(module).__name__)
                if row is not None:
                    row.apply(module, handle, ".".join(p for p in (prefix, qualified_name) if p))
        if whole_model and handle.sequence_parallel is not None and self.sequence_parallel is not None:
            self.sequence_parallel(target, handle)


def module_name(target: Any, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``target`` ("" for the target itself)."""
    if module is target or not isinstance(target, nn.Module):
        return ""
    return next((name for name, m in target.named_modules() if m is module), "")
