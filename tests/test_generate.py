"""`fewstep generate` driven as a user would: a subprocess, files on disk, exit codes."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from fewstep.errors import InvalidInput

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

def read_image(path):
    """The image at `path`, loaded and its file closed (PIL keeps a lazily opened file otherwise)."""
    with Image.open(path) as image:
        image.load()
        return image



def fewstep(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fewstep", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def generate_digits(*args, cwd=None):
    """`fewstep generate` on the small digits model (tests of the default model name no --model)."""
    return fewstep("generate", "--model", "digits", *args, cwd=cwd)


@pytest.mark.parametrize("scheduler", ["euler", "linear", "adams2", "heun", "adams4"])
def test_embedded_generation_writes_png_with_metadata(tmp_path, scheduler):
    out = tmp_path / "digit.png"
    steps = "6"
    result = generate_digits("--prompt", "a handwritten seven", "--steps", steps, "--scheduler", scheduler,
                     "--seed", "3", "--output", str(out), "--metadata")
    assert result.returncode == 0, result.stderr
    image = read_image(out)
    assert image.text["prompt"] == "a handwritten seven" and image.text["scheduler"] == scheduler
    assert json.loads(image.text["steps"]) == 6 and json.loads(image.text["seed"]) == 3
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["model"] == "embedded-digits" and sidecar["scheduler_kwargs"] == {}
    assert (sidecar["width"], sidecar["height"]) == image.size  # the image's own size, not the flags' None


def test_same_seed_gives_identical_bytes_and_several_seeds_several_files(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        assert generate_digits("--prompt", "3", "--seed", "11", "--output", str(path)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    result = generate_digits("--prompt", "zero", "--seed", "1", "2", "--output", str(tmp_path / "z_{seed}.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "z_1.png").exists() and (tmp_path / "z_2.png").exists()
    assert (tmp_path / "z_1.png").read_bytes() != (tmp_path / "z_2.png").read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a cat"], "digit"),
    (["--prompt", "7", "--scheduler", "dpm++"], "unknown solver 'dpm++' (--scheduler); available"),
    (["--prompt", "7", "--scheduler", "STORK-2"], "did you mean 'stork-2'?"),  # the name's case, noticed
    (["--prompt", "7", "--steps", "0"], "--steps) must be an integer from 1 to 1000, got 0"),
    (["--prompt", "7", "--scheduler", "heun", "--steps", "5"], "--steps 5: heun cannot make exactly 5"),
    (["--prompt", "7", "--scheduler", "neuralsolver", "--steps", "3"], "--steps 3: solver file"),
    (["--prompt", "7", "--model", "schnell"], "`hf download black-forest-labs/FLUX.1-schnell`"),
    (["--prompt", "7", "--scheduler-kwargs", "{\"stages\": 3}"], "no option 'stages'"),
    (["--prompt", "7", "--scheduler", "stork-4", "--scheduler-kwargs", "{\"order\": 2}"], "contradicts"),
    (["--prompt", "7", "--scheduler", "euler", "--scheduler-kwargs", "{\"order\": 2}"], "no option 'order'"),
    (["--prompt", "7", "--scheduler", "adams", "--scheduler-kwargs", "{\"order\": \"3\"}"],
     "order must be an integer, got '3'"),  # ran adams3 by the text of the number
    (["--prompt", "7", "--scheduler", "adams-denoise", "--scheduler-kwargs", "{\"order\": 2.0}"],
     "--scheduler-kwargs {\"order\": 2.0}: adams-denoise: order must be 2 or 3, got 2.0"),  # was a traceback
])
def test_bad_input_gives_one_clear_line_and_exit_code_2(tmp_path, args, message):
    result = generate_digits(*args, "--output", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_python_api_embedded_model(tmp_path):
    import fewstep as fs

    image = fs.load("digits").generate_image(seed=5, prompt="digit 4", config=fs.Config(num_inference_steps=8))
    path = image.save(tmp_path / "four.png")
    assert read_image(path).size == image.image.size


def test_default_model_is_the_embedded_fashion_model(tmp_path):
    """No --model: the Fashion-MNIST model, its defaults (8 steps, guidance 3), a 28×28 image upscaled for viewing;
    the classifier that ships with it recognises the requested class in the pixels written."""
    import numpy as np
    import torch

    from fewstep.models.fashion import CLASSES, load_classifier

    out = tmp_path / "sneaker.png"
    result = fewstep("generate", "--prompt", "a sneaker", "--seed", "2", "--quiet", "--output", str(out), "--metadata")
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == "embedded-fashion" and meta["steps"] == 8 and meta["guidance"] == 3.0
    grey = np.asarray(read_image(out).convert("L").resize((28, 28), Image.BOX), dtype=np.float32)
    x = torch.from_numpy(grey / 127.5 - 1.0).reshape(1, 1, 28, 28)
    with torch.no_grad():
        assert CLASSES[int(load_classifier()(x).argmax())] == "sneaker"


def test_stork_docs_order_kwarg_picks_the_solver():
    """The STORK docs' `scheduler="stork-2", scheduler_kwargs={"order": 2}` (and bare "stork" + order) run the
    same solver as the plain name: identical pixels."""
    import fewstep as fs

    model = fs.load("digits")

    def pixels(scheduler, kwargs):
        config = fs.Config(num_inference_steps=6, scheduler=scheduler, scheduler_kwargs=kwargs)
        return model.generate_image(seed=2, prompt="5", config=config).image.tobytes()

    plain = pixels("stork-2", {})
    assert pixels("stork-2", {"order": 2}) == plain and pixels("stork", {"order": 2}) == plain
    assert pixels("stork", {}) == pixels("stork-4", {}) != plain
    assert pixels("adams", {}) == pixels("adams2", {})  # a family alone is its default member, as "stork"
    # adams-denoise is no member of the adams family: its `order` is its own option (order 3 differs from order 2)
    default = pixels("adams-denoise", {})
    assert pixels("adams-denoise", {"order": 2}) == default != pixels("adams-denoise", {"order": 3})


def test_neuralsolver_on_the_embedded_model_uses_its_shipped_search():
    """`--scheduler neuralsolver` with no file runs the solver searched for the digits model (shipped in the package),
    not the published SiT table: the same pixels as naming the shipped file, other pixels than naming "sit"."""
    import fewstep as fs
    from fewstep.search import shipped_solver

    model = fs.load("digits")

    def made(kwargs):
        config = fs.Config(num_inference_steps=6, scheduler="neuralsolver", scheduler_kwargs=kwargs)
        return model.generate_image(seed=3, prompt="8", config=config)

    def pixels(kwargs):
        return made(kwargs).image.tobytes()

    shipped = shipped_solver("digits")
    assert shipped is not None and shipped.name == "digits-shift1.json"
    assert pixels({}) == pixels({"solver_file": str(shipped)}) != pixels({"solver_file": "sit"})
    # the metadata names the file that ran (replaying its options without it would run the SiT table)
    recorded = made({}).metadata["solver_options"]
    assert recorded == {"solver_file": "digits-shift1"} and pixels(recorded) == pixels({})


def test_solver_file_of_another_grid_gives_one_warning_line(tmp_path):
    """The shift-3 digits solver used by the embedded model (which samples unshifted): one warning line for two seeds;
    the shift-1 file: none."""
    from fewstep.search import shipped_solver

    for shift, warned in ((3, True), (1, False)):
        kwargs = json.dumps({"solver_file": str(shipped_solver("digits", shift))})
        result = generate_digits("--prompt", "7", "--steps", "6", "--seed", "1", "2", "--scheduler", "neuralsolver",
                                 "--scheduler-kwargs", kwargs, "--output", str(tmp_path / "d.png"), "-q")
        assert result.returncode == 0, result.stderr
        expected = ("fewstep generate: warning: solver file " in result.stderr and "shift-3 grid, sampling asks for "
                    "shift 1" in result.stderr and result.stderr.count("\n") == 1)
        assert expected if warned else result.stderr == "", result.stderr
    # by its shipped name; a step count the file lacks is one error line, not the warning first
    result = generate_digits("--prompt", "7", "--steps", "3", "--scheduler", "neuralsolver", "--scheduler-kwargs",
                             '{"solver_file": "digits-shift3"}', "--output", str(tmp_path / "e.png"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "has no 3-step solver" in result.stderr
    assert not (tmp_path / "e.png").exists()


def test_solvers_command_lists_every_solver():
    from fewstep import solvers

    result = fewstep("solvers")
    assert result.returncode == 0
    for name in solvers.names():
        assert name in result.stdout


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    """A tiny random-weight FluxPipeline with FLUX.1-schnell's scheduler config, saved like a downloaded model."""
    import pipelines as tiny  # tests/pipelines.py

    path = tmp_path_factory.mktemp("models") / "tiny-schnell"
    tiny.flux(tiny.FLUX_SCHNELL).save_pretrained(path)
    return path


