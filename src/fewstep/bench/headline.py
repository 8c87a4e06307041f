"""The headline: one training-free fewstep solver against the best diffusers peer in every cell (problem × grid ×
NFE), with bootstrap intervals, more noises where the paired interval of the ratio holds 1, and the targets of issue
#13 checked.
`rewritten_readme` puts the generated table between `<!-- headline:begin -->` and `<!-- headline:end -->`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fewstep.bench import stats
from fewstep.errors import InputFileError

BEGIN, END = "<!-- headline:begin -->", "<!-- headline:end -->"
DEFAULT_SOLVER = "stork-2"
EULER = "FlowMatchEuler"
TARGET_NFE = range(4, 11)  # "every cell of NFE 4–10"
HALF_CALLS = ((6, 12), (8, 16))  # at 6 and 8 NFE as good as the best peer at 12 and 16
HALF_CALLS_PROBLEMS = ("gmm8d", "digits")
HALF_CALLS_GRIDS = ("shift1", "shift3")
STIFF = "gmm-stiff"


def default_solver() -> str:
    """The solver the registry marks as recommended (`fewstep.solvers.recommended()` where it exists), else
    stork-2."""
    from fewstep import solvers

    recommended = getattr(solvers, "recommended", None)
    if callable(recommended):
        name = recommended()
        if name:
            return name
    return DEFAULT_SOLVER


def _stat(row: dict) -> dict:
    return {k: row[k] for k in ("rmse", "rmse_lo", "rmse_hi", "median_error", "samples")}


def _overlap(a: dict, b: dict) -> bool:
    return a["rmse_lo"] <= b["rmse_hi"] and b["rmse_lo"] <= a["rmse_hi"]


def _combined(sq: np.ndarray, dim: int, resamples: int, seed: int) -> dict:
    lo, hi = stats.rmse_ci(sq, resamples, seed)
    return {"rmse": stats.rmse(sq), "rmse_lo": lo, "rmse_hi": hi, "median_error": stats.median_error(sq, dim),
            "samples": len(sq)}


def headline_cells(benches: list, solver: str, refine: int = 0, resamples: int = stats.RESAMPLES, seed: int = 0,
                   cache: Path | None = None, extra_seed: int = 1000, progress: bool = True) -> list[dict]:
    """One record per (problem, grid, NFE) where `solver` and at least one peer ran: the solver's and the best
    peer's RMSE with intervals, FlowMatchEuler's RMSE and the ratio with its paired bootstrap interval. Where that
    interval holds 1 and `refine` > 0, both methods are rerun on `refine` more noises (seed + `extra_seed`, own
    reference solve; `progress`: a bar while it is solved) and the record holds the statistics over all noises."""
    from fewstep.bench.measure import methods
    from fewstep.bench.problems import load_problem

    extra: dict = {}
    cells = []
    for bench in benches:
        by = {(r["solver"], r["nfe"]): r for r in bench.rows}
        for n in sorted({r["nfe"] for r in bench.rows}):
            peers = [r for r in bench.rows if r["nfe"] == n and r["peer"]]
            if (solver, n) not in by or not peers:
                continue
            best = min(peers, key=lambda r: r["rmse"])
            ours, theirs = _stat(by[solver, n]), _stat(best)
            sq_ours, sq_theirs = bench.sq[solver, n], bench.sq[best["solver"], n]
            lo, hi = stats.ratio_ci(sq_ours, sq_theirs, resamples, seed)
            refined = False
            if refine > 0 and lo <= 1 <= hi:
                name = bench.problem.name
                if name not in extra:
                    extra[name] = load_problem(name, refine, seed + extra_seed, cache, progress)
                more = extra[name]
                table = methods(more, bench.grid, seed, specs=(solver,))
                dim = more.noise[0].numel()
                sq_ours = np.concatenate([sq_ours, stats.per_sample_sq(table[solver](n), more.reference)])
                sq_theirs = np.concatenate([sq_theirs, stats.per_sample_sq(table[best["solver"]](n), more.reference)])
                ours, theirs = _combined(sq_ours, dim, resamples, seed), _combined(sq_theirs, dim, resamples, seed)
                lo, hi = stats.ratio_ci(sq_ours, sq_theirs, resamples, seed)
                refined = True
            euler = by.get((EULER, n))
            cells.append({"problem": bench.problem.name, "grid": bench.grid.name, "grid_title": bench.grid.title,
                          "nfe": n, "solver": solver, **{f"ours_{k}": v for k, v in ours.items()},
                          "peer": best["solver"], **{f"peer_{k}": v for k, v in theirs.items()},
                          "ratio": ours["rmse"] / theirs["rmse"], "ratio_lo": lo, "ratio_hi": hi,
                          "undecided": lo <= 1 <= hi, "overlap": _overlap(ours, theirs),
                          "refined": refined, "euler_rmse": euler["rmse"] if euler else float("nan"),
                          # on the bench's own noises, as Euler's and every other cell's: what the targets compare
                          # across cells (a refined cell's RMSE also holds its extra noises)
                          "ours_base_rmse": by[solver, n]["rmse"], "peer_base_rmse": best["rmse"],
                          "ours_fd_ref": by[solver, n].get("fd_ref", float("nan")),
                          "peer_fd_ref": best.get("fd_ref", float("nan"))})
    return cells


def _peer_at(cells: list[dict], problem: str, grid: str, nfe: int) -> dict | None:
    return next((c for c in cells if (c["problem"], c["grid"], c["nfe"]) == (problem, grid, nfe)), None)


def _base(c: dict, who: str) -> float:
    """The RMSE of `who` ("ours" or "peer") in cell `c` on the bench's own noises (refining adds noises to a cell
    but not to its neighbours or to Euler's, so comparisons across cells use these)."""
    return c.get(f"{who}_base_rmse", c[f"{who}_rmse"])


