"""Time grids and the variance-preserving (VP) change of variables.

Convention (diffusers, Flux, SD3): x_σ = (1−σ)·x0 + σ·ε, the model returns v = ε − x0 = dx/dσ, and sampling
integrates σ from 1 (noise) down to 0 (data). Every grid here is a float64 NumPy array of strictly decreasing σ
whose last entry is where sampling ends (normally 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fewstep.errors import InvalidInput


def time_shift(sigmas: np.ndarray, *, shift: float = 1.0, mu: float | None = None,
               time_shift_type: str = "exponential") -> np.ndarray:
    """Static shift σ' = shift·σ/(1 + (shift−1)·σ), or, with `mu`, the resolution-dependent shift of Flux/SD3:
    exponential e^μ/(e^μ + (1/σ − 1)) or linear μ/(μ + (1/σ − 1))."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if mu is None:
        return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    with np.errstate(divide="ignore"):
        odds = 1.0 / sigmas - 1.0
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + odds)
    if time_shift_type == "linear":
        return mu / (mu + odds)
    raise InvalidInput(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")


SPACINGS = ("karras", "exponential", "beta")
# The time shift is e^μ (or `shift`): beyond e^±50 every σ of the grid rounds to 0 or 1 in float64, no grid at all.
MAX_MU = 50.0
MAX_SHIFT = math.exp(MAX_MU)


def shift_problem(shift: object = 1.0, mu: object = None) -> str | None:
    """What is wrong with a time shift `shift` or a dynamic shift `mu` (None: nothing), for an error message."""
    def real(x: object) -> bool:
        return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)

    if not (real(shift) and 1.0 / MAX_SHIFT <= shift <= MAX_SHIFT):
        return f"shift must be a number from e^-{MAX_MU:g} to e^{MAX_MU:g} (> 0), got {shift!r}"
    if mu is not None and not (real(mu) and abs(mu) <= MAX_MU):
        return f"mu must be a finite number from -{MAX_MU:g} to {MAX_MU:g}, got {mu!r}"
    return None


def check_shift_arguments(shift: object, mu: object) -> None:
    """InvalidInput for a bad `shift` or `mu` (`shift_problem`), or for both: μ sets the shift (e^μ), so a second
    one would be ignored. For the Python API's `shift=` / `mu=` arguments (`fewstep.sample`, `fewstep.search`)."""
    problem = shift_problem(shift, mu)
    if problem:
        raise InvalidInput(problem)
    if mu is not None and shift != 1.0:
        raise InvalidInput("give shift or mu, not both")


def respace(hi: float, lo: float, n: int, spacing: str) -> np.ndarray:
    """n values from `hi` down to `lo`, spaced as diffusers' `use_karras_sigmas` (Karras et al. 2022, eq. 5, ρ = 7:
    uniform in σ^(1/ρ)), `use_exponential_sigmas` (uniform in log σ) or `use_beta_sigmas` (Lee et al. 2024: quantiles
    of Beta(0.6, 0.6), dense at both ends)."""
    u = np.linspace(0.0, 1.0, n)
    if spacing == "karras":
        rho = 7.0
        return (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if spacing == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    if spacing == "beta":
        from scipy.stats import beta

        return lo + beta.ppf(1.0 - u, 0.6, 0.6) * (hi - lo)
    raise InvalidInput(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")


def flow_sigmas(intervals: int | None = None, shift: float = 1.0, mu: float | None = None, *,
                time_shift_type: str = "exponential", dynamic_shifting: bool | None = None,
                sigmas: Sequence[float] | None = None, shift_terminal: float | None = None,
                num_train_timesteps: int = 1000, spacing: str | None = None,
                train_shift: float | None = None) -> np.ndarray:
    """The σ grid of diffusers' `FlowMatchEulerDiscreteScheduler` after `set_timesteps(intervals, sigmas=, mu=)`,
    with the terminal 0 appended: `intervals + 1` values (a solver's model calls per interval: `intervals_for`).

    Reproduces its quirks on purpose (so a sampler compared with diffusers sees the same grid): the end points
    σ_max, σ_min come from the float32 1000-point training grid, already shifted once, and are shifted again
    (diffusers #13243); with dynamic shifting the training grid is not shifted. User `sigmas` are shifted too;
    a user grid that already ends in 0 gets no second 0 (official STORK's bug #11).
    `dynamic_shifting=None` means "dynamic iff `mu` is given". `spacing` ("karras", "exponential", "beta"; `respace`)
    re-spaces the shifted values last, as FlowMatchEuler's use_*_sigmas options do. `train_shift`: the shift of that
    training grid when it differs from `shift` (FlowMatchEuler builds it once, with its config's shift; `set_shift`
    changes only the second shift).
    """
    dynamic = (mu is not None) if dynamic_shifting is None else dynamic_shifting
    if dynamic and mu is None:
        raise InvalidInput("dynamic shifting needs `mu` (Flux/SD3 compute it from the image size); none was given")
    if sigmas is None:
        if isinstance(intervals, bool) or not isinstance(intervals, (int, np.integer)) or intervals < 1 \
                or not (isinstance(num_train_timesteps, (int, np.integer)) and num_train_timesteps >= 1):
            raise InvalidInput(f"intervals and num_train_timesteps must be positive integers, got {intervals!r} and "
                               f"{num_train_timesteps!r}")
        train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / np.float32(
            num_train_timesteps)
        if not dynamic:
            first = np.float32(shift if train_shift is None else train_shift)
            train = (first * train / (1 + (first - 1) * train)).astype(np.float32)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        base = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, int(intervals))
        base = base / num_train_timesteps
    else:
        try:
            base = np.asarray(sigmas, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput(f"sigmas must be a list of numbers, got {sigmas!r}") from None
        if base.ndim != 1 or len(base) == 0 or (base[-1] == 0 and len(base) == 1):
            raise InvalidInput(f"sigmas must be a flat list with at least one σ above 0, got {base.tolist()}")
        if not (np.isfinite(base).all() and base.min() >= 0 and base.max() <= 1):
            raise InvalidInput(f"sigmas are flow-matching noise levels in [0, 1], got {base.tolist()}")
        if intervals is not None and len(base) != intervals and not (base[-1] == 0 and len(base) == intervals + 1):
            raise InvalidInput(f"{len(base)} sigmas given but intervals={intervals}")
    ends_at_zero = base[-1] == 0
    body = base[:-1] if ends_at_zero else base
    if sigmas is not None:  # a user grid out of order is the user's, not the shift's (checked again once shifted)
        check_grid(np.concatenate([body, [0.0]]))
    body = time_shift(body, shift=1.0, mu=mu, time_shift_type=time_shift_type) if dynamic else time_shift(
        body, shift=shift)
    if shift_terminal:
        # Stretch so that the last σ equals shift_terminal (Qwen-Image uses 0.02): 1−σ is scaled, σ=1 stays put.
        one_minus = 1.0 - body
        if one_minus[-1] == 0:  # one step, or every σ at 1: nothing to stretch (diffusers returns NaN)
            raise InvalidInput(f"shift_terminal={shift_terminal:g} stretches the grid so that its last σ before 0 is "
                               f"{shift_terminal:g}; a grid whose σ before 0 are all 1 ({len(body)} interval(s) here) "
                               "cannot be stretched: it needs at least 2 intervals (2 model calls with a one-call "
                               "solver such as Euler, 4 with Heun)")
        body = 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))
    if spacing is not None:
        body = respace(body[0], body[-1], len(body), spacing)
    grid = np.concatenate([body, [0.0]])
    if (dynamic or shift != 1.0) and np.isfinite(grid).all() and np.any(np.diff(grid) >= 0):
        # every σ' = e^μσ/(1 + (e^μ − 1)σ) rounds to 1 (or, for a very negative μ, the tail to one value) in float64
        applied = f"mu={mu:g}" if dynamic else f"shift={shift:g}"
        raise InvalidInput(f"{applied} rounds the σ grid to repeated values ({[float(f'{x:.7g}') for x in grid]}): "
                           "the time shift is too strong for this grid")
    check_grid(grid)
    return grid


