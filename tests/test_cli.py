"""The `fewstep` command under hostile input: every case ends in one line on stderr naming the flag or file, exit code
2 (130 for Ctrl-C, 141 for a closed stdout), no traceback and no damaged or partial file — or in a correct result.

Most cases run the CLI in-process (`fewstep.cli.main`); a subprocess only where the process itself matters (imports,
a closed stdout)."""

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.cli import main
from fewstep.errors import InputFileError, InvalidInput
from fewstep.files import atomic_write
from fewstep.generate import Config, EmbeddedModel, load, mflux_strength
from fewstep.sampling import make_plan
from fewstep.solvers.neuralsolver import SolverFile
from fewstep.solvers.plan import StepCountError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)

def read_image(path):
    """The image at `path`, loaded and its file closed (PIL keeps a lazily opened file otherwise)."""
    with Image.open(path) as image:
        image.load()
        return image



def fewstep(capsys, *args):
    """(exit code, stdout, stderr) of `fewstep ARGS` run in this process."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, *args):
    """`fewstep generate` on the small digits model (the default model is fashion; these tests are about the CLI)."""
    return fewstep(capsys, "generate", "--model", "digits", *args)


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def inputs(tmp_path):
    """Hostile input files in their own folder: a text file, a truncated PNG, a directory, a FIFO, a good digit."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "notes.png").write_text("not an image\n")
    good = folder / "good.png"
    model = EmbeddedModel(kind="digits")
    model.progress = False
    model.generate_image(1, "3", Config(num_inference_steps=4)).save(good)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    (folder / "adir").mkdir()
    os.mkfifo(folder / "fifo.png")
    return folder


# --- generate: every bad value is refused before anything is written -----------------------------------------------

def test_heun_img2img_entering_at_its_second_stage_says_so_once(capsys, tmp_path, inputs):
    """Strength 0.5 of 6 calls (mflux's meaning: skip int(6·0.5) = 3 calls) is call 3, Heun's second stage of its step
    from σ = 0.5: one warning line, the image written; strength 0.4 (skip 2) enters at a node and says nothing."""
    code, _, err = generate(capsys, "--prompt", "7", "--scheduler", "heun", "--steps", 6, "--image",
                            inputs / "good.png", "0.5", "-q", "--output", tmp_path / "a.png")
    assert code == 0 and (tmp_path / "a.png").is_file()
    assert err.count("fewstep generate: warning: heun: call 3 of 6 is the second stage") == 1 and len(
        err.splitlines()) == 1, err
    code, _, err = generate(capsys, "--prompt", "7", "--scheduler", "heun", "--steps", 6, "--image",
                            inputs / "good.png", "0.4", "-q", "--output", tmp_path / "b.png")
    assert code == 0 and err == ""


