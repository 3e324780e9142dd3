"""Patched diffusers schedulers against unpatched ones over the configuration grid of
diffusers' own scheduler tests (Karras / Lu / exponential / beta sigmas, prediction types,
timestep spacings, final sigma types, thresholding, eta, stochastic sampling, img2img
starts) and inference step counts 1..50: full loops, every step's outputs compared.

The sample is diffusers' test sample (batch innermost in memory: strides (1, 48, 12, 3)),
tiny, and the steps run the torch backend (the same stepper logic; the kernel is checked
against that backend in tests/ops/test_scheduler_step.py) except in the last test.
Configurations the fused step leaves to diffusers (thresholding, third order, Euler churn)
run here too: the fallback must give diffusers' result and state.
"""

import inspect
import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import mmfast  # noqa: E402
from mmfast.integrations.diffusers.schedulers import patch_scheduler  # noqa: E402
from mmfast.integrations.patching import PatchHandle  # noqa: E402

# Every configuration runs 1, 2, 3 and 15 steps (DPM's last step turns second order at 15),
# and one more count in turn, so the grid covers every count here.
MORE_STEPS = (50, 5, 10, 14, 16, 25, 4, 30)


def _steps(index):
    return (1, 2, 3, 15, MORE_STEPS[index % len(MORE_STEPS)])
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _sample():
    """diffusers' dummy_sample_deter, smaller: [2, 3, 4, 4] with the batch innermost."""
    n = 2 * 3 * 4 * 4
    return (torch.arange(n).flip(-1).reshape(3, 4, 4, 2) / n).permute(3, 0, 1, 2)


def _model(x, t, i):
    """A deterministic 'denoiser' that depends on its input (errors propagate)."""
    gen = torch.Generator().manual_seed(i)
    return 0.3 * x + 0.2 * torch.randn(x.shape, generator=gen) + float(t) / 5000


def _loop(scheduler, steps, start, set_kwargs, step_kwargs, seed):
    scheduler.set_timesteps(steps, **set_kwargs)
    if start:
        scheduler.set_begin_index(start)
    x = _sample() * float(getattr(scheduler, "init_noise_sigma", 1.0))
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    gen = torch.Generator().manual_seed(seed)
    inputs, outputs = [], []
    for i, t in enumerate(scheduler.timesteps[start:]):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        extra = {"generator": gen} if takes_generator else {}
        inputs.append(x)
        out = scheduler.step(_model(model_input, t, i), t, x, **extra, **step_kwargs)
        outputs.append(out)
        x = out.prev_sample
    return inputs, outputs


def _compare(make, steps, start=0, set_kwargs=None, step_kwargs=None, identity_where_diffusers_nan=False,
             nan_where_diffusers_nan=False):
    set_kwargs, step_kwargs = set_kwargs or {}, step_kwargs or {}
    plain, patched = make(), make()
    assert patch_scheduler(patched, PatchHandle(patched, "test"))
    _, want = _loop(plain, steps, start, set_kwargs, step_kwargs, seed=steps)
    inputs, got = _loop(patched, steps, start, set_kwargs, step_kwargs, seed=steps)
    assert len(got) == len(want) > 0
    for i, (a, b, x) in enumerate(zip(got, want, inputs)):
        for key in b.keys():
            if a.get(key) is None or b[key] is None:
                continue
            expected = b[key]
            if not torch.isfinite(expected).all() and nan_where_diffusers_nan:
                # Left to diffusers' step (UniPC "bh1" to a zero sigma): its NaN, as it is.
                torch.testing.assert_close(a[key], expected, equal_nan=True)
                continue
            if not torch.isfinite(expected).all():
                # diffusers' heun 2M computes 0/0 in float32 on a repeated final sigma (Karras)
                # or one a rounding apart (Lu); the fused step takes the limit h -> 0 (the
                # identity, diffusers' midpoint result), or computes h ~ 1e-7 in float64
                # (then an SDE step adds noise of std sigma_min sqrt(2h) ~ 1e-5).
                assert identity_where_diffusers_nan and i == len(want) - 1, f"step {i}: diffusers gave NaN"
                torch.testing.assert_close(a[key], x, rtol=0, atol=1e-4)
                continue
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(a[key], expected, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m: f"{key} at step {i} of {steps}: {m}")
    for attr in ("step_index", "lower_order_nums", "begin_index", "this_order", "timestep_list"):
        assert getattr(patched, attr, None) == getattr(plain, attr, None), attr
    # The multistep state (DPM-Solver's and UniPC's x0 history, UniPC's corrector input).
    for name in ("model_outputs", "last_sample"):
        want_state, got_state = getattr(plain, name, None), getattr(patched, name, None)
        if isinstance(want_state, list):
            assert [w is None for w in want_state] == [g is None for g in got_state], name
            want_state = [w for w in want_state if w is not None]
            got_state = [g for g in got_state if g is not None]
        else:
            want_state, got_state = [want_state] if want_state is not None else [], \
                [got_state] if got_state is not None else []
            assert len(want_state) == len(got_state), name
        for w, g in zip(want_state, got_state):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * max(1.0, w.abs().max().item()), equal_nan=True,
                                       msg=lambda m: f"{name} after {steps} steps: {m}")


