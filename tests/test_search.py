"""Solver search as a product (docs/search.md): any model through one code path, validation and restarts,
model-call accounting, checkpoint/resume, the CLI, shipped searched files."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep import search as S
from fewstep.cli import main
from fewstep.solvers.neuralsolver import SolverFile, neuralsolver
from fewstep.testbed import preset

torch.set_num_threads(1)  # the search is seeded and thread-count dependent


def small(**changes):
    """A seconds-long search configuration (gmm2d-sized)."""
    return {"iterations": 24, "batch": 16, "samples": 48, "validation": 16, "teacher_points": 40, "eval_every": 4,
            **changes}


def test_counts_every_model_call_and_records_provenance():
    g = preset("gmm2d")
    seen = [0]

    def model(x, s):
        seen[0] += len(x)
        return g.velocity(x, s)

    found = S.search_target(S.plain_target(model, (2,), "counted"), [3, 4], **small(), shift=3.0, seed=1)
    p = found.provenance
    calls = p["model_calls"]
    assert calls["total"] == seen[0] == calls["teacher"] + calls["training"] + calls["validation"]
    # Training: per iteration batch × N steps × 2 (the finite-difference time gradient); restarts explore 5 each.
    assert calls["training"] == 16 * 2 * (3 + 4) * (3 * 5 + 24 - 5)
    assert sorted(found.steps) == [3, 4] and p["grid"] == {"shift": 3.0, "mu": None}
    assert p["teacher"]["bytes_per_sample"] == 41 * 2 * 8 and p["fewstep"] == fewstep.__version__
    for n in ("3", "4"):
        info = p["steps"][n]
        assert np.isfinite(info["validation_rmse"]) and len(info["restarts"]) == 3
        best = min(r["validation_rmse"] for r in info["restarts"])
        assert info["validation_rmse"] <= best  # the continued start only improves on its exploration
    assert SolverFile(found.prediction, found.steps, found.start, json.loads(json.dumps(p))).provenance == p


def test_validation_noises_never_give_gradients():
    """Changing the held-out teacher states changes the reported validation error, never the training path."""
    target = S.mixture_target("gmm2d")
    bank = S.make_bank(target, 48, 16, 0, teacher_points=40)
    moved = S._Bank(**{**bank.__dict__, "val_final": bank.val_final + 1.0})
    options = {**small(), "restarts": 1}
    for key in ("samples", "validation", "teacher_points"):
        options.pop(key)
    options["eval_every"] = 1000  # validate only at the end: the kept parameters are the last ones either way
    a = S.search_target(target, 3, bank=bank, **options)
    b = S.search_target(target, 3, bank=moved, **options)
    for x, y in zip(a.steps[3], b.steps[3], strict=True):
        assert np.array_equal(x, y)
    assert b.provenance["steps"]["3"]["validation_rmse"] > 0.9  # the shifted targets are 1 away in every element


def test_robust_loss_bounds_one_outlier():
    """A sample 1000× further off than the others changes the robust loss by a bounded amount (linear, not
    quadratic), while the paper's per-step MSE is dominated by it."""
    base = [torch.zeros(64, 4)]
    targets = [torch.full((64, 4), 1e-2)]
    far = [t.clone() for t in targets]
    far[0][0] = 10.0
    robust = S._loss("robust", base, targets), S._loss("robust", base, far)
    mse = S._loss("trajectory", base, targets), S._loss("trajectory", base, far)
    assert float(mse[1] / mse[0]) > 1e4
    assert float(robust[1] / robust[0]) < 200  # linear in the outlier's distance / the median, over 64 samples


def test_search_beats_adams2_on_held_out_noise_gmm8d():
    g = preset("gmm8d")
    held = torch.randn(512, 8, generator=torch.Generator().manual_seed(4321), dtype=torch.float64)
    exact = fewstep.testbed.reference_solve(g.velocity, held, check=False).x
    found = S.search(g.velocity, 6, iterations=300, dim=8, bank=512, validation=256)
    rmse = lambda x: float(((x - exact) ** 2).mean().sqrt())  # noqa: E731
    searched = rmse(fewstep.sample(g.velocity, held, neuralsolver(found), 6))
    adams2 = rmse(fewstep.sample(g.velocity, held, "adams2", 6))
    assert searched < 0.6 * adams2, (searched, adams2)


def test_checkpoint_resume_is_bit_identical(tmp_path):
    target = S.mixture_target("gmm2d")
    whole = S.search_target(target, [3, 4], **small())
    ckpt = tmp_path / "s.json.ckpt"
    count = [0]

    def stop_twice():  # stop in the exploration of N=3, then again while N=4 continues its best start
        count[0] += 1
        return count[0] in (7, 60)

    for _ in range(2):
        with pytest.raises(S.Interrupted):
            S.search_target(target, [3, 4], **small(), checkpoint=ckpt, stop=stop_twice)
        assert ckpt.is_file()
    resumed = S.search_target(target, [3, 4], **small(), checkpoint=ckpt, stop=stop_twice)
    assert not ckpt.exists()  # a finished search removes its checkpoint
    for n in (3, 4):
        for a, b in zip(whole.steps[n], resumed.steps[n], strict=True):
            assert np.array_equal(a, b)
    # the calls spent before the interruption are still counted (teacher once, training as if uninterrupted)
    assert resumed.provenance["model_calls"] == whole.provenance["model_calls"]


