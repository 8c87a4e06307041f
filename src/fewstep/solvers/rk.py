"""Explicit Runge–Kutta methods on a σ grid: Euler (1 call per step) and Heun (2 calls per step).

A step of size h = σ_k − σ_{k+1} from x_k: stage l is evaluated at σ_k − c_l·h on x_k − h·Σ_m A_lm·v_m, and the
new state is x_k − h·Σ_l b_l·v_l. Every stage is a real model call, so NFE = stages × steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fewstep.solvers.plan import Plan, Row
from fewstep.solvers.registry import SolverInfo, register


@dataclass(frozen=True)
class Tableau:
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # a[l] has l entries (strictly lower triangular)
    b: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.c)


EULER = Tableau(c=(0.0,), a=((),), b=(1.0,))
HEUN = Tableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5))
KUTTA3 = Tableau(c=(0.0, 0.5, 1.0), a=((), (0.5,), (-1.0, 2.0)), b=(1 / 6, 2 / 3, 1 / 6))
RK4 = Tableau(c=(0.0, 0.5, 0.5, 1.0), a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6))


def rk_step(tableau: Tableau, base: int, sigma: float, h: float) -> tuple[list[float], list[Row]]:
    """Nodes and rows of one RK step whose first stage is model call `base` (made on the grid state x_base)."""
    calls = [base + m for m in range(tableau.stages)]
    sigmas = [sigma - c * h for c in tableau.c]
    rows = [Row({base: 1.0}, {calls[m]: -h * a for m, a in enumerate(tableau.a[stage]) if a != 0.0})
            for stage in range(1, tableau.stages)]
    rows.append(Row({base: 1.0}, {calls[m]: -h * b for m, b in enumerate(tableau.b) if b != 0.0}))
    return sigmas, rows


@dataclass(frozen=True)
class RungeKutta:
    tableau: Tableau

    def calls(self, intervals: int) -> int:
        return intervals * self.tableau.stages

    def plan(self, grid: np.ndarray) -> Plan:
        sigmas: list[float] = []
        rows: list[Row] = []
        for k in range(len(grid) - 1):
            s, r = rk_step(self.tableau, len(sigmas), grid[k], grid[k] - grid[k + 1])
            sigmas += s
            rows += r
        return Plan(np.asarray(sigmas), float(grid[-1]), tuple(rows))


register(SolverInfo("euler", lambda: RungeKutta(EULER), "1", 1, "20-50",
                    "explicit Euler; with the default grid it is diffusers' FlowMatchEulerDiscreteScheduler"))
register(SolverInfo("heun", lambda: RungeKutta(HEUN), "2", 2, "10-40 (even)",
                    "Heun's second-order Runge-Kutta, 2 model calls per step (steps must be even)"))
