"""Findings the gate expects, for now: the attention kernels (attention.py,
attention_short.py, cross_attention.py) are being rewritten for exact head dims 72/80
(issue 15, deliverable 4) on another branch. Until it lands, their known spills, head-dim
padding and mma.sync fallback are listed here and reported as "expected", not failures.

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


_PADDED = "head dim padded to BLOCK_D = next_pow2(D): 72 and 80 in a 128-wide tile (1.78x / 1.6x)"

KNOWN_ATTENTION_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue("_attention_fwd_kernel", "padding", _PADDED, {"head_dim": (72, 80)}),
    KnownIssue("_attention_bwd_dkdv_kernel", "padding", _PADDED, {"head_dim": (72, 80)}),
    KnownIssue("_attention_bwd_dq_kernel", "padding", _PADDED, {"head_dim": (72, 80)}),
    KnownIssue("_attention_short_fwd_kernel", "padding", _PADDED, {"head_dim": (72, 80)}),
    KnownIssue("_attention_short_bwd_kernel", "padding", _PADDED, {"head_dim": (72, 80)}),
    # Few query rows (32 Q-Former queries) get a 32-row tile: below wgmma's 64 rows per
    # warpgroup, so Triton lowers the dots to mma.sync.
    KnownIssue("_cross_attention_fwd_kernel", "no_wgmma", "BLOCK_M = 32 (< 64 rows): mma.sync",
               {"BLOCK_M": (16, 32)}),
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
