"""RMSNorm and LayerNorm over the hidden dim, with and without a residual added first,
forward and forward+backward; bf16 on a GPU.

Providers: ``mmfast-triton`` (mmfast.ops with backend="triton"), ``mmfast-cuda`` (the
same with backend="cuda": the CUDA C++ kernels of csrc/, built before timing; skipped with
the reason when the CUDA path is unavailable or the case is outside its limits), ``torch-eager``
(``x + residual`` then F.rms_norm / F.layer_norm), ``torch-compile`` (the eager function
under torch.compile, compiled afresh per case), ``liger`` (liger-kernel's functional
norms after the same plain add, when installed).

"fwd" runs under torch.no_grad (inference). "fwd+bwd" runs the forward with grad and
torch.autograd.grad of every output (y, and h with a residual) with respect to every
input (x, weight, bias, residual), given random upstream gradients dy (and dh).

Byte model. Norms are memory-bound, so throughput is GB/s over the bytes that any
implementation must move; one that moves more shows up as lower effective GB/s. With
M rows, N hidden, s bytes per element (x and the parameters share the dtype), r = 1 with
a residual (else 0) and p parameter vectors (1 for RMSNorm, 2 for LayerNorm):

    forward   read x (+ residual), write y (+ h = x + residual)   (2 + 2r) M N s + p N s
    backward  read dy (+ dh) and h, write dx (= d residual)       (3 + r) M N s + 2 p N s
    fwd+bwd   the sum                                             (5 + 3r) M N s + 3 p N s

(backward reads the parameters and writes their gradients). Per-row statistics (mean and
rstd, 4-8 bytes a row, under 0.3% of the traffic at N >= 1280) are not counted: a kernel
may recompute them rather than store them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Suite, Target, backend_skip, cpu_compile_skip, gpu_library_skip

RMS_EPS, LN_EPS = 1e-6, 1e-5

GPU_HIDDEN, GPU_TOKENS = (1280, 2048, 4096, 8192), (4096, 16384)
GPU_QUICK_HIDDEN, GPU_QUICK_TOKENS = (1280, 8192), (4096,)
# Smoke shapes: small enough for the Triton interpreter; 320 and 1280 leave a masked tail.
CPU_HIDDEN, CPU_TOKENS = (256, 1280), (64, 256)
CPU_QUICK_HIDDEN, CPU_QUICK_TOKENS = (320,), (32,)


# ---- cases -----------------------------------------------------------------------


@dataclass
class NormInputs:
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    residual: Tensor | None
    dy: Tensor | None  # upstream gradients, fwd+bwd cases only
    dh: Tensor | None

    def leaves(self) -> list[Tensor]:
        return [t for t in (self.x, self.weight, self.bias, self.residual) if t is not None]

    def grads_out(self) -> list[Tensor]:
        return [t for t in (self.dy, self.dh) if t is not None]


def _make_inputs(params: dict, device: torch.device) -> NormInputs:
    rows, n = params["tokens"], params["hidden"]
    dtype = getattr(torch, params["dtype"])
    grad = params["pass"] == "fwd+bwd"
    residual = params["residual"]

    def randn(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, device=device, dtype=dtype) * scale + shift
        return t.requires_grad_(grad)

    return NormInputs(
        x=randn(rows, n),
        weight=randn(n, scale=0.1, shift=1.0),
        bias=randn(n, scale=0.1) if params["op"] == "layer_norm" else None,
        residual=randn(rows, n) if residual else None,
        dy=torch.randn(rows, n, device=device, dtype=dtype) if grad else None,
        dh=torch.randn(rows, n, device=device, dtype=dtype) if grad and residual else None,
    )


def _bytes(params: dict, elem: int) -> int:
    mn, n = params["tokens"] * params["hidden"], params["hidden"]
    r = 1 if params["residual"] else 0
    p = 1 if params["op"] == "rms_norm" else 2
    fwd = (2 + 2 * r) * mn * elem + p * n * elem
    bwd = (3 + r) * mn * elem + 2 * p * n * elem
    return fwd + (bwd if params["pass"] == "fwd+bwd" else 0)


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        dtype = torch.bfloat16
        hidden, tokens = (GPU_QUICK_HIDDEN, GPU_QUICK_TOKENS) if quick else (GPU_HIDDEN, GPU_TOKENS)
    else:
        dtype = torch.bfloat16  # same dtype as on a GPU: the smoke run exercises its code paths
        hidden, tokens = (CPU_QUICK_HIDDEN, CPU_QUICK_TOKENS) if quick else (CPU_HIDDEN, CPU_TOKENS)
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    out = []
    for op in ("rms_norm", "layer_norm"):
        for residual in (False, True):
            for pass_ in ("fwd", "fwd+bwd"):
                for m in tokens:
                    for n in hidden:
                        params = {"op": op, "residual": residual, "pass": pass_, "tokens": m,
                                  "hidden": n, "dtype": str(dtype).removeprefix("torch.")}
                        name = f"{op.split('_')[0]}{'+res' if residual else ''}-{pass_}-{m}x{n}-{short}"
                        out.append(Case(name, params, partial(_make_inputs, params),
                                        bytes=_bytes(params, dtype.itemsize)))
    return out


# ---- implementations -------------------------------------------------------------


def eager_rms_norm(x, weight, eps, residual=None):
    h = x if residual is None else x + residual
    y = F.rms_norm(h, h.shape[-1:], weight, eps)  # in torch since 2.4, our minimum
    return y if residual is None else (y, h)


def eager_layer_norm(x, weight, bias, eps, residual=None):
    h = x if residual is None else x + residual
    y = F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    return y if residual is None else (y, h)


def _call(rms, layer, case: Case):
    """A forward taking NormInputs, from functions with the eager signatures."""
    if case.params["op"] == "rms_norm":
        return lambda i: rms(i.x, i.weight, RMS_EPS, i.residual)
    return lambda i: layer(i.x, i.weight, i.bias, LN_EPS, i.residual)


def _timed(case: Case, forward):
    """What is timed for the case's pass, around a forward taking NormInputs."""
    if case.params["pass"] == "fwd":
        def run(i: NormInputs):
            with torch.no_grad():
                return forward(i)
    else:
        def run(i: NormInputs):
            out = forward(i)
            outs = out if isinstance(out, tuple) else (out,)
            # autograd.grad returns the gradients instead of accumulating into .grad:
            # no zeroing between calls, and nothing kept alive across them.
            return torch.autograd.grad(outs, i.leaves(), i.grads_out())
    return run


