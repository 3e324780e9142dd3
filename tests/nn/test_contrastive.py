"""mmfast.nn.ClipLoss / SigLipLoss as drop-ins for open_clip's loss classes: same
constructor arguments, same forward signature and outputs (loss or dict), same values
and gradients; learnable scale and bias."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.ops.contrastive import clip_loss_reference, siglip_loss_reference


def _open_clip_loss_module():
    """open_clip.loss, or the file alone when the package's other imports (torchvision)
    are missing: the loss classes need only torch. Skips when open_clip is absent."""
    try:
        import open_clip.loss as module
        return module
    except ImportError:
        pass
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed (pip install open_clip_torch to compare)")
    path = f"{list(spec.submodule_search_locations)[0]}/loss.py"
    loader_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def _features(b, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device)
    y = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device)
    return x, y


def _loss_and_grads(module, x, y, *scalars, output_dict=False):
    leaves = [t.clone().requires_grad_() for t in (x, y, *scalars)]
    out = module(*leaves, output_dict=output_dict)
    loss = out["contrastive_loss"] if output_dict else out
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("output_dict", [False, True])
def test_clip_loss_matches_open_clip(output_dict, device):
    open_clip_loss = _open_clip_loss_module()
    x, y = _features(19, 32, device)
    scale = torch.tensor(math.exp(2.5), device=device)
    theirs = _loss_and_grads(open_clip_loss.ClipLoss(), x, y, scale, output_dict=output_dict)
    ours = _loss_and_grads(mmfast.nn.ClipLoss(backend="triton"), x, y, scale, output_dict=output_dict)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_siglip_loss_matches_open_clip(device):
    open_clip_loss = _open_clip_loss_module()
    x, y = _features(19, 32, device, seed=1)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    theirs = _loss_and_grads(open_clip_loss.SigLipLoss(), x, y, scale, bias, output_dict=True)
    ours = _loss_and_grads(mmfast.nn.SigLipLoss(backend="triton"), x, y, scale, bias, output_dict=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_learnable_scale_and_bias(device):
    x, y = _features(9, 16, device, seed=2)
    clip = mmfast.nn.ClipLoss(learn_logit_scale=True, init_logit_scale=math.log(20.0), backend="torch").to(device)
    loss = clip(x, y)
    loss.backward()
    s = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    ref = clip_loss_reference(x.double(), y.double(), s.exp())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip.logit_scale.grad.double(), s.grad, rtol=1e-4, atol=1e-6)

    sig = mmfast.nn.SigLipLoss(learn_logit_scale=True, learn_logit_bias=True, backend="torch").to(device)
    assert {n for n, _ in sig.named_parameters()} == {"logit_scale", "logit_bias"}
    loss = sig(x, y, output_dict=True)["contrastive_loss"]
    loss.backward()
    ref = siglip_loss_reference(x.double(), y.double(), torch.tensor(10.0).double(), torch.tensor(-10.0).double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert sig.logit_scale.grad is not None and sig.logit_bias.grad is not None


def test_constructor_and_forward_errors(device):
    x, y = _features(4, 8, device)
    with pytest.raises(ValueError, match="logit_scale: required"):
        mmfast.nn.ClipLoss()(x, y)
    with pytest.raises(ValueError, match="use_horovod"):
        mmfast.nn.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        mmfast.nn.SigLipLoss(dist_impl="nope")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        mmfast.nn.ClipLoss(world_size=2)(x, y, torch.tensor(10.0))
    assert mmfast.nn.SigLipLoss(dist_impl="gather").strategy == "all_gather"
