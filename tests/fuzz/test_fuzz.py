"""The fuzz suite (issue 16): every public op of mmfast.ops on every backend that runs
on this machine's CPU, fed generated bad and awkward inputs; each case is classified
against the float64 reference (tests/fuzz/harness.py). Fails on any silent wrong answer,
unclear error or crash.

    pytest tests/fuzz                      # quick tier (part of the normal suite)
    MMFAST_FUZZ=long pytest tests/fuzz     # long tier: adds seeded random cases
    MMFAST_FUZZ_SEED=3 ...                 # another seed for the generated inputs

Totals are printed at the end of the run. No case is excused.
"""

from __future__ import annotations

import pytest

from tests.fuzz import totals
from tests.fuzz.catalog import TIER, catalog
from tests.fuzz.harness import BAD, classify, run_isolated

CASES = catalog(TIER)


@pytest.mark.parametrize("op", sorted({case.name for case in CASES}))
def test_fuzz(op):
    cases = [case for case in CASES if case.name == op]
    results = {case.id: classify(case) for case in cases if not case.isolate}
    isolated = [case.id for case in cases if case.isolate]
    if isolated:  # crash-prone: in a subprocess, so a crash is counted instead of killing pytest
        results.update(run_isolated(isolated, TIER))
    totals.record(results)
    bad = [f"  {outcome}: {case_id}: {detail}" for case_id, (outcome, detail) in sorted(results.items())
           if outcome in BAD]
    assert not bad, f"{len(bad)} of {len(results)} {op} fuzz cases failed:\n" + "\n".join(bad)
