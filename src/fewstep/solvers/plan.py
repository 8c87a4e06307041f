"""The solver interface: a plan computed up front in float64, and the one step rule that executes any plan.

Every fewstep solver (Euler, Heun, Adams, STORK, NeuralSolver) is linear in the states and model outputs it has
seen, so a whole sampling run is described by data:

    model call i:   v_i = model(x_i, σ_i)                       σ_i = plan.sigmas[i]
    then:           x_{i+1} = Σ_j a_ij·x_j + Σ_j b_ij·v_j        j ≤ i, (a_i, b_i) = plan.rows[i]

and x_n (n = number of calls) is the sample at σ = plan.sigma_end. The coefficients are float64 NumPy numbers; the
states can be torch tensors of any dtype/shape/device, NumPy arrays or MLX arrays (any array type with `+` and
`*`). This module imports no torch and no MLX.

A row may carry a `Guard`: per sample (first axis), q = ‖Σ dv‖/‖Σ dx‖ (two more linear combinations of what the
row may read) picks the row itself or one of the guard's alternative rows. `adams-denoise` uses it to take each
formula only within its stability bound (docs/solvers.md, "Strong guidance").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fewstep.errors import InvalidInput
from fewstep.schedules import check_grid


@dataclass(frozen=True)
class Row:
    """x_{i+1} = Σ_j x[j]·x_j + Σ_j v[j]·v_j."""

    x: Mapping[int, float]
    v: Mapping[int, float] = field(default_factory=dict)

    @staticmethod
    def step(i: int, h: float, weights: Mapping[int, float]) -> Row:
        """The common case: x_{i+1} = x_i − h·Σ_j w_j·v_j (a step of size h = σ_i − σ_{i+1} > 0 downwards)."""
        return Row({i: 1.0}, {j: -h * w for j, w in weights.items() if w != 0.0})


@dataclass(frozen=True)
class Guard:
    """Per sample, with q = ‖dv‖/‖dx‖ (dx, dv: rows, read as Σ a·x + Σ b·v): the row of the last level whose limit q
    exceeds (`levels`: (limit, row) pairs) where the change contracts (⟨dv, dx⟩ > 0), the guarded row itself
    otherwise. A sample that took any level at the row before takes at least level `carry` here (1-based; 0: no such
    rule), for rows whose terms assume what the row before did, or whose bound that row already found exceeded."""

    dx: Row
    dv: Row
    levels: tuple[tuple[float, Row], ...]
    carry: int = 0

    def __post_init__(self) -> None:
        if not self.levels or not 0 <= self.carry <= len(self.levels):
            raise ValueError(f"a guard needs at least one level and 0 ≤ carry ≤ {len(self.levels)}")

    def rows(self) -> tuple[Row, ...]:
        return (self.dx, self.dv, *(row for _, row in self.levels))

    def map(self, test: Callable[[Row], Row], step: Callable[[Row], Row] | None = None) -> Guard:
        """The same guard with its test rows rewritten by `test` and its level rows by `step` (default `test`): a
        change of variables or of indices."""
        step = step or test
        return Guard(test(self.dx), test(self.dv), tuple((limit, step(row)) for limit, row in self.levels),
                     self.carry)


@dataclass(frozen=True)
class Plan:
    """Where the model is called (`sigmas`, one per call) and how each next state is formed (`rows`, and for some rows
    a `Guard`: `guards` is empty or one entry, None or a Guard, per row)."""

    sigmas: np.ndarray
    sigma_end: float
    rows: tuple[Row, ...]
    guards: tuple[Guard | None, ...] = ()

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.sigmas):
            raise ValueError(f"plan has {len(self.sigmas)} model calls but {len(self.rows)} rows")
        if self.guards and len(self.guards) != len(self.rows):
            raise ValueError(f"plan has {len(self.rows)} rows but {len(self.guards)} guards")
        for i, row in enumerate(self.rows):
            if any(j > i or j < 0 for r in (row, *self._guard_rows(i)) for j in (*r.x, *r.v)):
                raise ValueError(f"row {i} refers to a state or model output that does not exist yet")

    def _guard_rows(self, i: int) -> tuple[Row, ...]:
        guard = self.guards[i] if self.guards else None
        return guard.rows() if guard is not None else ()

    @property
    def calls(self) -> int:
        return len(self.sigmas)

    def last_use(self) -> tuple[dict[int, int], dict[int, int]]:
        """For each state / model output index, the last row that reads it (so a runner can free it after)."""
        last_x: dict[int, int] = {}
        last_v: dict[int, int] = {}
        for i, row in enumerate(self.rows):
            for r in (row, *self._guard_rows(i)):
                for j in r.x:
                    last_x[j] = i
                for j in r.v:
                    last_v[j] = i
        return last_x, last_v


class Solver(Protocol):
    """What a solver provides: how many model calls it makes on a grid, and the plan for a grid."""

    def calls(self, intervals: int) -> int | None:
        """Model calls this solver makes on a σ grid of `intervals` intervals (None: it cannot run on so few)."""

    def plan(self, grid: np.ndarray) -> Plan:
        """The plan on `grid` (strictly decreasing σ, last entry = where sampling ends)."""


MAX_CALLS = 100_000  # a plan is a few Python objects per call: 10⁹ calls exhausted memory before the first one


class StepCountError(InvalidInput):
    """A solver cannot make exactly the requested number of model calls (a ValueError, for callers that only need
    that; the bench uses the type to leave such cells blank and let every other error through)."""


def intervals_for(solver: Solver, steps: int, name: str = "this solver") -> int:
    """The number of grid intervals on which `solver` makes exactly `steps` model calls."""
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= MAX_CALLS:
        raise InvalidInput(f"steps (model calls) must be a positive integer of at most {MAX_CALLS}, got {steps!r}")
    possible = []
    for n in range(1, steps + 9):
        if n > steps and possible:  # past `steps` only until a count it can make is found, to name one
            break
        calls = solver.calls(n)
        if calls is None:
            continue
        if calls == steps:
            return n
        if calls <= 4 * steps + 8:
            possible.append(calls)
        if calls > steps and len(possible) > 4:
            break
    options = sorted(set(possible))
    raise StepCountError(f"{name} cannot make exactly {steps} model call{'' if steps == 1 else 's'}; it can make "
                         f"{', '.join(map(str, options[:8]))}{', ...' if len(options) > 8 else ''}")


def grid_plan(solver: Solver, grid: np.ndarray) -> Plan:
    """Validate the grid, build the plan, and check that the plan is consistent with the solver's call count."""
    grid = np.asarray(grid, dtype=np.float64)
    check_grid(grid)
    plan = solver.plan(grid)
    expected = solver.calls(len(grid) - 1)
    if plan.calls != expected:  # a solver bug, not a user error
        raise AssertionError(f"plan makes {plan.calls} calls, solver promised {expected}")
    return plan


