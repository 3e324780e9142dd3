"""Cross-attention: every backend against the float64 reference (outputs and the gradients
of q, k, v, gate and residual) under the flash-attention rule; fuzzed key counts (images
of 1 token, samples without image); each mask type against its materialize(), and
materialize() against a loop over its definition; rows that see no key; the key-split
path; argument errors. Shapes stay tiny: on CPU the Triton kernels run interpreted."""

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mmfast
from mmfast.kernels.cross_attention import _blocks, num_splits
from mmfast.ops.cross_attention import cross_attention_reference
from mmfast.ops.cross_attention_masks import (ImagesUpToPositionMask, KeyPaddingMask, KeyStartMask,
                                              LatestImageMask)
from mmfast.testing import assert_matches_reference, random_tensor

BACKENDS = ["triton", "sdpa", "torch"]


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _fuzzed_images(gen, batch, max_images, device):
    """Random image layout: per sample 0..max_images images of 1..15 tokens (1-token
    images included), placeholders at sorted text positions; unused slots last."""
    positions = torch.full((batch, max_images), -1, dtype=torch.int64)
    lengths = torch.zeros((batch, max_images), dtype=torch.int64)
    for b in range(batch):
        used = int(torch.randint(0, max_images + 1, (), generator=gen))
        positions[b, :used] = torch.randint(0, 12, (used,), generator=gen).sort().values
        lengths[b, :used] = torch.randint(1, 16, (used,), generator=gen)
        lengths[b, 0] = 1 if used and b == 0 else lengths[b, 0]  # always one 1-token image
    return positions.to(device), lengths.to(device)


def _inputs(q_shape, k_shape, dtype, device, gate_heads=None, residual=True):
    inputs = {
        "q": random_tensor(q_shape, dtype, device),
        "k": random_tensor(k_shape, dtype, device),
        "v": random_tensor(k_shape, dtype, device),
    }
    if gate_heads is not None:
        inputs["gate"] = random_tensor((gate_heads,), dtype, device, scale=0.7)
    if residual:
        inputs["residual"] = random_tensor(q_shape, dtype, device)
    return inputs


def _check(backend, inputs, factor=2.0, summed_over=(), **kw):
    def op(**t):
        return mmfast.ops.cross_attention(**t, backend=backend, **kw)

    def reference(q, k, v, gate=None, residual=None):
        return cross_attention_reference(q, k, v, kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"),
                                         kw.get("mask"), kw.get("scale"), gate, residual, upcast=False)

    rows = inputs["q"].numel() // inputs["q"].shape[-2]
    assert_matches_reference(op, reference, inputs, grad_inputs=tuple(inputs), factor=factor,
                             summed_over={"grad of gate": rows, **dict(summed_over)})


def _skip_interpreted_bf16(dtype, backend, device):
    if dtype == torch.bfloat16 and backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter does not support bfloat16 tl.dot; checked on CUDA")


# ---- accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_few_queries_many_keys(backend, device):
    # Queries 5, 0, 3, 2 over keys 61, 1, 0 (a sample with no image: out = residual), 37.
    # On CPU the 61 keys are split over programs and combined (see test_key_split_is_used).
    lq, lk = [5, 0, 3, 2], [61, 1, 0, 37]
    inputs = _inputs((sum(lq), 2, 64), (sum(lk), 1, 64), torch.float16, device, gate_heads=1)
    _check(backend, inputs, cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device))


def test_key_split_is_used(device):
    # test_packed_few_queries_many_keys: 5 queries x 2 heads of one K/V head fit one row
    # block, so 4 samples x 1 K/V head give 4 programs before splitting. On a GPU the split
    # path runs in test_gpu_few_queries_16k_keys.
    block_m, block_n, _, _ = _blocks(device, 64, 5 * 2, backward=False)
    assert num_splits(device, 1 * 4 * 1, 61, block_n) > 1 or device.type == "cuda"


@pytest.mark.parametrize("mask_type", [ImagesUpToPositionMask, LatestImageMask], ids=["mllama", "flamingo"])
@pytest.mark.parametrize("layout,seed", [("packed", 0), ("padded", 1)])
def test_image_masks_fuzzed(mask_type, layout, seed, device):
    gen = torch.Generator().manual_seed(seed)
    batch = 3
    positions, lengths = _fuzzed_images(gen, batch, 3, device)
    kw = {}
    if layout == "packed":
        lq = torch.randint(1, 14, (batch,), generator=gen).tolist()
        lk = lengths.sum(-1).tolist()
        q_shape, k_shape = (sum(lq), 4, 32), (sum(lk), 2, 32)
        kw = dict(cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device))
        mask = mask_type(positions, lengths)
    else:
        # Padded: every image gets a slot of 16 keys; the slot's tail (padding) is unseen.
        slot = 16
        offsets = torch.arange(3, device=device)[None, :].expand(batch, 3) * slot
        q_shape, k_shape = (batch, 9, 4, 32), (batch, 3 * slot, 2, 32)
        mask = mask_type(positions, lengths, offsets)
    inputs = _inputs(q_shape, k_shape, torch.float16, device, gate_heads=4)
    _check("triton", inputs, mask=mask, **kw)


