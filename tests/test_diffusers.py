"""The diffusers scheduler contract (docs/diffusers.md) for every registered solver, flow and ε-prediction."""

import copy
import inspect
import json
import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

import fewstep  # noqa: E402
from fewstep.diffusers import AdamsScheduler, FewstepScheduler, NeuralSolverScheduler, StorkScheduler  # noqa: E402
from fewstep.entry import StageEntryWarning  # noqa: E402
from fewstep.errors import InvalidInput  # noqa: E402

torch.set_num_threads(1)
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
SOLVERS = fewstep.solvers.names()
GRID_SOLVERS = [n for n in SOLVERS if n != "neuralsolver"]  # those that run on any grid (NeuralSolver: its own)
STEPS = 6  # every solver can make 6 calls (Heun: 3 intervals; the shipped NeuralSolver tables: 5-10 steps)
CONFIGS = Path(__file__).parent / "data" / "scheduler_configs"


def real_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def epsilon_options(solver: str) -> dict:
    return {"solver_file": "dit"} if solver == "neuralsolver" else {}  # the ε-prediction NeuralSolver table


def run(s, velocity, x, timesteps=None):
    for t in s.timesteps if timesteps is None else timesteps:
        x = s.step(velocity(x, t), t, x, return_dict=False)[0]
    return x


def constant(c):
    return lambda x, t: c


# --- grid, indices, loop (docs/diffusers.md: set_timesteps, step) -----------------------------------------------------

def test_set_timesteps_signature_has_the_named_parameters():
    params = inspect.signature(FewstepScheduler.set_timesteps).parameters
    assert {"num_inference_steps", "device", "sigmas", "mu", "timesteps"} <= set(params)


def test_flux_style_call_ignores_mu_without_dynamic_shifting():
    a, b = FewstepScheduler(solver="adams2"), FewstepScheduler(solver="adams2")
    a.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4), device="cpu", mu=0.6)
    b.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4), device="cpu")
    assert torch.equal(a.timesteps, b.timesteps) and len(a.timesteps) == 4


@pytest.mark.parametrize("solver", SOLVERS)
def test_grid_invariants_with_flux_dev_config(solver):
    s = FewstepScheduler(solver=solver, **FLUX_DEV)
    s.set_timesteps(sigmas=np.linspace(1, 1 / STEPS, STEPS), device="cpu", mu=1.15)
    t, sig = s.timesteps, s.sigmas
    assert t.dtype == torch.float32 and len(t) == STEPS and len(sig) == STEPS + 1
    assert float(sig[-1]) == 0.0 and float(sig[0]) <= 1.0
    assert bool((t[1:] <= t[:-1]).all()) and float(t.max()) <= 1000
    # in (0, 1000], except Heun's last stage, which is evaluated at the end point σ = 0
    assert float(t[:-1].min()) > 0 and (float(t[-1]) > 0 or solver == "heun")
    torch.testing.assert_close(t / 1000, sig[:-1], atol=2e-3, rtol=0)


def test_set_timesteps_resets_indices_and_history():
    s = FewstepScheduler(solver="adams4")
    s.set_timesteps(STEPS)
    s.set_begin_index(0)
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    first = run(s, lambda x, t: torch.sin(x) * t / 1000, x)
    assert s.step_index == STEPS and s.begin_index == 0
    s.set_timesteps(STEPS)
    assert s.step_index is None and s.begin_index is None
    assert torch.equal(run(s, lambda x, t: torch.sin(x) * t / 1000, x), first)  # history reset: same output again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", SOLVERS)
