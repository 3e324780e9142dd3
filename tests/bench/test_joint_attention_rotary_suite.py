"""The joint_attention_rotary suite without a GPU: registered, its GPU cases are the FLUX
and Wan shapes of issue 20, and on the CPU smoke case the fused provider, the separate
kernels and diffusers' eager preparation (fed to SDPA, whose flash backend the GPU
providers force) compute the same attention. Timings mean nothing here."""

import torch
import torch.nn.functional as F

from mmfast.bench import suites
from mmfast.bench.evidence_plan import HEADLINE
from mmfast.bench.suites import joint_attention_rotary as joint


def test_registered_with_the_issue_shapes():
    suite = suites.get("joint_attention_rotary")
    assert suite is joint.SUITE
    assert [p.name for p in suite.providers] == ["mmfast-fused", "mmfast-separate", "sdpa-flash",
                                                 "sdpa-flash-eager", "flash-attn"]
    cases = {c.name: c.params for c in suite.cases(False, torch.device("cuda"))}
    flux = cases["flux-fwd+bwd-4608tok-h24-d128-bf16"]
    assert (flux["tokens"], flux["heads"], flux["head_dim"], flux["qk_norm"]) == (4096 + 512, 24, 128, True)
    wan = cases["wan-fwd-14040tok-h12-d128-bf16"]
    assert (wan["tokens"], wan["heads"], wan["qk_norm"]) == (9 * 30 * 52, 12, False)
    assert HEADLINE["joint_attention_rotary"] in cases
    assert [g.baselines for g in suite.speedups] == [("sdpa-flash",)]


def test_providers_agree_on_the_smoke_case():
    case = joint.SUITE.cases(True, torch.device("cpu"))[0]
    assert case.params["qk_norm"] and case.params["pass"] == "fwd"
    params = dict(case.params, dtype="float32")
    inputs = joint._make_inputs(params, torch.device("cpu"))
    fused = joint.SUITE.provider("mmfast-fused").build(case)(inputs)
    separate = joint.SUITE.provider("mmfast-separate").build(case)(inputs)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    q, k = joint._eager_prepared(inputs)
    eager = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, inputs.v))).transpose(1, 2)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
