"""Triton kernels and their launchers, shipped as ``mmfast.kernels``.

Importing this package imports Triton; the ops import it lazily, only when a Triton
backend is chosen. Kernel files know nothing of autograd: each exposes launchers that
take tensors and return tensors.
"""
