"""NeuralSolver: a searched multistep solver, a time grid plus a lower-triangular weight matrix (NEURALSOLVER.md §4).

Flow (diffusers convention): σ_0 = 1, σ_{i+1} = σ_i − Δt_i and

    x_{i+1} = x_i − Δt_i·Σ_{j≤i} M_ij·v_j            (rows of M sum to 1; row 0 = Euler)

ε-prediction / VP (§5, the single update of `vp_scheduling.py`): t_0 = 0.999, t_{i+1} = t_i − Δt_i (clamped at
1e−3), D = x0-prediction, ρ = α/σ. `fewstep.sample` runs ε-models in flow coordinates s = σ/(α+σ), x̃ = x/(α+σ),
where D = x̃ − s·v and ρ = (1−s)/s, so the update stays linear in (x̃_j, v_j) and is a plain Plan:

    x̃_{i+1} = (s_{i+1}/s_i)·x̃_i + s_{i+1}(ρ_{i+1} − ρ_i)·Σ_{j≤i} M_ij·(x̃_j − s_j·v_j)

The searched grid is used verbatim, as upstream does (§7): the caller's grid only tells the number of steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.schedules import VPSchedule
from fewstep.solvers.plan import Plan, Row, StepCountError
from fewstep.solvers.registry import SolverInfo, register

FORMAT = "fewstep.neuralsolver"
VERSION = 1
DATA = Path(__file__).resolve().parent.parent / "data" / "neuralsolver"
SHIPPED = {"sit": "searched_fm_sit.json", "flowdcn": "searched_fm_flowdcn.json", "dit": "searched_ddpm_dit.json"}
VP_START = 0.999  # upstream VP grids start at t = 0.999 (§5)


@dataclass
class SolverFile:
    """Searched solvers for one model: per step count N, Δt (N,) and the full matrix M (N, N) with diagonal."""

    prediction: str  # "flow" or "epsilon"
    steps: dict[int, tuple[np.ndarray, np.ndarray]]
    start: float = 1.0  # σ_0 (flow) or VP t_0 (epsilon)
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"  # where it was loaded from, for error messages

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def fail(what: str) -> None:
            raise ValueError(f"solver file {self.source}: {what}")

        if self.prediction not in ("flow", "epsilon"):
            fail(f"prediction must be 'flow' or 'epsilon', got {self.prediction!r}")
        if not self.steps:
            fail("no solvers in 'steps'")
        if not np.isfinite(self.start):
            fail(f"start is not finite: {self.start}")
        for n, (dt, m) in self.steps.items():
            where = f"steps[{n}]"
            dt, m = np.asarray(dt, dtype=np.float64), np.asarray(m, dtype=np.float64)
            if dt.shape != (n,):
                fail(f"{where}.timedeltas has shape {dt.shape}, expected ({n},)")
            if m.shape != (n, n):
                fail(f"{where}.matrix has shape {m.shape}, expected ({n}, {n})")
            if not (np.isfinite(dt).all() and np.isfinite(m).all()):
                fail(f"{where} contains non-finite values")
            if (dt <= 0).any():
                fail(f"{where}.timedeltas must be positive, got {dt.tolist()}")
            if np.triu(m, 1).any():
                fail(f"{where}.matrix must be lower-triangular (a step cannot use a later evaluation)")
            bad = np.nonzero(np.abs(m.sum(1) - 1.0) > 1e-6)[0]
            if len(bad):
                fail(f"{where}.matrix row {int(bad[0])} sums to {m[bad[0]].sum():.9g}, not 1 (consistency, §4)")
            self.steps[n] = (dt, m)

    @classmethod
    def load(cls, path_or_name: str | os.PathLike) -> SolverFile:
        """A shipped table (`sit`, `flowdcn`, `dit`), a fewstep solver file, or a published upstream JSON."""
        path = DATA / SHIPPED[path_or_name] if path_or_name in SHIPPED else Path(path_or_name)
        if not path.is_file():
            raise FileNotFoundError(f"no solver file {str(path_or_name)!r} (shipped: {', '.join(SHIPPED)})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"solver file {path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"solver file {path}: expected a JSON object")
        if "solvers" in data and "format" not in data:
            return cls._from_published(data, str(path))
        if data.get("format") != FORMAT:
            raise ValueError(f"solver file {path}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"solver file {path}: unknown version {data.get('version')!r} (this fewstep reads "
                             f"version {VERSION})")
        try:
            steps = {int(k): (np.asarray(v["timedeltas"], dtype=np.float64), np.asarray(v["matrix"], dtype=np.float64))
                     for k, v in data["steps"].items()}
            return cls(data["prediction"], steps, float(data["start"]), data.get("provenance", {}), str(path))
        except (KeyError, TypeError) as err:
            raise ValueError(f"solver file {path}: missing or malformed field {err}") from None

    @classmethod
    def _from_published(cls, data: dict, source: str) -> SolverFile:
        """Upstream JSON (data/neuralsolver/README.md): strictly-lower C, diagonal implied."""
        epsilon = "VP" in data["meta"].get("convention", "") or "DDPM" in data["meta"].get("what", "")
        steps = {}
        for entry in data["solvers"].values():
            c = np.tril(np.asarray(entry["coeffs_strictly_lower"], dtype=np.float64), -1)
            steps[int(entry["num_steps"])] = (np.asarray(entry["timedeltas"], dtype=np.float64),
                                               c + np.diag(1.0 - c.sum(1)))
        provenance = {"source": f"{data['meta']['repository']}@{data['meta']['commit']}",
                      "model": data["meta"].get("what", ""), "license": data["meta"].get("license", "")}
        return cls("epsilon" if epsilon else "flow", steps, VP_START if epsilon else 1.0, provenance, source)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "prediction": self.prediction, "start": self.start,
                "provenance": self.provenance,
                "steps": {str(n): {"timedeltas": dt.tolist(), "matrix": m.tolist()}
                          for n, (dt, m) in sorted(self.steps.items())}}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file in the same folder + os.replace): a crash never leaves half a file."""
        from fewstep.files import atomic_write

        atomic_write(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())


