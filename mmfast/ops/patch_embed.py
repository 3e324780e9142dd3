"""Patch embedding of vision transformers, as one implicit GEMM that reads the pixels
where they lie and adds bias, position embedding and class token before its one store.

Conv2d style (CLIP, SigLIP, ViT: kernel = stride = P):

    patch_embed(pixels [B, C, H, W], weight [E, C, P, P], bias [E] | None,
                pos_embed [L (+1), E] | None, class_embed [E] | None) -> [B, L (+1), E]

    L = (H / P) * (W / P) patches in row-major order. With ``class_embed``, row 0 of every
    image is the class token (class_embed + pos_embed[0]), as in CLIP; patch l is then
    row l + 1. Equal to ``conv2d(pixels, weight, bias, stride=P).flatten(2).mT`` with the
    class token prepended and ``pos_embed`` added, rounded once. For an image size other
    than the table's, :func:`interpolate_pos_embed` resizes it (bicubic, as Hugging Face
    CLIP/SigLIP ``interpolate_pos_encoding``).

Conv3d style, input already patchified (Qwen2-VL / Qwen2.5-VL: each row holds the
C x T x P x P = 3 x 2 x 14 x 14 values of one patch; images and videos of any size are
packed into one token stream, ``grid_thw`` says how):

    patch_embed_patchified(x [N, K], weight [E, C, T, P, P] or [E, K], bias [E] | None)
        -> [N, E] = x @ weight.reshape(E, K).T + bias

This is Hugging Face's ``Conv3d`` on ``x.view(-1, C, T, P, P)`` (whose output is one
value per patch) done as the GEMM it is. :func:`grid_cu_seqlens` gives the per-frame
``cu_seqlens`` of such a stream.

Dynamic resolution in Conv2d style: :func:`patch_embed_packed` embeds a list of images of
different sizes into one token stream and returns its ``cu_seqlens``.

Gradients: pixels or x, weight, bias, pos_embed, class_embed. Accumulation is float32
(float64 for float64 inputs); float32 multiplies without TF32.

Backends: ``triton`` (fp16, bf16, fp32; CUDA, or CPU under TRITON_INTERPRET=1 without
bf16, whose tl.dot the interpreter gets wrong), ``torch``
(the reference below: ``conv2d`` / ``linear`` in float32; any floating dtype).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast.dispatch import Backend, Call, op_family

# ---- reference -------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def patch_embed_reference(pixels, weight, bias=None, pos_embed=None, class_embed=None) -> Tensor:
    """Plain PyTorch Conv2d-style patch embedding, computed in float32, rounded once."""
    c = _compute_dtype(pixels.dtype)
    P = weight.shape[-1]
    out = F.conv2d(pixels.to(c), weight.to(c), bias.to(c) if bias is not None else None, stride=P)
    out = out.flatten(2).transpose(1, 2)  # [B, L, E]
    if class_embed is not None:
        out = torch.cat([class_embed.to(c).expand(out.shape[0], 1, -1), out], dim=1)
    if pos_embed is not None:
        out = out + pos_embed.to(c)
    return out.to(pixels.dtype)


def patch_embed_patchified_reference(x, weight, bias=None) -> Tensor:
    """Plain PyTorch GEMM of pre-patchified rows, computed in float32, rounded once."""
    c = _compute_dtype(x.dtype)
    w = weight.reshape(weight.shape[0], -1).to(c)
    return F.linear(x.to(c), w, bias.to(c) if bias is not None else None).to(x.dtype)


def interpolate_pos_embed(pos_embed: Tensor, grid_hw: tuple[int, int], class_token: bool) -> Tensor:
    """Resize a learned position table [(1 +) S*S, E] to a grid of ``grid_hw`` patches,
    bicubic, exactly as Hugging Face CLIP / SigLIP ``interpolate_pos_encoding`` do (same
    ops, same dtype: their results agree bit for bit). The class position is kept as is.
    Returns [(1 +) gh*gw, E]; differentiable. The table itself when the grid already fits.
    """
    gh, gw = grid_hw
    cls_pos, table = (pos_embed[:1], pos_embed[1:]) if class_token else (None, pos_embed)
    side = int(math.isqrt(table.shape[0]))
    if side * side != table.shape[0]:
        raise ValueError(f"pos_embed: expected a square number of patch positions, got {table.shape[0]}")
    if (gh, gw) == (side, side):
        return pos_embed
    E = table.shape[-1]
    grid = table.reshape(1, side, side, E).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    table = grid.permute(0, 2, 3, 1).reshape(gh * gw, E)
    return table if cls_pos is None else torch.cat([cls_pos, table], dim=0)


def grid_cu_seqlens(grid_thw: Tensor) -> Tensor:
    """int32 [F + 1] boundaries of the frames of a packed Qwen2-VL token stream, one
    segment of h * w patches per frame (t frames per image/video), as Hugging Face's
    vision towers build their full-attention ``cu_seqlens``."""
    frames = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(frames.cumsum(0, dtype=torch.int32), (1, 0))


# ---- custom ops (opaque to torch.compile, traced through their fake impls) ---------


@torch.library.custom_op("mmfast::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd_op(
    x: Tensor, weight2: Tensor, bias: Optional[Tensor], pos: Optional[Tensor], cls: Optional[Tensor], patch: int,
) -> Tensor:
    from mmfast.kernels.patch_embed import patch_embed_fwd

    return patch_embed_fwd(x, weight2, bias, pos, cls, patch)


@_patch_embed_fwd_op.register_fake
def _(x, weight2, bias, pos, cls, patch):
    E = weight2.shape[0]
    if x.dim() == 2:
        return x.new_empty((x.shape[0], E))
    B, _, H, W = x.shape
    return x.new_empty((B, (H // patch) * (W // patch) + (cls is not None), E))


@torch.library.custom_op("mmfast::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd_op(
    dout: Tensor, x: Tensor, weight2: Tensor, patch: int, has_cls: bool, need_input: bool, need_weight: bool,
) -> tuple[Tensor, Tensor]:
    from mmfast.kernels.patch_embed import patch_embed_bwd

    dx, dw = patch_embed_bwd(dout, x, weight2, patch, has_cls, need_input, need_weight)
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty), (dw if dw is not None else empty.float())


@_patch_embed_bwd_op.register_fake
def _(dout, x, weight2, patch, has_cls, need_input, need_weight):
    dx = x.new_empty(x.shape if need_input else (0,))
    dw = weight2.new_empty(weight2.shape if need_weight else (0,), dtype=torch.float32)
    return dx, dw


# ---- autograd --------------------------------------------------------------------


class PatchEmbedFunction(torch.autograd.Function):
    """Triton forward and backward; ``x`` is pixels [B, C, H, W] or rows [N, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, pos, cls, patch):
        if x.dim() == 2 and x.stride(-1) != 1:
            x = x.contiguous()
        weight2 = weight.reshape(weight.shape[0], -1)
        weight2 = weight2 if weight2.stride(-1) == 1 else weight2.contiguous()
        if pos is not None and pos.stride(-1) != 1:
            pos = pos.contiguous()
        ctx.save_for_backward(x, weight2)
        ctx.patch, ctx.weight_shape = patch, weight.shape
        ctx.has_cls = cls is not None
        return torch.ops.mmfast.patch_embed_fwd(x, weight2, bias, pos, cls, patch)

    @staticmethod
    def backward(ctx, dout):
        x, weight2 = ctx.saved_tensors
        has_cls = ctx.has_cls
        need_x, need_w, need_b, need_pos, need_cls = ctx.needs_input_grad[:5]
        dout = dout.contiguous()
        dx = dw = dbias = dpos = dcls = None
        if need_x or need_w:
            dx, dw = torch.ops.mmfast.patch_embed_bwd(dout, x, weight2, ctx.patch, has_cls, need_x, need_w)
            dx = dx if need_x else None
            dw = dw.to(weight2.dtype).reshape(ctx.weight_shape) if need_w else None
        if x.dim() == 2 and need_b:
            dbias = dout.sum(0, dtype=torch.float32).to(dout.dtype)
        elif need_b or need_pos or need_cls:
            # Sums over the batch (float32), then over the patch positions for the bias.
            per_row = dout.sum(0, dtype=torch.float32)
            dpos = per_row.to(dout.dtype) if need_pos else None
            dcls = per_row[0].to(dout.dtype) if need_cls else None
            dbias = per_row[int(has_cls):].sum(0).to(dout.dtype) if need_b else None
        return dx, dw, dbias, dpos, dcls, None


