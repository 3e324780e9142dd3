"""What the GPU evidence run does, in order of value: stages, their budgets, the work
items of each stage, and the source key that results are recorded under.

Stage budgets are cumulative: a stage must end by the sum of its own and the earlier
stages' budgets after the run started, so time a stage leaves unused passes to the next
one, and the last stage ("rest") takes whatever is left of the total.

An item's ``id`` is its key in the record (``check/attention-windows/bfloat16``,
``peaks``, ``bench/norm/<case>/<provider>``, ``tests``); ``cap_s`` is the most it may take
before its worker is killed and it is recorded as timed out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Seconds. 8 minutes in all, of which a few are kept for the final report and packing.
TOTAL_S = 480
RESERVE_S = 10
STAGE_BUDGETS = {"checks": 90, "headline": 240, "rest": None}  # None: whatever is left
STAGE_TITLES = {
    "checks": "every kernel family once at a real shape, bf16 and fp16, vs float64 (NaN-poisoned), "
              "forward and backward; CUDA C++ kernels built and checked",
    "headline": "device peaks, then the headline case of each suite with its baselines side by side",
    "rest": "the GPU tests (pytest -m gpu), then the remaining benchmark cases",
}
# Per-item caps.
CAP_CHECK_S, CAP_PEAKS_S, CAP_BENCH_S, CAP_COMPILE_S = 60, 60, 60, 120
# A worker that prints nothing this long after it starts (imports, CUDA init) is killed.
CAP_STARTUP_S = 120

# The case that stands for each suite: the target model's shape on its main pass. A case
# name that a suite no longer has falls back to its first case (and a test says so).
HEADLINE = {
    "qwen_window_attention": "qwen-window-fwd-1x1792px-bf16",  # Qwen2.5-VL's window layers
    "qwen_vision_tower": "1img-1344px-fwd",                    # the profile's default image
    "qwen3_vision_tower": "1img-1344px-fwd",                   # issue 19's Qwen3-VL-8B case
    "attention": "fwd+bwd-causal-hd128-4x4096-bfloat16",
    "norm": "rms+res-fwd-16384x4096-bf16",
    "activation": "swiglu-fwd-16384x4304-bf16",
    "patch_embed": "conv3d-fwd-16384rows-E1280-bf16",
    "vision_tower": "siglip-so400m-384-fwd-b32",
    "cross_attention": "qformer-64x257x1408-fwd+bwd-bfloat16",
    "contrastive": "clip-65536x768-bf16",
    "linear_cross_entropy": "qwen2.5-vl-7b-8192tok-bf16",
    "hf_decoder_attention": "prefill-b4x2048-left-padded-4l",
    "group_norm": "gn-silu-fwd-nchw-2x320x64x64-fp16",
    "diffusion_unet": "sd15-unet-cfg-2x1",
    "scheduler_step": "sd15-euler-8x4x64x64-fp16",
    "vae": "sd15-512-float16",
    "wan_vae_norm": "wan-rms-silu-fwd-1x96x4x480x832-bfloat16",  # the decoder's widest norm input
    "sam_encoder_attention": "vit-h-encoder-fwd-b1-1024px-bf16",  # issue 19: SAM ViT-H encoder vs sdpa
    "joint_attention_rotary": "flux-fwd+bwd-4608tok-h24-d128-bf16",  # issue 20: q/k norm + rotary fused
    # issue 20: the real widths and tokens with a few of the blocks (the whole models run in
    # the rest stage), and the Wan VAE on 9 frames (33 in the rest stage)
    "flux_transformer_step": "flux1-dev-1024px-2+4blocks",
    "wan_transformer_step": "wan2.1-1.3b-480p-33f-4layers",
    "wan_vae_decode": "wan2.1-vae-480p-9f-float32",
}
# Providers of a headline case that run in the rest stage instead: compiling the Wan VAE
# decoder (about three graphs of the whole decoder) takes minutes, most of the headline's.
HEADLINE_DEFERRED = {"wan_vae_decode": ("diffusers-compile",)}
# Suites timing whole diffusion models: an item's first call builds the model (up to 24 GB)
# and autotunes every mmfast kernel at the model's shapes, so every provider gets the
# compile cap; the Wan VAE decoder's compile gets more (a timeout is final for the source).
WHOLE_MODEL_SUITES = ("flux_transformer_step", "wan_transformer_step", "wan_vae_decode")
CAP_VAE_COMPILE_S = 300


@dataclass(frozen=True)
class Item:
    id: str
    stage: str
    kind: str  # "check", "peaks", "bench", "tests"
    params: dict[str, Any] = field(default_factory=dict)
    cap_s: float | None = None


def check_items(dtypes: tuple[str, ...], only: str | None = None) -> list[Item]:
    """Every stage-1 check, all families in the first dtype before any in the second (bf16
    first: the interpreter cannot check bf16 dots, so a GPU is the only place it runs)."""
    import fnmatch

    from mmfast.bench.evidence_checks import specs

    items = []
    for dtype in dtypes:
        for s in specs():
            if only and not fnmatch.fnmatch(s.name, only):
                continue
            items.append(Item(f"check/{s.name}/{dtype}", "checks", "check",
                              {"spec": s.name, "dtype": dtype, "cuda_build": s.needs_cuda_build}, CAP_CHECK_S))
    return items


def _is_compile(provider: str) -> bool:
    return "compile" in provider


def _cap(suite: str, provider: str) -> float:
    if suite == "wan_vae_decode" and _is_compile(provider):
        return CAP_VAE_COMPILE_S
    return CAP_COMPILE_S if _is_compile(provider) or suite in WHOLE_MODEL_SUITES else CAP_BENCH_S


def headline_case(suite_name: str, case_names: list[str]) -> str | None:
    wanted = HEADLINE.get(suite_name)
    if wanted in case_names:
        return wanted
    return case_names[0] if case_names else None


def bench_items(suite_cases: dict[str, tuple[list[str], list[str]]]) -> tuple[list[Item], list[Item]]:
    """(headline items, remaining items) from {suite: (case names, provider names)}.

    Headline: the device peaks, then every suite's headline case with each provider
    except torch.compile ones, then the torch.compile providers of those cases (their
    compilation costs the most time per number), but for those in HEADLINE_DEFERRED.
    Remaining: those deferred, then every other case, suite by suite."""
    first, compiled, deferred, rest = [Item("peaks", "headline", "peaks", {}, CAP_PEAKS_S)], [], [], []
    order = list(HEADLINE)
    for suite in sorted(suite_cases, key=lambda n: order.index(n) if n in order else len(order)):
        cases, providers = suite_cases[suite]
        head = headline_case(suite, cases)
        for case in cases:
            for provider in providers:
                headline = case == head and provider not in HEADLINE_DEFERRED.get(suite, ())
                item = Item(f"bench/{suite}/{case}/{provider}", "headline" if headline else "rest", "bench",
                            {"suite": suite, "case": case, "provider": provider}, _cap(suite, provider))
                if case == head and not headline:
                    deferred.append(item)
                elif case != head:
                    rest.append(item)
                elif _is_compile(provider):
                    compiled.append(item)
                else:
                    first.append(item)
    return first + compiled, deferred + rest


def tests_item(paths: tuple[str, ...], marker: str = "gpu") -> Item:
    return Item("tests", "rest", "tests", {"paths": list(paths), "marker": marker}, None)


def stage_deadlines(start: float, total_s: float, budgets: dict[str, float | None],
                    reserve_s: float = RESERVE_S) -> dict[str, float]:
    """Cumulative deadlines: stage k ends by start + budgets of stages 1..k, and every
    stage by start + total - reserve."""
    end = start + total_s - reserve_s
    deadlines, t = {}, start
    for stage, budget in budgets.items():
        t = end if budget is None else min(t + budget, end)
        deadlines[stage] = t
    return deadlines


# ---- the source key ------------------------------------------------------------------

# What the results depend on. The device machine gets a copy of the working tree without
# .git, so the commit is identified by a hash of these files, which is the same there
# and in the checkout it was copied from.
SOURCE_DIRS = ("mmfast", "kernels", "csrc", "bench", "tests", "scripts")
SOURCE_FILES = ("pyproject.toml",)
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".json", ".toml", ".sh", ".txt", ".cfg")
SKIP_DIRS = ("__pycache__", "results", "prebuilt", ".pytest_cache", ".hypothesis", ".benchmarks")


def source_files(root: Path) -> list[Path]:
    files = [root / f for f in SOURCE_FILES if (root / f).is_file()]
    for top in SOURCE_DIRS:
        for path in sorted((root / top).rglob("*")):
            rel = path.relative_to(root)
            if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
                continue
            if path.is_file() and path.suffix in SOURCE_SUFFIXES:
                files.append(path)
    return sorted(files)


def source_key(root: Path) -> str:
    """``src-`` and 12 hex digits of a hash over the source files' paths and contents."""
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return "src-" + digest.hexdigest()[:12]