def test_model_path_generates_end_to_end_from_the_cli(tmp_path, tiny_schnell):
    out = tmp_path / "out.png"
    result = fewstep("generate", "--model", str(tiny_schnell), "--prompt", "a fox in the snow", "--steps", "4",
                     "--scheduler", "stork-2", "--seed", "42", "--height", "32", "--width", "32", "--output", str(out),
                     "--metadata")
    assert result.returncode == 0, result.stderr
    image = read_image(out)
    assert image.size == (32, 32) and image.text["model"] == str(tiny_schnell)
    assert image.text["scheduler"] == "stork-2" and json.loads(image.text["steps"]) == 4
    assert json.loads(image.text["guidance"]) == 0.0  # schnell-like (no dynamic shifting): no guidance by default
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["seed"] == 42 and sidecar["prompt"] == "a fox in the snow"
    # img2img from the image just written (`--image PATH STRENGTH`)
    again = tmp_path / "again.png"
    result = fewstep("generate", "--model", str(tiny_schnell), "--prompt", "a fox", "--steps", "6", "--image",
                     str(out), "0.5", "--seed", "1", "--height", "32", "--width", "32", "--output", str(again))
    assert result.returncode == 0, result.stderr
    assert json.loads(read_image(again).text["image_strength"]) == 0.5


