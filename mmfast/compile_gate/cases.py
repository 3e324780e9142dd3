"""The shapes the gate compiles at: the target models' hot calls, made through the
project's own launchers (kernels/*.py), which choose tiles, warps and stages as they would
on an H100. Each :class:`Case` calls one launcher family at one model shape; ``dims`` are
the problem sizes the tensor-core work model needs (mmfast.compile_gate.work).

Targets: Qwen2.5-VL / Qwen3-VL / SigLIP vision towers (head dims 80 / 72 / 64, hidden
1152-1280, 64-token windows with fused 2D rotary, 1344 px images = 9216 patches), LM
decoders (head dim 128, GQA 28/4, vocab up to 151936), SD1.5 / SDXL UNets and their VAE
(channels 128-1280, head dims 40/80/160 and 64, 77 text tokens), SD3 / FLUX DiTs (hidden
1536 / 3072, head dims 64 / 128), contrastive towers (feature dims 512-1024), SAM's image
encoder (14 x 14 windows and 64 x 64 global attention with the relative-position bias).

``quick`` cases make the CI subset: together they launch every entry kernel at least
once, at a production shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .fake_cuda import tensor

DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class Case:
    family: str
    shape: str
    run: Callable[[torch.dtype], None]
    dims: dict = field(default_factory=dict)
    quick: bool = False
    quick_dtypes: tuple = (torch.bfloat16,)  # the quick subset's dtypes (the full run: DTYPES)


def _cu(segments: int) -> torch.Tensor:
    return tensor(segments + 1, dtype=torch.int32)


# ---- pointwise and norms ---------------------------------------------------------------


def _activation(tokens: int, inner: int, kinds):
    def run(dtype):
        from mmfast.kernels import activation as a
        x = tensor(tokens, inner, dtype=dtype)
        for kind in kinds:
            a.act_fwd(x, kind)
            a.act_bwd(x, x, kind)
            xx = tensor(tokens, 2 * inner, dtype=dtype)
            for gate_first in (True, False):
                a.gated_split_fwd(xx, kind, gate_first)
                a.gated_split_bwd(x, xx, kind, gate_first)
    return run


# (is_rms, weight, bias, residual): RMSNorm with the residual add (LM and Qwen2.5-VL vision
# blocks), LayerNorm with affine (CLIP / SigLIP), LayerNorm without affine (DiT, before adaLN).
NORM_KINDS = ((True, True, False, True), (False, True, True, False), (False, False, False, False))


def _norm(tokens: int, hidden: int, kinds=NORM_KINDS):
    def run(dtype):
        from mmfast.kernels import norm as n
        x = tensor(tokens, hidden, dtype=dtype)
        w = tensor(hidden, dtype=dtype)
        for is_rms, has_w, has_b, has_res in kinds:
            weight, bias, res = (w if has_w else None), (w if has_b else None), (x if has_res else None)
            y, res_out, mean, rstd = n.norm_fwd(x, weight, bias, res, 1e-6, is_rms)
            n.norm_bwd(x, x, weight, bias is not None, mean, rstd, x if res is not None else None, is_rms)
    return run


def _adaln(batch: int, tokens: int, channels: int):
    def run(dtype):
        from mmfast.kernels import adaln as a
        x = tensor(batch, tokens, channels, dtype=dtype)
        mod = tensor(batch, 6 * channels, dtype=dtype)[:, :channels]  # a chunk of the modulation
        y, mean, rstd = a.adaln_fwd(x, mod, mod, 1e-6)
        a.adaln_bwd(x, x, mod, mean, rstd)
        a.gated_residual_fwd(x, mod, x)
        a.gated_residual_bwd(x, mod, x)
    return run


def _group_norm(batch: int, channels: int, side: int):
    def run(dtype):
        from mmfast.kernels import group_norm as g
        x = tensor(batch, channels, side, side, dtype=dtype)
        w = tensor(channels, dtype=dtype)
        for silu in (False, True):
            y, mean, rstd = g.group_norm_fwd(x, w, w, 32, 1e-6, silu)
            g.group_norm_bwd(x, x, w, w, mean, rstd, 32, silu)
    return run


def _channel_rms_norm(channels: int, frames: int, height: int, width: int):
    def run(dtype):
        from mmfast.kernels import channel_rms_norm as n
        x = tensor(1, channels, frames, height, width, dtype=dtype)
        w = tensor(channels, dtype=dtype)
        for silu in (False, True):
            n.channel_rms_norm_fwd(x, w, None, silu)
    return run


def _rotary(tokens: int, heads: int, kv_heads: int, head_dim: int, rotary_dim: int):
    def run(dtype):
        from mmfast.kernels import rotary as r
        q = tensor(tokens, heads, head_dim, dtype=dtype)
        k = tensor(tokens, kv_heads, head_dim, dtype=dtype)
        cos = tensor(tokens, rotary_dim // 2, dtype=torch.float32)
        for interleaved in (False, True):
            for conj in (False, True):
                r.rotary(q, k, cos, cos, interleaved, conj)
    return run


def _scheduler_step(batch: int, channels: int, side: int):
    def run(dtype):
        from mmfast.kernels import scheduler_step as s
        lat = tensor(batch, channels, side, side, dtype=dtype)
        coef = (0.5,) * 8
        table = tensor(50, 8, dtype=torch.float32)
        step = tensor(2, dtype=torch.int32)
        # CFG with rescale and the x0 output (DDIM), plain step with noise (Euler
        # ancestral), the device-table path (CUDA graphs) with the previous x0 (DPM++).
        s.guided_step_fwd(lat, lat, lat, None, None, lat, lat, coef, None, None, 7.5, 0.7, True, True)
        s.guided_step_fwd(lat, lat, None, None, lat, lat, None, coef, None, None, 1.0, 0.0, False, False)
        s.guided_step_fwd(lat, lat, lat, lat, None, lat, None, coef, table, step, 7.5, 0.0, False, False)
        # UniPC (Wan): the corrector stage with both previous x0, x0 and the corrected sample out.
        s.guided_step_fwd(lat, lat, lat, lat, None, lat, lat, coef, None, None, 5.0, 0.0, False, True,
                          lat, lat, lat, (0.5,) * 4)
    return run


def _linear_cross_entropy(rows: int, vocab: int):
    def run(dtype):
        from mmfast.kernels import linear_cross_entropy as l
        logits = tensor(rows, vocab, dtype=dtype)
        target = tensor(rows, dtype=torch.int64)
        scale = tensor(rows, dtype=torch.float32)
        for write_grad, smoothing in ((False, 0.0), (True, 0.0), (True, 0.1)):
            l.linear_cross_entropy_fwd(logits, target, scale, -100, smoothing, 1e-4, write_grad)
    return run


# ---- matmul kernels ---------------------------------------------------------------------


def _contrastive(batch: int, dim: int):
    def run(dtype):
        from mmfast.kernels import contrastive as c
        x = tensor(batch, dim, dtype=dtype)
        s = tensor(dtype=torch.float32)  # a 0-d scale
        coef = tensor(2, dtype=torch.float32)
        stats, _ = c.softmax_lse_rows(x, x, s, 0)
        c.softmax_lse_rows(x, x, s, batch // 2, 0, True)             # NT-Xent
        stats_c, _ = c.softmax_lse_cols(x, x, s, 0)
        c.sigmoid_rows(x, x, s, s, 0)
        for kind, stats_r, cols, both in (("clip", stats, stats_c, False), ("rows", stats, None, True),
                                          ("sigmoid", None, None, False)):
            bias = s if kind == "sigmoid" else None
            c.contrastive_bwd_rows(x, x, s, bias, stats_r, cols, coef, 0, 0 if both else None, kind, both, dtype)
            c.contrastive_bwd_cols(x, x, s, bias, stats_r, cols, coef, 0, None, kind, both, dtype)
        thr = tensor(batch, dtype=torch.float32)
        c.count_above(x, x, thr, False)
        c.count_above(x, x, thr, True)
    return run


def _patch_embed_image(batch: int, channels: int, side: int, patch: int, embed: int, cls: bool):
    def run(dtype):
        from mmfast.kernels import patch_embed as p
        x = tensor(batch, channels, side, side, dtype=dtype)
        w = tensor(embed, channels * patch * patch, dtype=dtype)
        tokens = (side // patch) ** 2 + int(cls)
        pos = tensor(tokens, embed, dtype=dtype)
        bias = tensor(embed, dtype=dtype)
        p.patch_embed_fwd(x, w, bias, pos, bias if cls else None, patch)
        dout = tensor(batch, tokens, embed, dtype=dtype)
        p.patch_embed_bwd(dout, x, w, patch, cls, True, True)
    return run


def _patch_embed_rows(rows: int, k: int, embed: int):
    def run(dtype):
        from mmfast.kernels import patch_embed as p
        x = tensor(rows, k, dtype=dtype)
        w = tensor(embed, k, dtype=dtype)
        p.patch_embed_fwd(x, w, None, None, None, 1)
        p.patch_embed_bwd(tensor(rows, embed, dtype=dtype), x, w, 1, False, True, True)
    return run


# ---- attention --------------------------------------------------------------------------


def _attention_packed(segments: int, seqlen: int, heads: int, kv_heads: int, head_dim: int,
                      rotary: bool = False, causal: bool = False, window: int = -1, dropout: float = 0.0):
    def run(dtype):
        from mmfast.kernels import attention as a
        tokens = segments * seqlen
        q = tensor(tokens, heads, head_dim, dtype=dtype)
        k = tensor(tokens, kv_heads, head_dim, dtype=dtype)
        cu = _cu(segments)
        cos = tensor(tokens, head_dim // 2, dtype=torch.float32) if rotary else None
        seed = tensor(2, dtype=torch.int64) if dropout else None
        right = 0 if causal else -1
        o, lse = a.attention_fwd(q, k, k, cu, cu, seqlen, seqlen, window, right, 0.1, cos, cos, seed, dropout)
        a.attention_bwd(q, q, k, k, o, lse, None, cu, cu, seqlen, seqlen, window, right, 0.1, cos, cos,
                        seed, dropout)
    return run


def _attention_padded(batch: int, seqlen: int, heads: int, head_dim: int, dlse: bool = False):
    def run(dtype):
        from mmfast.kernels import attention as a
        q = tensor(batch, seqlen, heads, head_dim, dtype=dtype)
        o, lse = a.attention_fwd(q, q, q, None, None, seqlen, seqlen, -1, -1, 0.1)
        a.attention_bwd(q, q, q, q, o, lse, lse if dlse else None, None, None, seqlen, seqlen, -1, -1, 0.1)
    return run


def _attention_qk_norm(batch: int, segments: int, seqlen: int, heads: int, kv_heads: int, head_dim: int,
                       rotary: bool, causal: bool = False):
    """Per-head q/k RMSNorm inside the attention kernels (qk_norm, weights [D]), before the
    fused rotary: padded with batch > 0, else packed in ``segments``."""
    def run(dtype):
        from mmfast.kernels import attention as a
        lead = (batch, seqlen) if batch else (segments * seqlen,)
        q = tensor(*lead, heads, head_dim, dtype=dtype)
        k = tensor(*lead, kv_heads, head_dim, dtype=dtype)
        cu = None if batch else _cu(segments)
        cos = tensor(lead[-1], head_dim // 2, dtype=torch.float32) if rotary else None
        norm = (tensor(head_dim, dtype=dtype), tensor(head_dim, dtype=dtype), 1e-6)
        right = 0 if causal else -1
        o, lse = a.attention_fwd(q, k, k, cu, cu, seqlen, seqlen, -1, right, 0.1, cos, cos, qk_norm=norm)
        a.attention_bwd(q, q, k, k, o, lse, None, cu, cu, seqlen, seqlen, -1, right, 0.1, cos, cos, qk_norm=norm)
    return run


def _attention_short(segments: int, seqlen: int, heads: int, head_dim: int, rotary: bool,
                     dropout: float = 0.0):
    def run(dtype):
        from mmfast.kernels import attention_short as s
        tokens = segments * seqlen
        q = tensor(tokens, heads, head_dim, dtype=dtype)
        cu = _cu(segments)
        cos = tensor(tokens, head_dim // 2, dtype=torch.float32) if rotary else None
        seed = tensor(2, dtype=torch.int64) if dropout else None
        o, lse = s.attention_short_fwd(q, q, q, cu, cu, seqlen, seqlen, -1, -1, 0.1, cos, cos, 0, seed, dropout)
        s.attention_short_bwd(q, q, q, q, o, lse, None, cu, cu, seqlen, seqlen, -1, -1, 0.1, cos, cos, 0,
                              seed, dropout)
    return run


def _cross_attention(batch: int, seq_q: int, seq_k: int, heads: int, head_dim: int,
                     gated: bool = False, masked: bool = False):
    def run(dtype):
        from mmfast.kernels import cross_attention as c
        q = tensor(batch * seq_q, heads, head_dim, dtype=dtype)
        k = tensor(batch * seq_k, heads, head_dim, dtype=dtype)
        alpha = tensor(heads, dtype=torch.float32) if gated else None
        mask = tuple(tensor(batch * seq_k, dtype=torch.int32) for _ in range(5)) if masked else None
        out, o, lse = c.cross_attention_fwd(q, k, k, None, None, batch, seq_q, seq_k, seq_q, seq_k, mask,
                                            alpha, q if gated else None, 0.1)
        c.cross_attention_bwd(q, q, k, k, o, lse, None, None, batch, seq_q, seq_k, seq_q, seq_k, mask, alpha, 0.1)
    return run


def _attention_rel_pos(batch: int, grid: int, heads: int, head_dim: int = 64):
    def run(dtype):
        from mmfast.kernels import attention_rel_pos as r
        tokens = grid * grid
        # q, k, v as the SAM patch passes them: views of one [B, T, 3, H, D] projection.
        q, k, v = tensor(batch, tokens, 3, heads, head_dim, dtype=dtype).unbind(2)
        rel = tensor(batch, tokens, heads, grid, dtype=dtype)
        out, stats = r.attention_rel_pos_fwd(q, k, v, rel, rel, head_dim ** -0.5)
        r.attention_rel_pos_bwd(out, q, k, v, rel, rel, out, stats, head_dim ** -0.5)
    return run


def _dropout_mask(dtype):
    from mmfast.kernels import attention_dropout as d
    d.dropout_mask(tensor(2, dtype=torch.int64), 0, 1024, 1024, 0, 2**30)


def _attn_dims(seq_q, seq_k, head_dim, segments=1):
    return {"seq_q": seq_q, "seq_k": seq_k, "head_dim": head_dim, "segments": segments}


def all_cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append

    # Pointwise: GELU MLPs (CLIP/SigLIP 4304-5120), GEGLU (SD UNet 1280-5120), SwiGLU (Qwen
    # vision 3420, LM 18944), gelu_tanh (DiT 6144).
    kinds = ("gelu", "gelu_tanh", "quick_gelu", "silu")
    add(Case("activation", "T4096 N5120", _activation(4096, 5120, kinds)))
    # Rows of 3420 leave the second half 8 bytes off 16-byte alignment (gelu_tanh's fp16
    # backward once spilled there).
    add(Case("activation", "T4096 N3420", _activation(4096, 3420, kinds), quick=True, quick_dtypes=DTYPES))
    add(Case("activation", "T1024 N18944", _activation(1024, 18944, ("silu",))))
    for hidden in (768, 1152, 1280, 1536, 2048, 3072, 3584, 4096, 8192, 16384, 32768, 65536):
        add(Case("norm", f"M4096 N{hidden}", _norm(4096, hidden), quick=hidden in (1280, 16384, 65536)))
    # Qwen3-VL: LayerNorm with affine and the residual add in its vision blocks (hidden 1152),
    # its DeepStack mergers' LayerNorm over 4 x 1152 = 4608, and the Qwen3 LM's RMSNorm of
    # each q / k head (128 wide, 32 heads x 4096 tokens).
    add(Case("norm", "Qwen3-VL vision LN+res M7056 N1152", _norm(7056, 1152, ((False, True, True, True),))))
    add(Case("norm", "Qwen3-VL DeepStack LN M1764 N4608", _norm(1764, 4608, ((False, True, True, False),))))
    add(Case("norm", "Qwen3 q/k head RMS M131072 N128", _norm(131072, 128, ((True, True, False, False),))))
    for channels in (1152, 1536, 3072):
        add(Case("adaln", f"B2 T4429 C{channels}", _adaln(2, 4429, channels), quick=channels == 1536))
    for channels, side in ((320, 64), (640, 32), (1280, 16), (1280, 8), (128, 512), (256, 256), (512, 128)):
        add(Case("group_norm", f"B2 C{channels} {side}x{side}", _group_norm(2, channels, side),
                 quick=(channels, side) == (320, 64)))
    # Wan 2.1 VAE decode at 480p: 384 channels at the latent's 60x104, 96 at full size.
    for channels, frames, height, width in ((384, 2, 60, 104), (192, 4, 240, 416), (96, 4, 480, 832)):
        add(Case("channel_rms_norm", f"C{channels} T{frames} {height}x{width}",
                 _channel_rms_norm(channels, frames, height, width), quick=channels == 384))
    add(Case("rotary", "T9216 H16 D80 R80", _rotary(9216, 16, 16, 80, 80), quick=True))
    add(Case("rotary", "T9216 H16 D72 R72", _rotary(9216, 16, 16, 72, 72)))
    add(Case("rotary", "T4096 H28/4 D128 R128", _rotary(4096, 28, 4, 128, 128)))
    add(Case("rotary", "T4096 H32/8 D128 R64", _rotary(4096, 32, 8, 128, 64)))
    add(Case("scheduler_step", "B2 C4 64x64", _scheduler_step(2, 4, 64), quick=True))
    add(Case("scheduler_step", "B2 C16 128x128", _scheduler_step(2, 16, 128)))
    for vocab in (32000, 128256, 151936):
        add(Case("linear_cross_entropy", f"n4096 V{vocab}", _linear_cross_entropy(4096, vocab),
                 quick=vocab == 151936))

    # Matmul kernels.
    for batch, dim in ((1024, 512), (4096, 768), (4096, 1024), (1024, 1152)):
        add(Case("contrastive", f"B{batch} D{dim}", _contrastive(batch, dim),
                 {"m": batch, "n": batch, "d": dim}, quick=(batch, dim) == (4096, 1024)))
    for name, args in (("SigLIP 384px P14 E1152", (8, 3, 378, 14, 1152, False)),
                       ("CLIP-L 224px P14 E1024 cls", (32, 3, 224, 14, 1024, True)),
                       ("SigLIP 256px P16 E768", (32, 3, 256, 16, 768, False)),
                       ("SD3 latent 128 P2 E1536", (2, 16, 128, 2, 1536, False))):
        b, c, side, p, e, cls = args
        rows = b * ((side // p) ** 2 + int(cls))
        add(Case("patch_embed", name, _patch_embed_image(*args),
                 {"m": rows, "n": e, "k": c * p * p}, quick=name.startswith("SigLIP 384")))
    add(Case("patch_embed", "Qwen2.5-VL rows 9216 K1176 E1280", _patch_embed_rows(9216, 1176, 1280),
             {"m": 9216, "n": 1280, "k": 1176}))

    # Attention: vision towers (full attention, fused rotary for Qwen), LM prefill, DiTs.
    add(Case("attention", "Qwen2.5-VL full 9216 H16 D80 rotary", _attention_packed(1, 9216, 16, 16, 80, rotary=True),
             _attn_dims(9216, 9216, 80), quick=True))
    add(Case("attention", "Qwen2.5-VL 144 windows of 64 H16 D80 rotary",
             _attention_packed(144, 64, 16, 16, 80, rotary=True), _attn_dims(64, 64, 80, 144)))
    add(Case("attention", "Qwen3-VL 4096 H16 D72 rotary", _attention_packed(1, 4096, 16, 16, 72, rotary=True),
             _attn_dims(4096, 4096, 72)))
    add(Case("attention", "SigLIP B8 729 H16 D72", _attention_padded(8, 729, 16, 72), _attn_dims(729, 729, 72, 8)))
    add(Case("attention", "SigLIP-B B32 196 H12 D64", _attention_padded(32, 196, 12, 64, dlse=True),
             _attn_dims(196, 196, 64, 32)))
    add(Case("attention", "LM causal 4096 H28/4 D128", _attention_packed(1, 4096, 28, 4, 128, causal=True),
             _attn_dims(4096, 4096, 128)))
    add(Case("attention", "LM sliding window 4096 H32/8 D128", _attention_packed(1, 4096, 32, 8, 128, causal=True,
                                                                             window=1024),
             _attn_dims(4096, 4096, 128)))
    add(Case("attention", "ViT dropout 1024 H16 D64", _attention_packed(4, 1024, 16, 16, 64, dropout=0.1),
             _attn_dims(1024, 1024, 64, 4)))
    add(Case("attention", "SD3 B2 4250 H24 D64", _attention_padded(2, 4250, 24, 64), _attn_dims(4250, 4250, 64, 2)))
    add(Case("attention", "FLUX B1 4608 H24 D128", _attention_padded(1, 4608, 24, 128), _attn_dims(4608, 4608, 128)))
    # q/k RMSNorm fused before the rotary (qk_norm): FLUX single-stream / FLUX.2 (4096 image +
    # 512 text tokens, 3-axis table), SD3.5 (no rotary), the Qwen3 LM (causal, GQA), and the
    # two-piece head dims 80 / 72 (Qwen-VL-like towers).
    add(Case("attention_qk_norm", "FLUX B1 4608 H24 D128 rotary", _attention_qk_norm(1, 0, 4608, 24, 24, 128, True),
             _attn_dims(4608, 4608, 128), quick=True))
    add(Case("attention_qk_norm", "SD3.5 B2 4250 H24 D64", _attention_qk_norm(2, 0, 4250, 24, 24, 64, False),
             _attn_dims(4250, 4250, 64, 2)))
    add(Case("attention_qk_norm", "Qwen3 causal 4096 H32/8 D128 rotary",
             _attention_qk_norm(0, 1, 4096, 32, 8, 128, True, causal=True), _attn_dims(4096, 4096, 128)))
    add(Case("attention_qk_norm", "packed 9216 H16 D80 rotary", _attention_qk_norm(0, 1, 9216, 16, 16, 80, True),
             _attn_dims(9216, 9216, 80)))
    add(Case("attention_qk_norm", "packed 4096 H16 D72 rotary", _attention_qk_norm(0, 1, 4096, 16, 16, 72, True),
             _attn_dims(4096, 4096, 72)))
    for head_dim, side in ((40, 64), (80, 32), (160, 16)):   # SD1.5 UNet self-attention
        add(Case("attention", f"SD1.5 self B2 {side * side} H8 D{head_dim}",
                 _attention_padded(2, side * side, 8, head_dim), _attn_dims(side * side, side * side, head_dim, 2)))
    add(Case("attention_short", "Qwen2.5-VL windows 144x64 H16 D80 rotary", _attention_short(144, 64, 16, 80, True),
             _attn_dims(64, 64, 80, 144), quick=True))
    add(Case("attention_short", "windows 144x64 H16 D72 rotary", _attention_short(144, 64, 16, 72, True),
             _attn_dims(64, 64, 72, 144)))
    add(Case("attention_short", "windows 256x16 H16 D64", _attention_short(256, 16, 16, 64, False),
             _attn_dims(16, 16, 64, 256)))
    add(Case("attention_short", "windows 64x128 H16 D128 dropout", _attention_short(64, 128, 16, 128, False, 0.1),
             _attn_dims(128, 128, 128, 64)))
    add(Case("attention_dropout", "mask 1024x1024", _dropout_mask, quick=True))
    # SAM's image encoder at 1024 px (64 x 64 patches): 25 windows of 14 x 14 per image (the
    # grid padded to 70), and the global layers over all 4096 tokens; head dim 64.
    for model, heads in (("ViT-B", 12), ("ViT-H", 16)):
        add(Case("attention_rel_pos", f"SAM {model} windows 25x14x14 H{heads} D64", _attention_rel_pos(25, 14, heads),
                 _attn_dims(196, 196, 64, 25)))
        add(Case("attention_rel_pos", f"SAM {model} global 64x64 H{heads} D64", _attention_rel_pos(1, 64, heads),
                 _attn_dims(4096, 4096, 64), quick=model == "ViT-H"))
    # Cross-attention: SD1.5 (8 heads, head dims 40/80/160, 77 text tokens), SDXL (64),
    # BLIP-2 Q-Former (32 queries over 257 image tokens), gated (Flamingo/Mllama-style).
    for head_dim, side in ((40, 64), (80, 32), (160, 16)):
        add(Case("cross_attention", f"SD1.5 B2 {side * side}x77 H8 D{head_dim}",
                 _cross_attention(2, side * side, 77, 8, head_dim), _attn_dims(side * side, 77, head_dim, 2)))
    add(Case("cross_attention", "SDXL B2 4096x77 H10 D64", _cross_attention(2, 4096, 77, 10, 64),
             _attn_dims(4096, 77, 64, 2)))
    # Few queries over many keys: the keys are split over programs, then combined.
    add(Case("cross_attention", "Q-Former B1 32x4096 H8 D64 key splits", _cross_attention(1, 32, 4096, 8, 64),
             _attn_dims(32, 4096, 64), quick=True))
    add(Case("cross_attention", "BLIP-2 B8 32x257 H12 D64 masked", _cross_attention(8, 32, 257, 12, 64, masked=True),
             _attn_dims(32, 257, 64, 8)))
    add(Case("cross_attention", "gated B2 1601x1024 H32 D128", _cross_attention(2, 1601, 1024, 32, 128, gated=True),
             _attn_dims(1601, 1024, 128, 2)))
    return cases
