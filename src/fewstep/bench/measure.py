"""Quality against model calls: fewstep's solvers and diffusers' own schedulers on the same noises and the same σ grid.

Errors are measured against a high-accuracy reference solve from the same noise (see `fewstep.bench.stats` for
RMSE, its bootstrap interval and the median error), plus a distribution distance (energy distance to exact data on
the mixtures; Fréchet distances in a shipped classifier's features on the image models). Every method steps
through the grid a pipeline would pass (`fewstep.bench.grids`); NFE is always the number of model calls made.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.bench import stats
from fewstep.bench.command import DEFAULT_NFE, GENERATE, MAX_NFE, SEARCH_ITERATIONS, SEARCHED
from fewstep.bench.grids import Grid, get_grid
from fewstep.bench.peers import NOTES as PEER_NOTES
from fewstep.bench.peers import PEERS, is_peer, peer_method
from fewstep.bench.problems import Problem, load_problem
from fewstep.errors import FewstepError, InvalidInput, close_match
from fewstep.files import atomic_write, check_output
from fewstep.solvers.denoise import guided_options
from fewstep.solvers.plan import StepCountError
from fewstep.solvers.registry import RECOMMENDED

OFFICIAL = ("stork-2-official", "stork-4-official")
SEARCH_BATCH = 32
GRID = 10  # samples per cell of the image grid: labels 0..9
PEER_COLOURS = ("black", "dimgray", "saddlebrown", "darkgreen", "navy", "darkmagenta")  # dashed lines
METRIC_NAMES = {"energy_distance": "ED to data", "mode_flips": "mode flips", "fd": "FD to real data",
                "fd_ref": "FD-ref"}


@dataclass
class Bench:
    rows: list[dict]  # one per method × NFE that the method can make exactly
    notes: tuple[str, ...]
    samples: dict[tuple[str, int], torch.Tensor]  # the first GRID samples of each (method, NFE), image problems only
    reference: torch.Tensor  # the first GRID reference samples
    sq: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # per-sample squared errors, by method/NFE
    problem: Problem | None = None
    grid: Grid | None = None
    skipped: dict[str, dict[int, str]] = field(default_factory=dict)  # method → {NFE it cannot make: why}


def single_thread() -> None:
    """One thread for torch and for NumPy's BLAS: the bench's batches are small, and on a shared machine a BLAS
    thread pool makes a 128-d Fréchet distance 25× slower (1.2 s instead of 0.04 s); results stay bit-identical."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        return
    threadpool_limits(1)


def fewstep_methods() -> list[str]:
    """The fewstep rows the bench knows: every registered solver, the official STORK behaviour, the searched
    NeuralSolver, and `generate` (the recommended solver as `fewstep generate` runs it for the problem's guidance)."""
    import fewstep

    return [*fewstep.solvers.names(), *OFFICIAL, SEARCHED, GENERATE]


def default_solvers() -> list[str]:
    """The fewstep rows of a run without `--solvers`: all but the searched NeuralSolver (a search per NFE) and
    `generate` (where the guidance is weak, the recommended solver's own row)."""
    return [n for n in fewstep_methods() if n not in (SEARCHED, GENERATE)]


def _ours(name: str, velocity: Callable, noise: torch.Tensor, grid: Grid, **options) -> Callable[[int], torch.Tensor]:
    import fewstep
    from fewstep.solvers.plan import intervals_for

    def method(nfe: int) -> torch.Tensor:
        solver = fewstep.solvers.get(name, **options)
        sigmas = grid.sigmas(intervals_for(solver, nfe, name))
        return fewstep.sample(velocity, noise, name, nfe, sigmas=sigmas, **options)

    return method


