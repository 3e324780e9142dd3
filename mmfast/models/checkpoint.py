"""Hugging Face checkpoint directories (transformers and diffusers format) in and out.

A directory holds ``config.json`` and the weights as safetensors, in one file or sharded
with an index (``{"weight_map": {tensor name: shard file}}``)::

    model.safetensors                     | model.safetensors.index.json + model-0000i-of-0000n.safetensors
    diffusion_pytorch_model.safetensors   | diffusion_pytorch_model.safetensors.index.json + shards

Only safetensors are read: no pickle (``*.bin``/``*.pt`` files are refused with a message
saying so) and no network. Checkpoint names reach module names through a
:data:`NameRules` table: ``(regex, replacement)`` pairs applied in order with ``re.sub``
(identity when empty); a replacement of ``None`` drops the tensors whose name matches
(buffers a checkpoint carries but the module recomputes). Every problem is collected
before anything is raised: missing keys, unexpected keys and shape mismatches all appear
in one :class:`CheckpointError`.

Tied parameters (one tensor under two names, e.g. ``lm_head.weight`` and
``model.embed_tokens.weight``) are written once and count as present when any of their
names is in the checkpoint, as transformers does for ``tie_word_embeddings``; a file that
holds both names with different values is refused.

Damaged or hostile directories (unparsable JSON or safetensors, absurd size fields, shard
paths leaving the directory, integer values stored for floating tensors) are refused with
one ValueError naming the file: see :mod:`mmfast.models.checkpoint_checks`. Every header
is checked before a model is materialised, so a wrong size allocates nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from mmfast.models.checkpoint_checks import (check_config_sizes, check_dtype, check_tensor_read, open_safetensors,
                                             read_json_object, shard_path)

NameRules = Sequence[tuple[str, Optional[str]]]

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_MAX_SHARD_SIZE = 5 * 1024 ** 3


class CheckpointError(ValueError):
    """A checkpoint that does not fit the module: names every missing, unexpected and
    mismatched tensor. The lists are on the exception for programmatic use."""

    def __init__(self, directory, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"checkpoint {directory} does not match the module:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for name, got, want in self.mismatched:
            lines.append(f"  shape mismatch for {name}: checkpoint {tuple(got)}, module {tuple(want)}")
        super().__init__("\n".join(lines))


# ---- reading ---------------------------------------------------------------------


def read_config(directory: Union[str, os.PathLike]) -> dict:
    """The parsed ``config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"directory: {directory} is not a directory")
    if not path.is_file():
        raise FileNotFoundError(f"directory: no {CONFIG_NAME} in {directory}")
    config = read_json_object(path)
    check_config_sizes(config, path)
    return config


def weight_files(directory: Union[str, os.PathLike]) -> dict[str, Path]:
    """Every tensor name in the directory's safetensors -> the file holding it."""
    directory = Path(directory)
    for name in WEIGHTS_NAMES:
        index = directory / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"directory: {index} has no 'weight_map' object")
            files = {shard: shard_path(directory, shard, index) for shard in set(weight_map.values())}
            absent = sorted(shard for shard, path in files.items() if not path.is_file())
            if absent:
                raise FileNotFoundError(f"directory: {index} names shards that are not there: {', '.join(absent)}")
            return {tensor: files[shard] for tensor, shard in weight_map.items()}
        single = directory / name
        if single.is_file():
            with open_safetensors(single) as f:
                return {tensor: single for tensor in f.keys()}
    pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES) if directory.is_dir() else []
    hint = (f"; it holds pickle weights ({', '.join(pickles)}), which mmfast does not load: "
            "convert them to safetensors first") if pickles else ""
    raise FileNotFoundError(f"directory: no safetensors weights ({' or '.join(WEIGHTS_NAMES)}, "
                            f"optionally sharded with an index) in {directory}{hint}")


