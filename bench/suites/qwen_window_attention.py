"""Vision-encoder attention shapes: the Qwen2.5-VL window and full-attention layers, and
SigLIP-so400m; forward and forward+backward, bf16 on a GPU.

- ``window``: Qwen2.5-VL's 28 window layers. Images of S x S pixels become (S/14)^2
  patches; 2x2 patches merge into one unit and windows hold 4x4 units (112 px), so a
  window has 64 tokens, fewer at the right and bottom edges when S/28 is not a multiple
  of 4. Window lengths come from the real grid_thw, in Hugging Face's order
  (get_vision_window_index); 1..16 images of 448..1792 px; 16 heads, head dim 80.
- ``full``: its 4 full-attention layers, one segment per image, same shapes.
- ``siglip``: SigLIP-so400m at 384 px, 729 tokens per image, 16 heads, head dim 72,
  a padded batch of images.

Providers (each skipped with its reason where it cannot run):
``mmfast-triton-short`` (backend="triton_short": whole windows per program; segments of
up to 128 tokens), ``mmfast-cuda-short`` (backend="cuda_short": the CUDA C++ tensor-core
kernel of csrc/attention_short.cu, forward only, built before timing; its measurement
decides whether it becomes the default in mmfast/tuning), ``mmfast-triton`` (the general
flash-style kernel); PyTorch SDPA per
backend (``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``) as a user
would call it on packed segments: gathered into a padded [segments, longest, H, D] batch
with a key-padding mask when lengths differ (flash takes no mask: skipped then), scattered
back, both inside the timed region; ``flex`` (compiled flex_attention over the packed
sequence with a block-diagonal BlockMask built outside the timed region);
``xformers`` (BlockDiagonalMask, built outside the timed region), ``flash-attn``
(flash_attn_varlen_func) and ``flash-attn-4`` (flash_attn.cute varlen) when installed;
``hf-sdpa-loop``: what transformers' Qwen2_5_VLVisionAttention does with
attn_implementation="sdpa": split q, k, v by segment lengths (a device sync), one SDPA call
per window, concatenate.

FLOPs as in the attention suite: 4 D H per visible (query, key) pair forward, 3.5 x that
forward+backward.

Targets from the issue (H100, bf16), as ``SPEEDUPS`` checked on GPU runs: window layers,
forward+backward, mmfast (the short-segment path dispatch picks there) >= 1.5x the best
of xformers, flex and flash-attn varlen, and >= 10x hf-sdpa-loop; window layers,
forward, the CUDA C++ kernel >= 1.2x the Triton short kernel (issue 9's compute-bound
target).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from mmfast.bench.suite import Case, Provider, Speedup, Suite, gpu_library_skip
from mmfast.bench.suites.attention import (
    SDPA_BACKENDS, AttentionInputs, attention_flops, compiled_flex, flex_skip,
    make_inputs, mmfast_forward, mmfast_skip, once, sdpa, sdpa_skip, timed,
)

PATCH, MERGE, WINDOW_PX = 14, 2, 112
QWEN_HEADS, QWEN_HEAD_DIM = 16, 80
SIGLIP_TOKENS, SIGLIP_HEADS, SIGLIP_HEAD_DIM = 729, 16, 72

GPU_IMAGES, GPU_QUICK_IMAGES = (1, 4, 16), (4,)
# 812 px = 29 units of 28 px: edge windows of 1 x 4, 4 x 1 and 1 x 1 units.
GPU_SIZES, GPU_QUICK_SIZES = (448, 812, 1792), (812,)
GPU_SIGLIP_BATCH, GPU_QUICK_SIGLIP_BATCH = (1, 8, 32), (8,)


def window_lengths(grid_h: int, grid_w: int, grid_t: int = 1) -> list[int]:
    """Token counts of the attention windows of one image (grid in patches), in the order
    of Hugging Face's get_vision_window_index: per frame, windows row-major."""
    units = WINDOW_PX // PATCH // MERGE  # window side, in merged units
    llm_h, llm_w = grid_h // MERGE, grid_w // MERGE
    rows = [min(units, llm_h - r) for r in range(0, llm_h, units)]
    cols = [min(units, llm_w - c) for c in range(0, llm_w, units)]
    return [h * w * MERGE * MERGE for h in rows for w in cols] * grid_t


