"""The ``cuda_short`` backend of attention (csrc/attention_short.cu, forward only).

On a GPU (``gpu`` marks): outputs and lse against the float64 reference with the
flash-attention rule (tests/ops/test_attention.py's helpers), NaN-poisoned outputs, odd
segment lengths with 0 and 1, head dims 64/72/80/128 (and the other padded widths), GQA,
causal and windows with lq != lk, the 128-token limit, tiny segments sharing a block,
the padded layout, strided and misaligned inputs, torch.compile, no device sync, and the
errors of bad input. Skipped with the reason when the CUDA path cannot be built there.

Anywhere: what dispatch makes of the backend (refused on CPU, with grads, for long
segments, odd head dims and float32; never chosen without a tuning row, chosen with one),
that the public op reports whether its inputs require grad, that the Python mirrors of
the kernel's limits match csrc/attention_short.h, and the benchmark provider's skips.
"""

import json
import re

import pytest
import torch

import mmfast
from mmfast import dispatch, tuning
from mmfast.cuda import build
from mmfast.dispatch import Call
from mmfast.ops.attention import ATTENTION, SHORT_MAX_HEAD_DIM, SHORT_MAX_SEQLEN
from mmfast.testing import assert_matches_reference, random_tensor
from tests.ops.test_attention import LENGTHS_K, LENGTHS_Q, _case, _cu, _inputs

CUDA = torch.device("cuda")
CUDA0 = torch.device("cuda", 0)
FAKE_GPU = "Fake GPU 9000"
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_path():
    if torch.cuda.is_available() and not build.load(CUDA):
        pytest.skip(f"CUDA C++ path unavailable: {build.unavailable_reason(CUDA)}")


def _check(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, **kw):
    """Forward (out and lse) of cuda_short on packed segments against the reference."""
    cu_q, cu_k = _cu(lengths_q, CUDA), _cu(lengths_k, CUDA)
    inputs = _inputs(sum(lengths_q), sum(lengths_k), heads, kv_heads, head_dim, dtype, CUDA)
    op, reference = _case("cuda_short", cu_q=cu_q, cu_k=cu_k, **kw)
    assert_matches_reference(op, reference, inputs)


# ---- on a GPU: accuracy -----------------------------------------------------------------


