"""diffusers scheduler adapter: any registered fewstep solver as a drop-in scheduler (DIFFUSERS.md §1-§7).

One `step()` = one model call and `len(timesteps)` = NFE, for every solver and both model kinds:

* `prediction_type="flow_prediction"` (Flux, SD3, Qwen-Image): the model returns v = dx/dσ and the solver's plan
  runs on (x, v) as it is.
* `prediction_type="epsilon"` (PixArt-Σ, SD): the VP training schedule comes from the config's betas, exactly as
  DDIMScheduler builds it, and the solver runs in the flow coordinates of DIFFUSERS.md §6,
  s = σ/(α+σ), x̃ = x/(α+σ) = x·k(s) with k(s) = √((1−s)² + s²), where dx̃/ds = (ε − x̃)/(1−s). Both changes of
  variables are per-call scalars, so each flow row becomes a row on (x, ε) once, in float64, at `set_timesteps`
  (`_epsilon_plan`); `step()` is then the same single linear combination in both modes. Euler there is DDIM(η=0).
  Timesteps are VP indices (floats between training timesteps for a searched grid). A call below the lowest
  training noise (Heun's last stage, at σ = 0) is made at timestep 0.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from fewstep.sampling import resolve_solver
from fewstep.schedules import flow_sigmas, resample_grid
from fewstep.solvers.plan import Plan, PlanRun, Row, grid_plan, intervals_for

PREDICTIONS = {"flow_prediction": "flow", "epsilon": "epsilon"}
# Keys that describe the model's training schedule. `from_config` keeps them even when the source scheduler only had
# them as defaults (DDIMScheduler() records every key in `_use_default_values`): DDIM's default prediction_type
# "epsilon" says what the model predicts, it is not a default of ours to replace.
SCHEDULE_KEYS = ("num_train_timesteps", "prediction_type", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "timestep_spacing", "steps_offset")
ENTRY_TOLERANCE = 1e-9  # σ values closer than this are the same grid node (Heun's stage σ = next node ± 1 ulp)


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


def _alphas_cumprod(config) -> np.ndarray:
    """ᾱ_t, t = 0..num_train_timesteps−1, computed as DDIMScheduler does (float32), so that a timestep means the same
    noise level to both."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ValueError(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got "
                         f"{config.beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


