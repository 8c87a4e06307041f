"""STORK-2 / STORK-4 (Tan et al., arXiv:2505.24210) as fewstep plans; spec: docs/stork.md.

One real model call per step. Inside a step, the s-stage stabilized RK core (RKG2 for STORK-2, ROCK4 for STORK-4,
§Stabilized cores) runs with *virtual* evaluations F(T, Y) from past model outputs. F is linear in the stage state Y
and in the stored x_j, v_j, so each step is run once, up front, in float64 on coefficient vectors over its own local
basis (the x_j, v_j of its history); the result is a plan row. Steps of the same shape run through the stages together
as rows of one array, so a 1000-step plan takes milliseconds, not seconds.

`compat=None` (fixed mode, §Fixed): true RKG2 abscissae, textbook ROCK4 ordering, divided-difference derivatives on any
grid, second-order start-up, NFE = grid intervals. `compat="official"` reproduces the official scheduler's
flow path (§Compat mode) with its bugs: inserted first midpoint (NFE = intervals + 1), (¼, ¾) start-up, uniform-grid D₁,
RKL2 abscissae in RKG2 and the ROCK4 stage-1 shift.

`extrapolate` (fixed mode) chooses what is extrapolated in time across the stages:
* "velocity": v itself (the paper's flow form; F ignores Y, so the step is quadrature of a polynomial, §Closed form);
* "data": x̂₀ = x − σ·v, with drift F(T, Y) = (Y − x̂₀(T))/T, so the stages integrate the stiff 1/σ part;
* "velocity-noise" (alias "noise", its old name): "velocity" on steps that start above σ = ½, and below it the
  noise prediction ε̂ = x + (1 − σ)·v, with drift F(T, Y) = (ε̂(T) − Y)/(1 − T).
Both drifts equal v at the stored points. Their linear parts behave oppositely as σ decreases: the data drift's
−(Y − x̂₀)/T contracts errors (the stiff, stable 1/σ part the stabilized stages are built for), while the noise drift's
(Y − ε̂)/(1 − T) *expands* them at rate 1/(1 − T), so a noise step near σ = 1 multiplies its interpolation error by
up to (1 − σ_end)/(1 − σ_start) ~ 1/h: used from the first steps on, this costs a log factor in the global error
(measured slope 2.4–2.6 for STORK-4 at shift 1), hence noise only below σ = ½, where the expansion rate is at most 2
(slope 2.98 at 256–512 intervals, like "velocity"). Start-up steps (history shorter than derivative_order + 1) and a
step that ends at σ = 0 (the data drift is singular there) use "velocity".

The default is "velocity-noise": over the testbed (gmm2d, gmm8d, gmm-stiff; shift 1 and 3 on FlowMatchEuler's default
grid; 6, 8, 10 NFE; STORK-2 and -4, 36 cells, 1000 noises; jump="none") it had the lowest RMSE in 20 cells
("velocity" 10, "data" 6) and the lowest median error in 18 ("data" 10, "velocity" 8).

`jump` (fixed mode; default "all"; compat="official" allows only "none"): steps taken as *denoiser jumps*
x_t = x_s − (σ_s − σ_t)·v_s, i.e. x̂0 = x − σv held constant (the first-order exponential integrator, which in flow
coordinates is Euler), instead of extrapolating across them: "all" = every step that ends at σ = 0 plus every step
more than 1 + √2 times longer in λ = log((1−σ)/σ) than the one before (`fewstep.solvers.denoise.jump_steps`: the step
into σ_min on FlowMatchEuler grids); "interior" = those that end above σ = 0; "none" = the paper's method.
Extrapolating v across a long step into the stiff 1/σ region is what made the paper's STORK 46–93× worse than Euler's
RMSE on the stiff mixture at 6 NFE; with "all" it is 0.99–1.00× Euler's RMSE at shift 1 and 0.43× at shift 3 (gmm-stiff,
1024 noises). The price: an Euler step to σ = 0 has a local error O(h²), so with "all" the asymptotic order is 2 for
both cores, and on smooth problems at shift 1 the paper method is better (gmm8d, 6–10 NFE: 0.35–0.68× the default's
RMSE; at shift 3 the default is 0.63–0.93× the paper's). With a final jump, the last extrapolated step extrapolates
linearly (lower order before the final jump, docs/stork.md). "interior" keeps the nominal order (3, or 4 with
derivative_order=3) on refined grids.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np

from fewstep.errors import InvalidInput
from fewstep.solvers.adams import adams_weights
from fewstep.solvers.plan import Plan, Row, StepCountError
from fewstep.solvers.registry import SolverInfo, register

STAGES = {2: range(2, 201), 4: range(2, 149)}
Drift = Callable[[float, np.ndarray], np.ndarray]


@functools.cache
def rock4_tables() -> dict[str, np.ndarray]:
    """ms (int64), recf, fpa, fpb from the package's rock4.npz (see data/ROCK4_SOURCE.md)."""
    with resources.files("fewstep").joinpath("data/rock4.npz").open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


