"""NeuralSolver: a searched multistep solver, a time grid plus a lower-triangular weight matrix (docs/neuralsolver.md).

Flow (diffusers convention): σ_0 = 1, σ_{i+1} = σ_i − Δt_i and

    x_{i+1} = x_i − Δt_i·Σ_{j≤i} M_ij·v_j            (rows of M sum to 1; row 0 = Euler)

ε-prediction / VP (the single update of `vp_scheduling.py`): t_0 = 0.999, t_{i+1} = t_i − Δt_i (clamped at
1e−3), D = x0-prediction, ρ = α/σ. `fewstep.sample` runs ε-models in flow coordinates s = σ/(α+σ), x̃ = x/(α+σ),
where D = x̃ − s·v and ρ = (1−s)/s, so the update stays linear in (x̃_j, v_j) and is a plain Plan:

    x̃_{i+1} = (s_{i+1}/s_i)·x̃_i + s_{i+1}(ρ_{i+1} − ρ_i)·Σ_{j≤i} M_ij·(x̃_j − s_j·v_j)

The searched grid is used verbatim, as upstream does: the caller's grid only tells the number of steps.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.errors import InputFileError, InvalidInput
from fewstep.schedules import VPSchedule, shift_problem
from fewstep.solvers.plan import Plan, Row, StepCountError
from fewstep.solvers.registry import SolverInfo, register

FORMAT = "fewstep.neuralsolver"
VERSION = 1
DATA = Path(__file__).resolve().parent.parent / "data" / "neuralsolver"
# The published tables, then the files searched here for the embedded digits model (data/neuralsolver/README.md).
SHIPPED = {"sit": "searched_fm_sit.json", "flowdcn": "searched_fm_flowdcn.json", "dit": "searched_ddpm_dit.json",
           "digits-shift1": "digits-shift1.json", "digits-shift3": "digits-shift3.json"}
VP_START = 0.999  # upstream VP grids start at t = 0.999 (docs/neuralsolver.md §ε-prediction)
MIN_VP_START = 0.99  # an ε solver file must start near t = 1 (pure noise)
START_TOLERANCE = 1e-6
END_TOLERANCE = 2e-3  # published Δt sum to 1 within 2e−4 (flow, 4 decimals); VP grids end at about −1e−3
MAX_STEPS = 1000
MAX_FILE_BYTES = 16 * 2**20


class SolverFileNotFound(InputFileError, FileNotFoundError):
    """No solver file at the given path (and not a shipped name)."""


def _only_numbers(value: Any) -> bool:
    """Numbers all the way down: NumPy will read "-0.5" and true as floats, a solver file may only hold numbers."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iuf"
    if isinstance(value, (list, tuple)):
        return all(_only_numbers(v) for v in value)
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


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
        """Raise `InvalidInput` naming the file and the field unless every solver is usable: N ≥ 1 positive Δt and
        an (N, N) lower-triangular M with rows summing to 1, and times that run from σ = 1 to 0 (flow: start 1,
        Σ Δt = 1; ε: VP time from `start` ≈ 1 down to ≈ 0, upstream clamps the end at 1e−3)."""
        def fail(what: str) -> None:
            raise InvalidInput(f"solver file {self.source}: {what}")

        if self.prediction not in ("flow", "epsilon"):
            fail(f"prediction must be 'flow' or 'epsilon', got {self.prediction!r}")
        if not isinstance(self.steps, dict) or not self.steps:
            fail("no solvers in 'steps'")
        if not isinstance(self.provenance, dict):
            fail(f"'provenance' must be a JSON object, got {type(self.provenance).__name__}")
        grid = self.provenance.get("grid")
        if grid is not None:  # the searched grid, which sampling compares with the caller's shift / μ
            if not isinstance(grid, dict):
                fail(f"provenance.grid must be a JSON object, got {grid!r}")
            problem = shift_problem(1.0 if grid.get("shift") is None else grid["shift"], grid.get("mu"))
            if problem:
                fail(f"provenance.grid: {problem}")
        if isinstance(self.start, bool) or not isinstance(self.start, (int, float, np.integer, np.floating)):
            fail(f"start must be a number, got {self.start!r}")
        try:
            start = float(self.start)
        except OverflowError:
            fail(f"start must be a finite number, got {self.start!r}")
        if not np.isfinite(start):
            fail(f"start is not finite: {self.start}")
        lowest = 1.0 if self.prediction == "flow" else MIN_VP_START
        if not lowest - START_TOLERANCE <= start <= 1.0 + START_TOLERANCE:
            where = "σ = 1" if self.prediction == "flow" else f"VP time {MIN_VP_START}..1 (upstream: {VP_START})"
            fail(f"start is {start:g}, but sampling starts at {where}")
        self.start = start
        for n, (dt, m) in list(self.steps.items()):
            where = f"steps[{n}]"
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_STEPS:
                fail(f"step count {n!r} must be an integer from 1 to {MAX_STEPS}")
            for name, value in (("timedeltas", dt), ("matrix", m)):
                try:
                    np.asarray(value, dtype=np.float64)
                    numbers = _only_numbers(value)
                except (TypeError, ValueError, OverflowError):
                    numbers = False
                if not numbers:
                    fail(f"{where}.{name} is not a rectangular array of numbers (ragged rows or non-numbers)")
            dt, m = np.asarray(dt, dtype=np.float64), np.asarray(m, dtype=np.float64)
            if dt.shape != (n,):
                fail(f"{where}.timedeltas has shape {dt.shape}, expected ({n},)")
            if m.shape != (n, n):
                fail(f"{where}.matrix has shape {m.shape}, expected ({n}, {n})")
            if not (np.isfinite(dt).all() and np.isfinite(m).all()):
                fail(f"{where} contains non-finite values")
            if (dt <= 0).any():
                fail(f"{where}.timedeltas must be positive, got {dt.tolist()}")
            end = start - dt.sum()
            if abs(end) > END_TOLERANCE:
                fail(f"{where}.timedeltas sum to {dt.sum():.9g}: the times run from {start:g} to {end:.6g}, not to 0 "
                     f"(tolerance {END_TOLERANCE:g})")
            if np.triu(m, 1).any():
                fail(f"{where}.matrix must be lower-triangular (a step cannot use a later evaluation)")
            bad = np.nonzero(np.abs(m.sum(1) - 1.0) > 1e-6)[0]
            if len(bad):
                fail(f"{where}.matrix row {int(bad[0])} sums to {m[bad[0]].sum():.9g}, not 1 (consistency)")
            self.steps[n] = (dt, m)

    @classmethod
    def load(cls, path_or_name: str | os.PathLike) -> SolverFile:
        """A shipped table (a name in `SHIPPED`), a fewstep solver file, or a published upstream JSON.
        A missing file is a `SolverFileNotFound` (a FileNotFoundError); anything else wrong with it an
        `InputFileError` (not a regular file, unreadable, too big, not UTF-8) or `InvalidInput` (content), each
        naming the file."""
        if not isinstance(path_or_name, (str, os.PathLike)):
            raise InvalidInput(f"solver_file must be a shipped name ({', '.join(SHIPPED)}) or a path, got "
                               f"{path_or_name!r}")
        if isinstance(path_or_name, str) and path_or_name in SHIPPED:
            path = DATA / SHIPPED[path_or_name]
        else:
            path = Path(path_or_name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise SolverFileNotFound(f"no solver file {str(path_or_name)!r} (shipped: {', '.join(SHIPPED)})") from None
        except (OSError, ValueError) as err:
            raise InputFileError(f"solver file {path_or_name}: cannot read it ({err})") from None
        if not stat.S_ISREG(st.st_mode):  # checked before opening: a FIFO would block the read
            raise InputFileError(f"solver file {path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise InputFileError(f"solver file {path}: {st.st_size} bytes, more than a solver file has "
                                 f"({MAX_FILE_BYTES // 2**20} MiB at most)")
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as err:
            raise InputFileError(f"solver file {path}: cannot read it ({err.strerror or err})") from None
        except UnicodeDecodeError:
            raise InputFileError(f"solver file {path}: not a text file (a solver file is UTF-8 JSON)") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise InvalidInput(f"solver file {path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"solver file {path}: expected a JSON object")
        if "solvers" in data and "format" not in data:
            return cls._from_published(data, str(path))
        if data.get("format") != FORMAT:
            raise InvalidInput(f"solver file {path}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if type(data.get("version")) is not int or data["version"] != VERSION:  # not true, not 1.0
            raise InvalidInput(f"solver file {path}: unknown version {data.get('version')!r} (this fewstep reads "
                               f"version {VERSION})")
        try:
            if not isinstance(data["steps"], dict):
                raise TypeError("'steps'")
            steps = {}
            for key, entry in data["steps"].items():
                if not isinstance(entry, dict):
                    raise TypeError(f"'steps.{key}'")
                if not key.strip().isdigit():
                    raise InvalidInput(f"solver file {path}: step count {key!r} is not a positive integer")
                steps[int(key)] = (entry["timedeltas"], entry["matrix"])
            return cls(data["prediction"], steps, data["start"], data.get("provenance", {}), str(path))
        except (KeyError, TypeError) as err:
            raise InvalidInput(f"solver file {path}: missing or malformed field {err}") from None

    @classmethod
    def _from_published(cls, data: dict, source: str) -> SolverFile:
        """Upstream JSON (data/neuralsolver/README.md): strictly-lower C, diagonal implied."""
        try:
            meta = data["meta"]
            epsilon = "VP" in meta.get("convention", "") or "DDPM" in meta.get("what", "")
            steps = {}
            for entry in data["solvers"].values():
                try:
                    c = np.tril(np.asarray(entry["coeffs_strictly_lower"], dtype=np.float64), -1)
                    dt = np.asarray(entry["timedeltas"], dtype=np.float64)
                except (TypeError, ValueError, OverflowError):
                    raise InvalidInput(f"solver file {source}: a solver's coefficients or timedeltas are not a "
                                       "rectangular array of numbers") from None
                n = entry["num_steps"]
                if c.ndim != 2 or c.shape[0] != c.shape[1]:
                    raise InvalidInput(f"solver file {source}: coeffs_strictly_lower of the {n}-step solver has "
                                       f"shape {c.shape}, expected square")
                steps[n] = (dt, c + np.diag(1.0 - c.sum(1)))
            provenance = {"source": f"{meta['repository']}@{meta['commit']}", "model": meta.get("what", ""),
                          "license": meta.get("license", "")}
        except (KeyError, TypeError, AttributeError) as err:
            raise InvalidInput(f"solver file {source}: missing or malformed field {err} (upstream format)") from None
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
        # Times accumulated in float64 from the start, as the official src sampler does (tests/data/README.md).
        times = self.file.start - np.concatenate([[0.0], np.cumsum(dt)])
        if self.prediction == "flow":
            rows = tuple(Row.step(i, dt[i], {j: m[i, j] for j in range(i + 1)}) for i in range(n))
            return Plan(times[:-1].copy(), float(times[-1]), rows)
        s = VPSchedule().to_flow(times)  # the DiT schedule, t clamped at 1e−3
        rho = (1.0 - s) / s
        rows = []
        for i in range(n):
            c = s[i + 1] * (rho[i + 1] - rho[i]) * m[i, :i + 1]
            x = {j: float(c[j]) for j in range(i + 1)}
            x[i] += s[i + 1] / s[i]
            rows.append(Row(x, {j: float(-c[j] * s[j]) for j in range(i + 1)}))
        return Plan(s[:-1].copy(), float(s[-1]), tuple(rows))


def neuralsolver(solver_file: str | os.PathLike | SolverFile = "sit", exact_float32: bool = False) -> NeuralSolver:
    """`solver_file`: a shipped name (`SHIPPED`), a path, or a SolverFile."""
    if not isinstance(exact_float32, (bool, np.bool_)):  # "no" would be truthy
        raise InvalidInput(f"neuralsolver: exact_float32 must be True or False, got {exact_float32!r}")
    file = solver_file if isinstance(solver_file, SolverFile) else SolverFile.load(solver_file)
    return NeuralSolver(file, exact_float32)


register(SolverInfo("neuralsolver", neuralsolver, "searched", 1, "5-10",
                    "searched multistep solver from a file (solver_file=sit|flowdcn|dit|path); `fewstep search`"))