@gpu
@pytest.mark.parametrize("head_dim", [64, 72, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(dtype, head_dim, cuda_path):
    # Empty and length-1 segments, primes, lq != lk, GQA, causal (bottom-right aligned).
    _check(LENGTHS_Q, LENGTHS_K, 4, 2, head_dim, dtype, causal=True)


@gpu
@pytest.mark.parametrize("head_dim", [8, 32, 40, 96, 112])
def test_other_head_dims(head_dim, cuda_path):
    # Each padded width the kernel is built for (32, 64, 80, 96, 128), from below.
    _check([9, 17, 1], [12, 5, 30], 2, 1, head_dim, torch.float16)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_qwen_windows(dtype, cuda_path):
    # Qwen2.5-VL's window layer on an 812 px image: 64-token windows and 16-, 4-token edges.
    from mmfast.bench.suites.qwen_window_attention import segment_lengths

    lengths = segment_lengths("window", 1, 812)
    _check(lengths, lengths, 4, 4, 80, dtype)


@gpu
@pytest.mark.parametrize("window,causal", [
    ((4, -1), False), ((-1, 3), False), ((2, 0), False), ((0, 0), False), ((3, 5), False), ((5, 7), True),
], ids=str)
def test_windows(window, causal, cuda_path):
    _check([1, 21, 6, 20], [4, 18, 6, 37], 2, 1, 64, torch.float16, window=window, causal=causal)


@gpu
@pytest.mark.parametrize("lengths_q,lengths_k", [([3, 20, 1], [17, 31, 0]), ([20, 5], [6, 0])],
                         ids=["fewer-queries", "more-queries"])
def test_causal_bottom_right(lengths_q, lengths_k, cuda_path):
    # With more queries than keys, the first queries of a segment see no key at all.
    _check(lengths_q, lengths_k, 2, 1, 80, torch.bfloat16, causal=True)


@gpu
@pytest.mark.parametrize("head_dim", [80, 128])
def test_longest_segments(head_dim, cuda_path):
    # 128 tokens: 8 warps a segment, 128 keys of score registers, and at head dim 128 the
    # largest shared memory a block takes (above the 48 KB default).
    _check([SHORT_MAX_SEQLEN, 5, 77], [SHORT_MAX_SEQLEN - 1, SHORT_MAX_SEQLEN, 0], 2, 1, head_dim,
           torch.bfloat16, window=(20, 3))


@gpu
def test_many_tiny_segments(cuda_path):
    # 41 segments of 0..16 tokens: four per block and a tail group; MQA; few keys against
    # up to 64 (short queries beside long key segments shrink the segments per block).
    gen = torch.Generator().manual_seed(7)
    lengths_q = torch.randint(0, 17, (41,), generator=gen).tolist()
    lengths_k = torch.randint(0, 17, (41,), generator=gen).tolist()
    lengths_q[:3], lengths_k[:3] = [0, 1, 1], [1, 0, 1]
    _check(lengths_q, lengths_k, 6, 1, 72, torch.float16, causal=True)
    _check(lengths_q, [4 * n for n in lengths_k], 6, 1, 128, torch.float16)


@gpu
def test_negative_scale(cuda_path):
    # The scores are scaled before the row maximum is taken: a negative scale flips it.
    _check([13, 7], [9, 22], 2, 2, 64, torch.float16, scale=-0.4)


@gpu
def test_padded_layout(cuda_path):
    inputs = _inputs(19, 29, 4, 2, 80, torch.bfloat16, CUDA, batch=3)
    op, reference = _case("cuda_short", window=(6, 2))
    assert_matches_reference(op, reference, inputs)


@gpu
def test_strided_and_misaligned_inputs(cuda_path):
    cu = _cu([7, 12], CUDA)
    op, reference = _case("cuda_short", cu_q=cu, cu_k=cu, causal=True)
    # q, k, v sliced out of one fused qkv projection: read in place (strides 3 H D, D).
    q, k, v = random_tensor((19, 3, 2, 64), torch.float16, CUDA).unbind(1)
    assert_matches_reference(op, reference, {"q": q, "k": k, "v": v})
    # Rows starting 4 elements (8 bytes) into a wider tensor: copied to aligned rows first.
    wide = random_tensor((19, 2, 68), torch.bfloat16, CUDA)
    q = wide[..., 4:]
    assert q.data_ptr() % 16 != 0
    assert_matches_reference(op, reference, {"q": q, "k": wide[..., :64], "v": wide[..., 4:]})


@gpu
def test_queries_that_see_nothing(cuda_path):
    # Segment 1 has queries but no keys; causal over 6 queries and 2 keys leaves queries
    # 0..3 of segment 0 blind. Their out is exactly 0 and their lse exactly -inf.
    cu_q, cu_k = _cu([6, 3], CUDA), _cu([2, 0], CUDA)
    q, k, v = _inputs(9, 2, 2, 2, 32, torch.float16, CUDA).values()
    out, lse = mmfast.ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6,
                                    max_seqlen_k=2, causal=True, return_lse=True, backend="cuda_short")
    blind = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool, device=CUDA)
    assert (out[blind] == 0).all() and out[~blind].isfinite().all()
    assert torch.equal(lse.isinf(), blind.expand(2, 9)) and (lse[lse.isinf()] < 0).all()


@gpu
def test_no_keys_at_all(cuda_path):
    q, k, v = _inputs(5, 0, 2, 1, 64, torch.float16, CUDA, batch=2).values()
    out = mmfast.ops.attention(q, k, v, backend="cuda_short")
    assert out.shape == q.shape and (out == 0).all()


# ---- on a GPU: integration and bad input --------------------------------------------------


