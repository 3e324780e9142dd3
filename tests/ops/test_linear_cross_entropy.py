"""Fused linear cross-entropy: both backends against the dense float64 formula
(F.linear + F.cross_entropy + z-loss), loss and the gradients of hidden, weight and bias,
with the flash-attention rule; prime vocabularies, row counts that leave a chunk tail,
ignore_index, label smoothing, z-loss, every reduction; all-ignored and out-of-range
targets; determinism; torch.compile; argument errors. On a GPU: bf16 and the memory of a
152k vocabulary.

The chunk budget is shrunk (CHUNK_BYTES) so that test sizes run through several chunks."""

import pytest
import torch

import mmfast
from mmfast.ops.linear_cross_entropy import CHUNK_BYTES, chunk_rows, linear_cross_entropy_reference
from mmfast.testing import assert_matches_reference, random_tensor

BACKENDS = ["triton", "torch"]
IGNORE = -100


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # 16 rows of a 53-word fp32 vocabulary per chunk; fewer rows for larger vocabularies.
    monkeypatch.setitem(CHUNK_BYTES, "cpu", 16 * 53 * 4)
    monkeypatch.setitem(CHUNK_BYTES, "cuda", 16 * 53 * 4)


def _inputs(n, c, v, dtype, device, *, bias=True, ignored=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.randperm(n, generator=gen)[:ignored]] = IGNORE
    tensors = {"hidden": random_tensor((n, c), dtype, device, generator=gen),
               "weight": random_tensor((v, c), dtype, device, scale=0.5, generator=gen)}
    if bias:
        tensors["bias"] = random_tensor((v,), dtype, device, generator=gen)
    return tensors, target.to(device)


def _op(backend, target, **kwargs):
    def run(hidden, weight, bias=None):
        return mmfast.ops.linear_cross_entropy(hidden, weight, target, bias=bias, backend=backend, **kwargs)
    return run


def _reference(target, **kwargs):
    def run(hidden, weight, bias=None):
        return linear_cross_entropy_reference(hidden, weight, target, bias, **kwargs)
    return run


def _check(n, c, v, dtype, backend, device, *, bias=True, ignored=3, **kwargs):
    tensors, target = _inputs(n, c, v, dtype, device, bias=bias, ignored=ignored)
    grads = ("hidden", "weight", "bias") if bias else ("hidden", "weight")
    # d weight and d bias sum over rows, here chunk by chunk: another order than eager's.
    assert_matches_reference(_op(backend, target, **kwargs), _reference(target, **kwargs), tensors,
                             grad_inputs=grads, summed_over={"grad of weight": n, "grad of bias": n})


