"""The LM-head loss of training, forward+backward: cross-entropy of hidden @ weight.T over
a 152k vocabulary, with and without the [N, V] logits. bf16 on a GPU.

Cases: Qwen2.5-VL-7B's head (C = 3584, V = 152064) and 3B's (C = 2048, V = 151936) at
N = 1k .. 16k tokens; 5% of the targets are ignore_index (-100), as prompt tokens are.
Each call computes the mean loss and torch.autograd.grad of it with respect to hidden
and weight.

Providers: ``mmfast-triton`` (mmfast.ops.linear_cross_entropy: chunked matmuls, the Triton
softmax pass writing d logits in place), ``mmfast-torch`` (the same chunks with the softmax
pass in PyTorch), ``torch-eager`` (F.linear, then F.cross_entropy on the float32 upcast:
transformers' recipe; its logits are N x V), ``torch-compile`` (that function under
torch.compile), ``liger`` (Liger-Kernel's LigerFusedLinearCrossEntropyLoss, when
installed). A dense provider whose logits would not fit in the free device memory is
skipped with the estimate.

FLOP model: the three matmuls of the dense algorithm, logits (2 N C V), d hidden and
d weight (2 N C V each): 6 N C V per call, the same for every provider; the softmax
work, O(N V), is not counted. The fraction is of the measured bf16 matmul peak, so it
reads directly as how close the loss runs to three bare matmuls.

Peak memory (the mem column; inputs excluded, gradients included): eager holds about
16 N V bytes at its peak (bf16 logits, their float32 upcast, log-softmax, its gradient
in float32 and bf16), mmfast one chunk's logits (at most mmfast's CHUNK_BYTES, 1 GiB)
plus the gradients, about 2 (N + V) C bytes.

Goals (the issue): time no worse than 1.1x eager's, and peak memory at least 4x lower
than eager's from 4k tokens on (below that, the weight gradient, 1 GiB at 7B, which
both hold, dominates).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Speedup, Suite, backend_skip, cpu_compile_skip, gpu_library_skip

# Qwen2.5-VL language model heads: (hidden size C, vocabulary V).
HEADS = {"qwen2.5-vl-7b": (3584, 152064), "qwen2.5-vl-3b": (2048, 151936)}
GPU_TOKENS = (1024, 2048, 4096, 8192, 16384)
GPU_QUICK_TOKENS = (2048, 8192)
# Smoke shapes for the Triton interpreter: a prime vocabulary, fp32 (fast on a CPU).
CPU_HEADS = {"tiny": (64, 1009)}
CPU_TOKENS, CPU_QUICK_TOKENS = (64, 200), (64,)

IGNORED_SHARE = 0.05
# Bytes per logit that eager keeps alive at its peak (see the module docstring).
DENSE_BYTES_PER_LOGIT = 16


@dataclass
class LossInputs:
    hidden: Tensor
    weight: Tensor
    target: Tensor

    def leaves(self) -> list[Tensor]:
        return [self.hidden, self.weight]


def _make_inputs(params: dict, device: torch.device) -> LossInputs:
    n, c, v = params["tokens"], params["hidden"], params["vocab"]
    dtype = getattr(torch, params["dtype"])
    target = torch.randint(0, v, (n,), device=device)
    target[torch.rand(n, device=device) < IGNORED_SHARE] = -100
    return LossInputs(
        hidden=torch.randn(n, c, device=device, dtype=dtype).requires_grad_(),
        # Qwen's initialiser scale: logits of order 1, as a trained head gives.
        weight=(torch.randn(v, c, device=device, dtype=dtype) * 0.02).requires_grad_(),
        target=target,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        dtype, heads = torch.bfloat16, HEADS
        tokens = GPU_QUICK_TOKENS if quick else GPU_TOKENS
    else:
        dtype, heads = torch.float32, CPU_HEADS
        tokens = CPU_QUICK_TOKENS if quick else CPU_TOKENS
    short = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    out = []
    for model, (c, v) in heads.items():
        for n in tokens:
            params = {"model": model, "pass": "fwd+bwd", "tokens": n, "hidden": c, "vocab": v,
                      "dtype": str(dtype).removeprefix("torch.")}
            out.append(Case(f"{model}-{n}tok-{short}", params, partial(_make_inputs, params),
                            flops=6 * n * c * v))
    return out


# ---- implementations -------------------------------------------------------------


def eager_loss(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """What transformers does: bf16 logits, cross-entropy on their float32 upcast."""
    return F.cross_entropy(F.linear(hidden, weight).float(), target, ignore_index=-100)


def _timed(forward):
    def run(i: LossInputs):
        return torch.autograd.grad(forward(i.hidden, i.weight, i.target), i.leaves())
    return run


def _build_mmfast(backend: str):
    def build(case: Case):
        from mmfast.ops import linear_cross_entropy

        return _timed(lambda h, w, t: linear_cross_entropy(h, w, t, backend=backend))
    return build


def _skip_mmfast(backend: str):
    def skip(case: Case, device: torch.device) -> str | None:
        return backend_skip("linear_cross_entropy", backend, device, getattr(torch, case.params["dtype"]))
    return skip


def _skip_dense(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    need = DENSE_BYTES_PER_LOGIT * case.params["tokens"] * case.params["vocab"]
    if need > 0.9 * free:
        return (f"would run out of memory: ~{need / 2**30:.0f} GiB of N x V logits and their gradients "
                f"({free / 2**30:.0f} GiB free)")
    return None


def _build_eager(case: Case):
    return _timed(eager_loss)


def _build_compile(case: Case):
    # A fresh compile per case (dynamo stops recompiling after a few shapes).
    torch.compiler.reset()
    return _timed(torch.compile(eager_loss))


def _skip_compile(case: Case, device: torch.device) -> str | None:
    return cpu_compile_skip(device) or _skip_dense(case, device)


def _build_liger(case: Case):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return _timed(lambda h, w, t: loss(w, h, t))  # Liger takes the weight first


def _skip_liger(case: Case, device: torch.device) -> str | None:
    return gpu_library_skip("liger_kernel", device, "liger-kernel")


SUITE = Suite(
    name="linear_cross_entropy",
    description="LM-head cross-entropy (Qwen2.5-VL 3B/7B heads), fwd+bwd, time and peak memory vs dense",
    bound="compute",
    cases=cases,
    providers=(
        Provider("mmfast-triton", _build_mmfast("triton"), _skip_mmfast("triton")),
        Provider("mmfast-torch", _build_mmfast("torch"), _skip_mmfast("torch")),
        Provider("torch-eager", _build_eager, _skip_dense),
        Provider("torch-compile", _build_compile, _skip_compile),
        Provider("liger", _build_liger, _skip_liger),
    ),
    plot_x="tokens",
    plot_panels=("model",),
    speedups=(
        Speedup("mmfast-triton", ("torch-eager",), 1 / 1.1, "issue: fwd+bwd time no worse than 1.1x eager's"),
        Speedup("mmfast-triton", ("torch-eager",), 4.0, "issue: peak memory at least 4x lower than eager's "
                "from 4k tokens on", where={"tokens": (4096, 8192, 16384)}, metric="peak_mem_mb"),
    ),
)
