"""The fuzz harness classifies each kind of defect as what it is (a harness that called
everything correct would make the suite a test that cannot fail)."""

import pytest
import torch

from tests.fuzz.catalog import catalog
from tests.fuzz.harness import classify, compare, run_isolated

CASES = {case.id: case for case in catalog("selftest")}


@pytest.mark.parametrize("case_id", [c for c in CASES if not CASES[c].isolate])
def test_outcome_is_the_one_the_case_is_named_for(case_id):
    outcome, detail = classify(CASES[case_id])
    expected = case_id.split("/")[1].split("_")[0]
    assert outcome.split("_")[0] == expected, (outcome, detail)


def test_a_dying_process_is_a_crash_and_the_next_case_still_runs():
    results = run_isolated(["selftest/crash", "selftest/correct"], "selftest")
    assert results["selftest/crash"][0] == "crash"
    assert results["selftest/correct"][0] == "correct"


def test_compare_accepts_overflow_only_where_the_value_does_not_fit():
    ref = torch.tensor([1.0, 7e4], dtype=torch.float64)
    assert compare(torch.tensor([1.0, float("inf")], dtype=torch.float16), ref, torch.float16) is None
    assert compare(torch.tensor([float("inf"), 6e4], dtype=torch.float16), ref, torch.float16) is not None
    assert compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0], dtype=torch.float64), torch.float32) is not None


def test_every_public_op_has_cases_on_every_cpu_backend():
    import inspect

    import mmfast.ops as ops
    from mmfast.dispatch import op_families
    from tests.fuzz.spec import cpu_backends

    cases = catalog("quick")
    functions = {name for name in ops.__all__ if inspect.isfunction(getattr(ops, name))}
    assert functions - {case.name for case in cases} == set()
    for family in op_families():
        fuzzed = {case.backend for case in cases if case.family == family}
        assert set(cpu_backends(family)) <= fuzzed, family
