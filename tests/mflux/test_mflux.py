"""fewstep.mflux inside mflux 0.24.0's own FLUX.1 loop (`generate_image`, and `mflux-generate`'s entry point), offline:
no Apple hardware (MLX's CPU build), no weights (mflux_harness.py's closed-form stand-ins).

Needs the environment of tests/mflux/setup_env.sh; skipped elsewhere:
    bash tests/mflux/setup_env.sh && .venv-mflux/bin/python -m pytest -q tests/mflux
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="needs MLX: run in the environment of tests/mflux/setup_env.sh")
pytest.importorskip("mflux.models.flux.variants.txt2img.flux",
                    reason="needs mflux 0.24.0: run in the environment of tests/mflux/setup_env.sh")

import mlx.core as mx  # noqa: E402
from mflux.models.common.config.config import Config  # noqa: E402
from mflux.models.common.config.model_config import ModelConfig  # noqa: E402
from mflux.models.common.schedulers import SchedulerModuleNotFound  # noqa: E402
from mflux.models.common.schedulers.linear_scheduler import LinearScheduler  # noqa: E402
from mflux.models.flux.latent_creator.flux_latent_creator import FluxLatentCreator  # noqa: E402
from mflux_harness import HEIGHT, WIDTH, Offline, generate, rms, run_cli, write_image  # noqa: E402

import fewstep.mflux as fm  # noqa: E402
from fewstep import solvers  # noqa: E402
from fewstep.sampling import execute  # noqa: E402
from fewstep.solvers.plan import combine, grid_plan  # noqa: E402

CLASSES = ["Euler", "Adams2", "Adams3", "Adams4", "Stork2", "Stork4", "Recommended"]
SOLVER = {"Euler": "euler", "Adams2": "adams2", "Adams3": "adams3", "Adams4": "adams4", "Stork2": "stork-2",
          "Stork4": "stork-4", "Recommended": fm.Recommended.solver, "Heun": "heun"}


@pytest.fixture(scope="module")
def offline():
    return Offline()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("img") / "input.png")


def config(model: str, steps: int, scheduler: str, width: int = WIDTH, height: int = HEIGHT, **kwargs) -> Config:
    return Config(model_config=ModelConfig.from_name(model_name=model, base_model=None), num_inference_steps=steps,
                  width=width, height=height, scheduler=scheduler, **kwargs)


class _with:  # noqa: N801  (reads as a function: a config with some attributes replaced)
    def __init__(self, base: Config, **replaced) -> None:
        self._base = base
        self.__dict__.update(replaced)

    def __getattr__(self, key: str):
        return getattr(self._base, key)


def unpack(x: np.ndarray) -> np.ndarray:
    return np.array(FluxLatentCreator.unpack_latents(mx.array(x.astype(np.float32)), HEIGHT, WIDTH), np.float64)


# -- the σ grid -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["schnell", "dev", "qwen-image"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
@pytest.mark.parametrize("size", [(128, 128), (1024, 1024), (768, 1360)])
def test_grid_is_mflux_linear_grid(model, steps, size):
    """Built by mflux's Config (set_image_seq_len included), every one-call-per-step class has mflux's own float32
    `linear` grid, bit for bit (Qwen-Image: its shift and terminal stretch to 0.02 included)."""
    width, height = size
    linear = np.array(config(model, steps, "linear", width, height).scheduler.sigmas)
    if model == "qwen-image" and steps == 1:  # mflux's terminal stretch of a single point divides by 0
        assert np.isnan(linear[0])
        with pytest.raises(ValueError, match="not finite"):
            config(model, steps, "fewstep.mflux.Euler", width, height).scheduler  # noqa: B018
        return
    assert linear.dtype == np.float32 and len(linear) == steps + 1 and linear[-1] == 0
    for name in ("Euler", "Adams2", "Stork2", "Stork4", "Recommended"):
        ours = config(model, steps, f"fewstep.mflux.{name}", width, height).scheduler
        assert isinstance(ours, getattr(fm, name))
        assert np.array(ours.sigmas).dtype == np.float32
        np.testing.assert_array_equal(np.array(ours.sigmas), linear)
        assert np.array(ours.timesteps).shape == (steps,)


def test_dev_shift_values():
    """dev at 1024²: μ = 0.5 + 0.65·(4096 − 256)/3840 = 1.15; σ' = e^μ/(e^μ + 1/σ − 1) on linspace(1, 1/8, 8)."""
    sigmas = np.array(config("dev", 8, "fewstep.mflux.Stork2", 1024, 1024).scheduler.sigmas, np.float64)
    raw = np.linspace(1.0, 1.0 / 8, 8)
    expected = np.exp(1.15) / (np.exp(1.15) + 1.0 / raw - 1.0)
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=0, atol=2e-7)
    assert sigmas[1] == pytest.approx(0.956724, abs=1e-6)  # e^1.15/(e^1.15 + 1/7)
    # schnell: no shift, MLX's float32 linspace as mflux uses it (0.625 comes out 1 ulp low: mflux's grid, not ours)
    schnell = np.array(config("schnell", 8, "fewstep.mflux.Stork2", 1024, 1024).scheduler.sigmas)
    np.testing.assert_allclose(schnell, np.r_[raw, 0.0], rtol=0, atol=6e-8)
    assert schnell[3] == np.float32(0.6249999403953552) == np.array(LinearScheduler(
        config("schnell", 8, "linear", 1024, 1024)).sigmas)[3]


