"""Whether a call asks for outputs that mmfast's fused paths do not compute (attention
weights, per-layer hidden states), so that the patched module runs its original forward.

transformers asks in three ways: a call argument (``output_attentions=True``), the
config (``config.output_attentions``, read when the argument is absent or None), and an
enclosing forward collecting them through hooks (transformers 5's output capturing,
whose flag never reaches the inner modules' arguments).
"""

from __future__ import annotations

import torch


def collected() -> frozenset[str]:
    """What an enclosing transformers forward is collecting ("attentions",
    "hidden_states", ...); empty where this transformers has no output capturing."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return frozenset()
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.get: transformers keeps a global then
        return frozenset(getattr(_active_collector, "global_var", None) or ())
    return frozenset(_active_collector.get() or ())


def asked(module, kwargs: dict, flag: str) -> bool:
    """``output_<flag>`` for this call: the argument, else ``module.config``'s value, or an
    enclosing forward collecting ``<flag>`` (attentions also as cross_attentions)."""
    wanted = kwargs.get(f"output_{flag}")
    if wanted is None:
        wanted = getattr(getattr(module, "config", None), f"output_{flag}", False)
    if wanted is not None and wanted is not False:
        return True
    keys = collected()
    return flag in keys or (flag == "attentions" and "cross_attentions" in keys)
