"""The `fewstep` command (also `python -m fewstep`). Each subcommand lives in its own module, which exposes
`add_arguments(parser)` and `run(args) -> int` and imports heavy packages (torch, diffusers) only inside `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": ("fewstep.generate", "generate images (default: the embedded digits model, offline)"),
    "bench": ("fewstep.bench", "error vs model calls: fewstep solvers and diffusers' schedulers side by side"),
    "search": ("fewstep.search", "search a NeuralSolver (time grid + coefficients) for a model"),
    "solvers": ("fewstep.solvers.listing", "list the solvers: order, model calls per step, recommended steps"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description="Few-step samplers for diffusion and flow models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"fewstep {args.command}: error: {err}", file=sys.stderr)
        return 2
