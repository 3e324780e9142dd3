"""Compile, cache and load the CUDA C++ ops of csrc/ (the ``mmfast_cuda`` torch library).

Why ``torch.utils.cpp_extension.load`` (ninja) rather than NVRTC through cupy: the kernels
are bound as torch ops (``TORCH_LIBRARY``) that torch.compile traces through fake
implementations, that take workspace from torch's caching allocator and launch on torch's
current stream (so CUDA graphs capture them). That needs a C++ library linked against
libtorch, which NVRTC does not make: with NVRTC, Python would launch every kernel through
cupy, with a Python hop per launch and its own view of streams and memory. ninja builds
the translation units in parallel and rebuilds only what changed. The price is nvcc and
a host compiler on the machine; without them (or ninja) the CUDA path reports itself
unavailable and the Triton backends run.

A cold build stays well under a minute because translation units are small: a .cu file
includes only CUDA headers, a binding (``*_ops.cpp``) only torch's core headers (no
torch/extension.h, no pybind11).

Cache: one directory per library, ``<cache>/<key>``, the key hashing the sources, the
architecture list and the torch and CUDA versions; its ``manifest.json`` says what it was
built for. The cache root is ``MMFAST_CUDA_CACHE``, else ``$TORCH_EXTENSIONS_DIR/mmfast``,
else ``~/.cache/mmfast/csrc``.

Architectures: the device's own (``9.0a`` on Hopper: sm_90a, which allows wgmma and TMA
and runs on compute capability 9.0 only), unless ``MMFAST_CUDA_ARCHS`` lists them
(``"8.0;9.0a;10.0+PTX"``). Ahead of time, for wheels and images::

    MMFAST_CUDA_ARCHS="8.0;9.0a" python -m mmfast.cuda.build [--out csrc/prebuilt]

builds one library for every listed architecture into the cache and, with ``--out``,
copies it there too. Libraries under ``csrc/prebuilt/`` of the installed package are
found like cached ones (same sources, torch and CUDA, code for the device), so a wheel
built after that command ships one.

``MMFAST_CUDA=0`` turns the CUDA path off; ``MMFAST_CUDA_VERBOSE=1`` shows compiler output.
Nothing here runs at ``import mmfast``: the first call of a ``cuda`` backend loads (and if
needed builds) the library; a failure is logged once and the Triton backends take over.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger("mmfast.cuda")

LIBRARY = "mmfast_cuda"
# The library's translation units: per op family, a kernel file and its torch binding.
# A kernel file not listed (not bound yet) would be compiled only by the CI check.
SOURCES = ("norm.cu", "norm_ops.cpp", "group_norm_silu.cu", "group_norm_silu_ops.cpp",
           "scheduler_step.cu", "scheduler_step_ops.cpp", "attention_short.cu", "attention_short_ops.cpp")
HEADERS = ("common.cuh", "norm.h", "group_norm_silu.h", "scheduler_step.h", "attention_short.h", "torch_utils.h")
# Launcher modules whose register_fakes() runs once the library is loaded.
OP_MODULES = ("mmfast.cuda.norm", "mmfast.cuda.group_norm", "mmfast.cuda.scheduler_step", "mmfast.cuda.attention")
CUDA_FLAGS = ("-O3", "-lineinfo")  # line info: compute-sanitizer and profilers name source lines
CXX_FLAGS = ("-O3",)
MIN_CAPABILITY = (8, 0)

_ARCH = re.compile(r"(\d+)\.(\d+)(a?)(\+PTX)?")


# ---- architectures -------------------------------------------------------------------


def parse_archs(text: str) -> list[str]:
    """``"8.0;9.0a 10.0+PTX"`` -> ``["8.0", "9.0a", "10.0+PTX"]`` (``;``, ``,`` or spaces)."""
    archs = [a for a in re.split(r"[;,\s]+", text.strip()) if a]
    if not archs:
        raise ValueError("MMFAST_CUDA_ARCHS: expected a list such as '8.0;9.0a', got nothing")
    bad = [a for a in archs if not _ARCH.fullmatch(a)]
    if bad:
        raise ValueError(f"MMFAST_CUDA_ARCHS: expected entries such as 8.0, 9.0a or 10.0+PTX, got {bad}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc flags: machine code for each architecture, plus PTX where ``+PTX`` asks for it."""
    flags = []
    for arch in archs:
        major, minor, specific, ptx = _ARCH.fullmatch(arch).groups()
        target = f"{major}{minor}{specific}"
        flags.append(f"-gencode=arch=compute_{target},code=sm_{target}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{target},code=compute_{target}")
    return flags


