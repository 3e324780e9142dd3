"""Attention-probability dropout in ``attention`` and ``cross_attention``.

Flash-attention's approach: the Triton kernels are compared with the float64 reference
under the very same keep-mask (rebuilt in torch from the seed the call drew), outputs,
lse and every gradient, with the flash-attention rule; plus the mask itself against the
Triton generator, determinism, seeds, p = 0, keep-rate statistics, torch.compile and
argument errors. Shapes stay tiny: on CPU the kernels run under the interpreter."""

import pytest
import torch

import mmfast
from mmfast.dispatch import Call
from mmfast.ops.attention import ATTENTION, attention_reference
from mmfast.ops.attention_dropout import check_dropout, draw_seed, keep_elements, keep_mask, threshold
from mmfast.ops.cross_attention import cross_attention_reference
from mmfast.ops.cross_attention_masks import LatestImageMask
from mmfast.testing import assert_matches_reference, random_tensor

SEED = 1234


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _generator(device, seed=SEED):
    return torch.Generator(device=device).manual_seed(seed)


def _call_seed(device, seed=SEED):
    """The seed tensor a call given ``_generator(device, seed)`` draws."""
    return draw_seed(device, _generator(device, seed))


def _finite(lse):
    return lse.masked_fill(lse.isinf(), 0.0)


def _qkv(lead_q, lead_k, heads, kv_heads, head_dim, dtype, device):
    return {
        "q": random_tensor((*lead_q, heads, head_dim), dtype, device),
        "k": random_tensor((*lead_k, kv_heads, head_dim), dtype, device),
        "v": random_tensor((*lead_k, kv_heads, head_dim), dtype, device),
    }


# ---- the mask ------------------------------------------------------------------------


def test_torch_mask_is_the_triton_generators(device):
    # The torch rebuild against tl.philox itself (kernels/attention_dropout.py), rows and
    # key columns past 2^4 and a head offset, two rates; the keep rule is an integer one.
    from mmfast.kernels.attention_dropout import dropout_mask

    seed = _call_seed(device)
    for p, rows_start, head in ((0.1, 0, 0), (0.6, 37, 5)):
        got = dropout_mask(seed, rows_start, 21, 43, head, threshold(p))
        rows = torch.arange(rows_start, rows_start + 21, device=device)[:, None]
        cols = torch.arange(43, device=device)[None, :]
        expected = keep_elements(seed, p, rows, torch.tensor(head, device=device), cols)
        assert torch.equal(got, expected)


def test_keep_rate_and_independence(device):
    # 2 x 4 heads x 64 rows x 96 keys = 49k draws: keep fraction within 5 sigma of 1 - p;
    # heads and rows get different masks (GQA heads sharing K/V included).
    q = torch.empty(2, 64, 4, 8, device=device)
    k = torch.empty(2, 96, 1, 8, device=device)
    for p in (0.1, 0.5, 0.9):
        keep = keep_mask(_call_seed(device), p, q, k)
        assert keep.shape == (2, 4, 64, 96)
        sigma = (p * (1 - p) / keep.numel()) ** 0.5
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
        assert not torch.equal(keep[:, 0], keep[:, 1]) and not torch.equal(keep[:, :, 0], keep[:, :, 1])
    assert not torch.equal(keep_mask(_call_seed(device, 1), 0.5, q, k), keep_mask(_call_seed(device, 2), 0.5, q, k))


def test_packed_and_padded_masks_agree(device):
    # Equal segments packed are a padded batch: the same (row, head, key position) mask.
    q_pad = torch.empty(3, 5, 2, 8, device=device)
    k_pad = torch.empty(3, 7, 2, 8, device=device)
    padded = keep_mask(_call_seed(device), 0.5, q_pad, k_pad)
    packed = keep_mask(_call_seed(device), 0.5, q_pad.flatten(0, 1), k_pad.flatten(0, 1), _cu([7] * 3, device))
    for b in range(3):
        assert torch.equal(packed[:, 5 * b:5 * b + 5, 7 * b:7 * b + 7], padded[b])


