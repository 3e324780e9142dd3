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
    with pytest.raises(ValueError, match="dist_impl"):
        mmfast.nn.SigLipLoss(dist_impl="nope")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        mmfast.nn.ClipLoss(world_size=2)(x, y, torch.tensor(10.0))
    assert mmfast.nn.SigLipLoss(dist_impl="gather").strategy == "all_gather"


# ---- open_clip's API beyond forward (subclasses and callers use it) ------------------------


def test_clip_loss_get_logits_ground_truth_and_label_cache(device):
    x, y = _features(6, 8, device, seed=3)
    scale, bias = torch.tensor(7.0, device=device), torch.tensor(0.5, device=device)
    loss = mmfast.nn.ClipLoss(backend="torch")
    per_image, per_text = loss.get_logits(x, y, scale, logit_bias=bias)
    torch.testing.assert_close(per_image, scale * x @ y.T + bias)
    torch.testing.assert_close(per_text, scale * y @ x.T + bias)
    assert loss.prev_num_logits == 0 and loss.labels == {}
    assert torch.equal(loss.get_ground_truth(x.device, 6), torch.arange(6, device=device))
    assert loss.labels == {}  # cache_labels=False: nothing kept

    cached = mmfast.nn.ClipLoss(cache_labels=True, backend="torch")
    cached(x, y, scale)  # forward leaves open_clip's cache behind
    assert cached.prev_num_logits == 6 and torch.equal(cached.labels[x.device], torch.arange(6, device=device))
    first = cached.labels[x.device]
    assert cached.get_ground_truth(x.device, 6) is first  # served from the cache
    assert torch.equal(cached.get_ground_truth(x.device, 4), torch.arange(4, device=device))
    assert cached.prev_num_logits == 4


def test_use_horovod_is_an_attribute_and_raises_on_use(device):
    # Regression: use_horovod=True raised at construction; open_clip raises on use only.
    x, y = _features(4, 8, device)
    single = mmfast.nn.ClipLoss(use_horovod=True, backend="torch")
    assert single.use_horovod is True and mmfast.nn.ClipLoss().use_horovod is False
    torch.testing.assert_close(single(x, y, torch.tensor(10.0, device=device)),
                               clip_loss_reference(x, y, torch.tensor(10.0, device=device)))
    with pytest.raises(ValueError, match="use_horovod"):
        mmfast.nn.ClipLoss(world_size=2, use_horovod=True)(x, y, torch.tensor(10.0, device=device))
    with pytest.raises(ValueError, match="use_horovod"):
        mmfast.nn.SigLipLoss(world_size=2, use_horovod=True)(x, y, torch.tensor(10.0), torch.tensor(-10.0))


class _DistillClipLoss(mmfast.nn.ClipLoss):
    """open_clip's DistillClipLoss pattern: a forward of its own on get_logits / get_ground_truth."""

    def forward(self, image_features, text_features, logit_scale, teacher_image, teacher_text, teacher_scale):
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale)
        t_image, t_text = self.get_logits(teacher_image, teacher_text, teacher_scale)
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])
        contrastive = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2

        def distill(teacher, student):
            return -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

        return contrastive, (distill(t_image, per_image) + distill(t_text, per_text)) / 2


class _ShiftedLabelsClipLoss(mmfast.nn.ClipLoss):
    """A subclass that changes the ground truth: forward must use it."""

    def get_ground_truth(self, device, num_logits):
        return (torch.arange(num_logits, device=device) + 1) % num_logits


def test_clip_loss_subclasses_use_the_open_clip_methods(device):
    x, y = _features(7, 16, device, seed=4)
    tx, ty = _features(7, 16, device, seed=5)
    scale = torch.tensor(9.0, device=device)
    contrastive, distill = _DistillClipLoss(backend="torch")(x, y, scale, tx, ty, torch.tensor(5.0, device=device))
    torch.testing.assert_close(contrastive, clip_loss_reference(x, y, scale))
    assert distill.isfinite() and distill > 0

    leaves = [t.clone().requires_grad_() for t in (x, y, scale)]
    got = _ShiftedLabelsClipLoss(backend="torch")(*leaves)
    got.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, y, scale)]
    logits = ref_leaves[2] * ref_leaves[0] @ ref_leaves[1].T
    labels = (torch.arange(7, device=device) + 1) % 7
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def _siglip_dense(x, y, scale, bias, negative_only=False):
    labels = -torch.ones(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
    if not negative_only:
        labels = labels + 2 * torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return -F.logsigmoid(labels * (scale * x @ y.T + bias)).sum() / x.shape[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("negative_only", [False, True])
def test_siglip_loss_private_loss_with_negative_only(device, backend, negative_only):
    x, y = _features(11, 16, device, seed=6)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-5.0, device=device)
    module = mmfast.nn.SigLipLoss(backend=backend)
    got = _loss_and_grads(lambda *a, output_dict: module._loss(*a, negative_only=negative_only), x, y, scale, bias)
    want = _loss_and_grads(lambda *a, output_dict: _siglip_dense(*(t.double() for t in a), negative_only), x, y,
                           scale, bias)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a.double(), b.to(a.device).double(), rtol=1e-4, atol=1e-6)


def test_siglip_loss_open_clip_api_and_chunk_size(device):
    x, y = _features(5, 8, device, seed=7)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    module = mmfast.nn.SigLipLoss(False, 0, 1, None, 3, backend="torch")  # open_clip's positional order
    assert module.chunk_size == 3 and module.prev_num_logits == 0 and module.labels == {}
    torch.testing.assert_close(module.get_logits(x, y, scale, bias), scale * x @ y.T + bias)
    eye = torch.eye(5, dtype=torch.float16, device=device)
    assert torch.equal(module.get_ground_truth(x.device, torch.float16, 5), 2 * eye - 1)
    assert torch.equal(module.get_ground_truth(x.device, torch.float16, 5, negative_only=True), -torch.ones_like(eye))
    torch.testing.assert_close(module(x, y, scale, bias), siglip_loss_reference(x, y, scale, bias))
    with pytest.raises(ValueError, match="chunk_size"):
        mmfast.nn.SigLipLoss(chunk_size=-1)


class _WeightedPositivesSigLipLoss(mmfast.nn.SigLipLoss):
    """A subclass that changes the labels: forward must use them."""

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False):
        return 0.5 * super().get_ground_truth(device, dtype, num_logits, negative_only)


def test_siglip_loss_subclass_overrides_take_effect(device):
    x, y = _features(6, 8, device, seed=8)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    got = _WeightedPositivesSigLipLoss(backend="torch")(x, y, scale, bias)
    labels = 0.5 * (2 * torch.eye(6, device=device) - 1)
    torch.testing.assert_close(got, -F.logsigmoid(labels * (scale * x @ y.T + bias)).sum() / 6)