def rock4_degree(s: int) -> tuple[int, int, int]:
    """(row i, degree m, recf pointer r) for s stages: the smallest tabulated m ≥ s (int64: no uint8 overflow)."""
    ms = rock4_tables()["ms"]
    i = int(np.argmax(ms >= s))
    return i, int(ms[i]), int(np.sum(2 * ms[:i] - 1))


def rkg2_step(f: Drift, y0: np.ndarray, t0: float, h: float, s: int, official: bool) -> np.ndarray:
    """One RKG2 step of size h downwards. Stage times: the true ones (tracked with F ≡ 1) or, if `official`,
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
    """One ROCK4 step of size h downwards: m Chebyshev stages + the 4-stage finishing procedure. `official`
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


@dataclass(frozen=True)
class Stork:
    order: int  # 2 = RKG2 core, 4 = ROCK4 core
    stages: int = 50
    derivative_order: int = 2
    compat: str | None = None
    extrapolate: str | None = None  # None: "velocity-noise" in fixed mode, "velocity" (official) with compat
    jump: str | None = None  # None: "all" in fixed mode, "none" (the paper's, the only official form) with compat

    def __post_init__(self) -> None:
        if self.extrapolate is None:
            object.__setattr__(self, "extrapolate", "velocity" if self.compat == "official" else "velocity-noise")
        if self.jump is None:
            object.__setattr__(self, "jump", "none" if self.compat == "official" else "all")
        if self.extrapolate == "noise":  # the old name of "velocity-noise" (it never meant noise everywhere)
            object.__setattr__(self, "extrapolate", "velocity-noise")
        if self.jump not in ("none", "interior", "all"):
            raise InvalidInput(f"jump must be 'none', 'interior' or 'all', got {self.jump!r}")
        if self.compat == "official" and self.jump != "none":
            raise InvalidInput("compat='official' has no denoiser jumps (jump='none')")
        allowed = STAGES[self.order]
        if (isinstance(self.stages, bool) or not isinstance(self.stages, (int, np.integer))
                or self.stages not in allowed):
            raise InvalidInput(f"stork-{self.order}: stages must be an integer in {allowed.start}..{allowed.stop - 1}"
                             + (" (rounded up to a tabulated ROCK4 degree)" if self.order == 4 else "")
                             + f", got {self.stages!r}")
        if (isinstance(self.derivative_order, bool) or not isinstance(self.derivative_order, (int, np.integer))
                or self.derivative_order not in (2, 3)):
            raise InvalidInput(f"derivative_order must be 2 or 3, got {self.derivative_order!r}")
        if self.compat not in (None, "official"):
            raise InvalidInput(f"compat must be None (fixed method) or 'official', got {self.compat!r}")
        if self.extrapolate not in ("velocity", "data", "velocity-noise"):
            raise InvalidInput(f"extrapolate must be 'velocity', 'data' or 'velocity-noise' (alias 'noise'), "
                             f"got {self.extrapolate!r}")
        if self.compat == "official" and (self.derivative_order != 2 or self.extrapolate != "velocity"):
            raise InvalidInput("compat='official' reproduces only derivative_order=2 with extrapolate='velocity' "
                             "(the official derivative_order=3 formulas are inconsistent, docs/stork.md §Derivatives)")

    def calls(self, intervals: int) -> int | None:
        if self.compat != "official":
            return intervals
        return intervals + 1 if intervals >= 2 else None  # the official start-up needs two intervals

    def _core(self, f: Drift, y0: np.ndarray, t0: float, h: float, official: bool) -> np.ndarray:
        step = rkg2_step if self.order == 2 else rock4_step
        return step(f, y0, t0, h, self.stages, official)

    def plan(self, grid: np.ndarray) -> Plan:
        return self._official(grid) if self.compat == "official" else self._fixed(grid)

    def _fixed(self, grid: np.ndarray) -> Plan:
        """§Fixed on the grid nodes themselves (NFE = intervals). The first interval grid[0] → grid[2] is a 2-stage RK2
        with its stage at grid[1] (the midpoint rule when grid[1] is the midpoint). Then the variable-step history
        ramps up to derivative_order + 1 nodes (AB2 start, §Startup).

        The stage output v₁ was evaluated at the Euler state x₁ (O(h²) off), so it enters the history with an O(h²)
        error; it is read by the next two steps only, an O(h³) contribution to the global error, which keeps order 3.
        With derivative_order = 2 and at least 6 intervals it is kept: the quadratic history is then complete one step
        earlier and spans the early, mode-choosing part of the path densely (gmm8d shift 1: RMSE 6.6e−2 instead of
        1.1e−1 at 6 NFE, 3.2e−2 instead of 4.7e−2 at 8). Below 6 intervals a quadratic through the clustered start
        nodes would be extrapolated over steps as long as its span (4 NFE, shift 3: 5.8e−1 instead of 3.0e−1), and
        derivative_order = 3 re-anchors its start-up without v₁ (below)."""
        n = len(grid) - 1
        rows: dict[int, Row] = {}
        if n == 1:
            rows[0] = Row.step(0, grid[0] - grid[1], {0: 1.0})
        else:
            big = grid[0] - grid[2]
            c = (grid[0] - grid[1]) / big
            rows[0] = Row.step(0, grid[0] - grid[1], {0: 1.0})
            rows[1] = Row({0: 1.0}, {0: -big * (1 - 1 / (2 * c)), 1: -big / (2 * c)})
        history = [0, 1] if self.derivative_order == 2 and n >= 6 else [0]
        jumps = _jumps(grid, self.jump)
        # Steps that share (history length, drift form, re-anchor) are run through the core together: the drift and
        # the stages act on each step's own local basis (x_j, v_j for j in its history), one numpy row per step.
        groups: dict[tuple[int, str, bool], list[tuple[int, tuple[int, ...]]]] = {}
        # Lower order before the final jump: when the last step is a denoiser jump (order 2 at best), the last
        # extrapolated step extrapolates linearly, from its two newest nodes (v, or ε̂ in the noise form), as
        # DPM-Solver++ and UniPC lower their order towards the end (lower_order_final). A quadratic history reaching
        # back over the few long steps of a shifted grid is what lost to Euler with guidance (docs/stork.md §Lower
        # order before the final jump).
        last_extrapolated = max((k for k in range(2, n) if not jumps[k]), default=None) if jumps[-1] else None
        for k in range(2, n):
            history = (history + [k])[-(self.derivative_order + 1):]
            if jumps[k]:
                rows[k] = _denoiser_jump(k, grid[k], grid[k + 1])
                continue
            form = self._form(grid[k], grid[k + 1], full=len(history) == self.derivative_order + 1)
            # Re-anchor once the cubic history (g₀, g₂, g₃, g₄) exists: x₄ ← x₀ − ∫ interpolant over [g₄, g₀].
            # v₁ (O(h²) state error) gets no weight, so the start-up's O(h³) local errors drop to O(h⁴) and
            # the global order reaches 4 instead of being capped at 3 (docs/stork.md §Startup).
            lowered = k == last_extrapolated
            anchor = self.derivative_order == 3 and k == 4 and not lowered
            nodes = history[-2:] if lowered else history
            groups.setdefault((len(nodes), form, anchor), []).append((k, tuple(nodes)))
        for (q, form, anchor), steps in groups.items():
            ks = np.array([k for k, _ in steps])
            hist = np.array([h for _, h in steps])
            z = grid[hist]  # (m, q) node σ of each step's history
            y0 = np.zeros((len(ks), 2 * q))
            if anchor:  # only k = 4, history (0, 2, 3, 4): x₀ is local state 0
                y0[0, 0] = 1.0
                y0[0, q:] = -(grid[0] - grid[4]) * adams_weights(z[0], grid[0], grid[4])
            else:
                y0[:, q - 1] = 1.0  # x_k, the newest history node
            out = self._core(_batch_drift(form, z), y0, grid[ks][:, None], (grid[ks] - grid[ks + 1])[:, None],
                             official=False)
            for k, h, vec in zip(ks, hist, out, strict=True):
                rows[int(k)] = Row({int(j): float(c) for j, c in zip(h, vec[:q], strict=True) if c != 0.0},
                                   {int(j): float(c) for j, c in zip(h, vec[q:], strict=True) if c != 0.0})
        return Plan(np.asarray(grid[:-1], dtype=np.float64), float(grid[-1]), tuple(rows[k] for k in range(n)))

    def _form(self, sigma: float, sigma_next: float, full: bool) -> str:
        """The drift form of a step from σ to sigma_next (module docstring: where the data and noise forms apply)."""
        form = self.extrapolate if full else "velocity"  # the 1/σ or 1/(1 − σ) factor needs the full history
        if (form == "data" and sigma_next == 0) or (form == "velocity-noise" and sigma > 0.5):
            return "velocity"
        return "noise" if form == "velocity-noise" else form

    def _official(self, grid: np.ndarray) -> Plan:
        """docs/stork.md §Compat mode: nodes (g₀, midpoint, g₁, …, g_{N−1}), end g_N; dt_list[0..1] doubled; start-up;
        main steps with the official D₁, D₂ (§Derivatives) through the cores with both bugs."""
        big_n = len(grid) - 1
        if big_n < 2:
            raise StepCountError(f"stork-{self.order} with compat='official' cannot make exactly {big_n + 1} model "
                                 "calls; it makes at least 3 (2 grid intervals)")
        s = np.concatenate([grid[:1], [grid[0] + (grid[1] - grid[0]) / 2], grid[1:]])
        n = big_n + 1
        dt = s[:-1] - s[1:]
        dt[:2] *= 2
        rows = [Row({0: 1.0}, {0: -0.5 * dt[0]}),
                Row({1: 1.0}, {1: -0.75 * dt[1], 0: 0.25 * dt[1]}),
                Row({2: 1.0}, {2: -dt[2] - dt[2] ** 2 / (2 * dt[1]), 0: dt[2] ** 2 / (2 * dt[1])})][:n]
        if n > 3:
            # All main steps at once, each on its local basis (x_k, v_a, v_b, v_k) with stored history (v_a, v_b) =
            # (v₀, v₂), then (v₂, v₃), …: the same float64 operations as step by step, so the same coefficients.
            ks = np.arange(3, n)
            a = np.concatenate([[0, 2], ks[:-2]])[:len(ks)]  # v_a: v₀, v₂, v₃, …
            b = np.concatenate([[2], ks[:-1]])  # v_b: v₂, v₃, v₄, …
            d1, d2 = dt[ks - 1][:, None], dt[ks - 2][:, None]
            e = np.eye(4)
            D1 = (-e[1] + 4 * e[2] - 3 * e[3]) / (2 * d1)
            D2 = 2 * (d1 * e[1] - (d1 + d2) * e[2] + d2 * e[3]) / (d1 * d2 * (d1 + d2))
            y0 = np.broadcast_to(e[0], (len(ks), 4))
            out = self._core(_taylor(s[ks][:, None], e[3], D1, D2), y0, s[ks][:, None], dt[ks][:, None], official=True)
            for k, ka, kb, vec in zip(ks, a, b, out, strict=True):
                coef = {int(ka): vec[1], int(kb): vec[2], int(k): vec[3]}
                rows.append(Row({int(k): float(vec[0])} if vec[0] != 0.0 else {},
                                {j: float(c) for j, c in coef.items() if c != 0.0}))
        return Plan(s[:-1], float(s[-1]), tuple(rows))


