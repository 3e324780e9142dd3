"""The qwen3_vision_tower suite: providers and issue 19's speedup goals are wired, the
GPU cases are the ones the issue names, and on a CPU the mmfast provider computes what
the Hugging Face sdpa provider computes (merged tokens and DeepStack features), forward
and backward. Timings are not checked: they mean something only on a GPU."""

import pytest
import torch

from mmfast.bench import suites
from mmfast.bench.env import detect_env
from mmfast.bench.suites import qwen3_vision_tower

pytest.importorskip("transformers")


def test_providers_goals_and_cases():
    suite = suites.get("qwen3_vision_tower")
    assert [p.name for p in suite.providers] == [
        "mmfast", "mmfast-patched-hf", "hf-sdpa", "hf-sdpa-compile", "hf-flash-attention-2"]
    goals = {(g.provider, g.baselines, g.min_ratio, g.where["pass"], g.where["shape"]) for g in suite.speedups}
    issue = ("1img-1344px", "mixed-4img")
    assert goals == {("mmfast", ("hf-sdpa",), 2.0, "fwd", issue), ("mmfast", ("hf-sdpa-compile",), 1.2, "fwd", issue)}
    gpu = {c.name: c for c in suite.cases(False, torch.device("cuda"))}
    assert gpu["1img-1344px-fwd"].params["patches"] == 84 * 84
    per_image = [h * w for t, h, w in gpu["1img-2048px-fwd"].params["grid"]]
    assert per_image == [16384] and "1img-2048px-fwd+bwd" in gpu  # 16k patches: still with backward
    assert all(c.params["patches"] <= qwen3_vision_tower.MAX_BACKWARD_PATCHES
               for c in gpu.values() if c.params["pass"] == "fwd+bwd")
    assert gpu["1img-1344px-fwd+bwd"].flops == 3 * gpu["1img-1344px-fwd"].flops


def test_mmfast_provider_matches_hf_sdpa_on_the_cpu_cases():
    env = detect_env()
    if env.device.type == "cuda":
        pytest.skip("the CPU cases are checked here; GPU runs are the benchmark itself")
    suite = suites.get("qwen3_vision_tower")
    for case in suite.cases(False, env.device):
        inputs = case.make_inputs(env.device)
        got, want = suite.provider("mmfast").build(case)(inputs), suite.provider("hf-sdpa").build(case)(inputs)
        assert len(got) == len(want)
        for g, w in zip(got, want):  # merged + DeepStack outputs, or one gradient per parameter
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
