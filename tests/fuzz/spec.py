"""Turning per-op tables of input variants into Cases, one per (variant, backend)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mmfast.dispatch import op_family

from tests.fuzz.harness import Case


@dataclass
class V:
    """One input variant: ``build(gen) -> (args, kwargs)``."""

    what: str
    build: Callable
    expect: str = "value"
    features: tuple = ()
    isolate: bool = False
    extra: dict = field(default_factory=dict)  # reference= / outputs= for the Case


def cpu_backends(family: str) -> list[str]:
    """The backends of ``family`` that can run on this machine's CPU (Triton ones under the
    interpreter), in priority order."""
    found = []
    for backend in op_family(family).backends.values():
        if backend.unavailable_reasons():
            continue
        if backend.triton or "cpu" in backend.devices:
            found.append(backend.name)
    return found


def cases(op: Callable, family: str | None, variants: list[V]) -> list[Case]:
    backends = cpu_backends(family) if family else [None]
    out = []
    for backend in backends:
        for v in variants:
            out.append(Case(
                id=f"{op.__name__}/{backend or '-'}/{v.what}", op=op, build=v.build, backend=backend,
                expect=v.expect, isolate=v.isolate, features=frozenset(v.features), family=family, **v.extra,
            ))
    return out