def _lagrange_batch(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """ℓ_j(t) on each row's nodes: z (m, q), t (m, 1) → (m, q)."""
    q = z.shape[1]
    out = np.ones((z.shape[0], q))
    for j in range(q):
        for i in range(q):
            if i != j:
                out[:, j] *= (t[:, 0] - z[:, i]) / (z[:, j] - z[:, i])
    return out


def _batch_drift(form: str, z: np.ndarray) -> Drift:
    """F(T, Y) for a batch of steps on local bases [x_h…, v_h…] (h = each step's history nodes z):
    velocity ℓ(T)·v; data (Y − ℓ(T)·x̂₀)/T with x̂₀_j = x_j − z_j·v_j; noise (ℓ(T)·ε̂ − Y)/(1 − T) with
    ε̂_j = x_j + (1 − z_j)·v_j. Every one equals v at the nodes."""

    def f(t: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = np.broadcast_to(t, (z.shape[0], 1))
        ell = _lagrange_batch(z, t)
        if form == "velocity":
            return np.concatenate([np.zeros_like(ell), ell], axis=1)
        if form == "data":
            return (y - np.concatenate([ell, -z * ell], axis=1)) / t
        return (np.concatenate([ell, (1.0 - z) * ell], axis=1) - y) / (1.0 - t)

    return f


def _jumps(grid: np.ndarray, jump: str) -> np.ndarray:
    """Steps taken as denoiser jumps (`jump`: "none", "interior" = the λ-jumps that end above σ = 0, "all")."""
    if jump == "none":
        return np.zeros(len(grid) - 1, dtype=bool)
    from fewstep.solvers.denoise import jump_steps

    found = jump_steps(grid)
    if jump == "interior":
        found &= grid[1:] > 0.0
    return found


def _denoiser_jump(k: int, s: float, t: float) -> Row:
    """x_t = (t/s)·x_k + (1 − t/s)·(x_k − s·v_k) = x_k − (s − t)·v_k: first-order, and the data prediction x̂0 = x − σv
    is what it extrapolates (constant), not v across the stiff 1/σ region."""
    return Row.step(k, s - t, {k: 1.0})


def _taylor(sk: float, vk: np.ndarray, d1: np.ndarray, d2: np.ndarray) -> Drift:
    """The official virtual velocity P(u) = v_k + u·D₁ + ½u²·D₂, u = σ − s_k; ignores the stage state."""
    return lambda t, y: vk + (t - sk) * d1 + 0.5 * (t - sk) ** 2 * d2


def _factory(order: int) -> Callable[..., Stork]:
    def make(stages: int = 50, derivative_order: int = 2, compat: str | None = None,
             extrapolate: str | None = None, jump: str | None = None) -> Stork:
        return Stork(order, stages, derivative_order, compat, extrapolate, jump)
    return make


register(SolverInfo("stork-2", _factory(2), "2 (official: 1)", 1, "6-20",
                    "STORK-2: RKG2 stages on an extrapolated noise prediction (velocity above σ=½), denoiser jump "
                    "on the last step, 1 call per step"))
register(SolverInfo("stork-4", _factory(4), "2 (jump='none': 3, 4 with derivative_order=3; official: stalls)", 1,
                    "6-20", "STORK-4: ROCK4 stages on an extrapolated noise prediction (velocity above σ=½), denoiser "
                    "jump on the last step, 1 call per step"))