@pytest.mark.parametrize(("args", "fragments"), [
    (["--guidance", "nan"], ["--guidance", "finite", "nan"]),
    (["--guidance", "inf"], ["--guidance", "finite"]),
    (["--guidance", "-1"], ["--guidance", "≥ 0", "got -1"]),
    (["--guidance", "1e308"], ["model output is not finite", "guidance 1e+308", "lower --guidance"]),
    (["--seed", "1", "-1"], ["--seed", "0 to 2**32-1", "got -1"]),
    (["--seed", str(2**64)], ["--seed", str(2**64)]),
    (["--seed", str(2**32 + 5)], ["--seed", "0 to 2**32-1"]),  # torch's CPU generator would draw seed 5's noise
    (["--steps", "0"], ["--steps", "from 1 to 1000", "got 0"]),
    (["--steps", "100000"], ["--steps", "from 1 to 1000"]),
    (["--height", "0"], ["--height", "from 1 to 4096", "got 0"]),
    (["--width", "0"], ["--width", "got 0"]),
    (["--height", "1000000", "--width", "1000000"], ["--height", "4096"]),
    (["--model", "schnel"], ["--model", "did you mean 'schnell'?"]),
    (["--model", "./no/such/model"], ["--model ./no/such/model: no such directory"]),
    (["--scheduler", "neuralsolver", "--scheduler-kwargs", '{"solver_file": 5}'], ["solver_file must be", "got 5"]),
    (["--scheduler", "stork2"], ["--scheduler", "did you mean 'stork-2'?"]),
    (["--scheduler", "stork-4", "--scheduler-kwargs", '{"stagez": 9}'], ["no option 'stagez'", "'stages'?"]),
    (["--scheduler", "stork-4", "--scheduler-kwargs", '{"stages": 100000}'], ["--scheduler-kwargs", "stages"]),
    (["--scheduler", "heun", "--steps", "5"], ["heun cannot make exactly 5 model calls"]),
    (["--prompt", "a cat"], ["cannot draw 'a cat'"]),
    (["--steps", "abc"], ["argument --steps", "invalid int value: 'abc'", "fewstep generate --help"]),  # argparse's
    (["--scheduler-kwargs"], ["argument --scheduler-kwargs", "expected one argument"]),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "mps"], ["--device", "no"]),
])
def test_bad_values_are_one_line_errors_and_nothing_is_written(capsys, tmp_path, args, fragments):
    if "--prompt" not in args:
        args = ["--prompt", "7", *args]
    code, out, err = generate(capsys, *args, "--quiet", "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, *fragments)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(("name", "fragments"), [
    ("notes.png", ["not a readable image"]),
    ("truncated.png", ["not a readable image"]),
    ("adir", ["is a directory"]),
    ("fifo.png", ["not a regular file"]),  # checked before opening: reading a FIFO would hang
    ("missing.png", ["no such file"]),
])
def test_bad_input_images_are_refused_by_name(capsys, tmp_path, inputs, name, fragments):
    path = inputs / name
    for flags in (["--image", path], ["--image-path", path]):
        code, _, err = generate(capsys, "--prompt", "7", *flags, "-q", "--output", tmp_path / "x.png")
        assert_one_line_error(code, err, f"{flags[0]} {path}", *fragments)
    assert files_in(tmp_path) == ["inputs"]