def test_set_image_seq_len_reshifts_dev_only():
    """set_image_seq_len(4096) on a 128² dev config gives the 1024² grid; schnell ignores it."""
    small = config("dev", 8, "fewstep.mflux.Stork4").scheduler
    big = np.array(config("dev", 8, "linear", 1024, 1024).scheduler.sigmas)
    assert not np.array_equal(np.array(small.sigmas), big)
    small.set_image_seq_len(64 * 64)
    np.testing.assert_array_equal(np.array(small.sigmas), big)
    schnell = config("schnell", 8, "fewstep.mflux.Stork4").scheduler
    before = np.array(schnell.sigmas)
    schnell.set_image_seq_len(64 * 64)
    np.testing.assert_array_equal(np.array(schnell.sigmas), before)


def test_mflux_sigmas_helper():
    np.testing.assert_array_equal(np.array(fm.mflux_sigmas(4, ModelConfig.schnell())),
                                  np.array(config("schnell", 4, "linear").scheduler.sigmas))
    np.testing.assert_allclose(np.array(fm.mflux_sigmas(4, ModelConfig.schnell())), [1, 0.75, 0.5, 0.25, 0], atol=6e-8)
    np.testing.assert_array_equal(np.array(fm.mflux_sigmas(6, ModelConfig.dev(), 4096)),
                                  np.array(config("dev", 6, "linear", 1024, 1024).scheduler.sigmas))


# -- the update -------------------------------------------------------------------------------------------------------
def test_combine_on_mlx_arrays():
    a = mx.array([1.0, 2.0, -4.0])
    b = mx.array([0.5, 0.25, 8.0])
    out = combine([(1.0, a), (np.float64(-0.5), b), (2.0, b)])
    assert isinstance(out, mx.array) and out.dtype == mx.float32
    assert np.array(out).tolist() == [1.75, 2.375, 8.0]
    assert combine([(3.0, a)], mx.bfloat16).dtype == mx.bfloat16


def test_step_takes_latents_as_current_state():
    """Adams-2 with part of the latents overwritten after every step (as mflux's in-context variants do) equals the
    plan's rows applied to the states actually passed in (float64 reference)."""
    scheduler = config("dev", 6, "fewstep.mflux.Adams2").scheduler
    plan = grid_plan(solvers.get("adams2"), np.array(scheduler.sigmas, np.float64))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64)).astype(np.float32)
    xs, vs = [], []
    for t in range(6):
        v = rng.standard_normal(x.shape).astype(np.float32)
        xs.append(x.astype(np.float64))
        vs.append(v.astype(np.float64))
        out = np.array(scheduler.step(noise=mx.array(v), timestep=t, latents=mx.array(x)))
        row = plan.rows[t]
        expected = sum(c * xs[j] for j, c in row.x.items()) + sum(c * vs[j] for j, c in row.v.items())
        np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5)
        x = out.copy()
        x[:, :32] = rng.standard_normal((1, 32, 64))  # the variant overwrites half of the tokens
    assert np.array(scheduler.sigmas)[0] == 1.0