@pytest.mark.parametrize("see_all", [False, True], ids=["empty-rows-zero", "empty-rows-see-all"])
def test_key_start_mask(see_all, device):
    # Starts in no order (the key bounds must still cover every visible key), keys nobody
    # sees (-1), and rows before every start (empty).
    gen = torch.Generator().manual_seed(5)
    start = torch.randint(-1, 9, (2, 37), generator=gen)
    start[1] = torch.where(start[1] < 3, -1, start[1])
    mask = KeyStartMask(start.to(device), empty_rows_see_all_keys=see_all)
    inputs = _inputs((2, 9, 2, 32), (2, 37, 1, 32), torch.float16, device, gate_heads=1)
    _check("triton", inputs, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_padding_padded(backend, dtype, device):
    _skip_interpreted_bf16(dtype, backend, device)
    mask = KeyPaddingMask(torch.tensor([37, 0, 1], device=device))
    inputs = _inputs((3, 6, 2, 64), (3, 37, 2, 64), dtype, device, gate_heads=None)
    # The 1-key sample: its dq is scale * (dp - delta) * k with dp = dO.v and delta =
    # rowsum(dO * o), o = v, equal in exact arithmetic but summed in different orders (a dot
    # vs a row sum: flash-attention's backward), where eager's softmax backward cancels
    # exactly. dq and dk (through ds) carry a sum of D terms in another order.
    summed = {"grad of q": 64, "grad of k": 64} if dtype == torch.float32 else {}
    # PyTorch's CPU flash SDPA kernel misses the rule for float32 gradients (see
    # tests/ops/test_attention.py); its math kernel meets it.
    cpu_sdpa = backend == "sdpa" and device.type == "cpu"
    with sdpa_kernel(SDPBackend.MATH) if cpu_sdpa else contextlib.nullcontext():
        _check(backend, inputs, mask=mask, scale=0.2, summed_over=summed)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_head_dims(head_dim, device):
    lq, lk = [3, 17], [30, 2]
    inputs = _inputs((sum(lq), 2, head_dim), (sum(lk), 1, head_dim), torch.float16, device,
                     gate_heads=2, residual=head_dim % 64 == 0)
    _check("triton", inputs, cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device))


_FP32_DQ_AT_16 = pytest.mark.xfail(
    strict=False,
    reason="known, not from the head-dim tiling (the kernels before it fail it too): "
           "in float32 at head dim 16, dq with key splits is in some draws 3-4x eager's error")


@pytest.mark.parametrize("head_dim,dtype", [
    *((d, t) for d in (8, 16, 24, 40, 72, 160) for t in (torch.float16, torch.float32)
      if (d, t) not in ((16, torch.float32), (160, torch.float32))),
    pytest.param(16, torch.float32, marks=_FP32_DQ_AT_16),
    # 1.2x over the bound on an AMD EPYC machine: see FP32_INTERPRETER_GRADIENTS in test_attention.py
    pytest.param(160, torch.float32, marks=pytest.mark.xfail(
        strict=False, reason="float32 gradient bound vs CPU eager differs by CPU BLAS")),
], ids=str)
def test_split_and_small_head_dims(head_dim, dtype, device):
    # Head-dim pieces (kernels/_head_dim.py): 8 -> 16, 24 -> 32, 40 = 32 + 16, 72 = 64 + 16
    # with 8 masked, 160 = 128 + 32 (SD1.5's deepest level); the gate, the residual, GQA.
    lq, lk = [3, 17], [30, 2]
    inputs = _inputs((sum(lq), 2, head_dim), (sum(lk), 1, head_dim), dtype, device, gate_heads=2)
    _check("triton", inputs, cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device))


def test_attention_only(device):
    # No gate and no residual: out is the attention itself (no epilogue pass). MQA with 4
    # query heads: 5 queries x 4 heads = 20 rows of one K/V head, across two row blocks.
    inputs = _inputs((2, 5, 4, 64), (2, 45, 1, 64), torch.float16, device, residual=False)
    _check("triton", inputs)


