"""Entering a schedule mid-way, and the flow ↔ ε (VP) change of variables.

This module is the one place that builds

* the plan of a run that **starts at call k of a full schedule** with no history: img2img and inpaint (diffusers'
  `set_begin_index(t_start)`, `fewstep.sample(..., begin_index=k)`, `fewstep generate --image`), and a pipeline that
  enters mid-schedule without a begin index;
* the **ε-prediction (VP) form of a flow plan**: a plan on (x̃, v) rewritten once on the VP state and the model's ε.

`fewstep.sample`, the diffusers adapter (`fewstep.diffusers`) and the embedded model's img2img all use it, so the
three enter a schedule in the same way. Pure NumPy (no torch): every coefficient is a float64 number.

Entering at call k. The state is the sample at σ_k = plan.sigmas[k] and the remaining calls are plan.sigmas[k:]
(a pipeline evaluates the model exactly there). The solver is re-planned on the grid nodes below σ_k, from σ_k:

* Euler, Adams (start-up "ramp"), STORK (fixed mode): the re-planned calls are the remaining ones; multistep
  methods restart their start-up there (no history is carried over).
* Heun entered between its two stages (the stage σ equals the next node): the re-planned Heun after one call whose
  output is not used (x stays put), as diffusers' FlowMatchHeun does (its first step there has dt = 0).
* A searched NeuralSolver, Adams with startup="rk", STORK with compat="official": re-planned, they do not make the
  remaining calls (a searched grid is one full run; the extra start-up calls) — `InvalidInput` before any model call.

Flow ↔ ε. A VP model is x_t = α·x0 + σ·ε (α² + σ² = 1) and returns ε. In flow coordinates
s = σ/(α+σ), x̃ = x/(α+σ) = k(s)·x with k(s) = √((1−s)² + s²), the probability-flow ODE is dx̃/ds = ε − x0 =
(ε − x̃)/(1 − s): the flow solvers run unchanged (Euler there is DDIM with η = 0). Both changes of variables are
per-call scalars, so a flow plan row x̃_{i+1} = Σ a_j·x̃_j + Σ b_j·v_j becomes a row on (x_j, ε_j) (`epsilon_plan`).
The conversion depends on s only, not on which VP schedule maps s to the model's time.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from fewstep.errors import InvalidInput
from fewstep.solvers.plan import Plan, Row, Solver, grid_plan

ENTRY_TOLERANCE = 1e-9  # σ values closer than this are the same grid node (Heun's stage σ = next node ± 1 ulp)


# --- flow ↔ ε -------------------------------------------------------------------------------------------------------

def vp_scale(s: float | np.ndarray) -> np.ndarray:
    """k(s) = √((1−s)² + s²) = 1/(α+σ) at flow time s: x̃ = k(s)·x."""
    s = np.asarray(s, dtype=np.float64)
    return np.sqrt((1.0 - s) ** 2 + s ** 2)


def flow_time(alphas_cumprod: np.ndarray) -> np.ndarray:
    """s = σ/(α+σ) of VP noise levels given as ᾱ = α² (σ = √(1−ᾱ))."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    return sigma / (alpha + sigma)


def epsilon_plan(flow: Plan) -> Plan:
    """The flow plan on (x̃, v) rewritten on the VP state and ε: x̃_j = k_j·x_j, v_j = (ε_j − k_j·x_j)/(1 − s_j),
    x_{i+1} = x̃_{i+1}/k_{i+1}. Exact; every coefficient is formed once in float64. The plan's σ's stay flow times."""
    s = flow.sigmas
    k = vp_scale(s)
    k_next = vp_scale(np.r_[s[1:], flow.sigma_end])

    def on_vp(row: Row, scale: float = 1.0) -> Row:  # Σ a·x̃_j + Σ b·v_j (times `scale`) in x_j and ε_j
        x = {j: a * k[j] * scale for j, a in row.x.items()}
        eps = {}
        for j, b in row.v.items():
            x[j] = x.get(j, 0.0) - b * k[j] * scale / (1.0 - s[j])
            eps[j] = b * scale / (1.0 - s[j])
        return Row(x, eps)

    rows = tuple(on_vp(row, 1.0 / k_next[i]) for i, row in enumerate(flow.rows))
    # A guard's test is on flow quantities (x̃, v); its levels are next states like the row.
    guards = tuple(None if g is None else g.map(on_vp, lambda row, i=i: on_vp(row, 1.0 / k_next[i]))
                   for i, g in enumerate(flow.guards))
    return Plan(flow.sigmas, flow.sigma_end, rows, guards)


