"""The cross_attention suite is registered, builds its CPU smoke cases, and every
provider either takes a case or says why not."""

import torch

from mmfast.bench import suites


def test_cross_attention_suite_cases_and_skips():
    suite = suites.get("cross_attention")
    device = torch.device("cpu")
    cases = suite.cases(True, device)
    assert {c.params["part"] for c in cases} == {"raw", "mllama", "perceiver", "qformer"}
    assert all(c.flops and c.flops > 0 for c in cases)
    for case in cases:
        takers = [p.name for p in suite.providers if p.skip(case, device) is None]
        assert len(takers) >= 2, f"{case.name}: needs ours and a baseline, got {takers}"
    assert "CUDA" in suite.provider("sdpa-flash").skip(cases[0], device)
