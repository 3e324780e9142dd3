"""A transformers decoder with each attention implementation: Qwen2-7B's layer shape
(hidden 3584, 28 query heads, 4 K/V heads of 128, SwiGLU 18944), a few layers, random
weights, bf16, inference. Everything but attention is the same code in every provider,
so differences are the attention implementation's (kernels, masks, unpadding).

Cases
  prefill-b4x2048-left-padded   4 prompts of 2048, 1536, 1024 and 512 tokens, left padded
  prefill-b4x2048               4 prompts of 2048 tokens, no mask
  decode-b16-kv2048-padded      one decode step of 16 rows over a 2048-token KV cache,
                                half the rows with 512 tokens of left padding
  (--quick: 2 layers instead of 4, the first and last case.)

Providers
  transformers-sdpa     attn_implementation="sdpa" (dense [B, 1, Tq, Tk] masks when padded)
  transformers-fa2      attn_implementation="flash_attention_2" (needs flash-attn)
  mmfast                attn_implementation="mmfast" (mmfast.integrations.transformers)

FLOPs: 2 x weights x valid tokens for the projections and MLP, plus the causal attention
pairs of the valid tokens (bench.suites.attention.attention_flops). Needs transformers and
a CUDA device: on the Triton interpreter a 7B-wide layer takes minutes.
"""

from __future__ import annotations

from functools import partial

import torch

from mmfast.bench.suite import Case, Provider, Suite, gpu_library_skip
from mmfast.bench.suites.attention import attention_flops

QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 32000}
HEAD_DIM = QWEN2_7B["hidden_size"] // QWEN2_7B["num_attention_heads"]
DTYPE = torch.bfloat16


def _layer_weights() -> int:
    h, inter = QWEN2_7B["hidden_size"], QWEN2_7B["intermediate_size"]
    kv = QWEN2_7B["num_key_value_heads"] * HEAD_DIM
    return h * (h + 2 * kv) + h * h + 3 * h * inter  # q, k, v, o; gate, up, down


def _flops(layers: int, lengths_q: list[int], lengths_k: list[int]) -> int:
    heads = QWEN2_7B["num_attention_heads"]
    attn = sum(attention_flops([lq], heads, HEAD_DIM, "fwd", causal=True) if lq == lk
               else 4 * heads * HEAD_DIM * lq * lk  # decode: every cached key
               for lq, lk in zip(lengths_q, lengths_k))
    return layers * (2 * _layer_weights() * sum(lengths_q) + attn)


def _left_padded(lengths: list[int], total: int, device) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return mask


def _prefill_inputs(lengths: list[int] | None, batch: int, tokens: int, device) -> dict:
    ids = torch.randint(0, QWEN2_7B["vocab_size"], (batch, tokens), device=device)
    return {"input_ids": ids, "attention_mask": None if lengths is None else _left_padded(lengths, tokens, device)}


def _decode_inputs(layers: int, lengths: list[int], cached: int, device) -> dict:
    batch = len(lengths)
    kv_shape = (batch, QWEN2_7B["num_key_value_heads"], cached, HEAD_DIM)
    return {"input_ids": torch.randint(0, QWEN2_7B["vocab_size"], (batch, 1), device=device),
            "attention_mask": _left_padded([n + 1 for n in lengths], cached + 1, device),
            "cache": [(torch.randn(kv_shape, device=device, dtype=DTYPE),
                       torch.randn(kv_shape, device=device, dtype=DTYPE)) for _ in range(layers)]}


def cases(quick: bool, device: torch.device) -> list[Case]:
    layers = 2 if quick else 4
    padded = [2048, 1536, 1024, 512]
    out = [Case(f"prefill-b4x2048-left-padded-{layers}l", {"pass": "prefill", "padded": True, "layers": layers},
                partial(_prefill_inputs, padded, 4, 2048), flops=_flops(layers, padded, padded))]
    if not quick:
        full = [2048] * 4
        out.append(Case(f"prefill-b4x2048-{layers}l", {"pass": "prefill", "padded": False, "layers": layers},
                        partial(_prefill_inputs, None, 4, 2048), flops=_flops(layers, full, full)))
    rows = [2048, 1536] * 8
    out.append(Case(f"decode-b16-kv2048-padded-{layers}l", {"pass": "decode", "padded": True, "layers": layers},
                    partial(_decode_inputs, layers, rows, 2048),
                    flops=_flops(layers, [1] * len(rows), [n + 1 for n in rows])))
    return out


def _make_model(implementation: str, layers: int, device: torch.device):
    import transformers

    if implementation == "mmfast":
        from mmfast.integrations.transformers.attention_interface import register

        register()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**QWEN2_7B, num_hidden_layers=layers, attn_implementation=implementation)
    return transformers.Qwen2Model(config).to(device=device, dtype=DTYPE).eval()


def _provider(implementation: str):
    def build(case: Case):
        state = {}

        def run(inputs: dict):
            if "model" not in state:  # built on the first (untimed, warm-up) call, on the inputs' device
                state["model"] = _make_model(implementation, case.params["layers"], inputs["input_ids"].device)
            model, cache = state["model"], None
            if "cache" in inputs:  # a fresh cache over the same tensors each call (the step appends to a copy)
                from transformers import DynamicCache

                cache = DynamicCache()
                for layer, (k, v) in enumerate(inputs["cache"]):
                    cache.update(k, v, layer)
            with torch.no_grad():
                return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             past_key_values=cache, use_cache=cache is not None).last_hidden_state
        return run
    return build


def _skip(case: Case, device: torch.device, library: str | None = None) -> str | None:
    from mmfast.dispatch import module_available

    if not module_available("transformers"):
        return "transformers is not installed"
    if library is not None:
        return gpu_library_skip(library, device, library)
    if device.type != "cuda":
        return "needs a CUDA device (a 7B-wide decoder layer takes minutes on the Triton interpreter)"
    return None


SUITE = Suite(
    name="hf_decoder_attention",
    description="a Qwen2-7B-shaped transformers decoder (bf16, random weights) under each attention implementation",
    bound="compute",
    cases=cases,
    providers=(
        Provider("transformers-sdpa", _provider("sdpa"), _skip),
        Provider("transformers-fa2", _provider("flash_attention_2"), partial(_skip, library="flash_attn")),
        Provider("mmfast", _provider("mmfast"), _skip),
    ),
    plot_x="pass",
    plot_panels=("padded",),
)