def test_bad_transformer_output_or_latents_are_one_line_errors():
    scheduler = config("dev", 4, "fewstep.mflux.Stork2").scheduler
    x = mx.zeros((1, 8, 4))
    with pytest.raises(ValueError, match=r"Stork2: transformer output of shape \(1, 1, 4\) for latents of shape"):
        scheduler.step(noise=mx.zeros((1, 1, 4)), timestep=0, latents=x)
    with pytest.raises(ValueError, match="latents must be a floating-point MLX array"):
        scheduler.step(noise=mx.zeros((1, 8, 4), dtype=mx.int32), timestep=0, latents=x.astype(mx.int32))
    nan = mx.full((1, 8, 4), float("nan"))
    with pytest.raises(FloatingPointError, match=r"Stork2: the transformer output at step 0 \(sigma 1\) is NaN"):
        scheduler.step(noise=nan, timestep=0, latents=x)


def test_a_fractional_step_count_timestep_or_start_and_a_bad_guidance_are_refused():
    # int() would run 2 steps for 2.5 and step 1 for 1.7; NaN guidance is truthy and passed `guidance or 1.0`.
    with pytest.raises(ValueError, match=r"Stork2: num_inference_steps must be a whole number, got 2\.5"):
        fm.Stork2(_with(config("dev", 4, "fewstep.mflux.Stork2"), num_inference_steps=2.5))
    scheduler = config("dev", 4, "fewstep.mflux.Stork2").scheduler
    x = mx.zeros((1, 8, 4))
    with pytest.raises(ValueError, match=r"Stork2: timestep must be a whole number, got 1\.7"):
        scheduler.step(noise=x, timestep=1.7, latents=x)
    assert np.array(scheduler.step(noise=x, timestep=0.0, latents=x)).shape == (1, 8, 4)  # 0.0 is step 0
    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):
        fm.Stork2(_with(config("dev", 4, "fewstep.mflux.Stork2"), guidance=float("nan")))
    with pytest.raises(ValueError, match="guidance must be a finite number, got 'abc'"):  # a bare float() error
        fm.Stork2(_with(config("dev", 4, "fewstep.mflux.Stork2"), guidance="abc"))
    with pytest.raises(ValueError, match="Stork2: num_inference_steps must be a whole number, got True"):
        fm.Stork2(_with(config("dev", 4, "fewstep.mflux.Stork2"), num_inference_steps=True))
    for start in (2.5, float("nan")):  # 2.5 entered at step 2; NaN was a bare int() error
        with pytest.raises(ValueError, match=r"Stork2: init_time_step must be a whole number, got (2\.5|nan)"):
            fm.Stork2(_with(config("dev", 4, "fewstep.mflux.Stork2"), init_time_step=start))


def test_a_misspelt_option_of_a_subclass_is_refused():
    class MyStork(fm.Stork4):
        derivative_orderr = 3

    class MyEuler(fm.Euler):
        stages = 3

    for cls, key in ((MyStork, "derivative_orderr"), (MyEuler, "stages")):
        with pytest.raises(ValueError, match=f"{cls.__name__}.{key}: solver '{cls.solver}' has no option '{key}'"):
            cls.solver_options()
    class Fine(fm.Recommended):
        order = 3

    assert Fine.solver_options() == {"order": 3}


def test_image_strength_one_makes_no_call_as_mflux_linear(offline, image):
    """mflux clamps --image-strength to 1, which starts at init_time_step = steps: no transformer call, the image."""
    for scheduler in ("linear", "fewstep.mflux.Stork2", "fewstep.mflux.Recommended"):
        generate(offline, "dev", scheduler, 4, image_path=image, strength=1.0)
        assert offline.transformer.calls == [], scheduler


