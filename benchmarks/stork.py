"""STORK benchmark (design/STORK.md §8–§10): gmm8d accuracy per NFE (fixed vs official, 256 reference noises and
8000 fresh ones with bootstrap intervals), the choice of the default `extrapolate` over the whole testbed, the stiff
mixture, linear stability limits and convergence orders. Prints markdown tables.
`python benchmarks/stork.py` (about 4 minutes on one CPU thread)."""

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
VARIANTS = {  # label → (solver, options); "fixed S4" / "fixed S2" are the defaults (extrapolate="noise")
    "official S4 s50": ("stork-4", {"compat": "official"}),
    "official S4 s5": ("stork-4", {"compat": "official", "stages": 5}),
    "official S2 s50": ("stork-2", {"compat": "official"}),
    "fixed S4": ("stork-4", {}),
    "fixed S4 velocity": ("stork-4", {"extrapolate": "velocity"}),
    "fixed S4 data": ("stork-4", {"extrapolate": "data"}),
    "fixed S4 d3": ("stork-4", {"derivative_order": 3}),
    "fixed S2": ("stork-2", {}),
    "fixed S2 velocity": ("stork-2", {"extrapolate": "velocity"}),
    "fixed S2 data": ("stork-2", {"extrapolate": "data"}),
}


def errors(x: torch.Tensor, exact: np.ndarray) -> tuple[float, float]:
    """(RMSE, median per-sample RMS error)."""
    err = x.numpy() - exact
    return float(np.sqrt(np.mean(err**2))), float(np.median(np.sqrt(np.mean(err**2, axis=1))))


def gmm8d() -> None:
    ref = np.load(REFERENCE)
    noise, exact = torch.from_numpy(ref["noise"]), ref["exact"]
    g = preset("gmm8d")
    for shift in (1.0, 3.0):
        print(f"## gmm8d, 256 reference noises, shift {shift:g}: RMSE / median per-sample RMS error at equal NFE\n")
        print("| method | " + " | ".join(f"NFE {n}" for n in NFES) + " |\n|---|" + "---|" * len(NFES))
        for label, (name, opts) in VARIANTS.items():
            cells = [errors(fewstep.sample(g.velocity, noise, name, steps=n, shift=shift, **opts), exact)
                     for n in NFES]
            print(f"| {label} | " + " | ".join(f"{r:.2e} / {m:.1e}" for r, m in cells) + " |")
        print()


def large_sample(samples: int = 8000, boots: int = 400) -> None:
    """Fixed (defaults) / official RMSE ratio on fresh noises, with a paired bootstrap 95 % interval: the RMSE is
    carried by the few samples that change mode, so 256 noises decide a close cell by a handful of samples."""
    g = preset("gmm8d")
    noise = torch.randn(samples, g.dim, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    exact = reference_solve(g.velocity, noise).x.numpy()
    resample = np.random.default_rng(0).integers(0, samples, size=(boots, samples))
    print(f"## gmm8d, {samples} fresh noises: fixed / official RMSE ratio [bootstrap 95 %], median-error ratio\n")
    print("| method, shift | " + " | ".join(f"NFE {n}" for n in NFES) + " |\n|---|" + "---|" * len(NFES))
    for shift in (1.0, 3.0):
        for order in (2, 4):
            cells = []
            for n in NFES:
                sq = [np.mean((fewstep.sample(g.velocity, noise, f"stork-{order}", steps=n, shift=shift,
                                              **opts).numpy() - exact) ** 2, axis=1)
                      for opts in ({}, {"compat": "official"})]
                ratio = np.sqrt(sq[0].mean() / sq[1].mean())
                lo, hi = np.quantile(np.sqrt(sq[0][resample].mean(1) / sq[1][resample].mean(1)), [0.025, 0.975])
                median = np.median(np.sqrt(sq[0])) / np.median(np.sqrt(sq[1]))
                cells.append(f"{ratio:.2f} [{lo:.2f}, {hi:.2f}], {median:.2f}")
            print(f"| STORK-{order}, shift {shift:g} | " + " | ".join(cells) + " |")
    print()


def extrapolate_choice(samples: int = 1000) -> None:
    """Which `extrapolate` wins at 6–10 NFE over the whole testbed (the rule for the default)."""
    forms = ("velocity", "noise", "data")
    wins = {(f, m): 0 for f in forms for m in (0, 1)}
    print(f"## extrapolate at 6–10 NFE, every testbed problem, {samples} noises: RMSE / median (best RMSE in bold)\n")
    print("| problem, shift, method, NFE | " + " | ".join(forms) + " |\n|---|---|---|---|")
    for problem in ("gmm2d", "gmm8d", "gmm-stiff"):
        g = preset(problem)
        noise = torch.randn(samples, g.dim, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        exact = reference_solve(g.velocity, noise, check=False).x.numpy()
        for shift in (1.0, 3.0):
            for order in (2, 4):
                for n in (6, 8, 10):
                    res = {f: errors(fewstep.sample(g.velocity, noise, f"stork-{order}", steps=n, shift=shift,
                                                    extrapolate=f), exact) for f in forms}
                    for m in (0, 1):
                        wins[min(forms, key=lambda f, m=m: res[f][m]), m] += 1
                    best = min(forms, key=lambda f: res[f][0])
                    cells = [(f"**{r:.2e}**" if f == best else f"{r:.2e}") + f" / {md:.1e}"
                             for f, (r, md) in res.items()]
                    print(f"| {problem}, {shift:g}, S{order}, {n} | " + " | ".join(cells) + " |")
    print("\nCells won (of 36), RMSE / median: " + ", ".join(f"{f} {wins[f, 0]} / {wins[f, 1]}" for f in forms) + "\n")


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
        cells = [errors(fewstep.sample(g.velocity, noise, name, steps=n, **opts), exact)[0] for n in nfes]
        print(f"| {label} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")
    print()


def stable_limit(name: str, opts: dict, steps: int = 60) -> float:
    """Largest z = λh (bisection) for which dx/dσ = λx stays bounded (|x_end| ≤ 1 from x = 1) over `steps` steps of
    constant h = 0.5/steps from σ = 1 (the "noise" form applies from σ ≤ ½: only in the final step here)."""
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


def orders() -> None:
    intervals = [64, 128, 256, 512]
    print(f"## Convergence order on `smooth_flow` (slope of log max-error vs log intervals, {intervals})\n")
    print("| method | shift 1 | shift 3 |\n|---|---|---|")
    for label, (name, opts) in VARIANTS.items():
        if label.endswith("s5"):
            continue
        # official mode makes intervals+1 calls on the same grids; the slope is against intervals either way
        row = [convergence_order(name, intervals, shift=sh, samples=8, **opts)[0] for sh in (1.0, 3.0)]
        print(f"| {label} | {row[0]:.2f} | {row[1]:.2f} |")
    print()


if __name__ == "__main__":
    torch.set_num_threads(1)
    start = time.time()
    gmm8d()
    large_sample()
    extrapolate_choice()
    stiff()
    stability()
    orders()
    print(f"({time.time() - start:.0f} s)")
