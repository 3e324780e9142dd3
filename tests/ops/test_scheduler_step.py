"""mmfast.ops.guided_step: the Triton kernel against the float64 reference (flash-attention
rule), its input forms and layouts, the device coefficient table, and bad input."""

import math

import pytest
import torch

from mmfast.ops import CorrectorCoefficients, StepCoefficients, StepTable, guided_step
from mmfast.testing import assert_matches_reference, random_tensor

# Every term present: x0 with clipping, the previous x0, noise.
FULL = StepCoefficients(px=1.7, pm=-0.6, cx=0.8, cm=-0.3, c0=0.45, c1=-0.2, cn=0.15, clip=1.5)


def _step_with_x0(backend):
    def run(sample, model_output, prev_x0, noise, guidance_scale, guidance_rescale, coefficients):
        x0 = torch.empty_like(sample, dtype=model_output.dtype)
        out = guided_step(sample, model_output, coefficients, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, prev_x0=prev_x0, noise=noise, x0_out=x0,
                          backend=backend)
        return out, x0
    return run


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guided_step_matches_reference(device, dtype, rescale):
    # 3 samples of 5 x 7 x 9 = 315 elements: a masked tail in every block.
    shape = (3, 5, 7, 9)
    inputs = dict(
        sample=random_tensor(shape, dtype, device),
        model_output=random_tensor((6, *shape[1:]), dtype, device),
        prev_x0=random_tensor(shape, dtype, device),
        noise=random_tensor(shape, dtype, device),
        guidance_scale=7.5, guidance_rescale=rescale, coefficients=FULL,
    )
    assert_matches_reference(_step_with_x0("triton"), _step_with_x0("torch"), inputs)


def test_unguided_single_pass_matches_reference(device):
    shape = (2, 4, 6, 5)
    inputs = dict(sample=random_tensor(shape, torch.bfloat16, device),
                  model_output=random_tensor(shape, torch.bfloat16, device), prev_x0=None, noise=None,
                  guidance_scale=None, guidance_rescale=0.0, coefficients=StepCoefficients(cx=1.0, cm=-0.25))
    assert_matches_reference(_step_with_x0("triton"), _step_with_x0("torch"), inputs)


def test_rescale_stats_span_many_chunks(device):
    # 2 samples of 9 blocks + 7 elements: on a CPU the stats pass splits each into chunks of
    # two blocks, merged across tiles and then across chunks (a GPU takes more chunks).
    n = 9 * 1024 + 7
    x = random_tensor((2, n), torch.float32, device)
    mo = random_tensor((4, n), torch.float32, device, scale=3.0, offset=0.5)
    coef = StepCoefficients(cx=1.0, cm=1.0)
    got = guided_step(x, mo, coef, guidance_scale=5.0, guidance_rescale=0.9, backend="triton")
    u, c = mo.double().chunk(2)
    g = u + 5.0 * (c - u)
    g = 0.9 * g * (c.std(1, keepdim=True) / g.std(1, keepdim=True)) + 0.1 * g
    torch.testing.assert_close(got.double(), x.double() + g, rtol=2e-6, atol=2e-5)


def test_pair_channels_last_and_in_place(device):
    shape = (2, 4, 6, 10)
    x = random_tensor(shape, torch.float32, device).contiguous(memory_format=torch.channels_last)
    u = random_tensor(shape, torch.float32, device).contiguous(memory_format=torch.channels_last)
    c = random_tensor(shape, torch.float32, device)  # a different layout: copied into sample's order
    state = random_tensor(shape, torch.float32, device).contiguous(memory_format=torch.channels_last)
    coef = StepCoefficients(px=1.0, pm=-0.5, cx=0.9, cm=0.1, c0=0.3, c1=0.2)
    expected_x0 = torch.empty_like(x)
    expected = guided_step(x, (u, c), coef, guidance_scale=3.0, prev_x0=state, x0_out=expected_x0, backend="torch")
    before = x.clone()
    out = guided_step(x, (u, c), coef, guidance_scale=3.0, prev_x0=state, x0_out=state, out=x, backend="triton")
    assert out is x and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(state, expected_x0)
    assert not torch.equal(x, before)