def _fmt(c: dict) -> str:
    return f"{c['problem']} {c['grid']} NFE {c['nfe']}"


def targets(cells: list[dict]) -> list[dict]:
    """Issue #13's targets on the headline cells: name, passed (None: no cell to judge), counts, failing cells."""
    out = []

    def add(name: str, judged: list[tuple[dict, bool, str]], need: int | None = None) -> None:
        fails = [f"{_fmt(c)}: {why}" for c, ok, why in judged if not ok]
        good = sum(ok for _, ok, _ in judged)
        if not judged:
            passed = None
        elif need is None:
            passed = not fails
        else:
            passed = good >= need
        out.append({"target": name, "passed": passed, "cells": len(judged), "good": good, "failing": fails})

    main = [c for c in cells if c["nfe"] in TARGET_NFE]
    def ci(c: dict) -> str:
        return f", paired 95 % CI [{c['ratio_lo']:.3f}, {c['ratio_hi']:.3f}]" if "ratio_lo" in c else ""

    add("RMSE ≤ the best diffusers peer in every cell of NFE 4–10",
        [(c, c["ratio"] <= 1, f"{c['ratio']:.2f}× {c['peer']} ({c['ours_rmse']:.3g} vs {c['peer_rmse']:.3g}{ci(c)})")
         for c in main])
    at8 = [c for c in cells if c["nfe"] == 8]
    add("≤ 0.5× the best peer at 8 NFE in at least half the cells",
        [(c, c["ratio"] <= 0.5, f"{c['ratio']:.2f}×") for c in at8], need=(len(at8) + 1) // 2)
    add("never worse than Euler (FlowMatchEuler on the same grid) in any cell",
        [(c, _base(c, "ours") <= c["euler_rmse"], f"{_base(c, 'ours') / c['euler_rmse']:.2f}× Euler")
         for c in cells if np.isfinite(c["euler_rmse"])])
    rises = []
    for c in cells:
        nxt = next((d for d in cells if (d["problem"], d["grid"], d["nfe"]) == (c["problem"], c["grid"], c["nfe"] + 1)),
                   None)
        if nxt is not None:
            rises.append((nxt, _base(nxt, "ours") <= _base(c, "ours"),
                          f"{_base(c, 'ours'):.3g} at {c['nfe']} → {_base(nxt, 'ours'):.3g} at {nxt['nfe']}"))
    add("error never rises when NFE grows by one (every measured pair n, n + 1)", rises)
    half = []
    for c in cells:
        for few, many in HALF_CALLS:
            if c["nfe"] == few and c["problem"] in HALF_CALLS_PROBLEMS and c["grid"] in HALF_CALLS_GRIDS:
                far = _peer_at(cells, c["problem"], c["grid"], many)
                if far is not None:
                    half.append((c, _base(c, "ours") <= _base(far, "peer"),
                                 f"{_base(c, 'ours'):.3g} vs {far['peer']} at {many} NFE {_base(far, 'peer'):.3g}"))
    add("half the calls: at 6 and 8 NFE ≤ the best peer at 12 and 16 NFE (gmm8d, digits; shift 1, shift 3)", half)
    add("gmm-stiff: ≤ 1.1× the best peer in every cell from 5 NFE on",
        [(c, c["ratio"] <= 1.1, f"{c['ratio']:.2f}× {c['peer']}{ci(c)}") for c in cells
         if c["problem"] == STIFF and c["nfe"] >= 5])
    return out


def ratio_table(cells: list[dict]) -> str:
    """Rows problem × grid, columns NFE, cells the RMSE ratio to the best peer."""
    nfes = sorted({c["nfe"] for c in cells})
    keys = list(dict.fromkeys((c["problem"], c["grid"]) for c in cells))
    by = {(c["problem"], c["grid"], c["nfe"]): c for c in cells}
    lines = ["| problem | grid | " + " | ".join(f"{n}" for n in nfes) + " |", "|---|---|" + "---:|" * len(nfes)]
    for p, g in keys:
        out = []
        for n in nfes:
            c = by.get((p, g, n))
            if c is None:
                out.append("–")
                continue
            text = f"{c['ratio']:.2f}"
            text = f"**{text}**" if c["ratio"] <= 1 else text
            out.append(text + ("~" if c["undecided"] else "") + ("†" if c["refined"] else ""))
        lines.append(f"| {p} | {g} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


LEGEND = ("Each cell: RMSE of the solver ÷ RMSE of the best diffusers peer in that cell (FlowMatchEuler, "
          "FlowMatchHeun, UniPC-2, UniPC-3, DPM++2M, DEIS, all on the same σ grid and noises); **bold** ≤ 1 (the "
          "solver wins), ~ undecided: the paired bootstrap 95 % interval of the ratio (same noises resampled together) "
          "contains 1, † rerun on as many noises again because it did. Columns: NFE (model calls).")


def targets_markdown(results: list[dict], detail: bool = True) -> str:
    lines = []
    for t in results:
        mark = {True: "[x]", False: "[ ]", None: "[–]"}[t["passed"]]
        lines.append(f"- {mark} {t['target']}: {t['good']} of {t['cells']} cells")
        if detail and t["failing"] and t["passed"] is not True:
            lines += [f"  - {f}" for f in t["failing"]]
    return "\n".join(lines) + "\n"


def cells_table(cells: list[dict]) -> str:
    lines = ["| problem | grid | NFE | solver RMSE [95 % CI] | median | FD-ref | best peer | peer RMSE [95 % CI] | "
             "median | FD-ref | ratio [paired 95 % CI] | FlowMatchEuler RMSE | noises |",
             "|---|---|---:|---|---:|---:|---|---|---:|---:|---|---:|---:|"]

    def fd(value: float) -> str:
        return "–" if not np.isfinite(value) else f"{value:.3g}"

    for c in cells:
        lines.append(
            f"| {c['problem']} | {c['grid']} | {c['nfe']} | {c['ours_rmse']:.3e} [{c['ours_rmse_lo']:.2e}, "
            f"{c['ours_rmse_hi']:.2e}] | {c['ours_median_error']:.2e} | {fd(c['ours_fd_ref'])} | {c['peer']} | "
            f"{c['peer_rmse']:.3e} [{c['peer_rmse_lo']:.2e}, {c['peer_rmse_hi']:.2e}] | {c['peer_median_error']:.2e} | "
            f"{fd(c['peer_fd_ref'])} | {c['ratio']:.3f} [{c['ratio_lo']:.3f}, {c['ratio_hi']:.3f}] | "
            f"{c['euler_rmse']:.3e} | {c['ours_samples']} |")
    return "\n".join(lines) + "\n"


def headline_markdown(cells: list[dict], results: list[dict], solver: str, header: str, grids: dict[str, str],
                      definitions: tuple[str, ...]) -> str:
    grid_lines = [f"- {name}: {title}" for name, title in grids.items()]
    return "\n".join([
        f"# Headline: {solver} against the best diffusers scheduler\n", header, "", LEGEND, "", ratio_table(cells),
        *grid_lines, "", "## Targets (issue #13)\n", targets_markdown(results), "## Every cell\n", cells_table(cells),
        *(f"- {d}" for d in definitions), ""])


def readme_block(cells: list[dict], results: list[dict], solver: str, header: str, link: str | None,
                 grids: dict[str, str] | None = None) -> str:
    grid_line = "Grids: " + "; ".join(f"{name} = {title}" for name, title in (grids or {}).items()) + "."
    return "\n".join([
        f"{solver} against the best diffusers scheduler, RMSE ratio per cell ({header}). {LEGEND}", "",
        ratio_table(cells), *([grid_line, ""] if grids else []), targets_markdown(results, detail=False),
        *([f"Every cell with its intervals, and the failing cells by name: [{link}]({link})."] if link else []), ""])


def check_readme(path: str | os.PathLike) -> Path:
    """The README to rewrite must be a writable regular file with one begin and one end marker, in that order."""
    from fewstep.files import check_output

    path = Path(path)
    check_output(path, "--readme")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputFileError(f"--readme {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise InputFileError(f"--readme {path}: needs exactly one {BEGIN} line followed by one {END} line")
    return path


def rewritten_readme(path: str | os.PathLike, block: str) -> bytes:
    """The README with what lies between the markers replaced by `block` (the markers and everything else stay),
    for the caller to write with the run's other outputs."""
    path = check_readme(path)
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}".encode()
