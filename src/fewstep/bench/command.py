"""The `fewstep bench` command: its options, their checks (all before any computation) and the suites.

Imports nothing heavy at module level (`fewstep bench --help` loads no torch).

Suites: `table` (the default: the chosen problems × grids, every method, per-problem tables and plots), `headline`
(all headline problems × grids, plus the headline table and the targets; `--readme` rewrites the README's generated
block), `convergence` (measured orders on shifted grids), `overhead` (per-step cost against FlowMatchEuler),
`transfer` (solvers searched on one problem and grid, scored on the others against the best peer).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from fewstep.errors import InputFileError, InvalidInput
from fewstep.schedules import shift_problem

SEARCHED = "neuralsolver-searched"
GENERATE = "generate"  # the recommended solver with the options `fewstep generate` picks for the problem's guidance
DEFAULT_NFE = "4,5,6,7,8,9,10,12,16"
SEARCH_ITERATIONS = 300  # gmm8d, 8 NFE: RMSE 1.5e-2 in 3 s (1500 iterations: 9e-3 in 14 s)
MAX_SEED = 2**32 - 1 - 2000  # torch's CPU generator keeps 32 bits; the bench draws seeds up to seed + 2000
SUITES = ("table", "headline", "convergence", "overhead", "transfer")
TRANSFER_SOURCES = "gmm8d@shift1,gmm8d@shift3,gmm-stiff@shift1,gmm8d+digits@shift1,digits-shift1,digits-shift3"
TRANSFER_GRIDS = "shift1,shift3"
TRANSFER_NFE = "6,8"
SAMPLES = 512  # mixtures
IMAGE_SAMPLES = 256  # embedded image models: their reference solve costs ~0.2-0.4 s per noise
# The energy distance and the BCa jackknife each hold noises² float64 numbers: 10,000 noises peak at 3.5 GB and take
# ~10 s per interval (so a refined headline cell counts all its noises); an image model's reference solve of as many
# takes about an hour.
MAX_SAMPLES = 10_000
MAX_NFE = 1000  # as `fewstep generate --steps`: more is never few-step sampling and usually a typo
MAX_RESAMPLES = 10_000  # each interval holds resamples × noises numbers: 800 MB at 10,000 noises


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="table", choices=SUITES,
                        help="table: problems × grids × methods (default); headline: every headline problem and "
                             "grid, with the headline table and the targets of issue #13; convergence: measured "
                             "orders on shifted grids; overhead: per-step cost of the diffusers adapter; transfer: "
                             "solvers searched on one problem and grid scored on the others (see --sources)")
    parser.add_argument("--problem", default=None,
                        help="comma-separated problems: gmm2d, gmm8d, gmm-stiff, digits, digits-cfg3, fashion, "
                             "fashion-cfg3, and with strong guidance digits-cfg5, digits-cfg7, fashion-cfg5; or "
                             "'all' (the headline six); default: gmm8d (table), all (headline, transfer: the "
                             "targets)")
    parser.add_argument("--grid", default=None,
                        help="comma-separated σ grids: shift<X> (e.g. shift1, shift3) or flux1024 (Flux's dynamic μ "
                             "for a 1024² image), or 'all'; default: shift1 (table), all (headline), "
                             f"{TRANSFER_GRIDS} (transfer)")
    parser.add_argument("--shift", type=float, default=None, help="shorthand for --grid shift<X>")
    parser.add_argument("--nfe", default=None,
                        help=f"model-call budgets, at most {MAX_NFE} (default {DEFAULT_NFE}; transfer: {TRANSFER_NFE})")
    parser.add_argument("--solvers", default=None,
                        help=f"comma-separated fewstep methods (default: all registered, stork-*-official; {SEARCHED} "
                             f"and {GENERATE}, the recommended solver as `fewstep generate` runs it at the problem's "
                             "guidance, only when named)")
    parser.add_argument("--headline-solver", default=None,
                        help="the training-free solver of the headline table and of the transfer suite's "
                             "comparison (default: the registry's recommended solver, else stork-2)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"noises per mixture problem (default {SAMPLES}, at most {MAX_SAMPLES})")
    parser.add_argument("--image-samples", type=int, default=None,
                        help=f"noises per embedded-model problem (default {IMAGE_SAMPLES}, at most {MAX_SAMPLES})")
    parser.add_argument("--refine", type=int, default=None,
                        help="headline cells whose paired 95 %% interval of the ratio to the best peer contains 1 "
                             "are rerun on this many times the problem's noises more (default: 1 for the headline "
                             "suite, 0 otherwise)")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help=f"bootstrap resamples per confidence interval (default 2000, at most {MAX_RESAMPLES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-iterations", type=int, default=SEARCH_ITERATIONS,
                        help=f"optimizer steps of each {SEARCHED} search")
    parser.add_argument("--sources", default=None,
                        help="transfer suite: comma-separated solvers to transfer, each PROBLEM@GRID (searched here "
                             f"with the {SEARCHED} settings, starting from that grid), A+B@GRID (one solver "
                             "searched on the family of problems A and B) or a solver file (a path, or a "
                             f"file shipped in data/neuralsolver by name); default {TRANSFER_SOURCES}")
    parser.add_argument("--no-peers", action="store_true", help="skip diffusers' schedulers")
    parser.add_argument("--cache", default=None,
                        help="folder for cached reference solves (default ~/.cache/fewstep/bench)")
    parser.add_argument("--no-cache", action="store_true", help="solve the references again, store nothing")
    parser.add_argument("--out", default=None, help="directory for Markdown, CSV, JSON and PNG outputs")
    parser.add_argument("--readme", default=None,
                        help="headline suite: rewrite the block between <!-- headline:begin --> and "
                             "<!-- headline:end --> of this file with the headline table")
    parser.add_argument("--overhead", action="store_true", help="same as --suite overhead")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars (tables and notes still print)")


def machine() -> str:
    """The machine in words: CPU model, cores, torch threads, OS, library versions."""
    import diffusers
    import scipy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, scipy {scipy.__version__}")


def _positive(value: int | None, flag: str, default: int, minimum: int, maximum: int | None = None) -> int:
    if value is None:
        return default
    if value < minimum:
        raise InvalidInput(f"{flag} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInput(f"{flag} must be at most {maximum}, got {value}")
    return value


def _out_dir(out: str | None) -> Path | None:
    """The output folder: not a file (each suite checks its own outputs in it, see `_check_outputs`). It is created
    when the results are written into it, so bad input or Ctrl-C leaves no empty folder behind."""
    if out is None:
        return None
    if not out.strip():  # Path("") is the current folder: an empty --out is a mistake, not a choice
        raise InvalidInput("--out is empty; name a folder (--out . for the current one)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputFileError(f"--out {out} exists and is not a directory")
    return path


def _check_outputs(out: Path | None, names: list[str]) -> None:
    """Every output of the run checked before anything is computed, so that a bad one fails at once."""
    from fewstep.files import check_output

    for name in names if out else ():
        check_output(out / name, "--out")


def _under(out: Path, files: dict[str, bytes]) -> dict[Path, bytes]:
    return {out / name: data for name, data in files.items()}


def _write(out: Path, files: dict[str, bytes]) -> None:
    from fewstep.bench.measure import write_files

    write_files(_under(out, files))


def _problems(text: str | None, suite: str) -> list[str]:
    from fewstep.bench.problems import HEADLINE_PROBLEMS, PROBLEMS

    if text is None:
        text = "all" if suite in ("headline", "transfer") else "gmm8d"
    names = list(HEADLINE_PROBLEMS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown or not names:
        raise InvalidInput(f"--problem: unknown problem {', '.join(map(repr, unknown)) or repr(text)}; available: "
                           f"{', '.join(PROBLEMS)}, all")
    return list(dict.fromkeys(names))


def _overhead(args: argparse.Namespace, out: Path | None) -> int:
    from fewstep.bench.measure import tables
    from fewstep.bench.overhead import measure_overhead, overhead_markdown

    _check_outputs(out, ["overhead.csv", "overhead.json", "overhead.md"])
    rows = measure_overhead(solvers=args.solvers.split(",") if args.solvers else None)  # --solvers picks the rows
    text = overhead_markdown(rows) + f"\nMachine: {machine()}.\n"
    print(text)
    if out:
        _write(out, {**tables(rows, "overhead"), "overhead.md": text.encode()})
    return 0


def _convergence(out: Path | None, start: float) -> int:
    from fewstep.bench.convergence import convergence_markdown, run_convergence, stability_markdown, stability_rows
    from fewstep.bench.measure import tables

    _check_outputs(out, ["convergence.csv", "convergence.json", "stability.csv", "stability.json", "convergence.md"])
    rows = run_convergence()
    limits = stability_rows()
    text = (f"# Convergence on shifted grids\n\n{convergence_markdown(rows)}\n## Linear stability\n\n"
            f"{stability_markdown(limits)}\n`fewstep bench --suite convergence` on {machine()}; wall time "
            f"{time.perf_counter() - start:.0f} s.\n")
    print(text)
    if out:
        _write(out, {**tables(rows, "convergence"), **tables(limits, "stability"), "convergence.md": text.encode()})
    return 0


def run(args: argparse.Namespace) -> int:
    from fewstep.bench.measure import single_thread

    start = time.perf_counter()
    single_thread()
    suite = "overhead" if args.overhead else args.suite
    out = _out_dir(args.out)
    if args.readme is not None and suite != "headline":
        raise InvalidInput("--readme rewrites the headline block: use it with --suite headline")
    if args.sources is not None and suite != "transfer":
        raise InvalidInput("--sources names the solvers to transfer: use it with --suite transfer")
    if suite in FIXED_SUITES:  # their problems, grids and budgets are fixed: a flag for them would be ignored
        extra = [flag for flag in _given(args) if flag not in FIXED_SUITES[suite]]
        if extra:
            raise InvalidInput(f"{extra[0]} does not apply to the {suite} suite (it runs fixed problems and budgets; "
                               f"it takes {', '.join(('--out', *FIXED_SUITES[suite]))})")
    if suite == "overhead":
        return _overhead(args, out)
    if suite == "convergence":
        return _convergence(out, start)
    if suite == "transfer":
        return _transfer(args, out, start)
    return _tables(args, suite, out, start)


# The flags the suites with fixed problems and budgets take besides --out.
FIXED_SUITES = {"convergence": (), "overhead": ("--solvers",)}


def _given(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line (each default says it was not)."""
    flags = [f"--{name.replace('_', '-')}" for name in ("problem", "grid", "shift", "nfe", "solvers", "headline_solver",
                                                        "samples", "image_samples", "refine", "bootstrap", "cache")
             if getattr(args, name) is not None]
    return flags + [flag for flag, given in (("--no-peers", args.no_peers), ("--no-cache", args.no_cache),
                                             ("--seed", args.seed != 0),
                                             ("--search-iterations", args.search_iterations != SEARCH_ITERATIONS))
                    if given]


