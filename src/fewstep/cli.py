"""The `fewstep` command (also `python -m fewstep`). Each subcommand lives in its own module, which exposes
`add_arguments(parser)` and `run(args) -> int` and imports heavy packages (torch, diffusers) only inside `run`.

Only the chosen subcommand's module is imported, so `fewstep --help` and `fewstep --version` load no torch.

Exit codes: 0 success; 2 a user error (bad option, input or file: one line on stderr, from argparse or from
fewstep's own error types in `fewstep.errors`); 130 Ctrl-C; 141 stdout closed early (`fewstep solvers | head -1`).
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

from fewstep import __version__
from fewstep.errors import FewstepError, close_match

COMMANDS = {
    "generate": ("fewstep.generate", "generate images (default: the embedded Fashion-MNIST model, offline)"),
    "bench": ("fewstep.bench", "error vs model calls: fewstep solvers and diffusers' schedulers side by side"),
    "search": ("fewstep.search", "search a NeuralSolver (time grid + coefficients) for a model"),
    "solvers": ("fewstep.solvers.listing", "list the solvers: order, model calls per step, recommended steps"),
}
ALL = "*"


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`fewstep generate: error: argument --steps: ...`), like fewstep's
    own errors, instead of the usage block first; the usage stays in --help. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The parser; the options of `command` only (ALL: every subcommand's, which imports every module)."""
    parser = OneLineParser(prog="fewstep", description="Few-step samplers for diffusion and flow models.",
                                     epilog="exit codes: 0 ok, 2 bad input (one line on stderr), 130 interrupted")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=", ".join(COMMANDS) + " (fewstep COMMAND --help)")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command in (ALL, name):
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _parse_and_run(argv: list[str]) -> int:
    command = _command_in(argv)
    if command is not None and command not in COMMANDS:
        close = close_match(command, COMMANDS)
        hint = f"; did you mean {close!r}?" if close else f"; commands: {', '.join(COMMANDS)}"
        print(f"fewstep: error: unknown command {command!r}{hint}", file=sys.stderr)
        return 2
    try:
        args = build_parser(command).parse_args(argv)
    except SystemExit as done:  # --help, --version, or argparse's own one-line usage error
        sys.stdout.flush()
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed stdout shows up here, not at interpreter exit
        return code
    except FewstepError as err:
        sys.stdout.flush()
        print(f"fewstep {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """SIGTERM (kill, timeout, a cancelled CI job, torchrun stopping its workers) unwinds like Ctrl-C while the block
    runs, so that a file being written is removed, not left as a hidden temporary (Python's default for SIGTERM is to
    die at once, with no cleanup); the previous handler is back afterwards."""
    def unwind(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, unwind)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run `fewstep ARGV`; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with _terminate_unwinds():
            return _parse_and_run(argv)
    except KeyboardInterrupt:
        print("\nfewstep: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing, and point stdout at /dev/null so that the interpreter's
        # final flush does not print "Exception ignored ... BrokenPipeError".
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured in-process)
            pass
        return 141
