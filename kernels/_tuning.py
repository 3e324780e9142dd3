"""Autotuning that collapses to a single config under test.

Kernels that autotune declare their configs through :func:`autotune`. When
``MMFAST_AUTOTUNE=0`` (the test suite sets it) only the first config is kept, so tests
are reproducible, quick, and exercise the config the kernel author listed first.
"""

import os

import triton


def tuning_enabled() -> bool:
    """Off with MMFAST_AUTOTUNE=0, and under the Triton interpreter (which has no device
    to time configs on)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return os.environ.get("MMFAST_AUTOTUNE", "1") not in ("", "0")


def autotune(configs: list, key: list[str], **kwargs):
    """``triton.autotune`` over ``configs``, or over ``configs[:1]`` when tuning is off."""
    if not configs:
        raise ValueError("configs: at least one triton.Config is needed")
    return triton.autotune(configs if tuning_enabled() else configs[:1], key=key, **kwargs)