def test_half_precision_loop_counts_calls_and_keeps_dtype(solver, dtype):
    s = FewstepScheduler(solver=solver, **FLUX_DEV)
    s.set_timesteps(sigmas=np.linspace(1, 1 / STEPS, STEPS), mu=0.8)
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    calls = 0

    def velocity(x, t):
        nonlocal calls
        calls += 1
        return (torch.tanh(x.float()) - 0.5).to(dtype)

    out = run(s, velocity, x)
    assert calls == len(s.timesteps) == STEPS
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="set_timesteps again"):
        s.step(x, s.timesteps[-1], x)
    # float32 math inside: the same run on the float32 upcast agrees to half precision
    s.set_timesteps(sigmas=np.linspace(1, 1 / STEPS, STEPS), mu=0.8)
    ref = run(s, lambda x, t: (torch.tanh(x.float()) - 0.5).to(dtype).float(), x.float())
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("prediction", ["flow_prediction", "epsilon"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", GRID_SOLVERS)
def test_half_precision_step_is_float32_math_rounded_once(solver, dtype, prediction):
    """Every step equals the float32 step on the exact upcasts of its inputs, rounded to the half dtype once."""
    half, full = (FewstepScheduler(solver=solver, prediction_type=prediction) for _ in range(2))
    for s in (half, full):
        s.set_timesteps(STEPS)
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    for t in half.timesteps:
        v = (torch.tanh(x.float()) - 0.5).to(dtype)
        out = half.step(v, t, x).prev_sample
        assert torch.equal(out, full.step(v.float(), t, x.float()).prev_sample.to(dtype))
        x = out


@pytest.mark.parametrize("shape", [(1, 16, 4), (2, 4, 8, 8), (1, 4, 2, 8, 8)])
@pytest.mark.parametrize("solver", SOLVERS)
def test_constant_velocity_is_integrated_exactly_in_any_rank(solver, shape):
    s = FewstepScheduler(solver=solver, **FLUX_DEV)
    s.set_timesteps(sigmas=np.linspace(1, 1 / STEPS, STEPS), device="cpu", mu=1.15)
    s.set_begin_index(0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    c = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(run(s, constant(c), x), x - float(s.sigmas[0]) * c, atol=2e-4, rtol=0)


M, C = 0.3, 0.5  # data ~ N(M, C²): the flow map is exact (docs/testbed.md §Exact velocity)


def gaussian_velocity(x, t):
    s = float(t) / 1000
    xt, var = x - (1 - s) * M, (1 - s) ** 2 * C ** 2 + s ** 2
    return s * xt / var - (M + (1 - s) * C ** 2 * xt / var)


@pytest.mark.parametrize("solver", SOLVERS)
def test_error_decreases_with_steps_on_an_exact_flow(solver):
    z = torch.randn(1, 256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (5, 10) if solver == "neuralsolver" else (4, 8, 16, 32):
        s = FewstepScheduler(solver=solver)
        s.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps))
        errors.append(float((run(s, gaussian_velocity, z) - (M + C * z)).abs().max()))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] / 2.5, errors


@pytest.mark.parametrize("solver", SOLVERS)
def test_adapter_equals_fewstep_sample(solver):
    """set_timesteps: the SD3 path (no sigmas) and the Flux path (sigmas + mu) run the plan `fewstep.sample` runs."""
    x = torch.randn(1, 32, 8, generator=torch.Generator().manual_seed(0))

    def model(x, sigma):
        return torch.sin(3 * x) * sigma + 0.2

    for cfg, call, sample_args in (
            (dict(shift=3.0), dict(num_inference_steps=STEPS), dict(shift=3.0)),
            (FLUX_DEV, dict(sigmas=np.linspace(1, 1 / STEPS, STEPS), mu=0.9),
             dict(sigmas=np.linspace(1, 1 / STEPS, STEPS), mu=0.9))):
        s = FewstepScheduler(solver=solver, **cfg)
        s.set_timesteps(**call)
        ours = run(s, lambda x, t: model(x, float(t) / 1000), x)
        if solver == "heun" and "sigmas" in sample_args:  # Heun: STEPS calls on STEPS/2 nodes of the same schedule
            sample_args = {**sample_args, "sigmas": np.linspace(1, 1 / STEPS, STEPS // 2)}
        plan = fewstep.make_plan(solver, STEPS, **sample_args)
        torch.testing.assert_close(s.sigmas[:-1], torch.from_numpy(plan.sigmas).float(), atol=1e-7, rtol=0)
        # the model sees σ through float32 timesteps in both runs
        ref = fewstep.sample(lambda x, sigma: model(x, float(np.float32(sigma * 1000)) / 1000), x, solver, STEPS,
                             **sample_args)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_euler_matches_flowmatch_euler():
    ours = FewstepScheduler(solver="euler", **FLUX_DEV)
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    for s in (ours, ref):
        s.set_timesteps(sigmas=np.linspace(1, 1 / 8, 8), device="cpu", mu=0.8)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=1e-3, rtol=0)
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    a, b = x.clone(), x.clone()
    for t in ours.timesteps:
        a = ours.step(torch.sin(a), t, a, return_dict=False)[0]
        b = ref.step(torch.sin(b), t, b, return_dict=False)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --- mid-schedule entry (docs/diffusers.md: Mid-schedule entry) -------------------------------------------------------

def test_set_begin_index_after_stepping_asks_for_a_new_run():
    # The run's history is from where it started; re-entering mid-run gave a bare KeyError at the next step.
    s = FewstepScheduler(solver="adams-denoise", shift=3.0)
    s.set_timesteps(6)
    x = torch.randn(1, 4, dtype=torch.float64)
    for t in s.timesteps[:3]:
        x = s.step(torch.sin(x), t, x).prev_sample
    with pytest.raises(InvalidInput, match=r"set_begin_index\(0\) after step\(\) has run .* call set_timesteps"):
        s.set_begin_index(0)
    s.set_timesteps(6)
    s.set_begin_index(3)  # a new run enters anywhere
    assert s.step(torch.sin(x), s.timesteps[3], x).prev_sample.shape == (1, 4)


@pytest.mark.filterwarnings("ignore::fewstep.entry.StageEntryWarning")  # entering at a stage: its own test
@pytest.mark.parametrize("solver", GRID_SOLVERS)
def test_set_begin_index_runs_the_rest_exactly(solver):
    s = FewstepScheduler(solver=solver, shift=3.0)
    s.set_timesteps(8)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    c = torch.randn_like(x)
    for k in range(1, 8):  # every entry point, Heun's mid-step ones included
        s.set_timesteps(8)
        s.set_begin_index(k)
        out = run(s, constant(c), x, s.timesteps[k:])
        assert s.step_index == 8
        torch.testing.assert_close(out, x - float(s.sigmas[k]) * c, atol=2e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::fewstep.entry.StageEntryWarning")  # entering at a stage: its own test
@pytest.mark.parametrize("solver", GRID_SOLVERS)
def test_entry_without_begin_index_recovers_the_index_from_the_timestep(solver):
    s = FewstepScheduler(solver=solver, shift=3.0)
    s.set_timesteps(8)
    x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    c = torch.ones_like(x)
    # A repeated value (Heun's stage σ = next node) means the second occurrence, as FlowMatchEuler decides.
    entries = [k for k in range(1, 8) if s.index_for_timestep(s.timesteps[k]) == k]
    assert len(entries) == (4 if solver == "heun" else 7)
    for k in entries:
        s.set_timesteps(8)
        out = run(s, constant(c), x, s.timesteps[k:])
        assert s.step_index == 8
        torch.testing.assert_close(out, x - float(s.sigmas[k]) * c, atol=2e-4, rtol=0)


def test_heun_entry_between_its_stages_spends_one_call_resynchronising():
    s = FewstepScheduler(solver="heun")
    s.set_timesteps(8)
    x = torch.randn(1, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(StageEntryWarning, match=rf"heun: call 3 of 8 is the second stage of a step from "
                      rf"σ={float(s.sigmas[2]):.3g}, so the run enters at σ={float(s.sigmas[3]):.3g}"):
        s.set_begin_index(3)  # timesteps[3] is the second stage of step 1, at the σ of node 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FewstepScheduler(solver="heun").set_timesteps(8)
        for solver, k in (("heun", 2), ("heun", 4), ("euler", 3), ("adams-denoise", 5)):  # nodes: no warning
            node = FewstepScheduler(solver=solver)
            node.set_timesteps(8)
            node.set_begin_index(k)
    seen = []
    out = run(s, lambda x, t: seen.append(x.clone()) or gaussian_velocity(x, t), x, s.timesteps[3:])
    assert torch.equal(seen[0], seen[1])  # the first call did not move the sample
    ref = FewstepScheduler(solver="heun")
    ref.set_timesteps(timesteps=s.timesteps[4::2].double().numpy())  # Heun from node 2 on the same nodes
    # (to float32 rounding of the nodes: not resynchronising would be off by ~1e-2)
    torch.testing.assert_close(out, run(ref, gaussian_velocity, x), atol=1e-8, rtol=0)


@pytest.mark.parametrize("options", [{"solver": "neuralsolver"}, {"solver": "adams2", "solver_options": {
    "startup": "rk"}}, {"solver": "stork-2", "solver_options": {"compat": "official"}}])
def test_solvers_that_cannot_restart_mid_schedule_say_so_at_set_begin_index(options):
    s = FewstepScheduler(**options)
    s.set_timesteps(8)
    s.set_begin_index(0)  # a full run is fine
    with pytest.raises(ValueError, match="cannot start at timestep index 3 of 8"):
        s.set_begin_index(3)
    s.set_timesteps(8)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="cannot start at timestep index 3 of 8"):  # same through the lookup
        s.step(x, s.timesteps[3], x)


def wan_t_start(n, strength):
    """WanVideoToVideo / AnimateDiff get_timesteps (integer init_timestep; no set_begin_index follows)."""
    return n - min(int(n * strength), n)


def img2img_loop(s, clean, noise, mask, velocity, t_start, begin_index):
    """A fake img2img/inpaint pipeline: slice `timesteps[t_start * order:]`, maybe set_begin_index, noise the input with
    scale_noise, then after every step re-noise the known region (mask 0) to the next timestep, as FluxInpaint does."""
    timesteps = s.timesteps[t_start * s.order:]
    if begin_index:
        s.set_begin_index(t_start * s.order)
    x = s.scale_noise(clean, timesteps[:1], noise)
    calls = 0
    for i, t in enumerate(timesteps):
        calls += 1
        x = s.step(velocity(x, t), t, x, return_dict=False)[0]
        if i + 1 < len(timesteps):
            x = mask * x + (1 - mask) * s.scale_noise(clean, timesteps[i + 1:i + 2], noise)
    return x, calls


@pytest.mark.filterwarnings("ignore::fewstep.entry.StageEntryWarning")  # entering at a stage: its own test
@pytest.mark.parametrize("solver", GRID_SOLVERS)
def test_img2img_without_begin_index_equals_with_it(solver):
    """WanVideoToVideo and older pipelines slice timesteps and never call set_begin_index. With Heun's repeated values
    (stage at σ_k, then node k) an odd t_start enters at the first occurrence: the lookup takes the second (as
    FlowMatchHeun) and the pipeline's extra call there re-synchronises, so every strength gives exactly the run
    set_begin_index gives (before: "step called 11 times" at strength 0.3)."""
    n = 10
    clean = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(16) < 8).float().reshape(1, 16, 1)
    for strength in (0.3, 0.4, 0.5, 0.75, 0.95, 1.0):
        for t_start in {wan_t_start(n, strength), int(max(n - n * strength, 0))}:
            outs = []
            for begin_index in (False, True):
                s = FewstepScheduler(solver=solver, shift=3.0)
                s.set_timesteps(n)
                x, calls = img2img_loop(s, clean, noise, mask, lambda x, t: torch.sin(3 * x) * t / 1000 + 0.1,
                                        t_start, begin_index)
                assert calls == n - t_start and s.step_index == n
                outs.append(x)
            assert torch.equal(*outs), (strength, t_start)


def test_heun_img2img_without_begin_index_is_heun_from_the_entry_node():
    """Strength 0.3 of 10 calls (t_start 7: Heun's stage at σ_4) on an exact Gaussian flow: the same as Heun run on
    the nodes from σ_4, made with one extra (re-synchronising) call."""
    s = FewstepScheduler(solver="heun")
    s.set_timesteps(10)
    z = torch.randn(1, 64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = s.sigmas[7].double() * z  # any start state at σ_4
    out = run(s, gaussian_velocity, x, s.timesteps[7:])
    assert s.step_index == 10
    ref = FewstepScheduler(solver="heun")
    ref.set_timesteps(timesteps=s.timesteps[8::2].double().numpy())
    torch.testing.assert_close(out, run(ref, gaussian_velocity, x), atol=1e-12, rtol=0)


def test_scale_noise_uses_begin_index_then_step_index_then_lookup():
    s = FewstepScheduler(solver="adams2", **FLUX_DEV)
    with pytest.raises(InvalidInput, match="call set_timesteps before scale_noise"):
        s.scale_noise(torch.zeros(1, 4), torch.tensor([500.0]), torch.ones(1, 4))
    s.set_timesteps(sigmas=np.linspace(1, 1 / 8, 8), mu=1.0)
    x0, n = torch.randn(2, 16, 4), torch.randn(2, 16, 4)
    for k in (0, 3, 7):  # lookup (no begin index)
        sigma = float(s.sigmas[k])
        torch.testing.assert_close(s.scale_noise(x0, s.timesteps[k:k + 1], n), sigma * n + (1 - sigma) * x0)
    s.set_begin_index(3)
    sigma = float(s.sigmas[3])
    torch.testing.assert_close(s.scale_noise(x0, s.timesteps[3:4], n), sigma * n + (1 - sigma) * x0)
    s.step(n, s.timesteps[3], x0)
    sigma = float(s.sigmas[4])  # inpaint re-noises with timesteps[i + 1] after step i
    torch.testing.assert_close(s.scale_noise(x0, s.timesteps[4:5], n), sigma * n + (1 - sigma) * x0)
    assert s.scale_noise(x0.bfloat16(), s.timesteps[4:5], n.bfloat16()).dtype == torch.bfloat16


def test_flow_add_noise_is_the_flow_forward_process_per_sample():
    s = FewstepScheduler(solver="euler")
    s.set_timesteps(4)
    x0, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([900.0, 500.0, 20.0])
    sigma = (t / 1000).reshape(3, 1, 1, 1)
    torch.testing.assert_close(s.add_noise(x0, n, t), sigma * n + (1 - sigma) * x0)


# --- config, serialisation, public API, copies (docs/diffusers.md: Config, Save and load) -----------------------------

def test_from_config_keeps_flux_dev_keys():
    s = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX_DEV).config, solver="stork-4")
    for key, value in FLUX_DEV.items():
        assert s.config[key] == value
    assert s.shift == 3.0 and s.config.solver == "stork-4"


@pytest.mark.parametrize("name,steps,mu", [("flux_dev", 8, 1.15), ("flux_schnell", 4, 0.6), ("sd3", 8, None),
                                           ("qwen_image", 8, 0.7), ("pixart_sigma", 8, None)])
def test_from_real_checkpoint_configs(name, steps, mu):
    cfg = real_config(name)
    s = FewstepScheduler.from_config(cfg, solver="adams2")
    assert s.config.prediction_type == ("epsilon" if name == "pixart_sigma" else "flow_prediction")
    for key in {k for k in cfg if not k.startswith("_")} & set(s.config):
        assert s.config[key] == cfg[key], key
    if name == "pixart_sigma":
        s.set_timesteps(steps)
        # DPM-Solver's "linspace" (N + 1 values without t = 0), not DDIM's: the same calls as the pipeline's own.
        assert s.timesteps.tolist() == np.linspace(0, 999, steps + 1).round()[::-1][:-1].tolist()
        return
    s.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps), mu=mu) if mu is not None else s.set_timesteps(steps)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps), mu=mu) if mu is not None else ref.set_timesteps(steps)
    torch.testing.assert_close(s.sigmas, ref.sigmas, atol=1e-6, rtol=0)  # shift, dynamic shift, shift_terminal
    if name == "qwen_image":
        assert abs(float(s.sigmas[-2]) - 0.02) < 1e-6


