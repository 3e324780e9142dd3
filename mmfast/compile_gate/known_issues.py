"""Findings the gate expects in the attention kernels (attention.py, attention_short.py,
cross_attention.py): tiles below wgmma's 64 rows where a bigger tile would spill or buy
nothing (each entry says why). They are reported as "expected", not failures.

Strict both ways: an entry whose rows were compiled and none of them shows the problem
any more fails the gate as stale, so an entry is deleted as soon as its fix lands.
Nothing outside the attention kernels may be listed here.

An entry matches a row when the kernel name and check agree and every ``when`` item
equals the row's constexpr (or, for ``head_dim``, the case's head dim); a tuple value
matches any of its members.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CHECKS = ("compile", "spill", "no_wgmma", "padding")
ATTENTION_MODULES = ("attention", "attention_short", "cross_attention", "attention_dropout")


@dataclass(frozen=True)
class KnownIssue:
    kernel: str
    check: str
    reason: str
    when: dict = field(default_factory=dict)

    def matches(self, row: dict) -> bool:
        if row["kernel"] != self.kernel:
            return False
        for key, want in self.when.items():
            have = row["dims"].get(key) if key == "head_dim" else row["constexprs"].get(key)
            if have not in (want if isinstance(want, tuple) else (want,)):
                return False
        return True


_OVERFLOW = ("the overflow pass (LOOP, issue 16): 16 x 16 tiles over the blocks a too-small max_seqlen left out "
             "(or the segments too long for the short-segment kernel's slots). Its programs return at once when "
             "max_seqlen bounds the segments, so it does work only on a caller's mistake. 64-row tiles, which "
             "wgmma needs, spilled there: the looped dK/dV at head dim 80 with rotary 416 B at 4 warps, 152 B "
             "with the main pass's 64 x 64 tiles; at 8 warps 250-255 registers, 48 B at head dim 160")
_QFORMER = ("32 queries (Q-Former, BLIP-2): a 32-row tile, below wgmma's 64 rows, so Triton emits mma.sync. "
            "Acceptable: each K/V element read serves 32 query rows, about 32 flop/byte, a ninth of the H100's "
            "ridge (~300), so the kernel is bound by K/V bandwidth, not by the tensor-core instruction; a "
            "64-row tile would issue twice the MMA work on rows of padding and double the accumulator")


def _k(kernel: str, check: str, reason: str, **when) -> KnownIssue:
    return KnownIssue(kernel, check, reason, when)


# (kernel, check, reason, when): delete an entry when a fix removes it.
KNOWN_ATTENTION_ISSUES: tuple[KnownIssue, ...] = (
    _k("_cross_attention_fwd_kernel", "no_wgmma", _QFORMER, BLOCK_M=32),
    *(_k(name, "no_wgmma", _OVERFLOW, LOOP=True) for name in (
        "_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
        "_cross_attention_fwd_kernel", "_cross_attention_bwd_dkdv_kernel", "_cross_attention_bwd_dq_kernel")),
)


def classify(row: dict, problems: list[str]) -> tuple[list[str], list[str]]:
    """(unexpected problems, expected ones with their reasons) of one row."""
    failures, expected = [], []
    for check in problems:
        hits = [k for k in KNOWN_ATTENTION_ISSUES if k.check == check and k.matches(row)]
        if hits:
            expected.append(f"{check}: {hits[0].reason}")
        else:
            failures.append(check)
    return failures, expected


def stale_entries(rows: list[dict]) -> list[KnownIssue]:
    """Entries with compiled rows that match them, none of which still has the problem."""
    stale = []
    for issue in KNOWN_ATTENTION_ISSUES:
        matching = [r for r in rows if issue.matches(r)]
        if matching and not any(issue.check in r["problems"] for r in matching):
            stale.append(issue)
    return stale