def _cache(args: argparse.Namespace) -> Path | None:
    """The cache folder (None with --no-cache), checked writable before anything is computed."""
    from fewstep.bench.problems import default_cache
    from fewstep.files import check_output

    if args.no_cache:
        return None
    if args.cache is not None and not args.cache.strip():  # Path("") is the current folder
        raise InvalidInput("--cache is empty; name a folder, or give --no-cache")
    cache = Path(args.cache) if args.cache is not None else default_cache()
    check_output(cache / "probe", "--cache")
    return cache


def _grids(args: argparse.Namespace, default: str) -> list:
    """--grid (or the --shift shorthand), `default` when neither is given."""
    from fewstep.bench.grids import get_grid, parse_grids, shift_name

    if args.shift is not None and args.grid is not None:
        raise InvalidInput("--shift is shorthand for --grid shift<X>: give one of them")
    if args.shift is not None:
        problem = shift_problem(args.shift)
        if problem:
            raise InvalidInput(f"--shift: {problem}")
        return [get_grid(shift_name(args.shift))]
    return parse_grids(args.grid if args.grid is not None else default)


def _seed_and_iterations(args: argparse.Namespace) -> None:
    if not 0 <= args.seed <= MAX_SEED:  # the extra noises of --refine use seed + 1000, their data seed + 1002
        raise InvalidInput(f"--seed must be an integer from 0 to {MAX_SEED}, got {args.seed}")
    from fewstep.search import MAX_ITERATIONS

    if not 1 <= args.search_iterations <= MAX_ITERATIONS:  # the bound of `fewstep search --iterations`
        raise InvalidInput(f"--search-iterations must be from 1 to {MAX_ITERATIONS}, got {args.search_iterations}")


