"""``forward(..., labels=...)`` of the complete models: the fused loss path equals
transformers' causal-LM loss, and one backward gives the same gradient for every
parameter (tiny random Qwen2.5-VL and LLaVA, padded batches with images, fp32)."""

import pytest
import torch

import mmfast
from mmfast.models.llava import LlavaForConditionalGeneration
from mmfast.models.lm_loss import CausalLMOutput, packed_shifted_labels
from mmfast.models.qwen25_vl import Qwen25VLForConditionalGeneration
from tests.models import test_llava as llava_case
from tests.models import test_qwen25_vl as qwen_case

transformers = pytest.importorskip("transformers")


@pytest.fixture
def fused_loss_kernels():
    # The decoder on the reference kernels (backward under the Triton interpreter would take
    # this file's budget; the kernels are tested on their own), the loss on its Triton kernel.
    with mmfast.set_backend("torch"), mmfast.set_backend("triton", op="linear_cross_entropy"):
        yield


def _hf_model(cls, config, directory):
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = cls(config).eval()
    hf.save_pretrained(directory)
    return hf


def _labels(ids, mask, image_token):
    """What a collator writes: the ids, -100 on padding, image placeholders and the first
    two tokens of each row (a "prompt" not trained on)."""
    labels = ids.masked_fill((mask == 0) | (ids == image_token), -100)
    first = mask.cumsum(1) <= 2
    return labels.masked_fill(first, -100)


def _assert_same_training_step(ours, hf, our_kwargs, hf_kwargs, labels):
    out = ours(**our_kwargs, labels=labels)
    assert isinstance(out, CausalLMOutput) and out.logits is None
    want = hf(**hf_kwargs, labels=labels).loss
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    want.backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        expected = hf_params[name].grad
        if expected is None:  # a part the loss does not reach (e.g. an unused tower layer)
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked > 10


def test_qwen25_vl_loss_and_gradients_match_hugging_face(tmp_path, fused_loss_kernels):
    hf = _hf_model(transformers.Qwen2_5_VLForConditionalGeneration, qwen_case._config(), tmp_path)
    ours = Qwen25VLForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask, pixels = qwen_case._prompts()  # left-padded, two images
    labels = _labels(ids, mask, qwen_case.IMAGE)
    _assert_same_training_step(ours, hf, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                              image_grid_thw=qwen_case.GRIDS),
                               qwen_case._hf_inputs(ids, mask, pixels), labels)

    # num_items_in_batch (gradient accumulation): the sum over tokens divided by it.
    with torch.no_grad():
        kwargs = dict(attention_mask=mask, pixel_values=pixels, image_grid_thw=qwen_case.GRIDS, labels=labels)
        mean = ours(ids, **kwargs).loss
        scaled = ours(ids, **kwargs, num_items_in_batch=torch.tensor(50)).loss
    valid = int((packed_shifted_labels(labels, mask.bool()) != -100).sum())
    torch.testing.assert_close(scaled, mean * valid / 50)
    # Without labels, forward still returns the logits.
    assert ours(ids[:1, -4:]).shape == (1, 4, 128)


def test_llava_loss_and_gradients_match_hugging_face(tmp_path, fused_loss_kernels):
    hf = _hf_model(transformers.LlavaForConditionalGeneration, llava_case._config(), tmp_path)
    ours = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    ids, pixels = llava_case._prompt()
    # Right padding: transformers' default positions then agree with mmfast's per-sequence ones.
    mask = torch.ones_like(ids)
    ids[1, -3:], mask[1, -3:] = llava_case.PAD, 0
    labels = _labels(ids, mask, llava_case.IMAGE)
    _assert_same_training_step(ours, hf, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels),
                               dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), labels)


def test_packed_shifted_labels():
    # Row 0 left-padded by one, row 1 full: targets are the next label of the same row,
    # -100 at each row's end and for padding.
    labels = torch.tensor([[9, 1, 2, 3], [4, 5, -100, 6]])
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert packed_shifted_labels(labels, mask).tolist() == [2, 3, -100, 5, -100, 6, -100]
    with pytest.raises(ValueError, match="labels: expected shape"):
        packed_shifted_labels(labels[:, :3], mask)
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        packed_shifted_labels(labels.float(), mask)