@dataclass(frozen=True)
class NeuralSolver:
    """`exact_float32`: round Δt and the strictly-lower C to float32 (the official tensors) and recompute the
    diagonal in float64, as upstream's src sampler does — reproduces `ns_*/src` to ~1e−15."""

    file: SolverFile
    exact_float32: bool = False

    @property
    def prediction(self) -> str:
        return self.file.prediction

    def calls(self, intervals: int) -> int:
        return intervals

    def coefficients(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n not in self.file.steps:
            raise StepCountError(f"solver file {self.file.source} has no {n}-step solver; it has "
                             f"{', '.join(map(str, sorted(self.file.steps)))} steps")
        dt, m = self.file.steps[n]
        if not self.exact_float32:
            return dt, m
        c = np.tril(m, -1).astype(np.float32).astype(np.float64)
        return dt.astype(np.float32).astype(np.float64), c + np.diag(1.0 - c.sum(1))

    def plan(self, grid: np.ndarray) -> Plan:
        n = len(grid) - 1
        dt, m = self.coefficients(n)
        # Times accumulated in float64 from the start, as the official src sampler does (reference README §3).
        times = self.file.start - np.concatenate([[0.0], np.cumsum(dt)])
        if self.prediction == "flow":
            rows = tuple(Row.step(i, dt[i], {j: m[i, j] for j in range(i + 1)}) for i in range(n))
            return Plan(times[:-1].copy(), float(times[-1]), rows)
        s = VPSchedule().to_flow(times)  # the DiT schedule, t clamped at 1e−3 (§5)
        rho = (1.0 - s) / s
        rows = []
        for i in range(n):
            c = s[i + 1] * (rho[i + 1] - rho[i]) * m[i, :i + 1]
            x = {j: float(c[j]) for j in range(i + 1)}
            x[i] += s[i + 1] / s[i]
            rows.append(Row(x, {j: float(-c[j] * s[j]) for j in range(i + 1)}))
        return Plan(s[:-1].copy(), float(s[-1]), tuple(rows))


def neuralsolver(solver_file: str | os.PathLike | SolverFile = "sit", exact_float32: bool = False) -> NeuralSolver:
    """`solver_file`: a shipped name (sit, flowdcn, dit), a path, or a SolverFile."""
    file = solver_file if isinstance(solver_file, SolverFile) else SolverFile.load(solver_file)
    return NeuralSolver(file, exact_float32)


register(SolverInfo("neuralsolver", neuralsolver, "searched", 1, "5-10",
                    "searched multistep solver from a file (solver_file=sit|flowdcn|dit|path); `fewstep search`"))