def methods(problem: Problem, grid: Grid, seed: int = 0, search_iterations: int = SEARCH_ITERATIONS,
            specs: tuple[str, ...] = ()) -> dict[str, Callable[[int], torch.Tensor]]:
    """Every method by name: nfe → samples from `problem.noise` on `grid` (a StepCountError where it cannot make
    exactly nfe calls). The searched NeuralSolver is searched per NFE on the problem's training noises, sharing one
    teacher solve; it learns its own time grid. `specs`: solvers with options ('stork-4:extrapolate=data')."""
    import fewstep
    from fewstep.search import MAX_SEARCH_STEPS, search, teacher_bank

    v, noise = problem.velocity, problem.noise
    table = {n: _ours(n, v, noise, grid) for n in fewstep.solvers.names()}
    for name in OFFICIAL:
        table[name] = _ours(name.removesuffix("-official"), v, noise, grid, compat="official")

    @functools.cache
    def teacher() -> tuple[torch.Tensor, torch.Tensor]:
        return teacher_bank(problem.search_model, problem.train_noise)

    def searched(nfe: int) -> torch.Tensor:
        if not 2 <= nfe <= MAX_SEARCH_STEPS:  # as `fewstep search --steps`; a 1000-step search would run for hours
            raise StepCountError(f"{SEARCHED} cannot make exactly {nfe} model calls; a search takes 2 to "
                                 f"{MAX_SEARCH_STEPS} steps")
        found = search(problem.search_model, nfe, noise=problem.train_noise, iterations=search_iterations,
                       batch=SEARCH_BATCH, seed=seed, trajectories=teacher(), model_name=problem.name)
        return fewstep.sample(v, noise, "neuralsolver", nfe, solver_file=found)

    table[SEARCHED] = searched
    table[GENERATE] = _ours(RECOMMENDED, v, noise, grid, **guided_options(RECOMMENDED, {}, problem.guidance))
    for spec in specs:
        if spec not in table:
            name, options = parse_spec(spec)
            table[spec] = _ours(name, v, noise, grid, **options)
    for peer in PEERS:
        table[peer] = peer_method(peer, v, noise, grid.sigmas)
    return table


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_spec(spec: str) -> tuple[str, dict]:
    """'stork-4:extrapolate=data:stages=5' → ('stork-4', {'extrapolate': 'data', 'stages': 5}): a registered solver
    with options, as its own row of the bench (what the STORK and NeuralSolver studies compare)."""
    name, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--solvers: {spec!r}: options are written name:key=value[:key=value]")
        options[key] = _value(value)
    return name, options


def _close(word: str, choices: list[str]) -> str:
    """' (did you mean ...?)' for a `fewstep generate` alias ("adams", "linear") or a near miss; else ''."""
    from fewstep.generate import resolve_scheduler

    try:
        close = resolve_scheduler(word, {})[0]
    except FewstepError:
        close = close_match(word, choices)
    return f" (did you mean {close!r}?)" if close else ""


def check_solvers(solvers: list[str] | None) -> list[str]:
    """The fewstep rows to run: known names, or registered solvers with options (`parse_spec`), each once."""
    import fewstep

    ours = fewstep_methods()
    if solvers is None:
        return default_solvers()
    unknown = []
    for spec in solvers:
        if spec in ours:
            continue
        name, options = parse_spec(spec)
        if name in ours and name not in fewstep.solvers.names():
            raise InvalidInput(f"--solvers: {spec!r}: {name!r} takes no options")
        if ":" not in spec or name not in fewstep.solvers.names():
            unknown.append(f"{spec!r}{_close(name, ours)}")
            continue
        try:
            fewstep.solvers.get(name, **options)
        except (ValueError, TypeError) as err:
            raise InvalidInput(f"--solvers: {spec!r}: {err}") from None
    if unknown:
        raise InvalidInput(f"--solvers: unknown solver {', '.join(unknown)}; available: {', '.join(ours)} "
                           "(or name:key=value for a registered solver with options)")
    return list(dict.fromkeys(solvers))


