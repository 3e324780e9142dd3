"""Cross-attention: the raw op for few queries over many keys, the Mllama text-to-image
attention with its mask, the Idefics2 perceiver resampler and the BLIP-2 Q-Former; bf16
on a GPU.

Cases (``part`` parameter):
- ``raw``: B=4, H=16 queries heads (K/V 16), 32/64/256 queries over 256..16k keys, head
  dim 64/128, forward. Providers: ``mmfast-triton`` (split over keys), ``sdpa`` (torch
  picks its backend) and ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` (each forced;
  skipped where unsupported).
- ``mllama``: Llama-3.2-11B-Vision-sized cross-attention (32 query heads, 8 K/V heads,
  head dim 128), 2048 text tokens over 4 images x 1601 tokens, each text token seeing the
  images placed before it, forward and forward+backward. ``mmfast-triton`` takes the
  ImagesUpToPositionMask; ``sdpa`` gets the dense additive [B, 1, Tq, Tk] mask that
  Hugging Face's sdpa path builds, built outside the timed call (HF builds it once per
  model forward and reuses it in every cross-attention layer).
- ``perceiver``: Idefics2-sized resampler (hidden 4096, 64 latents, 3 layers, 16 heads of
  96, 4 K/V heads) over 1k..16k context tokens, forward and forward+backward:
  ``mmfast`` (mmfast.nn.PerceiverResampler) vs ``hf-sdpa`` (transformers'
  Idefics2PerceiverResampler with attn_implementation="sdpa"), same weights.

- ``qformer``: BLIP-2's Q-Former (OPT-2.7b size: hidden 768, 12 layers, 12 heads,
  cross-attention every 2nd layer, 32 queries) over batch 64 x 257 image tokens x 1408
  features, forward and forward+backward: ``mmfast`` (mmfast.nn.QFormer) vs ``hf-sdpa``
  (Blip2QFormerModel, sdpa), same weights; bf16 (Hugging Face keeps the Q-Former in
  float32 by default: the full run adds float32 cases).

FLOP model: attention counts 4 * Tq * Tk * D per head for the forward (QK^T and PV) over
the (query, key) pairs a query sees; backward 2.5x the forward (flash-attention's
convention). The perceiver counts its attention and its projections and MLP (2 flops per
multiply-add).

Targets from the issue (H100, bf16), checked on GPU runs as ``SPEEDUPS`` against the
baselines measured in the same run:
- raw, 64 queries x 16k keys, hd 128: mmfast-triton >= 2x the best sdpa backend, forward;
- perceiver and qformer fwd+bwd: mmfast >= 2x hf-sdpa;
- mllama with its mask: mmfast-triton >= 2x sdpa with the materialised mask.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from mmfast.bench.suite import Case, Provider, Speedup, Suite, backend_skip

_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                  "sdpa-cudnn": "CUDNN_ATTENTION"}
_ALL_SDPA = ("sdpa", *_SDPA_BACKENDS)
SPEEDUPS = (
    Speedup("mmfast-triton", _ALL_SDPA, 2.0, "64 queries x 16k keys, hd 128, fwd: >= 2x the best sdpa backend",
            {"part": "raw", "queries": 64, "keys": 16384, "head_dim": 128}),
    Speedup("mmfast-triton", _ALL_SDPA, 2.0, "Mllama layer with its mask: >= 2x sdpa with the dense mask",
            {"part": "mllama"}),
    Speedup("mmfast", ("hf-sdpa",), 2.0, "perceiver fwd+bwd: >= 2x hf-sdpa", {"part": "perceiver", "pass": "fwd+bwd"}),
    Speedup("mmfast", ("hf-sdpa",), 2.0, "Q-Former fwd+bwd: >= 2x hf-sdpa", {"part": "qformer", "pass": "fwd+bwd"}),
)


# ---- cases -----------------------------------------------------------------------


def _raw_case(batch, heads, queries, keys, head_dim, dtype):
    params = {"part": "raw", "pass": "fwd", "batch": batch, "heads": heads, "queries": queries,
              "keys": keys, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch.")}

    def make(device):
        def randn(t):
            return torch.randn(batch, t, heads, head_dim, device=device, dtype=dtype)
        return {"q": randn(queries), "k": randn(keys), "v": randn(keys)}

    flops = 4 * batch * heads * queries * keys * head_dim
    return Case(f"raw-{queries}q-{keys}k-hd{head_dim}", params, make, flops=flops)


def _mllama_layout(text, images, image_tokens, device):
    """Image placeholders spread over the text: image n at position n * text / images."""
    positions = (torch.arange(images, device=device) * (text // images))[None]
    lengths = torch.full((1, images), image_tokens, device=device)
    return positions, lengths


def _hf_additive_mask(inputs):
    """What HF's sdpa path builds: a dense additive [B, 1, Tq, Tk] mask, rows that see
    nothing zeroed (so SDPA gives no NaN)."""
    q = inputs["q"]
    dense = _mmfast_mask(inputs).materialize(q, inputs["k"])[:, None]
    mask = torch.zeros(dense.shape, dtype=q.dtype, device=dense.device)
    mask.masked_fill_(~dense, torch.finfo(q.dtype).min)
    return mask * dense.any(-1, keepdim=True)


def _mllama_case(text, images, image_tokens, heads, kv_heads, head_dim, pass_, dtype):
    params = {"part": "mllama", "pass": pass_, "queries": text, "keys": images * image_tokens,
              "heads": heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch.")}

    def make(device):
        grad = pass_ == "fwd+bwd"
        q = torch.randn(1, text, heads, head_dim, device=device, dtype=dtype, requires_grad=grad)
        k = torch.randn(1, images * image_tokens, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=grad)
        v = torch.randn_like(k).requires_grad_(grad)
        positions, lengths = _mllama_layout(text, images, image_tokens, device)
        inputs = {"q": q, "k": k, "v": v, "positions": positions, "lengths": lengths,
                  "dout": torch.randn_like(q) if grad else None}
        return {**inputs, "additive_mask": _hf_additive_mask(inputs)}

    # Visible pairs: text token t sees (images placed at or before t) x image_tokens keys.
    seen = sum(min(images, t // (text // images) + 1) for t in range(text)) * image_tokens
    flops = 4 * heads * seen * head_dim * (3.5 if pass_ == "fwd+bwd" else 1)
    return Case(f"mllama-{text}x{images}x{image_tokens}-{pass_}", params, make, flops=int(flops))


def _perceiver_config(hidden, latents, depth, heads, head_dim, kv_heads):
    return {"hidden": hidden, "latents": latents, "depth": depth, "heads": heads,
            "head_dim": head_dim, "kv_heads": kv_heads}


def _perceiver_case(context, cfg, pass_, dtype):
    params = {"part": "perceiver", "pass": pass_, "keys": context, **cfg,
              "dtype": str(dtype).removeprefix("torch.")}

    def make(device):
        grad = pass_ == "fwd+bwd"
        x = torch.randn(2, context, cfg["hidden"], device=device, dtype=dtype, requires_grad=grad)
        return {"context": x, "mask": torch.ones(2, context, dtype=torch.long, device=device)}

    c, n, h, d, hk = cfg["hidden"], cfg["latents"], cfg["heads"], cfg["head_dim"], cfg["kv_heads"]
    keys = context + n
    per_layer = (2 * n * c * h * d + 2 * 2 * keys * c * hk * d + 4 * h * n * keys * d
                 + 2 * n * h * d * c + 3 * 2 * n * c * 4 * c)
    flops = 2 * cfg["depth"] * per_layer * (3 if pass_ == "fwd+bwd" else 1)
    return Case(f"perceiver-{context}-{pass_}", params, make, flops=flops)


def _qformer_config(hidden, layers, heads, intermediate, queries, encoder):
    return {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate,
            "queries": queries, "encoder": encoder}


def _qformer_case(batch, tokens, cfg, pass_, dtype):
    params = {"part": "qformer", "pass": pass_, "batch": batch, "keys": tokens, **cfg,
              "dtype": str(dtype).removeprefix("torch.")}

    def make(device):
        grad = pass_ == "fwd+bwd"
        return {"queries": torch.randn(batch, cfg["queries"], cfg["hidden"], device=device, dtype=dtype,
                                       requires_grad=grad),
                "image": torch.randn(batch, tokens, cfg["encoder"], device=device, dtype=dtype, requires_grad=grad)}

    c, q, e, i = cfg["hidden"], cfg["queries"], cfg["encoder"], cfg["intermediate"]
    self_attn = 4 * 2 * q * c * c + 4 * q * q * c
    cross = 2 * 2 * q * c * c + 2 * 2 * tokens * e * c + 4 * q * tokens * c
    ffn = 2 * 2 * q * c * i
    layers = cfg["layers"]
    flops = batch * (layers * (self_attn + ffn) + (layers + 1) // 2 * cross) * (3 if pass_ == "fwd+bwd" else 1)
    return Case(f"qformer-{batch}x{tokens}x{e}-{pass_}-{params['dtype']}", params, make, flops=flops)


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type != "cuda":  # interpreter smoke sizes: exercise every code path
        dtype = torch.float16
        out = [_raw_case(1, 2, 32, 300, 64, dtype)]
        out += [_mllama_case(64, 2, 40, 4, 2, 64, p, dtype) for p in ("fwd", "fwd+bwd")]
        small = _perceiver_config(64, 8, 1, 4, 16, 2)
        tiny_qformer = _qformer_config(32, 2, 2, 48, 4, 24)
        return out + [_perceiver_case(48, small, "fwd", dtype), _qformer_case(2, 17, tiny_qformer, "fwd", dtype)]
    dtype = torch.bfloat16
    out = []
    queries, keys, dims = ((64,), (1024, 16384), (128,)) if quick else ((32, 64, 256), (256, 1024, 4096, 16384), (64, 128))
    for d in dims:
        for q in queries:
            for k in keys:
                out.append(_raw_case(4, 16, q, k, d, dtype))
    for p in ("fwd", "fwd+bwd"):
        out.append(_mllama_case(2048, 4, 1601, 32, 8, 128, p, dtype))
    idefics2 = _perceiver_config(4096, 64, 3, 16, 96, 4)
    for p in ("fwd", "fwd+bwd"):
        for k in ((1024, 16384) if quick else (1024, 4096, 16384)):
            out.append(_perceiver_case(k, idefics2, p, dtype))
    blip2 = _qformer_config(768, 12, 12, 3072, 32, 1408)
    for qformer_dtype in ((dtype,) if quick else (dtype, torch.float32)):
        for p in ("fwd", "fwd+bwd"):
            out.append(_qformer_case(64, 257, blip2, p, qformer_dtype))
    return out


# ---- implementations -------------------------------------------------------------


def _only(*parts):
    def skip(case: Case, device: torch.device):
        return None if case.params["part"] in parts else f"not a {'/'.join(parts)} provider"
    return skip


def _mmfast_mask(inputs):
    from mmfast.ops.cross_attention_masks import ImagesUpToPositionMask

    return ImagesUpToPositionMask(inputs["positions"], inputs["lengths"])


def _build_mmfast_attention(case: Case):
    from mmfast.ops import cross_attention

    def run(i):
        mask = _mmfast_mask(i) if case.params["part"] == "mllama" else None
        if case.params["pass"] == "fwd":
            with torch.no_grad():
                return cross_attention(i["q"], i["k"], i["v"], mask=mask, backend="triton")
        out = cross_attention(i["q"], i["k"], i["v"], mask=mask, backend="triton")
        return torch.autograd.grad(out, (i["q"], i["k"], i["v"]), i["dout"])
    return run


def _skip_mmfast_triton(case: Case, device: torch.device):
    if case.params["part"] in ("perceiver", "qformer"):
        return "modules have their own providers"
    return backend_skip("cross_attention", "triton", device, getattr(torch, case.params["dtype"]),
                        head_dim=case.params["head_dim"])


def _sdpa(q, k, v, mask, backend_name):
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kwargs = {"enable_gqa": True} if group > 1 else {}
    if backend_name is None:
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, **kwargs).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend_name)):
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, **kwargs).transpose(1, 2)


def _build_sdpa(backend_name, case: Case):
    def run(i):
        mask = i.get("additive_mask")
        if case.params["pass"] == "fwd":
            with torch.no_grad():
                return _sdpa(i["q"], i["k"], i["v"], mask, backend_name)
        out = _sdpa(i["q"], i["k"], i["v"], mask, backend_name)
        return torch.autograd.grad(out, (i["q"], i["k"], i["v"]), i["dout"])
    return run


def _skip_sdpa(backend_name):
    def skip(case: Case, device: torch.device):
        if case.params["part"] in ("perceiver", "qformer"):
            return "modules have their own providers"
        if backend_name is not None and device.type != "cuda":
            return f"{backend_name} is a CUDA backend"
        if backend_name is not None and case.params["part"] == "mllama":
            return "forced backends take no additive mask reliably; see plain sdpa"
        return None
    return skip


def _perceiver_modules(case: Case, device, dtype):
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    from mmfast.nn import PerceiverResampler

    p = case.params
    config = Idefics2PerceiverConfig(hidden_size=p["hidden"], resampler_n_latents=p["latents"],
                                     resampler_depth=p["depth"], resampler_n_heads=p["heads"],
                                     resampler_head_dim=p["head_dim"], num_key_value_heads=p["kv_heads"])
    config._attn_implementation = "sdpa"
    theirs = Idefics2PerceiverResampler(config).to(device=device, dtype=dtype)
    ours = PerceiverResampler.from_config(config).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _qformer_modules(case: Case, device, dtype):
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    from mmfast.nn import QFormer

    p = case.params
    config = Blip2QFormerConfig(hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                                num_attention_heads=p["heads"], intermediate_size=p["intermediate"],
                                encoder_hidden_size=p["encoder"], cross_attention_frequency=2,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    theirs = Blip2QFormerModel(config).to(device=device, dtype=dtype)
    ours = QFormer(config).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _build_module(which, case: Case):
    modules = {}
    perceiver = case.params["part"] == "perceiver"

    def forward(m, i):
        if perceiver:
            return m(i["context"], i["mask"])
        if which == "mmfast":
            return m(i["queries"], i["image"])
        return m(query_embeds=i["queries"], encoder_hidden_states=i["image"]).last_hidden_state

    def run(i):
        if not modules:
            x = i["context"] if perceiver else i["image"]
            build = _perceiver_modules if perceiver else _qformer_modules
            ours, theirs = build(case, x.device, x.dtype)
            modules["m"] = ours if which == "mmfast" else theirs
        m = modules["m"]
        if case.params["pass"] == "fwd":
            with torch.no_grad():
                return forward(m, i)
        out = forward(m, i)
        inputs = [i["context"]] if perceiver else [i["queries"], i["image"]]
        return torch.autograd.grad(out, [*inputs, *m.parameters()], torch.ones_like(out))
    return run


def _skip_module(case: Case, device: torch.device):
    from mmfast.dispatch import module_available

    if case.params["part"] not in ("perceiver", "qformer"):
        return "a module provider (perceiver, qformer)"
    if not module_available("transformers"):
        return "transformers is not installed (the baseline and the config come from it)"
    return None


SUITE = Suite(
    name="cross_attention",
    description="cross-attention: few queries x many keys, Mllama mask, Idefics2 perceiver, BLIP-2 Q-Former",
    bound="compute",
    cases=cases,
    providers=(
        Provider("mmfast-triton", _build_mmfast_attention, _skip_mmfast_triton),
        Provider("sdpa", partial(_build_sdpa, None), _skip_sdpa(None)),
        *(Provider(name, partial(_build_sdpa, backend), _skip_sdpa(backend)) for name, backend in _SDPA_BACKENDS.items()),
        Provider("mmfast", partial(_build_module, "mmfast"), _skip_module),
        Provider("hf-sdpa", partial(_build_module, "hf"), _skip_module),
    ),
    plot_x="keys",
    plot_panels=("part", "pass", "queries", "head_dim"),
    speedups=SPEEDUPS,
)
