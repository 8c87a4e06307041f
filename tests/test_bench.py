"""`fewstep bench`: outputs, reproducibility, the grids and peers against closed-form ground truth, the statistics'
exact cases, the headline and its targets, the README block, and every bad option refused before any work."""

import argparse
import csv
import dataclasses
import functools
import json
import math
import re

import numpy as np
import pytest
import scipy.stats
import torch

import fewstep.search
from fewstep.bench import add_arguments, run, run_bench
from fewstep.bench import headline as hl
from fewstep.bench.convergence import convergence_markdown, linear_exact, linear_velocity, measure, stable_limit
from fewstep.bench.grids import get_grid, parse_grids
from fewstep.bench.measure import default_solvers, markdown, problem_files, write_files
from fewstep.bench.peers import PEERS, peer_scheduler, run_peer
from fewstep.bench.problems import Problem, load_problem
from fewstep.bench.stats import error_stats, ratio_ci, rmse_ci
from fewstep.errors import InputFileError, InvalidInput
from fewstep.models.digits import frechet_distance
from fewstep.testbed import GaussianMixture, energy_distance, preset, reference_solve

torch.set_num_threads(1)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _tables(text):  # the printed tables without the wall-time line
    return [line for line in text.splitlines() if not line.startswith("wall time")]


def test_bench_writes_outputs_and_is_reproducible(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--problem", "gmm2d", "--solvers", "euler,adams2", "--nfe", "8,4,5", "--samples", "48",
            "--out", str(out), "--cache", str(cache)]
    assert run(_args(*argv)) == 0
    first = capsys.readouterr().out
    assert len(list(cache.iterdir())) == 1  # the reference solve, cached
    assert run(_args(*argv)) == 0
    assert _tables(capsys.readouterr().out) == _tables(first)  # seeded, and the cached reference is the same
    rows = list(csv.DictReader((out / "gmm2d.csv").open()))
    assert {"problem", "grid", "solver", "nfe", "rmse", "rmse_lo", "rmse_hi", "median_error", "energy_distance",
            "mode_flips", "samples"} <= set(rows[0])
    # 2 fewstep solvers and 5 peers at NFE 4, 5, 8; FlowMatchHeun makes 5 calls only (2n − 1)
    assert len(rows) == 7 * 3 + 1
    assert [r["nfe"] for r in rows if r["solver"] == "FlowMatchHeun"] == ["5"]
    assert all(float(r["rmse_lo"]) <= float(r["rmse"]) <= float(r["rmse_hi"]) for r in rows)
    assert (out / "gmm2d.png").stat().st_size > 1000
    assert (out / "gmm2d.md").read_text().count("best fewstep method") == 3
    assert sorted(p.name for p in out.iterdir()) == [f"gmm2d.{e}" for e in ("csv", "json", "md", "png")]


