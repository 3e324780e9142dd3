"""Reading a diffusers pipeline directory without diffusers' loader: model_index.json, one
folder per component with its config and safetensors weights (single file or sharded
with an ``*.safetensors.index.json``). Never unpickles, never touches the network.

Every failure is a ValueError / FileNotFoundError that names the component and the file,
key or shape at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmfast.models.checkpoint_checks import (check_config_sizes, check_tensor_read, open_safetensors,
                                             read_json_object, shard_path)

# A transformers component saves model.safetensors, a diffusers one diffusion_pytorch_model.safetensors.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} is missing")
    return read_json_object(path, what)


def component_dir(root: Path, name: str, *, required: bool = True) -> Path | None:
    """The folder of component ``name``; a missing required one is an error naming it."""
    folder = root / name
    if folder.is_dir():
        return folder
    if required:
        raise FileNotFoundError(f"{name}: the pipeline directory {root} has no {name}/ folder "
                                f"(a diffusers pipeline saved with save_pretrained has one)")
    return None


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component (the shards, in index order, when sharded)."""
    # The variant goes before the last suffix, as save_pretrained names them:
    # model.fp16.safetensors, model.safetensors.index.fp16.json.
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    index_suffix = f".safetensors.index.{variant}.json" if variant else ".safetensors.index.json"
    for stem in WEIGHT_STEMS:
        single = folder / f"{stem}{suffix}"
        if single.is_file():
            return [single]
        index = folder / f"{stem}{index_suffix}"
        if index.is_file():
            weight_map = read_json(index, folder.name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{folder.name}: {index} has no weight_map")
            shards = [shard_path(folder, name, index) for name in dict.fromkeys(weight_map.values())]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"{folder.name}: shards listed in {index.name} are missing: {missing}")
            return shards
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    hint = (f"; found only pickle files {pickles}, which mmfast does not load: re-save with "
            "save_pretrained(..., safe_serialization=True)") if pickles else ""
    raise FileNotFoundError(f"{folder.name}: no safetensors weights in {folder} (looked for "
                            f"{' / '.join(s + suffix for s in WEIGHT_STEMS)} and their {index_suffix}){hint}")


def read_state_dict(folder: Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, variant):
        with open_safetensors(path) as f:
            state.update({name: check_tensor_read(path, f, name) for name in f.keys()})
    return state


def load_weights(module: nn.Module, folder: Path, variant: str | None = None) -> None:
    """Load the component's safetensors into ``module`` exactly: missing keys, unexpected
    keys and shape mismatches are errors that list them (a few of each). A tied parameter
    (T5's ``shared`` / ``encoder.embed_tokens``) is saved once and counts as present under
    any of its names. A module with an ``adapt_checkpoint(state) -> state`` method renames
    older checkpoints' keys first."""
    from mmfast.models.checkpoint import _aliases

    state = read_state_dict(folder, variant)
    if hasattr(module, "adapt_checkpoint"):
        state = module.adapt_checkpoint(state)
    expected = module.state_dict()
    aliases = _aliases(module)
    missing = [k for k in expected if not any(a in state for a in aliases[k])]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{folder.name}: the weights in {folder} do not fit its config; " + "; ".join(problems))
    for k, v in expected.items():  # no silent cast between floating and integer values
        if k in state and state[k].is_floating_point() != v.is_floating_point():
            raise ValueError(f"{folder.name}: tensor '{k}' in {folder} is stored as {state[k].dtype} but "
                             f"the module's is {v.dtype}: refusing to cast between floating and integer values")
    for k, group in aliases.items():  # a tied tensor stored under several names holds one value
        present = [a for a in group if a in state]
        if k == group[0] and len(present) > 1:
            for other in present[1:]:
                if not torch.equal(state[other], state[present[0]]):
                    raise ValueError(f"{folder.name}: tensors '{present[0]}' and '{other}' in {folder} differ, "
                                     "but the module ties them (one shared parameter)")
    module.load_state_dict(state, strict=False)  # complete up to tied aliases, checked above