def test_quiet_on_a_pipeline_prints_nothing(tmp_path, tiny_schnell):
    """-q also silences diffusers' and transformers' loading bars and warnings."""
    result = fewstep("generate", "--model", str(tiny_schnell), "--prompt", "a fox", "--steps", "2", "--height", "32",
                     "--width", "32", "-q", "--output", str(tmp_path / "fox.png"))
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_also_silences_fewsteps_note_on_a_source_clip_sample(quiet):
    """PixArt ships DDIM's config with clip_sample=True, which fewstep does not apply: said once, not under -q (which
    calls quiet_libraries for a pipeline; a fresh interpreter, as the CLI, so the filters do not leak)."""
    code = ("from diffusers import DDIMScheduler\nfrom fewstep.diffusers import FewstepScheduler\n"
            "from fewstep.generate import quiet_libraries\n"
            f"{'quiet_libraries()' if quiet else ''}\nFewstepScheduler.from_config(DDIMScheduler().config)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("clip_sample=True") == (0 if quiet else 1), result.stderr


def test_model_path_python_api_calls_the_transformer_once_per_step(tmp_path, tiny_schnell):
    import numpy as np
    import pipelines as tiny

    import fewstep as fs

    model = fs.load(str(tiny_schnell))
    assert (model.default_steps, model.default_guidance) == (4, 0.0)
    counter = tiny.CallCounter(model.pipe.transformer)
    first = model.generate_image(seed=42, prompt="a fox", config=fs.Config(height=32, width=32, scheduler="stork-2"))
    assert counter.calls == 4 and first.image.size == (32, 32)
    assert type(model.pipe.scheduler).__name__ == "FewstepScheduler" and model.pipe.scheduler.config.solver == "stork-2"
    counter.calls = 0
    second = model.generate_image(seed=42, prompt="a fox", config=fs.Config(height=32, width=32, scheduler="stork-2"))
    assert counter.calls == 4 and np.array_equal(np.asarray(first.image), np.asarray(second.image))
    counter.calls = 0
    path = first.save(tmp_path / "fox.png")
    edited = model.generate_image(seed=1, prompt="a fox", config=fs.Config(
        num_inference_steps=6, height=32, width=32, scheduler="adams2", image_path=str(path), image_strength=0.5))
    assert counter.calls == 3  # strength 0.5 of 6 steps
    assert edited.image.size == (32, 32)
    counter.calls = 0
    with pytest.raises(ValueError, match="neuralsolver cannot start at timestep index 3 of 6"):
        model.generate_image(seed=1, prompt="a fox", config=fs.Config(
            num_inference_steps=6, height=32, width=32, scheduler="neuralsolver", image_path=str(path),
            image_strength=0.5))
    assert counter.calls == 0  # refused before the first model call


def test_a_hub_id_loads_from_the_local_cache(tmp_path, tiny_schnell):
    """owner/name is looked up in the Hugging Face cache (HF_HUB_CACHE), offline: not refused as a missing path."""
    import shutil

    snapshot = tmp_path / "hub" / "models--tiny--schnell" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_schnell, snapshot)
    (tmp_path / "hub" / "models--tiny--schnell" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--schnell" / "refs" / "main").write_text("0" * 40)
    out = tmp_path / "out.png"
    result = subprocess.run([sys.executable, "-m", "fewstep", "generate", "--model", "tiny/schnell", "--prompt",
                             "a fox", "--steps", "2", "--height", "32", "--width", "32", "-q", "--output", str(out)],
                            capture_output=True, text=True, env={**ENV, "HF_HUB_CACHE": str(tmp_path / "hub")},
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert read_image(out).size == (32, 32)


def test_a_pipeline_folder_missing_a_component_is_refused_in_one_line(tmp_path, tiny_schnell):
    import shutil

    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_schnell, broken)
    shutil.rmtree(broken / "tokenizer_2")  # transformers would build an empty tokenizer and ignore the prompt
    result = fewstep("generate", "--model", str(broken), "--prompt", "a fox", "--steps", "2", "--output",
                     str(tmp_path / "x.png"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "has no tokenizer_2 folder (model_index.json lists it)" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_nan_pixels_from_a_pipeline_are_an_error_not_a_black_image(tiny_schnell):
    import fewstep as fs
    from fewstep.errors import NonFiniteError

    model = fs.load(tiny_schnell)  # a Path is a path
    model.pipe.transformer.register_forward_hook(lambda module, args, out: (out[0] * float("nan"),))
    with pytest.raises(NonFiniteError, match="produced NaN or Inf pixels \\(seed 3"):
        model.generate_image(seed=3, prompt="a fox", config=fs.Config(num_inference_steps=2, height=32, width=32))


def test_pipeline_config_and_img2img_problems_name_their_source(tmp_path):
    import pipelines as tiny
    from diffusers import FlowMatchEulerDiscreteScheduler

    import fewstep as fs
    from fewstep.generate import DiffusersModel

    flux = tiny.flux()
    flux.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with pytest.raises(InvalidInput, match="--model tiny: scheduler/scheduler_config.json: stochastic_sampling=True"):
        DiffusersModel(flux, "tiny", 2, 1.0).generate_image(seed=1, prompt="x")
    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (90, 20, 200)).save(picture)
    pixart = DiffusersModel(tiny.pixart_sigma(), "tiny-pixart", 2, 1.0)
    with pytest.raises(InvalidInput, match="--image: PixArtSigmaPipeline has no image-to-image pipeline"):
        pixart.generate_image(seed=1, prompt="x", config=fs.Config(image_path=str(picture), image_strength=0.5))


@pytest.mark.parametrize("build,predictions_per_step,options", [
    ("flux", 1, {"corrector": False}),  # FLUX.1 takes guidance as an input of one call (or ignores it)
    ("sd3", 2, {"corrector": False, "stiff_fallback": True}),  # classifier-free: two predictions combined
    ("qwen_image", 2, {"corrector": False, "stiff_fallback": True}),  # true CFG, with the negative prompt it needs
])
def test_the_stiffness_fallback_is_for_classifier_free_guidance_only(build, predictions_per_step, options):
    """docs/solvers.md, "Strong guidance": at guidance 4.5 the corrector goes; the fallback only where the guidance
    is classifier-free, which the predictions per step show (SD3 batches its two; Qwen-Image makes two calls, and ran
    no CFG before generate passed the negative prompt it needs)."""
    import pipelines as tiny

    import fewstep as fs
    from fewstep.generate import DiffusersModel

    pipe = getattr(tiny, build)()
    counter = tiny.CallCounter(pipe.transformer)
    model = DiffusersModel(pipe, "tiny", 2, 4.5)
    model.progress = False
    made = model.generate_image(seed=1, prompt="x", config=fs.Config(height=16, width=16))
    assert made.metadata["solver_options"] == options
    assert counter.calls * len(counter.last_kwargs["hidden_states"]) == 2 * predictions_per_step  # 2 steps


@pytest.mark.parametrize("mode,values,top", [("I;16", [0, 1000, 30000, 65535], 65535), ("F", [0.0, 0.25, 0.5, 1.0], 1)])
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, mode, values, top):
    import numpy as np

    from fewstep.generate import read_image as read_input

    array = np.repeat(np.array(values, dtype=np.uint16 if mode == "I;16" else np.float32)[None, :], 4, axis=0)
    path = tmp_path / ("in.png" if mode == "I;16" else "in.tiff")
    Image.fromarray(array).save(path)  # uint16: mode I;16, float32: mode F
    grey = np.asarray(read_input(path).convert("L"))[0]
    assert grey.tolist() == [round(v / top * 255) for v in values]


@pytest.mark.parametrize("model_name", ["digits", "fashion"])
def test_img2img_reads_a_16_bit_copy_of_an_image_as_the_8_bit_one(tmp_path, model_name):
    """The embedded models' img2img input goes through read_image's scaling: the fashion model reopened the raw file,
    so a 16-bit copy of a picture came out nearly white (mean pixel 210 instead of 71)."""
    import numpy as np

    import fewstep as fs

    grey = np.random.default_rng(0).integers(0, 256, size=(28, 28)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "in8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "in16.png")
    model = fs.load(model_name)
    model.progress = False
    prompt = "a dress" if model_name == "fashion" else "3"
    made = [np.asarray(model.generate_image(seed=5, prompt=prompt, config=fs.Config(
        num_inference_steps=4, image_path=str(tmp_path / name), image_strength=0.3)).image) for name in
        ("in8.png", "in16.png")]
    assert np.array_equal(made[0], made[1])


@pytest.mark.parametrize("prompt", [None, 7])
def test_a_prompt_that_is_no_string_is_invalid_input(prompt):
    import fewstep as fs

    with pytest.raises(InvalidInput, match="prompt \\(--prompt\\) must be a string"):
        fs.load("digits").generate_image(seed=1, prompt=prompt)


def test_numpy_numbers_are_accepted_where_python_numbers_are():
    import numpy as np

    import fewstep as fs

    model = fs.load("digits")
    plain = model.generate_image(seed=5, prompt="4", config=fs.Config(num_inference_steps=4, guidance=2.0))
    numpy = model.generate_image(seed=np.int64(5), prompt="4", config=fs.Config(
        num_inference_steps=np.int64(4), guidance=np.float32(2.0)))
    assert numpy.image.tobytes() == plain.image.tobytes()
    assert json.dumps(numpy.metadata)  # plain ints and floats in the metadata


@pytest.mark.parametrize("guidance,chosen", [(1.0, {}), (2.0, {}), (3.0, {"stiff_fallback": True}),
                                             (5.0, {"corrector": False, "stiff_fallback": True})])
def test_strong_guidance_turns_adams_denoise_corrector_off_unless_it_was_chosen(guidance, chosen):
    import numpy as np

    from fewstep.generate import Config, EmbeddedModel

    model = EmbeddedModel(kind="digits")
    model.progress = False

    def pixels(**kwargs):
        made = model.generate_image(seed=3, prompt="7", config=Config(num_inference_steps=5, guidance=guidance,
                                                                       scheduler_kwargs=kwargs))
        return np.asarray(made.image), made.metadata["solver_options"]

    default, options = pixels()
    assert options == chosen  # embedded models: classifier-free; the fallback from 3, no corrector from 4
    assert np.array_equal(default, pixels(**chosen)[0])
    corrector = chosen.get("corrector", True)
    assert not np.array_equal(default, pixels(corrector=not corrector)[0])
    # the user's choice stands; with classifier-free guidance ≥ 3 the fallback then guards the corrector too
    assert pixels(corrector=True)[1] == {**chosen, "corrector": True}
    no_fallback = {k: v for k, v in chosen.items() if k != "stiff_fallback"}  # its bounds are order 2's
    assert pixels(order=3)[1] == {**no_fallback, "order": 3}
    # the fallback needs the corrector's guard: a given corrector_guard=False keeps it off, unless there is no corrector
    unguarded = pixels(corrector_guard=False)[1]
    assert unguarded == {**(no_fallback if guidance < 4 else chosen), "corrector_guard": False}
