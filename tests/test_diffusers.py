import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import fewstep  # noqa: E402
from fewstep.diffusers import FewstepScheduler  # noqa: E402

torch.set_num_threads(1)
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
SOLVERS = [n for n in fewstep.solvers.names()]


@pytest.mark.parametrize("solver", SOLVERS)
def test_nfe_and_constant_velocity(solver):
    try:
        s = FewstepScheduler(solver=solver, **FLUX_DEV)
    except (ValueError, TypeError) as e:
        pytest.skip(f"needs options: {e}")
    s.set_timesteps(sigmas=np.linspace(1, 1 / 6, 6), device="cpu", mu=1.15)
    assert len(s.timesteps) == 6 and len(s.sigmas) == 7 and float(s.sigmas[-1]) == 0
    s.set_begin_index(0)
    x = torch.randn(1, 16, 4)
    c = torch.randn(1, 16, 4)
    x0 = x.clone()
    for t in s.timesteps:
        x = s.step(c, t, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0 - float(s.sigmas[0]) * c, atol=2e-4, rtol=0)


def test_euler_matches_flowmatch():
    ours = FewstepScheduler(solver="euler", **FLUX_DEV)
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    for s in (ours, ref):
        s.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4), device="cpu", mu=0.8)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=1e-3, rtol=0)
    x = torch.randn(1, 8, 4)
    a, b = x.clone(), x.clone()
    for t in ours.timesteps:
        v = torch.sin(a)
        a = ours.step(v, t, a, return_dict=False)[0]
        b = ref.step(v, t, b, return_dict=False)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_mu_ignored_without_dynamic_and_errors():
    s = FewstepScheduler(solver="adams2")
    s.set_timesteps(sigmas=np.linspace(1, 0.25, 4), device="cpu", mu=0.6)
    assert len(s.timesteps) == 4
    with pytest.raises(ValueError):
        FewstepScheduler(solver="nope")
    with pytest.raises(ValueError):
        FewstepScheduler(solver="euler", **FLUX_DEV).set_timesteps(4)


def test_mid_schedule_entry():
    s = FewstepScheduler(solver="adams2", shift=3.0)
    s.set_timesteps(8)
    s.set_begin_index(3)
    x = torch.randn(2, 4, 4, 4)
    c = torch.ones_like(x)
    x0 = x.clone()
    n = 0
    for t in s.timesteps[3:]:
        x = s.step(c, t, x).prev_sample
        n += 1
    assert n == 5
    torch.testing.assert_close(x, x0 - float(s.sigmas[3]) * c, atol=2e-4, rtol=0)


KNOWN_ENTRY_GAPS = {"heun", "neuralsolver"}  # re-planning on the sub-grid is not yet exact for these (see report)


@pytest.mark.parametrize("solver", [pytest.param(n, marks=pytest.mark.xfail(strict=False, reason="known gap"))
                                    if n in KNOWN_ENTRY_GAPS else n for n in SOLVERS])
def test_mid_schedule_entry_all_solvers(solver):
    s = FewstepScheduler(solver=solver, shift=3.0)
    s.set_timesteps(8)
    x = torch.randn(1, 4, 8)
    c = torch.ones_like(x)
    x0 = x.clone()
    k = 3
    for t in s.timesteps[k:]:  # no begin index: entry found through index_for_timestep
        x = s.step(c, t, x, return_dict=False)[0]
    assert s.step_index == len(s.timesteps)
    torch.testing.assert_close(x, x0 - float(s.sigmas[k]) * c, atol=2e-4, rtol=0)


def test_named_schedulers_take_the_stork_docs_kwargs_and_round_trip(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.diffusers import AdamsScheduler, NeuralSolverScheduler, StorkScheduler

    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    stork = StorkScheduler.from_config(base.config, order=2, stages=9)
    assert stork.config.order == 2 and stork.config.shift == 3.0 and stork.config.use_dynamic_shifting
    stork.set_timesteps(8, mu=1.15)
    assert len(stork.timesteps) == 8
    stork.save_pretrained(tmp_path)
    again = StorkScheduler.from_pretrained(tmp_path)
    again.set_timesteps(8, mu=1.15)
    assert torch.equal(again.timesteps, stork.timesteps) and again.config.stages == 9
    assert AdamsScheduler(order=4).config.order == 4
    NeuralSolverScheduler(solver_file="flowdcn").set_timesteps(6)
    with pytest.raises(ValueError, match="order must be 2 or 4"):
        StorkScheduler(order=3)
    with pytest.raises(ValueError, match="stages"):
        StorkScheduler(stages=1000)