@pytest.mark.parametrize("solver", SOLVERS)
def test_save_pretrained_round_trip_reproduces_the_loop(solver, tmp_path):
    s = FewstepScheduler(solver=solver, **FLUX_DEV)
    s.save_pretrained(tmp_path)
    again = FewstepScheduler.from_pretrained(tmp_path)
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    outs = []
    for sched in (s, again):
        sched.set_timesteps(sigmas=np.linspace(1, 1 / STEPS, STEPS), mu=1.0)
        outs.append(run(sched, lambda x, t: torch.cos(x) * t / 1000, x))
    assert torch.equal(*outs)


FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
             "max_image_seq_len", "shift_terminal", "time_shift_type")


def via(name):
    """Build diffusers' scheduler `name` from a config, in flow mode (UniPC / DPM-Solver need use_flow_sigmas; the
    prediction type and the shift come from the config itself)."""
    import diffusers

    cls = getattr(diffusers, name)
    flow = {} if name.startswith("FlowMatch") else {"use_flow_sigmas": True}
    return lambda config: cls.from_config(config, **flow)


CHAINS = [["FlowMatchEulerDiscreteScheduler"], ["FlowMatchHeunDiscreteScheduler"], ["UniPCMultistepScheduler"],
          ["DPMSolverMultistepScheduler"],
          ["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"],
          ["FlowMatchHeunDiscreteScheduler", "UniPCMultistepScheduler", "StorkScheduler",
           "FlowMatchEulerDiscreteScheduler"]]


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "-".join(n.replace("Scheduler", "") for n in c))
@pytest.mark.parametrize("name,mu", [("sd3", None), ("flux_dev", 1.15), ("qwen_image", 0.7), ("flux_schnell", None)])
def test_from_config_round_trips_through_diffusers_flow_schedulers(name, mu, chain):
    """StorkScheduler from a checkpoint config, then from_config through diffusers' flow schedulers and back: still
    flow matching with the same shift, dynamic shifting, base/max shift, terminal shift and STORK options, so the
    same grid. (Before: back from UniPC / DPM-Solver it was an ε scheduler.)"""
    cfg = real_config(name)
    first = StorkScheduler.from_config(cfg, order=2, stages=9)
    config = first.config
    for hop in chain:
        config = (StorkScheduler.from_config if hop == "StorkScheduler" else via(hop))(config).config
        if hop.startswith(("UniPC", "DPM")):  # a working flow scheduler there, with our shift
            assert config.prediction_type == "flow_prediction" and config.flow_shift == first.config.shift
    back = StorkScheduler.from_config(config)
    for key in FLOW_KEYS + ("prediction_type", "order", "stages"):
        assert back.config[key] == first.config[key], key
    assert back.config.prediction_type == "flow_prediction"
    for s in (first, back):
        s.set_timesteps(sigmas=np.linspace(1, 1 / 8, 8), mu=mu) if mu is not None else s.set_timesteps(8)
    assert torch.equal(back.sigmas, first.sigmas) and torch.equal(back.timesteps, first.timesteps)


def test_from_config_takes_a_flow_unipc_shift_and_an_epsilon_unipc_as_epsilon():
    from diffusers import UniPCMultistepScheduler

    flow = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    s = FewstepScheduler.from_config(flow.config, solver="euler")
    assert s.config.prediction_type == "flow_prediction" and s.shift == 5.0
    s.set_timesteps(4)
    flow.set_timesteps(4)  # UniPC's own flow grid, not FlowMatchEuler's (test_a_flow_unipc_config_keeps_unipcs_grid)
    torch.testing.assert_close(s.sigmas[1:], flow.sigmas[1:].float(), atol=1e-7, rtol=0)
    eps = FewstepScheduler.from_config(UniPCMultistepScheduler(beta_schedule="scaled_linear").config)
    assert eps.config.prediction_type == "epsilon" and eps.config.beta_schedule == "scaled_linear"
    assert eps.config.timestep_spacing == "linspace"  # UniPC's default spacing is what that scheduler used


def test_from_config_accepts_a_frozen_dict_a_saved_folder_and_a_json_file(tmp_path):
    source = FlowMatchEulerDiscreteScheduler(**FLUX_DEV, shift_terminal=0.05)
    source.save_pretrained(tmp_path / "scheduler")
    made = [StorkScheduler.from_config(source.config, order=2),  # a FrozenDict
            StorkScheduler.from_config(dict(source.config), order=2),
            StorkScheduler.from_config(tmp_path / "scheduler", order=2),
            StorkScheduler.from_config(str(tmp_path), subfolder="scheduler", order=2),
            StorkScheduler.from_config(str(tmp_path / "scheduler" / "scheduler_config.json"), order=2)]
    for s in made:
        assert s.config.shift_terminal == 0.05 and s.config.order == 2 and s.config.use_dynamic_shifting
    again = FlowMatchEulerDiscreteScheduler.from_config(made[2].config)
    assert again.config.shift_terminal == 0.05 and again.config.shift == 3.0


def test_public_api_init_noise_sigma_scale_model_input_len_and_shift():
    s = FewstepScheduler()
    x = torch.randn(2, 4, 8, 8)
    assert s.init_noise_sigma == 1.0 and s.scale_model_input(x, 500.0) is x and len(s) == 1000
    s.set_shift(2.0)
    s.set_timesteps(4)
    assert s.shift == 2.0 and s.config.shift == 1.0  # a real attribute, distinct from the config key
    for shift in (1.0, 3.0):  # FlowMatchEuler's σ_min stays its config shift's; set_shift changes the second shift
        ours, ref = FewstepScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
        for made in (ours, ref):
            made.set_shift(5.0)
            made.set_timesteps(5)
        torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=1e-6, rtol=0)
        fresh = FewstepScheduler(shift=5.0)
        fresh.set_timesteps(5)
        assert float(ours.sigmas[-2]) < 0.7 * float(fresh.sigmas[-2])  # not a scheduler built with shift 5
    assert {"FlowMatchEulerDiscreteScheduler", "DDIMScheduler"} <= {c.__name__ for c in s.compatibles}


def test_deep_copy_is_independent():
    s = FewstepScheduler(solver="adams3")
    s.set_timesteps(STEPS)
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    for t in s.timesteps[:2]:
        x = s.step(torch.sin(x), t, x).prev_sample
    twin = copy.deepcopy(s)
    rest = s.timesteps[2:]
    a = run(s, lambda x, t: torch.sin(x), x, rest)
    assert s.step_index == STEPS and twin.step_index == 2
    assert torch.equal(run(twin, lambda x, t: torch.sin(x), x, rest), a)


@pytest.mark.parametrize("solver", ["adams-denoise", "adams3", "heun", "stork-4"])
@pytest.mark.parametrize("prediction", ["flow_prediction", "epsilon"])
def test_reused_output_buffers_and_latents_overwritten_in_place_do_not_change_the_history(solver, prediction):
    # A compiled / CUDA-graph model returns one output buffer every call; Kandinsky 5 writes the step result back into
    # the latents it passed in. Multistep history must not alias either.
    x0 = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))

    def velocity(x, t):
        return 0.5 * x * (float(t) / 1000) + 0.1 * torch.sin(x)

    def loop(static_output, in_place):
        s = FewstepScheduler(solver=solver, prediction_type=prediction)
        s.set_timesteps(STEPS)
        x, buffer = x0.clone(), torch.empty_like(x0)
        for t in s.timesteps:
            out = buffer.copy_(velocity(x, t)) if static_output else velocity(x, t)
            prev = s.step(out, t, x, return_dict=False)[0]
            if in_place:
                x.copy_(prev)
            else:
                x = prev
        return x

    fresh = loop(False, False)
    assert torch.equal(loop(True, False), fresh)
    assert torch.equal(loop(False, True), fresh)


