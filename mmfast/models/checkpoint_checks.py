"""Checks on checkpoint files before anything is built or read: one clear ValueError
naming the file (and the field or tensor) instead of a parser's or allocator's error.

- JSON files must parse and hold an object (config.json, indexes, model_index.json).
- Size fields of a config (``vocab_size``, ``*_size``, ``*_dim``, ``num_*``, ...) must be
  integers in [0, 2**24]: a typo such as ``vocab_size: 1e12`` would otherwise have the
  loader allocate terabytes before any check sees it.
- Shard names in a sharded index must stay inside the checkpoint directory (no absolute
  paths, no ``..``); a symlink inside it, as Hugging Face's cache uses, is fine.
- A safetensors file that does not parse (truncated, corrupted header) names the file.
- A tensor's stored dtype must be of the kind of the module's tensor (floating into
  floating, integer into integer): a relabelled header or an int64 parameter is an error
  naming the tensor, not a silent cast.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

from torch import Tensor

# Config keys that size a tensor or a loop; their values must be sane integers.
_SIZE_KEY = re.compile(r"(^|_)(size|dim|dims|layers|heads|channels)$|^num_|^vocab")
MAX_CONFIG_SIZE = 2 ** 24  # above every real vocabulary, width and depth


def read_json_object(path: Path, what: str | None = None) -> dict:
    """The JSON object in ``path``; a ValueError naming the file when it is not one."""
    label = what or str(path)
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as error:
        raise ValueError(f"{label}: {path} is not UTF-8 text ({error})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{label}: {path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{label}: {path} must hold a JSON object, got a JSON {type(value).__name__}")
    return value


def check_config_sizes(config: dict, path: Path | str, prefix: str = "") -> None:
    """Every size field (see the module docstring) of ``config`` and its sub-configs is an
    integer in [0, MAX_CONFIG_SIZE]; else a ValueError naming the file and the field."""
    for key, value in config.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict):
            check_config_sizes(value, path, f"{field}.")
            continue
        if not isinstance(key, str) or not _SIZE_KEY.search(key):
            continue
        for item in value if isinstance(value, list) else [value]:
            if item is None or isinstance(item, (bool, str, dict, list)):
                continue
            if isinstance(item, float) and not (math.isfinite(item) and item.is_integer()):
                raise ValueError(f"{path}: field '{field}' must be an integer, got {item!r}")
            if not 0 <= item <= MAX_CONFIG_SIZE:
                raise ValueError(f"{path}: field '{field}' must be an integer in [0, {MAX_CONFIG_SIZE}], got {item!r}")
            if isinstance(item, float):
                raise ValueError(f"{path}: field '{field}' must be an integer, got {item!r}")


def shard_path(directory: Path, shard: object, index: Path) -> Path:
    """``directory / shard`` for a shard name from ``index``, refused when the name leaves
    the directory (absolute, a drive, or ``..``). Symlinks inside it are followed as usual."""
    if not isinstance(shard, str) or not shard:
        raise ValueError(f"{index}: shard names must be non-empty strings, got {shard!r}")
    for pure in (PurePosixPath(shard), PureWindowsPath(shard)):
        if pure.is_absolute() or pure.drive or pure.root or ".." in pure.parts:
            raise ValueError(f"{index}: shard {shard!r} is outside the checkpoint directory {directory}")
    return directory / shard


@contextmanager
def open_safetensors(path: Path | str) -> Iterator:
    """``safetensors.safe_open`` with parse errors raised as a ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    with handle as f:
        yield f


def _is_float(dtype_name: str) -> bool:
    return dtype_name.startswith(("F", "BF"))  # F16, F32, F64, BF16, F8_*


def check_dtype(path: Path | str, ckpt_name: str, stored: str, target: Tensor) -> None:
    """The stored dtype (a safetensors name: F32, BF16, I64, ...) may be cast into ``target``:
    floating into floating, integer or bool into integer or bool."""
    if _is_float(stored) != target.is_floating_point():
        raise ValueError(f"{path}: tensor '{ckpt_name}' is stored as {stored} but the module's is "
                         f"{str(target.dtype).removeprefix('torch.')}: refusing to cast between "
                         "floating and integer values")


def check_tensor_read(path: Path | str, f, name: str):
    """``f.get_tensor(name)`` with a corrupt payload raised as a ValueError naming both."""
    from safetensors import SafetensorError

    try:
        return f.get_tensor(name)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise ValueError(f"{path}: tensor '{name}' cannot be read ({error})") from None

