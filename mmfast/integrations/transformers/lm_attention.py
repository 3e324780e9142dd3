"""Run a Hugging Face language model's self-attention on the "mmfast" attention
implementation (see attention_interface.py), per instance and reversibly, without
changing any config object the user holds.

transformers picks each attention module's function, and the decoder the mask format it
builds, from ``config._attn_implementation``, read from the config object each module
holds. Models built from one config object share it, so setting the attribute would
switch every one of them, and would override an explicit ``attn_implementation="eager"``
for calls that need it. Instead, each module of the patched model holding the language
model's config gets a *view* of it (:func:`config_view`): an instance of a subclass of
the config's class sharing the config's ``__dict__``, so every attribute read or written
through either is the same, except ``_attn_implementation``, which the view answers per
call:

- inside a forward of the patched model that does not ask for attention weights:
  ``"mmfast"`` (the masks come flash-attention style and attention runs on mmfast);
- inside one that asks for them (``output_attentions`` as an argument, on the config, or
  an enclosing transformers call collecting attentions): the config's own value, so the
  call runs exactly as unpatched (eager returns the weights; mmfast computes none);
- outside any forward of the patched model: the config's own value (so transformers'
  config checks, e.g. setting ``output_attentions``, behave as on the user's object),
  except in the backward pass, where gradient checkpointing recomputes layers: there, the
  answer of the last patched forward that read it.

The decision is taken by the outermost patched call (the target model's forward and
``prepare_inputs_for_generation``, where generate builds static-cache masks, and each
decoder model's forward, i.e. the modules holding ``layers``) and kept in a ContextVar,
so it is per thread and per async context, and the mask and every layer of one forward
agree.
"""

from __future__ import annotations

import contextvars
import functools
import types

import torch

from mmfast.integrations.patching import PatchHandle
from mmfast.integrations.transformers._outputs import asked
from mmfast.integrations.transformers.attention_interface import NAME, register

WHAT = "mmfast attention implementation"
ORIGINAL = "original"

class _Mode:
    """A ContextVar, except while dynamo traces (it cannot trace ContextVar methods): then
    a plain global, as transformers' own CompileableContextVar does."""

    def __init__(self):
        self._var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmfast_lm_attention", default=None)
        self._traced: str | None = None

    def get(self) -> str | None:
        return self._traced if torch.compiler.is_compiling() else self._var.get()

    def set(self, value: str):
        if torch.compiler.is_compiling():
            self._traced = value
            return None
        return self._var.set(value)

    def reset(self, token) -> None:
        if token is None:
            self._traced = None
        else:
            self._var.reset(token)


# None outside a patched forward; NAME or ORIGINAL inside one.
_mode = _Mode()

_view_classes: dict[type, type] = {}


def _view_attn_implementation(self):
    mode = _mode.get()
    if mode is not None:
        object.__setattr__(self, "_mmfast_last", mode)
    elif torch._C._current_autograd_node() is not None:
        # Gradient checkpointing recomputes layers in the backward pass, outside the
        # forward's context: they must run as that forward did.
        mode = object.__getattribute__(self, "_mmfast_last")
    return NAME if mode == NAME else object.__getattribute__(self, "_mmfast_base")._attn_implementation


def _set_view_attn_implementation(self, value):
    # Written to the shared config, as transformers' own setter does (sub-configs included).
    object.__getattribute__(self, "_mmfast_base")._attn_implementation = value


def _reduce_view(self, protocol=None):
    # copy.deepcopy / pickle: a view of the (copied) config, sharing its copy's __dict__.
    return config_view, (object.__getattribute__(self, "_mmfast_base"),)


def _view_class(cls: type) -> type:
    view = _view_classes.get(cls)
    if view is None:
        namespace = {
            "__slots__": ("_mmfast_base", "_mmfast_last"),  # outside the shared __dict__
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_attn_implementation": property(_view_attn_implementation, _set_view_attn_implementation),
            "__reduce_ex__": _reduce_view,
            # `type(config)(...)` (transformers 5.17 builds a default config that way) is a
            # plain config: views are made only by config_view.
            "__new__": lambda view_cls, *args, **kwargs: cls(*args, **kwargs),
            "__eq__": lambda self, other: object.__getattribute__(self, "_mmfast_base") == other,
            "__hash__": cls.__hash__,
            "_mmfast_config_view": True,
        }
        # type.__new__, not cls's metaclass hooks: the view adds no dataclass fields.
        view = _view_classes[cls] = type.__new__(type(cls), cls.__name__, (cls,), namespace)
    return view