def test_return_dict_false_matches_the_output_dataclass():
    a, b = FewstepScheduler(solver="stork-2"), FewstepScheduler(solver="stork-2")
    for s in (a, b):
        s.set_timesteps(STEPS)
    x = torch.randn(1, 8, 4)
    for t in a.timesteps:
        xa = a.step(torch.sin(x), t, x, return_dict=False)[0]
        xb = b.step(torch.sin(x), t, x).prev_sample
        assert torch.equal(xa, xb)
        x = xa


# --- ε-prediction (PixArt-Σ, SD): VP schedule from the betas -------------------------------------------------------

def ddim_alphas_cumprod() -> torch.Tensor:
    return DDIMScheduler().alphas_cumprod.double()


def gaussian_epsilon(x, t):
    """The exact ε-prediction for data ~ N(M, C²) at VP timestep t (an integer of the DDIM grid)."""
    abar = float(ddim_alphas_cumprod()[int(round(float(t)))])
    alpha, sigma = abar ** 0.5, (1 - abar) ** 0.5
    return sigma * (x - alpha * M) / (alpha ** 2 * C ** 2 + sigma ** 2)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_epsilon_euler_is_ddim_eta_0(steps, dtype, atol):
    ref = DDIMScheduler(clip_sample=False)
    ours = FewstepScheduler.from_config(ref.config, solver="euler")
    for s in (ref, ours):
        s.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps.float())
    x = torch.randn(2, 4, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    a, b = x.clone(), x.clone()
    for t, t_ref in zip(ours.timesteps, ref.timesteps, strict=True):
        a = ours.step(gaussian_epsilon(a, t), t, a).prev_sample
        b = ref.step(gaussian_epsilon(b, t_ref), t_ref, b, eta=0.0).prev_sample
    assert a.dtype == dtype
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_epsilon_euler_from_a_dpm_solver_config_is_first_order_dpm_solver_on_its_timesteps(spacing):
    """A DPM-Solver config (PixArt-Σ's) keeps DPM-Solver's timestep spacing (no call at t = 0; the last step goes to
    σ = 0), and Euler there is DPM-Solver++ of order 1 (DDIM) on those timesteps."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(solver_order=1, timestep_spacing=spacing, lower_order_final=True)
    ours = FewstepScheduler.from_config(ref.config, solver="euler")
    for s in (ref, ours):
        s.set_timesteps(6)
    assert ours.timesteps.tolist() == ref.timesteps.float().tolist() and min(ours.timesteps.tolist()) > 0
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = x.clone(), x.clone()
    for t, t_ref in zip(ours.timesteps, ref.timesteps, strict=True):
        a = ours.step(gaussian_epsilon(a, t), t, a).prev_sample
        b = ref.step(gaussian_epsilon(b, t_ref), t_ref, b).prev_sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_from_config_of_a_default_ddim_scheduler_is_epsilon():
    """DDIMScheduler() marks every key as a default (`_use_default_values`); its ε must survive from_config."""
    s = FewstepScheduler.from_config(DDIMScheduler().config, solver="adams2")
    assert s.config.prediction_type == "epsilon" and s.config.timestep_spacing == "leading"
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [750.0, 500.0, 250.0, 0.0]


def flow_time(abar):
    return (1 - abar) ** 0.5 / (abar ** 0.5 + (1 - abar) ** 0.5)


def noised(z, abar):
    """The sample at noise level ᾱ on the trajectory that ends at M + C·z."""
    return (abar * C ** 2 + 1 - abar) ** 0.5 * z + abar ** 0.5 * M


@pytest.mark.parametrize("solver", GRID_SOLVERS)
def test_epsilon_mode_is_the_flow_solver_in_flow_coordinates(solver):
    """Independent of `_epsilon_plan`: the flow-mode adapter on the s grid, with the ε-model converted per call
    (x̃ = x·√((1−s)² + s²), v = (ε − x̃)/(1 − s)), gives the same sample."""
    _epsilon_equals_flow(solver, {}, gaussian_epsilon, torch.randn(1, 64, 4, dtype=torch.float64,
                                                                   generator=torch.Generator().manual_seed(0)))


def guided_gaussian_epsilon(x, t, w=20.0):
    """Classifier-free guidance w between two Gaussians' exact ε (std 0.05 and C): x̂0 depends on x with gain ~w."""
    abar = float(ddim_alphas_cumprod()[int(round(float(t)))])
    alpha, sigma = abar ** 0.5, (1 - abar) ** 0.5
    cond, free = (sigma * (x - alpha * M) / (alpha ** 2 * std ** 2 + sigma ** 2) for std in (0.05, C))
    return free + (1 + w) * (cond - free)


def test_epsilon_mode_carries_the_stiffness_guard_in_flow_coordinates():
    """adams-denoise's stiffness fallback tests flow quantities (x̃, v): in ε mode its rows are rewritten like the
    plan's, and the samples it switches are the flow run's (two noises, strong guidance: it switches some steps)."""
    z = torch.randn(2, 64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [1.0, 3.0], dtype=torch.float64).view(2, 1, 1)
    for corrector in (True, False):  # both levels (the corrector's and Euler's), Euler's alone
        guarded = _epsilon_equals_flow("adams-denoise", {"corrector": corrector, "stiff_fallback": True},
                                       guided_gaussian_epsilon, z)
        plain = _epsilon_equals_flow("adams-denoise", {"corrector": corrector}, guided_gaussian_epsilon, z)
        assert not torch.allclose(guarded, plain)


def test_told_the_guidance_the_scheduler_chooses_as_generate_does(tmp_path):
    """classifier_free_guidance=w: adams-denoise with guided_options' choice for w (the fallback at 3, the corrector
    off from 4), the same solver as those options given by hand; kept through save/load and a trip through diffusers'
    own class; other solvers unchanged; the sample differs from the default's under strong guidance."""
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    for w, by_hand in ((1.0, {}), (3.0, {"stiff_fallback": True}), (7.0, {"corrector": False, "stiff_fallback": True})):
        told = FewstepScheduler.from_config(flow, classifier_free_guidance=w)
        assert told._solver == FewstepScheduler.from_config(flow, solver_options=by_hand)._solver
        told.save_pretrained(tmp_path / str(w))
        assert FewstepScheduler.from_pretrained(tmp_path / str(w))._solver == told._solver
        back = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler.from_config(told.config).config)
        assert back._solver == told._solver and back.config.classifier_free_guidance == w
    given = FewstepScheduler.from_config(flow, classifier_free_guidance=7.0, solver_options={"corrector": True})
    assert given._solver.corrector and given._solver.stiff_fallback  # a given option stays
    stork = FewstepScheduler.from_config(flow, solver="stork-2", classifier_free_guidance=7.0)
    assert stork._solver == FewstepScheduler.from_config(flow, solver="stork-2")._solver
    z = torch.randn(2, 64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ddim = DDIMScheduler().config
    samples = []
    for w in (None, 20.0):
        s = FewstepScheduler.from_config(ddim, classifier_free_guidance=w)
        s.set_timesteps(8)
        samples.append(run(s, guided_gaussian_epsilon, z))
    assert torch.isfinite(samples[1]).all() and not torch.allclose(*samples)
    for bad in (-1.0, float("nan"), True, "7"):
        with pytest.raises(InvalidInput, match="classifier_free_guidance"):
            FewstepScheduler.from_config(flow, classifier_free_guidance=bad)


def _epsilon_equals_flow(solver, options, epsilon, z):
    steps = 8
    eps_s = FewstepScheduler.from_config(DDIMScheduler().config, solver=solver, solver_options=options)
    eps_s.set_timesteps(steps)
    abar = ddim_alphas_cumprod().numpy()
    n = fewstep.solvers.intervals_for(fewstep.solvers.get(solver), steps)
    grid = np.r_[flow_time(abar[(np.arange(n) * (1000 // n))[::-1]]), 0.0]  # DDIM's "leading" nodes as flow times
    flow_s = FewstepScheduler(solver=solver, solver_options=options)
    flow_s.set_timesteps(timesteps=1000 * grid[:-1])
    call_s = fewstep.solvers.grid_plan(fewstep.solvers.get(solver), grid).sigmas  # float64, unlike flow_s.timesteps
    x = noised(z, abar[int(eps_s.timesteps[0])])
    xt = x * (1 - flow_time(abar[int(eps_s.timesteps[0])])) / abar[int(eps_s.timesteps[0])] ** 0.5
    out = run(eps_s, epsilon, x)
    for t_eps, t_flow, s in zip(eps_s.timesteps, flow_s.timesteps, call_s, strict=True):
        x_vp = xt / ((1 - s) ** 2 + s ** 2) ** 0.5
        xt = flow_s.step((epsilon(x_vp, t_eps) - xt) / (1 - s), t_flow, xt).prev_sample
    torch.testing.assert_close(out, xt, atol=1e-9, rtol=0)
    return out


@pytest.mark.parametrize("solver", SOLVERS)
def test_epsilon_mode_converges_for_every_solver(solver):
    z = torch.randn(1, 256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    abar = ddim_alphas_cumprod().numpy()
    errors = []
    for steps in (5, 10) if solver == "neuralsolver" else (8, 16, 32):
        s = FewstepScheduler.from_config(real_config("pixart_sigma"), solver=solver,
                                         solver_options=epsilon_options(solver))
        s.set_timesteps(steps)
        assert len(s.timesteps) == steps and float(s.timesteps.max()) <= 999
        # ᾱ where the model is called, interpolated as the scheduler does (NeuralSolver's grid is not on integers)
        table = dict(zip(s.timesteps.tolist(), np.interp(s.timesteps.double().numpy(), np.arange(1000), abar),
                         strict=True))

        def eps(x, t, table=table):
            a = table[float(t)]
            return (1 - a) ** 0.5 * (x - a ** 0.5 * M) / (a * C ** 2 + 1 - a)

        end = float(s.sigmas[-1])  # 0, or where the dit table stops (VP t = 1e-3)
        out = run(s, eps, noised(z, table[float(s.timesteps[0])]))
        errors.append(float((out - noised(z, 1 / (1 + (end / (1 - end)) ** 2))).abs().max()))
    # (not monotone at every N for the multistep methods at few steps: adams3 is lucky at 8)
    assert errors[-1] == min(errors) and errors[-1] < errors[0] / 2, errors


def test_epsilon_add_noise_matches_ddim_and_scale_noise_agrees():
    ref = DDIMScheduler()
    s = FewstepScheduler.from_config(ref.config)
    x0, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([999, 500, 3])
    torch.testing.assert_close(s.add_noise(x0, n, t), ref.add_noise(x0, n, t), atol=1e-6, rtol=1e-6)
    s.set_timesteps(10)
    k = 4
    torch.testing.assert_close(s.scale_noise(x0, s.timesteps[k:k + 1], n), s.add_noise(x0, n, s.timesteps[k:k + 1]))


def test_epsilon_pixart_real_config_runs_every_solver_with_exact_constant_noise():
    """ε constant and x = α·x0 + σ·ε with x0 = 0: every solver must return x0 = 0 (the flow velocity is ε − x0)."""
    for solver in SOLVERS:
        s = FewstepScheduler.from_config(real_config("pixart_sigma"), solver=solver,
                                         solver_options=epsilon_options(solver))
        s.set_timesteps(STEPS)
        eps = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        start = s.add_noise(torch.zeros_like(eps), eps, s.timesteps[:1])
        out = run(s, constant(eps), start)
        end = float(s.sigmas[-1])
        expected = torch.zeros_like(eps) if end == 0 else s._noised(torch.zeros_like(eps), eps, torch.tensor([end]))
        torch.testing.assert_close(out, expected, atol=1e-8, rtol=0)  # (s.sigmas is float32)


# --- bad input: clear errors at construction / set_timesteps ------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: FewstepScheduler(solver="nope"), "unknown solver 'nope'; available: euler"),
    (lambda: FewstepScheduler(solver="Stork-4"), "unknown solver 'Stork-4'; did you mean 'stork-4'"),
    (lambda: FewstepScheduler(solver="adams2", solver_options={"stages": 3}), "no option 'stages'"),
    (lambda: FewstepScheduler(prediction_type="v_prediction"), "prediction_type must be one of"),
    (lambda: FewstepScheduler(solver="neuralsolver", prediction_type="epsilon"), "made for prediction='flow'"),
    (lambda: FewstepScheduler(solver="neuralsolver", solver_options={"solver_file": "dit"}), "made for prediction"),
    (lambda: FewstepScheduler(prediction_type="epsilon", beta_schedule="cubic"), "beta_schedule must be"),
    (lambda: FewstepScheduler(invert_sigmas=True), "invert_sigmas"),
    (lambda: FewstepScheduler.from_config(DDIMScheduler(rescale_betas_zero_snr=True).config), "zero terminal SNR"),
    (lambda: FewstepScheduler.from_config(DDIMScheduler().config, clip_sample=True), "clip_sample=True"),
    (lambda: FewstepScheduler.from_config(DDIMScheduler(thresholding=True).config), "thresholding=True"),
    (lambda: FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config),
     "stochastic_sampling=True"),
    (lambda: FewstepScheduler(use_karras_sigmas=True, use_beta_sigmas=True), "only one of use_karras_sigmas"),
    (lambda: FewstepScheduler(solver=None), "solver must be a fewstep solver name"),
    (lambda: FewstepScheduler(solver_options="x"), "solver_options must be a dict"),
    (lambda: FewstepScheduler(shift=0.0), "shift must be a finite number > 0"),
    (lambda: FewstepScheduler(num_train_timesteps=0), "num_train_timesteps must be an integer of at least 2"),
    # each of these failed later, as a bare TypeError or "sigmas must be strictly decreasing"
    *[(lambda bad=bad: FewstepScheduler(shift_terminal=bad), r"shift_terminal must be the last σ before 0, a number "
       r"in \(0, 1\)") for bad in ("0.02", 1, 1.5, -0.1, True, float("nan"))],
    (lambda: FewstepScheduler().set_shift("3"), "set_shift: shift must be a number"),
    (lambda: FewstepScheduler().set_shift(-1.0), "set_shift: shift must be a number"),
])
def test_bad_construction_is_a_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("solver,kwargs,call,message", [
    ("euler", FLUX_DEV, dict(num_inference_steps=4), "needs `mu`"),
    ("heun", {}, dict(num_inference_steps=5), "cannot make exactly 5 model calls"),
    ("heun", {}, dict(sigmas=np.linspace(1, 0.2, 5)), "cannot make exactly 5 model calls"),
    ("neuralsolver", {}, dict(num_inference_steps=4), "has no 4-step solver"),
    ("euler", {}, dict(num_inference_steps=0), "positive integer"),
    ("euler", {}, dict(num_inference_steps=float("nan")), "num_inference_steps must be a positive integer, got nan"),
    ("euler", {}, dict(num_inference_steps="4"), "num_inference_steps must be a positive integer, got '4'"),
    ("euler", dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=4, mu=0.0),
     r"mu \(a linear time shift\) must be a number .* got 0"),  # μ/(μ + 1/σ − 1) at μ = 0: a NaN grid
    ("euler", dict(use_dynamic_shifting=True), dict(num_inference_steps=4, mu=40.0),
     r"mu=40 rounds the σ grid to repeated values \(\[1.0, 1.0, 1.0, 1.0, 0.0\]\)"),
    ("euler", {}, dict(sigmas=[1.0, 0.5], timesteps=[5000.0, -3.0]), r"timesteps must lie in \(0, 1000\]"),
    ("euler", {}, dict(sigmas=[1.0, 0.5], timesteps=[float("nan"), 3.0]), r"timesteps must lie in \(0, 1000\]"),
    ("euler", {}, dict(), "needs num_inference_steps"),
    ("euler", {}, dict(num_inference_steps=3, sigmas=[1.0, 0.5]), "2 sigmas given"),
    ("euler", {}, dict(sigmas=[1.0, 0.6, 0.7]), "strictly decreasing"),
    ("euler", dict(prediction_type="epsilon"), dict(sigmas=[1.0, 0.5]), "VP timesteps"),
    ("euler", {}, dict(sigmas=[]), "at least one value above 0"),
    ("euler", {}, dict(sigmas=[1.0, 0.5], timesteps=[1000.0]), "same length"),
    ("euler", dict(prediction_type="epsilon", timestep_spacing="linspace", timestep_spacing_rule="dpm-solver"),
     dict(num_inference_steps=1000), "1000 grid nodes repeat a training timestep"),
    ("euler", {}, dict(timesteps=[1500.0, 500.0]), r"timesteps must lie in \(0, 1000\]"),  # σ = 1.5 ran
    ("euler", {}, dict(timesteps=[0.0]), r"timesteps must lie in \(0, 1000\]"),
    ("euler", FLUX_DEV, dict(num_inference_steps=4, mu=float("nan")), "mu must be a finite number"),
    ("heun", dict(use_dynamic_shifting=True, shift_terminal=0.02), dict(num_inference_steps=2, mu=0.7),
     r"1 interval\(s\) here.* 4 with Heun"),
    ("euler", dict(use_dynamic_shifting=True, shift_terminal=0.02), dict(num_inference_steps=1, mu=0.7),
     "shift_terminal=0.02 .* needs at least 2 intervals"),  # Qwen-Image's stretch of one step: NaN before
])
def test_bad_set_timesteps_is_a_clear_value_error(solver, kwargs, call, message):
    s = FewstepScheduler(solver=solver, **kwargs)
    with pytest.raises(ValueError, match=message):
        s.set_timesteps(**call)


def test_mu_without_dynamic_shifting_is_ignored_like_flow_match_euler():
    # Flux-schnell's pipeline passes mu to a scheduler without dynamic shifting; it is not read, so not checked.
    config = dict(shift=3.0, use_dynamic_shifting=False)
    for mu in (0.7, float("nan"), 1e6):
        ours, theirs = FewstepScheduler(solver="euler", **config), FlowMatchEulerDiscreteScheduler(**config)
        ours.set_timesteps(4, mu=mu)
        theirs.set_timesteps(4, mu=mu)
        assert torch.allclose(ours.sigmas.double(), theirs.sigmas.double(), atol=1e-6), mu


@pytest.mark.parametrize("n", [10, 100, 500])
def test_searched_epsilon_grid_above_a_small_training_schedule_names_num_train_timesteps(n):
    """The dit table starts at VP t = 0.999 of the DiT schedule (s = 0.9934): with fewer training timesteps the top
    noise level is lower, so its calls cannot be placed. Before: "cannot start at timestep index 1" from a clamped,
    repeated timestep."""
    s = NeuralSolverScheduler(solver_file="dit", prediction_type="epsilon", num_train_timesteps=n)
    with pytest.raises(InvalidInput, match=f"num_train_timesteps={n} and beta_end=0.02.*must be the model's own"):
        s.set_timesteps(6)
    s = NeuralSolverScheduler(solver_file="dit", prediction_type="epsilon")  # 1000: fits
    s.set_timesteps(6)
    assert len(set(s.timesteps.tolist())) == 6


def test_epsilon_timesteps_outside_the_training_range_are_refused():
    s = FewstepScheduler(solver="euler", prediction_type="epsilon", num_train_timesteps=100)
    with pytest.raises(InvalidInput, match=r"timesteps must lie in \[0, 99\] \(num_train_timesteps=100\)"):
        s.set_timesteps(timesteps=[150.0, 50.0])


def test_flow_timesteps_ending_at_zero_end_at_sigma_zero_as_sigmas_do():
    """timesteps=[1000, 500, 0] (FlowMatchEuler takes it) was refused as 'sigmas must be strictly decreasing'."""
    s = FewstepScheduler(shift=3.0, solver="euler")
    s.set_timesteps(timesteps=[1000.0, 500.0, 0.0])
    assert s.timesteps.tolist() == [1000.0, 500.0] and s.sigmas.tolist() == [1.0, 0.5, 0.0]
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(timesteps=[1000.0, 500.0, 0.0])
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    ours, theirs = x, x
    for t in ref.timesteps:  # FlowMatchEuler's third step goes from σ = 0 to 0: the same result in one call less
        theirs = ref.step(v, t, theirs).prev_sample
    for t in s.timesteps:
        ours = s.step(v, t, ours).prev_sample
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_epsilon_noise_levels_are_ddims_for_every_beta_schedule(beta_schedule):
    ref = DDIMScheduler(beta_schedule=beta_schedule, timestep_spacing="trailing")
    s = FewstepScheduler.from_config(ref.config, solver="euler")
    x0, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([999, 500, 3])
    torch.testing.assert_close(s.add_noise(x0, n, t), ref.add_noise(x0, n, t), atol=1e-6, rtol=1e-6)
    for sched in (s, ref):
        sched.set_timesteps(7)
    assert torch.equal(s.timesteps, ref.timesteps.float())


def test_from_config_of_an_sd1_config_without_prediction_type_is_epsilon():
    """SD 1.x's scheduler JSON (PNDMScheduler, diffusers 0.6) has no prediction_type key: ε is what it ran."""
    sd1 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
           "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    s = FewstepScheduler.from_config(sd1, solver="euler")
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         clip_sample=False)
    assert s.config.prediction_type == "epsilon"
    for sched in (s, ddim):
        sched.set_timesteps(4)
    assert s.timesteps.tolist() == ddim.timesteps.float().tolist() == [751.0, 501.0, 251.0, 1.0]


@pytest.mark.parametrize("spacing", ["karras", "exponential", "beta"])
@pytest.mark.parametrize("config,mu", [(dict(shift=3.0), None), (FLUX_DEV, 1.15)])
def test_karras_exponential_and_beta_sigmas_are_flowmatch_eulers(spacing, config, mu):
    ref = FlowMatchEulerDiscreteScheduler(**config, **{f"use_{spacing}_sigmas": True})
    s = FewstepScheduler.from_config(ref.config, solver="euler")
    for sched in (s, ref):
        sched.set_timesteps(7, mu=mu)
    torch.testing.assert_close(s.sigmas, ref.sigmas.float(), atol=2e-7, rtol=0)
    torch.testing.assert_close(s.timesteps, ref.timesteps.float(), atol=2e-4, rtol=0)
    s.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5), mu=mu)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5), mu=mu)
    torch.testing.assert_close(s.sigmas, ref.sigmas.float(), atol=2e-7, rtol=0)