# ---- backends --------------------------------------------------------------------


def _run_triton(x, weight, bias, pos, cls, patch):
    return PatchEmbedFunction.apply(x, weight, bias, pos, cls, patch)


def _run_torch(x, weight, bias, pos, cls, patch):
    if x.dim() == 2:
        return patch_embed_patchified_reference(x, weight, bias)
    return patch_embed_reference(x, weight, bias, pos, cls)


PATCH_EMBED = op_family("patch_embed")
PATCH_EMBED.register(
    Backend("triton", _run_triton, triton=True, dot=True, dtypes=(torch.float16, torch.bfloat16, torch.float32))
)
PATCH_EMBED.register(Backend("torch", _run_torch))


# ---- public functions ------------------------------------------------------------


def _check_tensor(name: str, t, dims: int | tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    dims = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in dims:
        want = " or ".join(f"{d}-d" for d in dims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")


def _check_like(name: str, t, shape: tuple[int, ...], ref: Tensor, ref_name: str) -> None:
    if t is None:
        return
    _check_tensor(name, t, len(shape))
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def _check_input_matches_weight(name: str, x: Tensor, weight: Tensor) -> None:
    if x.dtype != weight.dtype:
        raise TypeError(f"{name}: expected dtype {weight.dtype} (that of weight), got {x.dtype}; "
                        f"cast it first, as Hugging Face does with pixel_values.to(weight.dtype)")
    if x.device != weight.device:
        raise ValueError(f"{name}: expected device {weight.device} (that of weight), got {x.device}")


def patch_embed(pixels, weight, bias=None, pos_embed=None, class_embed=None, *, backend=None):
    """Conv2d-style patch embedding with bias, position embedding and class token fused.

    ``pixels`` [B, C, H, W] with H and W multiples of the patch size P; ``weight``
    [E, C, P, P]; ``pos_embed`` [L + 1, E] with a class token, else [L, E] (use
    :func:`interpolate_pos_embed` for another image size). Returns [B, L (+1), E].

    Example::

        >>> pixels = torch.randn(2, 3, 56, 42)
        >>> weight, pos = torch.randn(64, 3, 14, 14), torch.randn(1 + 4 * 3, 64)
        >>> mmfast.ops.patch_embed(pixels, weight, pos_embed=pos, class_embed=torch.randn(64)).shape
        torch.Size([2, 13, 64])
    """
    _check_tensor("pixels", pixels, 4)
    _check_tensor("weight", weight, 4)
    E, C, P, P2 = weight.shape
    if P != P2:
        raise ValueError(f"weight: expected a square patch [E, C, P, P], got shape {tuple(weight.shape)}")
    if P == 0:
        raise ValueError(f"weight: expected a patch size P >= 1 in [E, C, P, P], got shape {tuple(weight.shape)}")
    if pixels.shape[1] != C:
        raise ValueError(f"pixels: expected {C} channels (weight is [E, C, P, P] = {tuple(weight.shape)}), "
                         f"got {pixels.shape[1]} (shape {tuple(pixels.shape)})")
    H, W = pixels.shape[-2:]
    if H % P or W % P:
        raise ValueError(f"pixels: image size {H}x{W} is not a multiple of the patch size {P}; "
                         "resize or crop the image first")
    _check_input_matches_weight("pixels", pixels, weight)
    L = (H // P) * (W // P)
    _check_like("bias", bias, (E,), weight, "weight")
    _check_like("class_embed", class_embed, (E,), weight, "weight")
    rows = L + (class_embed is not None)
    if pos_embed is not None and tuple(pos_embed.shape) != (rows, E) and pos_embed.dim() == 2:
        raise ValueError(f"pos_embed: expected shape {(rows, E)} for a {H // P}x{W // P} patch grid"
                         f"{' plus the class token' if class_embed is not None else ''}, got "
                         f"{tuple(pos_embed.shape)}; interpolate_pos_embed resizes a table")
    _check_like("pos_embed", pos_embed, (rows, E), weight, "weight")
    call = Call(device=pixels.device, dtype=pixels.dtype)
    return PATCH_EMBED.select(call, backend).run(pixels, weight, bias, pos_embed, class_embed, P)


def patch_embed_packed(images, weight, bias=None, pos_embeds=None, class_embed=None, *, backend=None):
    """Images of different sizes embedded into one packed token stream (dynamic
    resolution, as NaViT-style towers and varlen attention want it).

    ``images``: a sequence of [C, H_i, W_i] tensors; ``pos_embeds``: None or one table
    per image, [L_i (+1), E] (see :func:`interpolate_pos_embed`). Returns
    ``(tokens [sum_i L_i (+1), E], cu_seqlens int32 [n + 1])``, image i owning tokens
    cu_seqlens[i] .. cu_seqlens[i + 1]; cu_seqlens comes from the shapes (no sync).

    Each image is one fused launch; the packing is then one copy of the tokens (a single
    launch over all images, with a tile-to-image table, is left for later).

    Example::

        >>> images = [torch.randn(3, 28, 42), torch.randn(3, 14, 14)]
        >>> tokens, cu = mmfast.ops.patch_embed_packed(images, torch.randn(64, 3, 14, 14))
        >>> tokens.shape, cu.tolist()
        (torch.Size([7, 64]), [0, 6, 7])
    """
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)) or not images:
        raise TypeError(f"images: expected a non-empty list or tuple of [C, H, W] tensors, "
                        f"got {type(images).__name__}")
    if pos_embeds is not None and (not isinstance(pos_embeds, (list, tuple)) or len(pos_embeds) != len(images)):
        raise ValueError(f"pos_embeds: expected None or one table per image ({len(images)}), "
                         f"got {type(pos_embeds).__name__}")
    pieces = []
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{i}]: expected a [C, H, W] tensor, got {got}")
        pos = pos_embeds[i] if pos_embeds is not None else None
        try:
            pieces.append(patch_embed(image[None], weight, bias, pos, class_embed, backend=backend)[0])
        except (TypeError, ValueError) as error:  # name the caller's argument, not patch_embed's
            message = str(error)
            for inner, outer in (("pixels", f"images[{i}]"), ("pos_embed", f"pos_embeds[{i}]")):
                if message.startswith(inner + ":"):
                    raise type(error)(outer + message[len(inner):]) from None
            raise
    lengths = torch.tensor([0] + [p.shape[0] for p in pieces], dtype=torch.int32)
    cu_seqlens = lengths.cumsum(0, dtype=torch.int32).to(weight.device)
    return torch.cat(pieces, dim=0), cu_seqlens


