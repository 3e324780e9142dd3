"""Dense attention: head dim 64 and 128, sequence length 512..16k, causal and not,
forward, backward and forward+backward; bf16 on a GPU. Also the pieces the other attention
suites share (inputs, passes, FLOP model, baseline providers).

Shapes follow flash-attention's benchmarks: 16k tokens per batch (batch = 16384 / seqlen)
and 2048 channels (heads = 2048 / head dim), padded layout [B, T, H, D], self-attention.

Providers (each skipped with its reason where it cannot run):
``mmfast-triton`` (mmfast.ops.attention, backend="triton"); ``sdpa-flash``, ``sdpa-cudnn``,
``sdpa-efficient``, ``sdpa-math`` (F.scaled_dot_product_attention restricted to one
backend, [B, H, T, D] views; math only where its B*H*T*T scores fit); ``flex`` (compiled
flex_attention, causal through a BlockMask built outside the timed region);
``flash-attn`` (flash-attn 2 ``flash_attn_func``), ``flash-attn-4`` (``flash_attn.cute``),
``xformers`` (memory_efficient_attention, LowerTriangularMask when causal), when installed.

FLOP model: a query attending to n keys costs 4 D flops per key and head (q.k and p.v,
2 flops per multiply-add), so forward = 4 D H sum_i n_i, with n_i counted exactly for
causal masks and windows (bottom-right aligned, as the op defines them). Backward is
2.5 x forward (five matmuls: q.k recomputed, dV, dP, dQ, dK), forward+backward 3.5 x,
as flash-attention's benchmarks count. Throughput is useful work: a kernel that computes
masked-out scores shows up as lower TFLOP/s.

Passes: "fwd" runs under torch.no_grad; "fwd+bwd" runs the forward with grad and
torch.autograd.grad of the output with respect to q, k, v given a random dO; "bwd" times
only that autograd.grad, on a graph the first call on each input copy builds (that first
call runs the forward too; do_bench's warm-up normally covers every copy).

Targets from the issue (H100, bf16): dense hd 128, non-causal, 4k..16k: mmfast-triton
forward >= 1.3x sdpa-flash and forward+backward >= 1.2x sdpa-flash (``SPEEDUPS``, checked
on GPU runs); forward >= 50% of the measured bf16 matmul peak (read off the table: the
harness' Target would apply one fraction to every row of the provider).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Speedup, Suite, backend_skip, gpu_library_skip

GPU_SEQLENS, GPU_QUICK_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384), (1024, 4096)
GPU_HEAD_DIMS, GPU_QUICK_HEAD_DIMS = (64, 128), (128,)
TOKENS_PER_BATCH, CHANNELS = 16384, 2048
PASSES = ("fwd", "bwd", "fwd+bwd")
# Multiples of the forward FLOPs per pass (see the module docstring).
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# SDPA's math backend materialises the scores (and their gradient): skip above this.
MATH_MAX_SCORE_BYTES = 8 << 30


# ---- FLOP model ------------------------------------------------------------------


def visible_pairs(len_q: int, len_k: int, left: int = -1, right: int = -1) -> int:
    """(query, key) pairs a segment attends: query i sits at key i + len_k - len_q and sees
    keys [diag - left, diag + right] (-1: unbounded), clipped to the segment."""
    if len_q == 0 or len_k == 0:
        return 0
    diag = torch.arange(len_q, dtype=torch.int64) + (len_k - len_q)
    lo = (diag - left).clamp(min=0) if left >= 0 else torch.zeros_like(diag)
    hi = (diag + right).clamp(max=len_k - 1) if right >= 0 else torch.full_like(diag, len_k - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def attention_flops(lengths: list[int], heads: int, head_dim: int, pass_: str,
                    causal: bool = False) -> int:
    """Useful FLOPs of self-attention over segments of ``lengths`` tokens."""
    right = 0 if causal else -1
    pairs = sum(visible_pairs(n, n, -1, right) for n in lengths)
    return int(4 * head_dim * heads * pairs * PASS_FLOPS[pass_])


# ---- inputs and passes -----------------------------------------------------------


@dataclass
class AttentionInputs:
    """Self-attention inputs: packed [T, H, D] with cu_seqlens, or padded [B, T, H, D]."""

    q: Tensor
    k: Tensor
    v: Tensor
    dout: Tensor | None  # the upstream gradient, for passes with a backward
    cu_seqlens: Tensor | None = None
    max_seqlen: int | None = None
    lengths: tuple[int, ...] = ()  # segment lengths (packed), known to the host
    graph: dict = field(default_factory=dict)  # "bwd" pass: the forward output, per copy


def make_inputs(params: dict, lengths: tuple[int, ...] | None, device: torch.device) -> AttentionInputs:
    """Random inputs for ``params`` (heads, head_dim, dtype, pass, and batch/seqlen when
    padded); ``lengths`` gives packed segments instead."""
    dtype = getattr(torch, params["dtype"])
    grad = params["pass"] != "fwd"
    heads, head_dim = params["heads"], params["head_dim"]
    lead = (sum(lengths),) if lengths is not None else (params["batch"], params["seqlen"])

    def randn():
        return torch.randn(*lead, heads, head_dim, device=device, dtype=dtype).requires_grad_(grad)

    cu = None
    if lengths is not None:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return AttentionInputs(
        q=randn(), k=randn(), v=randn(),
        dout=torch.randn(*lead, heads, head_dim, device=device, dtype=dtype) if grad else None,
        cu_seqlens=cu, max_seqlen=max(lengths, default=0) if lengths is not None else None,
        lengths=tuple(lengths or ()),
    )


def timed(case: Case, forward: Callable[[AttentionInputs], Tensor]):
    """What is timed for the case's pass, around ``forward`` (inputs -> output)."""
    pass_ = case.params["pass"]
    if pass_ == "fwd":
        def run(i: AttentionInputs):
            with torch.no_grad():
                return forward(i)
    elif pass_ == "fwd+bwd":
        def run(i: AttentionInputs):
            return torch.autograd.grad(forward(i), (i.q, i.k, i.v), i.dout)
    else:
        def run(i: AttentionInputs):
            if "out" not in i.graph:  # first use of this copy: build the graph once
                i.graph["out"] = forward(i)
            return torch.autograd.grad(i.graph["out"], (i.q, i.k, i.v), i.dout, retain_graph=True)
    return run


