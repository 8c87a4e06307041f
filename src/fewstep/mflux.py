"""fewstep's solvers as mflux schedulers: `mflux-generate --scheduler fewstep.mflux.Stork2 ...` (docs/mflux.md).

mflux (Flux / Qwen-Image on MLX) builds the scheduler named by `--scheduler` (or `generate_image(scheduler=...)`)
as `cls(config)` and runs, for t = init_time_step … n−1 (n = `--steps`):

    v = transformer(latents, σ = sigmas[t]);   latents = scheduler.step(noise=v, timestep=t, latents=latents)

with v = dx/dσ, and `sigmas[t + 1]` the σ of what `step` returns. Each class here runs one fewstep plan through that
loop: one transformer call per `step`, `sigmas` = the plan's call σ's plus its end (0). The grid is mflux's own
float32 `linear` grid for the same settings (with the resolution shift of dev and Qwen-Image, recomputed by
`set_image_seq_len`), so `Euler` *is* mflux's `linear` scheduler and the others differ only in how they step
(NeuralSolver: its searched grid).
img2img starts at `init_time_step` from a state with no history: the solver is re-planned on the grid nodes left.
`latents` is taken as the current state at every call (mflux's in-context and concept variants overwrite part of it
after `step`). Updates are computed in float32 on MLX arrays and returned in the latents' dtype.

Options: subclass and set the solver's options as class attributes, in a module of your own that mflux can import
(`class MyStork(fewstep.mflux.Stork4): derivative_order = 3`, then `--scheduler my_module.MyStork`).
`Recommended` is fewstep's recommended default solver; Heun makes 2 calls per step of mflux's grid for `--steps`/2.

This module needs mlx and mflux, and neither torch nor diffusers (mflux reports any ImportError raised while
importing a scheduler module as "module not found").
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np
from mflux.models.common.schedulers.base_scheduler import BaseScheduler

from fewstep.entry import enter
from fewstep.errors import InvalidInput, NonFiniteError
from fewstep.sampling import resolve_solver
from fewstep.solvers.denoise import guided_options
from fewstep.solvers.plan import Plan, PlanRun, grid_plan, intervals_for
from fewstep.solvers.registry import RECOMMENDED, info

NUM_TRAIN_TIMESTEPS = 1000

__all__ = ["Adams2", "Adams3", "Adams4", "Euler", "FewstepScheduler", "Heun", "NeuralSolver", "Recommended", "Stork2",
           "Stork4", "mflux_sigmas"]


def mflux_sigmas(steps: int, model_config: Any, image_seq_len: float | None = None) -> mx.array:
    """mflux's `linear` σ grid for `steps` steps (float32, steps + 1 values ending at 0): linspace(1, 1/steps), and
    for models that need a sigma shift (dev, Qwen) the resolution shift e^μ/(e^μ + 1/σ − 1) with
    μ = base_shift + (max_shift − base_shift)·(image_seq_len − base_seq_len)/(max_seq_len − base_seq_len), then the
    model's terminal stretch if it has one. The float32 operations are mflux's own, in the same order."""
    sigmas = mx.linspace(1.0, 1.0 / steps, steps).astype(mx.float32)
    if not getattr(model_config, "requires_sigma_shift", False):
        return mx.concatenate([sigmas, mx.zeros(1)])
    if image_seq_len is None:
        raise InvalidInput("this model shifts its sigmas by the image size: give image_seq_len = (H//16)·(W//16)")
    return _shift(sigmas, model_config, _mu(model_config, image_seq_len))


def _mu(model_config: Any, image_seq_len: float) -> float:
    m = (model_config.sigma_max_shift - model_config.sigma_base_shift) / (
        model_config.sigma_max_seq_len - model_config.sigma_base_seq_len)
    b = model_config.sigma_base_shift - m * model_config.sigma_base_seq_len
    return m * image_seq_len + b


def _shift(sigmas: mx.array, model_config: Any, mu: float) -> mx.array:
    mu = mx.array(mu)
    shifted = mx.exp(mu) / (mx.exp(mu) + (1 / sigmas - 1))
    terminal = getattr(model_config, "sigma_shift_terminal", None)
    if terminal is not None:
        one_minus = 1.0 - shifted
        shifted = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    return mx.concatenate([shifted, mx.zeros(1)])


def _classifier_free(config: Any) -> bool:
    """Whether mflux applies the guidance as classifier-free guidance (two transformer calls per step: Qwen-Image),
    not as an input of one call (FLUX.1-dev's distilled guidance)."""
    model_config = getattr(config, "model_config", None)
    names = [getattr(model_config, "model_name", ""), *(getattr(model_config, "aliases", None) or [])]
    return any("qwen" in str(name).lower() for name in names)


def _guidance(config: Any) -> float:
    """The guidance scale the model samples with: mflux's `guidance`, unless the model has none (schnell)."""
    if getattr(getattr(config, "model_config", None), "supports_guidance", None) is False:
        return 1.0
    raw = getattr(config, "guidance", None)
    if raw is None:
        return 1.0
    try:
        guidance = float(raw)
    except (TypeError, ValueError):
        guidance = math.nan
    if not math.isfinite(guidance):
        raise InvalidInput(f"guidance must be a finite number, got {raw!r}")
    return guidance


def _whole(value: Any, what: str) -> int:
    """`value` as an int if it is a whole number (2, 2.0, an integer array scalar); InvalidInput naming `what` if not
    (int() would turn 2.5 into 2 and run another number of steps than asked)."""
    try:
        whole = int(value)
        exact = bool(whole == value) and not isinstance(value, bool)  # True is not a step count
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        raise InvalidInput(f"{what} must be a whole number, got {value!r}")
    return whole


class FewstepScheduler(BaseScheduler):
    """A fewstep solver as an mflux scheduler. Subclasses set `solver` (a fewstep solver name) and may set any of that
    solver's options as class attributes (None = the solver's default)."""

    solver: ClassVar[str] = RECOMMENDED

    @classmethod
    def solver_options(cls) -> dict[str, Any]:
        """The solver options this class sets (its class attributes named like the solver's options, unless None).
        Any other public class attribute of a subclass is refused: a misspelt option would otherwise run the default."""
        accepted = info(cls.solver).options()
        for klass in cls.__mro__[:cls.__mro__.index(FewstepScheduler)]:
            for key, value in vars(klass).items():
                if key.startswith("_") or key == "solver" or key in accepted or callable(value) \
                        or isinstance(value, (classmethod, staticmethod, property)):
                    continue
                raise InvalidInput(f"{klass.__name__}.{key}: solver {cls.solver!r} has no option {key!r}; its "
                                   f"options: {', '.join(accepted) or 'none'}")
        return {k: getattr(cls, k) for k in accepted if getattr(cls, k, None) is not None}

    def __init__(self, config: Any):
        self.config = config
        name = type(self).__name__
        self._solver, _ = resolve_solver(self.solver, guided_options(self.solver, self.solver_options(),
                                                                     _guidance(config), _classifier_free(config)))
        self._name = name
        self._calls = _whole(config.num_inference_steps, f"{name}: num_inference_steps")
        self._intervals = intervals_for(self._solver, self._calls, name)
        self._shifted = bool(getattr(config.model_config, "requires_sigma_shift", False))
        # mflux's linear scheduler computes μ from width·height/256; set_image_seq_len may replace it.
        self._seq_len = config.width * config.height / 256 if self._shifted else None
        self._build()
        start = _whole(getattr(config, "init_time_step", None) or 0, f"{name}: init_time_step")
        # img2img: a solver that cannot enter there fails now, before the image is encoded. At start = steps (image
        # strength 1) mflux's loop makes no call and returns the image, as with its `linear` scheduler.
        if 0 < start < self._calls:
            self._entry_plan(start)

    # -- mflux's interface -------------------------------------------------------------------------------------------
    @property
    def sigmas(self) -> mx.array:
        """σ of every transformer call, then where the last step ends (0): n + 1 float32 values."""
        return self._sigmas

    @property
    def timesteps(self) -> mx.array:
        """σ·1000 of every call (as mflux's flow_match_euler_discrete); Qwen-Image Edit reads only its length."""
        return self._sigmas[:-1] * NUM_TRAIN_TIMESTEPS

    def set_image_seq_len(self, image_seq_len: int) -> None:
        """The resolution shift for a model that needs one (mflux calls this with (H//16)·(W//16) on dev/Qwen)."""
        if self._shifted and image_seq_len != self._seq_len:
            self._seq_len = image_seq_len
            self._build()

    def step(self, noise: mx.array, timestep: int, latents: mx.array, **kwargs) -> mx.array:
        """One transformer call: `noise` is its output v = dx/dσ at sigmas[timestep] on the current `latents`; returns
        the latents at sigmas[timestep + 1]. A `timestep` other than the one after the previous call starts a new run
        there (mflux's img2img starts at init_time_step)."""
        t = _whole(timestep, f"{self._name}: timestep")
        if not 0 <= t < self._calls:
            raise InvalidInput(f"timestep {t} is outside this scheduler's {self._calls} steps")
        if noise.shape != latents.shape:  # a broadcast would silently give every element one output, or grow the batch
            raise InvalidInput(f"{self._name}: transformer output of shape {tuple(noise.shape)} for latents of shape "
                               f"{tuple(latents.shape)}")
        if not mx.issubdtype(latents.dtype, mx.floating):
            raise InvalidInput(f"{self._name}: latents must be a floating-point MLX array, got {latents.dtype}")
        if not bool(mx.all(mx.isfinite(noise))):  # mflux evaluates every step anyway: this costs one reduction
            raise NonFiniteError(f"{self._name}: the transformer output at step {t} (sigma "
                                 f"{float(self._sigmas[t]):.6g}) is NaN or Inf")
        if self._run is None or t != self._next:
            self._start_at(t)
        # Copies (astype copies too): MLX arrays can be written in place, and mflux's in-context variants write
        # into the latents after each step; the solver's history must not change with them.
        x = mx.array(latents) if latents.dtype == mx.float32 else latents.astype(mx.float32)
        v = mx.array(noise) if noise.dtype == mx.float32 else noise.astype(mx.float32)
        out = self._run.advance(t - self._offset, x, v)
        self._next = t + 1
        return out if latents.dtype == mx.float32 else out.astype(latents.dtype)

    # -- the plan ----------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        grid32 = self._grid32()
        self._grid = np.array(grid32, dtype=np.float64)
        if not np.all(np.isfinite(self._grid)):  # Qwen-Image at 1 step: the terminal stretch divides by 0
            raise InvalidInput(f"mflux's sigma grid for {self._intervals} step(s) of this model is not finite "
                             f"({self._grid.tolist()}; its `linear` scheduler has the same): use more steps")
        plan = grid_plan(self._solver, self._grid)
        if plan.calls != self._calls:
            raise InvalidInput(f"{self._name} makes {plan.calls} model calls on this grid, not {self._calls}")
        self._plan = plan
        # A searched grid (NeuralSolver) ends within rounding of 0; mflux expects the list to end at 0.
        end = 0.0 if abs(plan.sigma_end) < 1e-3 else plan.sigma_end
        self._sigmas = mx.array(np.r_[plan.sigmas, end].astype(np.float32))
        self._run = None
        self._next = None
        self._offset = 0

    def _grid32(self) -> mx.array:
        model_config = self.config.model_config
        if not self._shifted:
            return mflux_sigmas(self._intervals, model_config)
        config = self.config
        if self._seq_len == config.width * config.height / 256:  # mflux's own expression for μ, bit for bit
            m = (model_config.sigma_max_shift - model_config.sigma_base_shift) / (
                model_config.sigma_max_seq_len - model_config.sigma_base_seq_len)
            b = model_config.sigma_base_shift - m * model_config.sigma_base_seq_len
            mu = m * config.width * config.height / 256 + b
        else:
            mu = _mu(model_config, self._seq_len)
        return _shift(mx.linspace(1.0, 1.0 / self._intervals, self._intervals).astype(mx.float32), model_config, mu)

    def _start_at(self, k: int) -> None:
        self._run = PlanRun(self._plan if k == 0 else self._entry_plan(k))
        self._offset = k

    def _entry_plan(self, k: int) -> Plan:
        """The plan from call k on, for a state at σ_k with no history (`fewstep.entry.enter`: the solver re-planned on
        the grid nodes left; a searched NeuralSolver cannot, and raises)."""
        return enter(self._solver, self._grid, self._plan, k, self._name)


class Euler(FewstepScheduler):
    """Explicit Euler: mflux's `linear` scheduler, to float32 round-off."""

    solver = "euler"


class Heun(FewstepScheduler):
    """Heun, 2 transformer calls per step of mflux's grid for steps/2 (even `--steps` only). `sigmas` repeats each
    inner node (the corrector's call is at the σ its predictor reached) and the last call is at σ = 0."""

    solver = "heun"


class Adams2(FewstepScheduler):
    """Variable-step Adams–Bashforth-2 (option: `startup`)."""

    solver = "adams2"
    startup: ClassVar[str | None] = None


class Adams3(Adams2):
    solver = "adams3"


class Adams4(Adams2):
    solver = "adams4"


class Stork2(FewstepScheduler):
    """STORK-2 (options: `stages`, `derivative_order`, `compat`, `extrapolate`, `jump`; `jump = "none"` for the
    paper's method without the default's denoiser jumps)."""

    solver = "stork-2"
    stages: ClassVar[int | None] = None
    derivative_order: ClassVar[int | None] = None
    compat: ClassVar[str | None] = None
    extrapolate: ClassVar[str | None] = None
    jump: ClassVar[str | None] = None


class Stork4(Stork2):
    """STORK-4 (options as Stork2)."""

    solver = "stork-4"


class NeuralSolver(FewstepScheduler):
    """A searched NeuralSolver (`solver_file`: sit, flowdcn, or a path to a JSON file from `fewstep search`). It runs
    its searched σ grid, not mflux's (no resolution shift), only for the step counts the file has, and not img2img."""

    solver = "neuralsolver"
    solver_file: ClassVar[str] = "sit"


class Recommended(FewstepScheduler):
    """fewstep's recommended default solver (the one `fewstep.sample` uses when none is named)."""

    solver = RECOMMENDED
