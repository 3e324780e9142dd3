"""sm_90a compile gate: every Triton entry kernel compiled for an H100 ahead of time, on a
machine without a GPU, at the target models' shapes, through the project's own launchers.

    python -m mmfast.compile_gate            # the quick subset (tests/test_sm90_compile.py)
    python -m mmfast.compile_gate --full     # everything; writes bench/results/sm90_resources.jsonl

fake_cuda.py   fake CUDA tensors, so launchers pick their H100 configs without a device
record.py      launches recorded instead of run (every autotune config)
sm90.py        compile for sm_90a; registers, spills, shared memory, wgmma, occupancy
cases.py       the target models' shapes, per launcher family
work.py        issued / useful tensor-core work at those shapes
known_issues.py  the attention findings expected until their rewrite lands
gate.py        the run and its verdict
table.py       the resource table file (--update: one family's rows replaced)
"""