def combine(terms: list[tuple[float, Any]], dtype: Any = None) -> Any:
    """Σ c·t for torch tensors, NumPy arrays or any array type with `+` and `*` by a Python float (MLX), in as few
    kernels as possible.

    Torch: accumulated in float32 (float64 if a term is float64) whatever the terms' dtypes; the result has `dtype`
    (default: the accumulation dtype). Narrower terms (bf16/fp16 model outputs) are read into the float32 sum by the
    add itself, not copied first. (A bf16 `x.add(v, alpha=c)` would not do: it rounds c to bf16.)
    Other arrays (MLX): plain `c·t` products and sums in the terms' own dtype, so the caller passes float32 terms
    (`fewstep.mflux` does); `dtype` is applied with `.astype`. No framework is imported here.
    """
    (c0, t0), rest = terms[0], terms[1:]
    if isinstance(t0, np.ndarray):
        out = np.asarray(t0 * c0)  # a 0-D product is a NumPy scalar, which `+=` would not update in place
        for c, t in rest:
            out += c * t
        return out
    if not hasattr(t0, "add_"):  # not torch: an immutable array type with operators (MLX)
        return _combine_operators(terms, dtype)
    # The accumulation width from the tensors themselves (this module imports no torch): 8 bytes if any term has it.
    width = max(4, *(t.dtype.itemsize for _, t in terms))
    if t0.dtype.itemsize != width:
        out = t0.double() if width == 8 else t0.float()
        if c0 != 1.0:
            out.mul_(c0)
    elif c0 == 1.0 and rest:
        c1, t1 = rest[0]
        out = t0.add(t1, alpha=c1)  # t1 may be narrower: promoted, summed at `width`
        rest = rest[1:]
    else:
        out = t0.mul(c0)
    for c, t in rest:
        out.add_(t, alpha=c)
    return _cast(out, dtype)


def _combine_operators(terms: list[tuple[float, Any]], dtype: Any = None) -> Any:
    """Σ c·t with the array type's own operators, left to right, a coefficient 1 not multiplied (MLX: evaluated
    lazily, when the caller evaluates the result)."""
    out = None
    for c, t in terms:
        term = t if c == 1.0 else t * float(c)  # a NumPy scalar coefficient as a Python float: no dtype promotion
        out = term if out is None else out + term
    return _cast(out, dtype)


def _private_copy(value: Any) -> Any:
    """A copy of a torch tensor or NumPy array; other array types are kept as they are, so their callers pass copies
    (`fewstep.mflux` does, for MLX)."""
    if hasattr(value, "clone"):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