def run_bench(problem: str | Problem = "gmm8d", solvers: list[str] | None = None, nfe: list[int] | None = None,
              grid: str | Grid = "shift1", samples: int = 1000, seed: int = 0, peers: bool = True,
              search_iterations: int = SEARCH_ITERATIONS, resamples: int = stats.RESAMPLES,
              cache: Path | None = None, progress: bool = True) -> Bench:
    """Every selected method at every NFE it can make exactly, on the same seeded noises and the same σ grid.
    `problem`: a name, or a `load_problem(...)` result to reuse its reference solve (then `samples` is unused).
    `solvers`: fewstep methods (None: all but the searched NeuralSolver; [] none)."""
    from tqdm.auto import tqdm

    single_thread()
    nfe = parse_nfe(DEFAULT_NFE) if nfe is None else list(nfe)
    if not nfe or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in nfe):
        raise InvalidInput(f"--nfe must be positive integers, got {nfe!r}")
    names = [*check_solvers(solvers), *(PEERS if peers else ())]
    grid = get_grid(grid) if isinstance(grid, str) else grid
    task = load_problem(problem, samples, seed, cache, progress) if isinstance(problem, str) else problem
    table = methods(task, grid, seed, search_iterations, tuple(names))
    rows, kept, sqs, skipped = [], {}, {}, {}
    bar = tqdm([(name, n) for name in names for n in nfe], desc=f"bench {task.name} {grid.name}", unit="run",
               disable=not progress)
    for name, n in bar:
        bar.set_postfix_str(f"{name} NFE {n}")
        try:
            x = table[name](n).double()
        except StepCountError as err:  # cannot make exactly n model calls (heun: even only; FlowMatchHeun: odd only)
            skipped.setdefault(name, {})[n] = str(err)
            continue
        sq = stats.per_sample_sq(x, task.reference)
        lo, hi = stats.rmse_ci(sq, resamples, seed)
        sqs[name, n] = sq
        rows.append({"problem": task.name, "grid": grid.name, "solver": name, "nfe": n, "rmse": stats.rmse(sq),
                     "rmse_lo": lo, "rmse_hi": hi, "median_error": stats.median_error(sq, x[0].numel()),
                     **task.quality(x), "peer": is_peer(name), "samples": len(sq)})
        if task.image:
            kept[name, n] = x[:GRID]
    notes = (f"grid: {grid.title}: the σ values of diffusers' FlowMatchEulerDiscreteScheduler (with this shift or "
             "μ) after a pipeline's `set_timesteps(sigmas=linspace(1, 1/N, N), mu=μ)`, the same for every method "
             "(N intervals for N model calls; fewer for methods with several calls per step)",) + task.notes
    notes += (stats.RMSE_DEFINITION, stats.MEDIAN_DEFINITION)
    if peers:
        notes += PEER_NOTES
    if any(n in names for n in OFFICIAL):
        notes += ("stork-*-official: fewstep's STORK with compat='official' (the paper's released behaviour)",)
    if "neuralsolver" in names:
        notes += ("neuralsolver: the published SiT table with its own time grid (not the bench grid)",)
    if GENERATE in names:
        chosen = guided_options(RECOMMENDED, {}, task.guidance)
        notes += (f"{GENERATE}: {RECOMMENDED} as `fewstep generate` runs it at this problem's guidance "
                  f"{task.guidance:g}: options {chosen or 'its defaults'} (docs/solvers.md)",)
    if SEARCHED in names:
        notes += (f"{SEARCHED}: `fewstep.search` per NFE on {len(task.train_noise)} training noises (seed {seed} + 1, "
                  f"not the bench noises), {search_iterations} iterations, batch {SEARCH_BATCH}, search seed {seed}, "
                  "one exact DOP853 teacher (rtol 1e-9) shared by all NFE; it learns its own time grid, so the grid "
                  "does not change it",)
    return Bench(rows, notes, kept, task.reference[:GRID], sqs, task, grid, skipped)


def skipped_notes(benches: list[Bench]) -> list[str]:
    """One line per method that could not make some of the requested NFE in any of `benches`: which NFE, and why
    (the error's reason, after its '; ', for the first of them)."""
    why: dict[str, dict[int, str]] = {}
    for bench in benches:
        for name, cells in bench.skipped.items():
            why.setdefault(name, {}).update(cells)
    return [f"note: {name} cannot make {', '.join(map(str, sorted(cells)))} model calls "
            f"({cells[min(cells)].split('; ', 1)[-1]}); its cells are left out" for name, cells in why.items()]