@gpu
def test_compile_fullgraph(cuda_path):
    cu = _cu([5, 0, 12], CUDA)

    def block(q, kv):
        out, lse = mmfast.ops.attention(q, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12,
                                        max_seqlen_k=12, causal=True, return_lse=True, backend="cuda_short")
        return torch.tanh(out.float()) * 2, lse

    q, kv, _ = _inputs(17, 17, 2, 1, 64, torch.bfloat16, CUDA).values()
    with torch.no_grad():
        eager = block(q, kv)
        traced = torch.compile(block, fullgraph=True)(q, kv)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(b, a)


@gpu
def test_no_device_sync_with_max_seqlen(cuda_path):
    cu = _cu([5, 0, 12], CUDA)
    q, k, v = _inputs(17, 17, 4, 2, 80, torch.bfloat16, CUDA).values()
    mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12,
                         backend="cuda_short")  # first call: probes and loads the library
    torch.cuda.set_sync_debug_mode("error")
    try:
        mmfast.ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12,
                             backend="cuda_short")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_public_op_refuses_what_the_kernel_cannot_take(cuda_path):
    cu = _cu([5, 3], CUDA)
    q, k, v = _inputs(8, 8, 2, 1, 64, torch.float16, CUDA).values()
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5, backend="cuda_short")
    with pytest.raises(mmfast.NoBackendError, match="no backward: inputs require grad"):
        mmfast.ops.attention(q.clone().requires_grad_(), k, v, **kw)
    with pytest.raises(mmfast.NoBackendError, match="dtype float32 not supported"):
        mmfast.ops.attention(q.float(), k.float(), v.float(), **kw)
    with pytest.raises(mmfast.NoBackendError, match="head dim 36 not supported"):
        mmfast.ops.attention(q[..., :36], k[..., :36], v[..., :36], **kw)
    with pytest.raises(mmfast.NoBackendError, match="segments of up to 128 tokens only"):
        mmfast.ops.attention(q, k, v, **{**kw, "max_seqlen_k": 129})


def _raw_call(**changes):
    """Arguments of the C++ op for a small valid call, with ``changes`` applied."""
    q, k, v = _inputs(8, 8, 2, 1, 64, torch.float16, CUDA).values()
    cu = _cu([5, 3], CUDA)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5,
                window_left=-1, window_right=-1, scale=0.125, out=torch.empty_like(q),
                lse=torch.empty(2, 8, device=CUDA))
    args.update(changes)
    return args


