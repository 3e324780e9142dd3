"""THE list of fuzz cases that fail on this branch because of issue 16 items 1-5, which
are fixed on branch ``memsafe``. Each such case runs as its own test marked
``xfail(strict=True)``: once the fix is merged the case passes, the test reports XPASS as
a failure, and the rule below must be deleted. Nothing else may be excused here.
"""

from __future__ import annotations

from tests.fuzz.harness import Case

# Triton launchers that ignore the strides of 1-D parameters (item 1).
_ITEM1_OPS = {"rms_norm", "layer_norm", "group_norm", "patch_embed", "patch_embed_patchified"}
# Backends whose kernels read cu_seqlens as contiguous and trust max_seqlen (items 2, 3).
_VARLEN_KERNELS = {("attention", "triton"), ("attention", "triton_short"), ("cross_attention", "triton")}


def known_item(case: Case) -> int | None:
    """The issue 16 item (1-5) that makes ``case`` fail on this branch, or None."""
    varlen_kernel = (case.name, case.backend) in _VARLEN_KERNELS
    if "param_strided" in case.features and case.backend == "triton" and case.name in _ITEM1_OPS:
        return 1
    if "cu_strided" in case.features and varlen_kernel:
        return 2
    if "max_seqlen_small" in case.features and varlen_kernel:
        return 3
    if "nan_isolation" in case.features and case.backend == "sdpa":
        return 5
    return None


def xfail_reason(item: int) -> str:
    return f"issue 16 item {item}, fixed on branch memsafe"
