"""mmfast: fused Triton and CUDA kernels for the hot paths of multimodal models.

Touching ``mmfast.ops``, ``mmfast.nn``, ``mmfast.patch``, ``mmfast.set_backend`` or
``mmfast.NoBackendError`` imports torch and registers the op families and their backends;
``import mmfast`` alone imports neither (PEP 562 module ``__getattr__``), so that the
``mmfast`` command answers ``--help`` and ``--version`` without loading torch. No kernel is
imported (Triton is imported when a Triton backend first runs) and no hardware is probed.
"""

from __future__ import annotations

import importlib

from mmfast._version import __version__

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "nn": ("mmfast.nn", None),
    "ops": ("mmfast.ops", None),
    "NoBackendError": ("mmfast.dispatch", "NoBackendError"),
    "set_backend": ("mmfast.dispatch", "set_backend"),
    "patch": ("mmfast.integrations", "patch"),
}
__all__ = ["NoBackendError", "nn", "ops", "patch", "set_backend", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    importlib.import_module("mmfast.ops")  # every public name needs the op families registered
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
