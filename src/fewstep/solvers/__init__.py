"""Solvers: float64 plans plus one linear step rule (see `fewstep.solvers.plan`). No torch needed here.

Adding a solver = a module that builds plans and calls `register`, imported below; the executor is untouched.
"""

from fewstep.solvers import adams, denoise, neuralsolver, rk, stork  # noqa: F401  (registration)
from fewstep.solvers.plan import Plan, PlanRun, Row, Solver, grid_plan, intervals_for
from fewstep.solvers.registry import SolverInfo, get, info, names, recommended, register

__all__ = ["Plan", "PlanRun", "Row", "Solver", "SolverInfo", "get", "grid_plan", "info", "intervals_for", "names",
           "recommended", "register"]
