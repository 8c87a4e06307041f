"""`fewstep generate` driven as a user would: a subprocess, files on disk, exit codes."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def fewstep(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fewstep", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("scheduler", ["euler", "linear", "adams2", "heun", "adams4"])
def test_embedded_generation_writes_png_with_metadata(tmp_path, scheduler):
    out = tmp_path / "digit.png"
    steps = "6"
    result = fewstep("generate", "--prompt", "a handwritten seven", "--steps", steps, "--scheduler", scheduler,
                     "--seed", "3", "--output", str(out), "--metadata")
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.text["prompt"] == "a handwritten seven" and image.text["scheduler"] == scheduler
    assert json.loads(image.text["steps"]) == 6 and json.loads(image.text["seed"]) == 3
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["model"] == "embedded-digits" and sidecar["scheduler_kwargs"] == {}


def test_same_seed_gives_identical_bytes_and_several_seeds_several_files(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        assert fewstep("generate", "--prompt", "3", "--seed", "11", "--output", str(path)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    result = fewstep("generate", "--prompt", "zero", "--seed", "1", "2", "--output", str(tmp_path / "z_{seed}.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "z_1.png").exists() and (tmp_path / "z_2.png").exists()
    assert (tmp_path / "z_1.png").read_bytes() != (tmp_path / "z_2.png").read_bytes()


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a cat"], "digit"),
    (["--prompt", "7", "--scheduler", "dpm++"], "unknown solver 'dpm++'; available"),
    (["--prompt", "7", "--steps", "0"], "positive integer"),
    (["--prompt", "7", "--scheduler", "heun", "--steps", "5"], "cannot make exactly 5"),
    (["--prompt", "7", "--model", "schnell"], "huggingface-cli download black-forest-labs/FLUX.1-schnell"),
    (["--prompt", "7", "--scheduler-kwargs", "{\"stages\": 3}"], "no option 'stages'"),
])
def test_bad_input_gives_one_clear_line_and_exit_code_2(tmp_path, args, message):
    result = fewstep("generate", *args, "--output", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_python_api_embedded_model(tmp_path):
    import fewstep as fs

    image = fs.load().generate_image(seed=5, prompt="digit 4", config=fs.Config(num_inference_steps=8))
    path = image.save(tmp_path / "four.png")
    assert Image.open(path).size == image.image.size


def test_solvers_command_lists_every_solver():
    from fewstep import solvers

    result = fewstep("solvers")
    assert result.returncode == 0
    for name in solvers.names():
        assert name in result.stdout
