"""`fewstep bench` on the exact testbed: outputs, reproducibility, peers' sanity."""

import argparse
import csv

import pytest

from fewstep.bench import add_arguments, run, run_bench


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_writes_csv_json_png_and_is_reproducible(tmp_path, capsys):
    argv = ["--problem", "gmm2d", "--solvers", "euler,adams2", "--nfe", "4,8", "--samples", "64",
            "--out", str(tmp_path)]
    assert run(_args(*argv)) == 0
    first = capsys.readouterr().out
    assert run(_args(*argv)) == 0
    assert capsys.readouterr().out == first  # seeded: the same table twice
    rows = list(csv.DictReader((tmp_path / "gmm2d-shift1.csv").open()))
    assert {"problem", "solver", "nfe", "rmse", "median_error"} <= set(rows[0])
    assert len(rows) == (2 + 3) * 2  # (2 solvers + 3 diffusers peers) × 2 NFE
    assert (tmp_path / "gmm2d-shift1.json").exists() and (tmp_path / "gmm2d-shift1.png").stat().st_size > 1000
    assert "best fewstep solver" in first


def test_peer_errors_are_sane_and_euler_matches_flow_match_euler():
    rows = run_bench("gmm2d", ["euler"], [4, 8, 16], samples=64)
    fm = [r["rmse"] for r in rows if r["solver"] == "FlowMatchEulerDiscreteScheduler"]
    ours = [r["rmse"] for r in rows if r["solver"] == "euler"]
    assert fm[0] > fm[1] > fm[2]
    assert max(abs(a - b) for a, b in zip(fm, ours, strict=True)) <= 1e-5


def test_bad_problem_and_solver():
    with pytest.raises(ValueError, match="unknown problem"):
        run(_args("--problem", "cifar"))
    with pytest.raises(ValueError, match="unknown solver"):
        run_bench("gmm2d", ["rk45"], [4], samples=8)
