"""`adams-denoise`: variable-step Adams on the velocity where v is smooth, a denoiser (data-prediction) jump where a
step reaches into the stiff 1/σ region near the data. One model call per step, training-free.

Two step kinds, chosen from the grid alone (the plan is fixed before the first call):

* **Adams steps** (the bulk): x_{k+1} = x^c_k − h·Σ_j b_j·v_j with the exact variable-step Adams–Bashforth weights
  of `order` nodes (`adams_weights`), ramping up from Euler at the start. With `corrector=True`, after call k+1 the
  state x_{k+1} is replaced by the Adams–Moulton value x^c_{k+1} = x^c_k − h·Σ_j b̂_j·v_j on the nodes plus k+1 (a
  free corrector, UniPC's UniC idea in the velocity variable: v_{k+1} is not re-evaluated). As the predictor and
  corrector start from the same x^c_k, x^c_{k+1} = x_{k+1} − h·Σ_j (b̂_j − b_j)·v_j: the row stays local.
* **Denoiser jumps**: x_t = (σ_t/σ_s)·x^c_s + (1 − σ_t/σ_s)·x̂0_s with x̂0_s = x_s − σ_s·v_s, the exact solution of
  d(x/σ)/dσ = −x̂0/σ² for x̂0 frozen at the last model call (the first-order exponential integrator, i.e. DDIM; without
  the corrector it is exactly Euler). At σ_t = 0 the sample is the denoiser output x̂0_s. x̂0_s is taken at the state
  where the model was called, not at x^c_s: where v is stiff (narrow modes near σ = 0, guidance) x̂0 does not depend
  on the state, so x^c_s − σ_s·v_s would carry the corrector's change into the sample unfiltered (measured: 2.6–32×
  worse on the stiff mixture on Flux's grid). A step is a jump when it ends at σ = 0 (λ = log((1−σ)/σ) = ∞), or when
  it is more than 1 + √2 times longer in λ than the step before it (the zero-stability bound of variable-step
  two-step formulas; on diffusers' FlowMatchEuler grids this is the step into σ_min = 0.001·shift, a final step in
  all but name). Polynomial extrapolation of v or x̂0 across such a step extrapolates the choice of mode: on the
  stiff mixture it costs 20–500× the error of Euler. The price: the last step's local error is O(h²), so the
  asymptotic order is 2 whatever `order` is (diffusers' UniPC / DPM++ make the same choice below 15 steps).

Per sample, at run time (`_stiffness_guard`): the corrector is left out where the last two calls put the step beyond
its own stability bound (`corrector_guard`, on by default: classifier-free guidance makes v stiff), and with
`stiff_fallback` an Adams step beyond AB2's bound becomes an Euler step.

Measurements and when to use which solver: docs/solvers.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fewstep.errors import InvalidInput
from fewstep.solvers.adams import gauss_legendre_unit
from fewstep.solvers.plan import Guard, Plan, Row
from fewstep.solvers.registry import SolverInfo, register

JUMP_RATIO = 1.0 + math.sqrt(2.0)  # variable-step BDF2/AB2 zero-stability limit on the step-size ratio


def log_snr(sigma: np.ndarray) -> np.ndarray:
    """λ = log((1−σ)/σ): −∞ at σ = 1, +∞ at σ = 0. A σ a few ulps above 1 (diffusers' float32 grid at shift < 1
    starts at 1.0000006) is the top of the grid, σ = 1."""
    sigma = np.minimum(np.asarray(sigma, dtype=np.float64), 1.0)
    with np.errstate(divide="ignore"):
        return np.log1p(-sigma) - np.log(sigma)


def jump_steps(grid: np.ndarray) -> np.ndarray:
    """Which steps of `grid` are denoiser jumps: ending at σ = 0, or more than JUMP_RATIO times the previous step's
    length in λ (a first step from σ = 1 has infinite λ length: it is Euler anyway)."""
    grid = np.asarray(grid, dtype=np.float64)
    lam = log_snr(grid)
    with np.errstate(invalid="ignore"):
        dl = np.diff(lam)
        jump = grid[1:] == 0.0
        jump[1:] |= dl[1:] > JUMP_RATIO * dl[:-1]
    return jump


@dataclass(frozen=True)
class AdamsDenoise:
    order: int = 2
    corrector: bool = True
    corrector_guard: bool | None = None  # None: on at order 2 (its bound is the two-step pair's), off at order 3
    stiff_fallback: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, (int, np.integer)) or self.order not in (2, 3):
            raise InvalidInput(f"adams-denoise: order must be 2 or 3, got {self.order!r}")
        if not isinstance(self.corrector, bool):
            raise InvalidInput(f"adams-denoise: corrector must be True or False, got {self.corrector!r}")
        if self.corrector_guard is None:
            object.__setattr__(self, "corrector_guard", self.order == 2)
        if not isinstance(self.corrector_guard, bool):
            raise InvalidInput(f"adams-denoise: corrector_guard must be True or False, got {self.corrector_guard!r}")
        if not isinstance(self.stiff_fallback, bool):
            raise InvalidInput(f"adams-denoise: stiff_fallback must be True or False, got {self.stiff_fallback!r}")
        # The bounds are the two-step formulas'; after an Euler fallback the next corrector must be left out.
        if (self.stiff_fallback or self.corrector_guard) and self.order != 2:
            raise InvalidInput(f"adams-denoise: {'stiff_fallback' if self.stiff_fallback else 'corrector_guard'}=True "
                               "needs order=2 (its stability bounds are the two-step formulas')")
        if self.stiff_fallback and self.corrector and not self.corrector_guard:
            raise InvalidInput("adams-denoise: stiff_fallback=True needs corrector_guard (a corrector formed for the "
                               "Adams step must be left out after an Euler fallback)")

    def calls(self, intervals: int) -> int:
        return intervals

    def plan(self, grid: np.ndarray) -> Plan:
        grid = np.asarray(grid, dtype=np.float64)
        n = len(grid) - 1
        jumps = jump_steps(grid)
        # Pass 1, the grid alone: the nodes of each Adams predictor (None for a jump; the history restarts after one)
        # and of the corrector that follows it; pass 2: all their weights at once; pass 3: the rows.
        pred: list[list[int] | None] = []
        for k in range(n):
            if jumps[k]:
                pred.append(None)
            else:
                start = k if (k > 0 and pred[k - 1] is None) else max(0, k + 1 - self.order)
                pred.append(list(range(start, k + 1)))
        corr = [p + [k + 1] if (self.corrector and p is not None and k + 1 < n) else None for k, p in enumerate(pred)]
        b_pred = _batch_weights(grid, pred)
        b_corr = _batch_weights(grid, corr)

        def step_row(k: int, cv: dict[int, float]) -> Row:
            """x_{k+1} from x^c_k = x_k + Σ cv_j·v_j."""
            s, t = grid[k], grid[k + 1]
            if pred[k] is None:
                # x_t = (σ_t/σ_s)·x^c_s + (1 − σ_t/σ_s)·(x_s − σ_s·v_s): x̂0 from the state the model saw.
                r = t / s
                rv = {j: r * c for j, c in cv.items()}
                rv[k] = rv.get(k, 0.0) - (1.0 - r) * s
                return _row({k: 1.0}, rv)
            rv = dict(cv)
            for j, w in zip(pred[k], b_pred[k], strict=True):
                rv[j] = rv.get(j, 0.0) - (s - t) * w
            return _row({k: 1.0}, rv)

        rows: list[Row] = []
        guards: list[Guard | None] = []
        for k in range(n):
            cv: dict[int, float] = {}
            if k > 0 and corr[k - 1] is not None:
                # x^c_k − x_k = −h·Σ (b̂_j − b_j)·v_j: the Adams–Moulton minus the Adams–Bashforth step from x^c_{k−1}.
                h_prev = grid[k - 1] - grid[k]
                for j, w in zip(corr[k - 1], b_corr[k - 1], strict=True):
                    cv[j] = cv.get(j, 0.0) - h_prev * w
                for j, w in zip(pred[k - 1], b_pred[k - 1], strict=True):
                    cv[j] = cv.get(j, 0.0) + h_prev * w
            rows.append(step_row(k, cv))
            if self.corrector_guard or self.stiff_fallback:
                guards.append(_stiffness_guard(grid, k, pred, step_row(k, {}) if cv else None, self.stiff_fallback))
        return Plan(grid[:-1].copy(), float(grid[-1]), tuple(rows), tuple(guards) if any(guards) else ())


# The free corrector assumes a velocity that is smooth along the path; classifier-free guidance w amplifies the
# difference of two fields w times. Measured on the embedded digits model (128 noises, seed 11, RMSE ÷ the best
# diffusers peer, 4 / 5 / 6 / 7 / 8 / 10 calls), both with the stiffness fallback: guidance 3, shift 1, corrector
# (guarded) 1.02 / .98 / 1.01 / 1.01 / .98 / .97, off .94 / .92 / .96 / .98 / 1.00 / 1.04 (on the headline's cells at
# guidance 3, digits and fashion: ≤ the best peer in 23 of 42 cells with it, 11 without); guidance 4, shift 1,
# 1.17 / .99 / 1.02 / 1.00 / 1.03 / .98 with it, 1.00 / .92 / .93 / .92 / .94 / 1.02 off; guidance 5 and 7 off is
# better still (docs/solvers.md, "Strong guidance"). The fallback: neutral at guidance 3, at 7 it takes 4 calls on
# shift 3 from 3.0× to 1.04× the best diffusers scheduler.
GUIDANCE_FALLBACK = 3.0
GUIDANCE_WITHOUT_CORRECTOR = 4.0


def guided_options(solver: str, options: dict, guidance: float, classifier_free: bool = True) -> dict:
    """`options` with adams-denoise's stiffness fallback on for classifier-free guidance ≥ GUIDANCE_FALLBACK (the
    velocity is (1 + w)·cond − w·uncond, whose gain on x the fallback answers) and its corrector off for guidance
    ≥ GUIDANCE_WITHOUT_CORRECTOR; each unless given (a given order=3 keeps the plain steps: the fallback's bounds are
    order 2's). A guidance-distilled model (FLUX.1-dev: one call, guidance as an input) gets no fallback: on mflux's
    Gaussian-mixture stand-in at dev's 3.5 (corrector off) it took 4 calls from 0.194 to 0.319 and 8 from 0.063 to
    0.088 (one sample: a whole latent switches at once). For front ends that know the guidance (`fewstep generate`,
    `fewstep.mflux`); a diffusers scheduler never sees it."""
    if solver != "adams-denoise" or guidance < GUIDANCE_FALLBACK:
        return options
    chosen: dict = {"corrector": False} if guidance >= GUIDANCE_WITHOUT_CORRECTOR else {}
    corrector = options.get("corrector", "corrector" not in chosen)
    # the fallback needs the corrector's guard where there is a corrector: a given corrector_guard=False keeps it off
    guardable = not corrector or options.get("corrector_guard") is not False
    if classifier_free and options.get("order", 2) == 2 and guardable:
        chosen["stiff_fallback"] = True
    return {**chosen, **options}


def _stiffness_guard(grid: np.ndarray, k: int, pred: list[list[int] | None], uncorrected: Row | None,
                     fallback: bool) -> Guard | None:
    """Row k (`uncorrected`: the row without its corrector, if it has one) with its corrector and, with `fallback`, its
    Adams step used only within their stability bounds, per sample, for λ estimated from the last two calls,
    ‖v_k − v_{k−1}‖ / ‖x_k − x_{k−1}‖ where that change contracts (⟨Δv, Δx⟩ > 0; stiffness detection as in Hairer &
    Wanner, Solving ODEs II, IV.2). On dx/dσ = λx (λ > 0 contracts towards σ = 0), with frozen step ratios
    (r = h_k/h_{k−1}):

    * the corrector of step k − 1 (the row's x^c_k − x_k): the pair AB2 predictor / three-node Adams–Moulton corrector
      without re-evaluation is stable for h_{k−1}·λ ≤ 6/(6 + 5r) (its characteristic root −1, 6/11 for equal steps);
      Euler / trapezoid (Heun's stages) for h·λ ≤ 2. Beyond it: the same row without that correction (level 1).
    * the Adams step (order 2) is stable for h_k·λ ≤ 2/(1 + r) (root −1; 1 for equal steps). Beyond it: Euler from
      the state the model saw, x_{k+1} = x_k − h·v_k (level 2, Euler's bound is 2).

    Classifier-free guidance w makes x̂0 depend on x with a gain of order w, so λ = (1 − ∂x̂0/∂x)/σ grows with w:
    docs/solvers.md, "Strong guidance"."""
    levels: list[tuple[float, Row]] = []
    if uncorrected is not None:
        h = grid[k - 1] - grid[k]
        bound = 2.0 if len(pred[k - 1]) == 1 else 6.0 / (6.0 + 5.0 * h / (grid[k - 2] - grid[k - 1]))
        levels.append((bound / h, uncorrected))
    if fallback and pred[k] is not None and len(pred[k]) > 1:
        h = grid[k] - grid[k + 1]
        bound = 2.0 / (1.0 + h / (grid[k - 1] - grid[k]))
        levels.append((bound / h, Row.step(k, h, {k: 1.0})))
    if not levels:
        return None
    # A sample that left out its corrector or fell back to Euler at the row before leaves out this corrector too: after
    # Euler it is formed for a step not taken, and h·λ grows along a run (λ ~ 1/σ near the data, and h/σ grows on
    # every pipeline grid), so a bound exceeded once stays exceeded; the estimate alone is noisy at few steps.
    carry = 1 if uncorrected is not None else 0
    return Guard(Row({k: 1.0, k - 1: -1.0}), Row({}, {k: 1.0, k - 1: -1.0}), tuple(levels), carry)


def _row(x: dict[int, float], v: dict[int, float]) -> Row:
    return Row({j: c for j, c in x.items() if c != 0.0}, {j: c for j, c in v.items() if c != 0.0})


def _batch_weights(grid: np.ndarray, nodes: list[list[int] | None]) -> list[np.ndarray | None]:
    """adams_weights(grid[nodes[k]], grid[k], grid[k + 1]) for every k at once (grouped by node count); None stays."""
    out: list[np.ndarray | None] = [None] * len(nodes)
    by_q: dict[int, list[int]] = {}
    for k, nd in enumerate(nodes):
        if nd is not None:
            by_q.setdefault(len(nd), []).append(k)
    for q, ks in by_q.items():
        if q == 1:
            for k in ks:
                out[k] = np.ones(1)
            continue
        idx = np.array(ks)
        z = (grid[idx, None] - grid[np.array([nodes[k] for k in ks])]) / (grid[idx] - grid[idx + 1])[:, None]
        u, gw = gauss_legendre_unit(q)
        # b_j = ∫₀¹ ℓ_j(u) du in u = (σ_from − σ)/h, by q-point Gauss–Legendre (exact for degree q − 1).
        w = np.zeros((len(ks), q))
        for j in range(q):
            ell = np.ones((len(ks), len(u)))
            for i in range(q):
                if i != j:
                    ell *= (u[None, :] - z[:, i:i + 1]) / (z[:, j:j + 1] - z[:, i:i + 1])
            w[:, j] = ell @ gw
        for k, row in zip(ks, w, strict=True):
            out[k] = row
    return out

register(SolverInfo("adams-denoise", lambda order=2, corrector=True, corrector_guard=None, stiff_fallback=False:
                    AdamsDenoise(order, corrector, corrector_guard, stiff_fallback),
                    "2 (any order: the last step is first order)", 1, "4-12",
                    "Adams + free corrector on v (per sample within its stability bound), denoiser (x0) jumps into "
                    "σ≈0; robust training-free default"))