def image_grid(pixels: int) -> tuple[int, int, int]:
    """grid_thw of a square image already resized to a multiple of 28 px."""
    if pixels % (PATCH * MERGE):
        raise ValueError(f"pixels: expected a multiple of {PATCH * MERGE}, got {pixels}")
    return 1, pixels // PATCH, pixels // PATCH


def segment_lengths(layer: str, images: int, pixels: int) -> list[int]:
    t, h, w = image_grid(pixels)
    per_image = window_lengths(h, w, t) if layer == "window" else [t * h * w]
    return per_image * images


# ---- cases -----------------------------------------------------------------------


def _case(group: str, pass_: str, dtype: str, lengths: list[int] | None, heads: int, head_dim: int,
          name: str, **extra) -> Case:
    params = {"group": group, "pass": pass_, "heads": heads, "head_dim": head_dim, "dtype": dtype, **extra}
    if lengths is not None:
        params.update(segments=len(lengths), tokens=sum(lengths), max_seqlen=max(lengths))
        flops = attention_flops(lengths, heads, head_dim, pass_)
        make = partial(make_inputs, params, tuple(lengths))
    else:
        params["tokens"] = params["batch"] * params["seqlen"]
        flops = params["batch"] * attention_flops([params["seqlen"]], heads, head_dim, pass_)
        make = partial(make_inputs, params, None)
    return Case(name, params, make, flops=flops)