def _headline_solver(args: argparse.Namespace) -> str:
    """--headline-solver (default: the recommended training-free solver), checked."""
    from fewstep.bench import headline as hl
    from fewstep.bench.measure import check_solvers, fewstep_methods

    solver = hl.default_solver() if args.headline_solver is None else args.headline_solver
    try:
        check_solvers([solver])
    except InvalidInput:
        raise InvalidInput(f"--headline-solver: unknown solver {solver!r}; available: {', '.join(fewstep_methods())}"
                           " (or name:key=value)") from None
    return solver


def _transfer(args: argparse.Namespace, out: Path | None, start: float) -> int:
    from fewstep.bench import stats
    from fewstep.bench import transfer as tr
    from fewstep.bench.measure import parse_nfe, tables
    from fewstep.search import MAX_SEARCH_STEPS

    for flag in _given(args):
        if flag in ("--solvers", "--refine", "--no-peers"):  # the matrix: the sources and one solver vs the best peer
            raise InvalidInput(f"{flag} does not apply to the transfer suite (it scores --sources and "
                               "--headline-solver against the best diffusers peer)")
    problems = _problems(args.problem, "transfer")
    cache = _cache(args)
    grids = _grids(args, TRANSFER_GRIDS)
    nfe = parse_nfe(args.nfe if args.nfe is not None else TRANSFER_NFE)
    if min(nfe) < 2 or max(nfe) > MAX_SEARCH_STEPS:  # every source is a searched solver: 2 to 50 steps
        raise InvalidInput(f"--nfe: the transfer suite scores searched solvers, which take 2 to {MAX_SEARCH_STEPS} "
                           f"steps; got {','.join(map(str, nfe))}")
    samples = _positive(args.samples, "--samples", SAMPLES, 2, MAX_SAMPLES)
    image_samples = _positive(args.image_samples, "--image-samples", IMAGE_SAMPLES, 2, MAX_SAMPLES)
    resamples = _positive(args.bootstrap, "--bootstrap", stats.RESAMPLES, 100, MAX_RESAMPLES)
    _seed_and_iterations(args)
    solver = _headline_solver(args)
    sources = tr.parse_sources(args.sources if args.sources is not None else TRANSFER_SOURCES)
    _check_outputs(out, ["transfer.csv", "transfer.json", "transfer.md"])

    rows = tr.run_transfer(sources, problems, grids, nfe, samples, image_samples, args.seed, args.search_iterations,
                           resamples, cache, solver, not args.quiet)
    command = (f"fewstep bench --suite transfer --problem {','.join(problems)} "
               f"--grid {','.join(g.name for g in grids)} --nfe {','.join(map(str, nfe))} --samples {samples} "
               f"--image-samples {image_samples} --seed {args.seed} --search-iterations {args.search_iterations} "
               + (f"--bootstrap {resamples} " if resamples != stats.RESAMPLES else "")
               + f"--sources {','.join(s.label for s in sources)} "
               f"--headline-solver {solver}" + (f" --out {args.out}" if out else ""))
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Generated by `{command}` on {when}; machine: {machine()}; wall time "
              f"{time.perf_counter() - start:.0f} s (reference solves and searched solvers cached on disk make reruns "
              "faster).")
    definitions = (stats.RMSE_DEFINITION, "ratio [lo, hi]: RMSE ÷ the best peer's RMSE on the same noises, with its "
                   "paired bootstrap 95 % interval (scipy.stats.bootstrap, paired, BCa)",
                   f"noises: {samples} per mixture, {image_samples} per image model (at most 32 for fashion), "
                   f"seed {args.seed}; every reference is a DOP853 solve from the same noises (see the problem's own "
                   "bench page)")
    findings = tr.kept_findings(out / "transfer.md") if out else ""
    text = tr.transfer_markdown(rows, sources, header, {g.name: g.title for g in grids}, args.search_iterations,
                                args.seed, definitions, findings)
    print(text)
    if out:
        _write(out, {**tables(rows, "transfer"), "transfer.md": text.encode()})
    print(f"\nwall time {time.perf_counter() - start:.0f} s on {machine()}"
          + (f"; wrote transfer.md, transfer.csv, transfer.json to {out}" if out else ""))
    return 0