class PlanRun:
    """Executes a plan one model call at a time (the shape of a diffusers `step()`): keep only what later rows read.

    Everything a step needs (its terms, what to free after it) is worked out here once, so that `advance` is one
    linear combination and no bookkeeping: this is the per-step overhead of every diffusers scheduler we ship.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        last_x, last_v = plan.last_use()
        self._x: dict[int, Any] = {}
        self._v: dict[int, Any] = {}
        self._terms = [self._row_terms(row) for row in plan.rows]
        self._guards = [None if g is None else ([self._row_terms(r) for r in g.rows()], [lim for lim, _ in g.levels],
                                                g.carry) for g in plan.guards]
        self._switched: Any = None  # per sample: took a level at the row before (None: that row had no guard)
        # After row i: drop what no later row reads (x_i / v_i that no row reads at all are dropped at once).
        self._free: list[list[tuple[dict[int, Any], int]]] = [[] for _ in plan.rows]
        for store, last in ((self._x, last_x), (self._v, last_v)):
            for j in range(plan.calls):
                self._free[last.get(j, j)].append((store, j))

    def advance(self, i: int, x_i: Any, v_i: Any, dtype: Any = None) -> Any:
        """Given the state x_i at which call i was made and its output v_i, return x_{i+1}; torch tensors are combined
        in float32 or wider and returned in `dtype` (default: that compute dtype), see `combine`.

        What later rows read is kept as a private copy: callers reuse buffers (a compiled or CUDA-graph model returns
        the same output tensor every call; Kandinsky 5 writes the step result back into the latents it passed in)."""
        self._x[i] = x_i
        self._v[i] = v_i
        guard = self._guards[i] if self._guards else None
        if guard is None:
            out = combine(self._read(self._terms[i]), dtype)
            self._switched = None
        else:
            terms, limits, carry = guard
            dx, dv, *alternatives = (combine(self._read(t)) for t in terms)
            out, self._switched = _guarded(combine(self._read(self._terms[i])), dx, dv, alternatives, limits,
                                           self._switched if carry else None, carry, dtype)
        for store, j in self._free[i]:
            del store[j]
        for store in (self._x, self._v):
            if i in store:
                store[i] = _private_copy(store[i])
        return out

    def _row_terms(self, row: Row) -> list[tuple[float, dict[int, Any], int]]:
        return [(c, self._x, j) for j, c in row.x.items()] + [(c, self._v, j) for j, c in row.v.items()]

    @staticmethod
    def _read(terms: list[tuple[float, dict[int, Any], int]]) -> list[tuple[float, Any]]:
        return [(c, store[j]) for c, store, j in terms]


def _guarded(out: Any, dx: Any, dv: Any, alternatives: list[Any], limits: list[float], switched: Any, carry: int,
             dtype: Any = None) -> tuple[Any, Any]:
    """`out`, with alternative i in the samples (first axis; all of a 0-D or 1-D array is one sample) where
    ‖dv‖ > limits[i]·‖dx‖ and ⟨dv, dx⟩ > 0 (a contracting change) and no later alternative applies, or where
    i = carry − 1 and `switched` (a 0/1 mask) is set; and the mask of the samples that took an alternative.
    Only `*`, `-`, `+`, `reshape`, `sum` and a comparison: torch, NumPy and MLX alike."""
    ndim = len(out.shape)
    batch = out.shape[0] if ndim >= 2 else 1
    if batch == 0:  # an empty batch: nothing to switch (reshape(0, -1) is undefined)
        return _cast(out, dtype), None
    flat = [d.reshape(batch, -1) for d in (dx, dv)]
    dxx, dvv, dvx = ((a * b).sum(1) for a, b in ((flat[0], flat[0]), (flat[1], flat[1]), (flat[1], flat[0])))
    shape = (batch,) + (1,) * (ndim - 1) if ndim >= 2 else (1,) * ndim
    contracting = _cast((dvx > 0).reshape(shape), out.dtype)
    taken = None
    for i, (alternative, limit) in enumerate(zip(alternatives, limits, strict=True)):
        # a Python float bound: an MLX comparison stays on MLX; limit·limit is inf, not an OverflowError, for a bound
        # beyond 1e154 (a grid of σ ~ 1e-170)
        limit = float(limit)
        switch = _cast((dvv > limit * limit * dxx).reshape(shape), out.dtype) * contracting
        if switched is not None and i == carry - 1:
            switch = _or(switch, switched)
        out = out * (1 - switch) + alternative * switch  # per sample one of the two (for finite values)
        taken = switch if taken is None else _or(taken, switch)
    if isinstance(dx, np.ndarray):  # NumPy arithmetic on 0-D arrays gives scalars
        out = np.asarray(out)
    return _cast(out, dtype), taken


def _or(a: Any, b: Any) -> Any:
    """The union of two 0/1 masks, with arithmetic alone."""
    return a + b - a * b


def _cast(a: Any, dtype: Any) -> Any:
    """`a` in `dtype` (None: as it is): torch's `.to`, NumPy's and MLX's `.astype`."""
    if dtype is None:
        return a
    return a.to(dtype) if hasattr(a, "to") else a.astype(dtype)
