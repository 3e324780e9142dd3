"""Swapping a diffusers model's blocks for mmfast modules in place, weights and names kept
(what :func:`mmfast.nn.unet2d_condition_model` and :func:`mmfast.nn.sd3_transformer_model`
do to the models diffusers builds)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def swap_modules(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> list[str]:
    """Replace, in place, every submodule for which ``replacement`` returns a module
    (None: keep it), loading the old one's state_dict into the new one strictly and
    keeping its device, dtype and train/eval mode; returns the qualified names replaced."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            new = replacement(child)
            if new is None:
                continue
            new.load_state_dict(child.state_dict())
            reference = next(child.parameters())
            new.to(device=reference.device, dtype=reference.dtype)
            new.train(child.training)
            setattr(parent, child_name, new)
            replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return replaced
