"""Entering a schedule mid-way (img2img) and the flow ↔ ε rewrite, one implementation (`fewstep.entry`) for
`fewstep.sample`, the diffusers adapter and the embedded model's `generate_image`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import fewstep  # noqa: E402
from fewstep.diffusers import FewstepScheduler  # noqa: E402
from fewstep.entry import begin_index_for_strength, enter, epsilon_plan, vp_scale  # noqa: E402
from fewstep.errors import InvalidInput  # noqa: E402
from fewstep.generate import Config, EmbeddedModel  # noqa: E402
from fewstep.models import digits  # noqa: E402
from fewstep.schedules import VPSchedule  # noqa: E402
from fewstep.solvers import get, grid_plan, intervals_for  # noqa: E402

torch.set_num_threads(1)
SOLVERS = fewstep.solvers.names()
STEPS = 8  # every solver can make 8 calls (Heun: 4 intervals; NeuralSolver: its 8-step tables)
REFUSE = [("neuralsolver", {}), ("adams2", {"startup": "rk"}), ("stork-2", {"compat": "official"})]


def diffusers_t_start(n: int, strength: float) -> int:
    """FluxImg2Img / SD3Img2Img `get_timesteps`, written out here independently of fewstep."""
    return int(max(n - min(n * strength, n), 0))


@pytest.fixture(scope="module")
def embedded():
    return EmbeddedModel(kind="digits")


@pytest.fixture(scope="module")
def digit_file(tmp_path_factory):
    """A drawn '7' as an 8×8 PNG (dark ink on white)."""
    pixels = np.full((8, 8), 255, dtype=np.uint8)
    pixels[1, 1:7] = 0
    for r in range(2, 7):
        pixels[r, 7 - r] = 0
    path = tmp_path_factory.mktemp("img") / "seven.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def adapter_img2img(net, clean, noise, label, solver, options, steps, strength):
    """What a diffusers img2img pipeline does with a FewstepScheduler (FluxImg2Img's loop on a plain model)."""
    s = FewstepScheduler(solver=solver, solver_options=options)
    s.set_timesteps(steps)
    k = diffusers_t_start(steps, strength)
    timesteps = s.timesteps[k:]
    s.set_begin_index(k)
    x = s.scale_noise(clean, timesteps[:1], noise)
    velocity = net.velocity_fn(torch.tensor([label]))
    with torch.no_grad():
        for t in timesteps:
            x = s.step(velocity(x, float(t) / 1000), t, x, return_dict=False)[0]
    return x


@pytest.mark.filterwarnings("ignore::fewstep.entry.StageEntryWarning")  # entering at a stage: its own test
@pytest.mark.parametrize("strength", [0.6, 0.35])
@pytest.mark.parametrize("solver", SOLVERS)
def test_embedded_img2img_equals_the_diffusers_adapter(embedded, digit_file, monkeypatch, solver, strength):
    """generate_image's img2img and a diffusers img2img loop on the same velocity enter the same schedule at the same
    call (8 calls, strength 0.6 → call 3, Heun between its stages; 0.35 → call 5) and agree; a solver that cannot
    enter mid-schedule refuses in both, with the same message, before any model call."""
    seen = []
    monkeypatch.setattr(digits, "to_image", lambda x, **kw: seen.append(x.clone()) or Image.new("L", (8, 8)))
    calls = []
    monkeypatch.setattr(embedded.net, "forward", lambda *a, _f=embedded.net.forward: calls.append(1) or _f(*a))
    config = Config(num_inference_steps=STEPS, scheduler=solver, image_path=digit_file, image_strength=strength)
    noise = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    clean = digits_from_file(digit_file)
    k = diffusers_t_start(STEPS, strength)
    if solver == "neuralsolver":
        with pytest.raises(InvalidInput, match=f"cannot start at timestep index {k} of {STEPS}") as ours:
            embedded.generate_image(5, "a seven", config)
        from fewstep.search import shipped_solver

        shipped = {"solver_file": str(shipped_solver("digits"))}  # what generate runs for neuralsolver on digits
        with pytest.raises(InvalidInput) as theirs:
            adapter_img2img(embedded.net, clean, noise, 7, solver, shipped, STEPS, strength)
        assert str(ours.value) == str(theirs.value) and not calls
        return
    embedded.generate_image(5, "a seven", config)
    assert len(calls) == STEPS - k
    ref = adapter_img2img(embedded.net, clean, noise, 7, solver, {}, STEPS, strength)
    # The adapter's model sees σ through float32 timesteps (t/1000), fewstep.sample the float64 σ: measured ≤ 7e-7.
    torch.testing.assert_close(seen[0], ref[0], atol=2e-6, rtol=0)
    assert float((ref - noise).abs().max()) > 0.5  # a real run, not the input


def digits_from_file(path):
    from fewstep.generate import _digit_from_image

    return _digit_from_image(path)


@pytest.mark.parametrize("solver,options", REFUSE)
def test_solvers_that_cannot_enter_refuse_in_every_path_before_the_first_call(embedded, digit_file, solver, options):
    calls = []
    config = Config(num_inference_steps=STEPS, scheduler=solver, scheduler_kwargs=options, image_path=digit_file,
                    image_strength=0.5)
    message = f"{solver} cannot start at timestep index 4 of {STEPS}"
    with pytest.raises(InvalidInput, match=message):
        embedded.generate_image(1, "3", config)
    with pytest.raises(InvalidInput, match=message):
        fewstep.sample(lambda x, s: calls.append(s) or x, torch.zeros(1, 4), solver, STEPS, begin_index=4, **options)
    s = FewstepScheduler(solver=solver, solver_options=options)
    s.set_timesteps(STEPS)
    with pytest.raises(InvalidInput, match=message):
        s.set_begin_index(4)
    assert not calls
    if solver != "neuralsolver":  # a full run is fine
        fewstep.sample(lambda x, s: calls.append(s) or x, torch.zeros(1, 4), solver, STEPS, **options)
        assert len(calls) == STEPS


@pytest.mark.filterwarnings("ignore::fewstep.entry.StageEntryWarning")  # entering at a stage: its own test
@pytest.mark.parametrize("solver", [n for n in SOLVERS if n != "neuralsolver"])
def test_sample_begin_index_integrates_the_rest_exactly(solver):
    """A constant velocity c from the σ of call k: exactly x − σ_k·c, with the remaining calls only."""
    x = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = torch.randn_like(x)
    full = fewstep.make_plan(solver, STEPS, shift=3.0)
    for k in range(STEPS):
        plan = fewstep.make_plan(solver, STEPS, shift=3.0, begin_index=k)
        assert plan.sigmas[0] == full.sigmas[k] and plan.calls == STEPS - k
        seen = []
        out = fewstep.sample(lambda x, s, seen=seen: seen.append(s) or c, x, solver, STEPS, shift=3.0, begin_index=k)
        np.testing.assert_allclose(seen, full.sigmas[k:], rtol=0, atol=1e-15)  # (Heun's stage: ± 1 ulp)
        torch.testing.assert_close(out, x - full.sigmas[k] * c, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore::fewstep.entry.StageEntryWarning")  # entering at a stage: its own test
@pytest.mark.parametrize("solver", [n for n in SOLVERS if n != "neuralsolver"])
def test_epsilon_begin_index_is_exact_for_a_constant_epsilon(solver):
    """x0 = 0: the VP sample at flow time s is s·ε/k(s) for every s, so a run entered at call k must land on
    s_end·ε/k(s_end) exactly, through the ε rewrite of the entered plan."""
    vp = VPSchedule()
    obj = get(solver)
    grid = vp.to_flow(vp.times(intervals_for(obj, STEPS)))
    plan = grid_plan(obj, grid)
    eps = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in (0, 3, 6):
        s_k = float(plan.sigmas[k])
        out = fewstep.sample(lambda x, t: eps, s_k * eps / float(vp_scale(s_k)), solver, STEPS, prediction="epsilon",
                             begin_index=k)
        end = plan.sigma_end
        # float64 rounding amplified by 1/(1 − s_0) ≈ 150 (v = (ε − x̃)/(1 − s)): measured ≤ 1.1e-12
        torch.testing.assert_close(out, end * eps / float(vp_scale(end)), atol=1e-11, rtol=0)


def test_epsilon_plan_rows_are_the_flow_rows_in_vp_variables():
    """One Euler row by hand: x̃' = x̃ − h·v with x̃ = k·x, v = (ε − k·x)/(1 − s), x' = x̃'/k'."""
    flow = grid_plan(get("euler"), np.array([0.9, 0.6]))
    row = epsilon_plan(flow).rows[0]
    k, k_next, h, s = vp_scale(0.9), vp_scale(0.6), 0.3, 0.9
    assert row.x[0] == pytest.approx(k / k_next + h * k / ((1 - s) * k_next), rel=1e-15)
    assert row.v[0] == pytest.approx(-h / ((1 - s) * k_next), rel=1e-15)


@pytest.mark.parametrize("n,strength,start", [(6, 0.6, 2), (8, 0.3, 5), (10, 0.3, 7), (4, 1.0, 0), (4, 0.1, 3),
                                              (28, 0.95, 1)])
def test_begin_index_for_strength_is_diffusers_get_timesteps(n, strength, start):
    assert begin_index_for_strength(n, strength) == start == diffusers_t_start(n, strength)


@pytest.mark.parametrize("strength", [0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_bad_strength_is_invalid_input(strength):
    with pytest.raises(InvalidInput, match="strength must be a number in"):
        begin_index_for_strength(8, strength)


@pytest.mark.parametrize("k", [-1, 8, 2.0, True])
def test_begin_index_outside_the_run_is_invalid_input(k):
    plan = fewstep.make_plan("euler", 8)
    with pytest.raises(InvalidInput, match="outside the 8 model calls"):
        enter(get("euler"), np.r_[plan.sigmas, 0.0], plan, k)


def test_a_restarted_plan_keeps_its_guards_on_the_shifted_indices():
    """`_restarted` (a solver that re-plans with one call fewer, e.g. Heun between stages) moves every row one call
    later; a guarded plan's guards must move with them, or a guard would read the wrong call."""
    from fewstep.entry import _restarted
    from fewstep.solvers.plan import Guard, Plan, Row

    guard = Guard(Row({1: 1.0, 0: -1.0}), Row({}, {1: 1.0, 0: -1.0}),
                  ((1.0, Row.step(1, 0.5, {1: 1.5, 0: -0.5})), (2.0, Row.step(1, 0.5, {1: 1.0}))), carry=1)
    plan = Plan(np.array([1.0, 0.5]), 0.0, (Row.step(0, 0.5, {0: 1.0}), Row.step(1, 0.5, {1: 1.0})), (None, guard))
    moved = _restarted(plan)
    assert moved.guards[:2] == (None, None) and moved.guards[2] == Guard(
        Row({2: 1.0, 1: -1.0}), Row({}, {2: 1.0, 1: -1.0}),
        ((1.0, Row.step(2, 0.5, {2: 1.5, 1: -0.5})), (2.0, Row.step(2, 0.5, {2: 1.0}))), carry=1)
    assert _restarted(fewstep.make_plan("euler", 4)).guards == ()  # unguarded plans stay unguarded
