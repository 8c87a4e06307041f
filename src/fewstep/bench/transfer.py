"""`fewstep bench --suite transfer`: does a solver searched on one problem and grid help on another?

A source is a NeuralSolver searched here on a problem and grid (`PROBLEM@GRID`: the bench's own search settings, the
"neuralsolver-searched" method of `fewstep.bench.measure`, started from that grid), a family searched here
(`PROBLEM+PROBLEM@GRID`, e.g. `gmm8d+digits@shift1`: one solver per NFE for all of them, `fewstep.search`'s family
search with the same settings, each member on its own training bank and teacher) or a solver file (a path, or the
name of a file shipped in data/neuralsolver such as `digits-shift1`). Each source is scored on every target problem ×
grid × NFE against the reference solve from the target's bench noises, as the RMSE ratio to the best diffusers peer in
that cell; the training-free default (`--headline-solver`, the registry's recommendation) gets the same ratio beside
it. A searched solver steps on its own searched σ grid whatever the target grid is; the peers and the training-free
solver step on the target grid. Searched solver files are cached in the bench cache folder next to the reference
solves, keyed by everything the search depends on (its code included), so a rerun searches nothing.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewstep.bench import stats
from fewstep.bench.grids import Grid, get_grid, shift_name
from fewstep.bench.measure import SEARCH_BATCH, run_bench
from fewstep.bench.problems import PROBLEMS, Problem, _digest, is_image, load_problem
from fewstep.errors import FewstepError, InputFileError, InvalidInput
from fewstep.search import GridMismatchWarning
from fewstep.solvers.neuralsolver import SolverFile
from fewstep.solvers.plan import StepCountError

DIAGONAL = "◆"
FINDINGS = "<!-- findings: written by hand for the run above; a rerun keeps what follows this line -->"


@dataclass(frozen=True)
class Source:
    label: str  # as given on the command line: gmm8d@shift1, gmm8d+digits@shift1, digits-shift1, ./my.json
    problem: str | None  # the problem it was searched on, a family's joined by + (None: a file that does not say)
    grid: str | None  # the grid it was searched on, by grid name (shift1, shift3)
    file: SolverFile | None = None  # None: searched here, per NFE

    @property
    def searched_here(self) -> bool:
        return self.file is None

    @property
    def members(self) -> list[str]:
        """The problems it was searched on: one, or a family's."""
        return self.problem.split("+") if self.problem else []


def _file_origin(file: SolverFile) -> tuple[str | None, str | None]:
    """The bench problem and grid a `fewstep search` file was searched on, from its provenance: the model with its
    guidance (digits at guidance 3 is the problem digits-cfg3) and the grid's shift or μ."""
    prov = file.provenance
    model, guidance, grid = prov.get("model"), prov.get("guidance"), prov.get("grid")
    problem = None
    if isinstance(model, str) and model:
        problem = model if guidance in (None, 1, 1.0) else f"{model}-cfg{float(guidance):g}"
    name = None
    if isinstance(grid, dict):
        mu, shift = grid.get("mu"), grid.get("shift") or 1.0
        name = shift_name(math.exp(mu) if mu is not None else float(shift))
    return problem, name


def parse_sources(text: str) -> list[Source]:
    """'gmm8d@shift3,gmm8d+digits@shift1,digits-shift1,./my.json' → sources: PROBLEM@GRID (or a family
    PROBLEM+PROBLEM@GRID) is searched here, anything else is a solver file (a shipped name first, then a path). Every
    file is read now, before any computation."""
    from fewstep.search import shipped_dir

    specs = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not specs:
        raise InvalidInput(f"--sources needs at least one source, got {text!r}")
    sources = []
    for spec in specs:
        if "@" in spec:
            problem, _, grid = spec.partition("@")
            members = problem.split("+")
            for name in members:
                if name not in PROBLEMS:
                    raise InvalidInput(f"--sources {spec}: unknown problem {name!r}; available: {', '.join(PROBLEMS)}")
            if len(set(members)) < len(members):
                raise InvalidInput(f"--sources {spec}: a family names each problem once")
            try:
                grid = get_grid(grid).name
            except InvalidInput:
                raise InvalidInput(f"--sources {spec}: unknown grid {grid!r}; use shift<X> with X > 0 (e.g. "
                                   "shift1, shift3)") from None
            if any(s.problem == problem and s.grid == grid and s.file is None for s in sources):
                continue  # the same search spelled twice (gmm8d@shift1, gmm8d@shift1.0)
            sources.append(Source(spec, problem, grid))
            continue
        shipped = shipped_dir() / f"{spec}.json"
        try:
            file = SolverFile.load(shipped if "/" not in spec and shipped.is_file() else spec)
        except FewstepError as err:  # missing, unreadable or not a solver file: one line that names the flag
            kind = InvalidInput if isinstance(err, InvalidInput) else InputFileError
            raise kind(f"--sources {spec}: {err} (a source is PROBLEM@GRID or a solver file)") from None
        if file.prediction != "flow":
            raise InvalidInput(f"--sources {spec}: an ε-prediction solver file; the bench problems are flow models")
        sources.append(Source(spec, *_file_origin(file), file))
    return sources


