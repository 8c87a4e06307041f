"""Name → solver factory, with what `fewstep solvers` prints about each."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from fewstep.errors import InvalidInput, close_match
from fewstep.solvers.plan import Solver


@dataclass(frozen=True)
class SolverInfo:
    name: str
    factory: Callable[..., Solver]
    order: str  # nominal order, e.g. "2" or "3 (4 with derivative_order=3)"
    calls_per_step: int
    recommended_steps: str  # model calls where the method is at its best, e.g. "6-20"
    summary: str

    def options(self) -> list[str]:
        return [p for p in inspect.signature(self.factory).parameters if not p.startswith("_")]


_REGISTRY: dict[str, SolverInfo] = {}


def register(info: SolverInfo) -> None:
    if info.name in _REGISTRY:
        raise ValueError(f"solver {info.name!r} is already registered")
    _REGISTRY[info.name] = info


RECOMMENDED = "adams-denoise"  # the training-free default at 4–12 model calls (docs/solvers.md)


def recommended() -> str:
    """The registered solver recommended for few-step sampling without a searched table (docs/solvers.md)."""
    return RECOMMENDED if RECOMMENDED in _REGISTRY else next(iter(_REGISTRY))


def names() -> list[str]:
    """The registered solver names, in registration order."""
    return list(_REGISTRY)


def info(name: str) -> SolverInfo:
    if name not in _REGISTRY:
        close = close_match(name, _REGISTRY)
        hint = f"did you mean {close!r}? " if close else ""
        raise InvalidInput(f"unknown solver {name!r}; {hint}available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def get(name: str, **options) -> Solver:
    """An instance of solver `name` with `options` (e.g. get("stork-4", stages=50))."""
    entry = info(name)
    accepted = entry.options()
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise InvalidInput(f"solver {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(accepted) or 'none'}")
    return entry.factory(**options)