# UniPC: the corrector's every term (x0_older too) and a second-order predictor.
CORRECTOR = CorrectorCoefficients(kx=0.7, k0=0.35, k1=-0.15, kt=0.4)
PREDICTOR = StepCoefficients(px=1.0, pm=-0.8, cx=0.6, c0=0.55, c1=-0.1)


def _corrected_step(backend):
    def run(sample, model_output, prev_x0, last_sample, older_x0, guidance_scale, guidance_rescale):
        x0 = torch.empty_like(sample, dtype=torch.promote_types(sample.dtype, model_output.dtype))
        corrected = torch.empty_like(last_sample)
        out = guided_step(sample, model_output, PREDICTOR, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, prev_x0=prev_x0, x0_out=x0, corrector=CORRECTOR,
                          last_sample=last_sample, older_x0=older_x0, corrected_out=corrected, backend=backend)
        return out, x0, corrected
    return run


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_unipc_corrector_stage_matches_reference(device, dtype):
    shape = (2, 3, 7, 9)  # 189 elements a sample: a masked tail
    inputs = dict(sample=random_tensor(shape, dtype, device),
                  model_output=random_tensor((4, *shape[1:]), dtype, device),
                  prev_x0=random_tensor(shape, dtype, device), last_sample=random_tensor(shape, dtype, device),
                  older_x0=random_tensor(shape, dtype, device), guidance_scale=5.0,
                  guidance_rescale=0.6 if dtype == torch.float32 else 0.0)
    assert_matches_reference(_corrected_step("triton"), _corrected_step("torch"), inputs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unipc_corrector_formula_and_state_in_place(device, backend):
    # The documented update, spelled out; then every output written over the input it
    # replaces (sample <- prev, last_sample <- corrected, older_x0 <- x0), channels_last.
    shape = (2, 4, 3, 5)
    x, last, x0_1, x0_2 = (random_tensor(shape, torch.float32, device).contiguous(memory_format=torch.channels_last)
                           for _ in range(4))
    mo = random_tensor((4, *shape[1:]), torch.float32, device)
    u, c = mo.double().chunk(2)
    m = u + 3.0 * (c - u)
    x0 = x.double() - 0.8 * m
    corrected = 0.7 * last.double() + 0.35 * x0_1.double() - 0.15 * x0_2.double() + 0.4 * x0
    prev = 0.6 * corrected + 0.55 * x0 - 0.1 * x0_1.double()
    out = guided_step(x, mo, PREDICTOR, guidance_scale=3.0, prev_x0=x0_1, x0_out=x0_2, out=x, corrector=CORRECTOR,
                      last_sample=last, older_x0=x0_2, corrected_out=last, backend=backend)
    assert out is x and x.is_contiguous(memory_format=torch.channels_last)
    for got, want in ((x, prev), (last, corrected), (x0_2, x0)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Without x0_older (k1 = 0, a first-order corrector): that term is absent.
    first = CorrectorCoefficients(kx=0.7, k0=0.35, kt=0.4)
    got = guided_step(x, mo, StepCoefficients(cx=1.0), guidance_scale=3.0, prev_x0=x0_1, corrector=first,
                      last_sample=last, corrected_out=torch.empty_like(x), backend=backend)
    # px = pm = 0 (x0 = 0), cx = 1: prev is the corrected sample.
    torch.testing.assert_close(got.double(), 0.7 * last.double() + 0.35 * x0_1.double(), rtol=1e-5, atol=1e-5)


def test_unipc_corrector_bad_input_names_the_argument():
    x = torch.randn(2, 4, 3, 3)
    kwargs = dict(prev_x0=x, last_sample=x, corrected_out=torch.empty_like(x))
    with pytest.raises(ValueError, match="corrector: needs last_sample, corrected_out"):
        guided_step(x, x, PREDICTOR, prev_x0=x, corrector=CORRECTOR, older_x0=x)
    with pytest.raises(ValueError, match="older_x0: required when the corrector's k1 is not 0"):
        guided_step(x, x, PREDICTOR, corrector=CORRECTOR, **kwargs)
    with pytest.raises(ValueError, match="last_sample: only used by a corrector stage"):
        guided_step(x, x, PREDICTOR, last_sample=x)
    with pytest.raises(TypeError, match="corrector: expected CorrectorCoefficients"):
        guided_step(x, x, PREDICTOR, corrector=(1.0, 0.0, 0.0, 0.0), **kwargs)
    with pytest.raises(ValueError, match="corrector: needs host coefficients"):
        guided_step(x, x, StepTable.build([PREDICTOR], "cpu"), corrector=CORRECTOR, older_x0=x, **kwargs)
    with pytest.raises(ValueError, match=r"older_x0: expected shape \(2, 4, 3, 3\)"):
        guided_step(x, x, PREDICTOR, corrector=CORRECTOR, older_x0=torch.randn(2, 4, 3), **kwargs)


def test_coefficient_order_is_the_kernel_table_order():
    from dataclasses import fields

    from mmfast.kernels.scheduler_step import COEFFICIENT_FIELDS

    assert tuple(f.name for f in fields(StepCoefficients)) == COEFFICIENT_FIELDS
    assert FULL.row() == tuple(getattr(FULL, name) for name in COEFFICIENT_FIELDS)


def test_table_mode_reads_the_counter_row_and_advances_it(device):
    rows = [StepCoefficients(cx=1.0, cm=-0.1 * (i + 1)) for i in range(3)]
    table = StepTable.build(rows, device)
    x = random_tensor((2, 3, 5), torch.float32, device)
    mo = random_tensor((4, 3, 5), torch.float32, device)
    for i, row in enumerate(rows):
        expected = guided_step(x, mo, row, guidance_scale=2.0, backend="torch")
        torch.testing.assert_close(guided_step(x, mo, table, guidance_scale=2.0, backend="triton"), expected)
        assert table.counter.tolist() == [i + 1, 0]
    # Past the end: the NaN sentinel row, never an out-of-bounds read.
    assert guided_step(x, mo, table, guidance_scale=2.0, backend="triton").isnan().all()
    table.reset()
    torch.testing.assert_close(guided_step(x, mo, table, guidance_scale=2.0, backend="torch"),
                               guided_step(x, mo, rows[0], guidance_scale=2.0, backend="torch"))
    assert table.counter.tolist() == [1, 0]


def test_compile_fullgraph_traces_the_in_place_state_update(device):
    # aot_eager runs the fake impl and functionalizes the mutation of the state, as
    # inductor would, without building C++ on a CPU.
    coef = StepCoefficients(px=1.0, pm=-0.5, cx=0.9, cm=0.1, c0=0.3, c1=0.2)

    def step(x, mo, state):
        return guided_step(x, mo, coef, guidance_scale=3.0, guidance_rescale=0.5, prev_x0=state, x0_out=state,
                           backend="triton") * 2

    x, mo = random_tensor((2, 3, 4), torch.float32, device), random_tensor((4, 3, 4), torch.float32, device)
    state_eager = random_tensor((2, 3, 4), torch.float32, device)
    state_traced = state_eager.clone()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, mo, state_traced), step(x, mo, state_eager))
    torch.testing.assert_close(state_traced, state_eager)