@pytest.mark.parametrize(("args", "fragments"), [
    (["--image", "{good}", "0.5", "0.3"], ["--image takes PATH and optionally STRENGTH, got 3 values"]),
    (["--image", "{good}", "--image-strength", "0.5"], ["not both"]),
    (["--image", "{good}", "--image-path", "{good}"], ["not both"]),
    (["--image-path", "{good}", "--strength", "0.5"], ["not both"]),
    (["--image", "{good}", "0.5", "--strength", "0.5"], ["give the strength once"]),
    (["--strength", "0.5"], ["--strength needs --image"]),
    (["--image", "{good}", "--strength", "0"], ["--strength must be a number in (0, 1]"]),
    (["--image", "{good}", "--strength", "nan"], ["(0, 1]", "nan"]),
    (["--image-strength", "0.5"], ["--image-strength needs --image-path"]),
    (["--image", "{good}", "1.5"], ["--image STRENGTH 1.5 with 8 steps leaves no step"]),  # mflux clamps to 1
    (["--image", "{good}", "nan"], ["--image STRENGTH", "finite", "nan"]),
    (["--image", "{good}", "0"], ["--image STRENGTH", "above 0", "mflux ignores the image"]),
    (["--image", "{good}", "much"], ["--image STRENGTH must be a number"]),
    (["--image-path", "{good}", "--image-strength", "1"], ["--image-strength 1 with 8 steps leaves no step"]),
    (["--image", "{good}", "--steps", "1"], ["--steps 1 leaves no step to run from an input image", "--steps 2"]),
    (["--image-path", "{good}", "--image-strength", "-1"], ["--image-strength", "above 0 and below 1", "got -1"]),
    (["--image", "{good}", "0.5", "--scheduler", "neuralsolver", "--steps", "6"],
     ["neuralsolver cannot start at timestep index 3 of 6"]),  # a searched grid runs only in full
])
def test_img2img_flag_mistakes(capsys, tmp_path, inputs, args, fragments):
    args = [a.format(good=inputs / "good.png") for a in args]
    code, _, err = generate(capsys, "--prompt", "7", *args, "-q", "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, *fragments)
    assert files_in(tmp_path) == ["inputs"]


def test_an_output_over_the_input_image_is_refused(capsys, inputs):
    good = inputs / "good.png"
    before = good.read_bytes()
    link = inputs / "link.png"
    link.symlink_to(good)
    for output in (good, link):  # the same file by another name
        code, _, err = generate(capsys, "--prompt", "7", "--image", good, "-q", "--output", output)
        assert_one_line_error(code, err, f"--output {output}: that is the input image (--image {good})")
    assert good.read_bytes() == before


def test_mflux_strength_runs_mflux_step_count():
    """mflux starts at step max(1, int(steps·S)); the diffusers strength returned starts diffusers' get_timesteps
    (t_start = int(N − min(N·d, N))) at the same step."""
    for steps in range(1, 60):
        for s in np.linspace(0.0, 1.0, 41)[1:]:
            skipped = max(1, int(steps * min(s, 1.0)))
            if skipped >= steps:
                with pytest.raises(InvalidInput, match="leaves no step"):
                    mflux_strength(s, steps)
                continue
            d = mflux_strength(s, steps)
            assert 0 < d <= 1 and int(max(steps - min(steps * d, steps), 0)) == skipped, (steps, s, d)
            assert abs(d - (steps - skipped) / steps) < 1e-12
    assert mflux_strength(0.25, 8) == 0.75 and mflux_strength(0.01, 8) == 7 / 8  # mflux skips at least one step
    for s in (0.0, -3.0):  # at 0 mflux ignores the image (not img2img); a negative strength is a mistake
        with pytest.raises(InvalidInput, match="above 0 and below 1"):
            mflux_strength(s, 8)
    with pytest.raises(InvalidInput, match="finite"):
        mflux_strength(math.nan, 8)


def test_mflux_and_diffusers_strength_flags_give_the_same_image(capsys, tmp_path, inputs):
    good = inputs / "good.png"
    common = ["generate", "--model", "digits", "--prompt", "5", "--steps", "8", "--seed", "4", "-q"]
    assert fewstep(capsys, *common, "--image-path", good, "--image-strength", "0.25", "-o", tmp_path / "m.png")[0] == 0
    assert fewstep(capsys, *common, "--image", good, "0.25", "-o", tmp_path / "d.png")[0] == 0  # mflux's --image
    assert fewstep(capsys, *common, "--image", good, "--strength", "0.75", "-o", tmp_path / "s.png")[0] == 0
    pixels = [np.asarray(read_image(tmp_path / f"{n}.png")) for n in "mds"]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[1], pixels[2])
    assert json.loads(read_image(tmp_path / "m.png").text["image_strength"]) == 0.75


def test_seeds_are_all_checked_before_any_image_is_written(capsys, tmp_path):
    code, _, err = generate(capsys, "--prompt", "7", "--seed", "1", "2", str(2**64), "-q",
                           "--output", tmp_path / "d_{seed}.png")
    assert_one_line_error(code, err, "--seed")
    assert files_in(tmp_path) == []


# --- generate: outputs ---------------------------------------------------------------------------------------------

