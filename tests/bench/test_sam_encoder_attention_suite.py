"""The sam_encoder_attention suite without a GPU: registered, its GPU cases are SAM's
ViT-B / ViT-H shapes at 1024 px with FLOP counts, and a smoke run of every CPU case and
provider through the harness, mmfast computing what transformers computes. Timings mean
nothing here."""

import pytest
import torch

from mmfast.bench import harness, suites
from mmfast.bench.env import detect_env
from mmfast.bench.suites import sam_encoder_attention as sam

pytest.importorskip("transformers")


def test_registered_with_gpu_cases_of_the_real_models():
    suite = suites.get("sam_encoder_attention")
    assert suite is sam.SUITE and [p.name for p in suite.providers] == ["mmfast", "hf-sdpa", "hf-eager"]
    cases = {c.name: c for c in suite.cases(False, torch.device("cuda"))}  # building cases allocates nothing
    assert len(cases) == len(suite.cases(False, torch.device("cuda")))
    window = cases["vit-h-window-fwd-b1-bf16"].params
    assert (window["segments"], window["side"], window["tokens"]) == (25, 14, 25 * 196)  # 64 padded to 70
    glob = cases["vit-b-global-fwd+bwd-b4-bf16"].params
    assert (glob["segments"], glob["side"], glob["heads"]) == (4, 64, 12)
    encoder = cases["vit-h-encoder-fwd-b1-1024px-bf16"]
    assert encoder.params["tokens"] == 4096 and encoder.flops > 2 * 630e6 * 4096  # ~ 2 x params x tokens
    assert all(c.flops > 0 for c in cases.values())
    quick = suite.cases(True, torch.device("cuda"))
    assert {c.params["model"] for c in quick} == {"vit-h"}
    assert [g.where for g in suite.speedups] == [{"group": "encoder", "model": "vit-h"}]


def test_flop_model():
    # One 14 x 14 window of ViT-B: projections, bias pieces, scores.
    tokens, c, heads = 196, 768, 12
    assert sam.attention_module_flops(tokens, 14, 1, c, heads) == (
        8 * tokens * c * c + 2 * tokens * heads * 28 * 64 + 4 * 64 * heads * tokens ** 2)
    assert sam.grid_windows(64, 14) == 25 and sam.grid_windows(8, 3) == 9


def test_smoke_run_every_cpu_case_and_provider():
    env = detect_env()
    if env.device.type == "cuda":
        pytest.skip("the CPU smoke shapes are checked here; GPU runs are the benchmark itself")
    suite = suites.get("sam_encoder_attention")
    for case in suite.cases(True, env.device):
        results = {}
        for provider in suite.providers:
            assert provider.skip(case, env.device) is None
            row = harness.run_case(suite, case, provider, env, None, quick=True)
            assert row["ms"] > 0 and row["provider"] == provider.name
            torch.manual_seed(0)
            results[provider.name] = provider.build(case)(case.make_inputs(env.device))
        for name in ("hf-sdpa", "hf-eager"):
            for got, want in zip(*(r if isinstance(r, tuple) else (r,) for r in (results["mmfast"], results[name]))):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{case.name}: mmfast vs {name}")
