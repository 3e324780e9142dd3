"""The ``mmfast`` command: ``mmfast info``, ``mmfast bench`` and ``mmfast profile``.

``info`` reports what this machine has (versions, device, whether Triton runs) and which
backend of each op family can run here and, if not, why. ``bench`` hands its arguments
to the benchmark suites (``mmfast.bench.main``), ``profile`` to ``mmfast.profile.main``.

Heavy modules (torch, mmfast's ops) are imported inside the commands, and ``import
mmfast`` itself is lazy, so ``mmfast --help`` and ``--version`` never load torch (the
version comes from mmfast/_version.py); optional libraries are only looked up, never imported.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

from mmfast._version import __version__

# Optional libraries that mmfast benchmarks against or integrates with:
# (import name, distribution name).
OPTIONAL_LIBRARIES = (
    ("flash_attn", "flash-attn"),
    ("xformers", "xformers"),
    ("liger_kernel", "liger-kernel"),
    ("transformers", "transformers"),
    ("diffusers", "diffusers"),
)

# Triton ships under other distribution names in some torch builds (nightly, ROCm).
TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm")


# ---- facts about the machine -----------------------------------------------------


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _library(module: str, distribution: str) -> dict:
    """Whether ``module`` is importable and its version, without importing it."""
    present = importlib.util.find_spec(module) is not None
    version = _distribution_version(distribution, module) if present else None
    return {"present": present, "version": version}


def _cudnn_version(torch) -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    raw = torch.backends.cudnn.version()
    # cuDNN 9 encodes major*10000 + minor*100 + patch; earlier releases major*1000 + ...
    major, rest = divmod(raw, 10000 if raw >= 90000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _versions(torch) -> dict:
    import mmfast

    return {
        "mmfast": {"version": mmfast.__version__, "location": os.path.dirname(mmfast.__file__)},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "cudnn": _cudnn_version(torch),
        "triton": _distribution_version(*TRITON_DISTRIBUTIONS),
        "optional": {module: _library(module, dist) for module, dist in OPTIONAL_LIBRARIES},
    }


def _devices(torch) -> list[dict]:
    """The CUDA devices torch can see (empty on a CPU-only machine)."""
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({
            "index": index,
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        })
    return devices


def _triton_mode(has_cuda: bool) -> dict:
    """How Triton kernels run here: compiled for the GPU, interpreted, or not at all."""
    from mmfast.dispatch import module_available, triton_interpreted

    if not module_available("triton"):
        return {"runs": False, "mode": None, "why": "module 'triton' is not installed"}
    if triton_interpreted():
        return {"runs": True, "mode": "interpreter", "why": "TRITON_INTERPRET=1 is set; slow, meant for tests"}
    if has_cuda:
        return {"runs": True, "mode": "compiled", "why": "CUDA device present"}
    return {
        "runs": False,
        "mode": None,
        "why": "no CUDA device; set TRITON_INTERPRET=1 to run kernels under the interpreter",
    }


def _cuda_path() -> dict:
    """Whether the CUDA C++ kernels (csrc/) can run here; reads the cache, compiles nothing."""
    from mmfast.cuda import build

    return build.status()


# ---- which backends can run here ---------------------------------------------------


def _backend_status(backend, call) -> dict:
    """Whether ``backend`` can take a representative call here, and why not.

    The probe call carries no head dim and no op-specific facts (hidden size, segment
    lengths, ...): a ``check`` that needs a fact raises KeyError, which means the backend
    is usable here and its remaining limits depend on each call.
    """
    per_call = ["head dim"] if backend.head_dims is not None else []
    try:
        reasons = backend.reasons(call)
    except KeyError as missing:
        reasons = []
        per_call.append(repr(missing.args[0]))
    except Exception as error:  # a failing probe is a fact worth reporting, not a crash
        reasons = [f"probe failed: {type(error).__name__}: {error}"]
    note = f"further limits depend on each call ({', '.join(per_call)})" if per_call and not reasons else None
    if backend.measured and not reasons:
        measured = "taken by default only where mmfast.tuning measured it faster on this device"
        note = f"{note}; {measured}" if note else measured
    return {"name": backend.name, "usable": not reasons, "reasons": reasons, "note": note}


def _op_families(torch, has_cuda: bool) -> dict:
    import mmfast.ops  # noqa: F401  (registers the op families)
    from mmfast.dispatch import ENV_VAR, Call, env_override_error, op_families

    device = torch.device("cuda" if has_cuda else "cpu")
    dtype = torch.bfloat16 if has_cuda else torch.float32
    call = Call(device=device, dtype=dtype)
    return {
        "probe": {"device": device.type, "dtype": str(dtype).removeprefix("torch.")},
        "override": os.environ.get(ENV_VAR) or None,
        "override_error": env_override_error(),
        "families": {
            name: [_backend_status(backend, call) for backend in family.backends.values()]
            for name, family in op_families().items()
        },
    }


def collect_info() -> dict:
    """Everything ``mmfast info`` reports, as plain data (the ``--json`` output)."""
    import torch

    devices = _devices(torch)
    has_cuda = bool(devices)
    return {
        "versions": _versions(torch),
        "devices": devices,
        "triton_runs": _triton_mode(has_cuda),
        "cuda_path": _cuda_path(),
        "ops": _op_families(torch, has_cuda),
    }


# ---- text output -----------------------------------------------------------------


def format_info(info: dict) -> str:
    v = info["versions"]
    lines = [
        f"mmfast        {v['mmfast']['version']} ({v['mmfast']['location']})",
        f"python        {v['python']} on {v['platform']}",
        f"torch         {v['torch']}",
        f"  CUDA        {v['torch_cuda'] or 'none (CPU build)'}",
    ]
    if v["torch_hip"]:
        lines.append(f"  HIP         {v['torch_hip']}")
    lines.append(f"  cuDNN       {v['cudnn'] or 'none'}")
    lines.append(f"triton        {v['triton'] or 'not installed'}")
    lines.append("optional libraries:")
    for module, lib in v["optional"].items():
        state = (lib["version"] or "present, version unknown") if lib["present"] else "not installed"
        lines.append(f"  {module:<14}{state}")

    lines.append("device:")
    if not info["devices"]:
        lines.append("  no CUDA device: CPU only")
    for d in info["devices"]:
        lines.append(
            f"  cuda:{d['index']}  {d['name']}, compute capability {d['capability']}, "
            f"{d['sm_count']} SMs, {d['memory_gib']} GiB"
        )

    t = info["triton_runs"]
    runs = f"yes, {t['mode']}" if t["runs"] else "no"
    lines.append(f"Triton runs here: {runs}: {t['why']}")
    c = info["cuda_path"]
    lines.append(f"CUDA C++ path (csrc): {'available' if c['available'] else 'unavailable'}: {c['why']}")

    ops = info["ops"]
    probe = ops["probe"]
    lines.append(
        f"backends per op family, in priority order (probed on {probe['device']}, {probe['dtype']}):"
    )
    if ops.get("override_error"):
        lines.append(f"  MMFAST_BACKEND is invalid, every call will fail: {ops['override_error']}")
    elif ops["override"]:
        lines.append(f"  MMFAST_BACKEND={ops['override']} overrides the order")
    width = 2 + max((len(b["name"]) for bs in ops["families"].values() for b in bs), default=8)
    for family, backends in ops["families"].items():
        lines.append(f"  {family}")
        for b in backends:
            if b["usable"]:
                state = "usable" + (f"; {b['note']}" if b["note"] else "")
            else:
                state = "not usable: " + "; ".join(b["reasons"])
            lines.append(f"    {b['name']:<{width}}{state}")
    return "\n".join(lines)


# ---- commands --------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _bench(bench_argv: list[str]) -> int:
    try:
        bench = importlib.import_module("mmfast.bench")
    except ModuleNotFoundError as error:
        if error.name != "mmfast.bench":
            raise  # a dependency of the suites is missing: let its own message show
        print("mmfast bench: the benchmark suites (mmfast.bench) are not installed", file=sys.stderr)
        return 2
    if not hasattr(bench, "main"):
        print("mmfast bench: mmfast.bench has no main() entry point", file=sys.stderr)
        return 2
    return bench.main(bench_argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfast", description="Fused kernels for multimodal models.")
    parser.add_argument("--version", action="version", version=f"mmfast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="versions, device, and the backends usable here")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    # Everything after `bench` belongs to the suites, `--help` included (see _bench).
    commands.add_parser("bench", add_help=False, help="run benchmark suites (see: mmfast bench --help)")
    commands.add_parser("profile", add_help=False, help="a whole model, mmfast vs transformers/diffusers "
                        "(see: mmfast profile --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The suites parse their own flags; argparse would reorder them, so they are passed on
    # verbatim. The only top-level options (--help, --version) exit before any command.
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "profile":
        return importlib.import_module("mmfast.profile").main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _info(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
