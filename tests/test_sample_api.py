"""`fewstep.sample` refuses inputs it would otherwise get silently wrong, with an error that names the step."""

import numpy as np
import pytest
import torch

import fewstep
from fewstep.errors import InvalidInput

torch.set_num_threads(1)


@pytest.mark.parametrize("noise", [torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool),
                                   np.ones((2, 3), dtype=np.int32), [1.0, 2.0]])
@pytest.mark.parametrize("prediction", ["flow", "epsilon"])
def test_integer_or_non_array_noise_is_refused_before_any_call(noise, prediction):
    calls = []
    with pytest.raises(InvalidInput, match="noise must be a"):
        fewstep.sample(lambda x, s: calls.append(s) or x, noise, "euler", 4, prediction=prediction)
    assert not calls


@pytest.mark.parametrize("solver", ["euler", "adams2", "heun"])
def test_a_model_output_of_the_wrong_shape_names_the_call_and_sigma(solver):
    x = torch.zeros(2, 4, 8)
    calls = []

    def model(x, sigma):  # broadcastable to x, but one velocity for the whole batch from the third call on
        calls.append(sigma)
        return torch.zeros_like(x) if len(calls) < 3 else torch.zeros(4, 8)

    plan = fewstep.make_plan(solver, 4)
    with pytest.raises(InvalidInput, match=rf"call 3 of 4 \(sigma={plan.sigmas[2]:.6g}\) has shape \(4, 8\); it "
                                           r"must have the shape of its input x, \(2, 4, 8\)"):
        fewstep.sample(model, x, solver, 4)
    assert len(calls) == 3


def test_a_model_returning_no_array_is_named_too():
    with pytest.raises(InvalidInput, match=r"call 1 of 4 \(sigma=1\) has NoneType"):
        fewstep.sample(lambda x, s: None, np.zeros(3), "euler", 4)


def test_epsilon_shape_error_names_the_vp_time():
    with pytest.raises(InvalidInput, match=r"call 1 of 4 \(t=0\.999\) has shape \(1,\)"):
        fewstep.sample(lambda x, t: torch.zeros(1), torch.zeros(2, 3), "euler", 4, prediction="epsilon")


@pytest.mark.parametrize("kwargs,message", [
    (dict(solver=None), "solver must be a solver name"),
    (dict(solver=5), "solver must be a solver name"),
    (dict(shift="3"), "shift must be a number from"),
    (dict(shift=0.0), "shift must be a number from"),
    (dict(shift=1e-300), "shift must be a number from"),  # every σ rounds to 0 or 1: no grid
    (dict(shift=1e308), "shift must be a number from"),
    (dict(mu=1e6), "mu must be a finite number from -50 to 50"),
    (dict(mu=1.0, shift=3.0), "give shift or mu, not both"),  # the shift was silently ignored
    (dict(sigmas="abc"), "sigmas must be a list of numbers"),
    (dict(sigmas=[[1.0, 0.5]]), "sigmas must be a flat list"),
    (dict(sigmas=[2.0, 0.5, 0.1]), r"noise levels in \[0, 1\]"),
])
def test_bad_sample_arguments_are_invalid_input_naming_the_argument(kwargs, message):
    calls = []
    with pytest.raises(InvalidInput, match=message):
        fewstep.sample(lambda x, s: calls.append(s) or -x, torch.zeros(2, 3), **{"steps": 4, **kwargs}
                       if "sigmas" not in kwargs else kwargs)
    assert calls == []


@pytest.mark.parametrize("timesteps", [[999.0, 500.0, 1.0], [5.0, 0.5, 0.1], [0.5, 0.8, 0.1], [[0.9, 0.1]]])
def test_epsilon_timesteps_must_be_decreasing_vp_times_not_indices(timesteps):
    with pytest.raises(InvalidInput, match="timesteps must be at least two strictly decreasing VP times"):
        fewstep.sample(lambda x, t: x, torch.zeros(2, 3), "euler", prediction="epsilon", timesteps=timesteps)


