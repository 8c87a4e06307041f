"""Exact ground truth: Gaussian-mixture data, whose flow velocity and ε-prediction are closed-form.

Data x0 ~ Σ_k π_k N(μ_k, s_k² I). Under any Gaussian path x = a·x0 + b·ε, given component k,
x ~ N(a·μ_k, c_k² I) with c_k² = a²s_k² + b², so with responsibilities r_k(x) ∝ π_k N(x; a·μ_k, c_k² I):

    E[ε  | x] = Σ_k r_k · b·(x − a·μ_k)/c_k²
    E[x0 | x] = Σ_k r_k · (μ_k + a·s_k²·(x − a·μ_k)/c_k²)

Flow matching (a, b) = (1−σ, σ): v = E[ε − x0 | x] = Σ_k r_k [ (b − a·s_k²)/c_k² (x − a·μ_k) − μ_k ].
VP: (a, b) = (α_t, σ_t). Everything is float64 torch, batched over the first axis.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch

from fewstep.errors import InvalidInput
from fewstep.schedules import VPSchedule

PRESETS = ("gmm2d", "gmm8d", "gmm-stiff")


class GaussianMixture:
    """Mixture Σ_k π_k N(μ_k, s_k² I) with exact flow velocity, VP ε-prediction and data sampling."""

    def __init__(self, weights, means, stds, name: str = "gmm"):
        self.name = name
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.log_weights = torch.log(w / w.sum())
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.variances = torch.as_tensor(stds, dtype=torch.float64) ** 2
        if self.means.ndim != 2 or self.means.shape[0] != len(w) or len(self.variances) != len(w):
            raise ValueError("means must be (K, D) with K = len(weights) = len(stds)")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _posterior(self, x: torch.Tensor, a: float, b: float):
        """Responsibilities (B, K), deviations x − a·μ_k (B, K, D) and variances c_k² (K,), by log-sum-exp."""
        var = a * a * self.variances + b * b
        dev = x[:, None, :] - a * self.means[None]
        logr = self.log_weights[None] - 0.5 * self.dim * torch.log(var)[None] - 0.5 * (dev * dev).sum(-1) / var
        return torch.softmax(logr, dim=1), dev, var

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Exact v(x, σ) = E[ε − x0 | x_σ = x], computed in float64, returned in x's dtype."""
        sigma = float(sigma)
        xd = torch.as_tensor(x).to(torch.float64)
        a, b = 1.0 - sigma, sigma
        r, dev, var = self._posterior(xd, a, b)
        per_k = ((b - a * self.variances) / var)[None, :, None] * dev - self.means[None]
        return torch.einsum("bk,bkd->bd", r, per_k).to(torch.as_tensor(x).dtype)

    def epsilon(self, x: torch.Tensor, t: float, vp: VPSchedule | None = None) -> torch.Tensor:
        """Exact ε̂(x, t) = E[ε | x_t = x] for x_t = α_t·x0 + σ_t·ε under the VP schedule `vp`."""
        alpha, sigma = (float(v) for v in (vp or VPSchedule()).alpha_sigma(float(t)))
        xd = torch.as_tensor(x).to(torch.float64)
        r, dev, var = self._posterior(xd, alpha, sigma)
        return torch.einsum("bk,bkd->bd", r, (sigma / var)[None, :, None] * dev).to(torch.as_tensor(x).dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n data points x0 (float64)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt()[:, None] * z

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely mixture component of each data point x0 (B,): which mode a sample landed in."""
        return self._posterior(torch.as_tensor(x).to(torch.float64), 1.0, 0.0)[0].argmax(dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact data log-density log p(x0)."""
        r_logits = (self.log_weights[None] - 0.5 * self.dim * torch.log(2 * math.pi * self.variances)[None]
                    - 0.5 * ((x.to(torch.float64)[:, None, :] - self.means[None]) ** 2).sum(-1) / self.variances)
        return torch.logsumexp(r_logits, dim=1)


def preset(name: str) -> GaussianMixture:
    """`gmm2d`: ring of 8 modes (std 0.15); `gmm8d`: the 8-D reference problem of the official test vectors;
    `gmm-stiff`: 8 modes at ±8.5·e_i in 4-D with std 0.01 (spectral radius of ∂v/∂x ≈ 50 near σ = 0.01)."""
    if name == "gmm2d":
        angles = np.arange(8) * 2 * np.pi / 8
        return GaussianMixture(np.ones(8), 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1), np.full(8, 0.15),
                               name)
    if name == "gmm8d":
        spec = json.loads(resources.files("fewstep.data").joinpath("gmm8d.json").read_text())
        return GaussianMixture(spec["weights"], spec["means"], spec["stds"], name)
    if name == "gmm-stiff":
        means = 8.5 * np.concatenate([np.eye(4), -np.eye(4)])
        return GaussianMixture(np.ones(8), means, np.full(8, 0.01), name)
    raise InvalidInput(f"unknown problem {name!r}; available: {', '.join(PRESETS)}")