def _search_key(problems: list[Problem], grid: Grid, nfe: int, iterations: int, seed: int) -> str:
    """Everything the bench's search depends on: each problem's training noises and model (its velocity on a few of
    them), the NFE, the settings, the starting grid and the search code itself (an edit of search.py searches
    again)."""
    import fewstep.search

    parts = []
    for problem in problems:
        parts += [problem.name, problem.train_noise, problem.search_model(problem.train_noise[:8], 0.5)]
    code = Path(fewstep.search.__file__).read_bytes()
    digest = _digest(*parts, nfe, iterations, SEARCH_BATCH, seed, grid.shift, grid.mu, code)
    return f"search-{'+'.join(p.name for p in problems)}-{grid.name}-nfe{nfe}-{digest}.json"


def searched_file(problems: list[Problem], grid: Grid, nfe: int, iterations: int, seed: int, cache: Path | None,
                  teacher: Callable[[], list[tuple]]) -> SolverFile:
    """The bench's searched NeuralSolver for `problems` (one: the call of `measure.methods`, plus the starting grid;
    several: one family search with the same settings), read from `cache` when it was searched before. `teacher()`:
    each problem's shared teacher bank, solved on first use."""
    import fewstep.search

    path = Path(cache) / _search_key(problems, grid, nfe, iterations, seed) if cache is not None else None
    if path is not None and path.is_file():
        try:
            return SolverFile.load(path)
        except FewstepError:  # a damaged cache file is searched again and replaced
            pass
    if len(problems) == 1:
        problem = problems[0]
        found = fewstep.search.search(problem.search_model, nfe, noise=problem.train_noise, iterations=iterations,
                                      batch=SEARCH_BATCH, seed=seed, trajectories=teacher()[0],
                                      model_name=problem.name, shift=grid.shift, mu=grid.mu)
    else:  # `search`'s defaults (order cap, exact teacher, an eighth held out) for every member
        targets = [fewstep.search.plain_target(p.search_model, tuple(p.train_noise.shape[1:]), p.name)
                   for p in problems]
        banks = [fewstep.search.noise_bank(p.search_model, p.train_noise, trajectories=t)
                 for p, t in zip(problems, teacher(), strict=True)]
        found = fewstep.search.search_target(targets, nfe, bank=banks, teacher="exact", iterations=iterations,
                                             batch=SEARCH_BATCH, seed=seed, order_cap=True, shift=grid.shift,
                                             mu=grid.mu)
    if path is not None:
        found.save(path)
    return found


def _errors(task: Problem, file: SolverFile | None, nfe: int) -> np.ndarray | None:
    """Per-sample squared errors of `file`'s `nfe`-step solver on `task` (None: it has none, or n was too few to
    search)."""
    import fewstep

    if file is None:
        return None
    try:
        with warnings.catch_warnings():  # a file from another grid is what this suite measures, not a mistake
            warnings.simplefilter("ignore", GridMismatchWarning)
            x = fewstep.sample(task.velocity, task.noise, "neuralsolver", nfe, solver_file=file)
    except StepCountError:
        return None
    return stats.per_sample_sq(x.double(), task.reference)


def _cell(sq: np.ndarray, peer_sq: np.ndarray, resamples: int, seed: int) -> dict:
    lo, hi = stats.rmse_ci(sq, resamples, seed)
    rlo, rhi = stats.ratio_ci(sq, peer_sq, resamples, seed)
    return {"rmse": stats.rmse(sq), "rmse_lo": lo, "rmse_hi": hi, "ratio": stats.rmse(sq) / stats.rmse(peer_sq),
            "ratio_lo": rlo, "ratio_hi": rhi, "undecided": rlo <= 1 <= rhi}


