"""Retrieval evaluation without the B x B similarity matrix.

For image features x [B, D] and text features y [B, D], pair i <-> i the match, the
rank of image i's text is the number of texts scoring strictly higher than it,
#{j : x_i.y_j > x_i.y_i} (0 is the best; ties count in the image's favour), and the same
per text over the images. From the ranks:

    R@K        fraction of queries whose match ranks below K
    mrr        mean of 1 / (rank + 1)
    mean_rank, median_rank   1-based, as open_clip's evaluation reports them

Scores come from the contrastive kernels' score tiles (see mmfast.ops.contrastive_blocks):
one pass for the matches' scores and one to count, per direction; O(B) memory.
Zero-shot classification scores every image against C class embeddings, a chunk of images
at a time: O(chunk x C) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast.ops.contrastive import check_features, select_blocks


def _summary(name: str, ranks: Tensor, ks) -> dict[str, float]:
    ranks = ranks.double()
    out = {f"{name}_R@{k}": (ranks < k).double().mean().item() for k in ks}
    out[f"{name}_mrr"] = (1.0 / (ranks + 1)).mean().item()
    out[f"{name}_mean_rank"] = ranks.mean().item() + 1
    out[f"{name}_median_rank"] = float(torch.floor(ranks.median()).item()) + 1
    return out


@torch.no_grad()
def retrieval_ranks(image_features: Tensor, text_features: Tensor, *, backend=None) -> tuple[Tensor, Tensor]:
    """(image -> text ranks, text -> image ranks), int32 [B] each, 0-based."""
    check_features("image_features", image_features)
    check_features("text_features", text_features, "image_features", image_features)
    blocks = select_blocks(image_features, backend)
    one = torch.ones((), dtype=torch.float32, device=image_features.device)
    _, match_rows = blocks.lse_rows(image_features, text_features, one, 0)
    _, match_cols = blocks.lse_cols(image_features, text_features, one, 0)
    return (blocks.count_above(image_features, text_features, match_rows, False),
            blocks.count_above(image_features, text_features, match_cols, True))


def retrieval_metrics(image_features, text_features, ks=(1, 5, 10), *, backend=None) -> dict[str, float]:
    """Recall@K, mean reciprocal rank, mean and median rank, both directions, with pair
    i <-> i the match. Reads the results back to the host (one sync).

    Example::

        >>> x, y = torch.randn(100, 32), torch.randn(100, 32)
        >>> m = mmfast.ops.retrieval_metrics(x, y, ks=(1, 5))
        >>> sorted(m)[:2]
        ['image_to_text_R@1', 'image_to_text_R@5']
    """
    if isinstance(ks, int) or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
        raise ValueError(f"ks: expected a sequence of positive ints, got {ks!r}")
    if isinstance(image_features, Tensor) and image_features.dim() == 2 and image_features.shape[0] == 0:
        raise ValueError("image_features: expected at least one row")
    to_text, to_image = retrieval_ranks(image_features, text_features, backend=backend)
    return {**_summary("image_to_text", to_text, ks), **_summary("text_to_image", to_image, ks)}


@torch.no_grad()
def zero_shot_topk(image_features, class_text_features, k: int = 5, *, chunk: int = 4096):
    """CLIP zero-shot classification: the ``k`` classes whose text embeddings score highest
    against each image, as (scores [B, k] float32, indices [B, k] int64), best first.
    Images are scored ``chunk`` at a time against all C classes (fp32 accumulation).

    Example::

        >>> x, classes = torch.randn(10, 32), torch.randn(1000, 32)
        >>> scores, idx = mmfast.ops.zero_shot_topk(x, classes, k=5)
        >>> idx.shape
        torch.Size([10, 5])
    """
    check_features("image_features", image_features)
    check_features("class_text_features", class_text_features)
    if class_text_features.shape[1] != image_features.shape[1]:
        raise ValueError(f"class_text_features: expected feature dim {image_features.shape[1]} "
                         f"(that of image_features), got {class_text_features.shape[1]}")
    if class_text_features.device != image_features.device:
        raise ValueError(f"class_text_features: expected device {image_features.device}, "
                         f"got {class_text_features.device}")
    n_classes = class_text_features.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_classes:
        raise ValueError(f"k: expected an int in [1, {n_classes}] (the number of classes), got {k!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int (images scored at a time), got {chunk!r}")
    cd = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    classes = class_text_features.to(cd)
    scores, indices = [], []
    for i in range(0, image_features.shape[0], chunk):
        top = torch.topk(image_features[i:i + chunk].to(cd) @ classes.T, k, dim=1)
        scores.append(top.values.float())
        indices.append(top.indices)
    if not scores:
        empty = image_features.new_empty((0, k), dtype=torch.float32)
        return empty, empty.long()
    return torch.cat(scores), torch.cat(indices)
