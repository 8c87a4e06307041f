"""Measured convergence order of every solver on a smooth flow (exact reference), uniform and shift-3 grids.

    python benchmarks/convergence.py            # markdown table on stdout
"""

from __future__ import annotations

import torch

from fewstep import solvers
from fewstep.testbed import convergence_order

INTERVALS = [64, 128, 256, 512]  # the asymptotic range: STORK's default form is pre-asymptotic below
CASES = [("euler", {}), ("heun", {}), ("adams2", {}), ("adams3", {}), ("adams4", {}),
         ("adams2", {"startup": "rk"}), ("adams3", {"startup": "rk"}), ("adams4", {"startup": "rk"}),
         ("stork-2", {}), ("stork-4", {}), ("stork-4", {"derivative_order": 3}),
         ("stork-2", {"extrapolate": "velocity"}), ("stork-4", {"extrapolate": "velocity"}),
         ("stork-2", {"compat": "official"}), ("stork-4", {"compat": "official"})]


def main() -> None:
    torch.set_num_threads(1)
    print(f"Convergence order: slope of log(max error) vs log(intervals), intervals {INTERVALS}, smooth 2-component "
          "mixture, DOP853 reference (rtol 1e-12).\n")
    print("| solver | options | order, uniform grid | order, shift 3 | calls at 64 intervals | error at 512, uniform |")
    print("|---|---|---|---|---|---|")
    for name, options in CASES:
        if name not in solvers.names():
            continue
        uniform, errors, calls = convergence_order(name, INTERVALS, **options)
        shifted, _, _ = convergence_order(name, INTERVALS, shift=3.0, **options)
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "default"
        print(f"| {name} | {opts} | {uniform:.2f} | {shifted:.2f} | {calls[0]} | {errors[-1]:.2e} |")


if __name__ == "__main__":
    main()
