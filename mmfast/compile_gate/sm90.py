"""Compile a recorded launch for an H100 (sm_90a) without a GPU, and read what the
compiler made of it: registers, spills, shared memory, occupancy, tensor-core instructions.

Triton's own launch path compiles here (``JITFunction.run(..., warmup=True)``: the same
specialisation, options and pipeline as a real launch), with the active driver replaced
by one that reports an sm_90 device; the wheel's bundled ptxas emits ``.target sm_90a``.
Registers and local memory (spills) come from the bundled ``cuobjdump -res-usage`` on the
cubin: a compiled-but-unloaded kernel has no ``n_regs`` / ``n_spills`` yet (the driver
fills them when it loads the binary). Spilled registers live in the thread's stack frame:
``STACK + LOCAL`` is the driver's local size per thread, what Triton reports as spills.
"""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import tempfile
import traceback
from dataclasses import dataclass

from triton.backends.compiler import GPUTarget

from .record import Launch

TARGET = GPUTarget("cuda", 90, 32)

# H100 SXM per-SM limits (CUDA occupancy calculator, compute capability 9.0).
_REGS_PER_SM = 65536
_SHARED_PER_SM = 233472          # 228 KiB
_SHARED_RESERVED_PER_CTA = 1024  # the driver's per-block reservation
_MAX_WARPS_PER_SM = 64
_MAX_CTAS_PER_SM = 32


class _Sm90Driver:
    """Stands in for the CUDA driver: a current device that is an sm_90 GPU."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (9, 0)


@contextlib.contextmanager
def sm90_driver():
    from triton.runtime.driver import driver

    saved = driver._active
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = saved


@dataclass
class Compiled:
    ok: bool
    error: str = ""
    regs: int = 0
    spill_bytes: int = 0    # stack frame + local memory per thread: where spills go
    shared: int = 0         # dynamic shared memory per CTA, bytes
    has_dot: bool = False   # the kernel's TTIR has a tt.dot
    wgmma: bool = False     # its PTX issues Hopper wgmma.mma_async
    mma_sync: bool = False  # its PTX issues Ampere-style mma.sync
    ctas_per_sm: int = 0
    occupancy: float = 0.0  # resident warps / 64
    seconds: float = 0.0


def _cuobjdump() -> str:
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.nvidia, "cuobjdump"):
        return knobs.nvidia.cuobjdump.path
    from triton.backends.nvidia.compiler import get_ptxas  # triton without knobs.cuobjdump
    import os

    return os.path.join(os.path.dirname(get_ptxas().path), "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the (single) function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage: no REG in its output:\n{text}")
    return {k: int(v) for k, v in usage.items()}


def occupancy(regs: int, shared: int, warps: int) -> tuple[int, float]:
    """(CTAs per SM, resident warps / 64) on an H100 from the kernel's resources."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (_REGS_PER_SM // regs_per_warp) // warps
    by_shared = _SHARED_PER_SM // (shared + _SHARED_RESERVED_PER_CTA)
    ctas = min(by_regs, by_shared, _MAX_WARPS_PER_SM // warps, _MAX_CTAS_PER_SM)
    return ctas, ctas * warps / _MAX_WARPS_PER_SM


def _mock_args(launch: Launch) -> list:
    from triton.runtime.jit import MockTensor

    out = []
    for a in launch.args:
        if hasattr(a, "offset_bytes"):
            mock = MockTensor(a.dtype)
            mock.data_ptr = a.data_ptr  # the recorded alignment, not MockTensor's optimism
            out.append(mock)
        else:
            out.append(a)
    return out


def compile_launch(launch: Launch) -> Compiled:
    """Compile ``launch`` for sm_90a; a compile error is returned, not raised."""
    import time

    start = time.perf_counter()
    try:
        with sm90_driver():
            kernel = launch.kernel.run(*_mock_args(launch), grid=(1,), warmup=True,
                                       **launch.constexprs, **launch.options)
        usage = resource_usage(kernel.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding
        lines = traceback.format_exception_only(type(e), e)
        return Compiled(ok=False, error="".join(lines).strip()[-2000:], seconds=time.perf_counter() - start)
    shared = int(kernel.metadata.shared)
    warps = int(kernel.metadata.num_warps)
    ptx = kernel.asm["ptx"]
    ctas, occ = occupancy(usage["REG"], shared, warps)
    return Compiled(
        ok=True, regs=usage["REG"], spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0), shared=shared,
        has_dot=re.search(r"\btt\.dot\b", kernel.asm["ttir"]) is not None,
        wgmma="wgmma.mma_async" in ptx, mma_sync=re.search(r"\bmma\.sync\b", ptx) is not None,
        ctas_per_sm=ctas, occupancy=occ, seconds=time.perf_counter() - start,
    )
