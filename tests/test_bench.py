"""`fewstep bench`: outputs, reproducibility, peers against diffusers run by hand, the metrics' exact cases."""

import argparse
import csv
import functools

import numpy as np
import pytest
import scipy.stats
import torch

import fewstep.search
from fewstep.bench import add_arguments, run, run_bench
from fewstep.bench.problems import DIGITS_RTOL, load_problem
from fewstep.bench.run import markdown, run_peer, write_outputs
from fewstep.models.digits import frechet_distance, load_embedded
from fewstep.testbed import energy_distance, preset, reference_solve

torch.set_num_threads(1)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_writes_outputs_and_is_reproducible(tmp_path, capsys):
    argv = ["--problem", "gmm2d", "--solvers", "euler,adams2", "--nfe", "8,4,5", "--samples", "64",
            "--out", str(tmp_path)]
    assert run(_args(*argv)) == 0
    first = capsys.readouterr().out
    assert run(_args(*argv)) == 0
    assert capsys.readouterr().out == first  # seeded: the same table twice
    rows = list(csv.DictReader((tmp_path / "gmm2d-shift1.csv").open()))
    assert {"problem", "solver", "nfe", "rmse", "median_error", "energy_distance"} <= set(rows[0])
    # 2 fewstep solvers and 4 peers at NFE 4, 5, 8; FlowMatchHeun can make 5 calls only (2n − 1)
    assert len(rows) == 6 * 3 + 1
    assert [r["nfe"] for r in rows if r["solver"] == "FlowMatchHeunDiscreteScheduler"] == ["5"]
    assert (tmp_path / "gmm2d-shift1.png").stat().st_size > 1000
    assert (tmp_path / "gmm2d-shift1.md").read_text().count("best fewstep solver") == 3
    assert "- NFE 8: best fewstep solver" in first
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gmm2d-shift1.{e}" for e in ("csv", "json", "md", "png")]


def _by_hand(name, model, noise, steps, shift=1.0):
    """diffusers' scheduler in the pipeline loop, written out: one model call per timestep, at the scheduler's σ."""
    import diffusers

    cls = getattr(diffusers, name)
    sched = cls(shift=shift) if name.startswith("FlowMatch") else cls(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model(x, float(sched.sigmas[i])), t, x).prev_sample
    return x


@pytest.mark.parametrize("name, steps, nfe", [("FlowMatchHeunDiscreteScheduler", 3, 5),
                                              ("UniPCMultistepScheduler", 6, 6),
                                              ("DEISMultistepScheduler", 6, 6)])