class ReferenceSolution(NamedTuple):
    x: torch.Tensor  # float64 solution at sigma_end
    error: float  # max |x − x_tight| against a solve at 100× tighter tolerance
    nfev: int


@dataclass
class _Counter:
    calls: int = 0


def reference_solve(velocity, x: torch.Tensor, sigma_start: float = 1.0, sigma_end: float = 0.0, *,
                    rtol: float = 1e-10, atol: float = 1e-10, check: bool = True,
                    progress: str | None = None) -> ReferenceSolution:
    """The flow ODE dx/dσ = velocity(x, σ) from σ_start to σ_end with scipy's DOP853, the whole batch as one system.

    With `check`, the solve is repeated at 100× tighter tolerance and the max difference is returned as its
    accuracy (a RuntimeError is raised if it exceeds 1e3·max(rtol, atol): the tolerance did not hold).
    `progress`: the label of a progress bar on stderr, in per cent of the σ range covered (the solver's steps are
    adaptive, so there is no count of calls to show); None for none.
    """
    from scipy.integrate import solve_ivp
    from tqdm.auto import tqdm

    shape = tuple(x.shape)
    counter = _Counter()
    span = abs(sigma_start - sigma_end)

    def solve(rt: float, at: float) -> np.ndarray:
        y0 = x.detach().to(torch.float64).cpu().numpy().ravel()
        with tqdm(total=100, desc=progress, disable=progress is None, leave=False,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}") as bar:

            def rhs(s: float, y: np.ndarray) -> np.ndarray:
                counter.calls += 1
                v = velocity(torch.from_numpy(y.reshape(shape)), s)
                covered = int(100 * abs(s - sigma_start) / span) if span else 100
                if covered > bar.n:  # stages may step back inside a step; the bar only moves forward
                    bar.update(covered - bar.n)
                return torch.as_tensor(v).to(torch.float64).numpy().ravel()

            sol = solve_ivp(rhs, (sigma_start, sigma_end), y0, method="DOP853", rtol=rt, atol=at)
        if not sol.success:
            raise RuntimeError(f"reference solve failed: {sol.message}")
        return sol.y[:, -1].reshape(shape)

    result = solve(rtol, atol)
    nfev = counter.calls
    error = float("nan")
    if check:
        error = float(np.max(np.abs(result - solve(rtol * 1e-2, atol * 1e-2))))
        if error > 1e3 * max(rtol, atol):
            raise RuntimeError(f"reference solve accuracy check failed: {error:.2e} > {1e3 * max(rtol, atol):.1e}")
    return ReferenceSolution(torch.from_numpy(result), error, nfev)


def smooth_flow() -> GaussianMixture:
    """Two wide, overlapping components in 4-D: a nonlinear but smooth velocity field (no sharp mode boundaries),
    for measuring convergence orders."""
    return GaussianMixture([1.0, 1.5], [[-0.8, 0.3, 0.0, 0.5], [0.9, -0.2, 0.4, -0.5]], [0.6, 0.7], "smooth")


def convergence_order(solver: str, intervals: list[int], *, shift: float = 1.0, samples: int = 64, seed: int = 0,
                      **options) -> tuple[float, list[float], list[int]]:
    """Empirical global order of `solver` on `smooth_flow()`: the least-squares slope of log(max error) against
    log(grid intervals), on the uniform grid linspace(1, 0, n+1) mapped through `shift` (a smoothly refined grid;
    diffusers' default grid keeps a fixed last step σ_min → 0, which blurs the asymptotics). The reference is a
    DOP853 solve at rtol = atol = 1e−12. Returns (order, errors, model calls)."""
    from fewstep.sampling import make_plan, sample

    g = smooth_flow()
    noise = torch.randn(samples, g.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = reference_solve(g.velocity, noise, rtol=1e-12, atol=1e-12, check=False).x
    grids = [np.linspace(1.0, 0.0, n + 1) for n in intervals]
    errors = [float((sample(g.velocity, noise, solver, sigmas=grid, shift=shift, **options) - exact).abs().max())
              for grid in grids]
    calls = [make_plan(solver, sigmas=grid, shift=shift, **options).calls for grid in grids]
    slope = -np.polyfit(np.log(intervals), np.log(errors), 1)[0]
    return float(slope), errors, calls


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Direct differences, not the |a|² + |b|² − 2a·b shortcut, whose cancellation leaves ~1e-8 on the diagonal.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance between two sample sets (N, D) and (M, D): sqrt(2·E|X−Y| − E|X−X'| − E|Y−Y'|) over the
    empirical distributions (V-statistics, so it is ≥ 0 and, in 1-D, equals `scipy.stats.energy_distance`)."""
    a, b = (torch.as_tensor(t).to(torch.float64).reshape(len(t), -1) for t in (a, b))
    between = _distances(a, b).mean()
    within = _distances(a, a).mean() + _distances(b, b).mean()
    return float((2 * between - within).clamp(min=0).sqrt())
