"""Norm modules: state_dict compatible with torch.nn.LayerNorm / HF RMSNorm, same outputs."""

import torch

import mmfast
from mmfast.testing import random_tensor


def test_norm_modules_match_torch(device):
    ln = torch.nn.LayerNorm(80, eps=1e-5, device=device)
    torch.nn.init.normal_(ln.weight, 1.0, 0.2)
    torch.nn.init.normal_(ln.bias, 0.0, 0.2)
    ours = mmfast.nn.LayerNorm(80, eps=1e-5, device=device)
    ours.load_state_dict(ln.state_dict())
    assert ours.state_dict().keys() == ln.state_dict().keys()
    x = random_tensor((3, 11, 80), torch.float32, device)
    torch.testing.assert_close(ours(x), ln(x))

    rms = mmfast.nn.RMSNorm(80, eps=1e-6, device=device)
    assert list(rms.state_dict()) == ["weight"]
    torch.testing.assert_close(rms(x), torch.nn.functional.rms_norm(x, (80,), rms.weight, 1e-6))
    y, h = rms(x, residual=x)
    torch.testing.assert_close(h, 2 * x)
