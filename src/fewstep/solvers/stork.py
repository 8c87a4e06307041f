"""STORK-2 / STORK-4 (Tan et al., arXiv:2505.24210) as fewstep plans; spec: design/STORK.md.

One real model call per step. Inside a step, the s-stage stabilized RK core (RKG2 for STORK-2, ROCK4 for STORK-4,
§5) is run with *virtual* evaluations F(T, Y) built from past model outputs (§4). F is linear in the stage state Y
and in the stored x_j, v_j, so each step is run once, up front, in float64 on coefficient vectors over the basis
(x_0..x_{n-1}, v_0..v_{n-1}); the result is a plan row.

`compat=None` (fixed mode, §10): true RKG2 abscissae, textbook ROCK4 ordering, divided-difference derivatives on any
grid (§4.2), second-order start-up, NFE = grid intervals. `compat="official"` reproduces the official scheduler's
flow path (§11) with its bugs: inserted first midpoint (NFE = intervals + 1), (¼, ¾) start-up, uniform-grid D₁,
RKL2 abscissae in RKG2 and the ROCK4 stage-1 shift.

`extrapolate` (fixed mode) chooses what is extrapolated in time across the stages:
* "velocity": v itself (the paper's flow form; F ignores Y, so the step is quadrature of a polynomial, §8);
* "data": x̂₀ = x − σ·v, with drift F(T, Y) = (Y − x̂₀(T))/T, so the stages integrate the stiff 1/σ part;
* "noise": ε̂ = x + (1 − σ)·v, with drift F(T, Y) = (ε̂(T) − Y)/(1 − T).
Both drifts equal v at the stored points. Their linear parts behave oppositely as σ decreases: the data drift's
−(Y − x̂₀)/T contracts errors (the stiff, stable 1/σ part the stabilized stages are built for), while the noise drift's
(Y − ε̂)/(1 − T) *expands* them at rate 1/(1 − T), so a noise step near σ = 1 multiplies its interpolation error by
up to (1 − σ_end)/(1 − σ_start) ~ 1/h: used from the first steps on, this costs a log factor in the global error
(measured slope 2.4–2.6 for STORK-4 at shift 1). "noise" is therefore applied only on steps that start at σ ≤ ½,
where the expansion rate is at most 2, and "velocity" above (slope 2.98 at 256–512 intervals, like "velocity").
Start-up steps (history shorter than derivative_order + 1) and a step that ends at σ = 0 (the data drift is singular
there) use "velocity".

The default is "noise": over the whole testbed (gmm2d, gmm8d, gmm-stiff; shift 1 and 3; 6, 8, 10 NFE; STORK-2 and -4,
36 cells, 1000 noises) it has the lowest RMSE in 20 cells ("velocity" 10, "data" 6) and the lowest median error in 18
("data" 10, "velocity" 8) (`python benchmarks/stork.py`, README). "data" is the one that resolves the stiff mixture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np

from fewstep.solvers.adams import adams_weights
from fewstep.solvers.plan import Plan, Row
from fewstep.solvers.registry import SolverInfo, register

STAGES = {2: range(2, 201), 4: range(2, 149)}
Drift = Callable[[float, np.ndarray], np.ndarray]


@functools.cache
def rock4_tables() -> dict[str, np.ndarray]:
    """ms (int64), recf, fpa, fpb from the package's rock4.npz (see data/ROCK4_SOURCE.md)."""
    with resources.files("fewstep").joinpath("data/rock4.npz").open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


def rock4_degree(s: int) -> tuple[int, int, int]:
    """(row i, degree m, recf pointer r) for s stages: the smallest tabulated m ≥ s (§5.2, int64: no uint8 overflow)."""
    ms = rock4_tables()["ms"]
    i = int(np.argmax(ms >= s))
    return i, int(ms[i]), int(np.sum(2 * ms[:i] - 1))