def test_epsilon_karras_sigmas_are_dpm_solvers():
    """PixArt-style DPM-Solver config with use_karras_sigmas: the same VP noise levels σ/α, ending at 0."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler.from_config(real_config("pixart_sigma"), use_karras_sigmas=True)
    s = FewstepScheduler.from_config(ref.config, solver="adams2")
    for sched in (s, ref):
        sched.set_timesteps(8)
    vp = (s.sigmas / (1 - s.sigmas)).double()
    torch.testing.assert_close(vp, ref.sigmas.double(), rtol=2e-5, atol=0)
    assert torch.allclose(s.timesteps, ref.timesteps.float(), atol=0.5)  # DPM-Solver rounds the timesteps


@pytest.mark.parametrize("spacing", ["karras", "exponential", "beta"])
def test_flow_unipc_use_sigmas_respace_the_vp_range_of_its_betas_as_unipc_karras(spacing):
    """A flow-mode UniPC config with use_*_sigmas: UniPC re-spaces the VP σ of its betas (Karras: exactly its grid,
    flow_shift unused), not the shifted grid between 1 and the last node (that stopped at σ = 0.5 at 4 steps)."""
    from diffusers import UniPCMultistepScheduler

    config = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                     **{f"use_{spacing}_sigmas": True}).config
    s = FewstepScheduler.from_config(config, solver="euler")
    s.set_timesteps(4)
    ref = UniPCMultistepScheduler.from_config(config, use_karras_sigmas=True, use_exponential_sigmas=False,
                                              use_beta_sigmas=False)
    ref.set_timesteps(4)
    torch.testing.assert_close(s.sigmas[[0, -2]], ref.sigmas[[0, -2]].float(), atol=2e-7, rtol=0)  # the VP range
    if spacing == "karras":
        torch.testing.assert_close(s.sigmas, ref.sigmas.float(), atol=2e-7, rtol=0)
        assert torch.allclose(s.timesteps, ref.timesteps.float(), atol=1.0)  # UniPC rounds down to integers


@pytest.mark.parametrize("target", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler"])
def test_a_default_spacing_stays_a_default_through_fewstep(target, tmp_path):
    """DDIM()'s 'leading' is only its default: the next diffusers class spaces as itself, through fewstep as directly
    (it got 'leading', the first timestep 900 not 999); an explicit spacing and our own use of it are kept."""
    import diffusers

    cls = getattr(diffusers, target)
    for source in (DDIMScheduler().config, _saved_without_spacing(tmp_path)):  # live defaults; SD 1.x's PNDM file
        direct = cls.from_config(source)
        ours = AdamsScheduler.from_config(source)
        via = cls.from_config(FewstepScheduler.from_config(ours.config).config)
        for sched in (direct, via, ours):
            sched.set_timesteps(10)
        assert torch.equal(via.timesteps, direct.timesteps) and via.config.timestep_spacing != "leading"
        assert ours.config.timestep_spacing == "leading" and ours.timesteps[0] == 900 + source["steps_offset"]
    explicit = FewstepScheduler.from_config(DDIMScheduler(timestep_spacing="trailing").config)
    assert cls.from_config(explicit.config).config.timestep_spacing == "trailing"


def _saved_without_spacing(folder):
    """A scheduler_config.json as SD 1.x ships it: PNDM's keys, no timestep_spacing."""
    from diffusers import PNDMScheduler

    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                  steps_offset=1).save_config(folder)
    config = json.loads((folder / "scheduler_config.json").read_text())
    del config["timestep_spacing"]
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    return PNDMScheduler.from_pretrained(folder).config