def _tables(args: argparse.Namespace, suite: str, out: Path | None, start: float) -> int:
    from fewstep.bench import headline as hl
    from fewstep.bench import measure, stats
    from fewstep.bench.problems import is_image

    problems = _problems(args.problem, suite)
    readme = hl.check_readme(args.readme) if args.readme is not None else None
    cache = _cache(args)
    grids = _grids(args, "all" if suite == "headline" else "shift1")
    nfe = measure.parse_nfe(args.nfe if args.nfe is not None else DEFAULT_NFE)
    samples = _positive(args.samples, "--samples", SAMPLES, 2, MAX_SAMPLES)
    image_samples = _positive(args.image_samples, "--image-samples", IMAGE_SAMPLES, 2, MAX_SAMPLES)
    refine = _positive(args.refine, "--refine", 1 if suite == "headline" else 0, 0)
    largest = max(image_samples if is_image(name) else samples for name in problems)
    if (1 + refine) * largest > MAX_SAMPLES:  # a refined cell's intervals are over its first and its new noises
        raise InvalidInput(f"--refine {refine}: a refined cell of {largest} noises would hold {(1 + refine) * largest}"
                           f"; at most {MAX_SAMPLES} (lower --refine, --samples or --image-samples)")
    resamples = _positive(args.bootstrap, "--bootstrap", stats.RESAMPLES, 100, MAX_RESAMPLES)
    _seed_and_iterations(args)
    solvers = measure.check_solvers(args.solvers.split(",") if args.solvers is not None else None)
    solver = _headline_solver(args)
    want_headline = suite == "headline" or (not args.no_peers and solver in solvers and len(problems) * len(grids) > 1)
    if suite == "headline":
        if args.no_peers:
            raise InvalidInput("--no-peers: the headline compares against diffusers' schedulers")
        if solver not in solvers:
            solvers.append(solver)
    outputs = [file for name in problems for file in measure.problem_outputs(name, grids if is_image(name) else [])]
    _check_outputs(out, outputs + (["headline.md", "headline.csv", "headline.json"] if want_headline else []))

    benches: dict[str, list] = {}
    for name in problems:
        count = image_samples if is_image(name) else samples
        for grid in grids:
            benches.setdefault(name, [])
            problem = benches[name][0].problem if benches[name] else name
            benches[name].append(measure.run_bench(problem, solvers, nfe, grid, count, args.seed, not args.no_peers,
                                                   args.search_iterations, resamples, cache, not args.quiet))
    every_run = [b for runs in benches.values() for b in runs]
    skipped = measure.skipped_notes(every_run)
    if not any(b.rows for b in every_run):  # a page of empty tables would be written and exit 0
        reasons = "; ".join(line.removeprefix("note: ").removesuffix("; its cells are left out") for line in skipped)
        raise InvalidInput(f"--nfe {','.join(map(str, nfe))}: no method can make these model calls"
                           + (f" ({reasons})" if reasons else "") + "; nothing written")
    for line in skipped:
        print(line, file=sys.stderr)
    files: dict[Path, bytes] = {}  # --out's, written with the README at the end: all of them or none
    readme_text: dict[Path, bytes] = {}
    for name, runs in benches.items():
        count = len(runs[0].problem.noise)
        title = f"{name}, {count} noises, seed {args.seed}"
        if suite == "table":
            print(measure.problem_markdown(runs, title))
        if out:
            files |= _under(out, measure.problem_files(runs, name, title, solver if want_headline else None))
    command = (f"fewstep bench --suite {suite} --problem {','.join(problems)} --grid {','.join(g.name for g in grids)} "
               f"--nfe {','.join(map(str, nfe))} --samples {samples} --image-samples {image_samples} --refine {refine} "
               f"--seed {args.seed}" + (f" --bootstrap {resamples}" if resamples != stats.RESAMPLES else "")
               + (f" --solvers {args.solvers}" if args.solvers is not None else "")
               + (f" --headline-solver {solver}" if want_headline else "") + (f" --out {args.out}" if out else ""))
    if want_headline:
        cells = []
        for runs in benches.values():  # more noises where the intervals overlap: `refine` × the problem's count
            cells += hl.headline_cells(runs, solver, refine * len(runs[0].problem.noise), resamples, args.seed, cache,
                                       progress=not args.quiet)
        results = hl.targets(cells)
        wall = time.perf_counter() - start
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        header = (f"Generated by `{command}` on {when}; machine: {machine()}; wall time {wall:.0f} s "
                  "(reference solves cached on disk make reruns faster).")
        if out:
            header += (" Every method on every problem, with plots: "
                       + ", ".join(f"[{n}.md]({n}.md)" for n in benches) + ".")
        definitions = (stats.RMSE_DEFINITION, stats.MEDIAN_DEFINITION,
                       "noises: the count behind the solver's and the peer's statistics in that cell (and its ratio); "
                       "the targets that compare cells with each other or with FlowMatchEuler (never worse than "
                       "Euler, never rising, half the calls) use the first noises of every cell, the problem pages' "
                       "numbers",
                       "FD-ref (image models): Fréchet distance in the shipped classifier's features to the reference "
                       "samples from the same noises, on the first noises (not the refined set)")
        text = hl.headline_markdown(cells, results, solver, header, {g.name: g.title for g in grids}, definitions)
        print(text)
        if out:
            files |= _under(out, {"headline.md": text.encode(), **measure.tables(cells, "headline")})
        if readme is not None:
            link = os.path.relpath(out / "headline.md", readme.resolve().parent) if out else None
            short = f"`{command}`, {when}, {machine().split(',')[0]}, wall time {wall:.0f} s"
            readme_text[readme] = hl.rewritten_readme(readme, hl.readme_block(cells, results, solver, short, link,
                                                                              {g.name: g.title for g in grids}))
    measure.write_files(files | readme_text)
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.0f} s on {machine()}" + (f"; wrote {len(files)} files to {out}" if out else "")
          + (f"; rewrote {readme}" if readme_text else ""))
    return 0
