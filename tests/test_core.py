"""Foundation: grids, the executor, Euler/Heun/Adams, the exact GMM testbed."""

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fewstep
from fewstep import solvers
from fewstep.schedules import VPSchedule, flow_sigmas
from fewstep.solvers.adams import adams_weights
from fewstep.testbed import GaussianMixture, convergence_order, preset, reference_solve

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parent / "data"  # the official implementations' outputs: tests/data/README.md


def _fm_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("config,kwargs", [
    ({"shift": 1.0}, {"num_inference_steps": 8}),
    ({"shift": 3.0}, {"num_inference_steps": 10}),
    ({"shift": 3.0, "use_dynamic_shifting": True}, {"num_inference_steps": 6, "mu": 1.15}),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"num_inference_steps": 5, "mu": 0.7}),
    ({"shift": 1.0}, {"sigmas": list(np.linspace(1, 1 / 7, 7)), "mu": 0.5}),  # Flux-schnell: mu passed, ignored
    ({"use_dynamic_shifting": True, "shift_terminal": 0.02, "max_shift": 0.9}, {"sigmas": [1, .8, .5, .3], "mu": .8}),
])
def test_flow_sigmas_match_flow_match_euler(config, kwargs):
    sched = _fm_euler()(**config)
    sched.set_timesteps(**kwargs)
    ours = flow_sigmas(kwargs.get("num_inference_steps"), config.get("shift", 1.0),
                       kwargs.get("mu") if config.get("use_dynamic_shifting") else None,
                       time_shift_type=config.get("time_shift_type", "exponential"), sigmas=kwargs.get("sigmas"),
                       shift_terminal=config.get("shift_terminal"))
    assert np.abs(ours - sched.sigmas.double().numpy()).max() <= 1e-7


def test_user_sigmas_ending_in_zero_get_no_second_zero():
    assert flow_sigmas(sigmas=[1.0, 0.5, 0.0]).tolist() == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("name,options,uniform_min,shifted_min", [
    ("euler", {}, 0.95, 0.95),
    ("heun", {}, 1.9, 1.9),
    ("adams2", {}, 1.9, 1.9),
    ("adams3", {"startup": "rk"}, 2.9, 2.9),
    ("adams4", {"startup": "rk"}, 3.8, 3.8),
])
def test_convergence_order(name, options, uniform_min, shifted_min):
    uniform, _, _ = convergence_order(name, [32, 64, 128, 256], **options)
    shifted, _, _ = convergence_order(name, [32, 64, 128, 256], shift=3.0, **options)
    assert uniform >= uniform_min and shifted >= shifted_min, (uniform, shifted)


def test_ramp_startup_caps_adams4_at_second_order():
    # The default start-up (Euler, AB2, AB3, then AB4) costs no extra calls, but its Euler step's O(h²) local error
    # caps the global order at 2 (measured ≈2.06 on the uniform grid); startup="rk" restores order 4.
    ramp, ramp_err, ramp_calls = convergence_order("adams4", [32, 64, 128, 256])
    rk, rk_err, rk_calls = convergence_order("adams4", [32, 64, 128, 256], startup="rk")
    assert 1.8 <= ramp <= 2.3 and rk >= 3.8
    assert ramp_calls == [32, 64, 128, 256] and rk_calls == [41, 73, 137, 265]  # 3 RK4 steps: 3 extra calls each


def test_adams_weights_match_closed_forms():
    assert np.allclose(adams_weights(np.array([0.7, 0.8, 0.9][::-1]), 0.7, 0.6)[::-1], [23 / 12, -16 / 12, 5 / 12])
    h, h1, h2 = 0.1, 0.15, 0.3  # docs/neuralsolver.md §Adams: AB3 on a non-uniform grid
    s = 0.5
    b = adams_weights(np.array([s + h1 + h2, s + h1, s]), s, s - h)
    expected = [(h * h / 3 + h1 * h / 2) / (h2 * (h1 + h2)), -(h * h / 3 + (h1 + h2) * h / 2) / (h1 * h2),
                (h * h / 3 + (2 * h1 + h2) * h / 2 + h1 * (h1 + h2)) / (h1 * (h1 + h2))]
    assert np.abs(b - expected).max() <= 1e-13


