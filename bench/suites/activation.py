"""Activations: GELU (erf, tanh), QuickGELU, and the gated SwiGLU / GeGLU (gate and up as
two tensors), forward and forward+backward; bf16 on a GPU.

Providers: ``mmfast-triton`` (mmfast.ops, backend="triton"), ``torch-eager``
(F.gelu, x * sigmoid(1.702 x), F.silu(gate) * up, F.gelu(gate) * up), ``torch-compile``
(the eager function under torch.compile, compiled afresh per case).

Byte model (memory-bound; M rows, N columns, s bytes per element), what any
implementation must move:

    plain  forward  read x, write y                          2 M N s
           backward read dy, x, write dx                     3 M N s
    gated  forward  read gate, up, write out                 3 M N s
           backward read dout, gate, up, write dgate, dup    5 M N s

Eager PyTorch moves more (QuickGELU and the gated products are several kernels, each a
round trip through memory): that is the gap being measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Suite, Target, backend_skip, cpu_compile_skip

OPS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu", "geglu")
GATED = ("swiglu", "geglu")
# Widths of real vision MLPs: SigLIP-so400m 4304, Qwen2.5-VL vision 3420, CLIP-L 4096.
GPU_WIDTHS, GPU_TOKENS = (3420, 4096, 4304), (4096, 16384)
GPU_QUICK_WIDTHS, GPU_QUICK_TOKENS = (4304,), (16384,)
CPU_WIDTHS, CPU_TOKENS = (320,), (32,)


@dataclass
class ActInputs:
    x: Tensor
    up: Tensor | None
    dy: Tensor | None

    def leaves(self) -> list[Tensor]:
        return [t for t in (self.x, self.up) if t is not None]


def _make_inputs(params: dict, device: torch.device) -> ActInputs:
    m, n = params["tokens"], params["width"]
    dtype = getattr(torch, params["dtype"])
    grad = params["pass"] == "fwd+bwd"
    randn = lambda: torch.randn(m, n, device=device, dtype=dtype).requires_grad_(grad)
    return ActInputs(x=randn(), up=randn() if params["op"] in GATED else None,
                     dy=torch.randn(m, n, device=device, dtype=dtype) if grad else None)


def _bytes(params: dict, elem: int) -> int:
    mn = params["tokens"] * params["width"] * elem
    gated = params["op"] in GATED
    fwd, bwd = (3, 5) if gated else (2, 3)
    return (fwd + (bwd if params["pass"] == "fwd+bwd" else 0)) * mn


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        widths, tokens = (GPU_QUICK_WIDTHS, GPU_QUICK_TOKENS) if quick else (GPU_WIDTHS, GPU_TOKENS)
    else:
        widths, tokens = CPU_WIDTHS, CPU_TOKENS
    dtype = torch.bfloat16
    out = []
    for op in OPS:
        for pass_ in ("fwd", "fwd+bwd"):
            for m in tokens:
                for n in widths:
                    params = {"op": op, "pass": pass_, "tokens": m, "width": n, "dtype": "bfloat16"}
                    out.append(Case(f"{op}-{pass_}-{m}x{n}-bf16", params, partial(_make_inputs, params),
                                    bytes=_bytes(params, dtype.itemsize)))
    return out


# ---- implementations -------------------------------------------------------------


def eager(op: str, x: Tensor, up: Tensor | None) -> Tensor:
    if op == "gelu":
        return F.gelu(x)
    if op == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if op == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if op == "swiglu":
        return F.silu(x) * up
    return F.gelu(x) * up


def mmfast_op(op: str, x: Tensor, up: Tensor | None) -> Tensor:
    from mmfast.ops import geglu, gelu, quick_gelu, swiglu

    if op in ("gelu", "gelu_tanh"):
        return gelu(x, "tanh" if op == "gelu_tanh" else "none", backend="triton")
    if op == "quick_gelu":
        return quick_gelu(x, backend="triton")
    return (swiglu if op == "swiglu" else geglu)(x, up, backend="triton")


def _timed(case: Case, fn):
    op = case.params["op"]
    if case.params["pass"] == "fwd":
        def run(i: ActInputs):
            with torch.no_grad():
                return fn(op, i.x, i.up)
    else:
        def run(i: ActInputs):
            return torch.autograd.grad(fn(op, i.x, i.up), i.leaves(), i.dy)
    return run


def _skip_mmfast(case: Case, device: torch.device) -> str | None:
    return backend_skip("activation", "triton", device, getattr(torch, case.params["dtype"]))


def _build_compile(case: Case):
    torch.compiler.reset()  # a fresh compile per case (see the norm suite)
    return _timed(case, torch.compile(eager))


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device)


SUITE = Suite(
    name="activation",
    description="GELU / QuickGELU / SwiGLU / GeGLU, fwd and fwd+bwd",
    bound="memory",
    cases=cases,
    providers=(
        Provider("mmfast-triton", lambda case: _timed(case, mmfast_op), _skip_mmfast),
        Provider("torch-eager", lambda case: _timed(case, eager)),
        Provider("torch-compile", _build_compile, _skip_compile),
    ),
    plot_x="width",
    plot_panels=("op", "pass", "tokens"),
    targets=(Target("mmfast-triton", 0.80,
                    "elementwise passes should run near copy bandwidth (as the norm suite's target)"),),
)