def cases(quick: bool, device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    if gpu:
        dtype, passes = "bfloat16", ("fwd", "fwd+bwd")
        images, sizes = (GPU_QUICK_IMAGES, GPU_QUICK_SIZES) if quick else (GPU_IMAGES, GPU_SIZES)
        siglip_batches, heads = (GPU_QUICK_SIGLIP_BATCH if quick else GPU_SIGLIP_BATCH), QWEN_HEADS
        siglip_heads, siglip_tokens = SIGLIP_HEADS, SIGLIP_TOKENS
    else:  # smoke shapes for the Triton interpreter (float16: it has no bf16 dot)
        dtype, passes = "float16", (("fwd",) if quick else ("fwd", "fwd+bwd"))
        images, sizes, siglip_batches, heads = (1,), (140,), (1,), 1
        siglip_heads, siglip_tokens = 1, 49
    short = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    out = []
    for pass_ in passes:
        for layer in ("window", "full"):
            for n in images:
                for pixels in sizes:
                    lengths = segment_lengths(layer, n, pixels)
                    out.append(_case(layer, pass_, dtype, lengths, heads, QWEN_HEAD_DIM,
                                     f"qwen-{layer}-{pass_}-{n}x{pixels}px-{short}",
                                     images=n, pixels=pixels))
        for batch in siglip_batches:
            out.append(_case("siglip", pass_, dtype, None, siglip_heads, SIGLIP_HEAD_DIM,
                             f"siglip-{pass_}-{batch}x{siglip_tokens}-{short}",
                             batch=batch, seqlen=siglip_tokens))
    return out


# ---- providers ---------------------------------------------------------------------


def _heads_first(t: Tensor) -> Tensor:
    return t.transpose(-3, -2)


def _mmfast(backend: str, case: Case):
    return timed(case, mmfast_forward(backend, causal=False))


def _padding(i: AttentionInputs):
    """Gather/scatter indices between packed tokens and a padded [segments, longest]
    batch, and the key-padding mask (None when every segment has the longest length)."""
    lengths = torch.tensor(i.lengths, device=i.q.device)
    longest = int(lengths.max())
    slot = torch.arange(longest, device=i.q.device)
    real = slot[None, :] < lengths[:, None]  # [segments, longest]
    # Padding slots read token 0 (any real token) and are masked out as keys.
    gather = torch.where(real, i.cu_seqlens[:-1, None].long() + slot[None, :], 0)
    keep = real.flatten().nonzero()[:, 0]  # padded slots of the real tokens, in packed order
    mask = None if bool(real.all()) else real[:, None, None, :]
    return gather, keep, mask


def _sdpa_packed(name: str, case: Case):
    padding = once(_padding)

    def forward(i: AttentionInputs):
        gather, keep, mask = padding(i)
        q, k, v = (_heads_first(t[gather]) for t in (i.q, i.k, i.v))  # [S, H, L, D]
        out = _heads_first(sdpa(name, q, k, v, mask=mask))  # [S, L, H, D]
        return out.flatten(0, 1)[keep]  # back to packed [T, H, D] (segments are consecutive)

    return forward


def _sdpa_build(name: str, case: Case):
    if case.params["group"] == "siglip":
        def forward(i: AttentionInputs):
            return _heads_first(sdpa(name, *map(_heads_first, (i.q, i.k, i.v))))
        return timed(case, forward)
    return timed(case, _sdpa_packed(name, case))


def _sdpa_skip(name: str, case: Case, device: torch.device) -> str | None:
    p = case.params
    if p["group"] == "siglip":
        segments, longest = p["batch"], p["seqlen"]
    else:
        segments, longest = p["segments"], p["max_seqlen"]
        lengths = segment_lengths(p["group"], p["images"], p["pixels"])
        if name == "flash" and len(set(lengths)) > 1:
            return "SDPA's flash kernel takes no mask, and these segments differ in length"
    scores = segments * p["heads"] * longest**2 * 4 * (1 if p["pass"] == "fwd" else 3)
    return sdpa_skip(name, device, scores)


def _flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask

    flex = compiled_flex()
    packed = case.params["group"] != "siglip"

    def build(i: AttentionInputs):
        if not packed:
            return None
        tokens = i.q.shape[0]
        lengths = torch.tensor(i.lengths, device=i.q.device)
        document = torch.repeat_interleave(torch.arange(len(i.lengths), device=i.q.device), lengths)
        return create_block_mask(lambda b, h, q_idx, kv_idx: document[q_idx] == document[kv_idx],
                                 None, None, tokens, tokens, device=i.q.device)

    mask = once(build)

    def forward(i: AttentionInputs):
        if packed:  # [T, H, D] -> [1, H, T, D]
            q, k, v = (_heads_first(t).unsqueeze(0) for t in (i.q, i.k, i.v))
            return _heads_first(flex(q, k, v, block_mask=mask(i)).squeeze(0))
        return _heads_first(flex(*map(_heads_first, (i.q, i.k, i.v))))

    return timed(case, forward)


def _xformers(case: Case):
    from xformers.ops import fmha, memory_efficient_attention

    if case.params["group"] == "siglip":
        return timed(case, lambda i: memory_efficient_attention(i.q, i.k, i.v))
    bias = once(lambda i: fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(i.lengths)))

    def forward(i: AttentionInputs):
        return memory_efficient_attention(i.q[None], i.k[None], i.v[None], attn_bias=bias(i))[0]

    return timed(case, forward)


def _flash_attn(module: str, case: Case):
    import importlib

    interface = importlib.import_module(module)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if case.params["group"] == "siglip":
        return timed(case, lambda i: first(interface.flash_attn_func(i.q, i.k, i.v)))

    def forward(i: AttentionInputs):
        return first(interface.flash_attn_varlen_func(
            i.q, i.k, i.v, cu_seqlens_q=i.cu_seqlens, cu_seqlens_k=i.cu_seqlens,
            max_seqlen_q=i.max_seqlen, max_seqlen_k=i.max_seqlen))

    return timed(case, forward)