# ---- rows that see no key ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_give_residual(backend, device):
    # Sample 0 has no image; in sample 1 the first text tokens precede the image.
    positions = torch.tensor([[-1], [4]], device=device)
    lengths = torch.tensor([[0], [9]], device=device)
    q = random_tensor((2, 7, 2, 64), torch.float16, device, requires_grad=True)
    kv = random_tensor((2, 9, 2, 64), torch.float16, device, requires_grad=True)
    residual = random_tensor((2, 7, 2, 64), torch.float16, device)
    gate = torch.tensor([0.5], device=device, requires_grad=True)
    out = mmfast.ops.cross_attention(q, kv, kv, mask=ImagesUpToPositionMask(positions, lengths),
                                     gate=gate, residual=residual, backend=backend)
    assert torch.equal(out[0], residual[0]) and torch.equal(out[1, :4], residual[1, :4])
    assert not torch.equal(out[1, 4:], residual[1, 4:])
    out.float().square().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kv.grad).all() and torch.isfinite(gate.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))


# ---- masks -------------------------------------------------------------------------


def _by_definition(mask_type, positions, lengths, offsets, tq, tk):
    """[B, Tq, Tk] from the definition, one element at a time."""
    batch, images = positions.shape
    dense = torch.zeros(batch, tq, tk, dtype=torch.bool)
    for b in range(batch):
        for t in range(tq):
            followed = [n for n in range(images) if 0 <= positions[b, n] <= t]
            seen = followed if mask_type is ImagesUpToPositionMask else followed[-1:]
            for n in seen:
                dense[b, t, offsets[b, n]:offsets[b, n] + lengths[b, n]] = True
    return dense


@pytest.mark.parametrize("mask_type", [ImagesUpToPositionMask, LatestImageMask])
def test_materialize_follows_the_definition(mask_type):
    gen = torch.Generator().manual_seed(3)
    positions, lengths = _fuzzed_images(gen, 4, 3, "cpu")
    offsets = lengths.cumsum(-1) - lengths + torch.arange(3) * 2  # gaps of unseen keys
    tq, tk = 13, int((offsets + lengths).max()) + 1
    q, k = torch.zeros(4, tq, 1, 16), torch.zeros(4, tk, 1, 16)
    mask = mask_type(positions, lengths, offsets)
    assert torch.equal(mask.materialize(q, k), _by_definition(mask_type, positions, lengths, offsets, tq, tk))
    # Packed: the same samples, block-diagonal.
    cu_q, cu_k = _cu([tq] * 4, "cpu"), _cu([tk] * 4, "cpu")
    packed = mask.materialize(q.flatten(0, 1), k.flatten(0, 1), cu_q, cu_k)
    assert torch.equal(packed, torch.block_diag(*mask.materialize(q, k)))


def test_key_padding_materialize():
    mask = KeyPaddingMask(torch.tensor([2, 0]))
    dense = mask.materialize(torch.zeros(2, 3, 1, 16), torch.zeros(2, 4, 1, 16))
    assert dense[0].sum() == 6 and dense[0, :, :2].all() and not dense[1].any()


def test_no_image_slots(device):
    mask = LatestImageMask(torch.zeros(2, 0, dtype=torch.int64, device=device),
                           torch.zeros(2, 0, dtype=torch.int64, device=device))
    q, kv = (random_tensor((2, s, 2, 32), torch.float16, device) for s in (3, 5))
    out = mmfast.ops.cross_attention(q, kv, kv, mask=mask, residual=q, backend="triton")
    assert torch.equal(out, q)


# ---- bad input ---------------------------------------------------------------------


