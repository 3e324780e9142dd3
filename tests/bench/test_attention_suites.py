"""The attention benchmark suites without a GPU: registry, cases, the FLOP model against
the op's own mask, Qwen2.5-VL window lengths against Hugging Face's, the per-window SDPA
loop against Hugging Face's module, and a CPU smoke run. Timings mean nothing here."""

import pytest
import torch

import mmfast.bench
from mmfast.bench import suites
from mmfast.bench.suites import attention as dense
from mmfast.bench.suites import qwen_window_attention as qwen
from mmfast.ops.attention import attention_mask, attention_reference

CUDA = torch.device("cuda")  # building cases allocates nothing


def test_suites_are_registered_with_unique_case_names():
    for name, module in (("attention", dense), ("qwen_window_attention", qwen)):
        suite = suites.get(name)
        assert suite is module.SUITE and suite.bound == "compute"
        for quick in (False, True):
            cases = suite.cases(quick, CUDA)
            assert cases and len({c.name for c in cases}) == len(cases)
            assert all(c.flops > 0 for c in cases)


def test_dense_cases_cover_the_issue():
    cases = dense.cases(False, CUDA)
    assert {c.params["seqlen"] for c in cases} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.params["head_dim"] for c in cases} == {64, 128}
    assert {(c.params["causal"], c.params["pass"]) for c in cases} == {
        (causal, p) for causal in (False, True) for p in ("fwd", "bwd", "fwd+bwd")}
    assert {c.params["dtype"] for c in cases} == {"bfloat16"}


@pytest.mark.parametrize("len_q,len_k,left,right", [
    (7, 7, -1, -1), (7, 7, -1, 0), (5, 9, -1, 0), (9, 5, -1, 0), (12, 12, 3, 2), (6, 10, 0, 0), (0, 4, -1, -1),
])
def test_visible_pairs_match_the_op_mask(len_q, len_k, left, right):
    mask = attention_mask(None, None, len_q, len_k, left, right, torch.device("cpu"))
    assert dense.visible_pairs(len_q, len_k, left, right) == int(mask.sum())


def test_flop_model():
    n, heads, d = 1024, 16, 128
    full = 4 * n * n * heads * d
    assert dense.attention_flops([n], heads, d, "fwd") == full
    assert dense.attention_flops([n], heads, d, "fwd", causal=True) == 4 * heads * d * n * (n + 1) // 2
    assert dense.attention_flops([n], heads, d, "fwd+bwd") == 3.5 * full
    assert dense.attention_flops([n, 0, n], heads, d, "bwd") == 2 * 2.5 * full


@pytest.mark.parametrize("grid", [(1, 32, 32), (1, 58, 58), (2, 20, 36), (1, 128, 92)])
def test_window_lengths_match_hugging_face(grid):
    vision_utils = pytest.importorskip("transformers.vision_utils")
    if not hasattr(vision_utils, "get_vision_window_index"):
        pytest.skip("this transformers has no get_vision_window_index")
    _, cu = vision_utils.get_vision_window_index(torch.tensor([grid]), spatial_merge_size=2,
                                                 window_size=112, patch_size=14)
    # In tokens, empty (padding-only) windows already dropped.
    assert qwen.window_lengths(grid[1], grid[2], grid[0]) == cu.diff().tolist()


def test_qwen_cases_have_64_token_windows_and_edges():
    cases = {c.name: c for c in qwen.cases(False, CUDA)}
    window = cases["qwen-window-fwd-16x1792px-bf16"].params
    assert window["tokens"] == 16 * 128 * 128 and window["max_seqlen"] == 64 and window["segments"] == 16 * 256
    edges = qwen.segment_lengths("window", 1, 812)
    assert set(edges) == {64, 16, 4} and sum(edges) == 58 * 58
    assert cases["qwen-full-fwd+bwd-4x448px-bf16"].params["max_seqlen"] == 1024
    assert cases["siglip-fwd-8x729-bf16"].params["head_dim"] == 72


def test_hf_loop_mirrors_qwen2_5_vl_vision_attention():
    # Hugging Face's module with attn_implementation="sdpa", random weights, rotary off
    # (cos 1, sin 0), against its projections around our mirror of its attention loop.
    modeling = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    config = modeling.Qwen2_5_VLVisionConfig(hidden_size=64, num_heads=4)
    config._attn_implementation = "sdpa"
    module = modeling.Qwen2_5_VLVisionAttention(config).eval()
    lengths = [5, 16, 3]
    cu = torch.tensor([0, 5, 21, 24], dtype=torch.int32)
    x = torch.randn(sum(lengths), 64)
    ones, zeros = torch.ones(24, 16), torch.zeros(24, 16)
    with torch.no_grad():
        expected = module(x, cu_seqlens=cu, position_embeddings=(ones, zeros))
        q, k, v = module.qkv(x).reshape(24, 3, 4, 16).permute(1, 0, 2, 3).unbind(0)
        heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        ours = qwen.hf_sdpa_loop(*heads_first, cu, module.scaling)
        torch.testing.assert_close(module.proj(ours.reshape(24, 64)), expected)
        reference, _ = attention_reference(q, k, v, cu, cu)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_cpu_smoke_run(capsys):
    if torch.cuda.is_available():
        args = ["--case", "^siglip-fwd-", "--provider", "mmfast-triton"]
    else:
        args = ["--provider", "mmfast-triton-short", "--provider", "hf-sdpa-loop", "--provider", "sdpa-math"]
    assert mmfast.bench.main(["qwen_window_attention", "--quick", "--no-save", *args]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and "qwen-window-fwd-" in out