def read_tensors(directory: Union[str, os.PathLike], names: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
    """The checkpoint's tensors (all, or ``names``), read on the CPU, shard by shard."""
    files = weight_files(directory)
    wanted = files.keys() if names is None else names
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, in_file in by_file.items():
        with open_safetensors(path) as f:
            for name in in_file:
                tensors[name] = check_tensor_read(path, f, name)
    return tensors


def map_name(name: str, rules: NameRules) -> Optional[str]:
    """A checkpoint name through the rules, in order; None when a rule drops it."""
    for pattern, replacement in rules:
        if replacement is None:
            if re.search(pattern, name):
                return None
        else:
            name = re.sub(pattern, replacement, name)
    return name


# ---- loading into a module -------------------------------------------------------


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    """state_dict name -> every state_dict name sharing its tensor (itself included)."""
    groups: dict[int, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)  # tying assigns one Parameter to two modules
    return {name: group for group in groups.values() for name in group}


def _plan(module: nn.Module, directory, rules: NameRules, strict: bool) -> dict[Path, list[tuple[str, str]]]:
    """Checkpoint file -> [(module name, checkpoint name)], from the headers only (works on
    a meta-device module: nothing is allocated). Raises :class:`CheckpointError` for
    missing / unexpected keys and shape mismatches, a ValueError naming the tensor for a
    dtype that cannot be cast (integer stored for a floating tensor, or the reverse) and
    for tied names the file holds with different values."""
    files = weight_files(directory)
    targets = module.state_dict(keep_vars=True)
    aliases = _aliases(module)
    source_of: dict[str, str] = {}  # module name -> checkpoint name
    unexpected = []
    for ckpt_name in files:
        name = map_name(ckpt_name, rules)
        if name is None:
            continue
        if name not in targets:
            unexpected.append(ckpt_name if name == ckpt_name else f"{ckpt_name} (as {name})")
        else:
            source_of[name] = ckpt_name
    missing = [name for name in targets if not any(alias in source_of for alias in aliases[name])]

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, ckpt_name in source_of.items():
        by_file.setdefault(files[ckpt_name], []).append((name, ckpt_name))
    mismatched = []
    for path, pairs in by_file.items():  # headers only: nothing is read yet
        with open_safetensors(path) as f:
            for name, ckpt_name in pairs:
                header = f.get_slice(ckpt_name)
                shape = header.get_shape()
                if tuple(shape) != tuple(targets[name].shape):
                    mismatched.append((name, shape, targets[name].shape))
                else:
                    check_dtype(path, ckpt_name, header.get_dtype(), targets[name])
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(directory, missing, unexpected, mismatched)
    _check_tied_sources(source_of, aliases, files)
    return by_file


def _check_tied_sources(source_of: dict[str, str], aliases: dict[str, list[str]], files) -> None:
    """A tied tensor (``lm_head.weight`` = ``model.embed_tokens.weight`` under
    ``tie_word_embeddings``) found under several names in the file must hold one value:
    loading would otherwise keep whichever came last."""
    seen: set[str] = set()
    for name in source_of:
        group = [alias for alias in aliases[name] if alias in source_of]
        if len(group) < 2 or group[0] in seen:
            continue
        seen.add(group[0])
        first, *others = [source_of[alias] for alias in group]
        reference = read_tensors_from(files, [first])[first]
        for other in others:
            value = read_tensors_from(files, [other])[other]
            if value.shape != reference.shape or not torch.equal(value.to(reference.dtype), reference):
                raise ValueError(
                    f"{files[other]}: tensor '{other}' differs from '{first}', but the module ties them "
                    "(tie_word_embeddings or a shared parameter): set tie_word_embeddings false in "
                    "config.json to keep both, or drop one from the checkpoint")


def read_tensors_from(files: Mapping[str, Path], names: Iterable[str]) -> dict[str, Tensor]:
    tensors = {}
    for name in names:
        with open_safetensors(files[name]) as f:
            tensors[name] = check_tensor_read(files[name], f, name)
    return tensors


def load_checkpoint(module: nn.Module, directory: Union[str, os.PathLike], rules: NameRules = (),
                    strict: bool = True) -> nn.Module:
    """Copy a checkpoint directory's tensors into ``module`` (cast to each parameter's
    dtype, on its device). ``rules`` map checkpoint names to module names (see the module
    docstring). ``strict``: raise :class:`CheckpointError` on missing or unexpected keys;
    shape mismatches, integer values stored for floating tensors (or the reverse) and
    tied names with different values always raise. Nothing is copied unless the whole
    checkpoint fits."""
    by_file = _plan(module, directory, rules, strict)
    targets = module.state_dict(keep_vars=True)
    with torch.no_grad():  # one tensor at a time: host memory holds one tensor beyond the module
        for path, pairs in by_file.items():
            with open_safetensors(path) as f:
                for name, ckpt_name in pairs:
                    targets[name].copy_(check_tensor_read(path, f, ckpt_name))
    return module


# ---- saving ----------------------------------------------------------------------


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: expected bytes or a string like '5GB', got {size!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    return int(number * scale[unit])


def _shards(tensors: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Tensors grouped in name order into shards of at most ``max_bytes`` (a tensor larger
    than that gets a shard of its own)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_pretrained(module: nn.Module, directory: Union[str, os.PathLike], config: Mapping,
                    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
                    weights_name: str = "model.safetensors",
                    rename: Optional[Callable[[str], str]] = None) -> Path:
    """Write ``config`` as config.json and the module's state_dict as safetensors: one
    ``weights_name`` file, or shards of at most ``max_shard_size`` bytes (int, or '2GB',
    '500MiB') with ``<weights_name>.index.json``, as Hugging Face lays them out. Tied
    tensors are written once (under their first name). ``rename`` maps module names to
    checkpoint names. Returns the directory."""
    from safetensors.torch import save_file

    if weights_name not in WEIGHTS_NAMES:
        raise ValueError(f"weights_name: expected one of {WEIGHTS_NAMES}, got {weights_name!r}")
    max_bytes = _parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"max_shard_size: must be positive, got {max_shard_size!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    aliases = _aliases(module)
    tensors = {}
    for name, t in module.state_dict().items():
        if aliases[name][0] == name:
            tensors[rename(name) if rename else name] = t.detach().contiguous().cpu()
    with open(directory / CONFIG_NAME, "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)

    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(tensors, str(directory / weights_name), metadata={"format": "pt"})
        return directory
    stem, suffix = weights_name.rsplit(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        shard_name = f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}"
        save_file(shard, str(directory / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(directory / f"{weights_name}.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return directory


# ---- architectures ---------------------------------------------------------------

_ARCHITECTURES: dict[str, Callable] = {}


def register_architecture(name: str):
    """Class decorator: ``from_pretrained`` builds this class for checkpoints whose
    config names ``name`` (transformers' ``architectures`` or diffusers' ``_class_name``)."""
    def decorate(cls):
        _ARCHITECTURES[name] = cls
        return cls
    return decorate


def architecture_of(config: Mapping, source: str = "config.json") -> str:
    names = list(config.get("architectures") or [])
    if config.get("_class_name"):
        names.append(config["_class_name"])
    for name in names:
        if name in _ARCHITECTURES:
            return name
    known = ", ".join(sorted(_ARCHITECTURES)) or "none registered"
    found = ", ".join(names) or "no 'architectures' or '_class_name' entry"
    raise ValueError(f"{source}: unknown architecture ({found}); mmfast.models knows: {known}")


def from_pretrained(directory: Union[str, os.PathLike], **kwargs) -> nn.Module:
    """Build the mmfast model a checkpoint directory's config names, with its weights: a
    diffusers pipeline directory by its model_index.json's ``_class_name``, a model by its
    config.json. ``kwargs`` go to the class's ``from_pretrained`` (e.g. ``dtype``, ``device``)."""
    index = Path(directory) / "model_index.json"
    if index.is_file():
        cls = _ARCHITECTURES[architecture_of(read_json_object(index), "model_index.json")]
    else:
        cls = _ARCHITECTURES[architecture_of(read_config(directory))]
    return cls.from_pretrained(directory, **kwargs)


def config_dtype(config: Mapping, *sections: str) -> torch.dtype:
    """The parameters' dtype a config.json names (``dtype``, else ``torch_dtype``, at the top
    level, else ``dtype`` in the given sub-configs such as ``text_config``), else float32."""
    name = config.get("dtype") or config.get("torch_dtype")
    for section in sections:
        name = name or (config.get(section) or {}).get("dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def load_pretrained(cls, directory: Union[str, os.PathLike], config: Mapping, dtype: torch.dtype,
                    device: Union[str, torch.device, None] = None, rules: NameRules = (),
                    prepare: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """``cls(config)`` holding the checkpoint's tensors, in eval mode: built on the meta
    device (no random init, no float32 host copy of a large model), cast to ``dtype``,
    ``prepare(model)`` still on meta (parts kept in another dtype), materialised on
    ``device`` (default CPU), ties re-applied (``to_empty`` gives every module its own
    tensor), then loaded strictly."""
    with torch.device("meta"):
        model = cls(config).to(dtype=dtype)
        if prepare is not None:
            prepare(model)
    model.tie_weights()
    _plan(model, directory, rules, strict=True)  # every header checked before any allocation
    model = model.to_empty(device=device or "cpu")
    model.tie_weights()
    load_checkpoint(model, directory, rules=rules)
    return model.eval()
