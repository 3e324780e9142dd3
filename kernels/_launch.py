"""Launch helpers shared by the kernel files: output allocation and device facts."""

import os

import torch

# Tests set MMFAST_POISON_OUTPUTS=1 so that every output a launcher allocates starts as
# NaN: an element the kernel forgets to write then fails the comparison. Read once, at
# import, to keep the check off the launch path.
POISON_OUTPUTS = os.environ.get("MMFAST_POISON_OUTPUTS", "0") not in ("", "0")


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor when outputs are poisoned for tests."""
    if POISON_OUTPUTS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_sm_count: dict[int, int] = {}

# Programs the interpreter should assume on a CPU: few, so that loops over rows run.
_CPU_PROGRAMS = 4


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); a small constant on CPU."""
    if device.type != "cuda":
        return _CPU_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


# Memory safety does not depend on the caller: a kernel that indexes a tensor as if its
# last dim (or all of it) were contiguous gets a tensor for which that is true. Both are
# no-ops (no copy) for tensors that already are; parameters and index tables are small.


def unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with a unit stride in its last dim (a copy only when it has not)."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` contiguous (a copy only when it is not), for tensors a kernel reads as flat
    arrays: 1-D parameters (weights, biases, embeddings), cu_seqlens, tables."""
    return None if t is None else t.contiguous()