def test_bf16_latents_are_rounded_once():
    sched32 = config("schnell", 4, "fewstep.mflux.Stork2").scheduler
    sched16 = config("schnell", 4, "fewstep.mflux.Stork2").scheduler
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((1, 16, 64)).astype(np.float32)).astype(mx.bfloat16)
    for t in range(4):
        v = mx.array(rng.standard_normal((1, 16, 64)).astype(np.float32)).astype(mx.bfloat16)
        out16 = sched16.step(noise=v, timestep=t, latents=x)
        out32 = sched32.step(noise=v.astype(mx.float32), timestep=t, latents=x.astype(mx.float32))
        assert out16.dtype == mx.bfloat16 and out32.dtype == mx.float32
        np.testing.assert_array_equal(np.array(out16.astype(mx.float32)),
                                      np.array(out32.astype(mx.bfloat16).astype(mx.float32)))
        x = out16


# -- mflux's generate_image loop -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["schnell", "dev"])
@pytest.mark.parametrize("img2img", [False, True])
def test_euler_is_mflux_linear(offline, image, model, img2img):
    kwargs = dict(image_path=image, strength=0.4) if img2img else {}
    generate(offline, model, "linear", 8, **kwargs)
    linear, calls = offline.final_latents(), [c[:2] for c in offline.transformer.calls]
    generate(offline, model, "fewstep.mflux.Euler", 8, **kwargs)
    assert [c[:2] for c in offline.transformer.calls] == calls
    assert len(calls) == (8 - 3 if img2img else 8)  # img2img: init_time_step = int(8·0.4) = 3
    assert rms(offline.final_latents(), linear) <= 1e-6


@pytest.mark.parametrize("name", CLASSES + ["Heun"])
@pytest.mark.parametrize("model", ["schnell", "dev"])
def test_loop_runs_the_plan(offline, image, name, model):
    """Through mflux's loop (t2i and img2img), each class gives what fewstep's own executor gives for the same plan in
    float64 NumPy, to float32 round-off; the transformer is called at exactly the plan's σ's."""
    for kwargs in ({}, dict(image_path=image, strength=0.5)):
        generate(offline, model, f"fewstep.mflux.{name}", 8, **kwargs)
        calls = offline.transformer.calls
        scheduler_sigmas = np.array(config(model, 8, f"fewstep.mflux.{name}").scheduler.sigmas, np.float64)
        start = calls[0][0]
        assert [c[0] for c in calls] == list(range(start, 8))
        assert start == (4 if kwargs else 0)  # int(8·0.5)
        np.testing.assert_array_equal([c[1] for c in calls], scheduler_sigmas[start:-1])
        intervals = 4 if name == "Heun" else 8
        grid = np.array(fm.mflux_sigmas(intervals, ModelConfig.from_name(model, None), HEIGHT * WIDTH / 256),
                        np.float64)
        grid = grid[grid <= calls[0][1]]
        plan = grid_plan(config(model, 8, f"fewstep.mflux.{name}", guidance=3.5).scheduler._solver, grid)
        expected = execute(plan, offline.mixture.velocity, calls[0][2], check_finite=False)
        assert plan.calls == len(calls)
        np.testing.assert_allclose(offline.final_latents(), unpack(expected), rtol=0, atol=5e-5)


@pytest.mark.parametrize("model,corrector", [("schnell", True), ("dev", False)])
def test_the_recommended_solver_drops_its_corrector_for_a_guided_model(model, corrector):
    """docs/solvers.md: adams-denoise's corrector is off at guidance ≥ 4 (schnell has no guidance whatever mflux's
    config says), its stiffness fallback on from 3 only for classifier-free guidance (Qwen-Image, not dev's distilled
    guidance); a class that sets `corrector` keeps it."""
    built = config(model, 8, "fewstep.mflux.Recommended", guidance=4.5)
    assert built.scheduler._solver == solvers.get("adams-denoise", corrector=corrector)
    assert config(model, 8, "fewstep.mflux.Recommended", guidance=3.5).scheduler._solver == solvers.get(
        "adams-denoise")  # dev's default 3.5: below 4, and distilled (no fallback)
    qwen = config("qwen-image", 8, "fewstep.mflux.Recommended", guidance=4.0).scheduler._solver
    assert qwen == solvers.get("adams-denoise", corrector=False, stiff_fallback=True)
    qwen = config("qwen-image", 8, "fewstep.mflux.Recommended", guidance=3.0).scheduler._solver
    assert qwen == solvers.get("adams-denoise", stiff_fallback=True)  # the fallback guards the corrector too
    assert config(model, 8, "fewstep.mflux.Recommended", guidance=2.0).scheduler._solver.corrector

    class WithCorrector(fm.Recommended):
        corrector = True

    assert WithCorrector(built)._solver.corrector


