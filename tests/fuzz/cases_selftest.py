"""Toy ops with known defects, to check that the harness classifies each defect as what
it is (tests/fuzz/test_harness.py). Not part of any tier's totals."""

from __future__ import annotations

import os

import torch

from tests.fuzz.harness import Case
from tests.fuzz.inputs import randn, with_nan


def scaled(x):
    return x * 2


def off_in_float32(x):
    return x * 2 + (0.5 if x.dtype == torch.float32 else 0.0)


def swallows_nan(x):
    return torch.nan_to_num(x * 2)


def index_error(x):
    return x[x.shape[0] + 3]


def vague_value_error(x):
    raise ValueError("something went wrong")


def clear_value_error(x):
    raise ValueError(f"x: expected a positive size, got {tuple(x.shape)}")


def aborts(x):
    os.abort()


def _x(g):
    return (randn(g, 4, 3),), {}


def _x_nan(g):
    return (with_nan(randn(g, 4, 3), (1, 1)),), {}


def all_cases():
    return (
        Case("selftest/correct", scaled, _x),
        Case("selftest/correct_nan_kept", scaled, _x_nan),
        Case("selftest/wrong_value", off_in_float32, _x),
        Case("selftest/wrong_nan_swallowed", swallows_nan, _x_nan, reference=lambda args, kwargs: scaled(*args)),
        Case("selftest/wrong_accepted", scaled, _x, expect="error"),
        Case("selftest/unclear_index_error", index_error, _x),
        Case("selftest/unclear_vague_message", vague_value_error, _x),
        Case("selftest/clear_error", clear_value_error, _x, expect="error"),
        Case("selftest/crash", aborts, _x, isolate=True),
    )
