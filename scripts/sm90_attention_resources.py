"""Compile the attention kernels for an H100 (sm_90a) without a GPU and report, per launch
the launchers make at model shapes: registers, spill bytes, shared memory, warps, stages,
whether the PTX uses Hopper wgmma, and the head-dim pieces' issued/useful work.

    .venv/bin/python scripts/sm90_attention_resources.py [--head-dims 64,72,80,128]
        [--dtypes float16,bfloat16] [--kernels general,short,cross] [--jsonl FILE]

How: the launchers run on meta tensors with their GPU configs (their device checks see
"cuda"), every kernel launch is recorded instead of run, and each distinct
specialisation is compiled with triton.compile for GPUTarget("cuda", 90, 32), with
ptxas's -v log read for registers and spills. No GPU, driver or network is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from mmfast.kernels import attention, attention_short, cross_attention

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
CUDA = torch.device("cuda")


@contextlib.contextmanager
def gpu_configs():
    """The launchers' config choices as on a CUDA device, and launches recorded, not run."""
    launches = []
    saved = []

    def patch(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def as_cuda(fn):
        return lambda device, *a, **k: fn(CUDA, *a, **k)

    patch(attention, "_blocks", as_cuda(attention._blocks))
    patch(attention_short, "_plan", as_cuda(attention_short._plan))
    patch(cross_attention, "_blocks", as_cuda(cross_attention._blocks))
    patch(attention, "_overflow_blocks", as_cuda(attention._overflow_blocks))
    patch(cross_attention, "_overflow_blocks", as_cuda(cross_attention._overflow_blocks))
    patch(cross_attention, "multiprocessor_count", lambda device: H100_SMS)
    patch(cross_attention, "num_splits", as_cuda(cross_attention.num_splits))
    patch(JITFunction, "run", lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs)))
    try:
        yield launches
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _meta(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device="meta")


