"""NeuralSolver: reproduction of the official samplers, solver files, VP path, search and the search CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.sampling import make_plan
from fewstep.solvers.neuralsolver import SolverFile, neuralsolver
from fewstep.testbed import preset

torch.set_num_threads(1)  # the search is seeded and thread-count dependent: docs/neuralsolver.md §Search

DATA = Path(__file__).resolve().parent / "data"  # the official implementations' outputs: tests/data/README.md


@pytest.fixture(scope="module")
def ref():
    return np.load(DATA / "neuralsolver_official.npz")


def rel(a: torch.Tensor, b: np.ndarray) -> float:
    """The reference metric of tests/data/README.md: max|a − ref| / max|ref|."""
    return float(np.max(np.abs(a.numpy() - b)) / np.max(np.abs(b)))


def rmse(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.numpy() - b) ** 2)))


@pytest.mark.parametrize(("name", "key", "steps"), [("sit", "ns_sit", range(5, 11)),
                                                     ("flowdcn", "ns_flowdcn", (5, 6, 7, 8, 9, 10, 15))])
def test_flow_tables_reproduce_official_samplers(ref, name, key, steps):
    g, noise = preset("gmm8d"), torch.from_numpy(ref["noise"])
    for n in steps:
        exact = fewstep.sample(g.velocity, noise, "neuralsolver", n, solver_file=name, exact_float32=True)
        plain = fewstep.sample(g.velocity, noise, "neuralsolver", n, solver_file=name)
        assert rel(exact, ref[f"{key}/src/N{n}/x"]) <= 1e-12  # measured ≤ 3.2e−14
        assert rel(plain, ref[f"{key}/src/N{n}/x"]) <= 5e-6  # measured ≤ 1.3e−7
        plan = make_plan("neuralsolver", n, solver_file=name, exact_float32=True)
        np.testing.assert_array_equal(plan.sigmas, ref[f"{key}/src/N{n}/sigmas_called"])
        if f"{key}/diffusers/N{n}/x" in ref:  # upstream's diffusers scheduler builds its grid in float32
            assert rel(plain, ref[f"{key}/diffusers/N{n}/x"]) <= 1e-5  # measured ≤ 1.9e−6


def test_vp_table_reproduces_single_update_scheduler(ref):
    g, noise = preset("gmm8d"), torch.from_numpy(ref["noise"])
    for n in range(5, 11):
        x = fewstep.sample(g.epsilon, noise, "neuralsolver", n, solver_file="dit", prediction="epsilon")
        assert rel(x, ref[f"vp/ns_dit/N{n}/x"]) <= 1e-5  # measured ≤ 2.3e−6 (upstream: float32 α, σ)
        # docs/neuralsolver.md §ε-prediction: the single update beats DDIM and the released double update.
        err = rmse(x, ref["vp/exact"])
        assert err < rmse(torch.from_numpy(ref[f"vp/ddim/N{n}/x"]), ref["vp/exact"])
        assert err < rmse(torch.from_numpy(ref[f"vp/ns_dit_src_as_released/N{n}/x"]), ref["vp/exact"])


def test_vp_identity_matrix_is_official_ddim(ref):
    """M = I, uniform Δt = 1/N from t = 0.999: exactly upstream's DPM1sSolverSampler (DDIM)."""
    g, noise = preset("gmm8d"), torch.from_numpy(ref["noise"])
    for n in (5, 8):
        file = SolverFile("epsilon", {n: (np.full(n, 1.0 / n), np.eye(n))}, start=0.999)
        x = fewstep.sample(g.epsilon, noise, neuralsolver(file), n, prediction="epsilon")
        assert rel(x, ref[f"vp/ddim/N{n}/x"]) <= 1e-12


def test_plan_uses_searched_grid_and_lists_available_steps():
    plan = make_plan("neuralsolver", 6, solver_file="flowdcn")
    dt, _ = SolverFile.load("flowdcn").steps[6]
    np.testing.assert_allclose(plan.sigmas, 1.0 - np.concatenate([[0.0], np.cumsum(dt)[:-1]]), atol=1e-15)
    assert abs(plan.sigma_end) < 2e-4  # published Δt sum to 0.9999–1.0002, not renormalised
    with pytest.raises(ValueError, match="has 5, 6, 7, 8, 9, 10 steps"):
        make_plan("neuralsolver", 4, solver_file="sit")
    assert neuralsolver("dit").prediction == "epsilon" and neuralsolver("sit").prediction == "flow"