def _build_mmfast(case: Case, backend: str = "triton"):
    from mmfast.ops import layer_norm, rms_norm

    def rms(x, weight, eps, residual):
        return rms_norm(x, weight, eps, residual=residual, backend=backend)

    def layer(x, weight, bias, eps, residual):
        return layer_norm(x, weight, bias, eps, residual=residual, backend=backend)

    return _timed(case, _call(rms, layer, case))


def _skip_mmfast(case: Case, device: torch.device, backend: str = "triton") -> str | None:
    dtype = getattr(torch, case.params["dtype"])
    return backend_skip("norm", backend, device, dtype, facts={"hidden": case.params["hidden"], "param_dtypes": (dtype,)})


def _skip_mmfast_cuda(case: Case, device: torch.device) -> str | None:
    reason = _skip_mmfast(case, device, "cuda")
    if reason is None:
        from mmfast.cuda import build

        # Build (or load) the library here, so that no case times a compile.
        if not build.load(device):
            reason = f"CUDA C++ path unavailable: {build.unavailable_reason(device)}"
    return reason


def _build_eager(case: Case):
    return _timed(case, _call(eager_rms_norm, eager_layer_norm, case))


def _build_compile(case: Case):
    # A fresh compile per case: dynamo caches per code object, and after a handful of
    # shapes it would stop recompiling and silently run eager.
    torch.compiler.reset()
    return _timed(case, _call(torch.compile(eager_rms_norm), torch.compile(eager_layer_norm), case))


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device)


def _build_liger(case: Case):
    from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

    # in_place=True (the default) writes dx over dy in backward, which would change the
    # rotating inputs from call to call; older releases have no such argument.
    extra = {"in_place": False} if "in_place" in inspect.signature(liger_rms_norm).parameters else {}

    def rms(x, weight, eps, residual):
        h = x if residual is None else x + residual
        y = liger_rms_norm(h, weight, eps, **extra)
        return y if residual is None else (y, h)

    def layer(x, weight, bias, eps, residual):
        h = x if residual is None else x + residual
        y = liger_layer_norm(h, weight, bias, eps)
        return y if residual is None else (y, h)

    return _timed(case, _call(rms, layer, case))


def _skip_liger(case: Case, device: torch.device) -> str | None:
    return gpu_library_skip("liger_kernel", device, "liger-kernel")


SUITE = Suite(
    name="norm",
    description="RMSNorm / LayerNorm (+ residual), fwd and fwd+bwd",
    bound="memory",
    cases=cases,
    providers=(
        Provider("mmfast-triton", _build_mmfast, _skip_mmfast),
        Provider("mmfast-cuda", partial(_build_mmfast, backend="cuda"), _skip_mmfast_cuda),
        Provider("torch-eager", _build_eager),
        Provider("torch-compile", _build_compile, _skip_compile),
        Provider("liger", _build_liger, _skip_liger),
    ),
    plot_x="hidden",
    plot_panels=("op", "residual", "pass", "tokens"),
    targets=(Target("mmfast-triton", 0.80,
                    "issue: mmfast-triton >= 80% of measured copy bandwidth, hidden 1280..8192"),
             Target("mmfast-cuda", 0.90,
                    "issue 9: CUDA C++ norms >= 90% of measured copy bandwidth at large sizes")),
)