def test_checkpoint_of_another_search_is_not_resumed(tmp_path):
    target = S.mixture_target("gmm2d")
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(S.Interrupted):
        S.search_target(target, 3, **small(seed=1), checkpoint=ckpt, stop=lambda: True)
    messages = []
    found = S.search_target(target, 3, **small(), checkpoint=ckpt, log=messages.append)
    assert any("another search" in m for m in messages)
    again = S.search_target(target, 3, **small())
    assert np.array_equal(found.steps[3][1], again.steps[3][1])


def test_embedded_model_labels_follow_the_samples():
    """Bank sample k is searched with label k mod 10: the target's velocity equals the model's for that label."""
    from fewstep.models import embedded

    target = S.resolve_target("digits", guidance=2.0)
    net = embedded("digits").load_embedded(dtype=torch.float64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    index = torch.tensor([3, 14, 27])
    got = target.velocity(x, 0.5, index)
    want = torch.cat([net.velocity_fn(torch.tensor([lab]), 2.0)(x[i:i + 1], 0.5) for i, lab in enumerate((3, 4, 7))])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert target.shape == (64,) and target.info["guidance"] == 2.0


def _cli(*argv):
    return main(["search", *map(str, argv)])


def test_cli_digits_multi_steps(tmp_path, capsys):
    out = tmp_path / "d.json"
    code = _cli("--model", "digits", "--steps", "3-4", "--out", out, "--iterations", 6, "--batch", 8, "--samples", 12,
                "--validation", 6, "--teacher", "euler:20", "--teacher-points", 20, "--shift", 3, "--restarts", 1)
    assert code == 0
    found = SolverFile.load(out)
    p = found.provenance
    assert sorted(found.steps) == [3, 4] and p["model"] == "digits" and p["grid"]["shift"] == 3.0
    assert p["teacher"]["solver"] == "euler:20" and p["model_calls"]["teacher"] == 20 * (12 + 6)
    text = capsys.readouterr().out
    assert "N=3: validation RMSE" in text and "model calls" in text
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.json"]  # no checkpoint left


def test_cli_callable_model_and_ctrl_c_resume(tmp_path, monkeypatch, capsys):
    """module:function with --shape; a Ctrl-C (SIGINT) mid-search exits 130, leaves a checkpoint and no solver file;
    the same command resumes and writes the solver an uninterrupted search writes."""
    (tmp_path / "mymodel.py").write_text(
        "import os, signal\n"
        "from fewstep.testbed import preset\n"
        "g = preset('gmm2d')\n"
        "calls = [0]\n"
        "KILL_AT = [None]\n"
        "def velocity(x, sigma):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == KILL_AT[0]:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return g.velocity(x.reshape(len(x), 2), sigma).reshape(x.shape)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mymodel

    args = ["--model", "mymodel:velocity", "--shape", "1,2", "--steps", "3", "--iterations", 30, "--batch", 8,
            "--samples", 32, "--validation", 8, "--teacher", "heun:20", "--teacher-points", 20, "-q"]
    whole = tmp_path / "whole.json"
    assert _cli(*args, "--out", whole) == 0
    out = tmp_path / "s.json"
    mymodel.calls[0], mymodel.KILL_AT[0] = 0, 300
    assert _cli(*args, "--out", out) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "s.json.ckpt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was restored
    mymodel.KILL_AT[0] = None
    assert _cli(*args, "--out", out) == 0
    a, b = SolverFile.load(whole), SolverFile.load(out)
    assert np.array_equal(a.steps[3][0], b.steps[3][0]) and np.array_equal(a.steps[3][1], b.steps[3][1])
    assert b.provenance["model"] == "mymodel:velocity" and not (tmp_path / "s.json.ckpt").exists()
    del sys.modules["mymodel"]


def test_sigterm_while_a_checkpoint_is_written_leaves_no_temporary_file(tmp_path):
    """SIGTERM (kill, timeout) unwinds like Ctrl-C: here it arrives while the first checkpoint is being written (after
    its fsync, before the rename); the run exits 130 and the folder holds no hidden temporary file. Python's default,
    dying at once, left `.s.json.ckpt.*.tmp` files (up to 50 MB each) that no later run removed."""
    import subprocess

    script = ("import os, signal, sys\n"
              "from fewstep.cli import main\n"
              "fsync = os.fsync\n"
              "def fsync_then_terminate(fd):\n"
              "    fsync(fd)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "os.fsync = fsync_then_terminate\n"
              "sys.exit(main(sys.argv[1:]))\n")
    args = ["search", "--model", "gmm2d", "--steps", "3", "--iterations", "8", "--batch", "8", "--samples", "16",
            "--validation", "8", "--teacher-points", "20", "-q", "--out", str(tmp_path / "s.json")]
    done = subprocess.run([sys.executable, "-c", script, *args], text=True, capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 130, done.stderr[-2000:]
    assert "interrupted" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == [], list(tmp_path.iterdir())


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "1"], "--steps must be integers from 2"),
    (["--steps", "4-x"], "--steps"),
    (["--steps", "8-4"], "empty range"),
    (["--model", "nosuch"], "not a mixture"),
    (["--model", "os:path"], "not callable"),
    (["--model", "json:dumps"], "--shape"),
    (["--model", "gmm2d", "--problem", "gmm8d"], "disagree"),
    (["--shape", "4,x"], "--shape must be"),
    (["--teacher", "rk4"], "--teacher"),
    (["--teacher", "euler:0"], "--teacher"),
    (["--shift", "0"], "--shift"),
    (["--shift", "3", "--mu", "1"], "--shift or --mu"),
    (["--model", "gmm2d", "--guidance", "3"], "no conditioning"),
    (["--restarts", "0"], "--restarts"),
    (["--samples", "0"], "--samples"),
    (["--validation", "0"], "--validation must be an integer from 1"),
    (["--model", "os:getcwd", "--shape", "4", "--teacher", "euler:10", "-q"], "--model os:getcwd raised TypeError"),
])
def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "x.json"
    assert _cli(*argv, "--out", out, "--iterations", 1) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not os.path.exists(f"{out}.ckpt")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    import pipelines as tiny

    path = tmp_path_factory.mktemp("models") / "tiny-flux"
    tiny.flux(tiny.FLUX_SCHNELL).save_pretrained(path)
    return path


