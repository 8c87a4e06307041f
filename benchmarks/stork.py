"""STORK benchmark (design/STORK.md §8–§10): convergence orders (fixed vs official), gmm8d accuracy per NFE, and
linear stability limits. Prints markdown tables. `python benchmarks/stork.py` (about a minute, CPU)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import fewstep
from fewstep.sampling import execute
from fewstep.solvers import get
from fewstep.testbed import convergence_order, preset, reference_solve

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "stork_official.npz"
NFES = (4, 6, 8, 10, 15, 20)
VARIANTS = {  # label → (solver, options)
    "official S4 s50": ("stork-4", {"compat": "official"}),
    "official S4 s5": ("stork-4", {"compat": "official", "stages": 5}),
    "official S2 s50": ("stork-2", {"compat": "official"}),
    "fixed S4": ("stork-4", {}),
    "fixed S4 d3": ("stork-4", {"derivative_order": 3}),
    "fixed S2 s50": ("stork-2", {}),
    "fixed S4 data": ("stork-4", {"extrapolate": "data"}),
    "fixed S4 noise": ("stork-4", {"extrapolate": "noise"}),
    "fixed S2 data": ("stork-2", {"extrapolate": "data"}),
    "fixed S2 noise": ("stork-2", {"extrapolate": "noise"}),
}


def orders() -> None:
    print("## Convergence order on `smooth_flow` (slope of log max-error vs log intervals, 16..128)\n")
    print("| method | shift 1 | shift 3 |\n|---|---|---|")
    for label, (name, opts) in VARIANTS.items():
        if label.endswith("s5"):
            continue
        # official mode makes intervals+1 calls on the same grids; the slope is against intervals either way
        row = [convergence_order(name, [16, 32, 64, 128], shift=sh, samples=16, **opts)[0] for sh in (1.0, 3.0)]
        print(f"| {label} | {row[0]:.2f} | {row[1]:.2f} |")
    print()


def gmm8d() -> None:
    ref = np.load(REFERENCE)
    noise, exact = torch.from_numpy(ref["noise"]), ref["exact"]
    g = preset("gmm8d")
    for shift in (1.0, 3.0):
        print(f"## gmm8d, 256 reference noises, shift {shift:g}: RMSE / median per-sample RMS error at equal NFE\n")
        print("| method | " + " | ".join(f"NFE {n}" for n in NFES) + " |\n|---|" + "---|" * len(NFES))
        for label, (name, opts) in VARIANTS.items():
            cells = []
            for nfe in NFES:
                err = fewstep.sample(g.velocity, noise, name, steps=nfe, shift=shift, **opts).numpy() - exact
                per = np.sqrt(np.mean(err**2, axis=1))
                cells.append(f"{np.sqrt(np.mean(err**2)):.2e} / {np.median(per):.1e}")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()


def stiff() -> None:
    g = preset("gmm-stiff")
    noise = torch.randn(128, g.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = reference_solve(g.velocity, noise, check=False).x.numpy()
    nfes = (6, 8, 10, 15, 20)
    print("## gmm-stiff (narrow modes: stiff 1/σ drift near σ = 0), 128 noises, shift 1: RMSE\n")
    print("| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n|---|" + "---|" * len(nfes))
    for label, (name, opts) in VARIANTS.items():
        if label.endswith("s5"):
            continue
        errs = [fewstep.sample(g.velocity, noise, name, steps=n, **opts).numpy() - exact for n in nfes]
        cells = [f"{np.sqrt(np.mean(e**2)):.2e}" for e in errs]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()


def stable_limit(name: str, opts: dict, steps: int = 60) -> float:
    """Largest z = λh (bisection) for which dx/dσ = λx stays bounded (|x_end| ≤ 1 from x = 1) over `steps` steps of
    constant h = 0.5/steps from σ = 1."""
    plan = get(name, **opts).plan(np.linspace(1.0, 0.5, steps + 1))
    h = 0.5 / steps

    def stable(z: float) -> bool:
        x = execute(plan, lambda x, s: (z / h) * x, np.ones(1), check_finite=False)
        return bool(np.isfinite(x).all() and abs(x[0]) <= 1.0)

    lo, hi = 0.0, 64.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


def stability() -> None:
    print("## Largest stable λh on dx/dσ = λx (60 uniform steps; Euler: 2, AB3: 0.545)\n")
    stages = (2, 5, 10, 50)
    print("| method | " + " | ".join(f"s={s}" for s in stages) + " |\n|---|" + "---|" * len(stages))
    for label, (name, opts) in VARIANTS.items():
        if label.endswith("s5"):
            continue
        cells = [f"{stable_limit(name, {**opts, 'stages': s}):.3f}" for s in stages]
        print(f"| {label.replace(' s50', '')} | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    torch.set_num_threads(1)
    start = time.time()
    gmm8d()
    stiff()
    stability()
    orders()
    print(f"({time.time() - start:.0f} s)")
