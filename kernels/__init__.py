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
# imported under the top-level name it steps aside: in its place it loads the `kernels`
# that the rest of sys.path holds, or else an empty namespace package, which is what Python
# makes of a folder without __init__.py and what transformers' availability check treats as
# absent (no __file__, no __version__, nothing importable under it).
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