def test_pipeline_velocity_is_the_transformer_with_each_prompts_conditioning(tiny_flux):
    """The search's velocity for bank sample k is the pipeline's own first transformer output for prompt k mod P
    from the same latents (captured from a real pipeline run)."""
    from diffusers import DiffusionPipeline

    prompts = ["a red square", "a blue circle"]
    pipe = DiffusionPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    kw = {"height": 32, "width": 32, "max_sequence_length": 48}
    target = S.pipeline_target(pipe, prompts, 0.0, 32, 32, call_kwargs={"max_sequence_length": 48})
    assert target.info["timestep_scale"] == pytest.approx(1.0)  # Flux passes timestep / 1000 = σ
    x = torch.randn(3, *target.shape, generator=torch.Generator().manual_seed(0))
    got = target.velocity(x, 1.0, torch.tensor([0, 1, 2]))
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    for k in range(3):
        pipe(prompt=prompts[k % 2], latents=x[k:k + 1], num_inference_steps=1, guidance_scale=0.0, output_type="latent",
             **kw)
    handle.remove()
    torch.testing.assert_close(got, torch.cat(outputs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])  # the prompts condition differently


def test_cli_searches_a_diffusers_pipeline(tiny_flux, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    out = tmp_path / "flux.json"
    code = _cli("--model", tiny_flux, "--prompts", prompts, "--height", 32, "--width", 32, "--steps", 3,
                "--iterations", 4, "--samples", 4, "--validation", 2, "--batch", 2, "--restarts", 1,
                "--teacher", "euler:8", "--teacher-points", 8, "--out", out, "-q")
    assert code == 0, capsys.readouterr().err
    p = SolverFile.load(out).provenance
    assert p["pipeline"] == "FluxPipeline" and p["prompts"] == ["a red square", "a blue circle"]
    assert p["model_calls"]["teacher"] == 8 * (4 + 2)
    assert _cli("--model", tiny_flux, "--prompts", tmp_path / "none.txt", "--out", out) == 2


def test_a_teacher_bank_of_a_pipeline_folder_whose_weights_changed_is_refused(tiny_flux, tmp_path, capsys):
    """The bank is keyed by the folder's files (names, sizes, times), not only its path: retrained weights under the
    same path would otherwise reuse the old teacher silently."""
    import shutil

    model = tmp_path / "flux"
    shutil.copytree(tiny_flux, model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    args = ["--model", model, "--prompts", prompts, "--height", 32, "--width", 32, "--steps", 3, "--iterations", 2,
            "--samples", 4, "--validation", 2, "--batch", 2, "--restarts", 1, "--teacher", "euler:4",
            "--teacher-points", 4, "--teacher-bank", tmp_path / "bank", "-q"]
    assert _cli(*args, "--out", tmp_path / "a.json") == 0, capsys.readouterr().err
    weights = next((model / "transformer").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new file in place
    capsys.readouterr()
    assert _cli(*args, "--out", tmp_path / "b.json") == 2
    err = capsys.readouterr().err  # -q: no diffusers / transformers loading bars either, one line
    assert err.startswith("fewstep search: error: --teacher-bank") and "(model.weights " in err
    assert err.count("\n") == 1
    assert not (tmp_path / "b.json").exists()


def test_a_prompts_file_over_16_mib_is_refused_not_cut(tmp_path):
    big = tmp_path / "prompts.txt"
    big.write_bytes(("a prompt\n" * (2**24 // 9 + 2)).encode())
    with pytest.raises(OSError, match=r"--prompts .*prompts.txt: larger than 16 MiB"):
        S.read_prompts(str(big))


def test_pipeline_sizes_and_prompts_it_cannot_search_are_one_line(tiny_flux, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    assert _cli("--model", tiny_flux, "--prompts", prompts, "--height", 1, "--width", 32, "--steps", 3, "--out",
                tmp_path / "x.json", "-q") == 2
    err = capsys.readouterr().err
    assert err == "fewstep search: error: --height/--width: the pipeline's latent for this size is empty ([1, 0, 4])\n"
    assert not (tmp_path / "x.json").exists()
    sys.path.insert(0, os.path.dirname(__file__))
    import pipelines as tiny

    from fewstep.errors import InvalidInput

    qwen = tiny.qwen_image()  # its prompt embeddings are not padded: rows of two prompts cannot be stacked
    qwen.set_progress_bar_config(disable=True)
    with pytest.raises(InvalidInput, match=r"--prompts: QwenImagePipeline encodes these prompts to different shapes"):
        S.pipeline_target(qwen, ["red", "a much longer prompt about a blue circle on a wooden table"], 1.0, 32, 32)


@pytest.mark.parametrize("shift", [1, 3])
def test_shipped_digits_solvers_beat_adams2_on_fresh_noise(shift):
    path = S.shipped_solver("digits", shift)
    assert path is not None and path.name == f"digits-shift{shift}.json"
    found = SolverFile.load(path)
    p = found.provenance
    assert sorted(found.steps) == list(range(4, 11)) and p["model"] == "digits" and p["grid"]["shift"] == shift
    assert p["fewstep"] and p["processes"] == 1 and p["model_calls"]["total"] > 0
    target = S.resolve_target("digits")
    noise = torch.randn(40, 64, generator=torch.Generator().manual_seed(777), dtype=torch.float64)
    index = torch.arange(40)
    model = lambda x, s: target.velocity(x, s, index)  # noqa: E731
    exact = S.teacher_bank(model, noise, "exact:1e-7", 2)[1][-1]
    for n in (4, 6, 8):
        err = lambda x: float(((x - exact) ** 2).mean().sqrt())  # noqa: E731
        searched = err(fewstep.sample(model, noise, neuralsolver(found), n, shift=shift))
        adams2 = err(fewstep.sample(model, noise, "adams2", n, shift=shift))
        assert searched < 0.8 * adams2, (n, searched, adams2)


def test_shipped_solver_lookup_and_grid_warning():
    assert S.shipped_solver("no-such-model") is None
    assert S.shipped_solver("digits", 2.0).name == "digits-shift3.json"  # nearest in log: |ln 2 - ln 3| < ln 2
    assert S.shipped_solver("digits", mu=0.0).name == "digits-shift1.json"
    found = SolverFile.load(S.shipped_solver("digits", 3))
    assert S.grid_mismatch(found, 3.0) is None
    assert "shift-3 grid" in S.grid_mismatch(found, 1.0)
    assert S.grid_mismatch(SolverFile.load("sit"), 1.0) is None  # a file that does not say


def _search_processes(out: Path, args: list[str], processes: int, *extra: str) -> SolverFile:
    """`fewstep search ARGS --out OUT` in `processes` gloo processes (1: a plain process; more: torchrun), one
    thread each; the solver file it wrote."""
    import subprocess

    launch = ["-m", "fewstep"] if processes == 1 else ["-m", "torch.distributed.run", "--nproc-per-node",
                                                       str(processes), "--standalone", "-m", "fewstep"]
    done = subprocess.run([sys.executable, *launch, "search", *args, "--out", str(out), *extra], text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return SolverFile.load(out)


def test_torchrun_two_gloo_processes_find_the_same_solver(tmp_path):
    """`torchrun --nproc-per-node 2 -m fewstep search` (gloo on CPU): the teacher chunks and every minibatch are
    split between the processes and the gradients all-reduced; the solver equals one process's to 1e-6 and the file
    records each process's model calls. With --teacher-bank the same, the bank written to disk by both."""
    args = ["--model", "gmm2d", "--steps", "3,4", "--iterations", "20", "--batch", "16", "--samples", "64",
            "--validation", "32", "--teacher-points", "40", "--restarts", "2", "--seed", "3", "-q"]
    a, b = _search_processes(tmp_path / "one.json", args, 1), _search_processes(tmp_path / "two.json", args, 2)
    for n in (3, 4):
        for x, y in zip(a.steps[n], b.steps[n], strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)  # measured 3e-13
    pa, pb = a.provenance, b.provenance
    assert pa["processes"] == 1 and pb["processes"] == 2
    assert pb["model_calls"]["total"] == pa["model_calls"]["total"]
    shares = pb["model_calls"]["per_process"]
    assert all(0 < s["teacher"] < pa["model_calls"]["teacher"] for s in shares)  # each solved only its chunks
    assert sum(s["teacher"] for s in shares) == pa["model_calls"]["teacher"]
    assert [s["training"] for s in shares] == [pa["model_calls"]["training"] // 2] * 2
    # --teacher-bank: both processes write their chunks into one folder on disk and map it
    disk = _search_processes(tmp_path / "disk.json", args, 2, "--teacher-bank", str(tmp_path / "bank"))
    for n in (3, 4):
        for x, y in zip(b.steps[n], disk.steps[n], strict=True):
            assert np.array_equal(x, y)
    assert disk.provenance["model_calls"]["per_process"] == shares
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "disk.json", "one.json", "two.json"]


def test_half_precision_teacher_bank():
    target = S.mixture_target("gmm2d")
    full = S.make_bank(target, 48, 16, 0, teacher_points=40)
    half = S.make_bank(target, 48, 16, 0, teacher_points=40, teacher_dtype=torch.float16)
    assert half.t_states.dtype == torch.float16 and half.t_states.element_size() * 4 == full.t_states.element_size()
    assert float((half.t_states.double() - full.t_states).abs().max()) < 5e-3  # float16 rounding of |x| < 4
    found = S.search_target(target, 3, **small(teacher_dtype=torch.float16))
    assert found.provenance["teacher"]["bytes_per_sample"] == 41 * 2 * 2
    assert np.isfinite(found.provenance["steps"]["3"]["validation_rmse"])


def test_without_validation_noises_the_last_parameters_are_kept():
    target = S.mixture_target("gmm2d")
    options = {**small(validation=0), "restarts": 1}  # validated every 4 iterations
    found = S.search_target(target, 3, **options)
    info = found.provenance["steps"]["3"]
    assert info["best_iteration"] == 24 and np.isnan(info["validation_rmse"])


def test_teacher_bank_on_disk_gives_the_same_solver_and_is_reused(tmp_path):
    """--teacher-bank: the bank is written to a folder (memory-mapped, read a minibatch at a time), the solver is
    bit-identical to the in-memory bank's, a second search reuses it without a teacher call, and an interrupted search
    resumes from a checkpoint that holds no trajectories."""
    g = preset("gmm2d")
    seen = [0]

    def model(x, s):
        seen[0] += len(x)
        return g.velocity(x, s)

    target = S.plain_target(model, (2,), "counted")
    memory = S.search_target(target, 3, **small())
    path = tmp_path / "bank"
    seen[0] = 0
    first = S.search_target(target, 3, **small(), teacher_bank=path)
    assert seen[0] == first.provenance["model_calls"]["total"] == memory.provenance["model_calls"]["total"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no temporary folder left
    assert json.loads((path / "bank.json").read_text())["teacher_calls"] == memory.provenance["model_calls"]["teacher"]
    seen[0] = 0
    ckpt = tmp_path / "s.json.ckpt"
    with pytest.raises(S.Interrupted):
        S.search_target(target, 3, **small(), teacher_bank=path, checkpoint=ckpt, stop=lambda: seen[0] > 1000)
    assert torch.load(ckpt, weights_only=False)["bank"].t_states is None
    second = S.search_target(target, 3, **small(), teacher_bank=path, checkpoint=ckpt)
    calls = second.provenance["model_calls"]
    assert calls["teacher"] == 0 and seen[0] == calls["total"] == calls["training"] + calls["validation"]
    for found in (first, second):
        for a, b in zip(memory.steps[3], found.steps[3], strict=True):
            assert np.array_equal(a, b)
    bank = S.make_bank(target, 48, 16, 0, teacher_points=40, path=path)
    assert isinstance(bank.t_states, np.memmap) and bank.teacher_calls == 0


def test_two_searches_building_the_same_teacher_bank_at_once_both_use_it(tmp_path):
    """Two searches started together on one --teacher-bank folder both solve the teacher; the one that finishes
    second finds the folder taken by the same bank, drops its own and reads that one (no error, nothing left over)."""
    g = preset("gmm2d")
    path = tmp_path / "bank"
    started = [False]

    def model(x, s):
        if not started[0]:  # the other search runs to completion while this one is solving its teacher
            started[0] = True
            S.make_bank(S.plain_target(g.velocity, (2,), "same"), 48, 16, 0, teacher_points=40, path=path)
        return g.velocity(x, s)

    bank = S.make_bank(S.plain_target(model, (2,), "same"), 48, 16, 0, teacher_points=40, path=path)
    assert started[0] and bank.teacher_calls > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
    alone = S.make_bank(S.plain_target(g.velocity, (2,), "same"), 48, 16, 0, teacher_points=40)
    assert np.array_equal(np.asarray(bank.t_states), alone.t_states.numpy())
    assert torch.equal(bank.val_final, alone.val_final)


def test_teacher_bank_of_another_search_or_damaged_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "bank"
    args = ["--model", "gmm2d", "--steps", 3, "--iterations", 2, "--batch", 8, "--samples", 16, "--validation", 8,
            "--teacher", "euler:10", "--teacher-points", 10, "--restarts", 1, "-q", "--teacher-bank", path]
    out = tmp_path / "s.json"
    assert _cli(*args, "--out", out) == 0
    for change, message in ((["--seed", 1], "holds the teacher bank of another search (seed 0 there, 1 here)"),
                            (["--teacher-dtype", "float16"], "(dtype \"float64\" there, \"float16\" here)")):
        assert _cli(*args, *change, "--out", tmp_path / "x.json") == 2
        err = capsys.readouterr().err
        assert f"--teacher-bank {path} " in err and message in err and err.count("\n") == 1
    teacher = path / "teacher.npy"
    teacher.write_bytes(teacher.read_bytes()[:-8])  # truncated
    assert _cli(*args, "--out", tmp_path / "x.json") == 2
    err = capsys.readouterr().err
    assert f"--teacher-bank {path}: not a readable teacher bank" in err and err.count("\n") == 1
    assert _cli(*args[:-1], out, "--out", tmp_path / "x.json") == 2  # a file, not a folder
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _same_solvers(a, b):
    assert a.steps.keys() == b.steps.keys()
    for n in a.steps:
        for x, y in zip(a.steps[n], b.steps[n], strict=True):
            assert np.array_equal(x, y)


def _without_times(provenance):
    p = json.loads(json.dumps(provenance, default=str))
    for key in ("date", "seconds"):
        p.pop(key)
    for info in p["steps"].values():
        info.pop("seconds")
    return p


def test_family_of_one_is_the_plain_search_bit_for_bit():
    target = S.mixture_target("gmm8d")
    plain = S.search_target(target, [3, 4], **small(), order_cap=True, seed=2)
    family = S.search_target([target], [3, 4], **small(), order_cap=True, seed=2)
    _same_solvers(plain, family)
    assert _without_times(plain.provenance) == _without_times(family.provenance)
    assert list(plain.provenance) == list(family.provenance)  # the same file, key order included


def test_family_search_normalises_each_member_and_records_them(tmp_path):
    """One solver for gmm2d and gmm8d (2-d and 8-d states, each from its own bank): the validation score is the
    mean of each member's RMSE ÷ its start solver's, every member's calls are counted and add up, and a family bank
    on disk (one folder per member) gives the same solver."""
    seen = {"gmm2d": [0], "gmm8d": [0]}

    def counted(name):
        g = preset(name)

        def model(x, s):
            seen[name][0] += len(x)
            return g.velocity(x, s)

        return S.plain_target(model, (g.dim,), name)

    family = [counted("gmm2d"), counted("gmm8d")]
    found = S.search_target(family, [3, 4], **small(samples=40, validation=12, batch=None))
    p = found.provenance
    assert p["model"] == "gmm2d+gmm8d" and [m["model"] for m in p["members"]] == ["gmm2d", "gmm8d"]
    assert [(m["samples"], m["validation_samples"]) for m in p["members"]] == [(40, 12), (40, 12)]
    assert p["samples"] == 80 and p["batch"] == [40, 40]  # the default batch 256, capped at each member's bank
    for m in p["members"]:
        calls = m["model_calls"]
        assert calls["total"] == seen[m["model"]][0] == calls["teacher"] + calls["training"] + calls["validation"]
    assert p["model_calls"]["total"] == sum(m["model_calls"]["total"] for m in p["members"])
    for info in p["steps"].values():
        parts = info["members"]
        assert info["validation_score"] == pytest.approx(
            np.mean([m["validation_rmse"] / m["start_validation_rmse"] for m in parts]), rel=1e-12)
        assert info["validation_score"] < 1  # better than where it started, on the two members together
        assert info["calls"]["training"] == sum(m["calls"]["training"] for m in parts)
    on_disk = S.search_target(family, [3, 4], **small(samples=40, validation=12, batch=None),
                              teacher_bank=tmp_path / "banks")
    _same_solvers(found, on_disk)
    assert sorted(d.name for d in (tmp_path / "banks").iterdir()) == ["0-gmm2d", "1-gmm8d"]
    with pytest.raises(ValueError, match="distinct"):
        S.search_target([family[0], family[0]], 3, **small())


def test_family_checkpoint_resume_is_bit_identical(tmp_path):
    family = [S.mixture_target("gmm2d"), S.mixture_target("gmm8d")]
    whole = S.search_target(family, [3, 4], **small())
    ckpt = tmp_path / "f.json.ckpt"
    count = [0]

    def stop_twice():
        count[0] += 1
        return count[0] in (7, 60)

    for _ in range(2):
        with pytest.raises(S.Interrupted):
            S.search_target(family, [3, 4], **small(), checkpoint=ckpt, stop=stop_twice)
    resumed = S.search_target(family, [3, 4], **small(), checkpoint=ckpt, stop=stop_twice)
    _same_solvers(whole, resumed)
    assert resumed.provenance["members"] == whole.provenance["members"]


def test_cli_family_search(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert _cli("--model", "gmm2d,gmm8d", "--steps", "3", "--iterations", 6, "--samples", 24, "--validation", 8,
                "--batch", 8, "--teacher-points", 20, "--restarts", 1, "--out", out) == 0
    text = capsys.readouterr().out
    assert "N=3: validation score" in text and "gmm8d" in text
    p = SolverFile.load(out).provenance
    assert p["model"] == "gmm2d+gmm8d" and [m["batch"] for m in p["members"]] == [8, 8]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gmm8d,gmm8d"], "--model gmm8d,gmm8d: a family is two or more distinct models"),
    (["--model", "gmm8d,"], "--model"),
    (["--model", "gmm2d,gmm8d", "--validation", "0"], "--validation must be an integer from 1"),
    (["--model", "gmm2d,gmm8d", "--guidance", "3"], "--guidance"),
    (["--model", "gmm2d,nosuch"], "not a mixture"),
])
def test_cli_family_refuses_what_makes_no_sense_in_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "x.json"
    assert _cli(*argv, "--out", out, "--iterations", 1) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_family_refuses_prompts(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert _cli("--model", "gmm2d,gmm8d", "--prompts", prompts, "--out", tmp_path / "x.json") == 2
    err = capsys.readouterr().err
    assert "--prompts: a family" in err and err.count("\n") == 1


def test_torchrun_family_search_equals_one_process(tmp_path):
    """A family under torchrun: each member's minibatch split between 2 gloo processes, gradients all-reduced; the
    solver equals one process's and every member's model calls add up to the same totals."""
    args = ["--model", "gmm2d,gmm8d", "--steps", "3", "--iterations", "12", "--batch", "16", "--samples", "48",
            "--validation", "16", "--teacher-points", "30", "--restarts", "2", "-q"]
    a, b = _search_processes(tmp_path / "one.json", args, 1), _search_processes(tmp_path / "two.json", args, 2)
    for x, y in zip(a.steps[3], b.steps[3], strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    assert [m["model_calls"] for m in a.provenance["members"]] == [m["model_calls"] for m in b.provenance["members"]]
    assert b.provenance["processes"] == 2


# ------------------------------------------------------------------------------------- hostile-input regressions

_FAST = ["--model", "gmm2d", "--steps", 3, "--iterations", 2, "--batch", 8, "--samples", 16, "--validation", 8,
         "--teacher", "euler:10", "--teacher-points", 10, "--restarts", 1, "-q"]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_cli_refuses_out_inside_the_teacher_bank_before_any_model_call(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(*_FAST, "--teacher-bank", "bank1", "--out", "s.json") == 0
    before = (tmp_path / "bank1" / "teacher.npy").read_bytes()
    monkeypatch.setattr(S, "resolve_target", lambda *a, **k: pytest.fail("the model was loaded"))
    for bank, out in (("bank1", "bank1/teacher.npy"), ("nb", "nb"), ("nb", "nb/x.json"), ("bank1", "./bank1/y")):
        assert _cli(*_FAST, "--teacher-bank", bank, "--out", out) == 2
        _one_line_error(capsys, f"--out {out}", "--teacher-bank")
    assert (tmp_path / "bank1" / "teacher.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank1", "s.json"]


def test_cli_teacher_bank_with_nan_fails_in_one_line_and_leaves_nothing(tmp_path, capsys):
    bank = tmp_path / "bank"
    assert _cli(*_FAST, "--teacher-bank", bank, "--out", tmp_path / "a.json") == 0
    teacher = np.load(bank / "teacher.npy")
    teacher[:] = np.nan
    np.save(bank / "teacher.npy", teacher)
    out = tmp_path / "b.json"
    assert _cli(*_FAST, "--teacher-bank", bank, "--out", out) == 2
    _one_line_error(capsys, f"--teacher-bank {bank}", "NaN")
    assert not out.exists() and not os.path.exists(f"{out}.ckpt")


@pytest.mark.parametrize(("body", "teacher", "message"), [
    ("return x * float('nan')", "euler:10", "--model vel:bad returned NaN or Inf"),
    ("return x * float('nan')", "exact", "--model vel:bad returned NaN or Inf"),
    ("return x[:, :1]", "exact", "--model vel:bad returned shape (64, 1) for states of shape (64, 4)"),
    ("raise RuntimeError('kaput')", "exact", "--model vel:bad raised RuntimeError: kaput"),
    ("return (-x).numpy()", "euler:10", "--model vel:bad returned numpy.ndarray, not a torch tensor"),
    ("return None", "euler:10", "--model vel:bad returned NoneType, not a torch tensor"),
])
def test_cli_bad_velocity_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys, body, teacher, message):
    (tmp_path / "vel.py").write_text(f"def bad(x, sigma):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("vel", None)
    out = tmp_path / "x.json"
    assert _cli("--model", "vel:bad", "--shape", 4, "--steps", 4, "--samples", 64, "--validation", 32,
                "--iterations", 20, "--teacher", teacher, "-q", "--out", out) == 2
    _one_line_error(capsys, message)
    assert not out.exists() and not os.path.exists(f"{out}.ckpt")
    sys.modules.pop("vel", None)


def test_bad_velocity_raises_the_error_classes():
    from fewstep.errors import InvalidInput, NonFiniteError

    with pytest.raises(NonFiniteError, match="--model nanv"):
        S.search_target(S.plain_target(lambda x, s: x * float("inf"), (2,), "nanv"), 3, **small())
    with pytest.raises(InvalidInput, match=r"returned shape \(48, 1\)"):
        S.search_target(S.plain_target(lambda x, s: x[:, :1], (2,), "short"), 3, **small())
    with pytest.raises(InvalidInput, match="--model np returned numpy.ndarray, not a torch tensor"):
        S.search_target(S.plain_target(lambda x, s: x.numpy(), (2,), "np"), 3, **small())


def test_model_that_raises_in_training_fails_in_one_line_and_removes_its_checkpoint(tmp_path):
    """The teacher and validation run without autograd: this model fails only once the search has saved its
    checkpoint; the error names the model and keeps the model's own exception as its cause."""
    from fewstep.errors import InvalidInput

    def late(x, s):
        if torch.is_grad_enabled():
            raise RuntimeError("kaput\nsecond line")
        return -x

    ckpt = tmp_path / "s.json.ckpt"
    with pytest.raises(InvalidInput, match="--model late raised RuntimeError: kaput") as caught:
        S.search_target(S.plain_target(late, (2,), "late"), 3, **small(), checkpoint=ckpt)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize(("changes", "message"), [
    ({"steps": 4.5}, "steps must be integers of at least 2 .*, got 4.5$"),
    ({"steps": [3, 4.0]}, "steps must be integers"),
    ({"dim": 0}, "dim must be a positive integer"),
    ({"dim": -1}, "dim must be a positive integer"),
    ({"bank": 0}, "bank must be a positive integer"),
    ({"validation": 0}, "validation must be an integer of at least 1"),
    ({"noise": torch.zeros(16, 2, dtype=torch.float64), "validation": 0}, "validation must be an integer"),
    ({"iterations": 0}, "iterations must be an integer of at least 1"),
    ({"shift": 0.0}, r"shift must be a number from e\^-50 to e\^50"),
    ({"shift": float("nan")}, "shift must be a number from"),
    ({"mu": float("inf")}, "mu must be a finite number from -50 to 50"),
    ({"mu": 100.0}, "mu must be a finite number from -50 to 50"),  # was a "diverged" search blaming --lr
    ({"shift": 3.0, "mu": 1.0}, "give shift or mu, not both"),
])
def test_search_refuses_bad_parameters_by_name_before_any_model_call(changes, message):
    from fewstep.errors import InvalidInput

    calls = []
    options = {"steps": 3, "dim": 2, "iterations": 2, "bank": 16, "validation": 8, **changes}
    with pytest.raises(InvalidInput, match=message):
        S.search(lambda x, s: calls.append(len(x)) or -x, options.pop("steps"), **options)
    assert calls == []


@pytest.mark.parametrize("steps", ["2-50000000000", "2-100000", "2-99999999999999999999999999999", "1-4"])
def test_cli_steps_range_is_checked_before_it_is_expanded(tmp_path, capsys, steps):
    assert _cli("--steps", steps, "--out", tmp_path / "x.json") == 2
    err = _one_line_error(capsys, "--steps must be integers from 2 to 50", repr(steps))
    assert len(err) < 200


def test_cli_diverged_search_names_lr_and_leaves_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "new" / "folders" / "x.json"  # made for the checkpoint, removed with it
    assert _cli("--model", "gmm2d", "--steps", 4, "--samples", 64, "--validation", 32, "--iterations", 20, "-q",
                "--lr", "1e10", "--out", out) == 2
    _one_line_error(capsys, "diverged", "smaller --lr")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("bank", ["", " ", "/", ".."])
def test_cli_teacher_bank_that_is_no_bank_is_refused_without_advising_removal(tmp_path, capsys, monkeypatch, bank):
    monkeypatch.chdir(tmp_path)
    assert _cli(*_FAST, "--teacher-bank", bank, "--out", tmp_path / "x.json") == 2
    err = _one_line_error(capsys, "--teacher-bank")
    assert "remove" not in err
    assert ("empty" in err) if not bank.strip() else ("not a teacher bank" in err and "new folder" in err)
    assert sorted(os.listdir(tmp_path)) == []


def test_failed_start_keeps_a_checkpoint_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "x.json"
    ckpt = tmp_path / "x.json.ckpt"
    ckpt.write_bytes(b"an earlier search")
    os.mkdir(tmp_path / "notabank")
    assert _cli(*_FAST, "--teacher-bank", tmp_path / "notabank", "--out", out) == 2
    _one_line_error(capsys, "not a teacher bank")
    assert ckpt.read_bytes() == b"an earlier search" and not out.exists()


_GROUP_THREADS = """
import glob
import torch
from fewstep.search import _process_group
with _process_group():
    torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)  # the search's optimizer: imports torch._dynamo
print(sorted(open(task + "/comm").read().strip() for task in glob.glob("/proc/self/task/*")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_the_search_process_group_is_freed_before_interpreter_exit():
    """Two gloo processes (torchrun's environment variables, set by hand): when the search's process group ends, gloo's
    threads are gone. Left running, they were torn down at interpreter exit and aborted a process now and then."""
    import ast
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", _GROUP_THREADS], env={**env, "RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    for proc in ranks:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        threads = ast.literal_eval(out.strip().splitlines()[-1])
        assert threads and not [t for t in threads if "gloo" in t], threads


@pytest.mark.parametrize("kwargs, message", [
    ({"batch": 0}, "batch must be an integer from 1 to"),
    ({"batch": -5}, "batch must be an integer from 1 to"),
    ({"batch": True}, "batch must be an integer from 1 to"),
    ({"lr": float("nan")}, "lr must be a finite number above 0"),
    ({"lr": 0.0}, "lr must be a finite number above 0"),
    ({"noise": torch.randn(40)}, r"noise must be a finite bank of samples .* got shape \(40,\)"),
    ({"noise": torch.full((40, 2), float("nan"))}, "noise must be a finite bank of samples .* NaN or infinite"),
])
def test_search_refuses_arguments_that_would_train_nothing_or_fail_inside_torch(kwargs, message):
    """batch=0 returned a 'searched' file after 0 training calls; a negative batch, a 1-D bank or lr=NaN failed with
    torch's own errors. Each is one InvalidInput naming the argument, before any model call."""
    from fewstep.errors import InvalidInput

    calls = []

    def model(x, s):
        calls.append(s)
        return torch.zeros_like(x)

    args = {"dim": 2, **kwargs} if "noise" not in kwargs else kwargs
    with pytest.raises(InvalidInput, match=message):
        S.search(model, 4, iterations=2, **args)
    assert not calls