# (N, C, V, dtype, bias, options): V prime (53, 131, 251), N not a multiple of the chunk,
# each option and reduction at least once per dtype family.
CASES = [
    (37, 24, 53, torch.float32, True, {}),
    (37, 24, 53, torch.float16, False, {"reduction": "sum", "label_smoothing": 0.1}),
    (45, 40, 131, torch.float16, True, {"reduction": "none", "z_loss": 1e-3}),
    (23, 16, 251, torch.float32, True, {"label_smoothing": 0.2, "z_loss": 1e-2}),
    (30, 24, 53, torch.bfloat16, True, {"reduction": "none", "label_smoothing": 0.05}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,v,dtype,bias,options", CASES, ids=str)
def test_matches_reference(n, c, v, dtype, bias, options, backend, device):
    _check(n, c, v, dtype, backend, device, bias=bias, **options)


def test_float64_on_the_torch_backend(device):
    tensors, target = _inputs(20, 8, 53, torch.float64, device)
    got = mmfast.ops.linear_cross_entropy(**tensors, target=target, z_loss=1e-2, label_smoothing=0.1)
    want = linear_cross_entropy_reference(**tensors, target=target, z_loss=1e-2, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_chunking_and_determinism(device, monkeypatch):
    # One chunk, 16-row chunks and 1-row chunks agree; a repeated run is bit for bit the same.
    tensors, target = _inputs(40, 16, 53, torch.float32, device)
    results = []
    for rows in (64, 16, 1, 16):
        monkeypatch.setitem(CHUNK_BYTES, device.type, rows * 53 * 4)
        assert chunk_rows(40, 53, 4, device) == min(rows, 40) or device.type == "cuda"
        leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
        loss = mmfast.ops.linear_cross_entropy(leaves["hidden"], leaves["weight"], target, bias=leaves["bias"],
                                               backend="triton")
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves.values()])
    for got in results[1:3]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[3], results[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_and_custom_ignore_index(backend, device):
    # ignore_index inside the vocabulary (a pad id): those rows give 0 loss and 0 gradient.
    tensors, target = _inputs(12, 8, 53, torch.float32, device, ignored=0)
    target = torch.where(target == 7, 8, target)
    target[::3] = 7
    hidden = tensors["hidden"].requires_grad_()
    per_row = mmfast.ops.linear_cross_entropy(hidden, tensors["weight"], target, reduction="none",
                                              ignore_index=7, backend=backend)
    per_row.sum().backward()
    assert (per_row[::3] == 0).all() and (per_row[1::3] > 0).all()
    assert (hidden.grad[::3] == 0).all() and (hidden.grad[1::3] != 0).any()
    mean = mmfast.ops.linear_cross_entropy(hidden, tensors["weight"], target, ignore_index=7, backend=backend)
    torch.testing.assert_close(mean, per_row.sum() / 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_mean_is_zero_not_nan(backend, device):
    # F.cross_entropy gives NaN here (0 / 0); mmfast gives 0 and zero gradients.
    tensors, _ = _inputs(6, 8, 53, torch.float32, device)
    leaves = {k: t.requires_grad_() for k, t in tensors.items()}
    target = torch.full((6,), IGNORE, device=device)
    loss = mmfast.ops.linear_cross_entropy(leaves["hidden"], leaves["weight"], target, bias=leaves["bias"],
                                           backend=backend)
    loss.backward()
    assert loss.item() == 0
    assert all((t.grad == 0).all() for t in leaves.values())
    assert torch.isnan(torch.nn.functional.cross_entropy(torch.randn(6, 53), target.cpu()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_gives_nan(backend, device):
    tensors, target = _inputs(6, 8, 53, torch.float32, device, ignored=0)
    target[2] = 53
    hidden = tensors["hidden"].requires_grad_()
    per_row = mmfast.ops.linear_cross_entropy(hidden, tensors["weight"], target, reduction="none", backend=backend)
    per_row.sum().backward()
    assert per_row[2].isnan() and not per_row[[0, 1, 3, 4, 5]].isnan().any()
    assert hidden.grad[2].isnan().all() and not hidden.grad[[0, 1, 3, 4, 5]].isnan().any()


def test_partial_gradients_and_inference(device):
    # A frozen LM head (only hidden needs grad), and no grad at all: same loss, same d hidden.
    tensors, target = _inputs(20, 16, 53, torch.float32, device)
    hidden = tensors["hidden"].clone().requires_grad_()
    loss = mmfast.ops.linear_cross_entropy(hidden, tensors["weight"], target, bias=tensors["bias"], backend="triton")
    loss.backward()
    full = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    want = linear_cross_entropy_reference(full["hidden"], full["weight"], target, full["bias"])
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(hidden.grad, full["hidden"].grad)
    with torch.no_grad():
        torch.testing.assert_close(mmfast.ops.linear_cross_entropy(**tensors, target=target, backend="triton"), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, device):
    # hidden as a transposed view, the weight a column slice, target every other element.
    tensors, target = _inputs(14, 16, 53, torch.float32, device)
    hidden = tensors["hidden"].t().contiguous().t()
    weight = torch.cat([tensors["weight"], tensors["weight"]], dim=1)[:, :16]
    strided = torch.stack([target, torch.zeros_like(target)], dim=1).reshape(-1)[::2]
    got = mmfast.ops.linear_cross_entropy(hidden, weight, strided, reduction="none", backend=backend)
    want = linear_cross_entropy_reference(tensors["hidden"], tensors["weight"], target, reduction="none")
    assert not strided.is_contiguous() and not hidden.is_contiguous()
    torch.testing.assert_close(got, want)


def test_second_backward_is_refused(device):
    # The saved gradients are scaled in place by the first backward.
    tensors, target = _inputs(5, 8, 53, torch.float32, device)
    hidden = tensors["hidden"].requires_grad_()
    loss = mmfast.ops.linear_cross_entropy(hidden, tensors["weight"], target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_empty_batch(device):
    tensors, _ = _inputs(0, 8, 53, torch.float32, device, ignored=0)
    target = torch.zeros(0, dtype=torch.long, device=device)
    assert mmfast.ops.linear_cross_entropy(**tensors, target=target, backend="triton").item() == 0
    assert mmfast.ops.linear_cross_entropy(**tensors, target=target, reduction="none").shape == (0,)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction, device):
    tensors, target = _inputs(20, 16, 53, torch.float32, device)

    def step(hidden, weight, bias):
        loss = mmfast.ops.linear_cross_entropy(torch.tanh(hidden), weight, target, bias=bias, reduction=reduction,
                                               z_loss=1e-3, backend="triton")
        return loss.sum() * 2

    # aot_eager traces forward and backward through the fake impl without compiling C++.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    results = []
    for fn in (step, compiled):
        leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
        loss = fn(**leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves.values()])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


# ---- bad input ---------------------------------------------------------------------------------


def _bad_calls(device):
    h, w = torch.randn(4, 8, device=device), torch.randn(11, 8, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    lce = mmfast.ops.linear_cross_entropy
    return [
        (lambda: lce(h.tolist(), w, t), TypeError, "hidden: expected a Tensor"),
        (lambda: lce(h[0], w, t), ValueError, r"hidden: expected a 2-D tensor \[N, C\]"),
        (lambda: lce(h.long(), w.long(), t), TypeError, "hidden: expected a floating dtype"),
        (lambda: lce(h, w.half(), t), TypeError, "weight: expected dtype torch.float32"),
        (lambda: lce(h, w[:, :5], t), ValueError, r"weight: expected shape \[V >= 1, 8\]"),
        (lambda: lce(h, w[:0], t), ValueError, r"weight: expected shape \[V >= 1, 8\]"),
        (lambda: lce(h, w.to("meta"), t), ValueError, "weight: expected device"),
        (lambda: lce(h, w, t.float()), TypeError, "target: expected an integer dtype"),
        (lambda: lce(h, w, t[:3]), ValueError, r"target: expected shape \(4,\)"),
        (lambda: lce(h, w, t[None]), ValueError, "target: expected a 1-D tensor"),
        (lambda: lce(h, w, t, bias=torch.zeros(10, device=device)), ValueError, r"bias: expected shape \(11,\)"),
        (lambda: lce(h, w, t, bias=torch.zeros(11, device=device).half()), TypeError, "bias: expected dtype"),
        (lambda: lce(h, w, t, ignore_index=-100.0), TypeError, "ignore_index: expected an int"),
        (lambda: lce(h, w, t, reduction="avg"), ValueError, "reduction: expected one of mean, sum, none"),
        (lambda: lce(h, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: lce(h, w, t, z_loss=-1e-4), ValueError, "z_loss"),
        (lambda: lce(h, w, t, backend="cuda"), ValueError, "has no backend 'cuda'"),
        (lambda: lce(h.double(), w.double(), t, backend="triton"), mmfast.dispatch.NoBackendError, "float64"),
    ]


def test_bad_input_names_the_argument(device):
    for call, error, message in _bad_calls(device):
        with pytest.raises(error, match=message):
            call()


# ---- GPU: bf16, memory -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_on_gpu(backend, device, monkeypatch):
    monkeypatch.setitem(CHUNK_BYTES, "cuda", 256 * 32003 * 2)  # 1000 rows: four chunks
    _check(1000, 256, 32003, torch.bfloat16, backend, device, ignored=100, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.gpu
def test_memory_of_a_152k_vocabulary(device, monkeypatch):
    # Qwen2.5-VL-3B's head at 8192 tokens: dense fp32 logits alone would take 4.6 GiB.
    # Allowed: the gradients (hidden's and weight's), one chunk's logits and 64 MiB.
    monkeypatch.setitem(CHUNK_BYTES, "cuda", 256 << 20)
    n, c, v = 8192, 2048, 151936
    hidden = torch.randn(n, c, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, c, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = mmfast.ops.linear_cross_entropy(hidden, weight, target, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    allowed = 2 * (hidden.numel() + weight.numel()) + (256 << 20) + (64 << 20)
    assert extra < allowed, f"{extra / 2**20:.0f} MiB extra, allowed {allowed / 2**20:.0f} MiB"
    assert extra < n * v * 4 / 4
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all()