def run_transfer(sources: list[Source], targets: list[str], grids: list[Grid], nfe: list[int], samples: int,
                 image_samples: int, seed: int = 0, iterations: int = 300, resamples: int = stats.RESAMPLES,
                 cache: Path | None = None, solver: str = "adams-denoise", progress: bool = True) -> list[dict]:
    """One row per source (and `solver`) × target problem × grid × NFE that it can make exactly: RMSE with its
    interval, the best peer of that cell and the ratio to it with its paired interval; `diagonal` marks the source's
    own problem and grid."""
    from fewstep.search import teacher_bank

    problems: dict[str, Problem] = {}

    def problem(name: str) -> Problem:
        if name not in problems:
            problems[name] = load_problem(name, image_samples if is_image(name) else samples, seed, cache, progress)
        return problems[name]

    @functools.cache
    def teacher(name: str) -> tuple:  # one teacher solve per problem, shared by its grids and NFE, only if needed
        return teacher_bank(problem(name).search_model, problem(name).train_noise)

    files: dict[tuple[str, int], SolverFile | None] = {}
    bank: dict[str, int | str] = {}  # training noises of each searched source, for its notes (a family's: 1024+128)
    for src in sources:
        if not src.searched_here:
            continue
        tasks = [problem(m) for m in src.members]
        sizes = [len(t.train_noise) for t in tasks]
        bank[src.label] = sizes[0] if len(sizes) == 1 else "+".join(map(str, sizes))

        def teachers(members: list[str] = src.members) -> list[tuple]:
            return [teacher(m) for m in members]

        for n in nfe:  # a search needs 2 steps at least, as in the bench's searched method
            files[src.label, n] = (searched_file(tasks, get_grid(src.grid), n, iterations, seed, cache, teachers)
                                   if n >= 2 else None)

    rows = []
    for name in targets:
        task = problem(name)
        own: dict[tuple[str, int], np.ndarray | None] = {}  # own σ grid: the same errors on every target grid
        for grid in grids:
            bench = run_bench(task, [solver], nfe, grid, seed=seed, resamples=resamples, progress=progress)
            by = {(r["solver"], r["nfe"]): r for r in bench.rows}
            for n in nfe:
                peers = [r for r in bench.rows if r["nfe"] == n and r["peer"]]
                if not peers:
                    continue
                best = min(peers, key=lambda r: r["rmse"])
                peer_sq = bench.sq[best["solver"], n]
                base = {"problem": name, "grid": grid.name, "nfe": n, "peer": best["solver"],
                        "peer_rmse": best["rmse"], "samples": len(peer_sq)}
                for src in sources:
                    if (src.label, n) not in own:
                        own[src.label, n] = _errors(task, files[src.label, n] if src.searched_here else src.file, n)
                    if own[src.label, n] is None:
                        continue
                    rows.append({"source": src.label, "kind": "searched here" if src.searched_here else "file",
                                 "source_problem": src.problem, "source_grid": src.grid,
                                 "train_noises": bank.get(src.label), **base,
                                 "diagonal": name in src.members and src.grid == grid.name,
                                 **_cell(own[src.label, n], peer_sq, resamples, seed)})
                if (solver, n) in by:
                    rows.append({"source": solver, "kind": "training-free", "source_problem": None,
                                 "source_grid": None, "train_noises": None, **base, "diagonal": False,
                                 **_cell(bench.sq[solver, n], peer_sq, resamples, seed)})
    return rows


def _ratio(row: dict | None) -> str:
    if row is None:
        return "–"
    text = f"{row['ratio']:.2f}"
    text = f"**{text}**" if row["ratio"] <= 1 else text
    return text + ("~" if row["undecided"] else "") + (f" {DIAGONAL}" if row["diagonal"] else "")