def _grid(**axes):
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def _id(config):
    return ",".join(f"{k}={v}" for k, v in config.items())


# ---- DPM-Solver++ (multistep) --------------------------------------------------------------

# (beta sigmas need scipy, which mmfast does not depend on)
DPM_SIGMAS = {"default": {}, "karras": {"use_karras_sigmas": True}, "lu": {"use_lu_lambdas": True},
              "exponential": {"use_exponential_sigmas": True}}
DPM_GRID = _grid(sigmas=list(DPM_SIGMAS), final=["zero", "sigma_min"], solver=["midpoint", "heun"],
                 algorithm=["dpmsolver++", "sde-dpmsolver++"])


@pytest.mark.parametrize("config", DPM_GRID, ids=_id)
def test_dpm_solver_grid(config):
    # Regression: Karras / Lu sigmas with final_sigmas_type="sigma_min" repeat the last
    # sigma; the second-order final step (from 15 steps on) divided by zero.
    index = DPM_GRID.index(config)
    prediction = ("epsilon", "v_prediction", "sample")[index % 3]

    def make():
        return diffusers.DPMSolverMultistepScheduler(
            **SD15, **DPM_SIGMAS[config["sigmas"]], final_sigmas_type=config["final"],
            solver_type=config["solver"], algorithm_type=config["algorithm"], prediction_type=prediction,
            lower_order_final=index % 2 == 0)

    with mmfast.set_backend("torch"):
        for steps in _steps(index):
            _compare(make, steps, identity_where_diffusers_nan=config["solver"] == "heun")