def test_switching_between_fewstep_schedulers_keeps_the_schedule_not_the_solver():
    adams3 = AdamsScheduler(order=3, shift=3.0)
    stork = StorkScheduler.from_config(adams3.config)
    assert stork.config.order == 4 and stork.config.shift == 3.0
    assert AdamsScheduler.from_config(StorkScheduler(order=2, stages=9).config).config.order == 2
    options = FewstepScheduler(solver="stork-4", solver_options={"extrapolate": "velocity"}).config
    s = FewstepScheduler.from_config(options, solver="adams3")
    assert s.config.solver == "adams3" and not s.config.solver_options
    kept = FewstepScheduler.from_config(options)
    assert kept.config.solver_options == {"extrapolate": "velocity"}


def test_rebuilding_from_our_own_config_logs_no_unexpected_keys(monkeypatch):
    """Pipelines rebuild their scheduler from its config (generate does it per seed): no "config attributes ... were
    passed ... but are not expected" warning for the keys we add ourselves."""
    import diffusers.configuration_utils as config_utils

    seen = []
    monkeypatch.setattr(config_utils.logger, "warning", lambda msg, *a, **k: seen.append(msg))
    first = StorkScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, order=2)
    for cls in (StorkScheduler, FewstepScheduler, AdamsScheduler):
        cls.from_config(first.config)
    assert seen == []


def test_our_config_has_no_use_flow_sigmas_so_flux_pipelines_keep_passing_their_sigmas():
    """FluxPipeline drops its sigmas (and the scheduler makes its own grid) when the config says use_flow_sigmas."""
    ours = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert "use_flow_sigmas" not in ours.config and ours.config.flow_shift == 3.0


