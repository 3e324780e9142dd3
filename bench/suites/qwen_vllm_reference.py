"""A vLLM-style Qwen2.5-VL vision tower in plain PyTorch: the reference the
qwen_vision_tower suite holds mmfast against, besides Hugging Face.

It is built the way vLLM builds the tower when flash-attn is absent, with none of
mmfast's kernels:

- patch embedding as one GEMM on the pre-patchified ``[N, 3*2*14*14]`` input
  (``F.linear`` on the Conv3d weight flattened, a view);
- qkv as one GEMM and gate+up merged into one GEMM (vLLM's stacked weights);
- RMSNorm, SiLU-gated MLP and the 2D rotary embedding in plain torch;
- packed variable-length attention per layer over the frame segments (full-attention
  layers) or the windows: ``backend="xformers"`` runs xformers'
  ``memory_efficient_attention`` with ``BlockDiagonalMask.from_seqlens``;
  ``backend="sdpa"`` batches the segments into one ``scaled_dot_product_attention``
  call, as a plain view when they are all the same length (every window of the
  benchmark's image sizes) and else padded to the longest with a key-padding mask (a
  block-diagonal mask over the whole stream would take N^2 memory);
- the window permutation of the merge units as Hugging Face does it, and the
  grid-derived indices cached per grid as vLLM caches them.

``ReferenceQwen25VisionTower.from_hf(tower, backend)`` copies the weights of a Hugging
Face ``Qwen2_5_VisionTransformerPretrainedModel``; ``forward(pixels, grid_thw)`` returns
the merged tokens (the HF tower's ``pooler_output``). The index cache reads ``grid_thw``
to the host once per call (one sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("sdpa", "xformers")


class _Segments(NamedTuple):
    """One packing of the stream into attention segments, ready for either backend."""

    lengths: list[int]
    pad_index: Tensor | None   # [N] positions in the padded [S * Lmax] buffer; None if all equal
    key_mask: Tensor | None    # [S, 1, 1, Lmax] bool, True where a key exists
    xformers_bias: object      # BlockDiagonalMask (xformers backend only)


class _Plumbing(NamedTuple):
    window_index: Tensor       # [units] merge units in window order
    reverse_index: Tensor
    cos: Tensor                # [N, head_dim] float32, in window order
    sin: Tensor
    full: _Segments            # one segment per frame
    windows: _Segments


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on [N, H, D] with rotate-half pairing; cos/sin [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, inter: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.Parameter(torch.ones(dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gate_up = nn.Linear(dim, 2 * inter)
        self.down = nn.Linear(inter, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: _Segments, backend: str) -> Tensor:
        n, dim = x.shape
        q, k, v = self.qkv(rms_norm(x, self.norm1, 1e-6)).view(n, 3, self.heads, -1).unbind(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        x = x + self.proj(_attention(q, k, v, segments, backend).reshape(n, dim))
        gate, up = self.gate_up(rms_norm(x, self.norm2, 1e-6)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _attention(q: Tensor, k: Tensor, v: Tensor, seg: _Segments, backend: str) -> Tensor:
    """Bidirectional attention inside each segment of the packed [N, H, D] stream."""
    n, heads, dim = q.shape
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=seg.xformers_bias)[0]
    count, longest = len(seg.lengths), max(seg.lengths)
    if seg.pad_index is None:  # equal segments: a view, no copy and no mask
        q, k, v = (t.view(count, longest, heads, dim).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, heads, dim)
    padded = [t.new_zeros(count * longest, heads, dim).index_copy(0, seg.pad_index, t) for t in (q, k, v)]
    q, k, v = (t.view(count, longest, heads, dim).transpose(1, 2) for t in padded)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.key_mask)
    return out.transpose(1, 2).reshape(count * longest, heads, dim).index_select(0, seg.pad_index)


def _segments(lengths: list[int], device: torch.device, backend: str) -> _Segments:
    longest = max(lengths)
    pad_index = key_mask = bias = None
    if backend == "xformers":
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        try:
            bias = BlockDiagonalMask.from_seqlens(lengths, device=device)
        except TypeError:  # xformers before from_seqlens took a device
            bias = BlockDiagonalMask.from_seqlens(lengths)
    elif any(length != longest for length in lengths):
        lens = torch.tensor(lengths, device=device)
        starts = torch.arange(len(lengths), device=device) * longest
        offsets = torch.arange(sum(lengths), device=device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        pad_index = torch.repeat_interleave(starts, lens) + offsets
        key_mask = (torch.arange(longest, device=device) < lens[:, None])[:, None, None, :]
    return _Segments(lengths, pad_index, key_mask, bias)


def _window_order(grid: list[list[int]], merge: int, side: int) -> tuple[Tensor, list[int]]:
    """Merge units in window order and the window lengths in patches, per Hugging Face's
    get_window_index (windows of side x side units, cut short at the edges)."""
    order, lengths, base = [], [], 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        units = torch.arange(t * gh * gw).view(t, gh, gw)
        for frame in range(t):
            for r in range(0, gh, side):
                for c in range(0, gw, side):
                    window = units[frame, r:r + side, c:c + side].reshape(-1)
                    order.append(window + base)
                    lengths.append(window.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), lengths


def _positions(grid: list[list[int]], merge: int) -> Tensor:
    """(row, column) of every patch in the block-major stream order."""
    out = []
    for t, h, w in grid:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        pos = torch.stack([rows.reshape(block).transpose(1, 2).flatten(),
                           cols.reshape(block).transpose(1, 2).flatten()], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


class ReferenceQwen25VisionTower(nn.Module):
    """The Qwen2.5-VL vision tower, vLLM-style in plain PyTorch (see the module doc)."""

    def __init__(self, config, backend: str = "sdpa"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if config.hidden_act != "silu":
            raise ValueError(f"config.hidden_act: only 'silu' is modelled, got {config.hidden_act!r}")
        dim, heads = config.hidden_size, config.num_heads
        self.backend, self.heads = backend, heads
        self.merge, self.patch_size = config.spatial_merge_size, config.patch_size
        self.window_side = config.window_size // config.spatial_merge_size // config.patch_size
        self.full_blocks = set(config.fullatt_block_indexes)
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
        self.patch_weight = nn.Parameter(torch.empty(dim, patch_dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, config.intermediate_size) for _ in range(config.depth))
        merged = dim * self.merge ** 2
        self.merger_norm = nn.Parameter(torch.ones(dim))
        self.merger_fc1 = nn.Linear(merged, merged)
        self.merger_fc2 = nn.Linear(merged, config.out_hidden_size)
        # Half of each head rotates with the patch row, half with the column. Kept off the
        # module (not a buffer) so a cast to bf16 never rounds the frequencies.
        half = dim // heads // 2
        self.inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, half, 2).double() / half)
        self._cache: dict = {}

    @classmethod
    @torch.no_grad()
    def from_hf(cls, hf: nn.Module, backend: str = "sdpa") -> "ReferenceQwen25VisionTower":
        """The same weights as the Hugging Face tower ``hf``, on its device and dtype."""
        weight = hf.patch_embed.proj.weight
        ref = cls(hf.config, backend).to(weight.device, weight.dtype)
        ref.patch_weight.copy_(weight.flatten(1))
        for ours, theirs in zip(ref.blocks, hf.blocks):
            ours.norm1.copy_(theirs.norm1.weight)
            ours.norm2.copy_(theirs.norm2.weight)
            ours.qkv.load_state_dict(theirs.attn.qkv.state_dict())
            ours.proj.load_state_dict(theirs.attn.proj.state_dict())
            mlp = theirs.mlp
            ours.gate_up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            ours.gate_up.bias.copy_(torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]))
            ours.down.load_state_dict(mlp.down_proj.state_dict())
        ref.merger_norm.copy_(hf.merger.ln_q.weight)
        ref.merger_fc1.load_state_dict(hf.merger.mlp[0].state_dict())
        ref.merger_fc2.load_state_dict(hf.merger.mlp[2].state_dict())
        return ref

    def _plumbing(self, grid_thw: Tensor) -> _Plumbing:
        grid = grid_thw.tolist()  # the one host sync
        key = (str(grid_thw.device), tuple(map(tuple, grid)))
        if key not in self._cache:
            device = grid_thw.device
            window_index, window_lengths = _window_order(grid, self.merge, self.window_side)
            freqs = _positions(grid, self.merge).float()[..., None] * self.inv_freq.float()
            freqs = freqs.flatten(1)  # [N, D/2]: the row angles, then the column angles
            unit = self.merge ** 2
            freqs = freqs.view(-1, unit, freqs.shape[-1])[window_index].flatten(0, 1)
            angles = torch.cat([freqs, freqs], dim=-1)
            frames = [h * w for t, h, w in grid for _ in range(t)]
            self._cache[key] = _Plumbing(
                window_index.to(device), torch.argsort(window_index).to(device),
                angles.cos().to(device), angles.sin().to(device),
                _segments(frames, device, self.backend), _segments(window_lengths, device, self.backend))
        return self._cache[key]

    def forward(self, pixels: Tensor, grid_thw: Tensor) -> Tensor:
        plumbing = self._plumbing(grid_thw)
        x = F.linear(pixels.to(self.patch_weight.dtype), self.patch_weight)
        n, dim = x.shape
        unit = self.merge ** 2
        x = x.view(-1, unit, dim)[plumbing.window_index].view(n, dim)
        cos, sin = plumbing.cos.to(x.dtype), plumbing.sin.to(x.dtype)
        for i, block in enumerate(self.blocks):
            segments = plumbing.full if i in self.full_blocks else plumbing.windows
            x = block(x, cos, sin, segments, self.backend)
        merged = rms_norm(x, self.merger_norm, 1e-6).view(-1, unit * dim)
        merged = self.merger_fc2(F.gelu(self.merger_fc1(merged)))
        return merged[plumbing.reverse_index]


def xformers_available() -> bool:
    from mmfast.dispatch import module_available

    return module_available("xformers")