def _standard_gaussian() -> Problem:
    """Data N(0, I) in 2-D: v(x, σ) = (2σ − 1)/((1 − σ)² + σ²)·x, and the exact flow maps the noise to itself."""
    g = GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    noise = torch.randn(40, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return Problem("gauss", g.velocity, noise, noise.clone(), lambda x: {}, g.velocity, noise, ())


@pytest.mark.parametrize("grid, factor", [("shift1", 0.5), ("shift3", 0.7)])
def test_euler_two_steps_on_a_gaussian_has_the_closed_form_error(grid, factor):
    # shift 1: grid [1, 0.5, 0]; v(·, 1) = x → x/2; v(·, 0.5) = 0 → the sample is x/2, error x/2.
    # shift 3: grid [1, 0.75, 0]; x → 0.75x; v(·, 0.75) = 0.8·(0.75x) → 0.75x − 0.75·0.6x = 0.3x, error 0.7x.
    problem = _standard_gaussian()
    rows = {r["solver"]: r for r in run_bench(problem, ["euler"], [2], grid, progress=False).rows}
    exact = factor * float(problem.noise.pow(2).mean().sqrt())
    assert rows["euler"]["rmse"] == pytest.approx(exact, rel=1e-12)
    assert rows["FlowMatchEuler"]["rmse"] == pytest.approx(exact, rel=1e-6)  # diffusers steps in float32
    norms = problem.noise.norm(dim=1)
    assert rows["euler"]["median_error"] == pytest.approx(factor * float(np.median(norms.numpy())), rel=1e-12)


def test_grids_are_the_pipeline_grids():
    assert np.array_equal(get_grid("shift1").sigmas(4), np.array([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = np.linspace(1.0, 0.25, 4)
    assert get_grid("shift3").sigmas(4) == pytest.approx(np.append(3 * s / (1 + 2 * s), 0.0), abs=1e-7)
    # Flux-dev at 1024²: 4096 packed tokens is its max_image_seq_len, so μ = max_shift = 1.15
    flux = get_grid("flux1024")
    assert flux.mu == pytest.approx(1.15, abs=1e-12)
    e = math.exp(1.15)
    assert flux.sigmas(4) == pytest.approx(np.append(e * s / (1 + (e - 1) * s), 0.0), abs=1e-7)
    assert [g.name for g in parse_grids("all")] == ["shift1", "shift3", "flux1024"]
    assert [g.name for g in parse_grids("shift1,shift1.0,shift3,shift3.00")] == ["shift1", "shift3"]  # ran twice
    for bad in ("shift0", "shiftx", "flux512", "", "shift1e30"):
        with pytest.raises(InvalidInput, match="--grid"):
            parse_grids(bad)
    # `--shift 1e6` names its grid shift1e+06, which must parse back (it was "unknown grid")
    assert [g.shift for g in parse_grids("shift1e+06,shift2E-3,shift.5")] == [1e6, 2e-3, 0.5]
    # two shifts are two grids (six digits made shift 1.0000001 and shift 1 one grid)
    assert [g.name for g in parse_grids("shift1.0000001,shift1")] == ["shift1.0000001", "shift1"]
    # at shift < 1 diffusers' float32 grid starts above 1 (1.0000001 at 0.2): the top is σ = 1 (it was refused)
    sigmas = get_grid("shift0.2").sigmas(4)
    assert sigmas[0] == 1.0 and sigmas[1] == pytest.approx(0.2 * 0.75 / (1 - 0.8 * 0.75), abs=1e-7)
    with pytest.raises(InvalidInput, match=r"--grid shift1e\+15: .* repeats values"):  # every float32 σ rounds to 1
        get_grid("shift1e15").sigmas(4)


@pytest.mark.parametrize("name", list(PEERS))
def test_every_peer_steps_on_the_bench_grid(name):
    g = preset("gmm2d")
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = get_grid("shift3").sigmas(5)
    seen = []

    def model(x, sigma):
        seen.append(sigma)
        return g.velocity(x, sigma)

    x = run_peer(name, model, noise, grid)
    assert torch.isfinite(x).all() and x.dtype == torch.float64
    want = grid[:-1].copy()  # the exponential integrators step on the float64 grid, the FlowMatch ones in float32
    if name in ("FlowMatchEuler", "FlowMatchHeun"):
        want = want.astype(np.float32).astype(np.float64)
    if name == "FlowMatchHeun":  # both stages of every step but the last
        want = np.concatenate([want[:1], np.repeat(want[1:], 2)])
    if name in ("UniPC-2", "UniPC-3", "DPM++2M", "DEIS"):
        want[0] = 1 - 1e-6
    assert np.array_equal(np.array(seen), want)


def test_peers_step_in_float64_from_the_guard_at_one():
    # From σ = 1 − 1e-6 every exponential integrator's first (first-order) step is Euler's; DEIS writes it as
    # (α_t/α_s)·x − σ_t(e^h − 1)·ε̂ with α_t/α_s ≈ 1e5, which in float32 was off from Euler by 0.5.
    g = preset("gmm8d")
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = np.array([1.0, 0.75, 0.0])
    euler = noise + (0.75 - 1.0) * g.velocity(noise, 1.0)
    euler = euler - 0.75 * g.velocity(euler, 0.75)
    for name in ("UniPC-2", "DPM++2M", "DEIS"):
        x = run_peer(name, g.velocity, noise, grid)
        assert (x - euler).abs().max() < 1e-4, name  # the guard's 1e-6 shift and DEIS's end at σ = 1e-6


def test_unipc_on_the_injected_grid_equals_unipc_given_the_same_sigmas():
    # UniPC accepts custom sigmas itself: replacing its grid after set_timesteps must not change what it computes
    import diffusers

    g = preset("gmm8d")
    noise = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = get_grid("shift3").sigmas(6)
    native = diffusers.UniPCMultistepScheduler(**PEERS["UniPC-2"][1], flow_shift=3.0)
    native.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6))
    injected = peer_scheduler("UniPC-2", grid)
    assert native.sigmas.numpy() == pytest.approx(injected.sigmas.numpy(), abs=1e-6)
    x = noise.clone()
    for i, t in enumerate(native.timesteps):
        x = native.step(g.velocity(x, float(native.sigmas[i])), t, x).prev_sample
    assert run_peer("UniPC-2", g.velocity, noise, grid) == pytest.approx(x, abs=1e-4)


def test_error_statistics_exact_cases():
    reference = torch.zeros(3, 2, dtype=torch.float64)
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], dtype=torch.float64)  # L2 errors 5, 1, 10
    got = error_stats(x, reference, resamples=500)
    assert got["rmse"] == pytest.approx(math.sqrt(126 / 6), rel=1e-15)
    assert got["median_error"] == 5.0
    assert got["rmse_lo"] <= got["rmse"] <= got["rmse_hi"]
    assert rmse_ci(np.full(10, 4.0)) == (2.0, 2.0)  # all errors equal: the interval is the point
    # the same noises, errors twice as large (and a little noise): the paired ratio is 2, tightly
    rng = np.random.default_rng(1)
    a = rng.exponential(size=400) ** 3
    lo, hi = ratio_ci(4 * a * (1 + 0.01 * rng.standard_normal(400)), a)
    assert 1.98 < lo < 2 < hi < 2.02
    assert ratio_ci(4 * a, a) == (2.0, 2.0)
    sq = np.random.default_rng(0).exponential(size=2000)  # mean 1: the interval holds RMSE 1 and is narrow
    lo, hi = rmse_ci(sq)
    assert lo < 1 < hi and hi - lo < 0.1