def patch_embed_patchified(x, weight, bias=None, *, grid_thw=None, backend=None):
    """Embedding of pre-patchified rows (Qwen2-VL's Conv3d as a GEMM): ``x`` [N, K],
    ``weight`` [E, C, T, P, P] (a Conv3d weight) or [E, K]. Returns [N, E].

    ``grid_thw`` (int [images, 3], optional) is checked against N: sum of t * h * w must
    equal N. That check reads it back to the host (one sync); leave it out on hot paths.

    Example::

        >>> x = torch.randn(2 * 4 * 6, 3 * 2 * 14 * 14)    # one video: 2 frames of 4x6 patches
        >>> weight = torch.randn(32, 3, 2, 14, 14)
        >>> mmfast.ops.patch_embed_patchified(x, weight, grid_thw=torch.tensor([[2, 4, 6]])).shape
        torch.Size([48, 32])
    """
    _check_tensor("x", x, 2)
    _check_tensor("weight", weight, (2, 5))
    E, K = weight.shape[0], math.prod(weight.shape[1:])
    if x.shape[1] != K:
        layout = "C*T*P*P" if weight.dim() == 5 else "K"
        raise ValueError(f"x: expected {K} values per row ({layout} of weight {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    _check_input_matches_weight("x", x, weight)
    _check_like("bias", bias, (E,), weight, "weight")
    if grid_thw is not None:
        _check_grid_thw(grid_thw, x.shape[0])
    call = Call(device=x.device, dtype=x.dtype)
    return PATCH_EMBED.select(call, backend).run(x, weight, bias, None, None, 0)


def _check_grid_thw(grid_thw, tokens: int) -> None:
    if not isinstance(grid_thw, Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        got = tuple(grid_thw.shape) if isinstance(grid_thw, Tensor) else type(grid_thw).__name__
        raise ValueError(f"grid_thw: expected an integer tensor [images, 3] of (t, h, w), got {got}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise TypeError(f"grid_thw: expected an integer dtype, got {grid_thw.dtype}")
    values = grid_thw.detach().cpu()  # one device->host sync
    if (values <= 0).any():
        raise ValueError(f"grid_thw: expected positive (t, h, w), got {values.tolist()}")
    total = int(values.prod(dim=1).sum())
    if total != tokens:
        raise ValueError(f"grid_thw: its patches sum to {total} (sum of t*h*w), but x has {tokens} rows")