@pytest.mark.parametrize("img2img", [False, True])
def test_qwen_image_loop(offline, image, img2img):
    """mflux's Qwen-Image `generate_image` takes the same scheduler interface: Euler is its `linear`, Stork4 runs its
    plan on Qwen's grid (shift + terminal 0.02) and beats `linear`. (Two transformer calls per step: guidance.)"""
    kwargs = dict(image_path=image, strength=0.25) if img2img else {}
    generate(offline, "qwen-image", "linear", 8, **kwargs)
    linear, reference = offline.final_latents(), offline.reference()
    generate(offline, "qwen-image", "fewstep.mflux.Euler", 8, **kwargs)
    assert rms(offline.final_latents(), linear) <= 1e-6
    generate(offline, "qwen-image", "fewstep.mflux.Stork4", 8, **kwargs)
    calls = offline.transformer.calls[::2]
    assert [c[0] for c in calls] == list(range(2 if img2img else 0, 8))
    grid = np.array(config("qwen-image", 8, "linear").scheduler.sigmas, np.float64)
    assert grid[-2] == pytest.approx(0.02, abs=1e-7)
    plan = grid_plan(solvers.get("stork-4"), grid[grid <= calls[0][1]])
    expected = execute(plan, offline.mixture.velocity, calls[0][2], check_finite=False)
    np.testing.assert_allclose(offline.final_latents(), unpack(expected), rtol=0, atol=5e-5)
    assert rms(offline.final_latents(), reference) < 0.7 * rms(linear, reference)


def test_heun_calls_and_odd_steps(offline):
    generate(offline, "schnell", "fewstep.mflux.Heun", 8)
    assert [round(c[1], 6) for c in offline.transformer.calls] == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0]
    with pytest.raises(ValueError, match="cannot make exactly 7 model calls"):
        config("schnell", 7, "fewstep.mflux.Heun").scheduler  # noqa: B018


def test_stork_and_recommended_beat_linear(offline):
    """The exact-ODE error at 8 steps, dev grid, text-to-image (docs/mflux.md has the full table)."""
    errors = {}
    for name in ("linear", "fewstep.mflux.Stork2", "fewstep.mflux.Stork4", "fewstep.mflux.Recommended"):
        generate(offline, "dev", name, 8)
        errors[name] = rms(offline.final_latents(), offline.reference())
    assert errors["linear"] == pytest.approx(0.20, abs=0.05)
    for name in ("fewstep.mflux.Stork2", "fewstep.mflux.Stork4", "fewstep.mflux.Recommended"):
        assert errors[name] < 0.6 * errors["linear"], errors


def test_img2img_start(offline, image):
    """img2img: mflux starts at init_time_step = max(1, int(n·strength)) from (1−σ)·image + σ·noise, σ = sigmas[init];
    higher strength = fewer calls, closer to the image."""
    calls = {}
    for strength in (0.25, 0.75):
        generate(offline, "dev", "fewstep.mflux.Stork2", 8, image_path=image, strength=strength, seed=5)
        calls[strength] = list(offline.transformer.calls)
        sigmas = np.array(config("dev", 8, "fewstep.mflux.Stork2").scheduler.sigmas)
        k = int(8 * strength)
        assert len(calls[strength]) == 8 - k and calls[strength][0][1] == sigmas[k]
        noise = np.array(FluxLatentCreator.create_noise(5, HEIGHT, WIDTH), np.float64)
        clean = np.array(FluxLatentCreator.pack_latents(offline.vae.clean, HEIGHT, WIDTH), np.float64)
        np.testing.assert_allclose(calls[strength][0][2], (1 - sigmas[k]) * clean + sigmas[k] * noise, atol=1e-6)
    assert len(calls[0.75]) < len(calls[0.25])