@pytest.mark.parametrize("output,kind", [(lambda x: x.numpy(), "ndarray"), (lambda x: x.to(torch.complex64), "complex"),
                                         (lambda x: x.to(torch.int32), "int32")])
def test_a_model_returning_another_array_type_or_dtype_is_named(output, kind):
    with pytest.raises(InvalidInput, match=rf"call 1 of 4 \(sigma=1\) is a .*{kind}.*real floating-point torch"):
        fewstep.sample(lambda x, s: output(x), torch.zeros(2, 3), "euler", 4)


@pytest.mark.parametrize("solver", ["adams-denoise", "stork-4", "heun"])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_a_model_that_reuses_its_output_buffer_gives_the_same_samples(solver, kind):
    """A compiled model may return one buffer every call: the solver's history must hold copies, not that buffer."""
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if kind == "numpy":
        noise = noise.numpy()
    buffer = noise * 0

    def fresh(x, sigma):
        return x * (0.5 + sigma) + 0.1 * x**3 * sigma

    def reused(x, sigma):
        buffer[...] = fresh(x, sigma)
        return buffer

    a = fewstep.sample(fresh, noise, solver, steps=6, shift=3.0)
    b = fewstep.sample(reused, noise, solver, steps=6, shift=3.0)
    assert (a == b).all()


@pytest.mark.parametrize("prediction", ["flow", "epsilon"])
def test_noise_with_nan_or_inf_is_refused_before_any_call(prediction):
    """A bad value in the user's noise is named as the noise's, not blamed on the model at its first call."""
    calls = []
    for bad in (float("nan"), float("inf")):
        noise = torch.randn(2, 3)
        noise[1, 1] = bad
        with pytest.raises(InvalidInput, match="noise contains NaN or infinite values"):
            fewstep.sample(lambda x, s: calls.append(s) or torch.zeros_like(x), noise, "adams-denoise", 4,
                           prediction=prediction)
    assert not calls


def test_neuralsolver_refuses_sigmas_it_cannot_follow_and_warns_on_another_shift():
    """A searched file runs its own grid from σ = 1: a grid starting lower (img2img by hand) would treat the input as
    pure noise, so it is refused; a shift other than the file's runs the file's grid, with a GridMismatchWarning."""
    from fewstep.search import GridMismatchWarning

    c = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    constant = lambda x, s: c.expand_as(x).clone()  # noqa: E731
    noise = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(InvalidInput, match="own searched grid from sigma = 1; the given sigmas start at 0.5"):
        fewstep.sample(constant, noise, "neuralsolver", sigmas=[0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
                       solver_file="digits-shift1")
    # from σ = 1 its grid integrates a constant velocity exactly: x(0) = noise − c
    x = fewstep.sample(constant, noise, "neuralsolver", sigmas=np.linspace(1, 1 / 6, 6), solver_file="digits-shift1")
    torch.testing.assert_close(x, -c, rtol=0, atol=1e-9)
    with pytest.warns(GridMismatchWarning, match="searched on the shift-1 grid, sampling asks for shift 3"):
        fewstep.sample(constant, noise, "neuralsolver", 6, shift=3.0, solver_file="digits-shift1")


def test_epsilon_models_see_the_given_timesteps_exactly():
    """The VP times a model sees are the ones given (not a round trip through the flow variable, which moved them by
    ulps: int(t·1000) then read 998 for 0.999)."""
    seen = []
    times = [k / 1000 for k in range(999, 0, -111)]
    fewstep.sample(lambda x, t: seen.append(t) or 0.3 * x, torch.randn(2, 3), "adams-denoise", prediction="epsilon",
                   timesteps=times)
    assert seen == times[:-1]
    seen.clear()
    fewstep.sample(lambda x, t: seen.append(t) or 0.3 * x, torch.randn(2, 3), "adams-denoise", prediction="epsilon",
                   timesteps=times, begin_index=3)
    assert seen == times[3:-1]
