"""`fewstep bench`: error against the exact ODE solution versus model calls, fewstep solvers and diffusers' own
schedulers on the same noise, in one run."""

from fewstep.bench.run import add_arguments, run, run_bench

__all__ = ["add_arguments", "run", "run_bench"]
