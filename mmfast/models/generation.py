"""The token-by-token half of ``generate()``, shared by the VLMs: after a model has run
its prompts through the decoder (filling a KV cache), :func:`decode` picks each next token
(greedy, or sampled with temperature / top-k / top-p from a ``generator``) and asks the
model for one cached step more, until ``max_new_tokens`` or every sequence has ended.

    >>> settings = Decoding.resolve(max_new_tokens=16, eos_token_id=2, do_sample=True, top_p=0.9)
    >>> new = decode(last_hidden, lm_head, step, settings, position, cache)   # [B, n]

``step(tokens [B], position [B]) -> hidden [B, C]`` feeds one token per sequence, at
the given positions, through the decoder over ``cache``; the cache is on its static decode
path (:meth:`~mmfast.models.kv_cache.KVCache.start_decoding`), so a step is a fixed
sequence of device ops: the same step runs eagerly here or replays as a CUDA graph
(:mod:`mmfast.models.decode_graph`, ``cuda_graph=True``), and both give the same ids.

A sequence that has produced an end-of-sequence token continues with the pad token, as
transformers does. Host syncs here: one per generated token (the all-finished test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor


def sample_token(logits: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                 generator: Optional[torch.Generator]) -> Tensor:
    """One token per row from softmax(logits / temperature), restricted to the ``top_k``
    most likely and to the smallest set whose probability reaches ``top_p``."""
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k: expected >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return draw(logits.softmax(-1), generator)


def draw(probs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One index per row with probability ``probs``: argmax(p / q), q ~ Exp(1), the
    computation ``torch.multinomial(probs, 1)`` does (same ids for the same generator
    state), written out because some torch versions check the distribution with a host
    sync inside multinomial, which a CUDA graph cannot capture."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


@dataclass(frozen=True)
class Decoding:
    """How to pick and when to stop: checked once, before any compute."""
    max_new_tokens: int
    eos: tuple[int, ...] = ()
    pad: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    generator: Optional[torch.Generator] = None

    @classmethod
    def resolve(cls, *, max_new_tokens: int, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                pad_token_id: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> "Decoding":
        """Validated settings. ``eos_token_id``: one id, a list, or None (run to
        ``max_new_tokens``); ``pad_token_id`` None: the first eos id (else 0)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
        if do_sample:
            if not temperature > 0:
                raise ValueError(f"temperature: expected > 0 when sampling, got {temperature}")
            if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
            if top_p is not None and not 0 < top_p <= 1:
                raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
        eos = () if eos_token_id is None else (int(eos_token_id),) if isinstance(eos_token_id, int) \
            else tuple(int(e) for e in eos_token_id)
        pad = pad_token_id if pad_token_id is not None else eos[0] if eos else 0
        return cls(max_new_tokens, eos, int(pad), bool(do_sample), float(temperature), top_k, top_p, generator)


def pick_token(hidden: Tensor, finished: Tensor, lm_head: Callable[[Tensor], Tensor], settings: Decoding) -> Tensor:
    """The next token [B] from the hidden states [B, C]: argmax or a sample of the logits
    (in float32), the pad token where ``finished``. Device ops only (graph-safe)."""
    logits = lm_head(hidden).float()
    if settings.do_sample:
        token = sample_token(logits, settings.temperature, settings.top_k, settings.top_p, settings.generator)
    else:
        token = logits.argmax(-1)
    return torch.where(finished, torch.full_like(token, settings.pad), token)


def has_ended(token: Tensor, eos: Tensor) -> Tensor:
    """[B] bool: whether each token is one of the ``eos`` ids (none when eos is empty).
    A comparison rather than torch.isin, which may take a sorting path that syncs."""
    return (token[:, None] == eos).any(-1)


@torch.no_grad()
def decode(last_hidden: Tensor, lm_head: Callable[[Tensor], Tensor], step: Callable[[Tensor, Tensor], Tensor],
           settings: Decoding, position: Tensor, cache) -> Tensor:
    """The new tokens [B, n], n <= ``settings.max_new_tokens``, driven from the host.
    ``last_hidden`` [B, C]: the decoder's output at each prompt's last token;
    ``lm_head(hidden) -> logits [B, V]``; ``position`` [B] (long, on the device): the
    position of each sequence's next token; ``cache``: the filled
    :class:`~mmfast.models.kv_cache.KVCache` (switched to its static decode path here)."""
    cache.start_decoding()
    eos = torch.tensor(settings.eos, dtype=torch.long, device=last_hidden.device)
    finished = torch.zeros(last_hidden.shape[0], dtype=torch.bool, device=last_hidden.device)
    position = position.clone()
    token = pick_token(last_hidden, finished, lm_head, settings)
    tokens = [token]
    finished |= has_ended(token, eos)
    for _ in range(settings.max_new_tokens - 1):
        if bool(finished.all()):
            break
        hidden = step(token, position)
        position += 1
        token = pick_token(hidden, finished, lm_head, settings)
        tokens.append(token)
        finished |= has_ended(token, eos)
    return torch.stack(tokens, dim=1)