@gpu
@pytest.mark.parametrize("changes,message", [
    ({"q": "float32"}, "q: expected float16 or bfloat16"),
    ({"k": "bfloat16"}, "k: expected dtype"),
    ({"q": "head_dim_36"}, "head dim must be a multiple of 8"),
    ({"max_seqlen_q": 129}, "max_seqlen_q, max_seqlen_k: expected 0..128"),
    ({"cu_seqlens_k": "int64"}, "cu_seqlens_k: expected a contiguous int32"),
    ({"cu_seqlens_k": "short"}, "cu_seqlens_k: expected a contiguous int32 \\[3\\]"),
    ({"lse": "transposed"}, "lse: expected a float32 \\[2, 8\\]"),
    ({"out": "misaligned"}, "out: data must be 16-byte aligned"),
    ({"window_left": -2}, "window_left: expected an int >= -1"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_cpp_op_rejects_bad_input(changes, message, cuda_path):
    args = _raw_call()
    key, what = next(iter(changes.items()))
    value = {
        "float32": lambda: args[key].float(),
        "bfloat16": lambda: args[key].bfloat16(),
        "head_dim_36": lambda: args[key][..., :36].contiguous(),
        "int64": lambda: args[key].long(),
        "short": lambda: args[key][:2],
        "transposed": lambda: args[key].t(),
        "misaligned": lambda: torch.empty(args[key].numel() + 4, dtype=args[key].dtype,
                                          device=CUDA)[4:].view(args[key].shape),
    }.get(what, lambda: what)()
    args[key] = value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mmfast_cuda.attention_short_fwd(*args.values())


def sanitizer_smoke():
    """Small calls of every code path, for compute-sanitizer (scripts/gpu_check_csrc.sh):
    both dtypes, every padded head dim, 64- and 128-key score registers, 1, 2 and 4
    segments a block, windows, GQA, blind queries, the padded layout."""
    from mmfast.ops import attention

    def run(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, **kw):
        cu_q, cu_k = _cu(lengths_q, CUDA), _cu(lengths_k, CUDA)
        q, k, v = _inputs(sum(lengths_q), sum(lengths_k), heads, kv_heads, head_dim, dtype, CUDA).values()
        attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q),
                  max_seqlen_k=max(lengths_k), return_lse=True, backend="cuda_short", **kw)

    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            for head_dim in (24, 64, 72, 80, 96, 128):
                run([5, 0, 16, 1, 9], [7, 3, 0, 16, 2], 4, 2, head_dim, dtype, causal=True)  # 4 a block
                run([64, 17, 30], [64, 64, 5], 2, 2, head_dim, dtype, window=(9, 3))         # 1 a block
                run([128, 1], [100, 128], 2, 1, head_dim, dtype)                             # 128 keys
            run([20, 32, 3], [30, 0, 11], 3, 1, 80, dtype, causal=True)                      # 2 a block
        q, k, v = _inputs(19, 29, 4, 2, 80, torch.bfloat16, CUDA, batch=3).values()
        attention(q, k, v, window=(6, 2), backend="cuda_short")
    torch.cuda.synchronize()


# ---- anywhere: dispatch and the Python side -------------------------------------------------


@pytest.fixture
def fake_hopper(monkeypatch, tmp_path):
    """cuda:0 is a compute capability 9.0 device called FAKE_GPU on which the CUDA path
    could run; no tuning table unless a test writes one."""
    monkeypatch.setitem(dispatch._capability, 0, (9, 0))
    monkeypatch.setattr(tuning, "_tables", {})
    monkeypatch.setattr(tuning, "_device_names", {0: FAKE_GPU})
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    monkeypatch.setattr(build, "unavailable_reason", lambda device: None)
    return tmp_path


def _table(tmp_path, monkeypatch, entries):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": FAKE_GPU, "wins": {"attention": entries}}))
    monkeypatch.setenv(tuning.ENV_VAR, str(path))


def _call(max_q=64, max_k=64, head_dim=80, dtype=torch.bfloat16, requires_grad=False, device=CUDA0):
    facts = {"return_lse": False, "causal": False, "window": (-1, -1), "max_seqlen_q": max_q,
             "max_seqlen_k": max_k, "head_dim": head_dim, "requires_grad": requires_grad}
    return Call(device=device, dtype=dtype, head_dim=head_dim, layout="packed", facts=facts)


def test_refused_on_cpu():
    q = torch.randn(6, 2, 64, dtype=torch.float16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(mmfast.NoBackendError, match="backend 'cuda_short' .* device cpu not supported"):
        mmfast.ops.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6,
                             backend="cuda_short")


def test_reasons_on_a_gpu_it_could_run_on(fake_hopper):
    backend = ATTENTION.backends["cuda_short"]
    assert backend.measured
    assert backend.reasons(_call()) == []
    assert backend.reasons(_call(requires_grad=True)) == ["no backward: inputs require grad (a forward-only kernel)"]
    assert any("segments of up to 128 tokens only" in r for r in backend.reasons(_call(max_k=129)))
    assert backend.reasons(_call(head_dim=36)) == ["head dim 36 not supported"]
    assert backend.reasons(_call(head_dim=136)) == ["head dim 136 not supported"]
    assert any("dtype float32 not supported" in r for r in backend.reasons(_call(dtype=torch.float32)))


def test_reports_an_unavailable_cuda_path(fake_hopper, monkeypatch):
    monkeypatch.setattr(build, "unavailable_reason", lambda device: "nvcc not found (set CUDA_HOME)")
    reasons = ATTENTION.backends["cuda_short"].reasons(_call())
    assert reasons == ["CUDA C++ path unavailable: nvcc not found (set CUDA_HOME)"]


def test_never_chosen_without_a_tuning_row(fake_hopper):
    assert ATTENTION.select(_call()).name == "triton_short"
    assert ATTENTION.select(_call(), "cuda_short").name == "cuda_short"  # forcing ignores the table


def test_chosen_where_the_table_says_it_won(fake_hopper, monkeypatch):
    _table(fake_hopper, monkeypatch, [
        {"backend": "cuda_short", "dtypes": ["bfloat16"], "head_dim": [80, 80], "max_seqlen_q": [1, 64]},
    ])
    assert ATTENTION.select(_call()).name == "cuda_short"
    assert ATTENTION.select(_call(head_dim=64)).name == "triton_short"      # no row for it
    assert ATTENTION.select(_call(max_q=128)).name == "triton_short"
    assert ATTENTION.select(_call(dtype=torch.float16)).name == "triton_short"
    # Measured faster, but training needs a backward: the next backend takes the call.
    assert ATTENTION.select(_call(requires_grad=True)).name == "triton_short"


def test_the_op_tells_dispatch_whether_inputs_require_grad(monkeypatch):
    seen = []
    original = type(ATTENTION).select

    def spy(self, call, backend=None):
        if self is ATTENTION:
            seen.append((call.facts["requires_grad"], call.facts["head_dim"]))
        return original(self, call, backend)

    monkeypatch.setattr(type(ATTENTION), "select", spy)
    q = torch.randn(1, 5, 2, 16)
    leaf = q.clone().requires_grad_()
    mmfast.ops.attention(q, q, q, backend="torch")
    mmfast.ops.attention(leaf, q, q, backend="torch")
    with torch.no_grad():
        mmfast.ops.attention(leaf, q, q, backend="torch")
    cos = torch.ones(5, 4, requires_grad=True)  # a table that requires grad counts too
    mmfast.ops.attention(q, q, q, rotary=(cos, torch.zeros(5, 4)), backend="torch")
    assert seen == [(False, 16), (True, 16), (False, 16), (True, 16)]


def test_fake_gives_the_output_shapes():
    # What torch.compile traces with: out like q, lse float32 [Hq, Tq].
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(10, 4, 80, dtype=torch.bfloat16)
        kv = torch.empty(10, 2, 80, dtype=torch.bfloat16)
        cu = torch.empty(3, dtype=torch.int32)
        out, lse = torch.ops.mmfast.attention_short_fwd_cuda(q, kv, kv, cu, cu, 64, 64, -1, -1, 0.1)
    assert (out.shape, out.dtype) == (q.shape, q.dtype)
    assert (lse.shape, lse.dtype) == ((4, 10), torch.float32)


def test_python_limits_mirror_the_header():
    from mmfast.cuda import attention as cuda_attention

    header = (build.source_dir() / "attention_short.h").read_text()
    constants = dict(re.findall(r"constexpr int (kAttnShort\w+) = (\d+);", header))
    assert int(constants["kAttnShortMaxSeqlen"]) == cuda_attention.MAX_SEQLEN == SHORT_MAX_SEQLEN
    assert int(constants["kAttnShortMaxHeadDim"]) == cuda_attention.MAX_HEAD_DIM == SHORT_MAX_HEAD_DIM


def test_bench_provider_skips_with_its_reason(fake_hopper):
    from mmfast.bench.suites import qwen_window_attention as qwen

    provider = qwen.SUITE.provider("mmfast-cuda-short")
    cases = {c.name: c for c in qwen.cases(True, CUDA)}
    assert "no backward" in provider.skip(cases["qwen-window-fwd+bwd-4x812px-bf16"], CUDA0)
    assert "segments of up to 128 tokens only" in provider.skip(cases["qwen-full-fwd-4x812px-bf16"], CUDA0)
    cpu_case = qwen.cases(True, torch.device("cpu"))[0]
    assert "device cpu not supported" in provider.skip(cpu_case, torch.device("cpu"))


if __name__ == "__main__":
    sanitizer_smoke()
    print("sanitizer smoke: done")