def test_bad_input_names_the_argument():
    q, k = torch.randn(2, 3, 2, 32), torch.randn(2, 5, 2, 32)
    ca = mmfast.ops.cross_attention
    with pytest.raises(ValueError, match="k: expected batch size 2"):
        ca(q, k[:1], k[:1])
    with pytest.raises(TypeError, match="k: expected dtype"):
        ca(q, k.half(), k.half())
    with pytest.raises(ValueError, match="v: expected shape"):
        ca(q, k, k[:, :4])
    with pytest.raises(ValueError, match="gate: expected 1 or 2"):
        ca(q, k, k, gate=torch.zeros(3))
    with pytest.raises(TypeError, match="gate: expected a floating"):
        ca(q, k, k, gate=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="residual: expected shape"):
        ca(q, k, k, residual=q[:, :2])
    with pytest.raises(TypeError, match="mask: expected None or a mask type"):
        ca(q, k, k, mask=torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: image_positions has 3 rows, expected the batch size 2"):
        ca(q, k, k, mask=LatestImageMask(torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match="mask: image_lengths has shape"):
        ca(q, k, k, mask=LatestImageMask(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 2, dtype=torch.int64)))
    with pytest.raises(TypeError, match="mask: key_lengths must have an integer dtype"):
        ca(q, k, k, mask=KeyPaddingMask(torch.ones(2)))
    qp, kp = q.flatten(0, 1), k.flatten(0, 1)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 3 entries"):
        ca(qp, kp, kp, cu_seqlens_q=_cu([3, 3], "cpu"), cu_seqlens_k=_cu([10], "cpu"))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected the last entry to equal the token count 10"):
        ca(qp, kp, kp, cu_seqlens_q=_cu([3, 3], "cpu"), cu_seqlens_k=_cu([4, 5], "cpu"))
    with pytest.raises(ValueError, match="cu_seqlens_q, cu_seqlens_k: expected both"):
        ca(qp, kp, kp, cu_seqlens_q=_cu([3, 3], "cpu"))


@pytest.mark.parametrize("mask,message", [
    (KeyPaddingMask(torch.tensor([5, 6])), "key_lengths exceed the keys of their samples"),
    (LatestImageMask(torch.tensor([[0, 2], [1, -1]]), torch.tensor([[3, 3], [6, 0]])),
     "images reach past the keys of their samples"),
    (LatestImageMask(torch.tensor([[-1, 2], [1, -1]]), torch.tensor([[2, 2], [2, 0]])),
     "image_positions: unused slots .negative. must come last"),
    (ImagesUpToPositionMask(torch.tensor([[2, 1], [1, -1]]), torch.tensor([[2, 2], [2, 0]])),
     "image_positions must not decrease"),
    (ImagesUpToPositionMask(torch.tensor([[0, 1], [1, -1]]), torch.tensor([[3, 2], [2, 0]]),
                            torch.tensor([[0, 2], [0, 3]])), "each image must start at or after the end"),
], ids=["padding", "past-keys", "unused-first", "unsorted", "overlap"])
def test_debug_checks_catch_masks_inconsistent_with_the_lengths(mask, message, monkeypatch):
    q, k = torch.randn(2, 3, 2, 32), torch.randn(2, 5, 2, 32)
    mmfast.ops.cross_attention(q, k, k, mask=mask, backend="torch")  # not checked: the caller's promise
    monkeypatch.setenv("MMFAST_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=f"mask: {message}"):
        mmfast.ops.cross_attention(q, k, k, mask=mask, backend="torch")


def test_debug_checks_catch_a_short_max_seqlen(monkeypatch):
    q, k = torch.randn(6, 2, 32), torch.randn(9, 2, 32)
    cu_q, cu_k = _cu([2, 4], "cpu"), _cu([4, 5], "cpu")
    monkeypatch.setenv("MMFAST_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="max_seqlen_k: 4 is less than the longest segment 5 of cu_seqlens_k"):
        mmfast.ops.cross_attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=4)


# ---- GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_few_queries_16k_keys(dtype, device):
    lq, lk = [64, 32], [16384, 3001]
    inputs = _inputs((sum(lq), 8, 128), (sum(lk), 8, 128), dtype, device, gate_heads=8)
    _check("triton", inputs, cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device))


@pytest.mark.gpu
def test_gpu_mllama_mask_bf16(device):
    positions = torch.tensor([[0, 100, 700, 1500], [5, -1, -1, -1]], device=device)
    lengths = torch.full((2, 4), 1601, device=device)
    inputs = _inputs((2, 2048, 8, 128), (2, 4 * 1601, 8, 128), torch.bfloat16, device, gate_heads=1)
    _check("triton", inputs, mask=ImagesUpToPositionMask(positions, lengths))


def test_compile_fullgraph(device):
    positions = torch.tensor([[0, 3], [2, -1]], device=device)
    lengths = torch.tensor([[5, 4], [6, 0]], device=device)

    cu_q, cu_k = _cu([6, 6], device), _cu([9, 9], device)

    def block(q, kv, gate):
        # k is v and residual is q: tensors given twice, as self-attention and gated blocks do.
        mask = ImagesUpToPositionMask(positions, lengths)
        out = mmfast.ops.cross_attention(q, kv, kv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6,
                                         max_seqlen_k=9, mask=mask, gate=gate, residual=q, backend="triton")
        return torch.tanh(out).sum()

    q = random_tensor((12, 2, 32), torch.float32, device)
    kv = random_tensor((18, 1, 32), torch.float32, device)
    gate = torch.tensor([0.3], device=device)
    # On CPU, aot_eager traces what inductor would (dynamo without graph breaks, the fake
    # impls, AOT autograd) without building C++ for every op (over a minute here).
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    results = []
    for fn in (block, compiled):
        leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_(), gate.clone().requires_grad_()]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)
