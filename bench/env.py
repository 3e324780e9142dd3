"""Where a run happens: device, versions, commit, start time. Saved with every row."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

# When the device does not report its L2 size, assume this much (more than any current
# NVIDIA part except the largest, so rotation errs on the side of more copies).
FALLBACK_L2_BYTES = 64 << 20
# Without a GPU there is no L2 to defeat; a nominal size keeps the rotation code exercised.
CPU_L2_BYTES = 4 << 20


@dataclass(frozen=True)
class Env:
    device: torch.device
    gpu: str  # device name; runs are compared only against runs with the same name
    torch_version: str
    triton_version: str | None
    commit: str
    run_id: str  # ISO time the run started, shared by all its rows
    l2_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def repo_root() -> Path | None:
    """The checkout this package runs from, or None when installed from a wheel."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "mmfast").is_dir():
        return root
    return None


def git_commit() -> str:
    root = repo_root()
    if root is None:
        return "unknown"
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # Uncommitted changes make a row unreproducible from its commit alone: say so.
    return sha + ("-dirty" if dirty else "")


def _triton_version() -> str | None:
    # Read the metadata rather than importing triton (slow, and absent on some hosts).
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def detect_env(device: torch.device | None = None) -> Env:
    device = device or default_device()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        props = torch.cuda.get_device_properties(index)
        gpu = props.name
        l2 = int(getattr(props, "L2_cache_size", 0) or FALLBACK_L2_BYTES)
    else:
        gpu = f"cpu ({platform.machine()})"
        l2 = CPU_L2_BYTES
    return Env(
        device=device,
        gpu=gpu,
        torch_version=torch.__version__,
        triton_version=_triton_version(),
        commit=git_commit(),
        run_id=now_iso(),
        l2_bytes=l2,
    )
