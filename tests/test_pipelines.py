"""Every fewstep solver inside the real diffusers pipelines (tiny random weights, offline; tests/pipelines.py)."""

import functools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads these once
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pipelines as tiny  # noqa: E402  (tests/pipelines.py; pytest puts tests/ on sys.path)
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

import fewstep  # noqa: E402
from fewstep.diffusers import FewstepScheduler, StorkScheduler  # noqa: E402

torch.set_num_threads(1)
SOLVERS = fewstep.solvers.names()
STEPS = 6  # every solver can make 6 model calls (NeuralSolver's shipped tables: 5-10)
CONFIGS = Path(__file__).parent / "data" / "scheduler_configs"
REAL_CONFIG = {"flux": "flux_dev", "flux_schnell": "flux_schnell", "flux_img2img": "flux_dev",
               "flux_inpaint": "flux_dev", "flux_fill": "flux_dev", "flux_control": "flux_dev",
               "flux_controlnet": "flux_dev", "qwen_image": "qwen_image", "sd3": "sd3", "pixart_sigma": "pixart_sigma"}


@functools.cache
def built(name: str):
    """Each pipeline is built once per test session (the builders are seeded, so this changes no numbers)."""
    pipe = tiny.BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, tiny.CallCounter(pipe.transformer)


def real_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{REAL_CONFIG[name]}.json").read_text())


def solver_options(name: str, solver: str) -> dict:
    return {"solver_file": "dit"} if solver == "neuralsolver" and name == "pixart_sigma" else {}


def expected_calls(kwargs: dict) -> int:
    """img2img/inpaint: the pipeline's get_timesteps truncation, t_start = int(N − N·strength)."""
    n = kwargs["num_inference_steps"]
    return n - int(max(n - n * kwargs.get("strength", 1.0), 0))


def generate(name: str, scheduler, **overrides) -> tuple[torch.Tensor, int]:
    pipe, counter = built(name)
    pipe.scheduler = scheduler
    counter.calls = 0
    kwargs = tiny.call_kwargs(name, STEPS) | overrides
    if name == "pixart_sigma":
        kwargs["clean_caption"] = False
    with torch.no_grad():
        out = pipe(**kwargs).images
    return out, counter.calls


@pytest.mark.filterwarnings("ignore::fewstep.entry.StageEntryWarning")  # entering at a stage: its own test
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("name", list(tiny.BUILDERS))
def test_every_solver_runs_in_every_pipeline(name, solver):
    scheduler = FewstepScheduler.from_config(real_config(name), solver=solver,
                                             solver_options=solver_options(name, solver))
    kwargs = tiny.call_kwargs(name, STEPS)
    if solver == "neuralsolver" and kwargs.get("strength", 1.0) < 1.0:
        # its searched grid and weights are one full run: img2img/inpaint refuse it before the denoising loop
        with pytest.raises(ValueError, match="cannot start at timestep index"):
            generate(name, scheduler)
        assert built(name)[1].calls == 0
        return
    images, calls = generate(name, scheduler)
    assert calls == expected_calls(kwargs)
    assert images.shape == (1, 3, 32, 32) and bool(torch.isfinite(images).all())
    assert float(images.std()) > 0  # an image, not a constant


def test_img2img_truncation_counts():
    """strength 0.6 of 6 steps → 4 calls, 0.8 → 5 (the entry for Heun is once between stages, once at a node)."""
    assert expected_calls(tiny.call_kwargs("flux_img2img", STEPS)) == 4
    assert expected_calls(tiny.call_kwargs("flux_inpaint", STEPS)) == 5


