"""Triton kernels and their launchers, shipped as ``mmfast.kernels``.

Importing this package imports Triton; the ops import it lazily, only when a Triton
backend is chosen. Kernel files know nothing of autograd: each exposes launchers that
take tensors and return tensors.
"""

# Why the block below: this folder sits at the top of the repository, so wherever the
# repository root is on sys.path ahead of site-packages (pytest's rootdir insertion, a
# REPL or `python -m ...` started in the clone, a script at the root), `import kernels`
# finds this file before Hugging Face's `kernels` package, which owns that name and which
# transformers and diffusers import. The folder must stay a regular package (setuptools'
# editable install maps `mmfast.kernels` onto it and needs this __init__.py), so when it is
# imported under the top-level name, it steps aside: it loads the `kernels` that the rest
# of sys.path holds in its own place, or fails as if this folder were not there.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