def rkg2_step(f: Drift, y0: np.ndarray, t0: float, h: float, s: int, official: bool) -> np.ndarray:
    """One RKG2 step of size h downwards (§5.1). Stage times: the true ones (tracked with F ≡ 1) or, if `official`,
    the RKL2 fractions c̃ the official code uses."""
    b = [1.0, 1.0 / 3.0] + [4.0 * (j - 1) * (j + 4) / (3.0 * j * (j + 1) * (j + 2) * (j + 3)) for j in range(2, s + 1)]
    w1 = 6.0 / ((s + 4) * (s - 1))
    f0 = f(t0, y0)
    ys, ts = [y0, y0 - h * w1 * f0], [t0, t0 - h * w1]
    for j in range(2, s + 1):
        mu = (2 * j + 1) * b[j] / (j * b[j - 1])
        nu = -(j + 1) * b[j] / (j * b[j - 2])
        mut = w1 * mu
        gat = -mut * (1.0 - j * (j + 1) * b[j - 1] / 2.0)
        m = j - 1
        c = (4.0 / 3.0 if m == 1 else m * m + m - 2.0) / (s * s + s - 2.0)
        t_stage = t0 - c * h if official else ts[-1]
        ys.append(mu * ys[-1] + nu * ys[-2] + (1 - mu - nu) * y0 - h * mut * f(t_stage, ys[-1]) - h * gat * f0)
        ts.append(mu * ts[-1] + nu * ts[-2] + (1 - mu - nu) * t0 - h * mut - h * gat)
    return ys[-1]


def rock4_step(f: Drift, y0: np.ndarray, t0: float, h: float, s: int, official: bool) -> np.ndarray:
    """One ROCK4 step of size h downwards (§5.2): m Chebyshev stages + the 4-stage finishing procedure. `official`
    applies the stage-1 shift: stage 2 is formed from (Y₀, Y₁) and (T₁, T₁) instead of (Y₁, Y₀) and (T₁, T₀)."""
    tab = rock4_tables()
    i, m, r = rock4_degree(s)
    recf, p, q = tab["recf"], tab["fpa"][i], tab["fpb"][i]
    y1, t1 = y0 - h * recf[r] * f(t0, y0), t0 - h * recf[r]
    (y, yp), (t, tp) = ((y0, y1), (t1, t1)) if official else ((y1, y0), (t1, t0))
    for j in range(2, m + 1):
        mu, kap = recf[r + 2 * (j - 2) + 1], recf[r + 2 * (j - 2) + 2]
        y, yp = -h * mu * f(t, y) + (1 + kap) * y - kap * yp, y
        t, tp = -h * mu + (1 + kap) * t - kap * tp, t
    k1 = f(t, y)
    k2 = f(t - h * p[0], y - h * p[0] * k1)
    k3 = f(t - h * (p[1] + p[2]), y - h * (p[1] * k1 + p[2] * k2))
    k4 = f(t - h * (p[3] + p[4] + p[5]), y - h * (p[3] * k1 + p[4] * k2 + p[5] * k3))
    return y - h * (q[0] * k1 + q[1] * k2 + q[2] * k3 + q[3] * k4)


def lagrange(nodes: np.ndarray, t: float) -> np.ndarray:
    """ℓ_j(t) on `nodes`: the interpolating polynomial = the Taylor polynomial with divided-difference derivatives
    of §4.2 (same polynomial, any grid)."""
    return np.array([np.prod([(t - z) / (nodes[j] - z) for z in np.delete(nodes, j)]) for j in range(len(nodes))])