def check_grid(grid: np.ndarray) -> None:
    """Raise InvalidInput (a ValueError) unless `grid` is a finite, strictly decreasing σ grid of two points or more."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 2:
        raise InvalidInput(f"a σ grid needs at least two points (start and end), got {grid.tolist()}")
    if not np.all(np.isfinite(grid)):
        raise InvalidInput(f"σ grid contains non-finite values: {grid.tolist()}")
    bad = np.nonzero(np.diff(grid) >= 0)[0]
    if len(bad):
        i = int(bad[0])
        raise InvalidInput(f"sigmas must be strictly decreasing; sigma[{i}]={grid[i]:.6g} <= "
                         f"sigma[{i + 1}]={grid[i + 1]:.6g}")


def resample_grid(grid: np.ndarray, intervals: int) -> np.ndarray:
    """The same schedule shape with a different number of intervals: piecewise-linear in the grid index.
    Used when a method needs fewer grid points than model calls (Heun: 2 calls per interval)."""
    grid = np.asarray(grid, dtype=np.float64)
    if intervals == len(grid) - 1:
        return grid.copy()
    u = np.linspace(0.0, 1.0, len(grid))
    return np.interp(np.linspace(0.0, 1.0, intervals + 1), u, grid)


@dataclass(frozen=True)
class VPSchedule:
    """Continuous variance-preserving schedule with linear β(t) = β0 + (β1−β0)·t, t ∈ [t_clamp, 1]:
    α_t = exp(−½∫β), σ_t = √(1−α_t²). The defaults (0.1, 20) are the DDPM/DiT continuous schedule.

    ε-prediction models are sampled with the flow solvers through the change of variables
    s = σ_t/(α_t+σ_t), x̃ = x/(α_t+σ_t), under which dx̃/ds = ε − x0 exactly (docs/diffusers.md), so Euler in
    (x̃, s) is DDIM(η=0).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_clamp: float = 1e-3

    def _integral(self, t: np.ndarray) -> np.ndarray:
        return 0.5 * (self.beta_max - self.beta_min) * t * t + self.beta_min * t

    def alpha_sigma(self, t: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.clip(np.asarray(t, dtype=np.float64), self.t_clamp, 1.0)
        integral = self._integral(t)
        return np.exp(-0.5 * integral), np.sqrt(-np.expm1(-integral))

    def to_flow(self, t: float | np.ndarray) -> np.ndarray:
        """s(t) = σ_t/(α_t+σ_t), the flow-matching time of VP time t."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / (alpha + sigma)

    def from_flow(self, s: float | np.ndarray) -> np.ndarray:
        """Inverse of `to_flow`: σ/α = s/(1−s) gives ∫β = log(1 + (s/(1−s))²), a quadratic in t."""
        s = np.asarray(s, dtype=np.float64)
        integral = np.log1p((s / (1.0 - s)) ** 2)
        a, b = 0.5 * (self.beta_max - self.beta_min), self.beta_min
        return (-b + np.sqrt(b * b + 4 * a * integral)) / (2 * a)

    def times(self, intervals: int, t_start: float = 0.999, t_end: float = 1e-3) -> np.ndarray:
        """Uniform VP time grid t_start → t_end, `intervals + 1` points."""
        return np.linspace(t_start, t_end, intervals + 1)
