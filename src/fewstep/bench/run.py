"""Quality against model calls: fewstep's solvers and diffusers' own schedulers on the same noises, in one run.

Errors are measured against a high-accuracy reference solve from the same noise: RMSE (heavy-tailed: a few samples
that switch modes dominate it) and the median per-sample L2 error beside it, plus a distribution distance (energy
distance to exact data on the mixtures; Fréchet distances in a shipped classifier's features on digits). Peers run
through diffusers' own scheduler classes in the plain pipeline loop, evaluated at the σ each scheduler itself uses
(UniPC/DPM store integer timesteps; their `sigmas` are exact). NFE is always the number of model calls made.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.bench.problems import PROBLEMS, Problem, load_problem
from fewstep.files import atomic_write
from fewstep.solvers.plan import StepCountError

PEERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "UniPCMultistepScheduler",
         "DPMSolverMultistepScheduler", "DEISMultistepScheduler")
SEARCHED = "neuralsolver-searched"
DEFAULT_NFE = "4,5,6,7,8,9,10,16"  # odd counts too: FlowMatchHeunDiscreteScheduler can only make 2n − 1 calls
SEARCH_ITERATIONS = 300  # gmm8d, 8 NFE: RMSE 1.5e-2 in 3 s (1500 iterations: 9e-3 in 14 s)
SEARCH_BATCH = 32
GRID = 10  # samples per cell of the image grid: labels 0..9
METRIC_NAMES = {"energy_distance": "ED to data", "mode_flips": "mode flips", "fd": "FD to real data",
                "fd_ref": "FD-ref"}
PEER_NOTES = (
    "FlowMatchHeunDiscreteScheduler: n steps make 2n − 1 model calls (its timesteps list both stages of every step "
    "but the last), so it has rows at odd NFE only; fewstep heun at even NFE only",
    "DEISMultistepScheduler accepts use_flow_sigmas / flow_prediction in diffusers 0.42.1, but its flow grid drops "
    "σ = 0 (the last step has zero length at σ = 0.999/NFE at shift 1), so its samples keep that much noise: run "
    "as users would get it, not repaired",
    "UniPC, DPM++ and DEIS use flow sigmas (use_flow_sigmas=True, prediction_type='flow_prediction', flow_shift = "
    "shift); each peer's model is evaluated at the scheduler's own `sigmas`")


@dataclass(frozen=True)
class Bench:
    rows: list[dict]  # one per method × NFE that the method can make exactly
    notes: tuple[str, ...]
    samples: dict[tuple[str, int], torch.Tensor]  # the first GRID samples of each (method, NFE), image problems only
    reference: torch.Tensor  # the first GRID reference samples


def _peer_scheduler(name: str, shift: float):
    import diffusers

    cls = getattr(diffusers, name)
    if name.startswith("FlowMatch"):
        return cls(shift=shift)
    return cls(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)


def _peer_steps(name: str, nfe: int) -> int:
    """The `num_inference_steps` that makes exactly `nfe` model calls. FlowMatchHeunDiscreteScheduler's timesteps
    hold both stages of every step but the last (a single Euler step to σ = 0): 2n − 1 calls for n steps."""
    if name != "FlowMatchHeunDiscreteScheduler":
        return nfe
    if nfe % 2 == 0:
        raise StepCountError(f"{name} makes an odd number of model calls, not {nfe}")
    return (nfe + 1) // 2


def run_peer(name: str, velocity: Callable, noise: torch.Tensor, nfe: int, shift: float) -> torch.Tensor:
    """Sample with diffusers' scheduler `name` in the pipeline loop: one model call per entry of its timesteps."""
    sched = _peer_scheduler(name, shift)
    sched.set_timesteps(_peer_steps(name, nfe))
    if len(sched.timesteps) != nfe:
        raise StepCountError(f"{name} makes {len(sched.timesteps)} calls, not {nfe}")
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(x, float(sched.sigmas[i])), t, x).prev_sample
    return x