# Random decreasing grids from 1 to 0 whose step sizes differ by at most 20×.
grids = st.lists(st.floats(0.05, 1.0), min_size=2, max_size=7).map(lambda steps: 1.0 - np.r_[0.0, np.cumsum(steps)] /
                                                                     np.sum(steps))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["euler", "heun", "adams2", "adams3", "adams4"]), grid=grids,
       shape=st.sampled_from([(3,), (2, 5), (1, 4, 3, 2)]), dtype=st.sampled_from(["f64", "f32", "bf16", "np"]))
def test_constant_velocity_is_integrated_exactly(name, grid, shape, dtype):
    velocity = 0.37 + np.arange(int(np.prod(shape))).reshape(shape) * 0.1
    if dtype == "np":
        x0, c = np.ones(shape), velocity
    else:
        torch_dtype = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}[dtype]
        x0, c = torch.ones(shape, dtype=torch_dtype), torch.tensor(velocity, dtype=torch_dtype)
    plan = fewstep.make_plan(name, sigmas=grid)
    out = fewstep.sampling.execute(plan, lambda x, s: c + 0 * x, x0)
    assert out.dtype == x0.dtype
    expected = 1.0 - (plan.sigmas[0] - plan.sigma_end) * velocity
    got = out if dtype == "np" else out.double().numpy()
    tol = {"f64": 1e-12, "np": 1e-12, "f32": 1e-4, "bf16": 3e-2}[dtype]
    assert np.abs(got - expected).max() <= tol * max(1.0, np.abs(expected).max())


def test_gmm_velocity_and_epsilon_match_50_digit_values():
    spec = json.loads(resources.files("fewstep.data").joinpath("gmm8d.json").read_text())
    g, check = preset("gmm8d"), spec["check"]
    x = torch.tensor(check["x"], dtype=torch.float64)
    for sigma, v in zip(check["sigmas"], check["velocity"], strict=True):
        assert (g.velocity(x, sigma) - torch.tensor(v, dtype=torch.float64)).abs().max() <= 1e-12
    for t, e in zip(check["vp_t"], check["vp_eps"], strict=True):
        assert (g.epsilon(x, t) - torch.tensor(e, dtype=torch.float64)).abs().max() <= 1e-12


def test_gmm_velocity_satisfies_the_continuity_equation():
    # ∂_σ log p_σ + ∇·v + v·∇ log p_σ = 0, with p_σ the exact marginal density of x_σ (an independent check).
    g = GaussianMixture([1.0, 2.0, 1.5], [[0.0, 1.0], [1.5, -1.0], [-1.0, -0.5]], [0.3, 0.5, 0.2])
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def log_p(y, sigma):
        a = 1 - sigma
        marginal = GaussianMixture(g.log_weights.exp(), a * g.means, (a * a * g.variances + sigma ** 2).sqrt())
        return marginal.log_prob(y)

    for sigma in (0.2, 0.5, 0.8):
        y = x.clone().requires_grad_(True)
        v = g.velocity(y, sigma)
        div = sum(torch.autograd.grad(v[:, d].sum(), y, retain_graph=True)[0][:, d] for d in range(2))
        grad_log_p = torch.autograd.grad(log_p(y, sigma).sum(), y)[0]
        eps = 1e-5
        dlogp = (log_p(x, sigma + eps) - log_p(x, sigma - eps)) / (2 * eps)
        residual = dlogp + div + (v * grad_log_p).sum(1)
        assert residual.abs().max() <= 1e-6


def test_reference_solve_matches_stored_exact_solution():
    z = np.load(DATA / "stork_official.npz")
    ref = reference_solve(preset("gmm8d").velocity, torch.from_numpy(z["noise"]))
    assert (ref.x - torch.from_numpy(z["exact"])).abs().max() <= 1e-8
    assert ref.error <= 1e-8