# ---- attention: exact-mask accuracy -------------------------------------------------------


def _check_attention(backend, inputs, p, cu_q=None, cu_k=None, causal=False, window=(-1, -1)):
    packed = cu_q is not None
    max_q = int(cu_q.diff().max()) if packed else None
    max_k = int(cu_k.diff().max()) if packed else None
    left, right = window[0], 0 if causal else window[1]
    device = inputs["q"].device

    def op(q, k, v):
        out, lse = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                        max_seqlen_k=max_k, causal=causal, window=window, return_lse=True,
                                        dropout_p=p, generator=_generator(device), backend=backend)
        return out, _finite(lse)

    def reference(q, k, v):
        out, lse = attention_reference(q, k, v, cu_q, cu_k, left, right, None, upcast=False,
                                       dropout_p=p, dropout_seed=_call_seed(device))
        return out, _finite(lse)

    assert_matches_reference(op, reference, inputs, grad_inputs=("q", "k", "v"))


@pytest.mark.parametrize("backend", ["triton", "triton_short"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_attention_packed_causal_gqa(backend, dtype, device):
    # Odd lengths, an empty segment, a query segment past one 16-row CPU tile, GQA 4/2.
    lq, lk = [7, 0, 1, 19, 5], [9, 3, 1, 23, 2]
    inputs = _qkv((sum(lq),), (sum(lk),), 4, 2, 40, dtype, device)
    _check_attention(backend, inputs, 0.3, _cu(lq, device), _cu(lk, device), causal=True)


@pytest.mark.parametrize("backend", ["triton", "triton_short", "torch"])
def test_attention_padded_window_mqa(backend, device):
    inputs = _qkv((2, 13), (2, 21), 3, 1, 32, torch.float16, device)
    _check_attention(backend, inputs, 0.5, window=(6, 2))


def test_attention_short_tiny_segments(device):
    # Segments of 0..3 keys: many per tile, key slots widened to 4 for the Philox quads.
    lq, lk = [1, 2, 3, 0, 2, 1, 3, 2, 1], [2, 1, 3, 1, 0, 2, 3, 1, 2]
    inputs = _qkv((sum(lq),), (sum(lk),), 2, 2, 32, torch.float32, device)
    _check_attention("triton_short", inputs, 0.4, _cu(lq, device), _cu(lk, device))


# ---- cross-attention: exact-mask accuracy ---------------------------------------------------


def _check_cross(inputs, p, backend="triton", **kw):
    device = inputs["q"].device

    def op(**t):
        return mmfast.ops.cross_attention(**t, dropout_p=p, generator=_generator(device), backend=backend, **kw)

    def reference(q, k, v, gate=None, residual=None):
        return cross_attention_reference(q, k, v, kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"), kw.get("mask"),
                                         None, gate, residual, upcast=False, dropout_p=p,
                                         dropout_seed=_call_seed(device))

    rows = inputs["q"].numel() // inputs["q"].shape[-1]
    assert_matches_reference(op, reference, inputs, grad_inputs=tuple(inputs), summed_over={"grad of gate": rows})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cross_attention_packed_key_split(dtype, device):
    # Few queries over 61 and 37 keys: on CPU the keys split over programs (partials
    # combined), each split regenerating its slice of the mask; a sample without keys.
    lq, lk = [5, 0, 3, 2], [61, 1, 0, 37]
    inputs = _qkv((sum(lq),), (sum(lk),), 4, 2, 32, dtype, device)
    _check_cross(inputs, 0.25, cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device))


def test_cross_attention_padded_mask_gate_residual(device):
    # LatestImageMask: a block's first key is not a multiple of 4 (images of 13 and 27
    # tokens), so the kernels' key loop starts at its rounded-down quad; gate, residual.
    mask = LatestImageMask(image_positions=torch.tensor([[0, 4], [3, -1]], device=device),
                           image_lengths=torch.tensor([[13, 27], [22, 0]], device=device))
    inputs = _qkv((2, 9), (2, 40), 2, 1, 32, torch.float16, device)
    inputs["gate"] = random_tensor((2,), torch.float16, device, scale=0.7)
    inputs["residual"] = random_tensor(inputs["q"].shape, torch.float16, device)
    _check_cross(inputs, 0.3, mask=mask)


def test_cross_attention_torch_backend_same_mask(device):
    # The reference backend applies the kernels' mask: triton and torch agree closely.
    inputs = _qkv((2, 6), (2, 30), 2, 2, 32, torch.float32, device)
    outs = [mmfast.ops.cross_attention(**inputs, dropout_p=0.5, generator=_generator(device), backend=b)
            for b in ("triton", "torch")]
    torch.testing.assert_close(outs[0], outs[1])


# ---- behaviour ---------------------------------------------------------------------------


def _attention_run(backend, inputs, p, generator, **kw):
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    out = mmfast.ops.attention(**leaves, dropout_p=p, generator=generator, backend=backend, **kw)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [t.grad for t in leaves.values()]


@pytest.mark.parametrize("backend", ["triton", "triton_short"])
def test_deterministic_and_seeded(backend, device):
    inputs = _qkv((1, 11), (1, 17), 2, 1, 32, torch.float32, device)
    first = _attention_run(backend, inputs, 0.3, _generator(device))
    again = _attention_run(backend, inputs, 0.3, _generator(device))
    other = _attention_run(backend, inputs, 0.3, _generator(device, SEED + 1))
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # bitwise: same mask, deterministic kernels
    assert all(not torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("backend", ["triton", "triton_short", "cross"])
def test_p_zero_is_no_dropout(backend, device):
    # dropout_p=0 runs the kernels without dropout: bitwise today's result, and draws nothing.
    inputs = _qkv((1, 9), (1, 14), 2, 2, 32, torch.float16, device)
    generator = _generator(device)
    state = generator.get_state()
    if backend == "cross":
        plain = mmfast.ops.cross_attention(**inputs)
        zero = mmfast.ops.cross_attention(**inputs, dropout_p=0.0, generator=generator)
    else:
        plain = mmfast.ops.attention(**inputs, backend=backend)
        zero = mmfast.ops.attention(**inputs, dropout_p=0, generator=generator, backend=backend)
    assert torch.equal(plain, zero)
    assert torch.equal(generator.get_state(), state)


def test_kernel_keep_rate_and_mean(device):
    # v = identity over 32 keys exposes the kernel's dropped probabilities row by row:
    # out[i, j] = P_ij keep_ij / (1 - p). Kept fraction ~ 1 - p; each row still sums to 1
    # in expectation (dropout preserves the mean).
    p, rows, keys, heads = 0.4, 48, 32, 4
    q = random_tensor((1, rows, heads, keys), torch.float32, device)
    k = random_tensor((1, keys, heads, keys), torch.float32, device, scale=0.1)
    v = torch.eye(keys, device=device).expand(1, heads, keys, keys).transpose(1, 2).contiguous()
    out = mmfast.ops.attention(q, k, v, dropout_p=p, generator=_generator(device), backend="triton")
    kept = out != 0
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    expected = keep_mask(_call_seed(device), p, q, k).permute(0, 2, 1, 3)
    assert torch.equal(kept, expected)
    row_sums = out.sum(-1)
    assert abs(row_sums.mean().item() - 1.0) < 5 * row_sums.std().item() / row_sums.numel() ** 0.5


def test_sdpa_passes_dropout_through(device):
    # SDPA's own generator: its mask is not mmfast's (none expected), but it does drop,
    # reproducibly under torch.manual_seed, and it refuses a generator.
    inputs = _qkv((1, 8), (1, 12), 2, 2, 32, torch.float32, device)
    plain = mmfast.ops.attention(**inputs, backend="sdpa")
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(mmfast.ops.attention(**inputs, dropout_p=0.5, backend="sdpa"))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], plain)
    with pytest.raises(mmfast.NoBackendError, match="generator= not supported"):
        mmfast.ops.attention(**inputs, dropout_p=0.5, generator=_generator(device), backend="sdpa")
    with pytest.raises(mmfast.NoBackendError, match="generator= not supported"):
        mmfast.ops.cross_attention(**inputs, dropout_p=0.5, generator=_generator(device), backend="sdpa")


