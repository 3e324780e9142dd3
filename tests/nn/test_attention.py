"""Attention modules against plain PyTorch, and against the Qwen vision attention of HF."""

import pytest
import torch

from mmfast.nn import Attention, VarlenAttention
from mmfast.ops.attention import attention_reference
from mmfast.ops.rotary import rotary_reference


def _reference(module, x, rotary=None, cu_seqlens=None):
    q, k, v = module.project_qkv(x)
    if rotary is not None:
        q, k = rotary_reference(q, *rotary), rotary_reference(k, *rotary)
    right = 0 if module.causal else module.window[1]
    out, _ = attention_reference(q, k, v, cu_seqlens, cu_seqlens, module.window[0], right, module.scale)
    return module.proj(out.flatten(-2))


def _tables(tokens, half):
    angles = torch.randn(tokens, half) * 3
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("fused", [True, False])
def test_padded_gqa_causal_with_rotary(fused, device):
    module = Attention(64, 4, num_kv_heads=2, fused_qkv=fused, causal=True).to(device)
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    rotary = tuple(t.to(device) for t in _tables(9, 6))  # partial: 12 of 16 dims rotate
    out = module(x, rotary)
    want = _reference(module, x, rotary)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, module.proj.weight])
    want_grads = torch.autograd.grad(want.square().sum(), [x, module.proj.weight])
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)
    names = {"qkv.weight", "qkv.bias"} if fused else {"q_proj.weight", "k_proj.weight", "v_proj.weight"}
    assert names <= module.state_dict().keys() and "proj.weight" in module.state_dict()


def test_varlen_with_segments(device):
    module = VarlenAttention(64, 2).to(device)
    cu = torch.tensor([0, 1, 8, 8, 21], dtype=torch.int32, device=device)
    x = torch.randn(21, 64, device=device)
    rotary = tuple(t.to(device) for t in _tables(21, 16))
    out = module(x, cu, rotary, max_seqlen=13)
    torch.testing.assert_close(out, _reference(module, x, rotary, cu), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        module(x, None)
    with pytest.raises(ValueError, match="cu_seqlens"):
        Attention(64, 2)(x)  # packed input without cu_seqlens


def test_loads_qwen_vision_attention_weights():
    modeling = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(vision_config={"hidden_size": 64, "num_heads": 2}).vision_config
    config._attn_implementation = "sdpa"
    hf = modeling.Qwen2_5_VLVisionAttention(config)
    ours = VarlenAttention(64, 2)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(11, 64)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    cos, sin = _tables(11, 16)
    want = hf(x, cu, position_embeddings=(torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)))
    torch.testing.assert_close(ours(x, cu, (cos, sin), max_seqlen=7), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(64, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(60, 8)
    with pytest.raises(ValueError, match="x: expected"):
        Attention(64, 2)(torch.randn(2, 3, 32))