@dataclass(frozen=True)
class Stork:
    order: int  # 2 = RKG2 core, 4 = ROCK4 core
    stages: int = 50
    derivative_order: int = 2
    compat: str | None = None
    extrapolate: str | None = None  # None: "noise" in fixed mode, "velocity" (the only official form) with compat

    def __post_init__(self) -> None:
        if self.extrapolate is None:
            object.__setattr__(self, "extrapolate", "velocity" if self.compat == "official" else "noise")
        allowed = STAGES[self.order]
        if not isinstance(self.stages, (int, np.integer)) or self.stages not in allowed:
            raise ValueError(f"stork-{self.order}: stages must be an integer in {allowed.start}..{allowed.stop - 1}"
                             + (" (rounded up to a tabulated ROCK4 degree)" if self.order == 4 else "")
                             + f", got {self.stages!r}")
        if self.derivative_order not in (2, 3):
            raise ValueError(f"derivative_order must be 2 or 3, got {self.derivative_order!r}")
        if self.compat not in (None, "official"):
            raise ValueError(f"compat must be None (fixed method) or 'official', got {self.compat!r}")
        if self.extrapolate not in ("velocity", "data", "noise"):
            raise ValueError(f"extrapolate must be 'velocity', 'data' or 'noise', got {self.extrapolate!r}")
        if self.compat == "official" and (self.derivative_order != 2 or self.extrapolate != "velocity"):
            raise ValueError("compat='official' reproduces only derivative_order=2 with extrapolate='velocity' "
                             "(the official derivative_order=3 formulas are inconsistent, STORK.md §4.3)")

    def calls(self, intervals: int) -> int:
        return intervals + 1 if self.compat == "official" else intervals

    def _core(self, f: Drift, y0: np.ndarray, t0: float, h: float, official: bool) -> np.ndarray:
        step = rkg2_step if self.order == 2 else rock4_step
        return step(f, y0, t0, h, self.stages, official)

    def plan(self, grid: np.ndarray) -> Plan:
        return self._official(grid) if self.compat == "official" else self._fixed(grid)

    def _fixed(self, grid: np.ndarray) -> Plan:
        """§10 on the grid nodes themselves (NFE = intervals). The first interval grid[0] → grid[2] is a 2-stage RK2
        with its stage at grid[1] (the midpoint rule when grid[1] is the midpoint). Then the variable-step history
        ramps up to derivative_order + 1 nodes (AB2 start, §6).

        The stage output v₁ was evaluated at the Euler state x₁ (O(h²) off), so it enters the history with an O(h²)
        error; it is read by the next two steps only, an O(h³) contribution to the global error, which keeps order 3.
        With derivative_order = 2 and at least 6 intervals it is kept: the quadratic history is then complete one step
        earlier and spans the early, mode-choosing part of the path densely (gmm8d shift 1: RMSE 6.6e−2 instead of
        1.1e−1 at 6 NFE, 3.2e−2 instead of 4.7e−2 at 8). Below 6 intervals a quadratic through the clustered start
        nodes would be extrapolated over steps as long as its span (4 NFE, shift 3: 5.8e−1 instead of 3.0e−1), and
        derivative_order = 3 re-anchors its start-up without v₁ (below)."""
        n = len(grid) - 1
        dim = 2 * n  # basis: x_0..x_{n-1}, v_0..v_{n-1}
        ex, ev = np.eye(dim)[:n], np.eye(dim)[n:]
        rows: list[Row] = []
        if n == 1:
            rows.append(Row.step(0, grid[0] - grid[1], {0: 1.0}))
        else:
            big = grid[0] - grid[2]
            c = (grid[0] - grid[1]) / big
            rows.append(Row.step(0, grid[0] - grid[1], {0: 1.0}))
            rows.append(Row({0: 1.0}, {0: -big * (1 - 1 / (2 * c)), 1: -big / (2 * c)}))
        history = [0, 1] if self.derivative_order == 2 and n >= 6 else [0]
        for k in range(2, n):
            history = (history + [k])[-(self.derivative_order + 1):]
            nodes = grid[history]
            f = self._drift(nodes, history, ex, ev, full=len(history) == self.derivative_order + 1,
                            sigma_next=grid[k + 1])
            y0 = ex[k]
            if self.derivative_order == 3 and k == 4:
                # Re-anchor once the cubic history (g₀, g₂, g₃, g₄) exists: x₄ ← x₀ − ∫ interpolant over [g₄, g₀].
                # v₁ (O(h²) state error) gets no weight, so the start-up's O(h³) local errors drop to O(h⁴) and
                # the global order reaches 4 instead of being capped at 3 (§6, §10 item 4).
                y0 = ex[0] - (grid[0] - grid[4]) * (adams_weights(nodes, grid[0], grid[4]) @ ev[history])
            rows.append(_row(self._core(f, y0, grid[k], grid[k] - grid[k + 1], official=False), n))
        return Plan(np.asarray(grid[:-1], dtype=np.float64), float(grid[-1]), tuple(rows))

    def _drift(self, nodes: np.ndarray, history: list[int], ex: np.ndarray, ev: np.ndarray, full: bool,
               sigma_next: float) -> Drift:
        """The virtual drift F(T, Y) of one step from σ = nodes[-1] to sigma_next (module docstring: where the data
        and noise forms apply)."""
        vel = ev[history]
        form = self.extrapolate if full else "velocity"  # the 1/σ or 1/(1 − σ) factor needs the full history
        if (form == "data" and sigma_next == 0) or (form == "noise" and nodes[-1] > 0.5):
            form = "velocity"
        if form == "velocity":
            return lambda t, y: lagrange(nodes, t) @ vel
        if form == "data":
            x0hat = ex[history] - nodes[:, None] * vel  # x̂₀_j = x_j − σ_j·v_j
            return lambda t, y: (y - lagrange(nodes, t) @ x0hat) / t
        epshat = ex[history] + (1 - nodes)[:, None] * vel  # ε̂_j = x_j + (1 − σ_j)·v_j
        return lambda t, y: (lagrange(nodes, t) @ epshat - y) / (1 - t)

    def _official(self, grid: np.ndarray) -> Plan:
        """§11: nodes s = (g₀, midpoint, g₁, …, g_{N−1}), end g_N; dt_list[0..1] doubled (§3.1 step 6); start-up §6;
        main steps with the official D₁, D₂ (§4.1) through the cores with both bugs."""
        big_n = len(grid) - 1
        if big_n < 2:
            raise ValueError("compat='official' needs at least 2 grid intervals (3 model calls)")
        s = np.concatenate([grid[:1], [grid[0] + (grid[1] - grid[0]) / 2], grid[1:]])
        n = big_n + 1
        dt = s[:-1] - s[1:]
        dt[:2] *= 2
        dim = 2 * n
        ex, ev = np.eye(dim)[:n], np.eye(dim)[n:]
        rows = [Row({0: 1.0}, {0: -0.5 * dt[0]}),
                Row({1: 1.0}, {1: -0.75 * dt[1], 0: 0.25 * dt[1]}),
                Row({2: 1.0}, {2: -dt[2] - dt[2] ** 2 / (2 * dt[1]), 0: dt[2] ** 2 / (2 * dt[1])})][:n]
        a, b = 0, 2  # stored history (v₀, v₂)
        for k in range(3, n):
            d1, d2 = dt[k - 1], dt[k - 2]
            D1 = (-ev[a] + 4 * ev[b] - 3 * ev[k]) / (2 * d1)
            D2 = 2 * (d1 * ev[a] - (d1 + d2) * ev[b] + d2 * ev[k]) / (d1 * d2 * (d1 + d2))
            rows.append(_row(self._core(_taylor(s[k], ev[k], D1, D2), ex[k], s[k], dt[k], official=True), n))
            a, b = b, k
        return Plan(s[:-1], float(s[-1]), tuple(rows))


