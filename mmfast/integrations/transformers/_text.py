"""The text towers of transformers' CLIP and SigLIP (CLIPTextModel, SiglipTextModel, also as
``text_model`` of CLIPTextModelWithProjection, CLIPModel and SiglipModel): the tower's
forward becomes :class:`mmfast.nn.text.TextTransformer`'s, run on the tower's own
parameters.

The mmfast tower is built on the meta device and holds no weights of its own: at every
call it is given the Hugging Face tower's current Parameter objects (the names are the
same), so the state_dict is untouched, gradients land on the Hugging Face parameters, and
whatever replaces those parameters (``load_state_dict(assign=True)``, ``to_empty()``, a
device or dtype move that swaps the objects) reaches it. It lives in the tower's
``__dict__``, not registered as a submodule, so that ``copy.deepcopy`` copies it along
with the tower. Its inner modules keep their own forwards.

In training mode the attention probabilities are dropped (``attention_dropout``) inside
mmfast's kernels, with its own masks, not Hugging Face's. Calls it does not cover go to
the original forward: returned attention weights, and gradient checkpointing while
training.
"""

from __future__ import annotations

from mmfast.integrations.transformers._outputs import asked, collected
from mmfast.nn.text import TextTransformer

TEXT_TOWERS = ("CLIPTextModel", "SiglipTextModel")


def text_tower(target):
    """The text tower of ``target`` (itself, or its ``text_model``), or None."""
    if type(target).__name__ in TEXT_TOWERS:
        return target
    tower = getattr(target, "text_model", None)
    return tower if type(tower).__name__ in TEXT_TOWERS else None


_FAST = "_mmfast_text_tower"


def _bind_parameters(fast: TextTransformer, tower) -> None:
    """Make every parameter of ``fast`` the Parameter object of the same name in ``tower``
    now (a few dict look-ups per parameter; only replaced ones are set again)."""
    for owner, leaf, name in fast._mmfast_slots:
        current = tower.get_parameter(name)
        if owner._parameters[leaf] is not current:
            owner._parameters[leaf] = current


def _build_fast(tower) -> TextTransformer:
    fast = TextTransformer.from_config(tower.config, device="meta")
    fast._mmfast_slots = [(fast.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], name)
                          for name, _ in fast.named_parameters()]
    _bind_parameters(fast, tower)  # fails here, at patch time, if a name does not match
    return fast


def _needs_original(tower, kwargs) -> bool:
    # An enclosing forward collecting outputs does it with hooks on the tower's own layers.
    if asked(tower, kwargs, "attentions") or collected():
        return True
    if _selects_states_its_own_way(kwargs.get("output_hidden_states", getattr(tower.config, "output_hidden_states", False))):
        return True
    return tower.training and getattr(tower, "gradient_checkpointing", False)


def _selects_states_its_own_way(wanted) -> bool:
    """An index or indices in ``output_hidden_states``, with a transformers that predates
    ``selected_hidden_states`` (5.17 and earlier): those releases pick other states than
    the documented ones (e.g. none for ``[-2]``), so the call keeps their forward."""
    if wanted is None or isinstance(wanted, bool):
        return False
    from transformers.utils import output_capturing

    return not hasattr(output_capturing, "selected_hidden_states")


def _selected_states(states: tuple, wanted) -> tuple:
    """Hugging Face's ``output_hidden_states`` may be an index or indices: the others are None."""
    if isinstance(wanted, bool):
        return states
    picks = [wanted] if isinstance(wanted, int) else list(wanted)
    keep = {i % len(states) for i in picks if -len(states) <= i < len(states)}
    return tuple(s if i in keep else None for i, s in enumerate(states))


def patch_text_tower(tower, handle, name: str) -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    fast = _build_fast(tower)
    handle.set_attr(tower, _FAST, (fast,))  # in a tuple: a Module value would be registered as a submodule
    original = type(tower).forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if _needs_original(self, kwargs):
            return original(self, input_ids, attention_mask, position_ids, **kwargs)
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
        fast = self.__dict__[_FAST][0]
        _bind_parameters(fast, self)
        fast.train(self.training)  # attention dropout follows the tower's mode
        wanted = kwargs.get("output_hidden_states", getattr(self.config, "output_hidden_states", False))
        out = fast(input_ids, attention_mask, position_ids, output_hidden_states=wanted is not False and
                   wanted is not None)
        states = None if out.hidden_states is None else _selected_states(out.hidden_states, wanted)
        result = BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                            pooler_output=out.pooler_output, hidden_states=states)
        if kwargs.get("return_dict", getattr(self.config, "return_dict", True)) is False:
            return result.to_tuple()
        return result

    handle.set_forward(tower, forward, f"mmfast {fast.style} text tower", name)


def patch_text(target, handle) -> None:
    """Patch the text tower of ``target`` if it has one."""
    tower = text_tower(target)
    if tower is not None:
        patch_text_tower(tower, handle, "" if tower is target else "text_model")
