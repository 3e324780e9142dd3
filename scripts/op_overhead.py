"""Per-call Python overhead of mmfast ops over the PyTorch calls they run, at tiny shapes.

Each case pairs an ``mmfast.ops`` call with the plain torch code its default backend
runs (the ``native``/``sdpa`` backends on a CPU; adaln's ``torch`` reference), so the
difference is the wrapper: argument checks, dispatch, the op layer. Rounds alternate the
two sides; a round times ``--calls`` calls of one side. The overhead reported is the
median over rounds of (mmfast - torch) per call. Times are the thread's CPU time by
default (less disturbed by other processes on a shared machine than wall time).

    python scripts/op_overhead.py [--rounds 41] [--calls 400] [--wall] [--profile CASE]

``mmfast`` is imported as installed: to measure a checkout, put its root first on PYTHONPATH.
TRITON_INTERPRET must be unset (the default CPU backends are what is measured).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import mmfast.ops as ops
from mmfast.ops.adaln import adaln_modulate_reference, gated_residual_reference


def cases() -> dict[str, tuple]:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64)
    w, b = torch.randn(64), torch.randn(64)
    gate, up = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    img, gw, gb = torch.randn(1, 32, 8, 8), torch.randn(32), torch.randn(32)
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)
    q, k, v = (torch.randn(1, 16, 4, 32) for _ in range(3))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=32 ** -0.5).transpose(1, 2)

    return {
        "rms_norm": (lambda: ops.rms_norm(x, w), lambda: F.rms_norm(x, (64,), w, 1e-6)),
        "layer_norm": (lambda: ops.layer_norm(x, w, b), lambda: F.layer_norm(x, (64,), w, b, 1e-5)),
        "group_norm": (lambda: ops.group_norm(img, 8, gw, gb), lambda: F.group_norm(img, 8, gw, gb, 1e-5)),
        "gelu": (lambda: ops.gelu(x), lambda: F.gelu(x)),
        "swiglu": (lambda: ops.swiglu(gate, up), lambda: F.silu(gate) * up),
        "adaln_modulate": (lambda: ops.adaln_modulate(x, shift, scale),
                           lambda: adaln_modulate_reference(x, shift, scale, 1e-6)),
        "gated_residual": (lambda: ops.gated_residual(x, shift, gate),
                           lambda: gated_residual_reference(x, shift, gate)),
        "attention": (lambda: ops.attention(q, k, v), lambda: sdpa(q, k, v)),
    }


def time_calls(fn, calls: int, clock) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls / 1e3  # us per call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--wall", action="store_true", help="wall time instead of the thread's CPU time")
    parser.add_argument("--profile", metavar="CASE", help="cProfile the mmfast side of CASE instead")
    parser.add_argument("--only", nargs="*", help="cases to run")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: this measures the default CPU backends")
    torch.set_num_threads(1)
    table = cases()
    if args.profile:
        mm, _ = table[args.profile]
        profiler = cProfile.Profile()
        profiler.runcall(time_calls, mm, 20000, time.perf_counter_ns)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    clock = time.perf_counter_ns if args.wall else time.thread_time_ns
    names = args.only or list(table)
    print(f"torch {torch.__version__}, {args.rounds} rounds x {args.calls} calls, "
          f"{'wall' if args.wall else 'thread CPU'} time, us/call (median over rounds)")
    print(f"{'op':16} {'mmfast':>8} {'torch':>8} {'overhead':>9}")
    for name in names:
        mm, ref = table[name]
        for fn in (mm, ref):  # warm-up: first-call dispatch decisions, allocator
            time_calls(fn, 50, clock)
        mm_times, ref_times, diffs = [], [], []
        for _ in range(args.rounds):
            a = time_calls(mm, args.calls, clock)
            r = time_calls(ref, args.calls, clock)
            mm_times.append(a)
            ref_times.append(r)
            diffs.append(a - r)
        med = statistics.median
        print(f"{name:16} {med(mm_times):8.2f} {med(ref_times):8.2f} {med(diffs):9.2f}")


if __name__ == "__main__":
    main()