def methods(problem: Problem, shift: float, seed: int = 0,
            search_iterations: int = SEARCH_ITERATIONS) -> dict[str, Callable[[int], torch.Tensor]]:
    """Every method by name: nfe → samples from `problem.noise` (a ValueError where it cannot make exactly nfe calls).
    The searched NeuralSolver is searched per NFE on the problem's training noises, sharing one teacher solve."""
    import fewstep
    from fewstep.search import search, teacher_bank

    v, noise = problem.velocity, problem.noise
    table = {n: functools.partial(fewstep.sample, v, noise, n, shift=shift) for n in fewstep.solvers.names()}
    for order in (2, 4):
        table[f"stork-{order}-official"] = functools.partial(fewstep.sample, v, noise, f"stork-{order}", shift=shift,
                                                             compat="official")

    @functools.cache
    def teacher() -> tuple[torch.Tensor, torch.Tensor]:
        return teacher_bank(problem.search_model, problem.train_noise)

    def searched(nfe: int) -> torch.Tensor:
        if nfe < 2:
            raise ValueError("search needs at least 2 steps")
        found = search(problem.search_model, nfe, noise=problem.train_noise, iterations=search_iterations,
                       batch=SEARCH_BATCH, seed=seed, trajectories=teacher(), model_name=problem.name)
        return fewstep.sample(v, noise, "neuralsolver", nfe, solver_file=found)

    table[SEARCHED] = searched
    for peer in PEERS:
        table[peer] = functools.partial(run_peer, peer, v, noise, shift=shift)
    return table


def fewstep_methods() -> list[str]:
    """The fewstep rows of the bench: every registered solver, the official STORK behaviour, the searched solver."""
    import fewstep

    return [*fewstep.solvers.names(), "stork-2-official", "stork-4-official", SEARCHED]


def is_peer(name: str) -> bool:
    """diffusers' schedulers and the official STORK behaviour: what users would otherwise run."""
    return name in PEERS or name.endswith("-official")


