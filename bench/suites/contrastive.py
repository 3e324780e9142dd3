"""CLIP (softmax) and SigLIP (sigmoid) contrastive losses, forward+backward, bf16 on a GPU:
time and peak memory from B = 4k to 1M pairs at D = 512, 768, 1024.

Providers: ``mmfast-triton`` (fused tiled kernels), ``mmfast-torch`` (the chunked PyTorch
backend, also O(B) memory), ``torch-eager`` (the dense formula: B x B logits and
F.cross_entropy / F.logsigmoid), ``open_clip`` (its ClipLoss / SigLipLoss, read from its
loss.py when the package's own imports need torchvision), ``inf-cl`` (Inf-CL's tiled
softmax loss, CLIP only, when installed) and ``siglip-kernel`` (when installed; its API is
not wired yet, so it says so instead of running). A dense provider whose logits would not
fit in the free device memory is skipped with the estimate, never run into an OOM.

Each call computes the loss and torch.autograd.grad of it with respect to both feature
tensors and the scale (and the bias for SigLIP).

FLOP model: the dense algorithm's work, 2 B^2 D for the logits (forward) and 4 B^2 D for
the two feature gradients (backward): 6 B^2 D per fwd+bwd, the same for every provider
(elementwise work, O(B^2), is not counted). mmfast recomputes score tiles instead of
storing them: its kernels execute 4 B^2 D forward (row and column statistics) and
8 B^2 D backward (scores and gradient tile per direction), twice the model; so 50% of the
matmul peak on its executed FLOPs reads as 25% here.

Distributed scaling model (per rank, W ranks, global batch B, bf16 features): all_gather
moves 2 (W-1)/W B D elements forward, and computes 2 B^2 D / W per pass of the kernels;
the ring moves (W-1)/W B D features + O(B) statistics forward and the same plus B D
float32 text gradients backward, overlapped with compute: communication is hidden while
B D s / link_bandwidth < 4 B^2 D / (W peak), i.e. for B > s W peak / (4 link_bandwidth).

Issue targets (H100): at B = 65,536, D = 1024 bf16, fwd+bwd <= 0.5 x open_clip's time and
peak memory <= 1/20 of open_clip's; B = 1,048,576 at D = 768 runs on one 80 GB GPU; the
fused tile loop >= 50% of the measured bf16 matmul peak at B >= 32k.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Speedup, Suite, Target, backend_skip

GPU_BATCHES = (4096, 16384, 65536, 262144, 1048576)
GPU_DIMS = (512, 768, 1024)
GPU_QUICK_BATCHES, GPU_QUICK_DIMS = (16384, 65536), (1024,)
# Smoke shapes for the Triton interpreter, in fp16: it cannot run bf16 dots.
CPU_BATCHES, CPU_DIMS = (64, 200), (32,)
CPU_QUICK_BATCHES, CPU_QUICK_DIMS = (48,), (32,)

TORCH_MAX_BATCH = 65536
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 100.0, 10.0, -10.0
# Dense baselines keep about this many B x B float32-sized buffers alive at their peak
# (logits, softmax or sigmoid, their gradients, the transposed direction).
DENSE_BUFFERS = 6


@dataclass
class LossInputs:
    image: Tensor
    text: Tensor
    scale: Tensor
    bias: Tensor | None

    def leaves(self) -> list[Tensor]:
        return [t for t in (self.image, self.text, self.scale, self.bias) if t is not None]


def _make_inputs(params: dict, device: torch.device) -> LossInputs:
    b, d = params["batch"], params["dim"]
    dtype = getattr(torch, params["dtype"])

    def features():
        t = torch.randn(b, d, device=device, dtype=torch.float32)
        return torch.nn.functional.normalize(t, dim=-1).to(dtype).requires_grad_()

    sigmoid = params["loss"] == "siglip"
    return LossInputs(
        image=features(), text=features(),
        scale=torch.tensor(SIGLIP_SCALE if sigmoid else CLIP_SCALE, device=device, requires_grad=True),
        bias=torch.tensor(SIGLIP_BIAS, device=device, requires_grad=True) if sigmoid else None,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        dtype = torch.bfloat16
        batches, dims = (GPU_QUICK_BATCHES, GPU_QUICK_DIMS) if quick else (GPU_BATCHES, GPU_DIMS)
    else:
        dtype = torch.float16
        batches, dims = (CPU_QUICK_BATCHES, CPU_QUICK_DIMS) if quick else (CPU_BATCHES, CPU_DIMS)
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    out = []
    for loss in ("clip", "siglip"):
        for d in dims:
            for b in batches:
                params = {"loss": loss, "pass": "fwd+bwd", "batch": b, "dim": d,
                          "dtype": str(dtype).removeprefix("torch.")}
                out.append(Case(f"{loss}-{b}x{d}-{short}", params, partial(_make_inputs, params),
                                flops=6 * b * b * d))
    return out


# ---- implementations -------------------------------------------------------------


def _timed(forward):
    """Loss and its gradients w.r.t. every leaf (features, scale, bias), from ``forward``."""
    def run(i: LossInputs):
        loss = forward(i)
        return torch.autograd.grad(loss, i.leaves())
    return run


def _build_mmfast(backend: str):
    def build(case: Case):
        from mmfast.ops import clip_loss, siglip_loss

        if case.params["loss"] == "clip":
            return _timed(lambda i: clip_loss(i.image, i.text, i.scale, backend=backend))
        return _timed(lambda i: siglip_loss(i.image, i.text, i.scale, i.bias, backend=backend))
    return build


def _skip_mmfast(backend: str):
    def skip(case: Case, device: torch.device) -> str | None:
        if backend == "torch" and case.params["batch"] > TORCH_MAX_BATCH:
            return (f"the chunked torch backend loops over (B / 4096)^2 tiles in Python: "
                    f"skipped above B = {TORCH_MAX_BATCH} to keep the run short")
        return backend_skip("contrastive", backend, device, getattr(torch, case.params["dtype"]))
    return skip


def _dense_bytes(case: Case) -> int:
    return DENSE_BUFFERS * 4 * case.params["batch"] ** 2


def _skip_dense(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    need = _dense_bytes(case)
    if need > 0.9 * free:
        return (f"would run out of memory: ~{need / 2**30:.0f} GiB of B x B logits and gradients "
                f"at B = {case.params['batch']} ({free / 2**30:.0f} GiB free)")
    return None


def _build_eager(case: Case):
    from mmfast.ops.contrastive import clip_loss_reference, siglip_loss_reference

    if case.params["loss"] == "clip":
        return _timed(lambda i: clip_loss_reference(i.image, i.text, i.scale))
    return _timed(lambda i: siglip_loss_reference(i.image, i.text, i.scale, i.bias))


def open_clip_loss_module():
    """open_clip.loss, or its loss.py alone when the package's imports (torchvision) fail;
    None when open_clip is not installed."""
    try:
        import open_clip.loss as module
        return module
    except ImportError:
        pass
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = f"{list(spec.submodule_search_locations)[0]}/loss.py"
    file_spec = importlib.util.spec_from_file_location("_mmfast_bench_open_clip_loss", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def _build_open_clip(case: Case):
    module = open_clip_loss_module()
    if case.params["loss"] == "clip":
        loss = module.ClipLoss()
        return _timed(lambda i: loss(i.image, i.text, i.scale))
    loss = module.SigLipLoss()
    return _timed(lambda i: loss(i.image, i.text, i.scale, i.bias))


def _skip_open_clip(case: Case, device: torch.device) -> str | None:
    if importlib.util.find_spec("open_clip") is None:
        return "open_clip is not installed (pip install --no-deps open_clip_torch)"
    return _skip_dense(case, device)


def _build_inf_cl(case: Case):
    from inf_cl import cal_inf_loss

    # Inf-CL's loss is one direction (rows: images against texts); CLIP averages both.
    def forward(i: LossInputs):
        return (cal_inf_loss(i.image, i.text, scale=i.scale) + cal_inf_loss(i.text, i.image, scale=i.scale)) / 2

    return _timed(forward)


def _skip_inf_cl(case: Case, device: torch.device) -> str | None:
    if case.params["loss"] != "clip":
        return "Inf-CL has no sigmoid loss"
    if importlib.util.find_spec("inf_cl") is None:
        return "inf-cl is not installed"
    if device.type != "cuda":
        return "Inf-CL runs on CUDA only"
    return None


def _skip_siglip_kernel(case: Case, device: torch.device) -> str | None:
    if case.params["loss"] != "siglip":
        return "siglip-kernel has only the sigmoid loss"
    if importlib.util.find_spec("siglip_kernel") is None:
        return "siglip-kernel is not installed"
    return "siglip-kernel is installed but its API is not wired into this suite yet"


def _build_siglip_kernel(case: Case):  # never reached: the skip above always gives a reason
    raise NotImplementedError("siglip-kernel provider")


SUITE = Suite(
    name="contrastive",
    description="CLIP / SigLIP losses, fwd+bwd, time and peak memory vs dense baselines",
    bound="compute",
    cases=cases,
    providers=(
        Provider("mmfast-triton", _build_mmfast("triton"), _skip_mmfast("triton")),
        Provider("mmfast-torch", _build_mmfast("torch"), _skip_mmfast("torch")),
        Provider("torch-eager", _build_eager, _skip_dense),
        Provider("open_clip", _build_open_clip, _skip_open_clip),
        Provider("inf-cl", _build_inf_cl, _skip_inf_cl),
        Provider("siglip-kernel", _build_siglip_kernel, _skip_siglip_kernel),
    ),
    plot_x="batch",
    plot_panels=("loss", "dim"),
    targets=(
        Target("mmfast-triton", 0.25,
               "issue: fused tile loop >= 50% of measured bf16 matmul peak at B >= 32k (= 25% on the "
               "6 B^2 D model, as mmfast executes twice the model's FLOPs); also <= 1/20 of open_clip's "
               "peak memory at B=65536 D=1024 and B=1M at D=768 on one 80 GB GPU: see the mem column"),
    ),
    speedups=tuple(
        Speedup("mmfast-triton", ("open_clip",), 2.0,
                f"issue: {loss} fwd+bwd <= 0.5x open_clip's time at B=65536, D=1024, bf16",
                where={"loss": loss, "batch": 65536, "dim": 1024})
        for loss in ("clip", "siglip")
    ),
)