def hf_sdpa_loop(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """Qwen2_5_VLVisionAttention with attn_implementation="sdpa" (transformers 5.x): q, k, v
    as [1, H, T, D], split along the tokens by the segment lengths read back to the host,
    one SDPA call per segment (each output transposed to [1, L, H, D] and made
    contiguous, as sdpa_attention_forward does), concatenated. Returns [T, H, D]."""
    import torch.nn.functional as F

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    splits = [torch.split(t, lengths, dim=2) for t in (q, k, v)]
    outs = [F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).contiguous()
            for qs, ks, vs in zip(*splits)]
    return torch.cat(outs, dim=1)[0]


def _hf_loop(case: Case):
    scale = case.params["head_dim"] ** -0.5

    def forward(i: AttentionInputs):
        # The module's transpose(0, 1).unsqueeze(0) of [T, H, D] states.
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (i.q, i.k, i.v))
        return hf_sdpa_loop(q, k, v, i.cu_seqlens, scale)

    return timed(case, forward)


def _cuda_short_skip(case: Case, device: torch.device) -> str | None:
    reason = mmfast_skip("cuda_short", case, device)
    if reason is None:
        from mmfast.cuda import build

        # Build (or load) the library here, so that no case times a compile.
        if not build.load(device):
            reason = f"CUDA C++ path unavailable: {build.unavailable_reason(device)}"
    return reason


def _packed_only(case: Case, device: torch.device) -> str | None:
    return "models the Qwen2.5-VL packed layers only" if case.params["group"] == "siglip" else None


def _providers() -> tuple[Provider, ...]:
    providers = [
        Provider("mmfast-triton-short", partial(_mmfast, "triton_short"), partial(mmfast_skip, "triton_short")),
        Provider("mmfast-cuda-short", partial(_mmfast, "cuda_short"), _cuda_short_skip),
        Provider("mmfast-triton", partial(_mmfast, "triton"), partial(mmfast_skip, "triton")),
    ]
    for name in SDPA_BACKENDS:
        providers.append(Provider(f"sdpa-{name}", partial(_sdpa_build, name), partial(_sdpa_skip, name)))
    providers += [
        Provider("flex", _flex, flex_skip),
        Provider("xformers", _xformers, lambda case, device: gpu_library_skip("xformers", device, "xformers")),
        Provider("flash-attn", partial(_flash_attn, "flash_attn"),
                 lambda case, device: gpu_library_skip("flash_attn.flash_attn_interface", device, "flash-attn 2")),
        Provider("flash-attn-4", partial(_flash_attn, "flash_attn.cute"),
                 lambda case, device: gpu_library_skip("flash_attn.cute", device, "flash-attn 4")),
        Provider("hf-sdpa-loop", _hf_loop, _packed_only),
    ]
    return tuple(providers)


_WINDOW_FWD_BWD = {"group": "window", "pass": "fwd+bwd"}
SPEEDUPS = (
    Speedup("mmfast-triton-short", ("xformers", "flex", "flash-attn", "flash-attn-4"), 1.5,
            "window layers fwd+bwd: >= 1.5x the best of xformers, flex, flash-attn varlen", _WINDOW_FWD_BWD),
    Speedup("mmfast-triton-short", ("hf-sdpa-loop",), 10.0,
            "window layers fwd+bwd: >= 10x the Hugging Face per-window SDPA loop", _WINDOW_FWD_BWD),
    Speedup("mmfast-cuda-short", ("mmfast-triton-short",), 1.2,
            "issue 9: window layers fwd, the CUDA C++ kernel >= 1.2x the Triton short kernel",
            {"group": "window", "pass": "fwd"}),
)

SUITE = Suite(
    name="qwen_window_attention",
    description="Qwen2.5-VL window / full attention layers and SigLIP-so400m, fwd and fwd+bwd",
    bound="compute",
    cases=cases,
    providers=_providers(),
    plot_x="tokens",
    plot_panels=("group", "pass"),
    speedups=SPEEDUPS,
)