def run_bench(problem: str | Problem = "gmm8d", solvers: list[str] | None = None, nfe: list[int] | None = None,
              shift: float = 1.0, samples: int = 1000, seed: int = 0, peers: bool = True,
              search_iterations: int = SEARCH_ITERATIONS) -> Bench:
    """Every selected method at every NFE it can make exactly, on the same seeded noises.
    `problem`: a name, or a `load_problem(...)` result to reuse its reference solve (then `samples` is unused).
    `solvers`: fewstep methods (None: all, official STORK and the searched NeuralSolver included)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(1)  # small batches: intra-op threads only add overhead, and results stay bit-identical
    nfe = nfe or [int(n) for n in DEFAULT_NFE.split(",")]
    ours = fewstep_methods()
    unknown = [n for n in solvers or () if n not in ours]
    if unknown:
        raise ValueError(f"unknown solver {', '.join(map(repr, unknown))}; available: {', '.join(ours)}")
    names = [*(ours if solvers is None else solvers), *(PEERS if peers else ())]
    task = load_problem(problem, samples, seed) if isinstance(problem, str) else problem
    table = methods(task, shift, seed, search_iterations)
    rows, kept = [], {}
    bar = tqdm([(name, n) for name in names for n in nfe], desc=f"bench {task.name}", unit="run")
    for name, n in bar:
        bar.set_postfix_str(f"{name} NFE {n}")
        try:
            x = table[name](n).double()
        except StepCountError:  # cannot make exactly n model calls (heun: even only; FlowMatchHeun: odd only)
            continue
        per_sample = (x - task.reference).flatten(1).norm(dim=1)
        rows.append({"problem": task.name, "solver": name, "nfe": n, "shift": shift,
                     "rmse": float((x - task.reference).pow(2).mean().sqrt()),
                     "median_error": float(per_sample.median()), **task.quality(x), "peer": is_peer(name)})
        if task.image:
            kept[name, n] = x[:GRID]
    notes = task.notes + (PEER_NOTES if peers else ())
    if SEARCHED in names:
        notes += (f"{SEARCHED}: `fewstep.search` per NFE on {len(task.train_noise)} training noises (seed {seed} + 1, "
                  f"not the bench noises), {search_iterations} iterations, batch {SEARCH_BATCH}, search seed {seed}, "
                  "one exact DOP853 teacher (rtol 1e-9) shared by all NFE; it learns its own time grid, so `--shift` "
                  "does not change it. `neuralsolver`: the published SiT table, not searched on this problem",)
    return Bench(rows, notes, kept, task.reference[:GRID])


def _table(rows: list[dict], cell: Callable[[dict], str]) -> str:
    nfes = sorted({r["nfe"] for r in rows})
    by = {(r["solver"], r["nfe"]): r for r in rows}
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for s in dict.fromkeys(r["solver"] for r in rows):
        lines.append(f"| {s} | " + " | ".join(cell(by[s, n]) if (s, n) in by else "–" for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def winners(rows: list[dict]) -> list[str]:
    """Per NFE: the best fewstep solver by RMSE and its ratio over the best peer (diffusers or official STORK)."""
    lines = []
    for n in sorted({r["nfe"] for r in rows}):
        ours = [r for r in rows if r["nfe"] == n and not r["peer"]]
        theirs = [r for r in rows if r["nfe"] == n and r["peer"]]
        if ours and theirs:
            best, peer = min(ours, key=lambda r: r["rmse"]), min(theirs, key=lambda r: r["rmse"])
            lines.append(f"- NFE {n}: best fewstep solver {best['solver']} (RMSE {best['rmse']:.3e}) = "
                         f"{best['rmse'] / peer['rmse']:.2f}× the best peer {peer['solver']} ({peer['rmse']:.3e})")
    return lines


def markdown(bench: Bench) -> str:
    rows = bench.rows
    metrics = [k for k in METRIC_NAMES if k in rows[0]]
    return "\n".join([
        "RMSE / median per-sample L2 error against the reference solution:\n",
        _table(rows, lambda r: f"{r['rmse']:.3e} / {r['median_error']:.2e}"),
        " / ".join(METRIC_NAMES[k] for k in metrics) + ":\n",
        _table(rows, lambda r: " / ".join(f"{r[k]:.3g}" for k in metrics)),
        *winners(rows), "", *(f"- {note}" for note in bench.notes), ""])


def _write_tables(rows: list[dict], out: Path, stem: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / f"{stem}.csv", buf.getvalue().encode())
    atomic_write(out / f"{stem}.json", json.dumps(rows, indent=1).encode())


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png.getvalue()


def plot(rows: list[dict], title: str) -> bytes:
    """Log-log error against NFE, one line per method (peers dashed); FD-ref beside it where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [k for k in ("rmse", "median_error", "fd_ref") if k in rows[0]]
    nfes = sorted({r["nfe"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5))
    tab20 = plt.get_cmap("tab20").colors
    colours = tab20[::2] + tab20[1::2]  # the ten strong colours first: tab20 pairs each with a paler twin
    for ax, key in zip(axes, panels, strict=True):
        for i, s in enumerate(dict.fromkeys(r["solver"] for r in rows)):
            pts = [(r["nfe"], r[key]) for r in rows if r["solver"] == s and r[key] > 0]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", markersize=3, color=colours[i % len(colours)],
                          linestyle="--" if is_peer(s) else "-", label=s)
        ax.set_xlabel("model calls (NFE)")
        ax.set_ylabel({"rmse": "RMSE", "median_error": "median per-sample error", "fd_ref": "FD-ref"}[key])
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(title)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)