def test_backends_without_dropout_say_so():
    call = Call(device=torch.device("cuda"), dtype=torch.float16, head_dim=64, layout="padded",
                facts={"return_lse": False, "window": (-1, -1), "dropout_p": 0.1, "generator": False,
                       "max_seqlen_q": 8, "max_seqlen_k": 8})
    for name in ("xformers", "flash_attn_cute"):
        assert any("dropout_p > 0 not supported" in r for r in ATTENTION.backends[name].check(call))
    assert not any("dropout" in r for r in ATTENTION.backends["flash_attn"].check(call))


def test_compile_fullgraph(device):
    # torch.compile traces the seed draw and both custom ops (forward and backward);
    # aot_eager on CPU runs the draw on torch's global generator, as eager does.
    cu = _cu([5, 0, 12], device)

    def block(q, kv):
        out = mmfast.ops.attention(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12,
                                   causal=True, dropout_p=0.2, backend="triton")
        ctx = mmfast.ops.cross_attention(out.unsqueeze(0), kv.unsqueeze(0), kv.unsqueeze(0), dropout_p=0.2)
        return torch.tanh(ctx).sum()

    q, kv = random_tensor((17, 2, 32), torch.float32, device), random_tensor((17, 2, 32), torch.float32, device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    results = []
    for fn in (block, compiled):
        torch.manual_seed(3)
        leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("p,error", [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError),
                                     (True, TypeError), (float("nan"), ValueError)], ids=str)
