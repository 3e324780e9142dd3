"""apply_rotary against the float64 reference (flash-attention rule), forward and backward."""

import pytest
import torch

from mmfast.dispatch import NoBackendError
from mmfast.ops.rotary import apply_rotary, rotary_reference
from mmfast.testing import assert_matches_reference, random_tensor


def _tables(shape, device):
    angles = random_tensor(shape, torch.float32, device, scale=3.0)
    return angles.cos(), angles.sin()


def _op(interleaved, backend=None):
    def op(q, k, cos, sin):
        return apply_rotary(q, k, cos, sin, interleaved=interleaved, backend=backend)
    return op


def _reference(interleaved):
    def ref(q, k, cos, sin):
        return rotary_reference(q, cos, sin, interleaved), rotary_reference(k, cos, sin, interleaved)
    return ref


@pytest.mark.parametrize(
    "q_shape,k_heads,half,table_batch,interleaved,dtype",
    [
        ((37, 4, 80), 4, 40, False, False, torch.float32),    # Qwen vision: packed, full rotary, head dim 80
        ((29, 6, 72), 2, 18, False, True, torch.float16),     # GQA k, partial rotary, interleaved
        ((3, 11, 5, 64), 1, 32, True, False, torch.bfloat16),  # padded, per-batch (M-RoPE style) tables, MQA
        ((2, 7, 3, 48), 3, 12, False, True, torch.float32),   # padded, tables shared by the batch, partial
    ],
)
def test_matches_reference(q_shape, k_heads, half, table_batch, interleaved, dtype, device):
    q = random_tensor(q_shape, dtype, device)
    k = random_tensor(q_shape[:-2] + (k_heads, q_shape[-1]), dtype, device)
    tokens = q_shape[-3]
    table_shape = (q_shape[0], tokens, half) if table_batch else (tokens, half)
    cos, sin = _tables(table_shape, device)
    assert_matches_reference(_op(interleaved), _reference(interleaved),
                             {"q": q, "k": k, "cos": cos, "sin": sin}, grad_inputs=("q", "k"))


def test_strided_q_k_from_a_fused_qkv(device):
    # What the Qwen vision attention hands over: views into one [T, 3, H, D] projection.
    qkv = random_tensor((19, 3, 2, 32), torch.float16, device)
    q, k, _ = qkv.unbind(1)
    cos, sin = _tables((19, 16), device)
    full_cos = torch.cat([cos, cos], -1)  # Hugging Face's full-width table, sliced back
    out_q, out_k = apply_rotary(q, k, full_cos[:, :16], sin)
    torch.testing.assert_close(out_q, rotary_reference(q, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(out_k, rotary_reference(k, cos, sin), rtol=0, atol=0)


def test_q_only_and_one_sided_gradient(device):
    q = random_tensor((9, 2, 16), torch.float32, device, requires_grad=True)
    k = random_tensor((9, 2, 16), torch.float32, device, requires_grad=True)
    cos, sin = _tables((9, 8), device)
    out = apply_rotary(q, None, cos, sin)
    torch.testing.assert_close(out, rotary_reference(q, cos, sin))
    out_q, out_k = apply_rotary(q, k, cos, sin)
    out_k.sum().backward()  # only k's output is used
    assert q.grad is None
    torch.testing.assert_close(k.grad, rotary_reference(torch.ones_like(k), cos, -sin))


def test_tables_that_need_grad_take_the_reference(device):
    q = random_tensor((5, 2, 8), torch.float32, device)
    angles = random_tensor((5, 4), torch.float32, device, requires_grad=True)
    out = apply_rotary(q, None, angles.cos(), angles.sin())
    out.sum().backward()
    assert angles.grad is not None and angles.grad.abs().sum() > 0
    with pytest.raises(NoBackendError, match="cos/sin require grad"):
        apply_rotary(q, None, angles.cos(), angles.sin(), backend="triton")


def test_bad_input():
    q = torch.randn(6, 2, 16)
    cos = sin = torch.randn(6, 8)
    with pytest.raises(ValueError, match="q: expected"):
        apply_rotary(torch.randn(6, 16), None, cos, sin)
    with pytest.raises(TypeError, match="k: expected dtype"):
        apply_rotary(q, q.half(), cos, sin)
    with pytest.raises(ValueError, match="k: expected the batch"):
        apply_rotary(q, torch.randn(5, 2, 16), cos, sin)
    with pytest.raises(ValueError, match="cos: expected"):
        apply_rotary(q, None, torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="rotary dim"):
        apply_rotary(q, None, torch.randn(6, 9), torch.randn(6, 9))
    with pytest.raises(ValueError, match="sin: expected shape"):
        apply_rotary(q, None, cos, torch.randn(6, 4))
    with pytest.raises(TypeError, match="interleaved"):
        apply_rotary(q, None, cos, sin, interleaved=1)


def test_compiles_without_graph_breaks():
    # aot_eager traces through the custom op's fake impl and the autograd.Function
    # without generating C++ (quick on a CPU).
    q = torch.randn(7, 2, 16, requires_grad=True)
    k = torch.randn(7, 1, 16)
    cos, sin = _tables((7, 8), q.device)

    def fn(q, k):
        out_q, out_k = apply_rotary(q, k, cos, sin)
        return out_q.sum() + out_k.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), fn(q, k))
    (grad,) = torch.autograd.grad(compiled(q, k), q)
    torch.testing.assert_close(grad, rotary_reference(torch.ones_like(q), cos, -sin))


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_real_sizes_bf16(interleaved, device):
    # Qwen2.5-VL-7B vision: 16k patches, 16 heads of 80; and a padded LLM batch with GQA.
    for q_shape, k_heads in (((16384, 16, 80), 16), ((2, 4096, 28, 128), 4)):
        q = random_tensor(q_shape, torch.bfloat16, device)
        k = random_tensor(q_shape[:-2] + (k_heads, q_shape[-1]), torch.bfloat16, device)
        cos, sin = _tables((q_shape[-3], q_shape[-1] // 2), device)
        assert_matches_reference(_op(interleaved), _reference(interleaved),
                                 {"q": q, "k": k, "cos": cos, "sin": sin}, grad_inputs=("q", "k"))
