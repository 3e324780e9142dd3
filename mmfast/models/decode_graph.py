"""``generate(..., cuda_graph=True)`` for the VLMs: the one-token decode step captured once
in a CUDA graph and replayed per token.

The step (embedding -> decoder over the KV cache -> final norm -> lm_head -> argmax or
sample -> pad where finished) is the one :func:`mmfast.models.generation.decode` runs
eagerly, with the same kernels and shapes, so greedy ids match ``cuda_graph=False``
exactly. What a graph needs and the step provides:

- fixed shapes and addresses: the cache's static decode path (device lengths, attention
  over the whole buffer with per-sequence segments; see :mod:`mmfast.models.kv_cache`);
  the token, position, finished flags and output live in tensors made once per graph;
- no host reads: positions advance in place on the device, each token is written to a
  ``[B, capacity]`` buffer at a device counter, sampling draws through
  :func:`~mmfast.models.generation.draw` (no sync inside).

The first new token is picked eagerly from the prefill's output; the graph then runs
steps 2..n. The graph, its KV cache and its static tensors are kept (one set per model)
for the next ``generate`` with the same batch, cache capacity (longest prompt +
``max_new_tokens``), dtype, device, decoding settings and generator object; the prompt is
prefilled into that same cache. Changing any of them captures a new graph, freeing the
old one first (capacity buckets, so that prompts of other lengths reuse a graph, are left
for later: the capacity sizes the attention call, and must match ``cuda_graph=False``'s
for equal ids).

End of sequence: the host checks "every sequence finished" once every
:data:`EOS_CHECK_EVERY` replays (one sync each) instead of after every token: a few
wasted steps at the end buy a sync-free stretch of replays. Steps run past the end only
produce pad tokens (their K/V land in slots the capacity already holds), and the result
is cut to the length the host-driven loop returns (one sync at the end), so the outputs
are equal.

Sampling: the draws come from ``generator`` (a CUDA generator on the model's device,
registered with the graph so that every replay advances it; needs
``CUDAGraph.register_generator_state``) or from torch's default CUDA generator; with the
same seed the ids are reproducible from run to run (the warm-up's draws are undone before
capture). Run eagerly (``capture=False``) the body draws exactly as the host loop does;
under a graph the ids are only promised to be reproducible, not equal to the host loop's.

Unmeasured: written without a GPU; the graph capture has not run on one yet (the
GPU-marked tests in tests/models/test_decode_graph.py do that), and the speedup (decode
tokens/s, ``mmfast profile vlm --cuda-graph``) has not been measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from mmfast.models.generation import Decoding, has_ended, pick_token
from mmfast.models.kv_cache import KVCache

#: replays between two host checks of "every sequence has finished"
EOS_CHECK_EVERY = 16


@dataclass
class _Captured:
    key: tuple
    cache: KVCache
    token: Tensor      # [B] the last token (the step's input)
    position: Tensor   # [B] its position
    finished: Tensor   # [B] bool
    eos: Tensor        # the end-of-sequence ids
    out: Tensor        # [B, capacity] the tokens the replays produce
    index: Tensor      # [1] where the next one goes
    body: Optional[Callable[[], None]] = None
    graph: Optional["torch.cuda.CUDAGraph"] = None


class DecodeGraphs:
    """A model's captured decode step (at most one, with its KV cache). ``capture=False``
    runs the graph's body eagerly instead of replaying it: the CPU tests' way to check
    the body."""

    def __init__(self):
        self._held: Optional[_Captured] = None
        self.capture = True

    def check_device(self, device: torch.device) -> None:
        if self.capture and device.type != "cuda":
            raise ValueError(f"cuda_graph: needs the model on a CUDA device, it is on {device}")

    def kv_cache(self, decoder, batch: int, capacity: int, new_tokens: int) -> KVCache:
        """The held cache when its batch, capacity, dtype and device still fit the
        ``decoder`` (emptied), else ``decoder.new_cache(batch, capacity)`` (the old graph
        is dropped first, freeing its memory). One new token needs no graph: the held one
        is kept for the next longer call (time to first token, then decoding)."""
        held, weight = self._held, decoder.embed_tokens.weight
        if new_tokens == 1:
            return decoder.new_cache(batch, capacity)
        if held is not None and (held.cache.batch, held.cache.capacity, held.cache.dtype, held.cache.device) \
                == (batch, capacity, weight.dtype, weight.device):
            held.cache.reset()
            return held.cache
        self._held = None
        return decoder.new_cache(batch, capacity)

    @torch.no_grad()
    def decode(self, last_hidden: Tensor, lm_head: Callable[[Tensor], Tensor], step: Callable[[Tensor, Tensor], Tensor],
               settings: Decoding, position: Tensor, cache: KVCache) -> Tensor:
        """:func:`mmfast.models.generation.decode` with the steps after the first replayed
        from a graph (``cache`` must come from :meth:`kv_cache`)."""
        cache.start_decoding()
        batch, device = last_hidden.shape[0], last_hidden.device
        if settings.do_sample and settings.generator is not None and self.capture \
                and settings.generator.device.type != "cuda":
            raise ValueError(f"generator: expected a CUDA generator (on the model's {device}) with "
                             f"cuda_graph=True, got one on {settings.generator.device}")
        eos = torch.tensor(settings.eos, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        first = pick_token(last_hidden, finished, lm_head, settings)  # eagerly, as the host loop does
        finished |= has_ended(first, eos)
        steps = settings.max_new_tokens - 1
        if steps == 0:
            return first[:, None]
        held = self._prepared(lm_head, step, settings, cache, batch, last_hidden.dtype)
        held.token.copy_(first)
        held.position.copy_(position)
        held.finished.copy_(finished)
        held.index.zero_()
        done = 0
        while done < steps:
            for _ in range(min(EOS_CHECK_EVERY, steps - done)):
                held.graph.replay() if held.graph is not None else held.body()
                done += 1
            if done < steps and bool(held.finished.all()):  # the one sync per EOS_CHECK_EVERY steps
                break
        tokens = torch.cat([first[:, None], held.out[:, :done]], dim=1)
        return tokens[:, :_host_loop_length(tokens, held.eos)]

    def _prepared(self, lm_head, step, settings: Decoding, cache: KVCache, batch: int, dtype) -> _Captured:
        generator = settings.generator if settings.do_sample else None
        key = (id(cache), id(lm_head), dtype, replace(settings, max_new_tokens=1, generator=None),
               None if generator is None else id(generator), self.capture)
        held = self._held
        if held is not None and held.key == key:
            return held
        self._held = None
        device = cache.device
        held = _Captured(
            key, cache, token=torch.zeros(batch, dtype=torch.long, device=device),
            position=torch.zeros(batch, dtype=torch.long, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            eos=torch.tensor(settings.eos, dtype=torch.long, device=device),
            out=torch.zeros(batch, cache.capacity, dtype=torch.long, device=device),
            index=torch.zeros(1, dtype=torch.long, device=device))

        def body():
            hidden = step(held.token, held.position)
            held.position.add_(1)
            token = pick_token(hidden, held.finished, lm_head, settings)
            held.token.copy_(token)
            held.finished.logical_or_(has_ended(token, held.eos))
            held.out.index_copy_(1, held.index, token[:, None])
            held.index.add_(1)

        held.body = body
        if self.capture:
            held.graph = _capture(body, held, generator)
        self._held = held
        return held


def _capture(body: Callable[[], None], held: _Captured, generator: Optional[torch.Generator]) -> "torch.cuda.CUDAGraph":
    """Warm the body up on a side stream (kernels compile, the allocator settles), undo
    what it did to the static state and to the random stream, then capture it (capture
    records without running, and consumes no random numbers: replays advance the
    generator)."""
    state = (held.token, held.position, held.finished, held.index, held.cache.device_lengths)
    saved = [t.clone() for t in state]
    rng = generator.get_state() if generator is not None else torch.cuda.get_rng_state(held.token.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    for tensor, value in zip(state, saved):
        tensor.copy_(value)
    if generator is not None:
        generator.set_state(rng)
    else:
        torch.cuda.set_rng_state(rng, held.token.device)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        register = getattr(graph, "register_generator_state", None)
        if register is None:
            raise ValueError("generator: this torch version cannot register a generator with a CUDA graph "
                             "(CUDAGraph.register_generator_state); pass generator=None to sample from the "
                             "default CUDA generator, or cuda_graph=False")
        register(generator)
    with torch.cuda.graph(graph):
        body()
    return graph


def _host_loop_length(tokens: Tensor, eos: Tensor) -> int:
    """How many tokens the host-driven loop keeps: up to the first step after which
    every sequence has produced an end-of-sequence id (all of them otherwise). One sync."""
    count = tokens.shape[1]
    if eos.numel() == 0:
        return count
    ended = (tokens[..., None] == eos).any(-1).cummax(dim=1).values.all(dim=0)  # [n]: every sequence ended by step i
    steps = torch.arange(count, device=tokens.device)
    return int(torch.where(ended, steps, count - 1).min()) + 1


__all__ = ["DecodeGraphs", "EOS_CHECK_EVERY"]
