"""Running one model across the ranks of a torch.distributed group.

:func:`ulysses_attention` is Ulysses sequence parallelism for attention (all-to-all of
heads, attention over the whole sequence, all-to-all back); :func:`shard_sequence` and
:func:`gather_sequence` split a sequence into per-rank chunks and put it back together.
``mmfast.patch(model, sequence_parallel=group)`` uses them to run a diffusers DiT
(SD3Transformer2DModel, DiTTransformer2DModel, FluxTransformer2DModel,
Flux2Transformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel) on every rank
of ``group``.
Communication is torch.distributed's own collectives only.
"""

from mmfast.distributed.sequence import gather_sequence, shard_length, shard_sequence
from mmfast.distributed.ulysses import ulysses_attention

__all__ = ["gather_sequence", "shard_length", "shard_sequence", "ulysses_attention"]
