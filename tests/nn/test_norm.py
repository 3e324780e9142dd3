"""Norm modules: state_dict compatible with torch.nn.LayerNorm and Hugging Face's
RMSNorm, and the same outputs."""

import pytest
import torch

import mmfast
from mmfast.testing import random_tensor


def test_layer_norm_loads_torch_weights(device):
    reference = torch.nn.LayerNorm(80, eps=1e-5, device=device)
    torch.nn.init.normal_(reference.weight, 1.0, 0.2)
    torch.nn.init.normal_(reference.bias, 0.0, 0.2)
    ours = mmfast.nn.LayerNorm(80, eps=1e-5, device=device)
    ours.load_state_dict(reference.state_dict())
    x = random_tensor((3, 11, 80), torch.float32, device)
    torch.testing.assert_close(ours(x), reference(x))

    y, h = ours(x, residual=x)
    torch.testing.assert_close(h, 2 * x)
    torch.testing.assert_close(y, reference(2 * x))


def test_layer_norm_without_affine_has_no_parameters():
    assert list(mmfast.nn.LayerNorm(16, elementwise_affine=False).state_dict()) == []
    assert list(mmfast.nn.LayerNorm(16, bias=False).state_dict()) == ["weight"]


def test_rms_norm_loads_hugging_face_weights(device):
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    reference = qwen2.Qwen2RMSNorm(80, eps=1e-6).to(device)
    torch.nn.init.normal_(reference.weight, 1.0, 0.2)
    ours = mmfast.nn.RMSNorm(80, eps=1e-6, device=device)
    ours.load_state_dict(reference.state_dict())
    x = random_tensor((3, 11, 80), torch.float32, device)
    torch.testing.assert_close(ours(x), reference(x))