def matrix(rows: list[dict], nfe: int, sources: list[Source]) -> str:
    """Rows: every source (a file without a solver for `nfe` shows –), columns: target problem × grid, cells: the
    ratio."""
    mine = [r for r in rows if r["nfe"] == nfe and r["kind"] != "training-free"]
    columns = list(dict.fromkeys((r["problem"], r["grid"]) for r in rows))
    by = {(r["source"], r["problem"], r["grid"]): r for r in mine}
    lines = ["| source (searched on) | " + " | ".join(f"{p} {g}" for p, g in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for src in sources:
        what = "searched here" if src.searched_here else f"file: {src.problem or '?'} {src.grid or '?'}"
        lines.append(f"| {src.label} ({what}) | "
                     + " | ".join(_ratio(by.get((src.label, p, g))) for p, g in columns) + " |")
    return "\n".join(lines) + "\n"


def baseline_table(rows: list[dict]) -> str:
    """The training-free solver's ratio and the best peer per column and NFE."""
    base = [r for r in rows if r["kind"] == "training-free"]
    if not base:
        return ""
    solver = base[0]["source"]
    columns = list(dict.fromkeys((r["problem"], r["grid"]) for r in rows))
    by = {(r["problem"], r["grid"], r["nfe"]): r for r in base}
    nfes = sorted({r["nfe"] for r in rows})
    lines = ["| | " + " | ".join(f"{p} {g}" for p, g in columns) + " |", "|---|" + "---:|" * len(columns)]
    for n in nfes:
        lines.append(f"| {solver}, NFE {n} | " + " | ".join(_ratio(by.get((p, g, n))) for p, g in columns) + " |")
    for n in nfes:
        cells = [by.get((p, g, n)) for p, g in columns]
        lines.append(f"| best peer, NFE {n} | "
                     + " | ".join(f"{c['peer']} {c['peer_rmse']:.2e}" if c else "–" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _source_notes(sources: list[Source], rows: list[dict], iterations: int, seed: int) -> list[str]:
    notes = []
    bank = {r["source"]: r["train_noises"] for r in rows}
    for src in sources:
        if src.searched_here and len(src.members) > 1:
            notes.append(f"{src.label}: one `fewstep.search` family solver per NFE for {' and '.join(src.members)} "
                         f"(training noises {bank.get(src.label, '?')}, an eighth of each held out, seed {seed} + 1): "
                         f"every iteration a minibatch of {SEARCH_BATCH} from each member's own bank; loss and "
                         "validation error the mean over the members of each member's error ÷ its start solver's "
                         f"(Adams-2 weights on the {src.grid} grid); otherwise the settings of the single-problem "
                         "sources")
        elif src.searched_here:
            notes.append(f"{src.label}: `fewstep.search` per NFE on a bank of {bank.get(src.label, '?')} training "
                         f"noises of {src.problem} (an eighth held out for validation; seed {seed} + 1, not the bench "
                         f"noises), {iterations} iterations, batch "
                         f"{SEARCH_BATCH}, search seed {seed}, started from the {src.grid} grid, one exact DOP853 "
                         "teacher (rtol 1e-9): the bench's neuralsolver-searched settings")
        else:
            p = src.file.provenance
            settings = ", ".join(f"{k} {p[k]}" for k in ("samples", "iterations", "batch", "restarts", "seed")
                                 if k in p)
            notes.append(f"{src.label}: solver file {Path(src.file.source).name}, NFE "
                         f"{', '.join(map(str, sorted(src.file.steps)))}; searched on "
                         f"{src.problem or 'an unknown model'} {src.grid or ''}".rstrip()
                         + (f" ({settings})" if settings else ""))
    return notes


def transfer_markdown(rows: list[dict], sources: list[Source], header: str, grids: dict[str, str], iterations: int,
                      seed: int, definitions: tuple[str, ...], findings: str = "") -> str:
    """The matrix per NFE, the training-free solver's table, the sources and the definitions; `findings` (text kept
    from an earlier transfer.md) after the marker line."""
    solver = next((r["source"] for r in rows if r["kind"] == "training-free"), None)
    legend = ("Each cell: RMSE of the source's solver on the target problem ÷ RMSE of the best diffusers peer on the "
              "target grid in that cell (FlowMatchEuler, FlowMatchHeun, UniPC-2, UniPC-3, DPM++2M, DEIS; same noises); "
              f"**bold** ≤ 1 (the source wins), ~ undecided: the paired bootstrap 95 % interval of the ratio contains "
              f"1, {DIAGONAL} the diagonal: a problem and grid the source was searched on (a family: each of its "
              "problems), – no solver for that NFE. A searched "
              "solver steps on its own searched σ grid whatever the target grid; only the peers' grid changes.")
    parts = ["# Transfer: searched solvers on problems and grids they were not searched on\n", header, "", legend, ""]
    for n in sorted({r["nfe"] for r in rows}):
        parts += [f"## NFE {n}\n", matrix(rows, n, sources)]
    if solver:
        parts += [f"## For comparison: {solver} (training-free, on the target grid) and the best peer\n",
                  f"The same ratio for {solver}; below it the best peer of each cell and its RMSE, the denominator of "
                  "every ratio in that column.\n", baseline_table(rows)]
    parts += ["## Sources\n", *(f"- {n}" for n in _source_notes(sources, rows, iterations, seed)),
              "- grids: " + "; ".join(f"{g} = {t}" for g, t in grids.items()) + " (diffusers' "
              "FlowMatchEulerDiscreteScheduler after a pipeline's `set_timesteps`, as on every bench page)", "",
              "## Definitions\n", *(f"- {d}" for d in definitions),
              "", "Every cell with its intervals: transfer.csv / transfer.json.", "", FINDINGS]
    return "\n".join(parts) + "\n" + (f"\n{findings.strip()}\n" if findings.strip() else "")


def kept_findings(path: Path) -> str:
    """What follows the findings marker in an earlier `path` (empty if there is none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    return text.split(FINDINGS, 1)[1] if FINDINGS in text else ""