def _write(tmp_path: Path, **changes) -> Path:
    data = SolverFile("flow", {2: (np.array([0.4, 0.6]), np.array([[1.0, 0.0], [-0.5, 1.5]]))}).to_json()
    data.update(changes)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 7}, "unknown version 7"),
    ({"format": "other"}, "field 'format'"),
    ({"prediction": "x0"}, "prediction must be"),
    ({"steps": {"2": {"timedeltas": [0.4, 0.6], "matrix": [[1.0, 0.0], [-0.5, 1.4]]}}}, "row 1 sums to 0.9"),
    ({"steps": {"2": {"timedeltas": [0.4, 0.3, 0.3], "matrix": [[1.0, 0.0], [-0.5, 1.5]]}}}, r"shape \(3,\)"),
    ({"steps": {"3": {"timedeltas": [0.4, 0.6], "matrix": [[1.0, 0.0], [-0.5, 1.5]]}}}, r"expected \(3,\)"),
    ({"steps": {"2": {"timedeltas": [0.4, float("nan")], "matrix": [[1, 0], [0, 1]]}}}, "non-finite"),
    ({"steps": {"2": {"timedeltas": [0.4, 0.6], "matrix": [[0.5, 0.5], [0, 1]]}}}, "lower-triangular"),
    ({"steps": {"2": {"timedeltas": [0.4, 0.6]}}}, "missing or malformed field 'matrix'"),
    ({"version": True}, "unknown version True"),
    ({"version": 1.0}, "unknown version 1.0"),
    ({"start": "1"}, "start must be a number, got '1'"),
    ({"steps": {"2": {"timedeltas": [0.4, 0.6], "matrix": [[1.0, 0.0], ["-0.5", 1.5]]}}}, "not a rectangular array"),
    ({"steps": {"2": {"timedeltas": [True, 0.6], "matrix": [[1.0, 0.0], [-0.5, 1.5]]}}}, "not a rectangular array"),
    # the searched grid, compared with the caller's shift when sampling (was a math domain error there)
    ({"provenance": {"grid": {"shift": -1}}}, r"provenance.grid: shift must be a number from e\^-50"),
    ({"provenance": {"grid": {"shift": "abc"}}}, "provenance.grid: shift must be"),
    ({"provenance": {"grid": {"shift": [3]}}}, "provenance.grid: shift must be"),
    ({"provenance": {"grid": {"mu": 1000}}}, "provenance.grid: mu must be a finite number from -50 to 50"),
    ({"provenance": {"grid": {"mu": "x"}}}, "provenance.grid: mu must be"),
    ({"provenance": {"grid": 3}}, "provenance.grid must be a JSON object"),
])
def test_file_validation_errors_name_file_and_field(tmp_path, change, message):
    path = _write(tmp_path, **change)
    with pytest.raises(ValueError, match=message) as err:
        SolverFile.load(path)
    assert str(path) in str(err.value)


def test_round_trip_and_atomic_save(tmp_path):
    original = SolverFile.load("flowdcn")
    path = tmp_path / "copy.json"
    path.write_text("old")
    original.save(path)
    again = SolverFile.load(path)
    assert again.prediction == "flow" and sorted(again.steps) == sorted(original.steps)
    for n, (dt, m) in original.steps.items():
        np.testing.assert_array_equal(again.steps[n][0], dt)
        np.testing.assert_array_equal(again.steps[n][1], m)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.json"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="shipped: sit, flowdcn, dit, digits-shift1, digits-shift3"):
        SolverFile.load("nope")


def test_exact_float32_takes_a_boolean_only():
    """The string "no" is truthy: it silently turned float32 rounding on."""
    from fewstep.errors import InvalidInput

    for bad in ("no", "false", 0, None):
        with pytest.raises(InvalidInput, match="exact_float32 must be True or False"):
            fewstep.solvers.get("neuralsolver", solver_file="sit", exact_float32=bad)