def test_bad_dropout_p(p, error, device):
    inputs = _qkv((1, 4), (1, 4), 1, 1, 32, torch.float32, device)
    with pytest.raises(error, match="dropout_p"):
        mmfast.ops.attention(**inputs, dropout_p=p)
    with pytest.raises(error, match="dropout_p"):
        mmfast.ops.cross_attention(**inputs, dropout_p=p)


def test_bad_generator(device):
    inputs = _qkv((1, 4), (1, 4), 1, 1, 32, torch.float32, device)
    with pytest.raises(TypeError, match="generator"):
        mmfast.ops.attention(**inputs, dropout_p=0.1, generator=5)
    # A generator on another device type than q (checked without needing that device).
    with pytest.raises(ValueError, match="generator: expected a generator on cuda"):
        check_dropout(0.1, torch.Generator(), torch.device("cuda"))


# ---- GPU only: bf16, real tile sizes, CUDA graphs ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_short"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_gpu_tiles(backend, dtype, device):
    # Segments past the GPU tiles (64..128 rows), head dim 128, GQA 8/2, causal.
    lq, lk = ([97, 128, 1, 64], [128, 113, 7, 64]) if backend == "triton_short" else ([300, 1, 517], [411, 9, 517])
    inputs = _qkv((sum(lq),), (sum(lk),), 8, 2, 128, dtype, device)
    _check_attention(backend, inputs, 0.1, _cu(lq, device), _cu(lk, device), causal=True)


@pytest.mark.gpu
def test_cross_attention_gpu_key_split(device):
    # 32 queries over 4k keys: split over keys on a GPU; bf16.
    inputs = _qkv((2, 32), (2, 4099), 8, 8, 64, torch.bfloat16, device)
    _check_cross(inputs, 0.1)


@pytest.mark.gpu
def test_cuda_graph_replays_draw_new_masks(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    inputs = _qkv((2, 64), (2, 64), 4, 4, 64, torch.float16, device)
    static = torch.empty_like(inputs["q"])
    mmfast.ops.attention(**inputs, dropout_p=0.2)  # warm up (kernels compiled) outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_(mmfast.ops.attention(**inputs, dropout_p=0.2))
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append(static.clone())
    assert not torch.equal(replays[0], replays[1])  # the seed is drawn anew in each replay
