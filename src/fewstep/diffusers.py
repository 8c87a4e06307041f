"""diffusers scheduler adapter: any registered fewstep solver as a drop-in flow-matching scheduler (flow prediction).

One `step()` = one model call; `len(timesteps)` = NFE for every solver (see DIFFUSERS.md §3-§5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from fewstep import solvers
from fewstep.schedules import flow_sigmas, resample_grid
from fewstep.solvers.plan import PlanRun, grid_plan, intervals_for


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, solver: str = "adams2", solver_options: dict | None = None, num_train_timesteps: int = 1000,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 invert_sigmas: bool = False, prediction_type: str = "flow_prediction"):
        if prediction_type != "flow_prediction":
            raise ValueError(f"prediction_type {prediction_type!r} is not supported yet (only flow_prediction)")
        self._solver = solvers.get(solver, **(solver_options or {}))  # raises ValueError on unknown name/option
        self._solver_name = solver
        self._shift = shift
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._run = None

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None) -> None:
        cfg = self.config
        if timesteps is not None and sigmas is None:
            sigmas = np.asarray(timesteps, dtype=np.float64) / cfg.num_train_timesteps
        if sigmas is not None:
            num_inference_steps = len(sigmas)
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting=True needs `mu` in set_timesteps")
        grid = flow_sigmas(None if sigmas is not None else num_inference_steps, shift=self._shift,
                           mu=mu if cfg.use_dynamic_shifting else None, time_shift_type=cfg.time_shift_type,
                           dynamic_shifting=cfg.use_dynamic_shifting,
                           sigmas=None if sigmas is None else [float(s) for s in sigmas],
                           shift_terminal=cfg.shift_terminal, num_train_timesteps=cfg.num_train_timesteps)
        n = intervals_for(self._solver, int(num_inference_steps), self._solver_name)
        if n != len(grid) - 1:  # e.g. Heun: 2 calls per interval, so NFE == steps needs fewer intervals
            grid = resample_grid(grid, n)
        self._grid = np.asarray(grid, dtype=np.float64)
        self._set_plan(grid_plan(self._solver, self._grid))
        self.timesteps = torch.from_numpy(self._plan.sigmas * cfg.num_train_timesteps).to(torch.float32).to(device)
        self.sigmas = torch.from_numpy(np.r_[self._plan.sigmas, self._grid[-1]]).to(torch.float32)
        self.num_inference_steps = int(num_inference_steps)
        self._step_index = None
        self._begin_index = None

    def _set_plan(self, plan) -> None:
        self._plan = plan
        self._run = PlanRun(plan)
        self._offset = 0  # index of the plan's first call within self.timesteps

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        pos = 1 if len(indices) > 1 else 0  # FlowMatchEuler's rule: the second occurrence
        return int(indices[pos].item())

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index
        k = self._step_index
        if k > 0:  # mid-schedule entry (img2img): restart the solver's start-up on the remaining grid
            rest = self._grid[self._grid <= float(self._plan.sigmas[k]) + 1e-12]
            if rest[0] < self._plan.sigmas[k] - 1e-9:
                rest = np.r_[self._plan.sigmas[k], rest]
            m = self._solver.calls(len(rest) - 1)
            want = len(self.timesteps) - k
            if m != want:
                rest = resample_grid(rest, intervals_for(self._solver, want, self._solver_name))
            self._set_plan(grid_plan(self._solver, rest))
            self._offset = k

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        if self._begin_index is not None and self._step_index is None:
            i = self._begin_index
        elif self._step_index is not None:
            i = self._step_index
        else:
            i = self.index_for_timestep(timestep)
        sigma = float(self.sigmas[min(i, len(self.sigmas) - 1)])
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index - self._offset
        x = self._run.advance(i, sample.to(torch.float32), model_output.to(torch.float32))
        self._step_index += 1
        prev = x.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return FewstepSchedulerOutput(prev_sample=prev)


_FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
              "max_image_seq_len", "time_shift_type", "shift_terminal", "invert_sigmas", "prediction_type")


def _named(solver: str, options: dict, flow: dict) -> dict:
    """Arguments of the undecorated FewstepScheduler.__init__ (so the subclass registers only its own config)."""
    return {"solver": solver, "solver_options": {k: v for k, v in options.items() if v is not None},
            **{k: flow[k] for k in _FLOW_KEYS}}


class StorkScheduler(FewstepScheduler):
    """STORK as a diffusers scheduler; `order` 2|4 and the STORK options, as in the STORK docs' scheduler_kwargs."""

    @register_to_config
    def __init__(self, order: int = 4, stages: int | None = None, derivative_order: int | None = None,
                 compat: str | None = None, extrapolate: str | None = None, num_train_timesteps: int = 1000,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 invert_sigmas: bool = False, prediction_type: str = "flow_prediction"):
        if order not in (2, 4):
            raise ValueError(f"STORK order must be 2 or 4, got {order!r}")
        options = {"stages": stages, "derivative_order": derivative_order, "compat": compat, "extrapolate": extrapolate}
        FewstepScheduler.__init__.__wrapped__(self, **_named(f"stork-{order}", options, locals()))


class AdamsScheduler(FewstepScheduler):
    """Variable-step Adams–Bashforth (`order` 2|3|4) as a diffusers scheduler."""

    @register_to_config
    def __init__(self, order: int = 2, startup: str | None = None, num_train_timesteps: int = 1000,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 invert_sigmas: bool = False, prediction_type: str = "flow_prediction"):
        if order not in (2, 3, 4):
            raise ValueError(f"Adams order must be 2, 3 or 4, got {order!r}")
        FewstepScheduler.__init__.__wrapped__(self, **_named(f"adams{order}", {"startup": startup}, locals()))


class NeuralSolverScheduler(FewstepScheduler):
    """A searched NeuralSolver (`solver_file`: sit, flowdcn, or a path to a JSON file) as a diffusers scheduler."""

    @register_to_config
    def __init__(self, solver_file: str = "sit", num_train_timesteps: int = 1000,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 invert_sigmas: bool = False, prediction_type: str = "flow_prediction"):
        FewstepScheduler.__init__.__wrapped__(self, **_named("neuralsolver", {"solver_file": solver_file}, locals()))
