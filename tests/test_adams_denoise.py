"""adams-denoise: Adams steps on the velocity with a free corrector, denoiser (x̂0) jumps into σ ≈ 0."""

import numpy as np
import pytest
import torch

import fewstep
from fewstep.sampling import execute
from fewstep.schedules import flow_sigmas
from fewstep.solvers import get, grid_plan
from fewstep.solvers.denoise import JUMP_RATIO, jump_steps
from fewstep.testbed import preset, reference_solve


def test_jump_steps_on_the_grids_pipelines_pass():
    # diffusers' default FlowMatchEuler grid ends σ_min = 0.001 → 0: the step into σ_min is a jump in all but name.
    default = flow_sigmas(6, 1.0)  # 1, .8002, .6004, .4006, .2008, .001, 0
    assert jump_steps(default).tolist() == [False, False, False, False, True, True]
    # A pipeline's sigmas (Flux / SD3: linspace(1, 1/N, N), shifted): only the last step, to σ = 0.
    for shift, mu in ((1.0, None), (3.0, None), (1.0, 1.15)):
        grid = flow_sigmas(sigmas=np.linspace(1.0, 1.0 / 8, 8), shift=shift, mu=mu)
        assert jump_steps(grid).tolist() == [False] * 7 + [True]
    # The threshold is the step-ratio bound in λ = log((1 − σ)/σ): a step 1 + √2 times its predecessor is not a jump.
    steps = [1.0, JUMP_RATIO * 0.999]
    steps.append(steps[-1] * JUMP_RATIO * 1.001)
    lam = np.cumsum([-1.0, *steps])
    grid = 1.0 / (1.0 + np.exp(lam))
    assert jump_steps(np.append(grid, 0.0)).tolist() == [False, False, True, True]


def test_last_step_is_the_denoiser_output():
    grid = flow_sigmas(sigmas=np.linspace(1.0, 0.25, 4), shift=3.0)
    for corrector in (False, True):
        last = grid_plan(get("adams-denoise", corrector=corrector), grid).rows[-1]
        # x_N = x̂0(x_{N−1}) = x_{N−1} − σ_{N−1}·v_{N−1}, from the state the model saw (the corrector is not used).
        assert last.x == {3: 1.0} and last.v == pytest.approx({3: -grid[3]}, rel=1e-15)


def test_corrector_makes_linear_velocity_exact():
    """v = a + bσ (state-independent): AB2 is exact but its Euler start-up step is off by b·h₀²/2; the Adams–Moulton
    corrector of that step (the trapezoid rule) removes it. A grid ending above σ = 0 has no jumps."""
    a, b = 0.3, -1.7
    grid = np.array([1.0, 0.85, 0.6, 0.45, 0.3, 0.2])

    def v(x, sigma):
        return np.full_like(x, a + b * sigma)

    exact = 1.0 - (a * (1.0 - 0.2) + b * (1.0 - 0.2 ** 2) / 2)
    without = execute(grid_plan(get("adams-denoise", corrector=False), grid), v, np.ones(1))[0]
    with_c = execute(grid_plan(get("adams-denoise"), grid), v, np.ones(1))[0]
    assert without - exact == pytest.approx(-b * 0.15 ** 2 / 2, rel=1e-12)
    assert abs(with_c - exact) < 1e-14


def test_order_3_with_corrector_leaves_only_the_trapezoid_error():
    """order=3 on a quadratic-in-σ velocity: from the third node on, AB3 predictors and AM3 correctors integrate it
    exactly, and the corrected start-up step is the trapezoid rule, whose error −h₀³·v''/12 is all that is left
    (without the corrector, the Euler and AB2 start-up errors stay)."""
    grid = np.array([1.0, 0.9, 0.75, 0.55, 0.4, 0.3])

    def v(x, sigma):
        return np.full_like(x, 1.0 - 2.0 * sigma + 3.0 * sigma ** 2)  # v'' = 6

    exact = 1.0 - ((1.0 - 0.3) - (1.0 - 0.3 ** 2) + (1.0 - 0.3 ** 3))
    with_c = execute(grid_plan(get("adams-denoise", order=3), grid), v, np.ones(1))[0]
    without = execute(grid_plan(get("adams-denoise", order=3, corrector=False), grid), v, np.ones(1))[0]
    assert with_c - exact == pytest.approx(-(0.1 ** 3) * 6 / 12, rel=1e-10)
    assert abs(without - exact) > 10 * abs(with_c - exact)


@pytest.fixture(scope="module")
def stiff():
    g = preset("gmm-stiff")
    noise = torch.randn(128, g.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return g, noise, reference_solve(g.velocity, noise, check=False).x


def _rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt())


