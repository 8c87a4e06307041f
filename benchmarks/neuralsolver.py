"""NeuralSolver on gmm8d: fixed solvers vs the published tables vs a solver searched here (held-out noise).

    python benchmarks/neuralsolver.py [--iterations 1000]

Prints a markdown table of RMSE and median per-sample error against the exact DOP853 solution, with the search
time, plus the VP line (published DiT table, single update vs the released double update; needs ../shared).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import fewstep
from fewstep.search import search
from fewstep.solvers.neuralsolver import neuralsolver
from fewstep.testbed import preset, reference_solve

STEPS = (6, 8, 10)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "neuralsolver_official.npz"


def errors(x: torch.Tensor, exact: np.ndarray) -> str:
    d = x.numpy() - exact
    return f"{np.sqrt(np.mean(d ** 2)):.2e} / {np.median(np.linalg.norm(d, axis=1)):.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = preset("gmm8d")
    # Held out: the reference noise (seed of reference/README.md §1); search trains on its own seed-0 bank.
    noise = torch.randn(256, 8, generator=torch.Generator().manual_seed(20250601), dtype=torch.float64)
    exact = reference_solve(g.velocity, noise, check=False).x.numpy()

    rows: list[tuple[str, list[str]]] = []
    for name in ("euler", "heun", "adams2", "adams3", "adams4", "stork-2", "stork-4"):
        if name not in fewstep.solvers.names():
            continue
        cells = []
        for n in STEPS:
            try:
                cells.append(errors(fewstep.sample(g.velocity, noise, name, n), exact))
            except ValueError:  # cannot make exactly n calls
                cells.append("–")
        rows.append((name, cells))
    for table in ("sit", "flowdcn"):
        rows.append((f"published {table}", [errors(fewstep.sample(g.velocity, noise, "neuralsolver", n,
                                                                  solver_file=table), exact) for n in STEPS]))
    cells, times = [], []
    for n in STEPS:
        start = time.perf_counter()
        found = search(g.velocity, n, iterations=args.iterations, dim=8)
        times.append(time.perf_counter() - start)
        cells.append(errors(fewstep.sample(g.velocity, noise, neuralsolver(found), n), exact))
    rows.append((f"searched ({args.iterations} it; {' / '.join(f'{t:.0f}' for t in times)} s)", cells))

    print("gmm8d, 256 held-out noises, RMSE / median error vs exact (model calls = NFE)\n")
    print("| solver | " + " | ".join(f"{n} NFE" for n in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")

    if SHARED.exists():  # VP: the published DiT table, single update (ours) vs released double update (official)
        ref = np.load(SHARED)
        vp_noise = torch.from_numpy(ref["noise"])
        print("\nVP (ε), published DiT table, RMSE / median vs exact PF-ODE\n")
        print("| solver | " + " | ".join(f"{n} NFE" for n in STEPS) + " |")
        print("|---|" + "---|" * len(STEPS))
        ours = [errors(fewstep.sample(g.epsilon, vp_noise, "neuralsolver", n, solver_file="dit",
                                      prediction="epsilon"), ref["vp/exact"]) for n in STEPS]
        print("| fewstep (single update) | " + " | ".join(ours) + " |")
        for key, label in (("vp/ddim", "official DDIM"), ("vp/ns_dit_src_as_released", "official as released "
                                                                                      "(double update)")):
            cells = [errors(torch.from_numpy(ref[f"{key}/N{n}/x"]), ref["vp/exact"]) for n in STEPS]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
