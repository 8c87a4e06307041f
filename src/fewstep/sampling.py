"""`fewstep.sample`: run any solver on any callable model.

Flow models (`prediction="flow"`) are called as `model(x, sigma)` and return v = ε − x0 = dx/dσ, with
x_σ = (1−σ)·x0 + σ·ε; sampling goes from σ = 1 (the given noise) to σ = 0.

ε-prediction models (`prediction="epsilon"`) are called as `model(x, t)` with the VP time t of `vp`
(x_t = α_t·x0 + σ_t·ε) and return ε. They run through the same solvers in flow coordinates
s = σ_t/(α_t+σ_t), x̃ = x/(α_t+σ_t), where dx̃/ds = ε − x0 (DIFFUSERS.md §6); Euler there is DDIM(η=0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fewstep import solvers
from fewstep.errors import NonFiniteError
from fewstep.schedules import VPSchedule, flow_sigmas
from fewstep.solvers.plan import Plan, PlanRun, Solver, grid_plan, intervals_for


def _is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def _compute_dtype(x: Any) -> Any:
    """float32 math at least; float64 stays float64 (bf16/fp16 latents are upcast)."""
    if _is_numpy(x):
        return np.float64 if x.dtype == np.float64 else np.float32
    import torch

    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cast(x: Any, dtype: Any) -> Any:
    return x.astype(dtype, copy=False) if _is_numpy(x) else x.to(dtype)


def _all_finite(v: Any) -> bool:
    if _is_numpy(v):
        return bool(np.isfinite(v).all())
    import torch

    return bool(torch.isfinite(v).all())


def resolve_solver(solver: str | Solver, options: dict, prediction: str = "flow") -> tuple[Solver, str]:
    """The solver object and a name for messages; a solver built for one prediction type (a searched NeuralSolver
    file) refuses the other."""
    if isinstance(solver, str):
        obj, name = solvers.get(solver, **options), solver
    elif options:
        raise ValueError(f"solver options {sorted(options)} only apply to a solver given by name")
    else:
        obj, name = solver, type(solver).__name__
    made_for = getattr(obj, "prediction", prediction)
    if made_for != prediction:
        raise ValueError(f"{name} was made for prediction={made_for!r} models, not prediction={prediction!r}")
    return obj, name


def make_plan(solver: str | Solver = "adams2", steps: int | None = None, *, shift: float = 1.0,
              mu: float | None = None, sigmas: Sequence[float] | None = None, time_shift_type: str = "exponential",
              **solver_options) -> Plan:
    """The flow-matching plan `sample` would run (grid of diffusers' FlowMatchEulerDiscreteScheduler)."""
    obj, name = resolve_solver(solver, solver_options)
    if sigmas is None:
        grid = flow_sigmas(intervals_for(obj, 8 if steps is None else steps, name), shift, mu,
                           time_shift_type=time_shift_type)
    else:
        grid = flow_sigmas(sigmas=sigmas, shift=shift, mu=mu, time_shift_type=time_shift_type)
    plan = grid_plan(obj, grid)
    if steps is not None and plan.calls != steps:
        raise ValueError(f"{name} makes {plan.calls} model calls on the given sigmas, but steps={steps}")
    return plan


def sample(model: Callable[[Any, float], Any], noise: Any, solver: str | Solver = "adams2", steps: int | None = None,
           *, shift: float = 1.0, mu: float | None = None, sigmas: Sequence[float] | None = None,
           prediction: str = "flow", time_shift_type: str = "exponential", vp: VPSchedule | None = None,
           timesteps: Sequence[float] | None = None, callback: Callable[[int, float, Any, Any], None] | None = None,
           progress: bool = False, check_finite: bool = True, **solver_options) -> Any:
    """Integrate from `noise` to a sample with `steps` model calls (NFE; default 8).

    `sigmas`: a custom σ grid, treated like diffusers' FlowMatchEuler `sigmas` (shifted; 0 appended unless it
    already ends in 0). `mu`: resolution-dependent (dynamic) shift. For ε-models, `timesteps` is a custom
    decreasing VP-time grid (default: uniform from 0.999 to 1e−3). `callback(i, sigma, x_i, output_i)` is
    called after every model call. Works on torch tensors (any dtype/device; math in float32 or better, result
    in the input dtype) and NumPy arrays.
    """
    if prediction == "flow":
        if timesteps is not None or vp is not None:
            raise ValueError("`timesteps` and `vp` apply to prediction='epsilon'; flow models take `sigmas`")
        plan = make_plan(solver, steps, shift=shift, mu=mu, sigmas=sigmas, time_shift_type=time_shift_type,
                         **solver_options)
        return execute(plan, model, noise, callback=callback, progress=progress, check_finite=check_finite,
                       desc=solver if isinstance(solver, str) else None)
    if prediction != "epsilon":
        raise ValueError(f"prediction must be 'flow' or 'epsilon', got {prediction!r}")
    if sigmas is not None or mu is not None or shift != 1.0:
        raise ValueError("prediction='epsilon' uses a VP time grid: pass `timesteps` (and `vp`), not sigmas/mu/shift")
    vp = vp or VPSchedule()
    obj, name = resolve_solver(solver, solver_options, "epsilon")
    times = np.asarray(vp.times(intervals_for(obj, 8 if steps is None else steps, name)) if timesteps is None
                       else timesteps, dtype=np.float64)
    plan = grid_plan(obj, vp.to_flow(times))
    if steps is not None and plan.calls != steps:
        raise ValueError(f"{name} makes {plan.calls} model calls on the given timesteps, but steps={steps}")

    def scale(s: float) -> float:  # α_t + σ_t at the VP time of flow time s
        alpha, sigma = vp.alpha_sigma(vp.from_flow(s))
        return float(alpha + sigma)

    def flow_velocity(x_flow: Any, s: float) -> Any:
        t = float(vp.from_flow(s))
        alpha, sigma = (float(a) for a in vp.alpha_sigma(t))
        x = x_flow * (alpha + sigma)
        eps = model(x, t)
        x0 = (x - sigma * eps) / alpha
        return eps - x0

    x_flow = execute(plan, flow_velocity, noise / scale(float(plan.sigmas[0])), callback=callback, progress=progress,
                     check_finite=check_finite, desc=name)
    return x_flow * scale(plan.sigma_end)


def execute(plan: Plan, model: Callable[[Any, float], Any], x: Any, *,
            callback: Callable[[int, float, Any, Any], None] | None = None, progress: bool = False,
            check_finite: bool = True, desc: str | None = None) -> Any:
    """Run `plan` from state `x` (the model sees x in its input dtype; the solver keeps float32 or better)."""
    from tqdm.auto import tqdm

    in_dtype = x.dtype
    work = _compute_dtype(x)
    x = _cast(x, work)
    run = PlanRun(plan)
    for i in tqdm(range(plan.calls), desc=desc, unit="call", disable=not progress, leave=False):
        sigma = float(plan.sigmas[i])
        out = model(_cast(x, in_dtype), sigma)
        if check_finite and not _all_finite(out):
            raise NonFiniteError(f"model output is not finite at call {i + 1} of {plan.calls} (sigma={sigma:.6g})")
        out = _cast(out, work)
        if callback is not None:
            callback(i, sigma, x, out)
        x = run.advance(i, x, out)
    return _cast(x, in_dtype)
