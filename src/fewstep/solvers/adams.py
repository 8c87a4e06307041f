"""Variable-step Adams–Bashforth on any σ grid (docs/neuralsolver.md §Adams).

Step k goes from σ_k to σ_{k+1} (h = σ_k − σ_{k+1}) with the q latest grid velocities:

    x_{k+1} = x_k − h·Σ_j b_j·v_j ,   b_j = (1/h)·∫_{σ_{k+1}}^{σ_k} ℓ_j(σ) dσ

ℓ_j the Lagrange basis on the q nodes. The weights are exact on any non-uniform grid (shifted Flux/SD3 grids,
searched grids, img2img entry points); constant-step AB weights would drop to first or second order there.

Start-up: `"ramp"` (default) raises the order one step at a time (Euler, AB2, AB3, …) at no extra model calls;
its single Euler step has local error O(h²) and caps the *global* order at 2. `"rk"` takes the first q−1 steps
with a Runge–Kutta method of order q (extra model calls, counted) so the method reaches its full order q.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fewstep.errors import InvalidInput
from fewstep.solvers.plan import Plan, Row
from fewstep.solvers.registry import SolverInfo, register
from fewstep.solvers.rk import HEUN, KUTTA3, RK4, rk_step

STARTUP_TABLEAU = {2: HEUN, 3: KUTTA3, 4: RK4}


@functools.cache
def gauss_legendre_unit(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes mapped to u ∈ [0, 1] (u = (1 − x)/2) and weights summing to 1."""
    gx, gw = np.polynomial.legendre.leggauss(q)
    return (1.0 - gx) / 2.0, gw / 2.0


def adams_weights(nodes: np.ndarray, sigma_from: float, sigma_to: float) -> np.ndarray:
    """b_j = (1/h)∫_{σ_to}^{σ_from} ℓ_j(σ)dσ for the Lagrange basis on `nodes`, by Gauss–Legendre quadrature with
    len(nodes) points (exact: the basis has degree len(nodes)−1)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    q = len(nodes)
    if q == 1:
        return np.ones(1)
    h = sigma_from - sigma_to
    u, gw = gauss_legendre_unit(q)
    # Work in u = (σ_from − σ)/h so that the numbers are O(1) whatever the grid scale.
    z = (sigma_from - nodes) / h
    diff = z[:, None] - z[None, :]  # z_j − z_i
    np.fill_diagonal(diff, 1.0)
    factors = (u[:, None, None] - z[None, None, :]) / diff[None, :, :]  # [point, j, i]
    factors[:, np.arange(q), np.arange(q)] = 1.0
    return gw @ np.prod(factors, axis=2)


@dataclass(frozen=True)
class Adams:
    order: int
    startup: str = "ramp"

    def __post_init__(self) -> None:
        if self.order not in STARTUP_TABLEAU:
            raise InvalidInput(f"Adams order must be 2, 3 or 4, got {self.order!r}")
        if self.startup not in ("ramp", "rk"):
            raise InvalidInput(f"startup must be 'ramp' or 'rk', got {self.startup!r}")

    def _rk_intervals(self, intervals: int) -> int:
        return min(self.order - 1, intervals) if self.startup == "rk" else 0

    def calls(self, intervals: int) -> int:
        return intervals + self._rk_intervals(intervals) * (STARTUP_TABLEAU[self.order].stages - 1)

    def plan(self, grid: np.ndarray) -> Plan:
        sigmas: list[float] = []
        rows: list[Row] = []
        history: list[int] = []  # call index of the velocity at each grid node so far
        for k in range(len(grid) - 1):
            h = grid[k] - grid[k + 1]
            history.append(len(sigmas))
            if k < self._rk_intervals(len(grid) - 1):
                s, r = rk_step(STARTUP_TABLEAU[self.order], len(sigmas), grid[k], h)
                sigmas += s
                rows += r
                continue
            sigmas.append(grid[k])
            used = history[-self.order:]
            b = adams_weights(np.asarray([sigmas[j] for j in used]), grid[k], grid[k + 1])
            rows.append(Row.step(used[-1], h, dict(zip(used, b, strict=True))))
        return Plan(np.asarray(sigmas), float(grid[-1]), tuple(rows))


for _order, _steps in ((2, "5-20"), (3, "6-20"), (4, "8-30")):
    register(SolverInfo(f"adams{_order}", lambda startup="ramp", _o=_order: Adams(_o, startup), str(_order), 1, _steps,
                        f"variable-step Adams-Bashforth-{_order}, exact Lagrange weights on any grid, 1 call per step"))