def test_headline_suite_refines_overlapping_cells_and_rewrites_the_readme(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{hl.BEGIN}\nold table\n{hl.END}\n\nrest\n")
    out = tmp_path / "bench"
    argv = ["--suite", "headline", "--problem", "gmm2d", "--grid", "shift1,shift3", "--nfe", "4,5,8",
            "--samples", "32", "--solvers", "euler", "--headline-solver", "stork-2", "--out", str(out), "--readme",
            str(readme),
            "--cache", str(tmp_path / "cache"), "--bootstrap", "200"]
    assert run(_args(*argv)) == 0
    printed = capsys.readouterr().out
    assert "--seed 0 --bootstrap 200 --solvers euler" in (out / "headline.md").read_text()  # the command reruns it
    cells = json.loads((out / "headline.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert all(c["ours_fd_ref"] is None for c in cells)  # a mixture has no FD-ref: null, not NaN
    assert [(c["grid"], c["nfe"]) for c in cells] == [(g, n) for g in ("shift1", "shift3") for n in (4, 5, 8)]
    for c in cells:
        assert c["ratio"] == pytest.approx(c["ours_rmse"] / c["peer_rmse"])
        assert c["ours_samples"] == (64 if c["refined"] else 32)  # --refine 1: as many noises again
        assert c["refined"] == (c["ours_samples"] == 64)
    assert any(c["refined"] for c in cells)
    for c in cells:
        assert c["ratio_lo"] <= c["ratio"] <= c["ratio_hi"] and c["undecided"] == (c["ratio_lo"] <= 1 <= c["ratio_hi"])
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n" + hl.BEGIN + "\n") and text.endswith(hl.END + "\n\nrest\n")
    assert "old table" not in text and "| gmm2d | shift3 |" in text and "(bench/headline.md)" in text
    assert "# Headline: stork-2 against the best diffusers scheduler" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gmm2d.csv", "gmm2d.json", "gmm2d.md", "gmm2d.png", "headline.md", "headline.csv", "headline.json"])


def test_the_default_headline_solver_is_the_registry_recommendation(monkeypatch):
    from fewstep import solvers

    monkeypatch.setattr(solvers, "recommended", lambda: "heun", raising=False)
    assert hl.default_solver() == "heun"
    monkeypatch.delattr(solvers, "recommended")
    assert hl.default_solver() == "stork-2"


def _cell(problem, grid, nfe, ours, peer, euler=1.0):
    return {"problem": problem, "grid": grid, "nfe": nfe, "ours_rmse": ours, "peer_rmse": peer, "peer": "UniPC-2",
            "ratio": ours / peer, "euler_rmse": euler}


def test_targets_are_judged_cell_by_cell():
    cells = [_cell("gmm8d", "shift1", 6, 0.4, 1.0), _cell("gmm8d", "shift1", 7, 0.5, 0.9),
             _cell("gmm8d", "shift1", 8, 0.3, 0.8), _cell("gmm8d", "shift3", 8, 0.96, 0.8),
             _cell("gmm8d", "shift1", 12, 0.2, 0.45), _cell("gmm8d", "shift1", 16, 0.1, 0.2),
             _cell("gmm-stiff", "shift1", 4, 2.0, 1.0), _cell("gmm-stiff", "shift1", 5, 1.05, 1.0)]
    every, half_at_8, euler, rises, half_calls, stiff = hl.targets(cells)
    assert (every["passed"], every["good"], every["cells"]) == (False, 3, 6)  # NFE 4–10 only
    assert [f.split(":")[0] for f in every["failing"]] == ["gmm8d shift3 NFE 8", "gmm-stiff shift1 NFE 4",
                                                          "gmm-stiff shift1 NFE 5"]
    assert every["failing"][0] == "gmm8d shift3 NFE 8: 1.20× UniPC-2 (0.96 vs 0.8)"
    assert (half_at_8["passed"], half_at_8["good"], half_at_8["cells"]) == (True, 1, 2)  # half of 2 cells
    assert (euler["passed"], euler["good"], euler["cells"]) == (False, 6, 8)  # stiff: 2.0 and 1.05 > Euler 1.0
    assert (rises["passed"], rises["good"], rises["cells"]) == (False, 2, 3)  # 6 → 7 rises; 7 → 8, stiff 4 → 5 fall
    # 0.4 at 6 ≤ the peer's 0.45 at 12; 0.3 at 8 > the peer's 0.2 at 16; shift 3 has no cell at 16
    assert (half_calls["passed"], half_calls["good"], half_calls["cells"]) == (False, 1, 2)
    assert (stiff["passed"], stiff["cells"]) == (True, 1)  # from 5 NFE: 1.05 ≤ 1.1
    assert "[ ] RMSE ≤ the best diffusers peer in every cell of NFE 4–10: 3 of 6 cells" in hl.targets_markdown(
        hl.targets(cells))


def test_targets_across_cells_compare_the_same_noises():
    # A refined cell's RMSE also holds its extra noises; its neighbour's and Euler's do not. On the bench's own
    # noises 7 → 8 falls (0.5 → 0.45) and 8 is below Euler (0.45 < 0.5); the refined 0.6 would say the opposite.
    refined = {**_cell("digits", "shift1", 8, 0.6, 0.7, euler=0.5), "ours_base_rmse": 0.45, "peer_base_rmse": 0.4}
    cells = [_cell("digits", "shift1", 7, 0.5, 0.6, euler=0.55), refined]
    _, _, euler, rises, _, _ = hl.targets(cells)
    assert (euler["passed"], rises["passed"]) == (True, True)
    assert hl.targets([cells[0], {**refined, "ours_base_rmse": 0.52}])[3]["failing"] == [
        "digits shift1 NFE 8: 0.5 at 7 → 0.52 at 8"]


def test_readme_needs_both_markers_in_order(tmp_path):
    for text in ("no markers\n", f"{hl.END}\n{hl.BEGIN}\n", f"{hl.BEGIN}\n{hl.BEGIN}\n{hl.END}\n"):
        readme = tmp_path / "README.md"
        readme.write_text(text)
        with pytest.raises(InputFileError, match="--readme"):
            hl.check_readme(readme)
    readme.write_text(f"a\n{hl.BEGIN}\nx\n{hl.END}\nb\n")
    readme.write_bytes(hl.rewritten_readme(readme, "table\n"))
    readme.write_bytes(hl.rewritten_readme(readme, "table\n"))  # idempotent
    assert readme.read_text() == f"a\n{hl.BEGIN}\ntable\n{hl.END}\nb\n"


def test_convergence_orders_on_the_linear_test_ode():
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = linear_exact(noise)
    # dx/dσ = −cos(σ)·x from σ = 1 to 0: x(0) = x(1)·e^{sin 1}
    assert float((reference_solve(linear_velocity, noise, check=False).x - exact).abs().max()) < 1e-8
    euler = measure("euler", linear_velocity, noise, exact, 3.0, (64, 128, 256))
    heun = measure("heun", linear_velocity, noise, exact, 3.0, (64, 128, 256))
    assert euler["local"] == pytest.approx(1.0, abs=0.05) and heun["local"] == pytest.approx(2.0, abs=0.05)
    rows = [{"solver": "stork-2", "problem": p, "shift": s, "order": 2.0, "local_order": 1.8 if p == "gmm8d" else 2.0}
            for p in ("linear", "gmm8d") for s in (1.0, 3.0)]
    assert "≥ 1.9: NOT met (1.80)" in convergence_markdown(rows)


def test_a_solver_with_options_is_its_own_row():
    rows = run_bench("gmm2d", ["stork-2", "stork-2:extrapolate=velocity", "stork-2:compat=official"], [6], samples=16,
                     peers=False, progress=False).rows
    by = {r["solver"]: r["rmse"] for r in rows}
    official = run_bench("gmm2d", ["stork-2-official"], [6], samples=16, peers=False, progress=False).rows[0]
    assert by["stork-2:compat=official"] == official["rmse"]  # the same method under two names
    assert len(set(by.values())) == 3
    for bad in (["stork-2:stages"], ["stork-2:nonsense=1"], ["rk45:stages=2"]):
        with pytest.raises(InvalidInput, match="--solvers"):
            run_bench("gmm2d", bad, [6], samples=16, peers=False, progress=False)


@pytest.mark.parametrize("spec, message", [
    ("adams", "unknown solver 'adams' (did you mean 'adams2'?)"),  # `fewstep generate`'s family name, its default
    ("linear", "unknown solver 'linear' (did you mean 'euler'?)"),  # mflux's Euler alias
    ("stork2", "unknown solver 'stork2' (did you mean 'stork-2'?)"),
    ("ADAMS-DENOISE", "unknown solver 'ADAMS-DENOISE' (did you mean 'adams-denoise'?)"),  # case folded
    ("generate:corrector=true", "'generate' takes no options")])
def test_a_near_miss_in_solvers_names_what_was_meant(spec, message):
    with pytest.raises(InvalidInput, match=re.escape(f"--solvers: {message}" if "unknown" in message else message)):
        run_bench("gmm2d", [spec], [6], samples=16, peers=False, progress=False)


def test_the_generate_row_is_the_recommended_solver_with_generates_options_for_the_guidance():
    # docs/solvers.md: `fewstep generate` turns adams-denoise's stiffness fallback on at classifier-free guidance ≥ 3
    # and its corrector off at ≥ 4; at guidance 1 the row is adams-denoise itself.
    for name, guidance, same_as in (("gmm2d", 1.0, "adams-denoise"),
                                    ("digits-cfg3", 3.0, "adams-denoise:stiff_fallback=True"),
                                    ("digits-cfg5", 5.0, "adams-denoise:corrector=False:stiff_fallback=True")):
        bench = run_bench(name, ["generate", "adams-denoise", same_as], [4], samples=12, peers=False,
                          progress=False)
        by = {r["solver"]: r["rmse"] for r in bench.rows}
        assert bench.problem.guidance == guidance and by["generate"] == by[same_as]
        assert any(note.startswith(f"generate: adams-denoise as `fewstep generate` runs it at this problem's guidance "
                                   f"{guidance:g}") for note in bench.notes)
    assert by["adams-denoise"] != by[same_as]  # at guidance 5 the options change the run
    assert "generate" not in default_solvers()


def test_stability_limits_of_euler_and_heun():
    # one step multiplies x by 1 − z (Euler) or 1 − z + z²/2 (Heun): both stay bounded up to z = 2
    assert stable_limit("euler") == pytest.approx(2.0, abs=1e-6)
    assert stable_limit("heun") == pytest.approx(2.0, abs=1e-6)


def test_reference_solves_are_cached(tmp_path, monkeypatch):
    import fewstep.testbed

    solves = []
    solve = fewstep.testbed.reference_solve
    monkeypatch.setattr(fewstep.testbed, "reference_solve", lambda *a, **k: solves.append(1) or solve(*a, **k))
    first = load_problem("gmm2d", 16, 4, tmp_path)
    again = load_problem("gmm2d", 16, 4, tmp_path)
    assert torch.equal(first.reference, again.reference) and len(solves) == 1
    load_problem("gmm2d", 16, 5, tmp_path)  # other noises: another cache entry, solved anew
    assert len(solves) == 2 and len(list(tmp_path.iterdir())) == 2


def test_searched_neuralsolver_beats_euler_and_is_seeded():
    def once():
        bench = run_bench("gmm2d", ["euler", "neuralsolver-searched"], [4], samples=64, peers=False,
                          search_iterations=40, progress=False)
        return {r["solver"]: r["rmse"] for r in bench.rows}

    first = once()
    assert first["neuralsolver-searched"] < 0.7 * first["euler"]  # 0.075 vs 0.116 at 4 calls on the same grid
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


# FD of the 12 reference digits (seed 0) to the 1797 real ones, measured with the shipped fp16 weights in float64:
# it moves only if the weights, the data, the noises or the FD change (tolerance: reference solve and BLAS rounding).
DIGITS_FD_12 = 44.1039


def test_digits_reference_is_accurate_and_its_fd_is_the_stored_value(digits):
    quality = digits.quality(digits.reference)
    # 12 samples in 128-d features: a rank-11 covariance, whose matrix square root holds to ~1e-4 only
    assert quality["fd_ref"] == pytest.approx(0.0, abs=1e-3)
    assert quality["fd"] == pytest.approx(DIGITS_FD_12, abs=1e-3)
    assert "max |error|" in digits.notes[1] and float(digits.notes[1].split("max |error| ")[1].split(",")[0]) < 1e-5
    assert "noise floor (two random halves of the real data, 899 and 898)" in digits.notes[2]


def test_digits_bench_writes_sample_grid(digits, tmp_path):
    bench = run_bench(digits, ["euler"], [4, 8], peers=False, progress=False)
    assert markdown(bench).count("FD to real data / FD-ref") == 1
    write_files({tmp_path / name: data for name, data in problem_files([bench], "digits", "digits test").items()})
    rows = list(csv.DictReader((tmp_path / "digits.csv").open()))
    assert [float(r["fd_ref"]) > 0 for r in rows] == [True, True]
    assert float(rows[0]["fd_ref"]) > float(rows[1]["fd_ref"])  # euler at 8 calls is closer to the exact flow
    from PIL import Image

    grid = Image.open(tmp_path / "digits-shift1-samples.png")
    assert grid.height > 2 * 16 and grid.width > 2 * 10 * 16  # reference + euler rows, two NFE columns
    assert (tmp_path / "digits.png").stat().st_size > 1000


def test_digits_with_guidance_samples_the_guided_flow(digits, monkeypatch):
    import fewstep.testbed
    from fewstep.models.digits import load_embedded

    # the reference solve is not what is checked here: skip its minute of DOP853
    monkeypatch.setattr(fewstep.testbed, "reference_solve",
                        lambda v, x, **k: fewstep.testbed.ReferenceSolution(x.clone(), 0.0, 0))
    cfg = load_problem("digits-cfg3", 12, 0)
    assert torch.equal(cfg.noise, digits.noise)
    guided = load_embedded(dtype=torch.float64).velocity_fn(torch.arange(12) % 10, 3.0)
    assert torch.equal(cfg.velocity(cfg.noise, 0.5), guided(cfg.noise, 0.5))
    assert float((cfg.velocity(cfg.noise, 0.5) - digits.velocity(digits.noise, 0.5)).abs().max()) > 0.1
    assert "classifier-free guidance 3" in cfg.notes[0]


@pytest.mark.parametrize("argv, flag", [
    (["--problem", "cifar"], "--problem"), (["--grid", "shift-1"], "--grid"), (["--shift", "0"], "--shift"),
    (["--nfe", "4,x"], "--nfe"), (["--nfe", "0,4"], "--nfe"), (["--nfe", ""], "--nfe"),
    (["--samples", "0"], "--samples"), (["--samples", "1"], "--samples"), (["--image-samples", "0"], "--image-samples"),
    (["--refine", "-1"], "--refine"), (["--bootstrap", "0"], "--bootstrap"), (["--search-iterations", "0"],
                                                                                "--search-iterations"),
    (["--solvers", "rk45"], "--solvers"), (["--headline-solver", "rk45"], "--headline-solver"),
    (["--readme", "README.md"], "--readme"), (["--suite", "headline", "--no-peers"], "--no-peers"),
    (["--grid", "shift1", "--shift", "3"], "--shift"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--shift", "inf"], "--shift"), (["--out", ""], "--out"), (["--cache", " "], "--cache"),
    (["--samples", str(10**12)], "--samples"),
    (["--image-samples", "10001"], "--image-samples"), (["--nfe", "4,100000"], "--nfe"),
    (["--bootstrap", str(10**9)], "--bootstrap"), (["--search-iterations", str(10**7)], "--search-iterations"),
    (["--suite", "headline", "--samples", "6000"], "--refine"),  # a refined cell: 12,000 noises
    (["--suite", "transfer", "--samples", "10001"], "--samples")])
def test_bad_options_are_refused_before_any_work(argv, flag, monkeypatch):
    import fewstep.bench.measure

    monkeypatch.setattr(fewstep.bench.measure, "run_bench", lambda *a, **k: pytest.fail("computed before refusing"))
    full = argv if "--problem" in argv else ["--problem", "gmm2d", *argv]
    with pytest.raises(InvalidInput, match=flag):
        run(_args(*full))


@pytest.mark.parametrize("argv", [["--suite", "convergence", "--grid", "flux1024"], ["--suite", "convergence",
                                  "--solvers", "euler"], ["--suite", "convergence", "--bootstrap", "100"],
                                  ["--suite", "overhead", "--nfe", "4"], ["--overhead", "--seed", "3"],
                                  ["--overhead", "--problem", "gmm2d"]])
def test_the_fixed_suites_refuse_the_flags_they_would_ignore(argv, monkeypatch):
    from fewstep.bench import convergence, overhead

    for module, name in ((convergence, "run_convergence"), (overhead, "measure_overhead")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("computed before refusing"))
    suite = "overhead" if "overhead" in " ".join(argv) else "convergence"
    with pytest.raises(InvalidInput, match=f"^{argv[-2]} does not apply to the {suite} suite"):
        run(_args(*argv))


def test_bad_output_paths_are_refused_before_any_work(tmp_path, monkeypatch):
    import fewstep.bench.measure

    monkeypatch.setattr(fewstep.bench.measure, "run_bench", lambda *a, **k: pytest.fail("computed before refusing"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputFileError, match="--out"):
        run(_args("--problem", "gmm2d", "--out", str(a_file)))
    with pytest.raises(InputFileError, match="--readme"):
        run(_args("--suite", "headline", "--readme", str(tmp_path / "missing.md")))
    no_markers = tmp_path / "README.md"
    no_markers.write_text("# readme\n")
    with pytest.raises(InputFileError, match="--readme"):
        run(_args("--suite", "headline", "--readme", str(no_markers)))
    with pytest.raises(InputFileError, match="--cache"):
        run(_args("--problem", "gmm2d", "--cache", str(a_file)))
    out = tmp_path / "out"  # every output of the run, not only the folder, is checked before the run
    for argv, name in [(("--problem", "gmm2d"), "gmm2d.png"), (("--problem", "gmm2d"), "gmm2d.md"),
                       (("--problem", "digits"), "digits-shift3-samples.png"),
                       (("--suite", "headline", "--problem", "gmm2d"), "headline.json")]:
        (out / name).mkdir(parents=True)
        with pytest.raises(InputFileError, match=f"--out {out / name} is a directory"):
            run(_args(*argv, "--grid", "shift1,shift3", "--out", str(out)))
        (out / name).rmdir()
    assert list(out.iterdir()) == []


def _tiny(*argv):  # a run of seconds
    return _args("--problem", "gmm2d", "--samples", "16", "--no-peers", "--bootstrap", "100", *argv)


def test_a_failed_run_writes_no_output_and_keeps_the_old_ones(tmp_path, monkeypatch):
    import fewstep.bench.measure

    out = tmp_path / "out"
    out.mkdir()
    (out / "gmm2d.csv").write_text("old")
    writes = []

    def fails_third(path, data, what="output"):
        writes.append(path)
        if len(writes) == 3:
            raise InputFileError(f"{what} {path}: cannot write (No space left on device)")
        return atomic_write(path, data, what)

    atomic_write = fewstep.bench.measure.atomic_write
    monkeypatch.setattr(fewstep.bench.measure, "atomic_write", fails_third)
    with pytest.raises(InputFileError, match="No space left"):
        run(_tiny("--solvers", "euler", "--nfe", "4", "--cache", str(tmp_path / "cache"), "--out", str(out)))
    assert len(writes) == 3 and all(p.parent == out and p.name.startswith(".") for p in writes)  # beside the targets
    assert [p.name for p in out.iterdir()] == ["gmm2d.csv"] and (out / "gmm2d.csv").read_text() == "old"


def test_cells_a_method_cannot_make_are_named_on_stderr(tmp_path, capsys):
    # heun makes even counts only; the shipped neuralsolver file has 5 to 10 steps; both raise a StepCountError
    assert run(_tiny("--solvers", "euler,heun,neuralsolver", "--nfe", "3,4", "--cache", str(tmp_path))) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("note")] == [
        "note: heun cannot make 3 model calls (it can make 2, 4, 6); its cells are left out",
        "note: neuralsolver cannot make 3, 4 model calls (it has 5, 6, 7, 8, 9, 10 steps); its cells are left out"]
    assert "| heun | – | " in captured.out and "| neuralsolver |" not in captured.out
    # a search takes 2 to 50 steps: any other count is a cell left out, not a crash nor an hours-long search
    bench = run_bench("gmm2d", ["neuralsolver-searched"], [1, 51], samples=16, peers=False, progress=False)
    assert bench.rows == [] and sorted(bench.skipped["neuralsolver-searched"]) == [1, 51]


def test_a_failed_reference_solve_is_one_error_naming_the_problem(tmp_path, monkeypatch):
    import fewstep.testbed

    def fails(*args, **kwargs):
        raise RuntimeError("reference solve accuracy check failed: 1e-3 > 1e-7")

    monkeypatch.setattr(fewstep.testbed, "reference_solve", fails)
    with pytest.raises(InvalidInput, match="--problem gmm2d: reference solve accuracy check failed"):
        load_problem("gmm2d", 8, 0, tmp_path)


def test_a_model_module_becomes_a_problem_with_one_registry_line(monkeypatch):
    import sys
    import types

    from fewstep.bench import problems

    module = types.ModuleType("fake_model")
    module.bench_problem = lambda samples, seed, guidance, cache, progress: dataclasses.replace(_standard_gaussian(),
                                                                                              name="x")
    module.to_image = lambda x, scale, nrow: None
    monkeypatch.setitem(sys.modules, "fake_model", module)
    monkeypatch.setitem(problems.PROBLEMS, "fake", problems.from_module("fake_model"))
    problem = load_problem("fake", 40, 1)
    assert problem.name == "fake" and problem.to_image is module.to_image and problems.is_image("fake")

    def missing(samples, seed, guidance, cache, progress):
        raise FileNotFoundError(2, "No such file or directory", "weights.safetensors")

    module.bench_problem = missing
    with pytest.raises(InputFileError, match="--problem fake: No such file or directory: weights.safetensors"):
        load_problem("fake", 40, 1)


def test_cli_prints_one_line_for_a_bad_sample_count(capsys):
    from fewstep.cli import main

    assert main(["bench", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--samples must be at least 2, got 0" in err


def test_a_reference_solve_the_cache_cannot_store_is_still_used(tmp_path, capsys):
    # a folder where the cache file goes: the solve was done, then the run failed ("… is a directory")
    from fewstep.bench.problems import cached

    (tmp_path / "key.pt").mkdir()
    assert cached(tmp_path, "key", lambda: {"x": torch.ones(2)})["x"].tolist() == [1.0, 1.0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: this reference solve is not stored in the cache {tmp_path} (" in err
    assert (tmp_path / "key.pt").is_dir()


def test_a_run_where_no_method_makes_the_calls_is_an_error_and_writes_nothing(tmp_path, capsys):
    from fewstep.cli import main

    out = tmp_path / "out"
    args = ["bench", "--problem", "gmm2d", "--solvers", "heun", "--nfe", "3", "--samples", "8", "--no-peers", "-q",
            "--no-cache", "--out", str(out)]
    assert main(args) == 2  # it printed an empty table, wrote it, and exited 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "--nfe 3: no method can make these model calls (heun cannot make 3 " \
        "model calls (it can make 2, 4, 6))" in captured.err
    assert not out.exists() and captured.out == ""
    # -q keeps stderr free of progress bars; the table still prints
    assert main(["bench", "--problem", "gmm2d", "--solvers", "euler", "--nfe", "2", "--samples", "8", "--no-peers",
                 "--no-cache", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "| euler |" in captured.out


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


@pytest.mark.parametrize("solvers, fragment", [("nope", "unknown solver 'nope'"),
                                               ("neuralsolver", "no 28-step solver"),  # the suite times 28 steps
                                               ("euler,Stork-2", "did you mean 'stork-2'?")])
def test_overhead_names_solvers_it_cannot_time(tmp_path, solvers, fragment):
    with pytest.raises(InvalidInput, match=r"^--solvers: .*" + re.escape(fragment)):
        run(_args("--overhead", "--solvers", solvers, "--out", str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
