"""`fewstep.sample`: run any solver on any callable model.

Flow models (`prediction="flow"`) are called as `model(x, sigma)` and return v = ε − x0 = dx/dσ, with
x_σ = (1−σ)·x0 + σ·ε; sampling goes from σ = 1 (the given noise) to σ = 0.

ε-prediction models (`prediction="epsilon"`) are called as `model(x, t)` with the VP time t of `vp`
(x_t = α_t·x0 + σ_t·ε) and return ε. They run through the same solvers in flow coordinates
s = σ_t/(α_t+σ_t), x̃ = x/(α_t+σ_t), where dx̃/ds = ε − x0; Euler there is DDIM(η=0). The plan is rewritten on
(x, ε) once (`fewstep.entry.epsilon_plan`), so the model sees x and returns ε as it is.

`begin_index` starts a run mid-schedule (img2img) exactly as the diffusers adapter does (`fewstep.entry.enter`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fewstep import solvers
from fewstep.entry import enter, epsilon_plan
from fewstep.errors import InvalidInput, NonFiniteError
from fewstep.schedules import VPSchedule, check_shift_arguments, flow_sigmas
from fewstep.solvers.neuralsolver import NeuralSolver
from fewstep.solvers.plan import Plan, PlanRun, Solver, grid_plan, intervals_for
from fewstep.solvers.registry import RECOMMENDED


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


def _is_real_float(v: Any) -> bool:
    if _is_numpy(v):
        return np.issubdtype(v.dtype, np.floating)
    return bool(getattr(v, "is_floating_point", lambda: False)()) and not getattr(v, "is_complex", lambda: False)()


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
    elif not (callable(getattr(solver, "plan", None)) and callable(getattr(solver, "calls", None))):
        raise InvalidInput(f"solver must be a solver name (`fewstep solvers` lists them) or an object with calls() "
                           f"and plan(), got {solver!r}")
    elif options:
        raise InvalidInput(f"solver options {sorted(options)} only apply to a solver given by name")
    else:
        obj, name = solver, type(solver).__name__
    made_for = getattr(obj, "prediction", prediction)
    if made_for != prediction:
        raise InvalidInput(f"{name} was made for prediction={made_for!r} models, not prediction={prediction!r}")
    return obj, name


def _flow_run(solver: str | Solver, steps: int | None, shift: float, mu: float | None, sigmas: Sequence[float] | None,
              time_shift_type: str, begin_index: int, solver_options: dict, warn: bool = False) -> Plan:
    """The plan of a flow run; with `warn`, a GridMismatchWarning when a searched solver file runs on another shift /
    μ than it was searched on: its own grid is used, so the requested one has no effect (as `fewstep generate` and the
    diffusers scheduler warn)."""
    obj, name = resolve_solver(solver, solver_options)
    check_shift_arguments(shift, mu)
    if sigmas is None:
        grid = flow_sigmas(intervals_for(obj, 8 if steps is None else steps, name), shift, mu,
                           time_shift_type=time_shift_type)
    else:
        grid = flow_sigmas(sigmas=sigmas, shift=shift, mu=mu, time_shift_type=time_shift_type)
    plan = grid_plan(obj, grid)
    if steps is not None and plan.calls != steps:
        raise InvalidInput(f"{name} makes {plan.calls} model calls on the given sigmas, but steps={steps}")
    if isinstance(obj, NeuralSolver):
        if grid[0] < 1.0:
            # the file's searched grid runs from σ = 1 whatever the caller's grid says: an input at a lower σ (img2img
            # by hand) would be taken for pure noise
            raise InvalidInput(f"{name} samples on its file's own searched grid from sigma = 1; the given sigmas start "
                               f"at {grid[0]:.6g} (only their count is used, so they must start at 1)")
        from fewstep.search import GridMismatchWarning, grid_mismatch

        text = grid_mismatch(obj.file, shift, mu) if warn else None
        if text:
            warnings.warn(text, GridMismatchWarning, stacklevel=3)
    return enter(obj, grid, plan, begin_index, name)


def make_plan(solver: str | Solver = RECOMMENDED, steps: int | None = None, *, shift: float = 1.0,
              mu: float | None = None, sigmas: Sequence[float] | None = None, time_shift_type: str = "exponential",
              begin_index: int = 0, **solver_options) -> Plan:
    """The flow-matching plan `sample` would run (grid of diffusers' FlowMatchEulerDiscreteScheduler). With
    `begin_index` k: the plan from call k of that run on (img2img; `fewstep.entry.enter`), whose first σ is where the
    input must be noised to."""
    return _flow_run(solver, steps, shift, mu, sigmas, time_shift_type, begin_index, solver_options)


def sample(model: Callable[[Any, float], Any], noise: Any, solver: str | Solver = RECOMMENDED, steps: int | None = None,
           *, shift: float = 1.0, mu: float | None = None, sigmas: Sequence[float] | None = None,
           prediction: str = "flow", time_shift_type: str = "exponential", vp: VPSchedule | None = None,
           timesteps: Sequence[float] | None = None, begin_index: int = 0,
           callback: Callable[[int, float, Any, Any], None] | None = None, progress: bool = False,
           check_finite: bool = True, **solver_options) -> Any:
    """Integrate from `noise` to a sample with `steps` model calls (NFE; default 8).

    `sigmas`: a custom σ grid, treated like diffusers' FlowMatchEuler `sigmas` (shifted; 0 appended unless it
    already ends in 0). `mu`: resolution-dependent (dynamic) shift. For ε-models, `timesteps` is a custom
    decreasing VP-time grid (default: uniform from 0.999 to 1e−3). `begin_index` k (img2img, as diffusers'
    `set_begin_index`): `noise` is the sample at the noise level of call k of the `steps`-call run (flow: σ =
    `make_plan(..., begin_index=k).sigmas[0]`) and only the remaining calls are made; a solver that cannot restart
    there (a searched NeuralSolver, startup="rk", compat="official") raises `InvalidInput` before the first call
    (`fewstep.entry`).
    `callback(i, time, x_i, output_i)` is called after every model call with what the model saw and returned (flow:
    σ, x, v; ε: the VP time t, x, ε). Works on torch tensors (any floating dtype/device; math in float32 or better,
    result in the input dtype) and NumPy arrays.
    """
    _check_state(noise)
    if check_finite and not _all_finite(noise):
        raise InvalidInput("noise contains NaN or infinite values")
    if prediction == "flow":
        if timesteps is not None or vp is not None:
            raise InvalidInput("`timesteps` and `vp` apply to prediction='epsilon'; flow models take `sigmas`")
        plan = _flow_run(solver, steps, shift, mu, sigmas, time_shift_type, begin_index, solver_options, warn=True)
        return execute(plan, model, noise, callback=callback, progress=progress, check_finite=check_finite,
                       desc=solver if isinstance(solver, str) else None)
    if prediction != "epsilon":
        raise InvalidInput(f"prediction must be 'flow' or 'epsilon', got {prediction!r}")
    if sigmas is not None or mu is not None or shift != 1.0:
        raise InvalidInput("prediction='epsilon' uses a VP time grid: pass `timesteps` (and `vp`), not sigmas/mu/shift")
    vp = vp or VPSchedule()
    obj, name = resolve_solver(solver, solver_options, "epsilon")
    if timesteps is None:
        times = vp.times(intervals_for(obj, 8 if steps is None else steps, name))
    else:
        try:
            times = np.asarray(timesteps, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInput(f"timesteps must be a list of numbers, got {timesteps!r}") from None
        # Times below vp.t_clamp are the data end (the official DDIM grid ends at 0.999 − 1): only the top is checked.
        if times.ndim != 1 or len(times) < 2 or not np.isfinite(times).all() or times.max() > 1 \
                or np.any(np.diff(times) >= 0):
            raise InvalidInput(f"timesteps must be at least two strictly decreasing VP times of at most 1 (continuous "
                               f"time, not diffusers' 0-999 indices), got {np.asarray(timesteps).tolist()}")
    grid = vp.to_flow(times)
    plan = grid_plan(obj, grid)
    if steps is not None and plan.calls != steps:
        raise InvalidInput(f"{name} makes {plan.calls} model calls on the given timesteps, but steps={steps}")
    # The flow plan in s, entered at k, rewritten on (x, ε) (fewstep.entry): the model sees x and returns ε as it is.
    plan = epsilon_plan(enter(obj, grid, plan, begin_index, name))
    # The model sees the VP times of the grid as given (a round trip through s would move them by ulps, and a model
    # that looks up int(t·1000) would see another timestep); nodes off the grid (a searched file's own) are converted.
    given = dict(zip(grid.tolist(), times.tolist(), strict=True))
    model_times = [given.get(s, t) for s, t in zip(plan.sigmas.tolist(), vp.from_flow(plan.sigmas).tolist(),
                                                   strict=True)]
    return execute(plan, model, noise, times=model_times, callback=callback, progress=progress,
                   check_finite=check_finite, desc=name)


def _check_state(x: Any) -> None:
    """The starting state must be a floating-point torch tensor or NumPy array (integer maths rounds every step)."""
    if _is_numpy(x):
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidInput(f"noise must be a floating-point array, got dtype {x.dtype} (use e.g. "
                               "noise.astype(np.float32))")
        return
    if not hasattr(x, "dtype") or not hasattr(x, "is_floating_point"):
        raise InvalidInput(f"noise must be a torch tensor or a NumPy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidInput(f"noise must be a floating-point tensor, got dtype {x.dtype} (use e.g. noise.float())")


def execute(plan: Plan, model: Callable[[Any, float], Any], x: Any, *, times: Sequence[float] | None = None,
            callback: Callable[[int, float, Any, Any], None] | None = None, progress: bool = False,
            check_finite: bool = True, desc: str | None = None) -> Any:
    """Run `plan` from state `x`: call i is `model(x_i, times[i])` (default: the plan's σ's). The model sees x in its
    input dtype and must return an output of x's shape; the solver keeps float32 or better."""
    from tqdm.auto import tqdm

    _check_state(x)
    in_dtype = x.dtype
    work = _compute_dtype(x)
    x = _cast(x, work)
    shape = tuple(x.shape)
    times = plan.sigmas if times is None else times
    run = PlanRun(plan)
    for i in tqdm(range(plan.calls), desc=desc, unit="call", disable=not progress, leave=False):
        t = float(times[i])
        out = model(_cast(x, in_dtype), t)
        if isinstance(out, np.generic) and _is_numpy(x):  # NumPy arithmetic on a 0-D array returns a scalar
            out = np.asarray(out)
        where = f"at call {i + 1} of {plan.calls} ({'sigma' if times is plan.sigmas else 't'}={t:.6g})"
        if getattr(out, "shape", None) is None or tuple(out.shape) != shape:
            got = f"shape {tuple(out.shape)}" if getattr(out, "shape", None) is not None else type(out).__name__
            raise InvalidInput(f"model output {where} has {got}; it must have the shape of its input x, {shape}")
        if _is_numpy(out) != _is_numpy(x) or not _is_real_float(out):
            got = f"{type(out).__name__} of dtype {out.dtype}" if hasattr(out, "dtype") else type(out).__name__
            raise InvalidInput(f"model output {where} is a {got}; it must be a real floating-point "
                               f"{'NumPy array' if _is_numpy(x) else 'torch tensor'}, as its input x")
        if check_finite and not _all_finite(out):
            raise NonFiniteError(f"model output is not finite {where}")
        out = _cast(out, work)
        if callback is not None:
            callback(i, t, x, out)
        x = run.advance(i, x, out)
    return _cast(x, in_dtype)