def _vp_timesteps(n: int, config) -> np.ndarray:
    """n decreasing VP timesteps with DDIMScheduler's `timestep_spacing` rules."""
    total = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (total // n))[::-1].astype(np.float64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)) - 1.0
    raise ValueError(f"timestep_spacing must be linspace, leading or trailing, got {config.timestep_spacing!r}")


def _k(s: np.ndarray | float) -> np.ndarray:
    """x̃ = k(s)·x: 1/(α+σ) at flow time s (α ∝ 1−s, σ ∝ s, α² + σ² = 1)."""
    s = np.asarray(s, dtype=np.float64)
    return np.sqrt((1.0 - s) ** 2 + s ** 2)


def _epsilon_plan(flow: Plan) -> Plan:
    """The flow plan on (x̃, v) rewritten on (x, ε): x̃_j = k_j·x_j, v_j = (ε_j − k_j·x_j)/(1 − s_j), x_{i+1} =
    x̃_{i+1}/k_{i+1}. Exact; every coefficient is formed once in float64."""
    s = flow.sigmas
    k = _k(s)
    k_next = _k(np.r_[s[1:], flow.sigma_end])
    rows = []
    for i, row in enumerate(flow.rows):
        x = {j: a * k[j] / k_next[i] for j, a in row.x.items()}
        eps = {}
        for j, b in row.v.items():
            x[j] = x.get(j, 0.0) - b * k[j] / ((1.0 - s[j]) * k_next[i])
            eps[j] = b / ((1.0 - s[j]) * k_next[i])
        rows.append(Row(x, eps))
    return Plan(flow.sigmas, flow.sigma_end, tuple(rows))


def _restarted(plan: Plan) -> Plan:
    """`plan` after one extra first call whose output is not used (x_1 = x_0)."""
    rows = tuple(Row({j + 1: c for j, c in row.x.items()}, {j + 1: c for j, c in row.v.items()}) for row in plan.rows)
    return Plan(np.r_[plan.sigmas[0], plan.sigmas], plan.sigma_end, (Row({0: 1.0}),) + rows)


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Every fewstep solver as a diffusers scheduler: `FewstepScheduler.from_config(pipe.scheduler.config,
    solver="stork-4", solver_options={...})`. Accepts FlowMatchEulerDiscreteScheduler's keys (shift, dynamic
    shifting, shift_terminal) and, with `prediction_type="epsilon"`, DDIMScheduler's schedule keys."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                    "EulerDiscreteScheduler", "UniPCMultistepScheduler"]
    order = 1  # one timesteps entry per model call, so img2img's `timesteps[t_start * order:]` counts calls
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, solver: str = "adams2", solver_options: dict | None = None, num_train_timesteps: int = 1000,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 invert_sigmas: bool = False, prediction_type: str = "flow_prediction", beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTIONS)}, got {prediction_type!r}")
        if invert_sigmas:
            raise ValueError("invert_sigmas=True (Mochi) is not supported")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        # Unknown solver or option, or a solver made for the other prediction type: ValueError here, not in step().
        self._solver, _ = resolve_solver(solver, dict(solver_options or {}), PREDICTIONS[prediction_type])
        self._solver_name = solver
        self._epsilon = prediction_type == "epsilon"
        if self._epsilon:
            alphas_cumprod = _alphas_cumprod(self.config)
            # Flow time of every training timestep; increasing in t, so t ↔ s is a monotone interpolation.
            self._flow_time = np.sqrt(1.0 - alphas_cumprod) / (np.sqrt(alphas_cumprod) + np.sqrt(1.0 - alphas_cumprod))
            _vp_timesteps(1, self.config)  # reject an unknown timestep_spacing now
        self._shift = shift
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._plan = None
        self._run = None
        self._offset = 0

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        # DDIM keys this adapter does not implement would otherwise stay hidden config and change the noise levels
        # silently (zero-terminal-SNR rescaling); `set_alpha_to_one` needs no key: sampling always ends at σ = 0.
        if config is not None and {**config, **kwargs}.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr=True (zero terminal SNR) is not supported")
        if config is not None and "_use_default_values" in config:
            config = dict(config)
            config["_use_default_values"] = [k for k in config["_use_default_values"] if k not in SCHEDULE_KEYS]
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None,
                      timesteps: list[float] | np.ndarray | None = None) -> None:
        """`num_inference_steps` = model calls. `sigmas` (flow): N values as Flux passes them, shifted like
        FlowMatchEuler, N calls. `timesteps`: the grid nodes, used as given (no shift; flow: σ·1000, epsilon: VP
        indices); the calls are the solver's on them."""
        cfg = self.config
        if sigmas is not None and timesteps is not None:
            raise ValueError("pass either `sigmas` or `timesteps`, not both")
        if self._epsilon and (sigmas is not None or mu is not None):
            raise ValueError("prediction_type='epsilon' uses VP timesteps: pass `timesteps`, not sigmas or mu")
        if not self._epsilon and cfg.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting=True needs `mu` in set_timesteps (Flux and Qwen compute it from "
                             "the image size)")
        calls = num_inference_steps  # what the caller asked for; None when it gave the grid itself as timesteps
        if timesteps is not None:
            nodes = np.asarray(timesteps, dtype=np.float64).ravel()
            if num_inference_steps not in (None, len(nodes)):
                raise ValueError(f"{len(nodes)} timesteps given but num_inference_steps={num_inference_steps}")
            calls = None
            grid = np.r_[self._flow_time_of(nodes) if self._epsilon else nodes / cfg.num_train_timesteps, 0.0]
        elif sigmas is not None:
            body = np.asarray(sigmas, dtype=np.float64).ravel()
            body = body[:-1] if body[-1] == 0 else body
            if num_inference_steps not in (None, len(body)):
                raise ValueError(f"{len(body)} sigmas given but num_inference_steps={num_inference_steps}")
            calls = len(body)
            n = self._intervals(calls)
            if n != calls:  # Heun: 2 calls per interval, so N calls need N/2 nodes of the same schedule
                body = resample_grid(body, n - 1)
            grid = flow_sigmas(sigmas=body.tolist(), **self._shifting(mu))
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        elif self._epsilon:
            grid = np.r_[self._flow_time_of(_vp_timesteps(self._intervals(calls), cfg)), 0.0]
        else:
            grid = flow_sigmas(self._intervals(calls), **self._shifting(mu))
        plan = grid_plan(self._solver, grid)  # a solver that cannot run this grid (NeuralSolver's table) fails here
        if calls is not None and plan.calls != calls:
            raise ValueError(f"{self._solver_name} makes {plan.calls} model calls on this grid, not {calls}")
        self._grid = np.asarray(grid, dtype=np.float64)
        self._plan = plan  # in flow variables; `_start_at` rewrites the plan it runs for ε models
        t = self._timestep_of(plan.sigmas) if self._epsilon else plan.sigmas * cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(t).to(torch.float32).to(device)
        # σ of every call plus the end (flow time s for epsilon), on the CPU as FlowMatchEuler keeps it: no syncs.
        self.sigmas = torch.from_numpy(np.r_[plan.sigmas, plan.sigma_end]).to(torch.float32)
        self.num_inference_steps = plan.calls
        self._step_index = None
        self._begin_index = None
        self._start_at(0)

    def _intervals(self, calls: int) -> int:
        return intervals_for(self._solver, int(calls), self._solver_name)

    def _shifting(self, mu: float | None) -> dict:
        cfg = self.config
        return dict(shift=self._shift, mu=mu if cfg.use_dynamic_shifting else None, time_shift_type=cfg.time_shift_type,
                    dynamic_shifting=cfg.use_dynamic_shifting, shift_terminal=cfg.shift_terminal,
                    num_train_timesteps=cfg.num_train_timesteps)

    def _flow_time_of(self, t: np.ndarray) -> np.ndarray:
        """VP timestep (float OK) → flow time s, piecewise linear between training timesteps."""
        return np.interp(t, np.arange(self.config.num_train_timesteps), self._flow_time)

    def _timestep_of(self, s: np.ndarray) -> np.ndarray:
        return np.interp(s, self._flow_time, np.arange(self.config.num_train_timesteps))

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the pipeline enters (img2img: `t_start * order`). Re-plans here, so that a solver that cannot start
        mid-schedule fails before the denoising loop."""
        fresh = self._offset == begin_index and self._step_index is None  # set_timesteps already started there
        if self._plan is not None and not fresh:
            self._start_at(begin_index)
        self._begin_index = begin_index

    def _start_at(self, k: int) -> None:
        plan = self._plan if k == 0 else self._entry_plan(k)
        self._run = PlanRun(_epsilon_plan(plan) if self._epsilon else plan)
        self._offset = k

    def _entry_plan(self, k: int) -> Plan:
        """The flow plan from call k on, for a sample at σ_k with no history: the solver re-planned on the grid nodes
        left.

        Its calls must be exactly the remaining timesteps, because the pipeline evaluates the model there. A Heun
        entry between its two stages (the stage σ equals the next node) gets the re-planned Heun after one call
        that only re-synchronises (as FlowMatchHeun, whose first step there has dt = 0). A solver whose re-planned
        calls differ (a searched NeuralSolver grid, startup="rk", compat="official") cannot enter here: ValueError.
        """
        if not 0 < k < len(self.timesteps):
            raise ValueError(f"begin index {k} is outside the {len(self.timesteps)} timesteps")
        rest = self._plan.sigmas[k:]
        nodes = self._grid[self._grid < rest[0] - ENTRY_TOLERANCE]
        if len(nodes) == 0:  # entered at the end σ (Heun's last stage): the sample is already there
            return Plan(rest, self._plan.sigma_end, tuple(Row({i: 1.0}) for i in range(len(rest))))
        try:
            plan = grid_plan(self._solver, np.r_[rest[0], nodes])
        except ValueError:
            plan = None
        if plan is not None and plan.calls == len(rest) and np.allclose(plan.sigmas, rest, rtol=0,
                                                                         atol=ENTRY_TOLERANCE):
            return plan
        if plan is not None and plan.calls == len(rest) - 1 and np.allclose(plan.sigmas, rest[1:], rtol=0,
                                                                             atol=ENTRY_TOLERANCE):
            return _restarted(plan)
        raise ValueError(f"{self._solver_name} cannot start at timestep index {k} of {len(self.timesteps)} "
                         f"(sigma {rest[0]:.4g}): re-planned on the remaining grid it does not make the remaining "
                         f"{len(rest)} model calls. img2img/inpaint (strength < 1) needs a solver that restarts on any "
                         f"grid, e.g. euler, adams2 or stork-2; a searched neuralsolver runs only its full grid.")

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if schedule_timesteps is None:
            raise ValueError("call set_timesteps before stepping")
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of this scheduler's timesteps; use the values in "
                             "`scheduler.timesteps` (or set_begin_index)")
        return int(indices[1 if len(indices) > 1 else 0].item())  # FlowMatchEuler's rule: the second occurrence

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            k = self.index_for_timestep(timestep)
            if k > 0:  # mid-schedule entry without set_begin_index (FluxControl, ControlNet, SD3 t2i)
                self._start_at(k)
            self._step_index = k
        else:
            self._step_index = self._begin_index

    def _noised(self, clean: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The state at flow time s (one value per batch element, or one for all): (1−s)·x0 + s·ε, which in VP
        coordinates is α·x0 + σ·ε = that divided by k(s)."""
        work = torch.float64 if clean.dtype == torch.float64 else torch.float32
        s = s.to(clean.device, work).reshape(-1, *[1] * (clean.ndim - 1))
        x = s * noise + (1.0 - s) * clean
        if self._epsilon:
            x = x / torch.sqrt((1.0 - s) ** 2 + s ** 2)
        return x.to(clean.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process at the scheduler's current σ (img2img before the first step, inpaint after each)."""
        if self._begin_index is None:
            timestep = torch.atleast_1d(torch.as_tensor(timestep)).to(self.timesteps.device)
            indices = [self.index_for_timestep(t) for t in timestep]
        else:
            indices = [self._begin_index if self._step_index is None else self._step_index]
        return self._noised(sample, noise, self.sigmas[indices])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process at arbitrary timesteps (flow: σ = t/num_train_timesteps; epsilon: VP indices)."""
        t = torch.atleast_1d(torch.as_tensor(timesteps)).double().cpu().numpy()
        s = self._flow_time_of(t) if self._epsilon else t / self.config.num_train_timesteps
        return self._noised(original_samples, noise, torch.from_numpy(s))

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True
             ) -> FewstepSchedulerOutput | tuple[torch.Tensor]:
        """One model call. Integrates from `sample` (a callback may have replaced it) in float32 (float64 for float64
        tensors) and returns `model_output`'s dtype. bf16/fp16 inputs are kept as they are (upcasting them is exact)
        and read into float32 by the combination itself (`fewstep.solvers.plan.combine`), so no copies are made."""
        if self._step_index is None:
            if self._run is None:
                raise ValueError("call set_timesteps before step")
            self._init_step_index(timestep)
        i = self._step_index - self._offset
        if i >= self._run.plan.calls:
            raise ValueError(f"step called {self._step_index + 1} times but there are {len(self.timesteps)} "
                             "timesteps; call set_timesteps again for a new run")
        prev = self._run.advance(i, sample, model_output, model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FewstepSchedulerOutput(prev_sample=prev)


def _named(init):
    """register_to_config for a named scheduler whose __init__ takes its solver's options and passes every
    FewstepScheduler schedule key through **schedule. diffusers reads config keys from the signature (and refuses
    **kwargs there), so the signature shown is the explicit one: own options + FewstepScheduler's keys."""
    base = inspect.signature(FewstepScheduler.__init__.__wrapped__).parameters
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
    keys = [p for name, p in base.items() if name not in ("self", "solver", "solver_options")]
    init.__signature__ = inspect.Signature(own + keys)
    return register_to_config(init)


def _options(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


class StorkScheduler(FewstepScheduler):
    """STORK as a diffusers scheduler; `order` 2|4 and the STORK options, as in the STORK docs' scheduler_kwargs."""

    @_named
    def __init__(self, order: int = 4, stages: int | None = None, derivative_order: int | None = None,
                 compat: str | None = None, extrapolate: str | None = None, **schedule):
        if order not in (2, 4):
            raise ValueError(f"STORK order must be 2 or 4, got {order!r}")
        options = _options(stages=stages, derivative_order=derivative_order, compat=compat, extrapolate=extrapolate)
        FewstepScheduler.__init__.__wrapped__(self, solver=f"stork-{order}", solver_options=options, **schedule)


class AdamsScheduler(FewstepScheduler):
    """Variable-step Adams–Bashforth (`order` 2|3|4) as a diffusers scheduler."""

    @_named
    def __init__(self, order: int = 2, startup: str | None = None, **schedule):
        if order not in (2, 3, 4):
            raise ValueError(f"Adams order must be 2, 3 or 4, got {order!r}")
        FewstepScheduler.__init__.__wrapped__(self, solver=f"adams{order}", solver_options=_options(startup=startup),
                                              **schedule)


class NeuralSolverScheduler(FewstepScheduler):
    """A searched NeuralSolver (`solver_file`: sit, flowdcn, dit, or a path to a JSON file) as a diffusers scheduler;
    `dit` is the ε-prediction one (use it with prediction_type="epsilon")."""

    @_named
    def __init__(self, solver_file: str = "sit", **schedule):
        FewstepScheduler.__init__.__wrapped__(self, solver="neuralsolver", solver_options={"solver_file": solver_file},
                                              **schedule)
