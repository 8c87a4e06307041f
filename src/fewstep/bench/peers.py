"""diffusers' own schedulers as the bench's peers, each stepping on the bench grid in the plain pipeline loop.

FlowMatchEuler takes the grid as a pipeline passes it (`set_timesteps(sigmas=..., mu=...)`). The others cannot take
custom sigmas in diffusers 0.42 (DPM++, DEIS, FlowMatchHeun) or would rebuild them in float64 with their own guard
(UniPC): after their own `set_timesteps(N)` their `sigmas` / `timesteps` are replaced by the bench grid, so every
method steps through exactly the same σ values; the update formulas are diffusers' own, untouched. The model is
evaluated at the σ of the scheduler's own `sigmas` at each step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fewstep.solvers.plan import StepCountError

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
PEERS: dict[str, tuple[str, dict]] = {  # label → (diffusers class, constructor options)
    "FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", {}),
    "FlowMatchHeun": ("FlowMatchHeunDiscreteScheduler", {}),
    "UniPC-2": ("UniPCMultistepScheduler", dict(FLOW, solver_order=2, solver_type="bh2")),
    "UniPC-3": ("UniPCMultistepScheduler", dict(FLOW, solver_order=3, solver_type="bh2")),
    "DPM++2M": ("DPMSolverMultistepScheduler", dict(FLOW, solver_order=2, algorithm_type="dpmsolver++")),
    "DEIS": ("DEISMultistepScheduler", dict(FLOW, solver_order=2)),
}
START = 1 - 1e-6  # UniPC's own guard against log(α = 0) at σ = 1, applied to the exponential integrators alike
DEIS_END = 1e-6  # DEIS's update divides by σ = 0 on the last step (NaN): it stops at σ = 1e-6 instead
NOTES = (
    "peers: diffusers' own scheduler classes (FlowMatchEuler, FlowMatchHeun, UniPC bh2 order 2 and 3, DPM++2M, "
    "DEIS order 2; flow sigmas / flow_prediction) stepping on the bench grid: FlowMatchEuler gets it through "
    "`set_timesteps(sigmas=, mu=)`, the others get their `sigmas`/`timesteps` replaced by it after `set_timesteps(N)` "
    "(none of them accepts this grid itself); the update formulas are diffusers' own",
    f"UniPC, DPM++ and DEIS start at σ = 1 − 1e-6 (UniPC's own guard against log 0); DEIS ends at σ = {DEIS_END:g} "
    "instead of 0, where its update divides by σ = 0 (its own flow grid drops σ = 0 altogether and stops at the "
    "last nonzero σ, which leaves visible noise)",
    "every peer steps in float64 (its sigmas, the state and the model output): from σ = 1 − 1e-6, DEIS's first "
    "update multiplies the state by α_t/α_s ≈ 10⁵ and subtracts a nearly equal term, and in float32 that rounding "
    "moved DEIS's RMSE by 10–25 % (digits-cfg3 shift 1 at 4 / 6 / 8 NFE: 0.186 / 0.112 / 0.078 in float32, 0.212 / "
    "0.133 / 0.098 in float64, which is what the same update gives from σ = 1 − 1e-4 in float32); UniPC and DPM++ "
    "move by < 1e-5",
    "FlowMatchHeun: n steps make 2n − 1 model calls (the last step is a single Euler step), so it has cells at odd "
    "NFE only; fewstep heun at even NFE only")


def is_peer(name: str) -> bool:
    return name in PEERS


def peer_steps(name: str, nfe: int) -> int:
    """The scheduler steps that make exactly `nfe` model calls (a StepCountError where none does)."""
    if PEERS[name][0] != "FlowMatchHeunDiscreteScheduler":
        return nfe
    if nfe % 2 == 0:
        raise StepCountError(f"{name} cannot make exactly {nfe} model calls; it makes odd numbers only")
    return (nfe + 1) // 2


def peer_scheduler(name: str, grid) -> object:
    """diffusers' scheduler `name`, its steps set to the σ values `grid` (N + 1 values ending in 0)."""
    import diffusers

    cls_name, options = PEERS[name]
    cls = getattr(diffusers, cls_name)
    sigmas = np.asarray(grid, dtype=np.float64)
    steps = len(sigmas) - 1
    if cls_name == "FlowMatchEulerDiscreteScheduler":
        sched = cls()
        sched.set_timesteps(sigmas=sigmas[:-1])  # already shifted: this scheduler's shift is 1
        return sched
    if cls_name == "FlowMatchHeunDiscreteScheduler":
        sched = cls()
        sched.set_timesteps(steps)
        s = torch.tensor(sigmas, dtype=torch.float32)
        sched.timesteps = torch.cat([s[:1], s[1:-1].repeat_interleave(2)]) * sched.config.num_train_timesteps
        sched.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        return sched
    sched = cls(**options)
    sched.set_timesteps(steps)
    sigmas = sigmas.copy()
    sigmas[0] = min(sigmas[0], START)
    if cls_name == "DEISMultistepScheduler":
        sigmas[-1] = DEIS_END
    sched.sigmas = torch.tensor(sigmas, dtype=torch.float64)  # see NOTES: float32 rounding at σ ≈ 1 moves DEIS
    sched.timesteps = sched.sigmas[:-1] * sched.config.num_train_timesteps
    return sched


def run_peer(name: str, velocity: Callable, noise: torch.Tensor, grid) -> torch.Tensor:
    """Sample with peer `name` on the σ values `grid`: the pipeline loop, one model call per timestep."""
    sched = peer_scheduler(name, grid)
    x = noise.to(torch.float64)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocity(x, float(sched.sigmas[i])).to(torch.float64), t, x).prev_sample
    return x


def peer_method(name: str, velocity: Callable, noise: torch.Tensor, grid_for: Callable[[int], np.ndarray]):
    """nfe → samples of peer `name`, on `grid_for(steps)`."""

    def method(nfe: int) -> torch.Tensor:
        steps = peer_steps(name, nfe)
        return run_peer(name, velocity, noise, grid_for(steps))

    return method