# --- entering at call k ---------------------------------------------------------------------------------------------

def begin_index_for_strength(calls: int, strength: float) -> int:
    """Where img2img enters a `calls`-call schedule at `strength` (diffusers' meaning: 1 = all noise, the input image is
    ignored): diffusers' `get_timesteps`, t_start = int(max(N − min(N·strength, N), 0)); `calls − t_start` calls run."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            math.isfinite(strength) and 0 < strength <= 1):
        raise InvalidInput(f"image strength must be a number in (0, 1], got {strength!r}")
    return int(max(calls - min(calls * strength, calls), 0))  # < calls for any strength > 0: at least one call


def _restarted(plan: Plan) -> Plan:
    """`plan` after one extra first call whose output is not used (x_1 = x_0)."""
    def later(row: Row) -> Row:
        return Row({j + 1: c for j, c in row.x.items()}, {j + 1: c for j, c in row.v.items()})

    guards = (None, *(None if g is None else g.map(later) for g in plan.guards)) if plan.guards else ()
    return Plan(np.r_[plan.sigmas[0], plan.sigmas], plan.sigma_end, (Row({0: 1.0}),) + tuple(map(later, plan.rows)),
                guards)


class StageEntryWarning(UserWarning):
    """A run entered at the second stage of a two-call step (Heun's), made at the step's end node: the sample starts a
    node lower than the call index suggests, and that call only re-synchronises (`enter`)."""


def _warn_stage_entry(plan: Plan, k: int, name: str) -> None:
    # img2img's strength and `begin_index` pick a call index; a caller noises to that call's σ, the step's end node.
    warnings.warn(f"{name}: call {k} of {plan.calls} is the second stage of a step from σ={plan.sigmas[k - 1]:.3g}, so "
                  f"the run enters at σ={plan.sigmas[k]:.3g} (a node lower; that call re-synchronises); a one-call "
                  "solver (adams-denoise, euler, stork-2) enters call by call, as img2img's strength asks",
                  StageEntryWarning, stacklevel=3)


def enter(solver: Solver, grid: np.ndarray, plan: Plan, k: int, name: str = "this solver") -> Plan:
    """The plan from call k of `plan` (the solver's plan on `grid`) on, for a sample at σ_k = plan.sigmas[k] with no
    history: the solver re-planned on the grid nodes left. Its calls are exactly plan.sigmas[k:] (to ENTRY_TOLERANCE),
    so that x_n is the sample at plan.sigma_end; `InvalidInput` for a solver that cannot restart there (module doc).
    k = 0 is `plan` itself."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < plan.calls:
        raise InvalidInput(f"begin index {k!r} is outside the {plan.calls} model calls (0 to {plan.calls - 1})")
    if k == 0:
        return plan
    rest = plan.sigmas[k:]
    grid = np.asarray(grid, dtype=np.float64)
    nodes = grid[grid < rest[0] - ENTRY_TOLERANCE]
    if len(nodes) == 0:  # entered at the end σ (Heun's last stage): the sample is already there
        _warn_stage_entry(plan, k, name)
        return Plan(rest, plan.sigma_end, tuple(Row({i: 1.0}) for i in range(len(rest))))
    try:
        again = grid_plan(solver, np.r_[rest[0], nodes])
    except ValueError:  # e.g. NeuralSolver has no table for the intervals left
        again = None
    if again is not None and again.calls == len(rest) and np.allclose(again.sigmas, rest, rtol=0,
                                                                       atol=ENTRY_TOLERANCE):
        return again
    if again is not None and again.calls == len(rest) - 1 and np.allclose(again.sigmas, rest[1:], rtol=0,
                                                                          atol=ENTRY_TOLERANCE):
        _warn_stage_entry(plan, k, name)
        return _restarted(again)
    raise InvalidInput(f"{name} cannot start at timestep index {k} of {plan.calls} (sigma {rest[0]:.4g}): re-planned "
                       f"on the remaining grid it does not make the remaining {len(rest)} model calls. img2img/inpaint "
                       "(strength < 1) needs a solver that restarts on any grid, e.g. euler, heun, adams2 or stork-2; "
                       "a searched neuralsolver runs only its full grid, and startup='rk' / compat='official' add "
                       "start-up calls.")
