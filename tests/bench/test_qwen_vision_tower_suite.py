"""The qwen_vision_tower suite's vLLM-style reference computes what the Hugging Face tower
computes (so the baseline it times is the same model), forward and backward, on a tiny
config; the suite's providers and speedup goals are wired as issue 4 asks. Timings are
not checked: they mean something only on a GPU."""

import pytest
import torch

from mmfast.bench import suites
from mmfast.bench.env import detect_env
from mmfast.bench.suites import qwen_vision_tower
from mmfast.bench.suites.qwen_vllm_reference import ReferenceQwen25VisionTower

pytest.importorskip("transformers")

# 8x8 patches: every window and frame segment the same length (the SDPA view path);
# 12x8 then 2 frames of 8x4: windows cut at the edges and frames of different sizes
# (the padded, key-masked path).
GRIDS = {"uniform": [[1, 8, 8]], "ragged": [[1, 12, 8], [2, 8, 4]]}


def _hf_tower(device):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLConfig(vision_config=qwen_vision_tower.TINY).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).to(device)
    with torch.no_grad():  # norms at one and biases at zero would hide a mis-copied weight
        for p in tower.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    return tower


def _backends(device):
    from mmfast.dispatch import module_available

    cuda = device.type == "cuda" and module_available("xformers")
    return ["sdpa", pytest.param("xformers", marks=pytest.mark.skipif(
        not cuda, reason="xformers on CUDA only"))]


@pytest.mark.parametrize("backend", _backends(detect_env().device))
@pytest.mark.parametrize("layout", GRIDS)
def test_reference_matches_the_hf_tower_forward_and_backward(layout, backend, device):
    hf = _hf_tower(device)
    ref = ReferenceQwen25VisionTower.from_hf(hf, backend)
    grid = torch.tensor(GRIDS[layout], device=device)
    pixels = torch.randn(int(grid.prod(-1).sum()), qwen_vision_tower.PATCH_DIM, device=device)
    want, got = hf(pixels, grid_thw=grid).pooler_output, ref(pixels, grid)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    dy = torch.randn_like(want)
    (want * dy).sum().backward()
    (got * dy).sum().backward()
    torch.testing.assert_close(ref.patch_weight.grad, hf.patch_embed.proj.weight.grad.flatten(1),
                               rtol=1e-3, atol=1e-3)
    gate_up = torch.cat([hf.blocks[0].mlp.gate_proj.weight.grad, hf.blocks[0].mlp.up_proj.weight.grad])
    torch.testing.assert_close(ref.blocks[0].gate_up.weight.grad, gate_up, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ref.blocks[1].qkv.weight.grad, hf.blocks[1].attn.qkv.weight.grad,
                               rtol=1e-3, atol=1e-3)


def test_reference_rejects_unknown_backend():
    hf = _hf_tower(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        ReferenceQwen25VisionTower.from_hf(hf, "flash")


def test_providers_and_goals_include_the_vllm_style_reference():
    suite = suites.get("qwen_vision_tower")
    assert [p.name for p in suite.providers] == [
        "mmfast", "mmfast-patched-hf", "hf-sdpa", "hf-sdpa-compile", "hf-flash-attention-2",
        "vllm-style-sdpa", "vllm-style-xformers"]
    goals = {(g.provider, g.baselines, g.min_ratio, g.where["pass"]) for g in suite.speedups}
    assert goals == {("mmfast", ("hf-sdpa",), 5.0, "fwd"), ("mmfast", ("hf-sdpa-compile",), 1.5, "fwd"),
                     ("mmfast", ("vllm-style-sdpa", "vllm-style-xformers"), 1.2, "fwd"),
                     ("mmfast", ("hf-sdpa",), 2.0, "fwd+bwd")}
    names = {p.name for p in suite.providers}
    assert all(set(g.baselines) <= names for g in suite.speedups)


def test_reference_provider_runs_the_suite_cases_like_hf_sdpa():
    env = detect_env()
    if env.device.type == "cuda":
        pytest.skip("the CPU cases are checked here; GPU runs are the benchmark itself")
    suite = suites.get("qwen_vision_tower")
    ours, theirs = suite.provider("vllm-style-sdpa"), suite.provider("hf-sdpa")
    fwd, fwd_bwd = (next(c for c in suite.cases(True, env.device) if c.params["pass"] == p)
                    for p in ("fwd", "fwd+bwd"))
    assert ours.skip(fwd, env.device) is None
    assert "xformers" in suite.provider("vllm-style-xformers").skip(fwd, env.device)
    inputs = fwd.make_inputs(env.device)
    torch.testing.assert_close(ours.build(fwd)(inputs), theirs.build(fwd)(inputs), rtol=1e-4, atol=1e-4)
    # Backward: one gradient per parameter; gate and up are one merged weight here.
    inputs = fwd_bwd.make_inputs(env.device)
    got, want = ours.build(fwd_bwd)(inputs), theirs.build(fwd_bwd)(inputs)
    assert sum(g.numel() for g in got) == sum(w.numel() for w in want)
    assert all(g.isfinite().all() for g in got)