def sample_grid(bench: Bench) -> bytes:
    """One row per method (the reference first, repeated in every column), one column per NFE, each cell the
    digits 0..9 from the same noises; a blank cell where the method cannot make that many calls."""
    from PIL import Image, ImageDraw

    from fewstep.models.digits import to_image

    nfes = sorted({n for _, n in bench.samples})
    names = list(dict.fromkeys(s for s, _ in bench.samples))
    cell = to_image(bench.reference, scale=2, nrow=GRID)
    left, top, pad = 200, 20, 6
    w, h = cell.width + pad, cell.height + pad
    canvas = Image.new("L", (left + w * len(nfes), top + h * (len(names) + 1)), 255)
    draw = ImageDraw.Draw(canvas)
    for j, n in enumerate(nfes):
        draw.text((left + j * w, 4), f"NFE {n}", fill=0)
    draw.text((4, top + cell.height // 3), "reference (DOP853)", fill=0)
    for j in range(len(nfes)):  # above every column, to compare against
        canvas.paste(cell, (left + j * w, top))
    for i, s in enumerate(names, start=1):
        draw.text((4, top + i * h + cell.height // 3), s, fill=0)
        for j, n in enumerate(nfes):
            if (s, n) in bench.samples:
                canvas.paste(to_image(bench.samples[s, n], scale=2, nrow=GRID), (left + j * w, top + i * h))
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    return png.getvalue()


def write_outputs(bench: Bench, out: Path, stem: str, title: str) -> None:
    """CSV, JSON, the Markdown section, the log-log plot and (image problems) the sample grid, each atomically."""
    _write_tables(bench.rows, out, stem)
    atomic_write(out / f"{stem}.md", f"## {title}\n\n{markdown(bench)}\n![{stem}]({stem}.png)\n".encode())
    atomic_write(out / f"{stem}.png", plot(bench.rows, title))
    if bench.samples:
        atomic_write(out / f"{stem}-samples.png", sample_grid(bench))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", default="gmm8d", help=", ".join(PROBLEMS))
    parser.add_argument("--solvers", default=None,
                        help=f"comma-separated fewstep methods (default: all, incl. stork-*-official and {SEARCHED})")
    parser.add_argument("--nfe", default=DEFAULT_NFE, help=f"model-call budgets (default {DEFAULT_NFE})")
    parser.add_argument("--shift", type=float, default=1.0, help="static time shift of the σ grid (SD3/Flux-dev: 3)")
    parser.add_argument("--samples", type=int, default=None, help="noises (default: 1000; digits 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-iterations", type=int, default=SEARCH_ITERATIONS,
                        help=f"optimizer steps of each {SEARCHED} search")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers' schedulers")
    parser.add_argument("--out", default=None, help="directory for CSV, JSON, Markdown and PNG plots")
    parser.add_argument("--overhead", action="store_true",
                        help="instead: per-step overhead of the fewstep adapter vs FlowMatchEulerDiscreteScheduler "
                             "on a Flux-size latent")


def parse_nfe(text: str) -> list[int]:
    """'4,8,16' → [4, 8, 16] (sorted, unique); a ValueError that names the flag otherwise."""
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise ValueError(f"--nfe must be comma-separated positive integers, got {text!r}") from None
    if values[0] < 1:
        raise ValueError(f"--nfe values must be positive integers, got {text!r}")
    return values


def _overhead(args: argparse.Namespace) -> int:
    from fewstep.bench.overhead import measure_overhead, overhead_markdown

    rows = measure_overhead(solvers=args.solvers.split(",") if args.solvers else None)  # --solvers picks the rows
    print(overhead_markdown(rows))
    if args.out:
        _write_tables(rows, Path(args.out), "overhead")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.overhead:
        return _overhead(args)
    if args.problem not in PROBLEMS:
        raise ValueError(f"unknown problem {args.problem!r}; available: {', '.join(PROBLEMS)}")
    if args.search_iterations < 1:
        raise ValueError(f"--search-iterations must be at least 1, got {args.search_iterations}")
    samples = args.samples or (512 if args.problem == "digits" else 1000)
    bench = run_bench(args.problem, args.solvers.split(",") if args.solvers else None, parse_nfe(args.nfe),
                      args.shift, samples, args.seed, not args.no_peers, args.search_iterations)
    title = f"{args.problem}, shift {args.shift:g}, {samples} samples, seed {args.seed}"
    print(f"## {title}\n\n{markdown(bench)}")
    if args.out:
        write_outputs(bench, Path(args.out), f"{args.problem}-shift{args.shift:g}", title)
    return 0
