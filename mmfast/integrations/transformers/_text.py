"""The text towers of transformers' CLIP and SigLIP (CLIPTextModel, SiglipTextModel, also as
``text_model`` of CLIPTextModelWithProjection, CLIPModel and SiglipModel): the tower's
forward becomes :class:`mmfast.nn.text.TextTransformer`'s, run on the tower's own
parameters.

The mmfast tower is built on the meta device and then given the Hugging Face tower's
Parameter objects (the names are the same), so it holds no weights of its own, the
state_dict is untouched, gradients land on the Hugging Face parameters, and ``.to()`` /
``load_state_dict`` on the model (which change parameters in place) reach it. It is not
registered as a submodule. Its inner modules keep their own forwards.

In training mode the attention probabilities are dropped (``attention_dropout``) inside
mmfast's kernels, with its own masks, not Hugging Face's. Calls it does not cover go to
the original forward: returned attention weights, and gradient checkpointing while
training.
"""

from __future__ import annotations

from mmfast.nn.text import TextTransformer

TEXT_TOWERS = ("CLIPTextModel", "SiglipTextModel")


def text_tower(target):
    """The text tower of ``target`` (itself, or its ``text_model``), or None."""
    if type(target).__name__ in TEXT_TOWERS:
        return target
    tower = getattr(target, "text_model", None)
    return tower if type(tower).__name__ in TEXT_TOWERS else None


def _share_parameters(fast: TextTransformer, tower) -> None:
    """Make every parameter of ``fast`` the Parameter object of the same name in ``tower``."""
    for name, _ in list(fast.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        setattr(fast.get_submodule(owner), leaf, tower.get_parameter(name))


def _needs_original(tower, kwargs) -> bool:
    config = tower.config
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        return True
    return tower.training and getattr(tower, "gradient_checkpointing", False)


def _selected_states(states: tuple, wanted) -> tuple:
    """Hugging Face's ``output_hidden_states`` may be an index or indices: the others are None."""
    if isinstance(wanted, bool):
        return states
    picks = [wanted] if isinstance(wanted, int) else list(wanted)
    keep = {i % len(states) for i in picks if -len(states) <= i < len(states)}
    return tuple(s if i in keep else None for i, s in enumerate(states))


def patch_text_tower(tower, handle, name: str) -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    fast = TextTransformer.from_config(tower.config, device="meta")
    _share_parameters(fast, tower)
    original = type(tower).forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if _needs_original(self, kwargs):
            return original(self, input_ids, attention_mask, position_ids, **kwargs)
        if input_ids is None:
            raise ValueError("You have to specify input_ids")
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