def general_launches(head_dim, dtype, rotary, varlen):
    """A Qwen2.5-VL full-attention layer (packed, 16 heads) or a SigLIP-like padded batch."""
    heads, seg, batch = 16, 1024, 4
    if varlen:
        q, k, v = (_meta(batch * seg, heads, head_dim, dtype=dtype) for _ in range(3))
        cu = torch.zeros(batch + 1, dtype=torch.int32, device="meta")
        lens = (cu, cu, seg, seg)
    else:
        q, k, v = (_meta(batch, seg, heads, head_dim, dtype=dtype) for _ in range(3))
        lens = (None, None, seg, seg)
    cos = sin = _meta(batch * seg, head_dim // 2, dtype=torch.float32) if rotary else None
    out, lse = attention.attention_fwd(q, k, v, *lens, -1, -1, head_dim**-0.5, cos, sin)
    attention.attention_bwd(out, q, k, v, out, lse, None, *lens, -1, -1, head_dim**-0.5, cos, sin)


def short_launches(head_dim, dtype, rotary, varlen=True):
    """Qwen2.5-VL window attention: 64-token windows, 16 heads, fused rotary."""
    heads, seg, batch = 16, 64, 64
    q, k, v = (_meta(batch * seg, heads, head_dim, dtype=dtype) for _ in range(3))
    cu = torch.zeros(batch + 1, dtype=torch.int32, device="meta")
    cos = sin = _meta(batch * seg, head_dim // 2, dtype=torch.float32) if rotary else None
    args = (cu, cu, seg, seg, -1, -1, head_dim**-0.5, cos, sin)
    out, lse = attention_short.attention_short_fwd(q, k, v, *args)
    attention_short.attention_short_bwd(out, q, k, v, out, lse, None, *args)


def cross_launches(head_dim, dtype, rotary=False, varlen=False):
    """SD1.5 UNet cross-attention: 64x64 latent queries over 77 text tokens, 8 heads
    (packed: the same lengths through cu_seqlens, which adds the overflow pass)."""
    heads, batch, lq, lk = 8, 2, 4096, 77
    q = _meta(batch * lq, heads, head_dim, dtype=dtype)
    k, v = (_meta(batch * lk, heads, head_dim, dtype=dtype) for _ in range(2))
    dims = (None, None, batch, lq, lk, lq, lk, None)
    if varlen:
        cu = torch.zeros(batch + 1, dtype=torch.int32, device="meta")
        dims = (cu, cu, batch, 0, 0, lq, lk, None)
    out, o, lse = cross_attention.cross_attention_fwd(q, k, v, *dims, None, None, head_dim**-0.5)
    cross_attention.cross_attention_bwd(o, q, k, v, o, lse, *dims, None, head_dim**-0.5)


FAMILIES = {
    "general": (general_launches, [(True, True), (True, False), (False, False)]),
    "short": (short_launches, [(True, True), (False, True)]),
    "cross": (cross_launches, [(False, False), (False, True)]),
}

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(fn, args, kwargs):
    """Compile one recorded launch for sm_90a; its resources as a dict."""
    backend = make_backend(TARGET)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    start = time.time()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    text = log.getvalue()
    regs = _REGS.search(text)
    spills = _SPILLS.search(text)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
        "shared": compiled.metadata.shared,
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        # Hopper tensor-core instructions against Ampere-style ones, counted in the PTX.
        "wgmma": compiled.asm["ptx"].count("wgmma.mma_async."),
        "mma_sync": compiled.asm["ptx"].count("mma.sync."),
        "compile_s": round(time.time() - start, 1),
    }


def _constexprs(fn, kwargs):
    names = [p.name for p in fn.params if p.is_constexpr]
    return {k: v for k, v in kwargs.items() if k in names}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="64,72,80,128")
    parser.add_argument("--cross-head-dims", default="40,64,72,80,128,160")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--kernels", default="general,short,cross")
    parser.add_argument("--jsonl", default=None, help="append one JSON row per compiled launch")
    opts = parser.parse_args(argv)
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="sm90_attention_")
    triton.knobs.compilation.always_compile = True  # every compile runs ptxas, whose log has the registers
    seen = set()
    rows = []
    for family in opts.kernels.split(","):
        build, variants = FAMILIES[family]
        dims = opts.cross_head_dims if family == "cross" else opts.head_dims
        for head_dim in map(int, dims.split(",")):
            for dtype in (getattr(torch, d) for d in opts.dtypes.split(",")):
                for rotary, varlen in variants:
                    with gpu_configs() as launches:
                        build(head_dim, dtype, rotary=rotary, varlen=varlen)
                    for fn, args, kwargs in launches:
                        consts = _constexprs(fn, kwargs)
                        key = (fn.__name__, str(dtype), head_dim, tuple(sorted(consts.items())),
                               kwargs.get("num_warps"), kwargs.get("num_stages"))
                        if key in seen:
                            continue
                        seen.add(key)
                        row = {"kernel": fn.__name__, "dtype": str(dtype).removeprefix("torch."),
                               "head_dim": head_dim, "pieces": _pieces(consts),
                               "issued_over_useful": _ratio(consts, head_dim),
                               "constexprs": {k: v for k, v in consts.items() if not k.startswith("BLOCK_D")}}
                        try:
                            row.update(compile_launch(fn, args, kwargs))
                        except Exception as error:  # report and go on: the table shows it
                            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                        rows.append(row)
                        print(_line(row), flush=True)
                        if opts.jsonl:
                            with open(opts.jsonl, "a") as f:
                                f.write(json.dumps(row) + "\n")
    bad = [r for r in rows if r.get("error") or r.get("spill_stores")]
    print(f"{len(rows)} launches compiled, {len(bad)} with errors or spills")
    return 1 if bad else 0


def _pieces(consts):
    if "HEAD_D0" in consts:
        return [consts["HEAD_D0"], consts.get("HEAD_D1", 0)]
    return [consts.get("BLOCK_D")]


def _ratio(consts, head_dim):
    return round(sum(p for p in _pieces(consts) if p) / head_dim, 3)


def _line(row):
    flags = ",".join(f"{k}={v}" for k, v in row["constexprs"].items()
                     if k in ("VARLEN", "ROTARY", "BLOCK_M", "BLOCK_N", "SEGS", "ROWS", "SLOT_K", "SPLIT")
                     and not isinstance(v, bool) or v is True)
    if "error" in row:
        return f"{row['kernel']:40s} {row['dtype']:9s} D={row['head_dim']:<4d} {flags}  ERROR {row['error']}"
    return (f"{row['kernel']:40s} {row['dtype']:9s} D={row['head_dim']:<4d} pieces={row['pieces']} "
            f"x{row['issued_over_useful']:<5} w={row['num_warps']} s={row['num_stages']} regs={row['regs']} "
            f"spill={row['spill_stores']}/{row['spill_loads']} smem={row['shared']} "
            f"wgmma={row['wgmma']} mma.sync={row['mma_sync']} {flags} "
            f"({row['compile_s']}s)")


if __name__ == "__main__":
    sys.exit(main())
