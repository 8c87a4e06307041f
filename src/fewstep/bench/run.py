"""Quality against model calls on the exact Gaussian-mixture testbed (TESTBED.md).

Errors are measured against a tight reference solve from the same noise: RMSE (heavy-tailed: a few samples that
switch modes dominate it) and the median per-sample L2 error beside it. Peers run through diffusers' own scheduler
classes in the plain pipeline loop, evaluated at the σ each scheduler itself uses (UniPC/DPM store integer
timesteps; their `sigmas` are exact).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from fewstep.files import atomic_write

PEERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


def _peer_scheduler(name: str, shift: float):
    import diffusers

    if name == "FlowMatchEulerDiscreteScheduler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    return getattr(diffusers, name)(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)


def _run_peer(name: str, velocity, noise, nfe: int, shift: float):
    sched = _peer_scheduler(name, shift)
    sched.set_timesteps(nfe)
    if len(sched.timesteps) != nfe:
        raise ValueError(f"{name} makes {len(sched.timesteps)} calls for {nfe} steps")
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(x, float(sched.sigmas[i])), t, x).prev_sample
    return x


def run_bench(problem: str = "gmm8d", solvers: list[str] | None = None, nfe: list[int] | None = None,
              shift: float = 1.0, samples: int = 1000, seed: int = 0, peers: bool = True) -> list[dict]:
    """One row per method × NFE: problem, solver, nfe, rmse, median_error."""
    import torch

    import fewstep
    from fewstep.testbed import preset, reference_solve

    torch.set_num_threads(1)
    nfe = nfe or [4, 6, 8, 10, 16]
    names = solvers or [n for n in fewstep.solvers.names() if n != "heun"]
    for name in names:
        fewstep.solvers.info(name)
    g = preset(problem)
    noise = torch.randn(samples, g.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = reference_solve(g.velocity, noise).x
    methods = [(n, lambda steps, n=n: fewstep.sample(g.velocity, noise, n, steps, shift=shift)) for n in names]
    if "stork-4" in names:
        for order in (2, 4):
            methods.append((f"stork-{order}-official", lambda steps, o=order: fewstep.sample(
                g.velocity, noise, f"stork-{o}", steps, shift=shift, compat="official")))
    if peers:
        methods += [(p, lambda steps, p=p: _run_peer(p, g.velocity, noise, steps, shift)) for p in PEERS]
    rows = []
    from tqdm.auto import tqdm

    for (name, fn) in tqdm(methods, desc=f"bench {problem}", unit="method"):
        for n in nfe:
            try:
                x = fn(n)
            except ValueError:  # e.g. heun with an odd number of calls: not comparable at this NFE
                continue
            err = (x.double() - exact)
            per_sample = err.norm(dim=1)
            rows.append({"problem": problem, "solver": name, "nfe": n, "shift": shift,
                         "rmse": float(err.pow(2).mean().sqrt()), "median_error": float(per_sample.median()),
                         "peer": name in PEERS})
    return rows


def markdown(rows: list[dict]) -> str:
    nfes = sorted({r["nfe"] for r in rows})
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    cell = {(r["solver"], r["nfe"]): r for r in rows}
    out = io.StringIO()
    out.write("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n|---|" + "---|" * len(nfes) + "\n")
    for s in solvers:
        vals = [f"{cell[s, n]['rmse']:.3e} / {cell[s, n]['median_error']:.2e}" if (s, n) in cell else "–"
                for n in nfes]
        out.write(f"| {s} | " + " | ".join(vals) + " |\n")
    out.write("\n(RMSE / median per-sample error against the exact solution)\n\n")
    for n in nfes:
        ours = [r for r in rows if r["nfe"] == n and not r["peer"] and not r["solver"].endswith("-official")]
        theirs = [r for r in rows if r["nfe"] == n and r["peer"]]
        if ours and theirs:
            best, peer = min(ours, key=lambda r: r["rmse"]), min(theirs, key=lambda r: r["rmse"])
            out.write(f"- NFE {n}: best fewstep solver {best['solver']} (RMSE {best['rmse']:.3e}) = "
                      f"{best['rmse'] / peer['rmse']:.2f}× the best peer {peer['solver']} ({peer['rmse']:.3e})\n")
    return out.getvalue()


def write_outputs(rows: list[dict], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / f"{stem}.csv", buf.getvalue().encode())
    atomic_write(out / f"{stem}.json", json.dumps(rows, indent=1).encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for s in dict.fromkeys(r["solver"] for r in rows):
        pts = [(r["nfe"], r["rmse"]) for r in rows if r["solver"] == s]
        ax.loglog(*zip(*pts, strict=True), marker="o", linestyle="--" if s in PEERS else "-", label=s)
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel("RMSE vs exact solution")
    ax.set_title(stem)
    ax.legend(fontsize=7)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(out / f"{stem}.png", png.getvalue())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", default="gmm8d", help="gmm2d, gmm8d or gmm-stiff")
    parser.add_argument("--solvers", default=None, help="comma-separated fewstep solvers (default: all but heun)")
    parser.add_argument("--nfe", default="4,6,8,10,16", help="comma-separated model-call budgets")
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers' schedulers")
    parser.add_argument("--out", default=None, help="directory for CSV, JSON and a log-log PNG plot")


def run(args: argparse.Namespace) -> int:
    from fewstep.testbed import PRESETS

    if args.problem not in PRESETS:
        raise ValueError(f"unknown problem {args.problem!r}; available: {', '.join(PRESETS)}")
    nfe = [int(n) for n in args.nfe.split(",")]
    if any(n < 1 for n in nfe):
        raise ValueError("--nfe values must be positive integers")
    rows = run_bench(args.problem, args.solvers.split(",") if args.solvers else None, nfe, args.shift,
                     args.samples, args.seed, not args.no_peers)
    print(f"## {args.problem}, shift {args.shift:g}, {args.samples} samples, seed {args.seed}\n")
    print(markdown(rows))
    if args.out:
        write_outputs(rows, Path(args.out), f"{args.problem}-shift{args.shift:g}")
    return 0
