"""`fewstep solvers`: one line per registered solver."""

from __future__ import annotations

import argparse

from fewstep.solvers.registry import info, names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--options", action="store_true", help="also list each solver's options")


def run(args: argparse.Namespace) -> int:
    rows = [("solver", "order", "calls/step", "steps", "what it is")]
    rows += [(n, info(n).order, str(info(n).calls_per_step), info(n).recommended_steps, info(n).summary)
             for n in names()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    if args.options:
        print()
        for n in names():
            print(f"{n}: {', '.join(info(n).options()) or '(no options)'}")
    return 0
