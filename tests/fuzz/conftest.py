"""Prints the fuzz totals (correct / clear error / unclear / wrong / crash) after a run."""

from tests.fuzz import totals
from tests.fuzz.catalog import TIER
from tests.fuzz.harness import SEED


def pytest_terminal_summary(terminalreporter):
    lines = totals.summary(TIER, SEED)
    if lines:
        terminalreporter.section("fuzz totals")
        for line in lines:
            terminalreporter.write_line(line)
