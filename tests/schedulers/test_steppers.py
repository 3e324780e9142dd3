"""Fused steppers on their own: device-schedule mode (what a CUDA graph replays) equals
host mode step for step, state and reset, and bad input. Equivalence with diffusers is in
tests/integrations/test_diffusers_schedulers.py."""

import math

import pytest
import torch

from mmfast.schedulers import DDIMStepper, DPMSolverPP2MStepper, EulerDiscreteStepper, FlowMatchEulerStepper

SIGMAS = [14.6, 6.1, 2.9, 1.4, 0.6, 0.0]
TIMESTEPS = [999.0, 799.0, 599.0, 399.0, 199.0]


def _alphas_cumprod(n=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).tolist()


def _steppers():
    return {
        "ddim": lambda: DDIMStepper(_alphas_cumprod(), [801, 601, 401, 201, 1], final_alpha_cumprod=0.9991),
        "euler": lambda: EulerDiscreteStepper(SIGMAS, TIMESTEPS),
        "dpm": lambda: DPMSolverPP2MStepper(SIGMAS, TIMESTEPS),
        "flow": lambda: FlowMatchEulerStepper([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], TIMESTEPS),
    }


@pytest.mark.parametrize("name", ["euler", "dpm"])
def test_device_schedule_replays_host_mode(name, device):
    host, dev = _steppers()[name](), _steppers()[name]()
    dev.use_device_schedule(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen).to(device)
    xh, xd = x.clone(), x.clone()
    for i in range(len(host)):
        mo = torch.randn(4, 3, 4, 5, generator=gen).to(device)
        assert dev.device_timestep().item() == host.timestep
        torch.testing.assert_close(dev.scale_model_input(xd), host.scale_model_input(xd))
        xh = host.step(mo, xh, guidance_scale=4.0, guidance_rescale=0.3)
        xd = dev.step(mo, xd, guidance_scale=4.0, guidance_rescale=0.3)
        torch.testing.assert_close(xd, xh, rtol=1e-6, atol=1e-6)
    # Past the end: NaN in device mode (no sync to check), an error in host mode.
    assert dev.step(mo, xd, guidance_scale=4.0).isnan().all()
    with pytest.raises(IndexError, match="all 5 steps of the schedule were taken"):
        host.step(mo, xh, guidance_scale=4.0)
    # reset() starts over, the solver state included; in device mode in place (a captured
    # graph keeps the table's address).
    table = dev._table.table
    host.reset()
    dev.reset()
    assert dev._table.table is table
    torch.testing.assert_close(dev.step(mo, x, guidance_scale=4.0), host.step(mo, x, guidance_scale=4.0))


def test_dpm_state_is_the_previous_x0_and_orders_follow_diffusers():
    stepper = DPMSolverPP2MStepper(SIGMAS, TIMESTEPS)
    orders = [1 if stepper.is_first_order(i, 0) else 2 for i in range(len(stepper))]
    assert orders == [1, 2, 2, 2, 1]  # first step, and the last (final sigma is zero)
    assert stepper.coefficients(0).c1 == 0.0 and stepper.coefficients(1).c1 != 0.0
    x, mo = torch.randn(1, 8), torch.randn(1, 8)
    x0 = torch.empty(1, 8)
    stepper.step(mo, x, x0_out=x0, backend="torch")
    alpha, sigma = 1 / math.sqrt(14.6 ** 2 + 1), 14.6 / math.sqrt(14.6 ** 2 + 1)
    torch.testing.assert_close(x0, (x - sigma * mo) / alpha)
    with pytest.raises(ValueError, match="sample: shape .* changed mid-schedule"):
        stepper.step(torch.randn(2, 8), torch.randn(2, 8))