# ---- which classes a directory holds ---------------------------------------------------------


def pipeline_class(index: dict) -> str | None:
    """The pipeline class model_index.json names (``_class_name``), if any."""
    name = index.get("_class_name")
    return name if isinstance(name, str) else None


def saved_as_none(index: dict, name: str) -> bool:
    """Whether model_index.json records component ``name`` as absent ([null, null]), as
    save_pretrained writes a component that was None."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is None


def declared_class(index: dict, name: str, config: dict) -> str:
    """The class a component declares: model_index.json's entry, else its config's."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return entry[1]
    declared = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if declared is None:
        raise ValueError(f"{name}: neither model_index.json nor its config says which class it is")
    return declared


def check_supported(name: str, declared: str, supported: tuple[str, ...], model: str) -> None:
    if declared not in supported:
        raise ValueError(f"{name}: unsupported architecture {declared!r} (mmfast's {model} "
                         f"takes {', '.join(supported)})")


def load_component(root: Path, index: dict, name: str, supported: tuple[str, ...], build, *, model: str,
                   variant: str | None = None, required: bool = True) -> nn.Module | None:
    """Component ``name``: its folder and config, its declared class checked against
    ``supported``, ``build(config dict)`` and the weights loaded exactly. An optional
    component is None when model_index.json records it as absent or, with no entry there,
    its folder is missing; a component that model_index.json lists must be there."""
    if not required and saved_as_none(index, name):
        return None
    listed = isinstance(index.get(name), (list, tuple))
    folder = component_dir(root, name, required=required or listed)
    if folder is None:
        return None
    config = read_json(folder / "config.json", name)
    check_config_sizes(config, folder / "config.json")
    check_supported(name, declared_class(index, name, config), supported, model)
    module = build(config)
    load_weights(module, folder, variant)
    return module


# ---- writing a pipeline directory ------------------------------------------------------------

# The weights file each library's from_pretrained looks for.
LIBRARY_WEIGHTS = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


def component_config(module: nn.Module, library: str, class_name: str) -> dict:
    """The config.json of a model component: a transformers config's dict, or a diffusers
    model's config with the ``_class_name`` / ``_diffusers_version`` entries diffusers writes
    (its private bookkeeping entries dropped)."""
    config = module.config
    if library == "transformers":
        out = config.to_dict()
        out["architectures"] = out.get("architectures") or [class_name]
        return out
    import diffusers

    out = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return {**out, "_class_name": class_name, "_diffusers_version": diffusers.__version__}


def save_pipeline(root, pipeline: str, models: dict, scheduler, tokenizers: dict, *, max_shard_size,
                  extra: dict | None = None) -> Path:
    """Write a diffusers pipeline directory that ``<pipeline>.from_pretrained`` and mmfast load:
    model_index.json, one folder per component with its config and safetensors (sharded by
    :func:`mmfast.models.checkpoint.save_pretrained` at ``max_shard_size``), the scheduler's
    config, the tokenizers given. ``models``: name -> (module or None, library, class name),
    a None module recorded as absent; ``tokenizers``: name -> tokenizer or None;
    ``extra``: further model_index.json entries (optional components, flags)."""
    import diffusers

    from mmfast.models.checkpoint import save_pretrained

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__, **(extra or {})}
    for name, (module, library, class_name) in models.items():
        if module is None:
            index[name] = [None, None]
            continue
        save_pretrained(module, root / name, component_config(module, library, class_name),
                        max_shard_size=max_shard_size, weights_name=LIBRARY_WEIGHTS[library])
        index[name] = [library, class_name]
    scheduler.save_config(str(root / "scheduler"))
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    for name, tokenizer in tokenizers.items():
        if tokenizer is None:
            index[name] = [None, None]
            continue
        tokenizer.save_pretrained(str(root / name))
        index[name] = ["transformers", type(tokenizer).__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root
