"""`fewstep bench`: error against the exact ODE solution versus model calls, fewstep solvers and diffusers' own
schedulers on the same noise and the same σ grid, in one run (suites: table, headline, convergence, overhead)."""

from fewstep.bench.command import add_arguments, run

__all__ = ["add_arguments", "run", "run_bench"]


def __getattr__(name: str):
    if name == "run_bench":  # imported on first use: `fewstep bench --help` loads no torch
        from fewstep.bench.measure import run_bench

        return run_bench
    raise AttributeError(f"module 'fewstep.bench' has no attribute {name!r}")