def test_peer_in_bench_equals_scheduler_by_hand_and_counts_calls(name, steps, nfe):
    g = preset("gmm8d")
    noise = torch.randn(64, g.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    calls = []

    def counted(x, sigma):
        calls.append(sigma)
        return g.velocity(x, sigma)

    rows = run_bench("gmm8d", [], [nfe], shift=2.0, samples=64, seed=3).rows
    row = next(r for r in rows if r["solver"] == name)
    assert torch.equal(run_peer(name, counted, noise, nfe, 2.0), _by_hand(name, g.velocity, noise, steps, 2.0))
    assert len(calls) == nfe
    hand = _by_hand(name, g.velocity, noise, steps, 2.0).double()
    exact = reference_solve(g.velocity, noise).x
    assert row["rmse"] == pytest.approx(float((hand - exact).pow(2).mean().sqrt()), rel=1e-9)


def test_euler_matches_flow_match_euler_and_errors_fall():
    rows = run_bench("gmm2d", ["euler"], [4, 8, 16], samples=64).rows
    fm = [r["rmse"] for r in rows if r["solver"] == "FlowMatchEulerDiscreteScheduler"]
    ours = [r["rmse"] for r in rows if r["solver"] == "euler"]
    assert fm[0] > fm[1] > fm[2]
    assert max(abs(a - b) for a, b in zip(fm, ours, strict=True)) <= 1e-5


def test_searched_neuralsolver_beats_euler_and_is_seeded():
    def once():
        bench = run_bench("gmm2d", ["euler", "neuralsolver-searched"], [4], samples=64, peers=False,
                          search_iterations=40)
        return {r["solver"]: r["rmse"] for r in bench.rows}

    first = once()
    assert first["neuralsolver-searched"] < 0.5 * first["euler"]
    assert once() == first


def test_search_with_a_shared_teacher_bank_finds_the_same_solver(monkeypatch):
    from fewstep.search import search, teacher_bank

    g = preset("gmm2d")
    noise = torch.randn(64, g.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    alone = search(g.velocity, 4, noise=noise, iterations=10, batch=16)
    bank = teacher_bank(g.velocity, noise)
    with monkeypatch.context() as patch:  # the shared bank must replace the teacher solve, not run beside it
        patch.setattr(fewstep.search, "teacher_bank", lambda *a, **k: pytest.fail("teacher solved again"))
        shared = search(g.velocity, 4, noise=noise, iterations=10, batch=16, trajectories=bank)
    for a, b in zip(alone.steps[4], shared.steps[4], strict=True):
        assert np.array_equal(a, b)


def test_energy_distance_exact_cases():
    a = torch.randn(40, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = 0.5 + 2 * torch.randn(30, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert energy_distance(a, b) == pytest.approx(scipy.stats.energy_distance(a[:, 0], b[:, 0]), rel=1e-12)
    # two points at distance d: sqrt(2d − 0 − 0)
    assert energy_distance(torch.zeros(1, 3), torch.tensor([[3.0, 4.0, 0.0]])) == pytest.approx(np.sqrt(10))
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert energy_distance(x, x) == 0.0


def test_mixture_metrics_on_the_reference_and_on_swapped_modes():
    problem = load_problem("gmm2d", 40, 0)
    assert problem.quality(problem.reference)["mode_flips"] == 0.0
    g = preset("gmm2d")
    assert torch.equal(g.component(g.means), torch.arange(8))
    # a quarter turn of the 8-mode ring moves every sample two modes on: all flip, the distribution stays
    turned = problem.reference @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert problem.quality(turned)["mode_flips"] == 1.0


def test_frechet_distance_exact_cases():
    f = torch.randn(300, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-10)
    shift = torch.arange(8, dtype=torch.float64)
    assert frechet_distance(f, f + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-10)
    # f against 2f: |μ − 2μ|² + tr(C + 4C − 2·2C) = |μ|² + tr C, exactly, for the sample mean and covariance
    assert frechet_distance(f, 2 * f) == pytest.approx(float(f.mean(0).pow(2).sum() + f.var(0).sum()), rel=1e-10)


@pytest.fixture(scope="module")
def digits():
    return load_problem("digits", 12, 0)


def test_digits_reference_is_accurate_and_fd_ref_is_zero_on_it(digits):
    model = load_embedded(dtype=torch.float64)
    tight = reference_solve(model.velocity_fn(torch.arange(3)), digits.noise[:3], rtol=DIGITS_RTOL / 100,
                            atol=DIGITS_RTOL / 100, check=False).x
    assert (tight - digits.reference[:3]).abs().max() < 1e-5
    quality = digits.quality(digits.reference)
    # 12 samples in 128-d features: a rank-11 covariance, whose matrix square root holds to ~1e-4 only
    assert quality["fd_ref"] == pytest.approx(0.0, abs=1e-3)
    assert quality["fd"] > 1.0  # 12 samples against 1797 real digits: far from the data's own statistics
    assert "noise floor (two random halves of the real data, 899 and 898)" in digits.notes[2]


def test_digits_bench_writes_sample_grid(digits, tmp_path):
    bench = run_bench(digits, ["euler"], [4, 8], peers=False)
    assert markdown(bench).count("FD to real data / FD-ref") == 1
    write_outputs(bench, tmp_path, "digits", "digits test")
    rows = list(csv.DictReader((tmp_path / "digits.csv").open()))
    assert [float(r["fd_ref"]) > 0 for r in rows] == [True, True]
    assert float(rows[0]["fd_ref"]) > float(rows[1]["fd_ref"])  # euler at 8 calls is closer to the exact flow
    from PIL import Image

    grid = Image.open(tmp_path / "digits-samples.png")
    assert grid.height > 2 * 16 and grid.width > 2 * 10 * 16  # reference + euler rows, two NFE columns
    assert (tmp_path / "digits.png").stat().st_size > 1000


def test_bad_input():
    with pytest.raises(ValueError, match="unknown problem"):
        run(_args("--problem", "cifar"))
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        run_bench("gmm2d", ["rk45"], [4], samples=8)
    for nfe in ("4,x", "0,4", ""):
        with pytest.raises(ValueError, match="--nfe"):
            run(_args("--problem", "gmm2d", "--nfe", nfe))
    with pytest.raises(ValueError, match="--samples"):
        run(_args("--problem", "gmm2d", "--samples", "1"))
    with pytest.raises(ValueError, match="--search-iterations"):
        run(_args("--problem", "gmm2d", "--search-iterations", "0"))


def test_overhead_flag_prints_and_writes_the_overhead_table(tmp_path, capsys, monkeypatch):
    from fewstep.bench import overhead

    tiny = functools.partial(overhead.measure_overhead, shape=(1, 16, 4), steps=4, repeats=1)
    monkeypatch.setattr(overhead, "measure_overhead", tiny)
    assert run(_args("--overhead", "--solvers", "euler", "--out", str(tmp_path))) == 0  # --solvers picks the rows
    out = capsys.readouterr().out
    assert "| euler | bfloat16 |" in out and "| euler | float32 |" in out
    rows = list(csv.DictReader((tmp_path / "overhead.csv").open()))
    assert [(r["solver"], r["shape"]) for r in rows] == [("euler", "1x16x4")] * 2
    assert all(float(r["ratio"]) > 0 for r in rows)