def test_euler_equals_flowmatch_euler_inside_fluxpipeline():
    ref, _ = generate("flux", FlowMatchEulerDiscreteScheduler.from_config(real_config("flux")), output_type="latent")
    ours, calls = generate("flux", FewstepScheduler.from_config(real_config("flux"), solver="euler"),
                           output_type="latent")
    assert calls == STEPS
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_euler_equals_ddim_inside_pixart_sigma():
    """In float64 (in float32 both are limited by x0 = (x − σ·ε)/α amplifying rounding: 2.5e−5 relative measured);
    DDIM's own float32 ᾱ arithmetic leaves ~1e−8 relative."""
    pipe = tiny.pixart_sigma().to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    ddim = DDIMScheduler(clip_sample=False)
    outs = []
    for scheduler in (ddim, FewstepScheduler.from_config(ddim.config, solver="euler")):
        pipe.scheduler = scheduler
        with torch.no_grad():
            kwargs = tiny.call_kwargs("pixart_sigma", STEPS) | {"clean_caption": False, "output_type": "latent"}
            outs.append(pipe(**kwargs).images)
    assert outs[0].dtype == torch.float64
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-7)


@pytest.mark.parametrize("solver", SOLVERS)
def test_adapter_in_fluxpipeline_equals_fewstep_sample(solver):
    """The pipeline's transformer as a plain model(x, σ) function: `fewstep.sample` reaches the same latents."""
    pipe, counter = built("flux")
    latents = torch.randn(1, 256, 4, generator=torch.Generator().manual_seed(3))  # packed: (32/2)² tokens
    ours, _ = generate("flux", FewstepScheduler.from_config(real_config("flux"), solver=solver), latents=latents,
                       output_type="latent")
    cond = {k: v for k, v in counter.last_kwargs.items() if k not in ("hidden_states", "timestep")}

    def model(x, sigma):
        t = torch.tensor([sigma * 1000], dtype=torch.float32)  # what the pipeline passes: float32 t / 1000
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, timestep=t / 1000, **cond)[0]

    cfg = real_config("flux")
    mu = calculate_shift(latents.shape[1], cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                         cfg["max_shift"])
    nodes = fewstep.solvers.intervals_for(fewstep.solvers.get(solver), STEPS)
    ref = fewstep.sample(model, latents, solver, STEPS, mu=mu, sigmas=np.linspace(1, 1 / STEPS, nodes))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_pipeline_with_a_fewstep_scheduler_round_trips_through_save_pretrained(tmp_path):
    pipe, _ = built("flux")
    scheduler = StorkScheduler.from_config(real_config("flux"), order=2, stages=9)
    before, _ = generate("flux", scheduler)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fewstep.diffusers", "StorkScheduler"]
    again = FluxPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is StorkScheduler and again.scheduler.config.stages == 9
    again.set_progress_bar_config(disable=True)
    with torch.no_grad():
        after = again(**tiny.call_kwargs("flux", STEPS)).images
    # The reloaded transformer has bit-identical weights but computes 2.4e-7 apart (loading changes its kernels) ...
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    # ... while the reloaded scheduler, in the original pipeline, reproduces the output exactly.
    assert torch.equal(generate("flux", again.scheduler)[0], before)


@pytest.mark.parametrize("hops", [("UniPCMultistepScheduler",),
                                  ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler"),
                                  ("FlowMatchHeunDiscreteScheduler",)], ids=lambda h: "-".join(h))
def test_sd3_image_survives_switching_schedulers_back_and_forth(hops):
    """SD3: STORK, then from_config through diffusers' flow schedulers (UniPC / DPM-Solver with use_flow_sigmas)
    and back to STORK: the same image, bit for bit (before: back from UniPC it was ε-prediction; the image moved by
    0.57)."""
    import diffusers

    first = StorkScheduler.from_config(real_config("sd3"), order=2)
    before, _ = generate("sd3", first)
    config = first.config
    for hop in hops:
        flow = {} if hop.startswith("FlowMatch") else {"use_flow_sigmas": True}
        config = getattr(diffusers, hop).from_config(config, **flow).config
    after, calls = generate("sd3", StorkScheduler.from_config(config))
    assert calls == STEPS and torch.equal(after, before)