@pytest.mark.parametrize("n", [5, 8, 10])
def test_epsilon_euler_is_ddim(n):
    # Euler in flow coordinates s = σ/(α+σ), x̃ = x/(α+σ) is DDIM(η=0): matches the official DDIM sampler.
    z = np.load(DATA / "neuralsolver_official.npz")
    g, noise = preset("gmm8d"), torch.from_numpy(z["noise"])
    times = np.r_[z[f"vp/ddim/N{n}/t_called"], 0.999 - 1.0]
    out = fewstep.sample(g.epsilon, noise, "euler", n, prediction="epsilon", timesteps=times)
    assert (out - torch.from_numpy(z[f"vp/ddim/N{n}/x"])).abs().max() <= 1e-12


def test_epsilon_sampling_converges_to_the_pf_ode_solution():
    g, vp = preset("gmm8d"), VPSchedule()
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s0, s1 = (float(vp.to_flow(t)) for t in (0.999, 1e-3))
    a0, b0 = vp.alpha_sigma(0.999)
    a1, b1 = vp.alpha_sigma(1e-3)
    exact = reference_solve(g.velocity, noise / float(a0 + b0), s0, s1).x * float(a1 + b1)
    errors = [float((fewstep.sample(g.epsilon, noise, "adams2", n, prediction="epsilon") - exact).abs().max())
              for n in (40, 80)]
    assert errors[1] < errors[0] / 3


def test_vp_flow_time_round_trip():
    vp = VPSchedule()
    t = np.linspace(1e-3, 1.0, 50)
    assert np.abs(vp.from_flow(vp.to_flow(t)) - t).max() <= 1e-10


def test_numpy_state_and_model():
    out = fewstep.sample(lambda x, s: -x, np.ones(3), "adams3", sigmas=np.linspace(1, 0, 41))  # dx/dσ = −x
    same = fewstep.sample(lambda x, s: -x, torch.ones(3, dtype=torch.float64), "adams3", sigmas=np.linspace(1, 0, 41))
    assert isinstance(out, np.ndarray) and np.abs(out - same.numpy()).max() <= 1e-14
    assert np.abs(out - np.e).max() <= 1e-3


def test_unknown_solver_lists_the_names():
    with pytest.raises(ValueError, match="available: .*adams2"):
        fewstep.sample(lambda x, s: x, torch.zeros(2), "rk45", 4)
    with pytest.raises(ValueError, match="no option 'stages'"):
        solvers.get("adams2", stages=3)


@pytest.mark.parametrize("solver,steps,match", [
    ("euler", 0, "positive integer"), ("euler", -3, "positive integer"), ("heun", 5, "can make 2, 4, 6"),
    ("adams4", 2.5, "positive integer"), ("euler", 10**9, "positive integer of at most 100000"),
])
def test_bad_step_counts(solver, steps, match):
    with pytest.raises(ValueError, match=match):
        fewstep.sample(lambda x, s: x, torch.zeros(2), solver, steps)


def test_non_finite_model_output_names_the_call_and_sigma():
    def model(x, sigma):
        return x / 0 if sigma < 0.6 else x

    with pytest.raises(fewstep.NonFiniteError, match=r"call 4 of 8 \(sigma=0\.5718"):
        fewstep.sample(model, torch.ones(2), "adams2", 8)


def test_sigmas_must_decrease_and_mu_is_required_for_dynamic_shifting():
    with pytest.raises(ValueError, match="strictly decreasing"):
        fewstep.sample(lambda x, s: x, torch.zeros(2), "euler", sigmas=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="needs `mu`"):
        flow_sigmas(8, dynamic_shifting=True)


@pytest.mark.parametrize("kwargs", [dict(intervals=2.7), dict(intervals="3"), dict(intervals=0), dict(intervals=True),
                                    dict(intervals=4, num_train_timesteps=0)])
def test_flow_sigmas_refuses_interval_counts_it_would_round_or_cannot_use(kwargs):
    """flow_sigmas(2.7) silently made 2 intervals, and num_train_timesteps=0 failed with an IndexError."""
    from fewstep.errors import InvalidInput

    with pytest.raises(InvalidInput, match="intervals and num_train_timesteps must be positive integers"):
        fewstep.flow_sigmas(**kwargs)
