"""mmfast.patch on a tiny SD3.5-style SD3Transformer2DModel (RMSNorm q/k norms, dual
attention in block 0; 32-wide heads, so Triton's attention takes the calls): the blocks,
SD35AdaLayerNormZeroX and the q/k norms are replaced, outputs match, undo is exact."""

import pytest

import mmfast

from tests.integrations.diffusers_models import HEAD_DIM
from tests.integrations.test_diffusers_families import _check_patch_and_undo
from tests.nn.test_sd35_blocks import _inputs, tiny_sd35

pytest.importorskip("diffusers")


def test_sd35_transformer_patched_and_undone(device):
    model = tiny_sd35(head_dim=HEAD_DIM).to(device)
    with mmfast.patch(model) as handle:
        replaced = dict(handle.replaced)
    assert replaced["transformer_blocks.0"].startswith("MM-DiT block")  # the dual-attention block
    assert replaced["transformer_blocks.0.norm1"] == "adaln_modulate x2"
    for name in ("transformer_blocks.0.attn2", "transformer_blocks.1.attn"):
        assert replaced[name].endswith("JointAttnProcessor"), replaced
    for name in ("transformer_blocks.0.attn2.norm_q", "transformer_blocks.1.attn.norm_added_k"):
        assert replaced[name] == "rms_norm", replaced
    _check_patch_and_undo(model, {k: v.to(device) for k, v in _inputs().items()}, "diffusers-sd3-transformer")