def config_view(config):
    """A view of ``config`` (see the module docstring); ``config`` itself is unchanged."""
    if getattr(type(config), "_mmfast_config_view", False):
        config = object.__getattribute__(config, "_mmfast_base")
    view = object.__new__(_view_class(type(config)))
    object.__setattr__(view, "_mmfast_base", config)
    object.__setattr__(view, "_mmfast_last", None)  # the mode of the last patched call that read it
    object.__setattr__(view, "__dict__", config.__dict__)
    return view


def is_decoder_self_attention(module) -> bool:
    """A transformers causal self-attention module that calls the AttentionInterface:
    an ``...Attention`` class with ``is_causal`` True, a ``layer_idx`` and a config."""
    config = getattr(module, "config", None)
    return (type(module).__name__.endswith("Attention") and getattr(module, "is_causal", False) is True
            and hasattr(module, "layer_idx") and hasattr(config, "_attn_implementation"))


_deciding: dict = {}


def _decide(cls: type, method: str):
    """``cls.method``, run with the attention implementation decided for the call (by the
    outermost patched call; nested ones keep its decision). One function per class and
    method, with its signature (generate() inspects prepare_inputs_for_generation's)."""
    key = (cls, method)
    if key not in _deciding:
        own = getattr(cls, method)

        @functools.wraps(own)
        def deciding(self, *args, **kwargs):
            if _mode.get() is not None:
                return own(self, *args, **kwargs)
            generation = getattr(getattr(self, "generation_config", None), "output_attentions", False)
            token = _mode.set(ORIGINAL if asked(self, kwargs, "attentions") or generation else NAME)
            try:
                return own(self, *args, **kwargs)
            finally:
                _mode.reset(token)

        _deciding[key] = deciding
    return _deciding[key]


def patch_decoder_attention(root, handle: PatchHandle, prefix: str = "", outer=None) -> None:
    """Run every decoder self-attention under ``root`` on "mmfast" (see the module
    docstring). ``outer``: the patched model, whose forward also decides (default ``root``);
    ``prefix``: the qualified name of ``root`` in it."""
    register()
    named = list(root.named_modules())
    attention = [(name, m) for name, m in named if is_decoder_self_attention(m)]
    if not attention:
        return
    configs = {id(m.config): m.config for _, m in attention}
    views = {key: config_view(config) for key, config in configs.items()}
    deciders = []
    for name, module in named:
        config = module.__dict__.get("config")
        if config is None or id(config) not in views:
            continue
        handle.set_attr(module, "config", views[id(config)])
        if hasattr(module, "layers"):
            deciders.append(module)
    for name, module in attention:
        handle.replaced.append((".".join(p for p in (prefix, name) if p) or type(module).__name__, WHAT))
    outer = root if outer is None else outer
    if not deciders:  # no decoder model under root: the attention modules decide
        deciders = [m for _, m in attention]
    for module in [outer, *deciders]:
        if "forward" not in module.__dict__:
            handle.set_attr(module, "forward", types.MethodType(_decide(type(module), "forward"), module))
    # generate() builds the masks of compileable (static) caches there, outside the forward.
    if hasattr(outer, "prepare_inputs_for_generation") and "prepare_inputs_for_generation" not in outer.__dict__:
        deciding = _decide(type(outer), "prepare_inputs_for_generation")
        handle.set_attr(outer, "prepare_inputs_for_generation", types.MethodType(deciding, outer))


def use_mmfast_attention(model) -> PatchHandle:
    """Run every decoder self-attention of a transformers model (Llama, Qwen2, Mistral,
    a VLM's language model, ...) on mmfast.ops.attention; returns a handle whose
    ``undo()`` restores the previous state exactly.

    Example::

        >>> handle = use_mmfast_attention(model)   # model.generate(...) now runs mmfast
        >>> handle.undo()                          # and now sdpa (or whatever it was) again
    """
    handle = PatchHandle(model, "mmfast-attention")
    try:
        patch_decoder_attention(model, handle)
    except BaseException:
        handle.undo()
        raise
    if not handle.replaced:
        raise TypeError(f"use_mmfast_attention: {type(model).__name__} has no transformers decoder self-attention "
                        "module (an ...Attention with is_causal=True, layer_idx and config)")
    return handle