def device_arch(capability: tuple[int, int]) -> str:
    """The architecture a build for this device alone targets."""
    # sm_90a: Hopper's arch-specific features (wgmma, TMA, setmaxnreg); runs on 9.0 only.
    return "%d.%da" % capability if capability == (9, 0) else "%d.%d" % capability


def runs_on(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether a library built for ``archs`` has code a device of ``capability`` can run."""
    for arch in archs:
        major, minor, specific, ptx = _ARCH.fullmatch(arch).groups()
        built = (int(major), int(minor))
        if specific:  # arch-specific code (sm_90a) runs on exactly that architecture
            if built == capability:
                return True
        elif built[0] == capability[0] and built[1] <= capability[1]:
            return True  # machine code runs on later minor versions of the same major
        elif ptx and built <= capability:
            return True  # PTX is compiled for the device by the driver
    return False


def _archs_for(capability: tuple[int, int]) -> list[str]:
    listed = os.environ.get("MMFAST_CUDA_ARCHS", "").strip()
    return parse_archs(listed) if listed else [device_arch(capability)]


# ---- sources, keys, cache ------------------------------------------------------------


def source_dir() -> Path:
    import mmfast.csrc  # the csrc/ directory, shipped as a package of data files

    return Path(mmfast.csrc.__file__).parent


_source_hash: str | None = None


def source_hash() -> str:
    """Hash of every file the library is built from (cached: sources do not change at run time)."""
    global _source_hash
    if _source_hash is None:
        digest = hashlib.sha256()
        for name in sorted(SOURCES + HEADERS):
            digest.update(name.encode() + b"\0" + (source_dir() / name).read_bytes() + b"\0")
        _source_hash = digest.hexdigest()[:16]
    return _source_hash


def build_key(archs: list[str]) -> str:
    parts = [source_hash(), ";".join(archs), torch.__version__, str(torch.version.cuda),
             " ".join(CUDA_FLAGS + CXX_FLAGS)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_root() -> Path:
    if os.environ.get("MMFAST_CUDA_CACHE"):
        return Path(os.environ["MMFAST_CUDA_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "mmfast"
    return Path.home() / ".cache" / "mmfast" / "csrc"


def _search_roots() -> list[Path]:
    return [source_dir() / "prebuilt", cache_root()]


def find_library(capability: tuple[int, int]) -> Path | None:
    """A built library for these sources, this torch and CUDA, with code for ``capability``."""
    for root in _search_roots():
        for manifest_path in sorted(root.glob("*/manifest.json")) if root.is_dir() else ():
            try:
                manifest = json.loads(manifest_path.read_text())
                library = manifest_path.parent / manifest["library"]
                matches = (
                    manifest["sources"] == source_hash()
                    and manifest["torch"] == torch.__version__
                    and manifest["cuda"] == torch.version.cuda
                    and runs_on(manifest["archs"], capability)
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a half-written or foreign directory: not ours to use
            if matches and library.is_file():
                return library
    return None


def toolchain_reason() -> str | None:
    """Why a build cannot start here (no nvcc, ninja or host compiler), or None."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    if not is_ninja_available():
        return "ninja not found (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no host C++ compiler (set CXX)"
    return None


def build(archs: list[str], root: Path, *, verbose: bool = False) -> Path:
    """Compile the library for ``archs`` into ``root/<key>`` and return its path.

    The library is also loaded into this process (cpp_extension does that). Raises what
    the compiler raised when the build fails.
    """
    from torch.utils.cpp_extension import load

    key = build_key(archs)
    directory = root / key
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{LIBRARY}_{key}"
    src = source_dir()
    load(
        name=name,
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(CUDA_FLAGS) + gencode_flags(archs),
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        with_cuda=True,
        is_python_module=False,
        verbose=verbose,
    )
    library = directory / f"{name}.so"
    manifest = {"library": library.name, "sources": source_hash(), "archs": archs,
                "torch": torch.__version__, "cuda": torch.version.cuda}
    # Written last, atomically: a manifest means a complete library.
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(directory / "manifest.json")
    return library


# ---- loading, once per process ----------------------------------------------------------

_lock = threading.Lock()
_loaded: Path | None = None
_failure: str | None = None
_probed: dict[int, str | None] = {}


def _probe(index: int) -> str | None:
    if os.environ.get("MMFAST_CUDA", "").strip() == "0":
        return "turned off by MMFAST_CUDA=0"
    if torch.version.cuda is None:
        return "torch is a CPU build" if getattr(torch.version, "hip", None) is None else "torch is a ROCm build"
    if not torch.cuda.is_available():
        return "no CUDA device"
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return "needs compute capability >= %d.%d, device has %d.%d" % (MIN_CAPABILITY + capability)
    try:
        archs = _archs_for(capability)
    except ValueError as error:
        return str(error)
    if not runs_on(archs, capability):
        return f"MMFAST_CUDA_ARCHS={';'.join(archs)} has no code for compute capability %d.%d" % capability
    if find_library(capability) is not None:
        return None  # built earlier or shipped: no compiler needed
    return toolchain_reason()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA path cannot run on ``device``, without compiling anything; None if it can.

    A build that failed earlier in this process is a reason too. Probing (which reads the
    cache directory) happens once per device; under torch.compile an unprobed device is
    reported as such rather than probed inside the trace.
    """
    if _failure is not None:
        return _failure
    if device.type != "cuda":
        return f"device {device.type} (the CUDA path runs on cuda devices only)"
    index = _index(device)
    if index not in _probed:
        if torch.compiler.is_compiling():
            return "not probed yet on this device: run one call eagerly before torch.compile"
        _probed[index] = _probe(index)
    return _probed[index]


def load(device: torch.device) -> bool:
    """Load the library (building it first if needed); False, with one warning, if impossible."""
    global _loaded, _failure
    if _loaded is not None or _failure is not None:
        return _loaded is not None
    with _lock:
        if _loaded is not None or _failure is not None:
            return _loaded is not None
        reason = unavailable_reason(device)
        if reason is None:
            try:
                capability = torch.cuda.get_device_capability(_index(device))
                library = find_library(capability)
                if library is None:
                    verbose = os.environ.get("MMFAST_CUDA_VERBOSE", "0") not in ("", "0")
                    logger.info("mmfast: building the CUDA C++ ops (once, cached in %s)", cache_root())
                    library = build(_archs_for(capability), cache_root(), verbose=verbose)
                torch.ops.load_library(str(library))
                for module in OP_MODULES:
                    importlib.import_module(module).register_fakes()
                _loaded = library
                return True
            except Exception as error:  # noqa: BLE001 (any failure means: use Triton)
                logger.debug("mmfast: CUDA C++ build or load failed", exc_info=True)
                first_line = (str(error).strip().splitlines() or [""])[0][:300]
                reason = f"build or load failed: {type(error).__name__}: {first_line}"
        _failure = reason
        logger.warning("mmfast: CUDA C++ path unavailable (%s); the Triton backends run instead", reason)
        return False


def status(device: torch.device | None = None) -> dict:
    """What ``mmfast info`` reports: whether the CUDA path can run here, and why not."""
    if device is None and not torch.cuda.is_available():
        reason = _failure or _probe(0)  # says why: CPU build of torch, no device, turned off
        return {"available": False, "why": reason, "cache": str(cache_root())}
    device = device if device is not None else torch.device("cuda")
    reason = unavailable_reason(device)
    if _loaded is not None:
        state = f"loaded from {_loaded}"
    elif reason is not None:
        state = None
    elif find_library(torch.cuda.get_device_capability(_index(device))) is not None:
        state = "built; loads on first use"
    else:
        state = f"builds on first use (under a minute), cached in {cache_root()}"
    return {"available": reason is None, "why": reason or state, "cache": str(cache_root())}


# ---- ahead of time ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmfast.cuda.build",
        description="Build the CUDA C++ ops ahead of time for the architectures in MMFAST_CUDA_ARCHS.",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="also copy the library and its manifest here, e.g. csrc/prebuilt to ship it in a wheel")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    try:
        archs = parse_archs(os.environ.get("MMFAST_CUDA_ARCHS", ""))
    except ValueError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    problem = toolchain_reason()
    if problem is not None:
        print(f"{parser.prog}: cannot build: {problem}", file=sys.stderr)
        return 2
    library = build(archs, cache_root(), verbose=args.verbose)
    if args.out is not None:  # only the library and its manifest: not the build's objects
        target = args.out / library.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library.parent / "manifest.json", target / "manifest.json")
        library = Path(shutil.copy2(library, target / library.name))
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