def test_bad_input_names_the_argument():
    euler = _steppers()["euler"]()
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match=r"timestep: 599.0 is step 2, but the next step is 0 \(timestep 999.0\)"):
        euler.step(x, x, timestep=599.0)
    with pytest.raises(ValueError, match="timestep: 5.0 is not in the schedule"):
        euler.step(x, x, timestep=torch.tensor(5.0))
    with pytest.raises(ValueError, match="noise: EulerDiscreteStepper with this configuration adds no noise"):
        euler.step(x, x, noise=x)
    eta = DDIMStepper(_alphas_cumprod(), [801, 601, 401, 201, 1], eta=0.5)
    with pytest.raises(ValueError, match="noise: DDIMStepper with this configuration adds noise"):
        eta.step(x, x)
    with pytest.raises(ValueError, match=r"timestep: expected an integer in \[0, 1000\)"):
        DDIMStepper(_alphas_cumprod(), [1000, 500])
    with pytest.raises(ValueError, match="thresholding: dynamic thresholding"):
        DDIMStepper(_alphas_cumprod(), [500], thresholding=True)
    with pytest.raises(ValueError, match="solver_order: the fused step has orders 1 and 2"):
        DPMSolverPP2MStepper(SIGMAS, TIMESTEPS, solver_order=3)
    with pytest.raises(ValueError, match="sigmas: expected 6 values"):
        EulerDiscreteStepper(SIGMAS[:-1], TIMESTEPS)
    with pytest.raises(ValueError, match="model_output: guidance needs an even batch"):
        _steppers()["flow"]().step(torch.randn(3, 4), x, guidance_scale=2.0)
    with pytest.raises(ValueError, match="start: expected 0 <= start < 5"):
        euler.reset(5)


@pytest.mark.gpu
def test_captured_denoising_step_replays_the_schedule():
    """scale_model_input -> a stand-in denoiser -> step, captured once, replayed per step."""
    host, dev = DPMSolverPP2MStepper(SIGMAS, TIMESTEPS), DPMSolverPP2MStepper(SIGMAS, TIMESTEPS)
    dev.use_device_schedule("cuda")
    weight = torch.randn(8, 1, 1, 1, device="cuda", dtype=torch.float16)

    def denoiser(x, t):
        return torch.cat([x] * 2) * weight + t.to(x.dtype) / 1000

    x0 = torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.float16)
    static = x0.clone()

    def one_step():
        eps = denoiser(dev.scale_model_input(static), dev.device_timestep())
        dev.step(eps, static, guidance_scale=7.5, guidance_rescale=0.7, out=static)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_step()  # warm-up: compiles the kernels, allocates the solver state
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    dev.reset()
    static.copy_(x0)
    x = x0.clone()
    for t in host.timesteps:
        graph.replay()
        eps = denoiser(host.scale_model_input(x), torch.tensor(t, device="cuda"))
        x = host.step(eps, x, guidance_scale=7.5, guidance_rescale=0.7)
        torch.testing.assert_close(static, x, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver", ["midpoint", "heun"])
def test_dpm_step_between_equal_sigmas_is_the_identity(algorithm, solver):
    # Regression: Karras sigmas with final_sigmas_type="sigma_min" end on a repeated sigma;
    # the second-order coefficients divided by h = 0 (ZeroDivisionError).
    from mmfast.schedulers import dpm_solver_coefficients

    for s1 in (None, 0.1):
        coef = dpm_solver_coefficients(s1, 0.03, 0.03, algorithm_type=algorithm, solver_type=solver)
        assert (coef.cx, coef.cm, coef.c0, coef.c1, coef.cn) == (1.0, 0.0, 0.0, 0.0, 0.0)
        assert coef.px == pytest.approx(math.sqrt(0.03 ** 2 + 1)) and coef.pm == pytest.approx(-0.03)  # x0 as ever
    with pytest.raises(ValueError, match="sigmas: the previous sigma 0.5 equals"):
        dpm_solver_coefficients(0.5, 0.5, 0.2, algorithm_type=algorithm, solver_type=solver)
    stepper = DPMSolverPP2MStepper([1.0, 0.5, 0.03, 0.03], [900.0, 500.0, 20.0], solver_type=solver,
                                   algorithm_type=algorithm, lower_order_final=False)
    assert not stepper.is_first_order(2, 0)
    assert stepper.coefficients(2).cx == 1.0