@pytest.mark.gpu
def test_table_mode_replays_in_a_cuda_graph():
    rows = [StepCoefficients(cx=1.0 - 0.01 * i, cm=-0.1 * (i + 1)) for i in range(4)]
    table = StepTable.build(rows, "cuda")
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    mo = torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.float16)
    out = torch.empty_like(x)
    guided_step(x, mo, table, guidance_scale=7.5, guidance_rescale=0.5, out=out)  # warm-up (compiles)
    table.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        guided_step(x, mo, table, guidance_scale=7.5, guidance_rescale=0.5, out=out)
    table.reset()
    for row in rows:
        graph.replay()
        expected = guided_step(x, mo, row, guidance_scale=7.5, guidance_rescale=0.5, backend="torch")
        torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 4, 3, 3)
    coef = StepCoefficients(cx=1.0, cm=1.0)
    with pytest.raises(ValueError, match="model_output: guidance needs an even batch"):
        guided_step(x, torch.randn(5, 4, 3, 3), coef, guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"model_output: expected shape \(4, 4, 3, 3\)"):
        guided_step(x, torch.randn(4, 4, 3, 2), coef, guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"model_output: expected shape \(2, 4, 3, 3\)"):
        guided_step(x, torch.randn(4, 4, 3, 3), coef)
    with pytest.raises(ValueError, match="guidance_rescale: needs guidance"):
        guided_step(x, torch.randn(2, 4, 3, 3), coef, guidance_rescale=0.5)
    with pytest.raises(ValueError, match="guidance_scale: required"):
        guided_step(x, (x, x), coef)
    with pytest.raises(ValueError, match="noise: expected shape"):
        guided_step(x, x, coef, noise=torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="coefficients: expected StepCoefficients"):
        guided_step(x, x, (1.0, 1.0))
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number"):
        guided_step(x, torch.randn(4, 4, 3, 3), coef, guidance_scale=math.nan)
    with pytest.raises(TypeError, match="out: expected dtype torch.float32"):
        guided_step(x, x, coef, out=torch.empty(2, 4, 3, 3, dtype=torch.float16), out_dtype=torch.float32)