def test_sigmas_with_separate_timesteps_integrate_the_sigmas_and_give_the_model_the_timesteps():
    """CogView4 / GLM-Image pass both: FlowMatchEuler integrates the shifted sigmas and hands the model the
    timesteps. fewstep's Euler does the same; Heun's stages get timesteps interpolated between their nodes'."""
    config = dict(FLUX_DEV, base_shift=0.25, max_shift=0.75, base_image_seq_len=256)
    timesteps = np.linspace(1000.0, 1.0, 6)
    sigmas = timesteps / 1000.0
    ref = FlowMatchEulerDiscreteScheduler(**config)
    s = FewstepScheduler.from_config(ref.config, solver="euler")
    for sched in (s, ref):
        sched.set_timesteps(sigmas=sigmas, timesteps=timesteps, mu=0.6)
    torch.testing.assert_close(s.timesteps, ref.timesteps.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.sigmas, ref.sigmas.float(), atol=2e-7, rtol=0)
    x = torch.randn(1, 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = {"ours": [], "diffusers": []}
    outs = [run(sched, lambda x, t, key=key: seen[key].append(float(t)) or gaussian_velocity(x, t), x)
            for key, sched in (("ours", s), ("diffusers", ref))]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    assert seen["ours"] == seen["diffusers"] == pytest.approx(timesteps.tolist(), abs=1e-4)
    heun = FewstepScheduler.from_config(ref.config, solver="heun")
    heun.set_timesteps(sigmas=sigmas, timesteps=timesteps, mu=0.6)
    assert heun.timesteps[0] == 1000.0 and len(heun.timesteps) == 6
    assert float(heun.timesteps[-1]) == 0.0 and float(heun.sigmas[-2]) == 0.0  # its last stage, at σ = 0
    assert torch.all(torch.diff(heun.timesteps) <= 0)


def test_begin_index_at_the_end_is_accepted_and_stepping_then_says_nothing_is_left():
    """img2img at strength 0: FlowMatchEuler accepts set_begin_index(N) and the pipeline reports 0 steps itself."""
    s = FewstepScheduler(solver="adams-denoise")
    s.set_timesteps(5)
    s.set_begin_index(5)
    x = torch.zeros(1, 4)
    with pytest.raises(InvalidInput, match="no model calls are left"):
        s.step(x, s.timesteps[-1], x)
    s.set_timesteps(5)  # a new run works again
    assert run(s, constant(torch.ones(1, 4)), x).shape == x.shape


def test_per_token_timesteps_are_refused_with_a_clear_message():
    s = FewstepScheduler()
    s.set_timesteps(4)
    x = torch.zeros(1, 4)
    with pytest.raises(InvalidInput, match="per_token_timesteps"):
        s.step(x, s.timesteps[0], x, per_token_timesteps=torch.full((1, 4), 1000.0))


@pytest.mark.parametrize("steps", [4, 6, 9])
def test_a_flow_unipc_config_keeps_unipcs_grid(steps):
    """Wan / Sana ship UniPC in flow mode: its grid (linspace(1, 1/T, N + 1) without the last value, shifted) has no
    call at FlowMatchEuler's σ_min."""
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    s = FewstepScheduler.from_config(ref.config, solver="adams-denoise")
    for sched in (s, ref):
        sched.set_timesteps(steps)
    torch.testing.assert_close(s.sigmas[1:], ref.sigmas[1:].float(), atol=1e-7, rtol=0)
    assert float(s.sigmas[0]) == 1.0 and float(s.sigmas[-2]) > 0.1  # (UniPC starts at 1 − 1e-6 against its log)
    again = FewstepScheduler.from_config(s.config)
    again.set_timesteps(steps)
    assert torch.equal(again.sigmas, s.sigmas)


def test_config_edits_and_flow_shift_keyword_are_honoured():
    ours = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert FewstepScheduler.from_config({**ours.config, "shift": 5.0}).config.shift == 5.0
    from diffusers import UniPCMultistepScheduler

    wan = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction").config
    assert FewstepScheduler.from_config(wan, flow_shift=5.0).config.shift == 5.0
    assert FewstepScheduler.from_config(wan).config.shift == 3.0


def test_an_old_dpm_solver_file_without_timestep_spacing_keeps_dpm_solvers_default(tmp_path):
    """DPMSolverMultistep JSONs from before timestep_spacing existed: DPM-Solver's default is "linspace", ours
    "leading" (which would start at t = 800)."""
    old = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.14.0", "beta_start": 0.0001,
           "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
           "solver_order": 2, "algorithm_type": "dpmsolver++", "trained_betas": None}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(old))
    s = FewstepScheduler.from_pretrained(tmp_path)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999.0, 749.0, 500.0, 250.0]


def test_a_learned_variance_output_is_split_as_ddpm_does():
    """Kandinsky / DeepFloyd IF keep the variance channels when the scheduler config says variance_type learned."""
    from diffusers import DDPMScheduler

    s = FewstepScheduler.from_config(DDPMScheduler(variance_type="learned_range", clip_sample=False).config,
                                     solver="euler")
    s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    both = s.step(torch.cat([eps, torch.full_like(eps, 7.0)], dim=1), s.timesteps[0], x).prev_sample
    s.set_timesteps(4)
    assert torch.equal(both, s.step(eps, s.timesteps[0], x).prev_sample)