def once(build: Callable[[AttentionInputs], object]):
    """A per-provider cache of what is built from the first inputs (masks, indices): the
    build happens in the untimed warm-up call; every copy of a case shares its segments."""
    cache: list = []

    def get(i: AttentionInputs):
        if not cache:
            cache.append(build(i))
        return cache[0]

    return get


# ---- providers: mmfast -------------------------------------------------------------


def mmfast_forward(backend: str, causal: bool):
    from mmfast.ops import attention

    def forward(i: AttentionInputs):
        return attention(i.q, i.k, i.v, cu_seqlens_q=i.cu_seqlens, cu_seqlens_k=i.cu_seqlens,
                         max_seqlen_q=i.max_seqlen, max_seqlen_k=i.max_seqlen, causal=causal,
                         backend=backend)

    return forward


def mmfast_skip(backend: str, case: Case, device: torch.device) -> str | None:
    p = case.params
    longest = p.get("max_seqlen", p.get("seqlen"))
    return backend_skip("attention", backend, device, getattr(torch, p["dtype"]), head_dim=p["head_dim"],
                        layout="packed" if "max_seqlen" in p else "padded",
                        facts={"return_lse": False, "causal": p.get("causal", False),
                               "window": (-1, 0 if p.get("causal") else -1),
                               "max_seqlen_q": longest, "max_seqlen_k": longest,
                               "head_dim": p["head_dim"], "requires_grad": p["pass"] != "fwd"})


# ---- providers: baselines ------------------------------------------------------------

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def sdpa(name: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False):
    """SDPA restricted to one backend; q, k, v [B, H, T, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name])):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def sdpa_skip(name: str, device: torch.device, score_bytes: int) -> str | None:
    if device.type != "cuda" and name in ("cudnn", "efficient"):
        return f"SDPA's {name} backend runs on CUDA only"
    if name == "math" and score_bytes > MATH_MAX_SCORE_BYTES:
        return f"SDPA math materialises {score_bytes / 2**30:.0f} GiB of scores"
    return None


def flex_skip(case: Case, device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if case.params["pass"] != "fwd":
        return "FlexAttention has no backward on CPU"
    if os.environ.get("MMFAST_BENCH_CPU_COMPILE", "0") in ("", "0"):
        return "FlexAttention compiles per case (slow on CPU); set MMFAST_BENCH_CPU_COMPILE=1 to include it"
    return None


def compiled_flex():
    """flex_attention compiled afresh (dynamo would stop recompiling after a few shapes)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch.compiler.reset()
    return torch.compile(flex_attention)


# ---- the dense suite ---------------------------------------------------------------


def _heads_first(t: Tensor) -> Tensor:
    return t.transpose(1, 2)


def _dense_sdpa(name: str, case: Case):
    causal = case.params["causal"]

    def forward(i: AttentionInputs):
        return _heads_first(sdpa(name, *map(_heads_first, (i.q, i.k, i.v)), causal=causal))

    return timed(case, forward)


