"""The activation and patch_embed benchmark suites: registered, their byte and FLOP
models, and each mmfast provider checked against the baselines it is timed with (one
small case each, on whatever device runs the tests). Timings are not checked: they mean
something only on a GPU."""

import pytest
import torch

from mmfast.bench import harness, suites
from mmfast.bench.env import detect_env
from mmfast.bench.suites import activation, patch_embed, vision_tower


def test_registered_with_their_providers():
    assert {"activation", "patch_embed", "vision_tower"} <= set(suites.names())
    assert [p.name for p in suites.get("vision_tower").providers] == [
        "mmfast-patched", "mmfast-tower", "hf-sdpa", "hf-sdpa-compile", "timm"]
    assert [p.name for p in suites.get("activation").providers] == ["mmfast-triton", "torch-eager", "torch-compile"]
    assert [p.name for p in suites.get("patch_embed").providers] == [
        "mmfast-triton", "hf-conv", "torch-linear", "torch-compile"]


def test_gpu_cases_are_the_real_models():
    cuda = torch.device("cuda")  # building cases allocates nothing
    act = activation.cases(quick=False, device=cuda)
    assert {c.params["width"] for c in act} == {3420, 4096, 4304}
    assert len({c.name for c in act}) == len(act)
    embed = {c.name: c for c in patch_embed.cases(quick=False, device=cuda)}
    assert len(embed) == len(patch_embed.cases(quick=False, device=cuda))
    # CLIP ViT-L/14 @ 336: 576 patches of K = 588 into E = 1024 per image.
    assert embed["clip-fwd-8img-E1024-bf16"].flops == 2 * 8 * 576 * 588 * 1024
    assert embed["conv3d-fwd+bwd-4096rows-E1280-bf16"].flops == 3 * 2 * 4096 * 1176 * 1280
    towers = {c.name for c in vision_tower.cases(quick=False, device=cuda)}
    assert {"clip-L14-336-fwd-b32", "siglip-so400m-384-fwd+bwd-b8"} <= towers


def test_activation_byte_model():
    by_name = {c.name: c for c in activation.cases(quick=True, device=torch.device("cpu"))}
    mn = 32 * 320 * 2  # bf16
    assert by_name["gelu-fwd-32x320-bf16"].bytes == 2 * mn
    assert by_name["swiglu-fwd+bwd-32x320-bf16"].bytes == (3 + 5) * mn


@pytest.mark.parametrize("suite,case_name,baseline", [
    ("activation", "quick_gelu-fwd+bwd-32x320-bf16", "torch-eager"),
    ("patch_embed", "clip-fwd+bwd-2img-E64-fp16", "hf-conv"),
    ("patch_embed", "conv3d-fwd-64rows-E64-fp16", "torch-linear"),
])
def test_mmfast_provider_computes_what_the_baseline_does(suite, case_name, baseline):
    env = detect_env()
    if env.device.type == "cuda":
        pytest.skip("the CPU case names are checked here; GPU runs are the benchmark itself")
    suite = suites.get(suite)
    case = next(c for c in suite.cases(True, env.device) if c.name == case_name)
    ours, theirs = suite.provider("mmfast-triton"), suite.provider(baseline)
    assert ours.skip(case, env.device) is None
    torch.manual_seed(0)
    inputs = case.make_inputs(env.device)
    got, want = ours.build(case)(inputs), theirs.build(case)(inputs)
    for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
    assert harness.tensor_bytes(inputs) > 0


def test_vision_tower_goals_are_against_hf_and_timm():
    goals = suites.get("vision_tower").speedups
    assert {g.provider for g in goals} == {"mmfast-patched", "mmfast-tower"}
    assert all(g.baselines == ("hf-sdpa", "timm") and g.where == {"pass": "fwd"} for g in goals)


def test_timm_baseline_matches_the_hf_model_shapes_or_says_why_not():
    env = detect_env()
    if env.device.type == "cuda":
        pytest.skip("the CPU cases are checked here; GPU runs are the benchmark itself")
    suite = suites.get("vision_tower")
    timm, hf = suite.provider("timm"), suite.provider("hf-sdpa")
    case = next(c for c in suite.cases(True, env.device) if c.name == "siglip-tiny-fwd-b2")
    reason = timm.skip(case, env.device)
    if reason is not None:  # timm is optional: the reason must say so
        assert "timm" in reason
        pytest.skip(reason)
    inputs = case.make_inputs(env.device)
    got, want = timm.build(case)(inputs), hf.build(case)(inputs)
    assert [g.shape for g in got] == [w.shape for w in want]