@pytest.mark.parametrize("config,message", [
    ({"_class_name": "EDMEulerScheduler", "sigma_data": 0.5}, "EDM-parameterised model"),
    ({"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}, "EDM-parameterised model"),
    ({"_class_name": "DDIMInverseScheduler"}, "an inverse scheduler"),
    ({"_class_name": "ScoreSdeVeScheduler"}, "neither a VP"),
    ({"solver_order": 2, "algorithm_type": "sde-dpmsolver++", "prediction_type": "epsilon"}, "stochastic sampling"),
])
def test_configs_of_models_these_solvers_cannot_sample_are_refused_by_name(config, message):
    with pytest.raises(InvalidInput, match=message):
        FewstepScheduler.from_config(config)


@pytest.mark.parametrize("name,message", [("DDIMInverseScheduler", "an inverse scheduler"),
                                          ("DPMSolverMultistepInverseScheduler", "an inverse scheduler"),
                                          ("ScoreSdeVeScheduler", "neither a VP"),
                                          ("KarrasVeScheduler", "neither a VP"), ("IPNDMScheduler", "neither a VP"),
                                          ("EDMEulerScheduler", "EDM")])
def test_a_live_config_of_an_unsupported_scheduler_is_refused_before_it_is_ever_saved(name, message):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # KarrasVeScheduler is deprecated
        live = getattr(diffusers, name)().config
    assert "_class_name" not in live
    with pytest.raises(InvalidInput, match=f"{name}: .*{message}"):
        FewstepScheduler.from_config(live)


def test_a_ddim_config_with_clip_sample_is_taken_with_a_warning_live_and_saved(tmp_path):
    # DDIMScheduler() defaults to clip_sample=True and save_config writes it out explicitly: both must behave alike.
    DDIMScheduler().save_config(tmp_path)
    made = []
    for config in (DDIMScheduler().config, DDIMScheduler.load_config(tmp_path)):
        with pytest.warns(UserWarning, match="clip_sample=True .* is not applied"):
            made.append(FewstepScheduler.from_config(config))
    for s in made:
        s.set_timesteps(4)
    assert torch.equal(made[0].timesteps, made[1].timesteps) and made[0].config.prediction_type == "epsilon"
    made[1].save_pretrained(tmp_path / "ours")  # ours, saved: reloading it does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FewstepScheduler.from_pretrained(tmp_path / "ours")


def test_an_old_saved_stork_file_read_by_another_class_takes_that_class_default(tmp_path, monkeypatch):
    """Saved before fewstep_class existed: its _class_name says whose solver keys those are."""
    import diffusers.configuration_utils as config_utils

    StorkScheduler(order=2, extrapolate="velocity", shift=3.0).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    saved.pop("fewstep_class")
    (tmp_path / "scheduler_config.json").write_text(json.dumps(saved))
    seen = []
    monkeypatch.setattr(config_utils.logger, "warning", lambda msg, *a, **k: seen.append(msg))
    adams = AdamsScheduler.from_pretrained(tmp_path)
    assert adams.config.order == 2 and adams.config.shift == 3.0 and seen == []
    assert StorkScheduler.from_pretrained(tmp_path).config.extrapolate == "velocity"


def test_stepping_wrongly_is_a_clear_value_error():
    s = FewstepScheduler()
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="set_timesteps before"):
        s.step(x, 1000.0, x)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        s.step(x, torch.tensor(123.0), x)
    with pytest.raises(ValueError, match=r"model_output has shape \(4,\), sample \(1, 4\)"):
        s.step(torch.zeros(4), s.timesteps[0], x)


# --- named schedulers ---------------------------------------------------------------------------------------------

def test_named_schedulers_take_the_stork_docs_kwargs_and_round_trip(tmp_path):
    base = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    stork = StorkScheduler.from_config(base.config, order=2, stages=9)
    assert stork.config.order == 2 and stork.config.shift == 3.0 and stork.config.use_dynamic_shifting
    stork.set_timesteps(8, mu=1.15)
    assert len(stork.timesteps) == 8
    stork.save_pretrained(tmp_path)
    again = StorkScheduler.from_pretrained(tmp_path)
    again.set_timesteps(8, mu=1.15)
    assert torch.equal(again.timesteps, stork.timesteps) and again.config.stages == 9
    generic = FewstepScheduler.from_config(base.config, solver="stork-2", solver_options={"stages": 9})
    generic.set_timesteps(8, mu=1.15)
    assert torch.equal(generic.timesteps, stork.timesteps)
    assert AdamsScheduler(order=4).config.order == 4
    NeuralSolverScheduler(solver_file="flowdcn").set_timesteps(6)
    with pytest.raises(ValueError, match="order must be 2 or 4"):
        StorkScheduler(order=3)
    with pytest.raises(ValueError, match="stages"):
        StorkScheduler(stages=1000)
    with pytest.raises(TypeError):
        StorkScheduler(shfit=3.0)  # a misspelt schedule key is not swallowed


def test_named_schedulers_expose_every_schedule_key_and_do_epsilon():
    keys = set(inspect.signature(FewstepScheduler.__init__).parameters) - {"self", "solver", "solver_options"}
    for cls, own in ((StorkScheduler, {"order", "stages", "derivative_order", "compat", "extrapolate", "jump"}),
                     (AdamsScheduler, {"order", "startup"}), (NeuralSolverScheduler, {"solver_file"})):
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert params == own | keys and "kwargs" not in params
    pixart = real_config("pixart_sigma")
    ns = NeuralSolverScheduler.from_config(pixart, solver_file="dit")
    ns.set_timesteps(STEPS)
    assert ns.config.prediction_type == "epsilon" and len(ns.timesteps) == STEPS
    assert StorkScheduler.from_config(pixart, order=2).config.beta_schedule == "linear"


# --- the overhead benchmark's plumbing (its numbers are machine-dependent: not asserted) --------------------------

def test_overhead_rows_and_markdown():
    from fewstep.bench.overhead import _measurable, measure_overhead, overhead_markdown

    rows = measure_overhead(["euler", "adams2"], shape=(1, 16, 4), steps=4, repeats=2)
    assert [(r["solver"], r["dtype"]) for r in rows] == [("euler", "bfloat16"), ("adams2", "bfloat16"),
                                                         ("euler", "float32"), ("adams2", "float32")]
    for r in rows:
        assert r["fewstep_us"] > 0 and r["diffusers_us"] > 0 and r["shape"] == "1x16x4" and r["steps"] == 4
        assert r["ratio"] == pytest.approx(r["fewstep_us"] / r["diffusers_us"])
    table = overhead_markdown(rows)
    assert "| solver | dtype | fewstep µs/step | FlowMatchEuler µs/step | ratio |" in table
    assert table.count("\n| ") == 2 + len(rows) - 1 and f"| adams2 | float32 | {rows[3]['fewstep_us']:.1f} |" in table
    # the default list: every solver that can make 28 calls with default options (the NeuralSolver tables stop at 10)
    assert _measurable(None, 28) == [n for n in SOLVERS if n != "neuralsolver"]
    assert "neuralsolver" in _measurable(None, 8)


def test_solver_file_of_another_grid_warns_once_per_scheduler():
    """A solver file searched on the shift-3 grid warns (once per scheduler, at set_timesteps) when the config samples
    on another shift or μ; the same grid, or a file that does not record its grid, stays silent."""
    from fewstep.search import GridMismatchWarning, shipped_solver

    shift3 = str(shipped_solver("digits", 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = NeuralSolverScheduler(solver_file=shift3)  # shift 1
        s.set_timesteps(6)
        s.set_timesteps(8)
        NeuralSolverScheduler(solver_file=shift3, shift=3.0).set_timesteps(6)
        NeuralSolverScheduler(solver_file=shift3, **FLUX_DEV).set_timesteps(6, mu=math.log(3.0))
        NeuralSolverScheduler(solver_file=shift3, **FLUX_DEV).set_timesteps(6, mu=0.5)
        NeuralSolverScheduler(solver_file="flowdcn", shift=3.0).set_timesteps(6)
    grid = [w for w in caught if issubclass(w.category, GridMismatchWarning)]
    assert [str(w.message).split("sampling asks for ")[1].split(":")[0] for w in grid] == ["shift 1", "shift 1.64872"]
    assert all("shift-3 grid" in str(w.message) and w.filename == __file__ for w in grid)


def test_epsilon_mode_exposes_ddims_betas_and_alphas_cumprod():
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    s = FewstepScheduler.from_config(ref.config)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(s, name), getattr(ref, name)), name
    with pytest.raises(InvalidInput, match="trained_betas has 2 values.*num_train_timesteps=1000"):
        FewstepScheduler(prediction_type="epsilon", trained_betas=[0.1, 0.3])


def test_euler_sigma_bounds_of_its_karras_sigmas_are_refused_not_ignored(tmp_path):
    from diffusers import EulerDiscreteScheduler

    config = EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.5, sigma_max=5.0).config
    with pytest.raises(InvalidInput, match="sigma_min / sigma_max"):
        FewstepScheduler.from_config(config)
    s = FewstepScheduler.from_config(config, sigma_min=None, sigma_max=None)
    s.save_pretrained(tmp_path)  # the override is what was saved: the file loads again
    again = FewstepScheduler.from_pretrained(tmp_path)
    assert again.config.sigma_min is None and again.config.sigma_max is None
    s.set_timesteps(4)
    again.set_timesteps(4)
    assert torch.equal(s.timesteps, again.timesteps)


@pytest.mark.parametrize("cls", [FewstepScheduler, StorkScheduler])
def test_configs_compare_equal_after_save_load_and_a_trip_through_a_compatible_class(cls, tmp_path):
    # diffusers' own SchedulerCommonTest: test_from_pretrained and test_compatibles compare whole config dicts.
    from diffusers import UniPCMultistepScheduler

    s = cls()
    s.save_pretrained(tmp_path)
    assert cls.from_pretrained(tmp_path).config == {k: v for k, v in s.config.items() if k != "_use_default_values"}
    back = cls.from_config(UniPCMultistepScheduler.from_config(s.config).config)
    assert back.config["_use_default_values"] == s.config["_use_default_values"]


@pytest.mark.parametrize("solver", ["adams-denoise", "stork-2", "stork-4", "euler"])
def test_shift_below_one_starts_above_one_and_still_solves_a_straight_flow_exactly(solver):
    # diffusers' float32 training grid at shift < 1 starts at σ = 1.0000954 (shift 0.01): λ = log((1−σ)/σ) was NaN
    # there (a RuntimeWarning, and the jump test read NaN step lengths).
    s = FewstepScheduler(solver=solver, shift=0.01)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.set_timesteps(4)
        assert s.sigmas[0] > 1
        x = (1 - s.sigmas[0].double()) * x0 + s.sigmas[0].double() * noise
        for t in s.timesteps:
            x = s.step(noise - x0, t, x).prev_sample
    assert (x - x0).abs().max() < 1e-6  # float32 σ storage, as FlowMatchEuler: ~2e-8 here


def test_set_timesteps_takes_back_what_diffusers_pipelines_and_its_own_grid_pass():
    # each of these worked before the range checks and must keep working
    ours = FewstepScheduler(solver="euler")
    ours.set_timesteps(sigmas=[1.0, 0.5, 0.0], timesteps=[1000.0, 500.0, 0.0])  # CogView4-style, both ending in 0
    assert ours.timesteps.tolist() == [1000.0, 500.0]
    low = FewstepScheduler(solver="euler", shift=0.2)
    low.set_timesteps(4)  # diffusers' float32 grid at shift < 1: the first timestep is 1000.0006
    again = FewstepScheduler(solver="euler", shift=0.2)
    again.set_timesteps(timesteps=low.timesteps.numpy())
    assert torch.allclose(again.sigmas, low.sigmas)
    ours.set_timesteps(torch.tensor(4))  # a 0-d integer tensor, as FlowMatchEuler takes it
    ours.set_shift(torch.tensor(3.0))
    assert len(ours.timesteps) == 4 and ours.shift == 3.0
    ltx = FewstepScheduler(solver="euler", use_dynamic_shifting=True, shift_terminal=0.1)  # LTX-Video's stretch
    ltx.set_timesteps(4, mu=torch.tensor([0.7]))
    assert ltx.sigmas[-2].item() == pytest.approx(0.1, abs=1e-6)


def test_a_user_grid_out_of_order_is_blamed_on_the_sigmas_not_the_shift():
    s = FewstepScheduler(solver="euler", **FLUX_DEV)
    for sigmas in ([0.2, 0.5, 1.0], [1.0, 0.5, 0.5]):
        with pytest.raises(InvalidInput, match="^sigmas must be strictly decreasing"):
            s.set_timesteps(sigmas=sigmas, mu=1.15)
    with pytest.raises(InvalidInput, match="mu must be one number, got 2 values"):
        s.set_timesteps(4, mu=torch.tensor([0.7, 0.8]))


def test_a_grid_of_tiny_sigmas_runs_the_guarded_corrector():
    # σ ~ 1e-170 makes the corrector's stability bound ~1e170; squaring it raised OverflowError inside step().
    s = FewstepScheduler(solver="adams-denoise")
    s.set_timesteps(sigmas=[1.0, 1e-170, 1e-171, 1e-172])
    x = torch.ones(1, 4, dtype=torch.float64)
    for t in s.timesteps:
        x = s.step(-x, t, x).prev_sample
    # the same as on a grid of σ ~ 1e-10, where nothing overflows: one step of length 1 (Euler 2, corrected 2.5)
    # and three steps that move x by ~1e-10
    assert torch.allclose(x, torch.full_like(x, 2.5), rtol=1e-9)
