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
