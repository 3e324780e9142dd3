"""Subprocess entry of the fuzz harness: ``python -m tests.fuzz.worker <tier> <case id>...``
classifies each case and prints ``START <id>`` before and ``RESULT <json>`` after it, so
the parent can tell which case a dying process was running."""

import json
import os
import sys

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: before any kernel is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MMFAST_POISON_OUTPUTS", "1")
os.environ.setdefault("MMFAST_AUTOTUNE", "0")


def main(tier: str, ids: list[str]) -> None:
    from tests.fuzz.catalog import catalog
    from tests.fuzz.harness import classify

    by_id = {case.id: case for case in catalog(tier)}
    for case_id in ids:
        print(f"START {case_id}", flush=True)
        outcome, detail = classify(by_id[case_id])
        print("RESULT " + json.dumps({"id": case_id, "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
