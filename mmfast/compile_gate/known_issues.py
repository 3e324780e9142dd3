"""Findings the gate expects, for now, in the attention kernels (attention.py,
attention_short.py, cross_attention.py): what the exact-head-dim rewrite (issue 15,
deliverable 4) has not removed yet, and the overflow pass's thin tiles. They are reported
as "expected", not failures.

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


_ROTARY = "fused rotary: the second (partner-column) tile and the cos/sin tiles on top of the 128-wide head dim"
_BWD_TILE = "64 x 64 tiles at 4 warps hold dk, dv (or dq) and four dot operands: 255 registers at every head dim >= 40"
_OVERFLOW = ("the overflow pass (LOOP, issue 16): 16 x 16 tiles over the blocks a too-small max_seqlen left out; "
             "its programs return at once when max_seqlen is right")
_THIN = "32-row tiles (head dim 160, or 32 Q-Former queries): below wgmma's 64 rows, Triton emits mma.sync"


def _k(kernel: str, check: str, reason: str, **when) -> KnownIssue:
    return KnownIssue(kernel, check, reason, when)


# (kernel, check, reason, when): delete an entry when the attention rewrite fixes it.
KNOWN_ATTENTION_ISSUES: tuple[KnownIssue, ...] = (
    _k("_attention_fwd_kernel", "spill", "dropout's Philox mask tile on 128 x 64 scores at 4 warps", DROPOUT=True),
    _k("_attention_short_bwd_kernel", "spill", "dk, dv of 128 keys x 128 plus the dropout mask", DROPOUT=True),
    _k("_attention_bwd_dkdv_kernel", "spill", "causal / sliding-window masks at head dim 128 (LM shapes), "
       "64 x 64 tiles at 8 warps: 48-136 B", head_dim=128, HAS_RIGHT=True),
    *(_k(name, "no_wgmma", _THIN, BLOCK_M=32) for name in (
        "_attention_bwd_dq_kernel", "_cross_attention_fwd_kernel", "_cross_attention_bwd_dq_kernel")),
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