def test_stiff_mixture_no_velocity_extrapolation_into_the_data(stiff):
    """gmm-stiff (component std 0.01) at 6 NFE on the shift-3 pipeline grid: STORK-2 without jumps (the paper's form)
    extrapolates v across the last step into the 1/σ region (~200× off); adams-denoise is at the data-std floor
    (~0.01), and so is STORK with its denoiser jumps switched on."""
    g, noise, ref = stiff
    grid = flow_sigmas(sigmas=np.linspace(1.0, 1.0 / 6, 6), shift=3.0)
    err = {name: _rmse(fewstep.sample(g.velocity, noise, name, sigmas=grid, shift=1.0, **opts), ref)
           for name, opts in (("adams-denoise", {}), ("euler", {}), ("stork-2", {"jump": "none"}))}
    err["stork-2 jump=all"] = _rmse(fewstep.sample(g.velocity, noise, "stork-2", sigmas=grid, jump="all"), ref)
    assert err["adams-denoise"] < 0.015 and err["stork-2 jump=all"] < 0.015, err
    assert err["stork-2"] > 20 * err["adams-denoise"], err


def test_default_fewstep_errors_are_pinned():
    """Regression values (gmm8d, 256 noises, shift-3 pipeline grid, 4/6/8 NFE) of the default adams-denoise."""
    g = preset("gmm8d")
    noise = torch.randn(256, g.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_solve(g.velocity, noise, check=False).x
    got = [_rmse(fewstep.sample(g.velocity, noise, "adams-denoise", sigmas=np.linspace(1.0, 1.0 / n, n), shift=3.0),
                 ref) for n in (4, 6, 8)]
    assert got == pytest.approx(PINNED, rel=1e-6)


PINNED = [2.9298379e-1, 1.7515890e-1, 1.2850014e-1]  # UniPC-2 (diffusers, same grid): 0.304, 0.177, 0.128


def test_options_are_checked():
    from fewstep.errors import InvalidInput

    # InvalidInput (a ValueError): the CLI's one-line errors and callers catching FewstepError see them
    for bad, match in (({"order": 4}, "order"), ({"order": 2.0}, "order must be 2 or 3, got 2.0"),
                       ({"order": True}, "order"), ({"corrector": "yes"}, "corrector"),
                       ({"stiff_fallback": 1}, "stiff_fallback must be True or False"),
                       ({"stiff_fallback": True, "order": 3}, "needs order=2"),
                       ({"corrector_guard": True, "order": 3}, "corrector_guard=True needs order=2"),
                       ({"corrector_guard": "no"}, "corrector_guard must be True or False"),
                       ({"stiff_fallback": True, "corrector_guard": False}, "needs corrector_guard")):
        with pytest.raises(InvalidInput, match=match):
            get("adams-denoise", **bad)
    # the corrector's guard is on by default at order 2 (its bound is the two-step pair's); the fallback is opt-in and
    # guards the corrector as well as the Adams step
    assert get("adams-denoise").corrector_guard and not get("adams-denoise", order=3).corrector_guard
    assert not get("adams-denoise").stiff_fallback and get("adams-denoise", stiff_fallback=True).corrector


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_stiffness_fallback_switches_exactly_the_stiff_samples(array):
    """dx/dσ = λ·x per sample: λ = 0.5 is far inside AB2's stability bound h·λ ≤ 2/(1 + r), so that sample is the
    plain run's bit for bit; λ = 50 is beyond it on every step, so that sample is Euler's (the first step and the
    jumps are Euler already, their coefficients formed differently: to 1e-12; no corrector runs)."""
    lam = np.array([0.5, 50.0]).reshape(2, 1)
    x = np.linspace(0.5, 1.5, 6).reshape(1, 6).repeat(2, axis=0)
    if array == "torch":
        lam, x = torch.from_numpy(lam), torch.from_numpy(x)

    def runs(name, **options):
        return fewstep.sample(lambda y, s: lam * y, x, name, 6, shift=3.0, **options)

    guarded = runs("adams-denoise", corrector=False, stiff_fallback=True)
    plain, euler = runs("adams-denoise", corrector=False), runs("euler")
    assert (guarded[0] == plain[0]).all()
    np.testing.assert_allclose(np.asarray(guarded[1]), np.asarray(euler[1]), rtol=1e-12, atol=0)
    assert not (plain[0] == euler[0]).any() and not (plain[1] == euler[1]).any()  # three different runs


def test_stiffness_fallback_keeps_dtype_and_treats_a_1d_array_as_one_sample():
    x = torch.linspace(0.5, 1.5, 8, dtype=torch.bfloat16)
    out = fewstep.sample(lambda y, s: 50.0 * y, x, "adams-denoise", 6, shift=3.0, corrector=False, stiff_fallback=True)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out, fewstep.sample(lambda y, s: 50.0 * y, x, "euler", 6, shift=3.0))