def test_special_files_are_never_replaced(capsys, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    link = tmp_path / "null.png"
    link.symlink_to(os.devnull)
    for target, kind in ((fifo, "is a FIFO"), (link, "is a character device")):
        code, _, err = generate(capsys, "--prompt", "7", "-q", "--output", target)
        assert_one_line_error(code, err, f"--output {target}", kind)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    # /dev/null itself (as root the rename would succeed): refused before any temporary file is made in /dev
    before = sorted(os.listdir("/dev"))
    with pytest.raises(InputFileError, match="character device"):
        atomic_write(os.devnull, b"image")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode) and sorted(os.listdir("/dev")) == before
    with pytest.raises(InputFileError, match="is a directory"):
        atomic_write(tmp_path, b"image")
    assert files_in(tmp_path) == ["null.png", "pipe.png"]


def test_a_link_to_nothing_is_refused_and_nothing_is_created_where_it_points(capsys, tmp_path):
    target = tmp_path / "elsewhere" / "deeper" / "x.png"
    link = tmp_path / "dangling.png"
    link.symlink_to(target)
    code, _, err = generate(capsys, "--prompt", "7", "-q", "--output", link)
    assert_one_line_error(code, err, f"--output {link} is a symbolic link", "does not exist")
    assert files_in(tmp_path) == ["dangling.png"] and not (tmp_path / "elsewhere").exists()
    existing = tmp_path / "real.png"
    existing.write_bytes(b"old")
    link.unlink()
    link.symlink_to(existing)  # a link to an existing file is written through, the link kept
    code, _, err = generate(capsys, "--prompt", "7", "-q", "--output", link)
    assert code == 0 and link.is_symlink() and existing.read_bytes()[:4] == b"\x89PNG"


