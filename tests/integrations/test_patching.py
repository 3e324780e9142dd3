"""mmfast.patch machinery on a toy model family: per instance, reversible, state_dict kept."""

import pytest
import torch
from torch import nn

import mmfast
from mmfast import integrations
from mmfast.integrations import Family, Replacement


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.proj(x))


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _fast_block_forward(self, x):
    # Same math, another route: what a fused replacement looks like to the patcher.
    return torch.clamp_min(x @ self.proj.weight.t() + self.proj.bias, 0.0)


def _patch_block(module, handle, name):
    handle.set_forward(module, _fast_block_forward, "clamp-relu", name)


FAMILY = Family("toy", model_classes=("ToyModel",),
                replacements=(Replacement(("ToyBlock",), _patch_block, "clamp-relu"),))


@pytest.fixture(autouse=True)
def _toy_family(monkeypatch):
    monkeypatch.setattr(integrations, "FAMILY_MODULES", {"toy": __name__})


def test_patch_replaces_per_instance_and_undo_restores():
    model, other = ToyModel(), ToyModel()
    x = torch.randn(3, 8)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    handle = mmfast.patch(model)
    assert [name for name, _ in handle.replaced] == ["blocks.0", "blocks.1"]
    assert "forward" in model.blocks[0].__dict__ and "forward" not in other.blocks[0].__dict__
    torch.testing.assert_close(model(x), before)
    assert model.state_dict().keys() == state.keys()

    handle.undo()
    assert "forward" not in model.blocks[0].__dict__
    assert not hasattr(model, "_mmfast_patch_handle")
    assert torch.equal(model(x), before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    handle.undo()  # a second undo does nothing


def test_patch_twice_raises_and_context_manager_undoes():
    model = ToyModel()
    with mmfast.patch(model) as handle:
        with pytest.raises(ValueError, match="already patched"):
            mmfast.patch(model)
    assert not handle.active and "forward" not in model.blocks[0].__dict__
    mmfast.patch(model).undo()  # patchable again after undo


def test_unknown_model_lists_supported_families():
    with pytest.raises(TypeError, match=r"type Linear\. Supported: toy: ToyModel"):
        mmfast.patch(nn.Linear(2, 2))


def test_failed_patch_leaves_model_untouched(monkeypatch):
    def explode(module, handle, name):
        if name == "blocks.1":
            raise RuntimeError("boom")
        _patch_block(module, handle, name)

    family = Family("toy", ("ToyModel",), (Replacement(("ToyBlock",), explode),))
    monkeypatch.setattr(integrations, "families", lambda: [family])
    model = ToyModel()
    with pytest.raises(RuntimeError, match="boom"):
        mmfast.patch(model)
    assert "forward" not in model.blocks[0].__dict__