def _table(rows: list[dict], cell: Callable[[dict], str]) -> str:
    nfes = sorted({r["nfe"] for r in rows})
    by = {(r["solver"], r["nfe"]): r for r in rows}
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for s in dict.fromkeys(r["solver"] for r in rows):
        lines.append(f"| {s} | " + " | ".join(cell(by[s, n]) if (s, n) in by else "–" for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def winners(rows: list[dict]) -> list[str]:
    """Per NFE: the best fewstep method by RMSE and its ratio over the best diffusers peer."""
    lines = []
    for n in sorted({r["nfe"] for r in rows}):
        ours = [r for r in rows if r["nfe"] == n and not r["peer"]]
        theirs = [r for r in rows if r["nfe"] == n and r["peer"]]
        if ours and theirs:
            best, peer = min(ours, key=lambda r: r["rmse"]), min(theirs, key=lambda r: r["rmse"])
            lines.append(f"- NFE {n}: best fewstep method {best['solver']} (RMSE {best['rmse']:.3e}) = "
                         f"{best['rmse'] / peer['rmse']:.2f}× the best peer {peer['solver']} ({peer['rmse']:.3e})")
    return lines


def markdown(bench: Bench, notes: tuple[str, ...] | None = None) -> str:
    """The tables of one run, the winners per NFE and `notes` (default: all of the run's notes)."""
    rows = bench.rows
    notes = bench.notes if notes is None else notes
    if not rows:
        return "(no method could make the requested NFE)\n"
    metrics = [k for k in METRIC_NAMES if k in rows[0]]
    return "\n".join([
        "RMSE [95 % bootstrap CI] against the reference solution:\n",
        _table(rows, lambda r: f"{r['rmse']:.3e} [{r['rmse_lo']:.2e}, {r['rmse_hi']:.2e}]"),
        "Median per-sample L2 error:\n",
        _table(rows, lambda r: f"{r['median_error']:.2e}"),
        " / ".join(METRIC_NAMES[k] for k in metrics) + ":\n",
        _table(rows, lambda r: " / ".join(f"{r[k]:.3g}" for k in metrics)),
        *winners(rows), "", *(f"- {note}" for note in notes), ""])


def tables(rows: list[dict], stem: str) -> dict[str, bytes]:
    """`stem`.csv and `stem`.json of `rows` (none for no rows), by file name."""
    if not rows:
        return {}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    # JSON has no NaN: a value that does not exist (FD-ref of a mixture, Euler where it cannot make the NFE) is null.
    strict = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    return {f"{stem}.csv": buf.getvalue().encode(),
            f"{stem}.json": json.dumps(strict, indent=1, allow_nan=False).encode()}


def write_files(files: dict[Path, bytes]) -> None:
    """Every file or none: each is written in full beside its target under a temporary name (by `atomic_write`:
    checked, flushed, missing folders created) and only when all were written are they renamed into place; any
    failure, Ctrl-C included, removes the temporary files, so no run leaves half its outputs next to old ones."""
    staged: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            real = check_output(path)  # beside a symlink's target, which is what gets replaced
            staged[real] = real.with_name(f".{real.name}.{os.getpid()}.part")
            atomic_write(staged[real], data)
            if real.exists():  # keep the replaced file's mode, as atomic_write does
                shutil.copymode(real, staged[real])
        for real, tmp in staged.items():
            os.replace(tmp, real)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png.getvalue()


def plot(benches: list[Bench], title: str, highlight: str | None = None) -> bytes:
    """Log-log error against NFE, one row of panels per grid, one line per method (peers dashed, `highlight` bold),
    the RMSE's bootstrap interval shaded; FD-ref beside it where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    benches = [b for b in benches if b.rows]
    panels = [k for k in ("rmse", "median_error", "fd_ref") if k in benches[0].rows[0]]
    fig, axes = plt.subplots(len(benches), len(panels), figsize=(5.5 * len(panels), 4.6 * len(benches)),
                             squeeze=False)
    fig.subplots_adjust(hspace=0.3, wspace=0.25)
    tab20 = plt.get_cmap("tab20").colors
    # the strong colours first (tab20 pairs each with a paler twin), grey left to the peers
    colours = [c for i, c in enumerate(tab20[::2] + tab20[1::2]) if i not in (7, 17)]
    for row, bench in zip(axes, benches, strict=True):
        rows = bench.rows
        nfes = sorted({r["nfe"] for r in rows})
        for ax, key in zip(row, panels, strict=True):
            names = list(dict.fromkeys(r["solver"] for r in rows))
            ours, theirs = [s for s in names if not is_peer(s)], [s for s in names if is_peer(s)]
            for s in names:
                mine = [r for r in rows if r["solver"] == s and r[key] > 0]
                if not mine:
                    continue
                colour = (PEER_COLOURS[theirs.index(s) % len(PEER_COLOURS)] if is_peer(s)
                          else colours[ours.index(s) % len(colours)])
                ax.loglog([r["nfe"] for r in mine], [r[key] for r in mine], marker="o", markersize=3, color=colour,
                          linestyle="--" if is_peer(s) else "-", label=s + (" (headline)" if s == highlight else ""),
                          linewidth=2.8 if s == highlight else 1.2, zorder=5 if s == highlight else 2)
                if key == "rmse":
                    ax.fill_between([r["nfe"] for r in mine], [r["rmse_lo"] for r in mine],
                                    [r["rmse_hi"] for r in mine], color=colour, alpha=0.12, linewidth=0)
            ax.set_xlabel("model calls (NFE)")
            ax.set_ylabel({"rmse": "RMSE (95 % CI shaded)", "median_error": "median per-sample L2 error",
                           "fd_ref": "FD-ref"}[key])
            ax.set_xticks(nfes, [str(n) for n in nfes])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        row[0].set_title(f"{title}, {bench.grid.title if bench.grid else ''}", fontsize=9)
        row[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)


def sample_grid(bench: Bench) -> bytes:
    """One row per method (the reference first, repeated in every column), one column per NFE, each cell the
    samples 0..9 from the same noises; a blank cell where the method cannot make that many calls."""
    from PIL import Image, ImageDraw

    to_image = bench.problem.to_image if bench.problem and bench.problem.to_image else None
    if to_image is None:
        from fewstep.models.digits import to_image
    nfes = sorted({n for _, n in bench.samples})
    names = list(dict.fromkeys(s for s, _ in bench.samples))
    cell = to_image(bench.reference, scale=2, nrow=GRID).convert("L")
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
                canvas.paste(to_image(bench.samples[s, n], scale=2, nrow=GRID).convert("L"),
                             (left + j * w, top + i * h))
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    return png.getvalue()


def problem_markdown(benches: list[Bench], title: str) -> str:
    """One section per grid with the notes of that grid only; the notes all runs share once, at the end."""
    shared = [n for n in benches[0].notes if all(n in b.notes for b in benches)] if benches else []
    parts = [f"## {title}\n"]
    for bench in benches:
        own = tuple(n for n in bench.notes if n not in shared)
        parts.append(f"### {bench.grid.title}\n\n{markdown(bench, own)}")
    parts += ["### Notes\n", *(f"- {note}" for note in shared), ""]
    return "\n".join(parts)


def problem_outputs(stem: str, grids: list[Grid]) -> list[str]:
    """The names of `problem_files`: `stem`.csv/.json/.md/.png and a sample grid per grid of an image problem."""
    return [f"{stem}.{e}" for e in ("csv", "json", "md", "png")] + [f"{stem}-{g.name}-samples.png" for g in grids]


def problem_files(benches: list[Bench], stem: str, title: str, highlight: str | None = None) -> dict[str, bytes]:
    """The files of one problem (all its grids) by name, see `problem_outputs`; none when no method ran."""
    rows = [r for b in benches for r in b.rows]
    if not rows:
        return {}
    image = [b for b in benches if b.samples]
    contents = [*tables(rows, stem).values(), f"{problem_markdown(benches, title)}\n![{stem}]({stem}.png)\n".encode(),
                plot(benches, title, highlight), *(sample_grid(b) for b in image)]
    return dict(zip(problem_outputs(stem, [b.grid for b in image]), contents, strict=True))


def parse_nfe(text: str) -> list[int]:
    """'4,8,16' → [4, 8, 16] (sorted, unique); an InvalidInput that names the flag otherwise."""
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise InvalidInput(f"--nfe must be comma-separated positive integers, got {text!r}") from None
    if values[0] < 1:
        raise InvalidInput(f"--nfe values must be positive integers, got {text!r}")
    if values[-1] > MAX_NFE:
        raise InvalidInput(f"--nfe values must be at most {MAX_NFE} model calls, got {text!r}")
    return values
