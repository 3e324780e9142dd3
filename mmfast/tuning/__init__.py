"""Which backend measured fastest, per device: the tables dispatch consults.

Some backends (the CUDA C++ ones) are taken by default only where a benchmark run on the
same device found them faster; everywhere else the usual priority order stands (Triton
first). A table is a JSON file in this directory named after the device, e.g.
``nvidia-h100-80gb-hbm3.json`` for "NVIDIA H100 80GB HBM3"::

    {
      "device": "NVIDIA H100 80GB HBM3",
      "source": "bench/results/norm.jsonl, commit abc1234, torch 2.11, 2026-11-30",
      "wins": {
        "norm": [
          {"backend": "cuda", "dtypes": ["bfloat16", "float16"], "hidden": [1024, 8192]}
        ]
      }
    }

Each entry of ``wins[family]`` says: for calls of that op family whose dtype is listed
(any dtype when ``dtypes`` is absent) and whose every other named fact (``hidden``, ...)
lies in the closed range given, ``backend`` measured fastest. No table has been checked
in yet: nothing has been measured on a GPU.

``MMFAST_TUNING=/path/table.json`` replaces the checked-in table of the device it names
(``"device": "*"`` applies to every device): for trying a fresh measurement before
committing it. Tables are read once per process and device.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

ENV_VAR = "MMFAST_TUNING"
TABLE_DIR = Path(__file__).parent

_tables: dict[str, dict] = {}  # device name -> its table ({} when there is none)
_device_names: dict[int, str] = {}


def table_file(device_name: str) -> Path:
    """Where the checked-in table of ``device_name`` lives."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return TABLE_DIR / f"{slug}.json"


def _read(path: Path, what: str) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{what}: cannot read tuning table {path}: {error}") from error
    if not isinstance(table, dict) or not isinstance(table.get("wins", {}), dict):
        raise ValueError(f"{what}: {path} is not a tuning table (expected an object with a 'wins' object)")
    return table


def table_for(device_name: str) -> dict:
    """The table for ``device_name``: the MMFAST_TUNING file if it names this device (or
    ``*``), else the checked-in one, else ``{}``. Cached per device name."""
    if device_name not in _tables:
        table = {}
        override = os.environ.get(ENV_VAR)
        if override:
            candidate = _read(Path(override), ENV_VAR)
            if candidate.get("device") in (device_name, "*"):
                table = candidate
        if not table and table_file(device_name).is_file():
            table = _read(table_file(device_name), "mmfast/tuning")
        _tables[device_name] = table
    return _tables[device_name]


def _matches(entry: dict, dtype: torch.dtype, facts: dict) -> bool:
    dtypes = entry.get("dtypes")
    if dtypes is not None and str(dtype).removeprefix("torch.") not in dtypes:
        return False
    for name, bounds in entry.items():
        if name in ("backend", "dtypes"):
            continue
        value = facts.get(name)
        if value is None or not bounds[0] <= value <= bounds[1]:
            return False
    return True


def winner(device_name: str, family: str, dtype: torch.dtype, facts: dict) -> str | None:
    """The backend the table says measured fastest for such a call, or None."""
    for entry in table_for(device_name).get("wins", {}).get(family, ()):
        if _matches(entry, dtype, facts):
            return entry["backend"]
    return None


def device_name(device: torch.device) -> str | None:
    """The CUDA device's name (cached); None for other devices."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def not_measured_reason(family: str, backend: str, device: torch.device, dtype: torch.dtype,
                        facts: dict) -> str | None:
    """None when the table of ``device`` says ``backend`` wins such a call, else why not.

    Under torch.compile a device whose table has not been read yet counts as unmeasured
    (reading files inside a trace would break the graph): one eager call reads it.
    """
    if device.type != "cuda":
        return f"taken by default only where measured faster; nothing is measured on {device.type}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.compiler.is_compiling() and (index not in _device_names or _device_names[index] not in _tables):
        return "tuning table not read yet on this device (first call was under torch.compile)"
    name = device_name(device)
    found = winner(name, family, dtype, facts)
    if found == backend:
        return None
    where = "no tuning entry" if found is None else f"the tuning table picks {found}"
    return f"taken by default only where measured faster; {where} for this call on {name}"