def _strided(t, how):
    if how == "permuted":  # diffusers' scheduler tests' sample: batch innermost, strides (1, 256, 32, 4)
        return t.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "sliced":  # not dense: every other column of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.transpose(2, 3).contiguous().transpose(2, 3)  # "transposed": H and W swapped in memory


@pytest.mark.parametrize("how", ["permuted", "channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_operands_and_outputs_of_any_strides(device, how, backend):
    # Regression: a permuted sample (diffusers' own test sample) raised "out: must be
    # contiguous like sample" although the caller passed no out.
    shape = (4, 3, 5, 6)
    x, state, noise = (random_tensor(shape, torch.float32, device) for _ in range(3))
    mo = random_tensor((8, *shape[1:]), torch.float32, device)
    coef = FULL
    want_x0 = torch.empty(shape, device=device)
    want = guided_step(x, mo, coef, guidance_scale=3.0, guidance_rescale=0.5, prev_x0=state, noise=noise,
                       x0_out=want_x0, backend="torch")
    xs, mos, states, noises = (_strided(t, how) for t in (x, mo, state, noise))
    got = guided_step(xs, mos, coef, guidance_scale=3.0, guidance_rescale=0.5, prev_x0=states, noise=noises,
                      backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if how == "channels_last":  # a layout the kernel takes as it is: the result keeps it
        assert got.is_contiguous(memory_format=torch.channels_last)
    # Given outputs of any strides, written in place (the solver state updated in place).
    out, x0 = _strided(torch.full(shape, math.nan, device=device), how), states
    assert guided_step(xs, mos, coef, guidance_scale=3.0, guidance_rescale=0.5, prev_x0=states, noise=noises,
                       x0_out=x0, out=out, backend=backend) is out
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(states, want_x0, rtol=1e-6, atol=1e-6)
    # out = sample, in place.
    guided_step(xs, mos, coef, guidance_scale=3.0, guidance_rescale=0.5, prev_x0=state, noise=noises,
                out=xs, backend=backend)
    torch.testing.assert_close(xs, want, rtol=1e-6, atol=1e-6)