def _dense_sdpa_skip(name: str, case: Case, device: torch.device) -> str | None:
    p = case.params
    scores = p["batch"] * p["heads"] * p["seqlen"] ** 2 * 4 * (1 if p["pass"] == "fwd" else 3)
    return sdpa_skip(name, device, scores)


def _dense_flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask

    flex = compiled_flex()
    causal = case.params["causal"]

    def build(i: AttentionInputs):
        if not causal:
            return None
        n = i.q.shape[1]
        return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n,
                                 device=i.q.device)

    mask = once(build)

    def forward(i: AttentionInputs):
        return _heads_first(flex(*map(_heads_first, (i.q, i.k, i.v)), block_mask=mask(i)))

    return timed(case, forward)


def _dense_flash_attn(module: str, case: Case):
    import importlib

    fn = importlib.import_module(module).flash_attn_func
    causal = case.params["causal"]

    def forward(i: AttentionInputs):
        out = fn(i.q, i.k, i.v, causal=causal)
        return out[0] if isinstance(out, tuple) else out

    return timed(case, forward)


def _dense_xformers(case: Case):
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    bias = LowerTriangularMask() if case.params["causal"] else None
    return timed(case, lambda i: memory_efficient_attention(i.q, i.k, i.v, attn_bias=bias))


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        dtype = "bfloat16"
        head_dims, seqlens = (GPU_QUICK_HEAD_DIMS, GPU_QUICK_SEQLENS) if quick else (GPU_HEAD_DIMS, GPU_SEQLENS)
        passes = ("fwd", "fwd+bwd") if quick else PASSES
        tokens, channels = TOKENS_PER_BATCH, CHANNELS
    else:  # smoke shapes the Triton interpreter gets through; float16: it has no bf16 dot
        dtype, head_dims, seqlens = "float16", (64,), (48,)
        passes = ("fwd", "fwd+bwd") if quick else PASSES
        tokens, channels = 48, 128
    out = []
    for head_dim in head_dims:
        for seqlen in seqlens:
            for causal in (False, True):
                for pass_ in passes:
                    batch, heads = max(1, tokens // seqlen), channels // head_dim
                    params = {"pass": pass_, "causal": causal, "seqlen": seqlen, "head_dim": head_dim,
                              "batch": batch, "heads": heads, "dtype": dtype}
                    name = f"{pass_}-{'causal' if causal else 'full'}-hd{head_dim}-{batch}x{seqlen}-{dtype}"
                    out.append(Case(name, params, partial(make_inputs, params, None),
                                    flops=batch * attention_flops([seqlen], heads, head_dim, pass_, causal)))
    return out


def _providers() -> tuple[Provider, ...]:
    providers = [
        Provider("mmfast-triton", lambda case: timed(case, mmfast_forward("triton", case.params["causal"])),
                 partial(mmfast_skip, "triton")),
    ]
    for name in SDPA_BACKENDS:
        providers.append(Provider(f"sdpa-{name}", partial(_dense_sdpa, name), partial(_dense_sdpa_skip, name)))
    providers += [
        Provider("flex", _dense_flex, flex_skip),
        Provider("flash-attn", partial(_dense_flash_attn, "flash_attn"),
                 lambda case, device: gpu_library_skip("flash_attn.flash_attn_interface", device, "flash-attn 2")),
        Provider("flash-attn-4", partial(_dense_flash_attn, "flash_attn.cute"),
                 lambda case, device: gpu_library_skip("flash_attn.cute", device, "flash-attn 4")),
        Provider("xformers", _dense_xformers,
                 lambda case, device: gpu_library_skip("xformers", device, "xformers")),
    ]
    return tuple(providers)


_TARGET_SHAPES = {"head_dim": 128, "causal": False, "seqlen": (4096, 8192, 16384)}
SPEEDUPS = (
    Speedup("mmfast-triton", ("sdpa-flash",), 1.3, "dense hd 128, 4k..16k, fwd: >= 1.3x sdpa-flash",
            {**_TARGET_SHAPES, "pass": "fwd"}),
    Speedup("mmfast-triton", ("sdpa-flash",), 1.2, "dense hd 128, 4k..16k, fwd+bwd: >= 1.2x sdpa-flash",
            {**_TARGET_SHAPES, "pass": "fwd+bwd"}),
)

SUITE = Suite(
    name="attention",
    description="dense attention, hd 64/128, seqlen 512..16k, causal and not, fwd / bwd / fwd+bwd",
    bound="compute",
    cases=cases,
    providers=_providers(),
    plot_x="seqlen",
    plot_panels=("head_dim", "causal", "pass"),
    speedups=SPEEDUPS,
)