def test_the_corrector_is_left_out_beyond_its_own_stability_bound():
    """dx/dσ = λ·x on 40 equal steps (h = 1/40): the AB2 predictor with the three-node Adams–Moulton corrector (no
    re-evaluation) is stable for h·λ ≤ 6/11, AB2 alone for h·λ ≤ 1. At h·λ = 0.75 the unguarded run's error grows by
    about 1.36× a step; the guarded run drops the corrector there (not the Adams step: it is not Euler's run) and
    stays at the exact solution's size. At h·λ = 0.25 the guards do nothing (bit for bit)."""
    grid = np.linspace(1.0, 1.0 / 40, 40)
    x = np.ones((1, 4))

    def runs(lam, name="adams-denoise", **options):
        return fewstep.sample(lambda y, s: lam * y, x, name, sigmas=grid, **options)

    plain = runs(30.0, corrector_guard=False)
    for guarded in (runs(30.0), runs(30.0, stiff_fallback=True)):  # the default guard; with the Euler fallback
        assert np.abs(plain).max() > 1e3 and np.abs(guarded).max() < 1e-3
        assert not np.allclose(guarded, runs(30.0, "euler"), rtol=1e-3, atol=0)
    np.testing.assert_array_equal(runs(10.0, stiff_fallback=True), runs(10.0, corrector_guard=False))


def test_an_expanding_change_is_not_stiffness():
    """dx/dσ = −λ·x (trajectories that separate, as at a choice between modes): ‖Δv‖/‖Δx‖ = λ is far beyond every
    bound, but no contracting mode can go unstable; the guard leaves every step as it is."""
    x = np.linspace(0.5, 1.5, 6).reshape(2, 3)
    runs = [fewstep.sample(lambda y, s: -30.0 * y, x, "adams-denoise", 6, shift=3.0, **options)
            for options in ({"stiff_fallback": True}, {"corrector_guard": False})]
    np.testing.assert_array_equal(*runs)


def test_after_an_euler_fallback_the_next_corrector_is_left_out():
    """The guard's `carry` rule on a hand-built plan: a sample that took a level (here Euler) at row 1 takes at least
    level 1 at row 2 even where row 2's own test would keep the full row; the sample that took none keeps it."""
    from fewstep.solvers.plan import Guard, Plan, PlanRun, Row

    test = (Row({1: 1.0, 0: -1.0}), Row({}, {1: 1.0, 0: -1.0})), (Row({2: 1.0, 1: -1.0}), Row({}, {2: 1.0, 1: -1.0}))
    rows = (Row({0: 1.0}, {0: -0.1}), Row({1: 1.0}, {1: -0.1}), Row({2: 1.0}, {2: -0.1}))
    guards = (None, Guard(*test[0], ((100.0, Row({1: 1.0}, {1: -0.2})), (5.0, Row({1: 1.0}, {1: -0.3})))),
              Guard(*test[1], ((100.0, Row({2: 1.0}, {2: -0.2})),), carry=1))
    run = PlanRun(Plan(np.array([1.0, 0.9, 0.8]), 0.7, rows, guards))
    x0 = np.array([[1.0], [1.0]])
    x1 = run.advance(0, x0, np.array([[1.0], [1.0]]))
    x2 = run.advance(1, x1, np.array([[1.0], [-1.0]]))  # Δv/Δx: 0 for sample 0, 20 for sample 1 (> 5: Euler)
    np.testing.assert_allclose(x2, [[0.9 - 0.1], [0.9 + 0.3]])
    x3 = run.advance(2, x2, x2.copy())  # Δv/Δx: 2 and 7.3, contracting, far inside row 2's limit 100
    np.testing.assert_allclose(x3, [[0.8 * 0.9], [1.2 * 0.8]])


@pytest.mark.parametrize("solver", ["adams-denoise", "euler"])
def test_a_0d_numpy_sample_runs_like_a_one_element_array(solver):
    """NumPy arithmetic on 0-D arrays returns scalars (the model's output and the guard's blend): the run keeps a
    0-D array and gives the one-element array's numbers."""
    runs = [fewstep.sample(lambda y, s: 2.0 * y, x, solver, 6, shift=3.0) for x in (np.array(0.7), np.array([0.7]))]
    assert isinstance(runs[0], np.ndarray) and runs[0].shape == ()
    np.testing.assert_array_equal(runs[0], runs[1][0])