def test_neuralsolver(offline, image):
    """The searched `sit` solver runs its own σ grid (not mflux's) and beats `linear` at 8 steps; no img2img."""
    generate(offline, "schnell", "linear", 8)
    linear = rms(offline.final_latents(), offline.reference())
    generate(offline, "schnell", "fewstep.mflux.NeuralSolver", 8)
    plan = solvers.get("neuralsolver", solver_file="sit").plan(np.linspace(1, 0, 9))
    np.testing.assert_allclose([c[1] for c in offline.transformer.calls], plan.sigmas, atol=1e-7)
    assert rms(offline.final_latents(), offline.reference()) < 0.7 * linear
    offline.transformer.calls.clear()
    with pytest.raises(ValueError, match="cannot start at timestep index 4"):
        generate(offline, "schnell", "fewstep.mflux.NeuralSolver", 8, image_path=image, strength=0.5)
    assert offline.transformer.calls == []  # refused when the scheduler was built, before any transformer call
    with pytest.raises(ValueError, match="has no 4-step solver"):
        config("schnell", 4, "fewstep.mflux.NeuralSolver").scheduler  # noqa: B018


def test_configured_subclass_in_a_user_module(offline, tmp_path, monkeypatch):
    """The documented way to set options: a module of one's own, named by its dotted path."""
    (tmp_path / "my_schedulers.py").write_text(textwrap.dedent("""
        import fewstep.mflux

        class MyStork(fewstep.mflux.Stork4):
            derivative_order = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    generate(offline, "dev", "my_schedulers.MyStork", 8)
    assert sys.modules["my_schedulers"].MyStork.solver_options() == {"derivative_order": 3}
    mine, x = offline.final_latents(), offline.transformer.calls[0][2]
    grid = np.array(config("dev", 8, "linear").scheduler.sigmas, np.float64)
    for options, match in (({"derivative_order": 3}, True), ({}, False)):
        expected = unpack(execute(grid_plan(solvers.get("stork-4", **options), grid), offline.mixture.velocity, x,
                                  check_finite=False))
        assert bool(np.abs(mine - expected).max() < 5e-5) is match, options
    with pytest.raises(SchedulerModuleNotFound):
        config("dev", 8, "no_such_module.Stork2").scheduler  # noqa: B018


# -- mflux-generate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["schnell", "dev"])
def test_mflux_generate_cli(offline, image, tmp_path, model):
    """`mflux-generate --scheduler fewstep.mflux.Stork2 ...` through mflux's own CLI entry point: writes the image,
    calls the transformer once per step and ends where generate_image ends."""
    out = tmp_path / "out_{seed}.png"
    common = ["--model", model, "--scheduler", "fewstep.mflux.Stork2", "--prompt", "a closed-form velocity",
              "--width", str(WIDTH), "--height", str(HEIGHT), "--seed", "3", "--output", str(out)]
    run_cli(offline, [*common, "--steps", "4"])
    assert (tmp_path / "out_3.png").is_file() and len(offline.transformer.calls) == 4
    cli = offline.final_latents()
    generate(offline, model, "fewstep.mflux.Stork2", 4, seed=3)
    np.testing.assert_array_equal(cli, offline.final_latents())
    run_cli(offline, [*common, "--steps", "8", "--image-path", str(image), "--image-strength", "0.5"])
    assert [c[0] for c in offline.transformer.calls] == [4, 5, 6, 7]
    stork = rms(offline.final_latents(), offline.reference())
    generate(offline, model, "linear", 8, image_path=image, strength=0.5, seed=3)
    assert stork < rms(offline.final_latents(), offline.reference())


def test_module_imported_without_torch():
    assert "torch" not in sys.modules and "diffusers" not in sys.modules