def _taylor(sk: float, vk: np.ndarray, d1: np.ndarray, d2: np.ndarray) -> Drift:
    """The official virtual velocity P(u) = v_k + u·D₁ + ½u²·D₂, u = σ − s_k (§4.1); ignores the stage state."""
    return lambda t, y: vk + (t - sk) * d1 + 0.5 * (t - sk) ** 2 * d2


def _row(vec: np.ndarray, n: int) -> Row:
    return Row({j: float(c) for j, c in enumerate(vec[:n]) if c != 0.0},
               {j: float(c) for j, c in enumerate(vec[n:]) if c != 0.0})


def _factory(order: int) -> Callable[..., Stork]:
    def make(stages: int = 50, derivative_order: int = 2, compat: str | None = None,
             extrapolate: str | None = None) -> Stork:
        return Stork(order, stages, derivative_order, compat, extrapolate)
    return make


register(SolverInfo("stork-2", _factory(2), "2 (official: 1)", 1, "6-20",
                    "STORK-2: RKG2 stages on an extrapolated noise prediction (velocity above σ=½), 1 call per step"))
register(SolverInfo("stork-4", _factory(4), "3 (4 with derivative_order=3; official: stalls)", 1, "6-20",
                    "STORK-4: ROCK4 stages on an extrapolated noise prediction (velocity above σ=½), 1 call per step"))