DPM_OTHERS = {
    "order1": dict(solver_order=1),
    "euler_at_final": dict(euler_at_final=True, final_sigmas_type="sigma_min"),
    "no_lower_order_final": dict(lower_order_final=False, final_sigmas_type="sigma_min", use_karras_sigmas=True),
    "flow_sigmas": dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    "linear_trailing": dict(beta_schedule="linear", timestep_spacing="trailing"),
    "leading_offset": dict(**SD15, timestep_spacing="leading", steps_offset=1),
    "lambda_min_clipped": dict(**SD15, lambda_min_clipped=-5.1),
    "zero_snr": dict(**SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    # Left to diffusers' step (the fallback): thresholding, third order, plain dpmsolver.
    "thresholding": dict(thresholding=True, sample_max_value=0.5, prediction_type="sample"),
    "order3": dict(solver_order=3),
    "dpmsolver": dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
}


@pytest.mark.parametrize("name", list(DPM_OTHERS))
def test_dpm_solver_other_options(name):
    options = DPM_OTHERS[name]
    betas = {} if "beta_start" in options or "beta_schedule" in options else SD15
    with mmfast.set_backend("torch"):
        for steps in _steps(list(DPM_OTHERS).index(name)):
            _compare(lambda: diffusers.DPMSolverMultistepScheduler(**betas, **options), steps)
        _compare(lambda: diffusers.DPMSolverMultistepScheduler(**betas, **options), 10, start=4)


# ---- Euler discrete ------------------------------------------------------------------------

EULER_SIGMAS = {"default": {}, "karras": {"use_karras_sigmas": True},
                "exponential": {"use_exponential_sigmas": True}}
EULER_GRID = _grid(sigmas=list(EULER_SIGMAS), spacing=["linspace", "leading", "trailing"],
                   final=["zero", "sigma_min"])


@pytest.mark.parametrize("config", EULER_GRID, ids=_id)
def test_euler_grid(config):
    index = EULER_GRID.index(config)
    prediction = ("epsilon", "v_prediction", "sample")[index % 3]

    def make():
        return diffusers.EulerDiscreteScheduler(
            **SD15, **EULER_SIGMAS[config["sigmas"]], timestep_spacing=config["spacing"],
            final_sigmas_type=config["final"], prediction_type=prediction, steps_offset=index % 2)

    with mmfast.set_backend("torch"):
        for steps in _steps(index):
            _compare(make, steps)


EULER_OTHERS = {
    "continuous_v": (dict(prediction_type="v_prediction", timestep_type="continuous"), {}),
    "zero_snr": (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"), {}),
    "linear": (dict(beta_schedule="linear"), {}),
    "interpolation_log_linear": (dict(interpolation_type="log_linear"), {}),
    "churn_fallback": (dict(), {"s_churn": 0.5, "s_tmin": 0.2, "s_tmax": 5.0}),  # some steps fused, some not
}


@pytest.mark.parametrize("name", list(EULER_OTHERS))
def test_euler_other_options(name):
    options, step_kwargs = EULER_OTHERS[name]
    betas = {} if "beta_schedule" in options else SD15
    with mmfast.set_backend("torch"):
        for steps in _steps(list(EULER_OTHERS).index(name)):
            _compare(lambda: diffusers.EulerDiscreteScheduler(**betas, **options), steps, step_kwargs=step_kwargs)
        _compare(lambda: diffusers.EulerDiscreteScheduler(**betas, **options), 10, start=3,
                 step_kwargs=step_kwargs)


# ---- DDIM ----------------------------------------------------------------------------------

DDIM_GRID = _grid(prediction=["epsilon", "v_prediction", "sample"], clip=[False, True],
                  alpha_to_one=[True, False], spacing=["leading", "trailing", "linspace"])


@pytest.mark.parametrize("config", DDIM_GRID, ids=_id)
def test_ddim_grid(config):
    index = DDIM_GRID.index(config)

    def make():
        return diffusers.DDIMScheduler(
            **SD15, prediction_type=config["prediction"], clip_sample=config["clip"],
            set_alpha_to_one=config["alpha_to_one"], timestep_spacing=config["spacing"], steps_offset=index % 2)

    # eta 0, and eta > 0 (noise from the generator) with and without the clipped model output
    step_kwargs = ({}, {"eta": 0.5}, {"eta": 1.0, "use_clipped_model_output": True})[index % 3]
    with mmfast.set_backend("torch"):
        for steps in _steps(index):
            _compare(make, steps, step_kwargs=step_kwargs)


DDIM_OTHERS = {
    # alphas_cumprod reaches 0: v_prediction (what zero SNR is for); epsilon falls back to
    # diffusers, which divides by sqrt(0) there.
    "zero_snr": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    "zero_snr_epsilon_fallback": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "squaredcos": dict(beta_schedule="squaredcos_cap_v2"),
    "train_100": dict(num_train_timesteps=100),
    "thresholding_fallback": dict(thresholding=True, sample_max_value=2.0),
}


@pytest.mark.parametrize("name", list(DDIM_OTHERS))
def test_ddim_other_options(name):
    options = DDIM_OTHERS[name]
    betas = {} if "beta_schedule" in options else SD15
    with mmfast.set_backend("torch"):
        for steps in _steps(list(DDIM_OTHERS).index(name)):
            _compare(lambda: diffusers.DDIMScheduler(**betas, **options), steps)


# ---- flow matching (SD3) ---------------------------------------------------------------------

FLOW_SIGMAS = {"default": {}, "karras": {"use_karras_sigmas": True},
               "exponential": {"use_exponential_sigmas": True}}
FLOW_GRID = _grid(sigmas=list(FLOW_SIGMAS), shift=[1.0, 3.0], stochastic=[False, True])


@pytest.mark.parametrize("config", FLOW_GRID, ids=_id)
def test_flow_match_grid(config):
    index = FLOW_GRID.index(config)

    def make():
        return diffusers.FlowMatchEulerDiscreteScheduler(
            shift=config["shift"], stochastic_sampling=config["stochastic"], **FLOW_SIGMAS[config["sigmas"]])

    with mmfast.set_backend("torch"):
        for steps in _steps(index):
            _compare(make, steps)


FLOW_OTHERS = {
    "dynamic_shifting": (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), {"mu": 0.8}),
    "exponential_time_shift": (dict(use_dynamic_shifting=True, time_shift_type="exponential"), {"mu": 0.5}),
    "shift_terminal": (dict(shift=3.0, shift_terminal=0.1), {}),
    "invert_sigmas": (dict(invert_sigmas=True), {}),
}


@pytest.mark.parametrize("name", list(FLOW_OTHERS))
def test_flow_match_other_options(name):
    options, set_kwargs = FLOW_OTHERS[name]
    with mmfast.set_backend("torch"):
        steps_list = _steps(list(FLOW_OTHERS).index(name))
        for steps in steps_list[1:] if "shift_terminal" in options else steps_list:  # diffusers' 1 step: NaN
            _compare(lambda: diffusers.FlowMatchEulerDiscreteScheduler(**options), steps, set_kwargs=set_kwargs)
        _compare(lambda: diffusers.FlowMatchEulerDiscreteScheduler(**options), 10, start=3, set_kwargs=set_kwargs)


# ---- UniPC (Wan 2.1 / 2.2) --------------------------------------------------------------------

UNIPC_SIGMAS = {"flow-shift3": dict(use_flow_sigmas=True, flow_shift=3.0),
                "flow-shift5": dict(use_flow_sigmas=True, flow_shift=5.0),
                "default": {}, "karras": {"use_karras_sigmas": True}}
UNIPC_GRID = _grid(sigmas=list(UNIPC_SIGMAS), solver=["bh2", "bh1"], final=["zero", "sigma_min"])


@pytest.mark.parametrize("config", UNIPC_GRID, ids=_id)
def test_unipc_grid(config):
    # "bh1" to a zero final sigma: diffusers' last step is NaN (B(h) = -h is infinite);
    # the patch leaves that step to diffusers.
    index = UNIPC_GRID.index(config)
    flow = "use_flow_sigmas" in UNIPC_SIGMAS[config["sigmas"]]
    prediction = "flow_prediction" if flow else ("epsilon", "v_prediction", "sample")[index % 3]

    def make():
        return diffusers.UniPCMultistepScheduler(
            **({} if flow else SD15), **UNIPC_SIGMAS[config["sigmas"]], solver_type=config["solver"],
            final_sigmas_type=config["final"], prediction_type=prediction, lower_order_final=index % 4 != 1)

    with mmfast.set_backend("torch"):
        for steps in _steps(index)[:4]:
            _compare(make, steps, nan_where_diffusers_nan=config["solver"] == "bh1")


UNIPC_OTHERS = {
    "order1": dict(solver_order=1),
    "disable_corrector": dict(disable_corrector=[0, 2, 3]),
    "no_lower_order_final_sigma_min": dict(lower_order_final=False, final_sigmas_type="sigma_min"),
    "trailing": dict(timestep_spacing="trailing"),
    # Left to diffusers' step (the fallback): second order to a zero sigma (inf in
    # diffusers), noise prediction, third order, thresholding.
    "no_lower_order_final_zero": dict(lower_order_final=False),
    "predict_eps": dict(predict_x0=False, prediction_type="epsilon", use_flow_sigmas=False,
                        final_sigmas_type="sigma_min"),  # to a zero sigma diffusers computes 0 * inf
    "order3": dict(solver_order=3),
    "thresholding": dict(thresholding=True, sample_max_value=0.5),
}


@pytest.mark.parametrize("name", list(UNIPC_OTHERS))
def test_unipc_other_options(name):
    options = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
               **UNIPC_OTHERS[name]}

    def make():
        return diffusers.UniPCMultistepScheduler(**options)

    nan = name == "no_lower_order_final_zero"
    with mmfast.set_backend("torch"):
        for steps in _steps(list(UNIPC_OTHERS).index(name))[:4]:
            _compare(make, steps, nan_where_diffusers_nan=nan)
        _compare(make, 10, start=4, nan_where_diffusers_nan=nan)


# ---- the kernel ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: diffusers.DPMSolverMultistepScheduler(**SD15, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    lambda: diffusers.EulerDiscreteScheduler(**SD15, use_karras_sigmas=True),
    lambda: diffusers.DDIMScheduler(**SD15, clip_sample=True),
    lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    lambda: diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=5.0),
], ids=["dpm-karras-sigma-min", "euler-karras", "ddim-clip", "flow", "unipc-wan"])
def test_kernel_backend_on_the_permuted_sample(make):
    # Regression: the fused step refused diffusers' permuted sample ("out: must be
    # contiguous like sample"); 16 steps: DPM's last step is second order from a repeated sigma.
    _compare(make, 16)