def test_official_stork_at_two_calls_is_a_step_count_error_in_one_line(capsys, tmp_path):
    code, _, err = generate(capsys, "--prompt", "7", "-q", "--scheduler", "stork-2", "--steps", "2",
                           "--scheduler-kwargs", '{"compat": "official"}', "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, "stork-2 cannot make exactly 2 model calls; it can make 3")
    assert files_in(tmp_path) == []
    with pytest.raises(StepCountError):
        make_plan("stork-4", steps=2, compat="official")


def test_read_only_output_is_refused_and_kept(capsys, tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    target.chmod(0o444)
    code, _, err = generate(capsys, "--prompt", "7", "-q", "--output", target)
    assert_one_line_error(code, err, f"--output {target} is read-only")
    assert target.read_bytes() == b"precious" and files_in(tmp_path) == ["keep.png"]
    with pytest.raises(InputFileError, match="read-only"):
        atomic_write(target, b"x")
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize(("output", "fragments"), [
    ("x.txt", ["--output", "unknown image format '.txt'"]),
    ("x.json", ["--output", "unknown image format '.json'"]),  # with --metadata it would be its own sidecar
    ("noext", ["unknown image format '(no suffix)'"]),
    ("file.png/x.png", ["--output", "file.png/x.png", "cannot write there"]),
    ("", ["--output is empty"]),
])
def test_odd_output_paths(capsys, tmp_path, output, fragments):
    (tmp_path / "file.png").write_bytes(b"a file, not a folder")
    code, _, err = generate(capsys, "--prompt", "7", "-q", "--metadata", "--output",
                           tmp_path / output if output else "")
    assert_one_line_error(code, err, *fragments)
    assert files_in(tmp_path) == ["file.png"] and (tmp_path / "file.png").read_bytes() == b"a file, not a folder"


def test_unwritable_folder_is_refused_before_sampling(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(EmbeddedModel, "generate_image", lambda *a, **k: calls.append(1))
    code, _, err = generate(capsys, "--prompt", "7", "-q", "--output", "/proc/fewstep-test.png")
    assert_one_line_error(code, err, "--output /proc/fewstep-test.png")
    assert calls == []


def test_metadata_sidecar_sits_next_to_the_image(capsys, tmp_path):
    code, out, _ = generate(capsys, "--prompt", "7", "--steps", "4", "--metadata", "--output",
                           tmp_path / "d.png")
    assert code == 0 and out == f"wrote {tmp_path / 'd.png'}\n"
    assert read_image(tmp_path / "d.png").format == "PNG"
    assert json.loads((tmp_path / "d.json").read_text())["steps"] == 4


@pytest.mark.parametrize(("suffix", "image_format"), [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"),
                                                      (".png", "PNG")])
def test_output_format_follows_the_suffix(capsys, tmp_path, suffix, image_format):
    out = tmp_path / f"d{suffix}"
    assert generate(capsys, "--prompt", "2", "--steps", "4", "-q", "--output", out)[0] == 0
    assert read_image(out).format == image_format and files_in(tmp_path) == [out.name]


def test_output_directory_gets_seed_named_files(capsys, tmp_path):
    assert generate(capsys, "--prompt", "2", "--steps", "4", "--seed", "5", "-q",
                   "--output", f"{tmp_path / 'new'}/")[0] == 0
    assert files_in(tmp_path / "new") == ["image_5.png"]
    assert generate(capsys, "--prompt", "2", "--steps", "4", "--seed", "6", "7", "-q",
                   "--output", tmp_path / "new")[0] == 0
    assert files_in(tmp_path / "new") == ["image_5.png", "image_6.png", "image_7.png"]


def test_ctrl_c_exits_130_without_traceback_or_partial_file(capsys, tmp_path, monkeypatch):
    target = tmp_path / "old.png"
    target.write_bytes(b"previous image")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("fewstep.files.os.replace", interrupted)  # Ctrl-C in the middle of writing
    code, _, err = generate(capsys, "--prompt", "7", "--steps", "4", "-q", "--metadata", "--output", target)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert files_in(tmp_path) == ["old.png"] and target.read_bytes() == b"previous image"


def test_only_fewstep_errors_become_exit_2(capsys, tmp_path, monkeypatch):
    """A ValueError from a bug is not a user error: it keeps its traceback."""
    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(EmbeddedModel, "generate_image", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["generate", "--model", "digits", "--prompt", "7", "-q", "--output", str(tmp_path / "x.png")])


def test_quiet_prints_nothing_and_embedded_model_uses_one_thread(capsys, tmp_path):
    torch.set_num_threads(2)
    code, out, err = generate(capsys, "--prompt", "7", "--quiet", "--device", "cpu", "--output",
                             tmp_path / "q.png")
    assert (code, out, err) == (0, "", "") and torch.get_num_threads() == 1
    code, out, err = generate(capsys, "--prompt", "7", "--output", tmp_path / "p.png")
    assert code == 0 and out.startswith("wrote") and "call" in err  # the progress bar without --quiet
    assert np.array_equal(np.asarray(read_image(tmp_path / "q.png")), np.asarray(read_image(tmp_path / "p.png")))


def test_python_api_refuses_zero_instead_of_using_defaults():
    model = load("digits")
    for config, fragment in ((Config(num_inference_steps=0), "num_inference_steps"), (Config(height=0), "height"),
                             (Config(width=0), "width"), (Config(guidance=math.nan), "guidance")):
        with pytest.raises(InvalidInput, match=fragment):
            model.generate_image(1, "7", config)
    with pytest.raises(InvalidInput, match="seed"):
        model.generate_image(-1, "7")
    assert model.generate_image(1, "7", Config(height=16, width=24)).image.size == (24, 16)


# --- solver files ----------------------------------------------------------------------------------------------------

GOOD = SolverFile("flow", {2: (np.array([0.4, 0.6]), np.array([[1.0, 0.0], [-0.5, 1.5]]))}).to_json()


def _solver_file(tmp_path, name="s.json", **changes):
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _step(dt, m):
    return {"2": {"timedeltas": dt, "matrix": m}}


@pytest.mark.parametrize(("changes", "fragments"), [
    ({"prediction": None}, ["missing or malformed field 'prediction'"]),
    ({"steps": {"2": {"timedeltas": [0.4, 0.6]}}}, ["missing or malformed field 'matrix'"]),
    ({"steps": [1, 2]}, ["missing or malformed field 'steps'"]),
    ({"steps": _step([0.4, float("nan")], [[1, 0], [-0.5, 1.5]])}, ["non-finite"]),
    ({"steps": _step([0.4, 0.6], [[1, 0], [float("nan"), 1]])}, ["non-finite"]),
    ({"steps": {"0": {"timedeltas": [], "matrix": []}}}, ["step count 0 must be an integer from 1"]),
    ({"steps": {"two": GOOD["steps"]["2"]}}, ["step count 'two' is not a positive integer"]),
    ({"steps": _step([0.2, 0.2], [[1, 0], [-0.5, 1.5]])}, ["timedeltas sum to 0.4", "not to 0"]),
    ({"steps": _step([1.0, 1.0], [[1, 0], [-0.5, 1.5]])}, ["timedeltas sum to 2", "not to 0"]),
    ({"start": 2}, ["start is 2", "σ = 1"]),
    ({"start": "one"}, ["start must be a number"]),
    ({"steps": _step([0.4, 0.6], [[1.0], [-0.5, 1.5]])}, ["matrix is not a rectangular array"]),
    ({"steps": _step([0.4, 0.6], [[1, 0], [-0.5, 1.4]])}, ["row 1 sums to 0.9"]),
])
def test_bad_solver_files_name_the_file_and_field(capsys, tmp_path, changes, fragments):
    path = _solver_file(tmp_path, **changes)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = generate(capsys, "--prompt", "7", "--steps", "2", "--scheduler", "neuralsolver",
                           "--scheduler-kwargs", json.dumps({"solver_file": str(path)}), "-q",
                           "--output", out / "x.png")
    assert_one_line_error(code, err, f"solver file {path}", *fragments)
    assert files_in(out) == []
    with pytest.raises(InvalidInput):
        SolverFile.load(path)


@pytest.mark.parametrize(("content", "fragments"), [
    (bytes(range(256)) * 4, ["not a text file"]),
    (b"{", ["not valid JSON"]),
    (b"[1, 2]", ["expected a JSON object"]),
    (None, ["not a regular file"]),  # a FIFO: refused before opening, never read
])
def test_unreadable_solver_files(capsys, tmp_path, content, fragments):
    path = tmp_path / "s.json"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    code, _, err = generate(capsys, "--prompt", "7", "--steps", "2", "--scheduler", "neuralsolver",
                           "--scheduler-kwargs", json.dumps({"solver_file": str(path)}), "-q",
                           "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, f"solver file {path}", *fragments)
    assert files_in(tmp_path) == ["s.json"]


def test_good_solver_file_and_a_step_count_it_lacks(capsys, tmp_path):
    path = _solver_file(tmp_path)
    kwargs = json.dumps({"solver_file": str(path)})
    code, _, err = generate(capsys, "--prompt", "7", "--steps", "3", "--scheduler", "neuralsolver",
                           "--scheduler-kwargs", kwargs, "-q", "--output", tmp_path / "x.png")
    assert_one_line_error(code, err, f"solver file {path} has no 3-step solver; it has 2 steps")
    assert generate(capsys, "--prompt", "7", "--steps", "2", "--scheduler", "neuralsolver",
                   "--scheduler-kwargs", kwargs, "-q", "--output", tmp_path / "x.png")[0] == 0
    assert files_in(tmp_path) == ["s.json", "x.png"]
    with pytest.raises(FileNotFoundError, match="no solver file"):  # still a FileNotFoundError for library callers
        SolverFile.load(tmp_path / "missing.json")


def test_shipped_solver_files_still_load():
    for name, steps in (("sit", 10), ("flowdcn", 15), ("dit", 10)):
        assert steps in SolverFile.load(name).steps


# --- search ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "fragments"), [
    (["--batch", "0"], ["--batch must be an integer from 1"]),
    (["--iterations", "-1"], ["--iterations must be an integer from 1"]),
    (["--iterations", "0"], ["--iterations"]),
    (["--steps", "1"], ["--steps must be integers from 2"]),
    (["--lr", "nan"], ["--lr must be a positive number"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", str(2**32)], ["--seed"]),
])
def test_search_refuses_values_that_would_write_an_unsearched_solver(capsys, tmp_path, args, fragments):
    code, _, err = fewstep(capsys, "search", "--problem", "gmm2d", "--out", tmp_path / "s.json", *args)
    assert_one_line_error(code, err, *fragments)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(("args", "fragments"), [
    (["--model", ":velocity", "--shape", "8"], ["--model ':velocity'", "module:function"]),  # was "Empty module name"
    (["--model", "mymodel:", "--shape", "8"], ["--model 'mymodel:'", "module:function"]),
    (["--model", "mymodel:f", "--shape", "99999999999"], ["--shape must be positive integers"]),
    (["--model", "mymodel:f", "--shape", "100000,100000"], ["--shape", "10,000,000,000 numbers per sample"]),
    (["--model", "digits", "--mu", "100"], ["--mu", "from -50 to 50"]),  # was a "diverged" search blaming --lr
])
def test_search_refuses_a_malformed_velocity_spec_or_shape_in_one_line(capsys, tmp_path, args, fragments):
    code, _, err = fewstep(capsys, "search", "--steps", "4", "--out", tmp_path / "s.json", *args)
    assert_one_line_error(code, err, *fragments)
    assert files_in(tmp_path) == []


def test_search_checks_its_output_before_searching(capsys, tmp_path, monkeypatch):
    from fewstep import search as search_module

    monkeypatch.setattr(search_module, "search", lambda *a, **k: pytest.fail("searched before checking --out"))
    (tmp_path / "ro.json").write_text("{}")
    (tmp_path / "ro.json").chmod(0o444)
    for out, fragment in ((f"{tmp_path}/", "names a directory"), (tmp_path, "names a directory"),
                          (tmp_path / "ro.json", "read-only"), ("/proc/x/s.json", "--out /proc/x/s.json")):
        for flag in ("--out", "--output", "-o"):  # generate's spelling is accepted too
            code, _, err = fewstep(capsys, "search", "--problem", "gmm2d", flag, out)
            assert_one_line_error(code, err, fragment)
    assert files_in(tmp_path) == ["ro.json"]


# --- the command itself ----------------------------------------------------------------------------------------------

def test_help_and_version_load_no_torch():
    code = ("import sys\nfrom fewstep.cli import main\nassert main(['--help']) == 0\nassert main(['--version']) == 0\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "[]" and "fewstep 0.1.0" in lines and "generate" in result.stdout


def test_unknown_command_gets_a_suggestion(capsys):
    code, _, err = fewstep(capsys, "generat", "--prompt", "7")
    assert_one_line_error(code, err, "unknown command 'generat'; did you mean 'generate'?")


def test_closed_stdout_is_a_quiet_exit():
    """`fewstep solvers | head -1` where head has gone: no traceback, no 'Exception ignored', exit 141."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        result = subprocess.run([sys.executable, "-m", "fewstep", "solvers", "--options"], stdout=write,
                                stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == ""
    piped = subprocess.run(f"'{sys.executable}' -m fewstep solvers | head -1", shell=True, capture_output=True,
                           text=True, env=ENV, timeout=120)
    assert piped.stdout.startswith("solver") and piped.stdout.count("\n") == 1 and piped.stderr == ""


def test_bench_help_names_every_problem_it_accepts(capsys):
    from fewstep.bench.problems import PROBLEMS

    code, out, _ = fewstep(capsys, "bench", "--help")
    text = " ".join(out.split()).replace("- ", "-")  # argparse may wrap a line after a name's hyphen
    assert code == 0
    assert all(name in text for name in PROBLEMS), [n for n in PROBLEMS if n not in text]


def test_search_refuses_flags_its_model_cannot_use_and_finds_module_velocities_in_the_current_folder(
        capsys, tmp_path, monkeypatch):
    for args, fragment in ((("--model", "digits", "--shape", "4"), "--shape applies to a module:function"),
                           (("--problem", "gmm8d", "--height", "64"), "--height applies to a diffusers pipeline")):
        code, _, err = fewstep(capsys, "search", *args, "--out", tmp_path / "a.json")
        assert_one_line_error(code, err, fragment)
    (tmp_path / "here_flows.py").write_text("def velocity(x, sigma):\n    return x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    code, _, err = fewstep(capsys, "search", "--model", "here_flows:velocity", "--shape", "2", "--steps", "4",
                           "--iterations", "2", "--samples", "16", "--validation", "8", "--out", "v.json", "-q")
    assert code == 0, err
    assert [f for f in files_in(tmp_path) if f != "__pycache__"] == ["here_flows.py", "v.json"]


def test_search_loads_pipelines_as_generate_does_never_from_the_network(capsys, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "notpipe" / "model_index.json").write_text("{}")
    for model, fragments in (("nobody-here/no-such-model", ["not available locally", "hf download"]),
                             ("schnell", ["black-forest-labs/FLUX.1-schnell", "not available locally"]),
                             (tmp_path / "notpipe", ["cannot load this pipeline folder"]),
                             (tmp_path / "missing", ["no such directory"])):
        code, _, err = fewstep(capsys, "search", "--model", model, "--prompts", tmp_path / "p.txt", "--steps", "6",
                               "--out", tmp_path / "a.json")
        assert_one_line_error(code, err, *fragments)
    assert files_in(tmp_path) == ["notpipe", "p.txt"]


def test_inputs_that_name_no_use_or_no_pipeline_are_one_line_errors(capsys, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "model_index.json").write_text("[1, 2]")
    for args, fragment in ((("search", "--model", "digits", "--prompts", tmp_path / "p.txt"), "--prompts applies"),
                           (("search", "--problem", "gmm2d", "--prompts", tmp_path / "p.txt"), "--prompts applies"),
                           (("search", "--model", tmp_path / "listed", "--prompts", tmp_path / "p.txt"),
                            "model_index.json must be a JSON object"),
                           (("generate", "--model", tmp_path / "listed", "--prompt", "x"),
                            "model_index.json must be a JSON object")):
        code, _, err = fewstep(capsys, *args, "--out" if args[0] != "generate" else "--output",
                               tmp_path / ("o.png" if args[0] == "generate" else "o"))
        assert_one_line_error(code, err, fragment)
    assert files_in(tmp_path) == ["listed", "p.txt"]


def test_metadata_records_the_default_img2img_strength_it_used(capsys, tmp_path, inputs):
    code, _, err = generate(capsys, "--prompt", "7", "--image", inputs / "good.png", "--output", tmp_path / "a.png",
                            "--metadata", "-q")
    assert code == 0, err
    # --image PATH alone: mflux's default 0.4 at 8 steps (skip int(3.2) = 3) is diffusers' 5/8
    assert json.loads((tmp_path / "a.json").read_text())["image_strength"] == 0.625
    # The Python API without a strength makes the same picture as the CLI (it used diffusers' 0.4 before)
    model = EmbeddedModel(kind="digits")
    model.progress = False
    made = model.generate_image(42, "7", Config(num_inference_steps=8, image_path=str(inputs / "good.png")))
    assert np.array_equal(np.asarray(made.image), np.asarray(Image.open(tmp_path / "a.png")))
    assert made.metadata["image_strength"] == 0.625
    with pytest.raises(InvalidInput, match="^num_inference_steps 1 leaves no step to run from an input image"):
        model.generate_image(42, "7", Config(num_inference_steps=1, image_path=str(inputs / "good.png")))
