"""The σ grids the bench compares on: the grid a pipeline passes to its scheduler, built by diffusers itself.

Every pipeline of the Flux family calls `scheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=μ)` on a
FlowMatchEulerDiscreteScheduler; SD3-style models carry a static `shift`. A bench grid is that call's `sigmas`
(N + 1 values, the last 0), made by diffusers' own FlowMatchEulerDiscreteScheduler, and every method — fewstep's and
the diffusers peers — runs on exactly that grid. Flux's μ for a 1024² image comes from diffusers' own
`calculate_shift` with the Flux-dev scheduler config and image_seq_len = (1024/16)² = 4096 packed tokens.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from fewstep.errors import InvalidInput
from fewstep.schedules import shift_problem

# The scheduler config of black-forest-labs/FLUX.1-dev (scheduler/scheduler_config.json).
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLUX_IMAGE_SEQ_LEN = (1024 // 16) ** 2  # FluxPipeline: (height / (vae_scale_factor · 2)) · (width / ...) tokens
HEADLINE_GRIDS = ("shift1", "shift3", "flux1024")


@functools.cache
def flux_mu(image_seq_len: int = FLUX_IMAGE_SEQ_LEN) -> float:
    """μ as FluxPipeline computes it: diffusers' `calculate_shift` with the Flux-dev config's base/max shift and
    sequence lengths (1.15 for a 1024² image)."""
    import contextlib
    import io
    import warnings

    # the pipeline module imports transformers, which prints notes about optional image backends while importing
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return float(calculate_shift(image_seq_len, FLUX_DEV["base_image_seq_len"], FLUX_DEV["max_image_seq_len"],
                                 FLUX_DEV["base_shift"], FLUX_DEV["max_shift"]))


@dataclass(frozen=True)
class Grid:
    name: str  # file-name friendly: shift1, shift3, flux1024
    title: str  # for tables: "shift 3", "Flux μ 1024² (μ = 1.15)"
    shift: float = 1.0
    mu: float | None = None

    def scheduler(self):
        """The FlowMatchEulerDiscreteScheduler a pipeline would hold for this grid."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.mu is None:
            return FlowMatchEulerDiscreteScheduler(shift=self.shift)
        return FlowMatchEulerDiscreteScheduler(**FLUX_DEV)

    def sigmas(self, steps: int) -> np.ndarray:
        """The `steps + 1` σ values (float64 copies of diffusers' float32 grid, ending in 0) after the pipeline's
        `set_timesteps(sigmas=linspace(1, 1/steps, steps), mu=μ)`. At shift < 1 that grid starts just above 1
        (1.0000001 at shift 0.2, its float32 training grid shifted twice): the top of the grid, σ = 1, here."""
        sched = self.scheduler()
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=self.mu)
        sigmas = np.minimum(sched.sigmas.double().numpy(), 1.0)
        if np.any(np.diff(sigmas) >= 0):  # an extreme shift rounds every float32 σ to 1 (or the tail to one value)
            raise InvalidInput(f"--grid {self.name}: diffusers' float32 σ grid for {steps} steps repeats values at "
                               f"this shift: {[float(f'{x:.7g}') for x in sigmas]}")
        return sigmas


def get_grid(name: str) -> Grid:
    """`shift1`, `shift3`, any `shift<X>` (X > 0), or `flux1024` (Flux's dynamic μ for a 1024² image)."""
    if name == "flux1024":
        mu = flux_mu()
        return Grid(name, f"Flux μ 1024² (μ = {mu:.3g}, shift e^μ = {np.exp(mu):.3g})", mu=mu)
    match = re.fullmatch(r"shift((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)", name)  # shift3, shift.5, shift1e+06
    if not match or not float(match[1]) > 0:
        raise InvalidInput(f"--grid: unknown grid {name!r}; use shift<X> with X > 0 (e.g. shift1, shift3) or flux1024")
    shift = float(match[1])
    if problem := shift_problem(shift):
        raise InvalidInput(f"--grid {name}: {problem}")
    return Grid(shift_name(shift), f"shift {shift:.15g}", shift=shift)


def shift_name(shift: float) -> str:
    """The grid name of a static shift, exact enough that two names are two shifts (shift1, shift3, shift1.0000001,
    shift1e+15): `:g`'s six digits made shift 1.0000001 run as shift 1."""
    return f"shift{float(shift):.15g}"


def parse_grids(text: str) -> list[Grid]:
    """'shift1,flux1024' → grids; 'all' → shift 1, shift 3 and Flux μ 1024²."""
    names = HEADLINE_GRIDS if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InvalidInput(f"--grid needs at least one grid name, got {text!r}")
    grids = {}  # by the grid's own name: shift1 and shift1.0 are one grid
    for n in names:
        grid = get_grid(n)
        grids.setdefault(grid.name, grid)
    return list(grids.values())
