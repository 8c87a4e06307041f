"""Differentiable solver search (docs/search.md, docs/neuralsolver.md §Search): fit a NeuralSolver's time grid and
weights to one flow model `model(x, sigma) -> v` (v = ε − x0, σ from 1 to 0).

Paper parameterisation: Δt = softmax(r), free strictly-lower C with the diagonal implied (rows sum to 1); the paper's
N ≤ 6 order cap (the last two rows use only Q_{i−1}, Q_i) is an option.

One code path for every model (`Target`): a Gaussian mixture, an embedded model, a Python velocity
`module:function` or a diffusers pipeline, as a velocity over a bank of noises in which each sample keeps its own
conditioning (class label, prompt). A teacher bank of accurate trajectories is computed once (exact DOP853, Euler-K
or Heun-K; states stored at `teacher_points + 1` uniform σ, interpolated linearly at the student's σ_i). Robustness
against the few trajectories that switch modes and dominate the RMSE (docs/search.md §Method, measured):

- held-out validation noises, never used for gradients; the parameters kept are those with the lowest validation
  RMSE (final sample against the teacher's) seen during the run;
- restarts: Adams-2 and Euler weights on the requested grid and Adams-2 on a 3× more shifted grid explore briefly,
  the one with the lowest validation error continues;
- large minibatches and banks (so each step sees several mode switchers) and the loss that validation measures
  (`final`); the paper's `reweighted` loss and a `robust` per-sample pseudo-Huber loss are options.

Model calls are counted in single samples (a batch of 64 is 64 calls) and recorded in the solver file's provenance:
teacher, training and validation, per process. A search checkpoints to `<out>.ckpt` and resumes from it (Ctrl-C
exits 130 and leaves the checkpoint; the solver file is written only when the whole search is done, atomically).
Under torchrun the teacher chunks and each minibatch are split between the processes and the gradients all-reduced.
`teacher_bank=` / `--teacher-bank DIR` keeps the teacher trajectories in a folder on disk, memory-mapped, instead of
in RAM (written once, reused by later searches of the same bank).

A family search (`search_target([t1, t2, ...])`, `--model gmm8d,digits`) fits ONE solver (one σ grid, one set of
weights) to several models at once: every iteration draws a minibatch from each member's own bank (states of
different members are never mixed, so their dimensions may differ), and the loss and the validation error are the
means over the members of each member's own, divided by what the search's start solver (the requested init on the
requested grid) scores on that member's validation noises, so that no member dominates by the size of its errors.
A family of one is the plain search, bit for bit.

Also the `fewstep search` subcommand (`add_arguments`, `run`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import importlib
import io
import json
import math
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.errors import FewstepError, InputFileError, InvalidInput, NonFiniteError
from fewstep.schedules import check_shift_arguments, shift_problem
from fewstep.solvers.neuralsolver import SolverFile

LOSSES = ("final", "robust", "reweighted", "trajectory")
DEFAULT_LOSS = "final"
DEFAULT_ITERATIONS = 800
DEFAULT_LR = 3e-2
DEFAULT_RESTARTS = 3
TEACHER_KINDS = ("exact", "euler", "heun")
DEFAULT_TEACHER = "exact"
EXACT_RTOL = 1e-9
TEACHER_POINTS = 200
RESTART_SHIFT = 3.0  # the third restart starts on a grid shifted 3× more than the requested one
CHECKPOINT_SECONDS = 30.0
TEACHER_CHUNK = 1024
# A teacher chunk's float64 trajectories are what the solve holds in memory at once: big latents get fewer samples per
# chunk (1 GiB: 4 Flux-size samples at 200 points), so that a bank on disk never has to fit in RAM.
TEACHER_CHUNK_BYTES = 2**30
BANK_FORMAT = "fewstep teacher bank 1"
BANK_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16}


# ----------------------------------------------------------------------------------------------------------- targets

@dataclass
class Target:
    """What a search runs on. `velocity(x, sigma, index)`: v for the bank samples `index` (LongTensor, one per row of
    x), so that each noise keeps its own conditioning; `shape`: one sample's noise shape; `info`: provenance."""

    name: str
    velocity: Callable[[Any, float, Any], Any]
    shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)
    default_samples: int = 4096
    default_validation: int = 2048
    default_batch: int = 256
    time_h: float = 1e-5  # σ step of the finite-difference time gradient (larger for float32 models)
    default_teacher: str = DEFAULT_TEACHER


def _checked(target: Target) -> Target:
    """`target` whose velocity refuses, in one line naming --model, a call that raises, an output that is not a torch
    tensor or of another shape than its states (InvalidInput) or one holding NaN or Inf (NonFiniteError): caught at
    the first bad call, before a solver (or DOP853, which never finishes on NaN) makes a traceback or a hang of it."""
    import torch

    flag = f"--model {target.info.get('model', target.name)}"
    velocity = target.velocity

    def checked(x: Any, sigma: float, index: Any) -> Any:
        try:
            v = velocity(x, sigma, index)
        except FewstepError:
            raise
        except Exception as err:  # the user's model (or its signature) failed: name it, keep its cause chained
            raise InvalidInput(f"{flag} raised {type(err).__name__}: {err}") from err
        if not isinstance(v, torch.Tensor):  # the solvers need .to(), autograd and torch arithmetic on it
            kind = f"{type(v).__module__}.{type(v).__qualname__}".removeprefix("builtins.")
            raise InvalidInput(f"{flag} returned {kind}, not a torch tensor")
        if tuple(v.shape) != tuple(x.shape):
            raise InvalidInput(f"{flag} returned shape {tuple(v.shape)} for states of shape {tuple(x.shape)}")
        if not bool(torch.isfinite(v.detach()).all()):
            raise NonFiniteError(f"{flag} returned NaN or Inf at sigma {float(sigma):.6g}")
        return v

    return replace(target, velocity=checked)


def plain_target(model: Callable[[Any, float], Any], shape: Sequence[int], name: str = "") -> Target:
    """A model without per-sample conditioning: `model(x, sigma)`."""
    return Target(name or getattr(model, "__qualname__", type(model).__name__), lambda x, s, index: model(x, s),
                  tuple(shape))


def mixture_target(name: str) -> Target:
    from fewstep.testbed import preset

    g = preset(name)
    return Target(name, lambda x, s, index: g.velocity(x, s), (g.dim,), {"model": name})


def embedded_target(name: str, guidance: float | None = None) -> Target:
    """An embedded model (fewstep.models.EMBEDDED) in float64; class labels cycle 0..9 over the bank (sample k has
    label k mod 10), classifier-free guidance `guidance` (default: the model's own default, 1 = none)."""
    import torch

    from fewstep.models import embedded

    mod = embedded(name)
    net = mod.load_embedded(dtype=torch.float64)
    guidance = float(getattr(mod, "DEFAULT_GUIDANCE", 1.0) if guidance is None else guidance)
    classes = int(getattr(mod, "NULL_CLASS", 10))

    def velocity(x: Any, sigma: float, index: Any) -> Any:
        return net.velocity_fn(index % classes, guidance)(x, sigma)

    shape = tuple(getattr(mod, "SHAPE", (mod.DIM,)))
    return Target(name, velocity, shape, {"model": name, "guidance": guidance, "labels": f"index mod {classes}"},
                  default_samples=256, default_validation=128, default_batch=64, default_teacher="exact:1e-7")


def is_velocity_spec(model: str) -> bool:
    """`module:function` (a Python velocity), not a path that happens to contain a colon."""
    return ":" in model and not os.path.exists(model)


def callable_target(spec: str, shape: Sequence[int] | None) -> Target:
    """`module:function`, a Python velocity `f(x, sigma)`; the noise shape from `shape` or `f.noise_shape`. The
    module is looked up in the current folder too, as `python -m fewstep` does (the console script's path lacks it)."""
    from fewstep.errors import InvalidInput

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidInput(f"--model {spec!r}: a Python velocity is written module:function (e.g. mymodel:velocity)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as err:
        raise InvalidInput(f"--model {spec}: cannot import module {module_name!r} ({err})") from None
    except AttributeError:
        raise InvalidInput(f"--model {spec}: module {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise InvalidInput(f"--model {spec}: {attr!r} is not callable (expected f(x, sigma) -> velocity)")
    shape = shape or getattr(obj, "noise_shape", None)
    if not shape:
        raise InvalidInput(f"--model {spec}: give the noise shape of one sample, e.g. --shape 64 or --shape 4,64 "
                           "(or set f.noise_shape)")
    target = plain_target(obj, tuple(int(s) for s in shape), spec)
    target.info = {"model": spec}
    return target


class _Captured(Exception):
    pass


def pipeline_target(pipe: Any, prompts: Sequence[str], guidance: float | None = None, height: int | None = None,
                    width: int | None = None, name: str = "", call_kwargs: dict | None = None) -> Target:
    """A diffusers flow pipeline (Flux-like: its transformer returns v = ε − x0 on packed latents, guidance inside
    the transformer call): the pipeline is run once per prompt up to its first transformer call, whose keyword
    arguments (text embeddings, pooled embeddings, ids, guidance embedding) are recorded; the search then calls the
    transformer itself with bank sample k conditioned on prompt k mod P. Pipelines that apply guidance outside the
    transformer (a doubled CFG batch, two calls per step) are refused."""
    import inspect

    import torch

    from fewstep.errors import InvalidInput

    if not prompts:
        raise InvalidInput("--prompts: no prompts (one per line)")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise InvalidInput(f"pipeline {type(pipe).__name__} has no transformer to search with")
    accepted = inspect.signature(pipe.__call__).parameters
    options = {"num_inference_steps": 1, "output_type": "latent", **(call_kwargs or {})}
    if guidance is not None:
        options["guidance_scale"] = guidance
    for key, value in (("height", height), ("width", width)):
        if value is not None:
            options[key] = value
    options = {k: v for k, v in options.items() if k in accepted}
    if "true_cfg_scale" in accepted and float(options.get("true_cfg_scale", 1.0)) > 1.0:
        raise InvalidInput("true CFG (two transformer calls per step) cannot be searched; use true_cfg_scale 1")
    captured: list[dict] = []

    def hook(module: Any, args: Any, kwargs: dict) -> None:
        captured.append(dict(kwargs))
        raise _Captured

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for prompt in prompts:
            try:
                with torch.no_grad():
                    pipe(prompt=prompt, **options)
            except _Captured:
                pass
            except (ValueError, RuntimeError, TypeError) as err:  # the pipeline's own check_inputs (a size it refuses)
                raise InvalidInput(f"--model {name or type(pipe).__name__}: the pipeline refused the call "
                                   f"({' '.join(str(err).split())[:200]}); check --height/--width and --guidance"
                                   ) from None
            else:
                raise InvalidInput(f"pipeline {type(pipe).__name__} never called its transformer")
    finally:
        handle.remove()
    first = captured[0]
    hidden = first.get("hidden_states")
    if hidden is None or "timestep" not in first:
        raise InvalidInput(f"pipeline {type(pipe).__name__}: its transformer is not called with hidden_states= and "
                           "timestep= (not a supported flow pipeline)")
    if hidden.shape[0] != 1:
        raise InvalidInput(f"pipeline {type(pipe).__name__} doubles the batch for classifier-free guidance; search "
                           "it with guidance 1 or a guidance-distilled model")
    # The first call is at σ = scheduler.sigmas[0]: the timestep the transformer gets is σ times this scale.
    sigma0 = float(pipe.scheduler.sigmas[0])
    scale = float(torch.as_tensor(first["timestep"]).reshape(-1)[0]) / sigma0
    param = next(transformer.parameters())
    per_prompt = []
    for kw in captured:
        per_prompt.append({k: v for k, v in kw.items() if k not in ("hidden_states", "timestep")})
    batched = {k for k, v in per_prompt[0].items() if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1}
    for k in batched:  # rows of different prompts are stacked into one batch: their shapes must agree
        shapes = {tuple(kw[k].shape) for kw in per_prompt}
        if len(shapes) > 1:
            raise InvalidInput(f"--prompts: {type(pipe).__name__} encodes these prompts to different shapes ({k}: "
                               f"{', '.join(str(list(sh)) for sh in sorted(shapes))}, unpadded token lengths); give "
                               "prompts of one token length, or search one prompt")
    if not int(np.prod(hidden.shape[1:])):
        raise InvalidInput(f"--height/--width: the pipeline's latent for this size is empty ({list(hidden.shape)})")
    count = len(prompts)

    def velocity(x: Any, sigma: float, index: Any) -> Any:
        which = (torch.as_tensor(index) % count).tolist()
        kwargs = {}
        for k, v in per_prompt[0].items():
            kwargs[k] = torch.cat([per_prompt[i][k] for i in which]) if k in batched else v
        t = torch.full((len(x),), float(sigma) * scale, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            out = transformer(hidden_states=x.to(param.device, param.dtype), timestep=t, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        return out.to(x.device, x.dtype)

    info = {"model": name or type(pipe).__name__, "pipeline": type(pipe).__name__, "prompts": list(prompts),
            "guidance": guidance, "latent_shape": list(hidden.shape[1:]), "timestep_scale": scale,
            "weights": _folder_fingerprint(name)}
    return Target(name or type(pipe).__name__, velocity, tuple(hidden.shape[1:]), info, default_samples=64,
                  default_validation=16, default_batch=8, time_h=1e-3, default_teacher="heun:50")


def _folder_fingerprint(path: str) -> str | None:
    """A digest of the names, sizes and modification times of the files under a local model folder (None for a hub
    id): a teacher bank on disk records it, so one solved for other weights under the same path is refused."""
    import hashlib

    folder = Path(path) if path else None
    if folder is None or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        st = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_pipeline_target(model: str, prompts: Sequence[str], guidance: float | None = None,
                         height: int | None = None, width: int | None = None) -> Target:
    """`model`: an alias (schnell, dev, qwen, sd3), a local pipeline folder or a hub id in the local Hugging Face cache
    (`fewstep.generate.load_pipeline`: never downloads), in float32 on the best available device."""
    import torch

    from fewstep.generate import load_pipeline

    pipe = load_pipeline(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipeline_target(pipe, prompts, guidance, height, width, name=model)


def resolve_target(model: str, shape: Sequence[int] | None = None, guidance: float | None = None,
                   prompts: Sequence[str] | None = None, height: int | None = None,
                   width: int | None = None) -> Target:
    """`model`: a Gaussian-mixture preset, an embedded model, `module:function`, or (with `prompts`) a diffusers
    pipeline folder or hub id."""
    from fewstep.errors import InvalidInput
    from fewstep.models import EMBEDDED
    from fewstep.testbed import PRESETS

    if prompts is not None and (model in PRESETS or model in EMBEDDED or is_velocity_spec(model)):
        raise InvalidInput(f"--prompts applies to a diffusers pipeline; --model {model} takes no prompts")
    if model in PRESETS:
        if guidance not in (None, 1.0):
            raise InvalidInput(f"--guidance: the mixture {model} has no conditioning to guide")
        return mixture_target(model)
    if model in EMBEDDED:
        return embedded_target(model, guidance)
    if prompts is not None:
        return load_pipeline_target(model, prompts, guidance, height, width)
    if is_velocity_spec(model):
        if guidance not in (None, 1.0):
            raise InvalidInput("--guidance: a module:function velocity applies its own guidance")
        return callable_target(model, shape)
    raise InvalidInput(f"--model {model!r}: not a mixture ({', '.join(PRESETS)}), an embedded model "
                       f"({', '.join(EMBEDDED)}) or module:function; a diffusers pipeline needs --prompts FILE")


# ----------------------------------------------------------------------------------------------------------- teacher

def parse_teacher(spec: str) -> tuple[str, float]:
    """'exact' (DOP853 rtol = atol 1e-9), 'exact:1e-7', 'euler:200', 'heun:100' → (kind, rtol or steps)."""
    kind, _, value = str(spec).partition(":")
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher must be exact[:rtol], euler:STEPS or heun:STEPS, got {spec!r}")
    if kind == "exact":
        tol = float(value) if value else EXACT_RTOL
        if not (np.isfinite(tol) and 0 < tol < 1):
            raise ValueError(f"teacher exact:RTOL needs 0 < RTOL < 1, got {spec!r}")
        return kind, tol
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"teacher {kind}:STEPS needs a positive integer number of steps, got {spec!r}")
    return kind, int(value)


def teacher_bank(model: Callable, noise: Any, teacher: str = "exact", teacher_steps: int = TEACHER_POINTS,
                 calls: list[int] | None = None) -> tuple[Any, Any]:
    """Teacher states at `teacher_steps + 1` uniform σ from 1 to 0: (sigmas (L+1,), states (L+1, B, ...)).

    `teacher`: 'exact' (DOP853 at rtol = atol 1e-9, the whole batch as one system), 'exact:RTOL', 'euler' (Euler
    with `teacher_steps` steps, the official teacher), 'euler:K' / 'heun:K' (K uniform steps; states stored at the
    `teacher_steps + 1` points by linear interpolation in σ). `calls`: a one-element list the model calls (samples ×
    evaluations) are added to."""
    import torch

    counted = [0]

    def f(x: Any, s: float) -> Any:
        counted[0] += len(x)
        return model(x, s)

    sigmas = torch.linspace(1.0, 0.0, teacher_steps + 1, dtype=torch.float64)
    kind, value = ("euler", teacher_steps) if teacher == "euler" else parse_teacher(teacher)
    noise = torch.as_tensor(noise).to(torch.float64)
    if kind == "exact":
        from scipy.integrate import solve_ivp

        shape = tuple(noise.shape)

        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return f(torch.from_numpy(y.reshape(shape)), s).to(torch.float64).numpy().ravel()

        sol = solve_ivp(rhs, (1.0, 0.0), noise.numpy().ravel(), method="DOP853", rtol=value, atol=value,
                        t_eval=sigmas.numpy())
        if not sol.success:
            raise RuntimeError(f"teacher solve failed: {sol.message}")
        states = torch.from_numpy(sol.y.T.reshape((teacher_steps + 1, *shape)).copy())
    else:
        k = int(value)
        grid = torch.linspace(1.0, 0.0, k + 1, dtype=torch.float64)
        path = [noise]
        with torch.no_grad():
            for i in range(k):
                x, h = path[-1], float(grid[i] - grid[i + 1])
                v = f(x, float(grid[i])).to(torch.float64)
                if kind == "heun":
                    v = 0.5 * (v + f(x - h * v, float(grid[i + 1])).to(torch.float64))
                path.append(x - h * v)
        path = torch.stack(path)
        states = path if k == teacher_steps else torch.stack([_interpolate(grid, path, s) for s in sigmas])
    if calls is not None:
        calls[0] += counted[0]
    return sigmas, states


def _interpolate(sigmas: Any, states: Any, sigma: Any) -> Any:
    """Teacher state at σ, linear in σ between bank points (σ uniform from 1 to 0)."""
    import torch

    u = (1.0 - sigma) * (len(sigmas) - 1)
    k = int(torch.clamp(torch.as_tensor(u).detach().floor(), 0, len(sigmas) - 2))
    w = u - k
    return (1 - w) * states[k].to(torch.float64) + w * states[k + 1].to(torch.float64)


class _Picked:
    """Stored teacher states (a tensor, or a memory-mapped array on disk) of the minibatch rows `pick`, read one σ
    point at a time when indexed: `_interpolate` needs only the two points around each σ_i, so a minibatch reads 2N
    slices of (batch, *shape), never the whole trajectories."""

    def __init__(self, states: Any, pick: Any) -> None:
        self.states = states
        self.pick = pick.numpy() if isinstance(states, np.ndarray) else pick

    def __getitem__(self, k: int) -> Any:
        import torch

        return torch.as_tensor(self.states[k][self.pick])


def _with_time_gradient(model: Callable, x: Any, sigma: Any, h: float = 1e-5) -> Any:
    """model(x, σ) with ∂v/∂σ attached by a one-sided finite difference: the model takes σ as a float, but Δt must
    also get its gradient through where the model is evaluated (the paper: "t_i fed to the model"); without it the grid
    drifts the wrong way and the search diverges (measured)."""
    import torch

    s = float(sigma.detach())
    v = model(x, s)
    with torch.no_grad():
        dv = (v - model(x, s - h)) / h
    return v + (sigma - s) * dv


# ------------------------------------------------------------------------------------------------------ parameters

def _initial_coefficients(steps: int, init: str) -> np.ndarray:
    """Strictly-lower C: zero (Euler, the official start) or constant-step AB2 (C[i, i−1] = −½)."""
    c = np.zeros((steps, steps))
    if init == "adams2":
        c[np.arange(1, steps), np.arange(steps - 1)] = -0.5
    elif init != "euler":
        raise ValueError(f"init must be 'adams2' or 'euler', got {init!r}")
    return c


def _initial_logits(steps: int, shift: float = 1.0, mu: float | None = None) -> np.ndarray:
    """log Δt of the shifted uniform grid (softmax of it is that grid's Δt)."""
    from fewstep.schedules import time_shift

    sigmas = time_shift(np.linspace(1.0, 0.0, steps + 1), shift=shift, mu=mu)
    return np.log(-np.diff(sigmas))


def _free_mask(steps: int, order_cap: bool) -> np.ndarray:
    """Strictly-lower entries that are searched; the N ≤ 6 order cap keeps only column i−1 in the last two rows."""
    mask = np.tril(np.ones((steps, steps), dtype=bool), -1)
    if order_cap and steps <= 6:
        for i in range(max(steps - 2, 1), steps):
            mask[i, :] = False
            mask[i, i - 1] = True
    return mask


def _solver(logits: Any, coeffs: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        dt = torch.softmax(logits, 0).numpy().copy()
        c = (coeffs * mask).numpy()
    return dt, c + np.diag(1.0 - c.sum(1))


def _rollout(model: Callable, x: Any, logits: Any, coeffs: Any, mask: Any, time_gradient: bool = True,
             h: float = 1e-5):
    """The student from noise x: (states x_1..x_N, σ_1..σ_N)."""
    import torch

    steps = len(logits)
    dt = torch.softmax(logits, 0)
    c = coeffs * mask
    m = c + torch.diag(1.0 - c.sum(1))
    sigma = torch.ones((), dtype=torch.float64)
    states, sigmas, vs = [], [], []
    for i in range(steps):
        vs.append(_with_time_gradient(model, x, sigma, h) if time_gradient else model(x, float(sigma)))
        x = x - dt[i] * sum(m[i, j] * vs[j] for j in range(i + 1))
        sigma = sigma - dt[i]
        states.append(x)
        sigmas.append(sigma)
    return states, sigmas


def _loss(kind: str, states: list, targets: list, batch: int | None = None) -> Any:
    """The training loss on a minibatch; `batch`: the whole minibatch's size when `states` hold one process's share
    of it (the mean-type losses are then this share's sum over the whole batch's count, so that the processes'
    gradients add up to the whole batch's; `robust` needs the whole batch)."""
    import torch

    steps = len(states)
    scale = 1.0 / ((batch or len(states[0])) * (states[0][0].numel() if len(states[0]) else 1))

    def mean(t: Any) -> Any:
        return t.sum() * scale

    if kind == "robust":
        dims = tuple(range(1, states[0].dim()))
        sq = sum(((x - t) ** 2).mean(dims) for x, t in zip(states, targets, strict=True))
        sq = (sq + steps * ((states[-1] - targets[-1]) ** 2).mean(dims)) / (2 * steps)
        e = torch.sqrt(sq + 1e-30)
        c = torch.clamp(e.detach().median(), min=1e-12)
        return (c * c * (torch.sqrt(1 + (e / c) ** 2) - 1)).mean() / (c * c)
    if kind == "final":
        return mean((states[-1] - targets[-1]) ** 2)
    value = sum(mean((x - t) ** 2) for x, t in zip(states, targets, strict=True))
    if kind == "reweighted":
        value = value + 1000.0 * mean(torch.nn.functional.huber_loss(states[-1], targets[-1], delta=1e-3,
                                                                      reduction="none"))
    return value


def _world() -> tuple[int, int]:
    """(rank, processes) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the processes (float64), identity in one process."""
    import torch

    _, world = _world()
    if world == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _lr_factor(it: int, total: int) -> float:
    """Cosine decay from 1 to 0.1 over the run."""
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))


# ---------------------------------------------------------------------------------------------------------- search

class Interrupted(KeyboardInterrupt):
    """The search stopped at an iteration boundary (Ctrl-C or `stop()`); the checkpoint holds its state."""


class SearchDiverged(InvalidInput):
    """The search's parameters became unusable (a learning rate too large); its checkpoint is removed."""


@dataclass
class _Bank:
    """Training noises with their teacher trajectories, validation noises with their teacher final states."""

    train_noise: Any
    train_index: Any
    t_sigmas: Any
    t_states: Any
    val_noise: Any
    val_index: Any
    val_final: Any
    teacher_calls: int
    origin: str = ""  # where the training trajectories come from, for a message about them


def _new_candidate(steps: int, init: str, shift: float, mu: float | None, seed: int, restart: int,
                   lr: float) -> dict:
    import torch

    logits = torch.from_numpy(_initial_logits(steps, shift, mu)).requires_grad_(True)
    coeffs = torch.from_numpy(_initial_coefficients(steps, init)).requires_grad_(True)
    opt = torch.optim.Adam([logits, coeffs], lr=lr)
    gen = torch.Generator().manual_seed(int(seed) * 1009 + steps * 31 + restart)
    return {"init": init, "shift": shift, "mu": mu, "logits": logits, "coeffs": coeffs, "opt": opt, "gen": gen,
            "it": 0, "best": None, "best_val": math.inf, "best_it": 0, "best_parts": None, "val": math.inf,
            "restart": restart}


def _pack(c: dict) -> dict:
    return {"init": c["init"], "shift": c["shift"], "mu": c["mu"], "logits": c["logits"].detach().clone(),
            "coeffs": c["coeffs"].detach().clone(), "opt": copy.deepcopy(c["opt"].state_dict()),
            "gen": c["gen"].get_state(), "it": c["it"], "best_val": c["best_val"], "best_it": c["best_it"],
            "best_parts": None if c.get("best_parts") is None else list(c["best_parts"]), "val": c["val"],
            "restart": c["restart"],
            "best": None if c["best"] is None else tuple(t.clone() for t in c["best"])}


def _unpack(p: dict, lr: float) -> dict:
    import torch

    logits = p["logits"].clone().requires_grad_(True)
    coeffs = p["coeffs"].clone().requires_grad_(True)
    opt = torch.optim.Adam([logits, coeffs], lr=lr)
    opt.load_state_dict(p["opt"])
    gen = torch.Generator()
    gen.set_state(p["gen"])
    return {**p, "logits": logits, "coeffs": coeffs, "opt": opt, "gen": gen,
            "best": None if p["best"] is None else tuple(t.clone() for t in p["best"])}


def _validate(model: Callable, bank: _Bank, logits: Any, coeffs: Any, mask: Any, calls: list[int],
              chunk: int = 256, slot: int = 0) -> float:
    """RMSE of the student's final sample against the teacher's on the validation noises; its model calls are added
    to `calls[slot]` (the member's slot in a family search)."""
    import torch

    if bank.val_noise is None or len(bank.val_noise) == 0:
        return math.nan
    rank, world = _world()
    total, count = 0.0, 0
    with torch.no_grad():
        for a in range(rank * chunk, len(bank.val_noise), chunk * world):  # each process validates its chunks
            idx = bank.val_index[a:a + chunk]

            def f(x: Any, s: float, idx: Any = idx) -> Any:
                calls[slot] += len(x)
                return model(x, s, idx)

            x = _rollout(f, bank.val_noise[a:a + chunk], logits, coeffs, mask, time_gradient=False)[0][-1]
            total += float(((x - bank.val_final[a:a + chunk].to(torch.float64)) ** 2).sum())
            count += x.numel()
    total, count = _all_sum([total, count])
    return math.sqrt(total / count)


def baseline_rmse(model: Callable, bank: _Bank, solver: str, steps: int, shift: float = 1.0,
                  mu: float | None = None, calls: list[int] | None = None) -> float:
    """RMSE of a fixed solver (e.g. 'adams2' on the shifted grid) on the validation noises, for comparison; its
    model calls are added to `calls`."""
    import torch

    import fewstep

    if bank.val_noise is None or len(bank.val_noise) == 0:
        return math.nan
    with torch.no_grad():
        x = fewstep.sample(lambda x, s: model(x, s, bank.val_index), bank.val_noise, solver, steps, shift=shift, mu=mu)
    if calls is not None:
        calls[0] += steps * len(bank.val_noise)
    return float(torch.sqrt(torch.mean((x - bank.val_final.to(torch.float64)) ** 2)))


@dataclass
class SearchConfig:
    """Everything a search result depends on (the checkpoint's fingerprint)."""

    steps: tuple[int, ...]
    iterations: int = DEFAULT_ITERATIONS
    batch: int = 256
    lr: float = DEFAULT_LR
    loss: str = DEFAULT_LOSS
    restarts: int = DEFAULT_RESTARTS
    explore: float = 0.2  # fraction of `iterations` each restart explores before the best one continues
    eval_every: int = 0  # iterations between validations (0: iterations // 30)
    order_cap: bool = True
    shift: float = 1.0
    mu: float | None = None
    seed: int = 0
    init: str = "adams2"
    time_h: float = 1e-5

    def fingerprint(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, default=str)


@dataclass
class _Family:
    """The models one solver is searched for (one for a plain search), each with its bank and minibatch size, and
    per step count `scales`: what each member's validation RMSE is divided by (its start solver's RMSE in a family;
    1 for a single model, whose loss and validation error are then exactly the plain search's)."""

    models: list[Callable]
    banks: list[_Bank]
    batches: list[int]
    scales: list[float]
    robust: bool  # the robust loss is already relative to each member's own median error: not divided again
    time_h: list[float]  # each member's σ step of the finite-difference time gradient

    def score(self, rmses: Sequence[float]) -> float:
        """The validation error the search minimises: the mean of the members' scaled RMSEs (a single model's RMSE)."""
        return sum(r / s for r, s in zip(rmses, self.scales, strict=True)) / len(rmses)

    def weight(self, m: int) -> float:
        """Member m's factor on its training loss: the mean over the members of each loss (a squared error) divided
        by its squared scale; 1.0 for a single model."""
        return 1.0 / (len(self.models) * (1.0 if self.robust else self.scales[m] ** 2))


def _run_candidate(fam: _Family, cand: dict, until: int, total: int, cfg: SearchConfig, mask: Any,
                   calls: dict[str, list[int]], bar: Any, save: Callable[[], None], stop: Callable[[], bool]) -> None:
    """Optimise `cand` in place up to iteration `until` (of `total` for the lr schedule), validating every
    `eval_every` iterations and keeping the best parameters. Each iteration draws one minibatch per family member
    (in member order, from the candidate's generator: a single model draws exactly the plain search's)."""
    import torch

    rank, world = _world()
    every = cfg.eval_every or max(1, cfg.iterations // 30)
    unvalidated = all(len(b.val_noise) == 0 for b in fam.banks)
    last_save = time.monotonic()

    def f(m: int, x: Any, s: float, idx: Any) -> Any:
        calls["training"][m] += len(x)
        return fam.models[m](x, s, idx)

    while cand["it"] < until:
        if not all(bool(torch.isfinite(p).all()) for p in (cand["logits"], cand["coeffs"])):
            break  # diverged: its best validated parameters (if any) stand; search_target refuses a diverged result
        for group in cand["opt"].param_groups:
            group["lr"] = cfg.lr * _lr_factor(cand["it"], total)
        picks = [torch.randint(len(b.train_noise), (n,), generator=cand["gen"])
                 for b, n in zip(fam.banks, fam.batches, strict=True)]
        cand["opt"].zero_grad()
        terms = []
        for m, (bank, drawn) in enumerate(zip(fam.banks, picks, strict=True)):
            pick = drawn[rank::world]  # every process draws the same minibatch and computes its share
            if not len(pick):
                continue
            idx = bank.train_index[pick]
            states, sigmas = _rollout(lambda x, s, m=m, idx=idx: f(m, x, s, idx), bank.train_noise[pick],
                                      cand["logits"], cand["coeffs"], mask, h=fam.time_h[m])
            rows = _Picked(bank.t_states, pick)
            targets = [_interpolate(bank.t_sigmas, rows, s) for s in sigmas]
            if not all(bool(torch.isfinite(t).all()) for t in targets):
                raise NonFiniteError(f"{bank.origin or 'the teacher bank'} holds NaN or Inf")
            terms.append(_loss(cfg.loss, states, targets, len(drawn)) * fam.weight(m))
        value = sum(terms[1:], terms[0]) if terms else 0.0 * (cand["logits"].sum() + cand["coeffs"].sum())
        value.backward()
        if world > 1:
            import torch.distributed as dist

            for p in (cand["logits"], cand["coeffs"]):
                dist.all_reduce(p.grad)
            shown = torch.tensor([value.item()], dtype=torch.float64)
            dist.all_reduce(shown)
            value = shown[0]
        cand["opt"].step()
        cand["it"] += 1
        if cand["it"] % every == 0 or cand["it"] == until:
            parts = [_validate(model, bank, cand["logits"], cand["coeffs"], mask, calls["validation"], slot=m)
                     for m, (model, bank) in enumerate(zip(fam.models, fam.banks, strict=True))]
            val = fam.score(parts)
            cand["val"] = val
            # Keep the best validated parameters (a NaN from a diverged step never replaces them); without
            # validation noises, the last ones.
            if (np.isfinite(val) and val < cand["best_val"]) or unvalidated:
                cand["best_val"], cand["best_it"], cand["best_parts"] = val, cand["it"], parts
                cand["best"] = (cand["logits"].detach().clone(), cand["coeffs"].detach().clone())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.2e}", val=f"{cand['val']:.3e}", best=f"{cand['best_val']:.3e}",
                            start=cand["restart"], refresh=False)
        if (_all_sum([float(bool(stop()))])[0] > 0) if world > 1 else stop():  # all processes stop together
            save()
            raise Interrupted()
        if time.monotonic() - last_save > CHECKPOINT_SECONDS:
            save()
            last_save = time.monotonic()


def _search_steps(fam: _Family, steps: int, cfg: SearchConfig, state: dict, progress: bool,
                  save: Callable[[], None], stop: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray, dict]:
    """One step count: restarts explore, the best by validation continues; returns (Δt, M, provenance)."""
    import torch
    from tqdm.auto import tqdm

    mask = torch.from_numpy(_free_mask(steps, cfg.order_cap))
    members = len(fam.models)
    calls = state.setdefault("calls", {"training": [0] * members, "validation": [0] * members})
    started = time.perf_counter() - state.get("seconds", 0.0)
    if members > 1 and "scales" not in state:  # a family: each member's error relative to the start solver's
        start = (torch.from_numpy(_initial_logits(steps, cfg.shift, cfg.mu)),
                 torch.from_numpy(_initial_coefficients(steps, cfg.init)))
        scales = [_validate(model, bank, *start, mask, calls["validation"], slot=m)
                  for m, (model, bank) in enumerate(zip(fam.models, fam.banks, strict=True))]
        if not all(np.isfinite(v) and v > 0 for v in scales):
            raise ValueError(f"N={steps}: the start solver's validation RMSE per member is {scales}; a family search "
                             "needs a finite, nonzero one for each member to normalise by")
        state["scales"] = scales
    fam.scales = state.get("scales", [1.0])
    explore = max(1, round(cfg.explore * cfg.iterations)) if cfg.restarts > 1 else 0
    if "candidates" not in state:
        starts = [("adams2" if cfg.init == "adams2" else "euler", cfg.shift, cfg.mu),
                  ("euler" if cfg.init == "adams2" else "adams2", cfg.shift, cfg.mu),
                  (cfg.init, cfg.shift * RESTART_SHIFT if cfg.mu is None else cfg.shift,
                   None if cfg.mu is None else cfg.mu + math.log(RESTART_SHIFT))]
        while len(starts) < cfg.restarts:  # further restarts: the requested start, perturbed by their own seed
            starts.append((cfg.init, cfg.shift, cfg.mu))
        state["candidates"] = [_pack(_new_candidate(steps, init, sh, mu, cfg.seed, r, cfg.lr))
                               for r, (init, sh, mu) in enumerate(starts[:cfg.restarts])]
        for r, p in enumerate(state["candidates"][3:], start=3):
            g = torch.Generator().manual_seed(cfg.seed * 7919 + r)
            p["logits"] += 0.3 * torch.randn(steps, generator=g, dtype=torch.float64)
        state["phase"] = "explore" if explore else "finish"
    cands = [_unpack(p, cfg.lr) for p in state["candidates"]]

    def checkpoint() -> None:
        state["candidates"] = [_pack(c) for c in cands]
        state["seconds"] = time.perf_counter() - started
        save()

    score = "validation_rmse" if members == 1 else "validation_score"  # a family's is relative, not an RMSE
    total_bar = (explore * len(cands) + cfg.iterations - explore) if state["phase"] == "explore" else cfg.iterations
    bar = tqdm(total=total_bar, desc=f"search N={steps}", disable=not progress, leave=True)
    bar.update(sum(c["it"] for c in cands))
    try:
        if state["phase"] == "explore":
            for c in cands:
                _run_candidate(fam, c, explore, cfg.iterations, cfg, mask, calls, bar, checkpoint, stop)
            explored = [{"init": c["init"], "shift": c["shift"], "mu": c["mu"], score: c["best_val"]} for c in cands]
            state["explored"] = explored
            cands = [min(cands, key=lambda c: c["best_val"] if np.isfinite(c["best_val"]) else math.inf)]
            state["phase"] = "finish"
            checkpoint()
        _run_candidate(fam, cands[0], cfg.iterations, cfg.iterations, cfg, mask, calls, bar, checkpoint, stop)
    finally:
        bar.close()
    best = cands[0]
    logits, coeffs = best["best"] if best["best"] is not None else (best["logits"], best["coeffs"])
    dt, matrix = _solver(logits, coeffs, mask)
    info = {score: best["best_val"], "best_iteration": best["best_it"],
            "start": {"init": best["init"], "shift": best["shift"], "mu": best["mu"]},
            "restarts": state.get("explored", []),
            "calls": {"training": sum(calls["training"]), "validation": sum(calls["validation"])},
            "seconds": round(time.perf_counter() - started, 2)}
    if members > 1:
        parts = best.get("best_parts") or [math.nan] * members
        info["members"] = [{"validation_rmse": r, "start_validation_rmse": s,
                            "calls": {"training": t, "validation": v}}
                           for r, s, t, v in zip(parts, fam.scales, calls["training"], calls["validation"],
                                                 strict=True)]
    return dt, matrix, info


def make_bank(target: Target, samples: int, validation: int, seed: int, teacher: str = DEFAULT_TEACHER,
              teacher_points: int = TEACHER_POINTS, teacher_dtype: Any = None, chunk: int = TEACHER_CHUNK,
              path: str | os.PathLike | None = None) -> _Bank:
    """Draw `samples` training and `validation` held-out noises (independent streams of `seed`) and solve the
    teacher from them, `chunk` samples at a time (each chunk one ODE system, so the bank does not depend on the number
    of processes; fewer for big samples, `TEACHER_CHUNK_BYTES`); training states are stored in `teacher_dtype`
    (default float64). The teacher's model calls are this process's.

    `path` (`--teacher-bank`): a folder that holds the bank on disk. The training trajectories are memory-mapped there
    and read a minibatch at a time (never loaded whole); the validation finals are read into memory. If the folder
    does not exist the teacher is solved into it (each process its chunks); if it holds this bank it is reused without
    a model call; otherwise InvalidInput / InputFileError naming --teacher-bank."""
    import torch

    dtype = teacher_dtype or torch.float64
    chunk = max(1, min(chunk, TEACHER_CHUNK_BYTES // ((teacher_points + 1) * int(np.prod(target.shape)) * 8)))
    gen = torch.Generator().manual_seed(int(seed))
    train = torch.randn(samples, *target.shape, generator=gen, dtype=torch.float64)
    val_gen = torch.Generator().manual_seed(int(seed) + 0x5EED)
    val = torch.randn(validation, *target.shape, generator=val_gen, dtype=torch.float64)
    # Conditioning: training sample k and validation sample k get index k (labels/prompts cycle identically).
    train_index, val_index = torch.arange(samples), torch.arange(validation)
    calls = [0]
    rank, world = _world()
    jobs = [("train", a) for a in range(0, samples, chunk)] + [("val", a) for a in range(0, validation, chunk)]

    def solve(part: str, a: int) -> Any:
        noise, index = (train, train_index) if part == "train" else (val, val_index)
        idx = index[a:a + chunk]
        states = teacher_bank(lambda x, s, idx=idx: target.velocity(x, s, idx), noise[a:a + chunk], teacher,
                              teacher_points, calls)[1]
        return states.to(dtype) if part == "train" else states[-1]

    sigmas = torch.linspace(1.0, 0.0, teacher_points + 1, dtype=torch.float64)
    if path is not None:
        name = str(dtype).removeprefix("torch.")
        if name not in BANK_DTYPES:
            raise ValueError(f"a teacher bank on disk stores {', '.join(BANK_DTYPES)}, not {name}")
        meta = json.loads(json.dumps({"format": BANK_FORMAT, "model": target.info or target.name,
                                      "shape": list(target.shape), "samples": samples, "validation": validation,
                                      "seed": seed, "teacher": teacher, "teacher_points": teacher_points,
                                      "dtype": name, "chunk": chunk}, default=str))
        path = Path(path)
        if not _all_sum([float(os.path.lexists(path))])[0]:  # every process decides alike
            _write_bank(path, meta, jobs, solve, calls)
        t_states, val_final = _open_bank(path, meta)
        return _Bank(train, train_index, sigmas, t_states, val, val_index, val_final, calls[0],
                     f"--teacher-bank {path}: teacher.npy")
    # With several processes, each solves every world-th chunk.
    results = {job: solve(*job) for j, job in enumerate(jobs) if j % world == rank}
    if world > 1:  # every process gets the whole bank from the chunks' owners
        import torch.distributed as dist

        for j, (part, a) in enumerate(jobs):
            n = min(chunk, (samples if part == "train" else validation) - a)
            shape = (teacher_points + 1, n, *target.shape) if part == "train" else (n, *target.shape)
            buf = results.get((part, a))
            if buf is None:
                buf = torch.empty(shape, dtype=dtype if part == "train" else torch.float64)
            dist.broadcast(buf, src=j % world)
            results[part, a] = buf
    t_states = torch.cat([results["train", a] for a in range(0, samples, chunk)], dim=1)
    finals = [results["val", a] for a in range(0, validation, chunk)]
    val_final = torch.cat(finals) if finals else torch.empty(0, *target.shape, dtype=torch.float64)
    return _Bank(train, train_index, sigmas, t_states, val, val_index, val_final, calls[0],
                 f"--model {target.info.get('model', target.name)}: the teacher bank")


def _bank_files(meta: dict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The arrays of a bank folder: name → (shape, numpy dtype)."""
    shape = tuple(meta["shape"])
    return {"teacher.npy": ((meta["teacher_points"] + 1, meta["samples"], *shape), BANK_DTYPES[meta["dtype"]]),
            "validation.npy": ((meta["validation"], *shape), np.float64)}


def _write_bank(path: Path, meta: dict, jobs: list[tuple[str, int]], solve: Callable[[str, int], Any],
                calls: list[int]) -> None:
    """Solve this process's chunks straight into memory-mapped files in a temporary folder next to `path`, then
    (process 0, once every process has written its chunks) rename the folder to `path`: a folder under that name is
    always a complete bank. Under torchrun all processes write into the same files, so they must see the same file
    system (one machine, or a shared folder)."""
    from numpy.lib.format import open_memmap

    rank, world = _world()
    flag = f"--teacher-bank {path}"
    # One temporary name for every process of this search, and another for any other search (process or thread).
    token = int(_all_sum([float(secrets.randbits(48)) if rank == 0 else 0.0])[0])
    tmp = path.parent / f".{path.name}.{token:012x}.tmp"
    files = _bank_files(meta)
    try:
        if rank == 0:
            try:
                tmp.mkdir(parents=True)
                for name, (shape, dtype) in files.items():
                    open_memmap(tmp / name, "w+", dtype, shape)
                    # Reserve the blocks now: writing into a sparse memory map on a full disk kills the process
                    # (SIGBUS) halfway through the teacher; this fails at once, with a message.
                    if hasattr(os, "posix_fallocate"):
                        with open(tmp / name, "r+b") as f:
                            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as err:
                raise InputFileError(f"{flag}: cannot write the bank there ({err.strerror or err})") from None
        _all_sum([0.0])  # the others wait for the files
        try:
            maps = {name: open_memmap(tmp / name, "r+") for name in files}
        except OSError:
            raise InputFileError(f"{flag}: process {rank} does not see {tmp}; under torchrun the bank must be on a "
                                 "file system every process shares") from None
        for j, (part, a) in enumerate(jobs):
            if j % world == rank:
                values = solve(part, a).numpy()
                if part == "train":
                    maps["teacher.npy"][:, a:a + values.shape[1]] = values
                else:
                    maps["validation.npy"][a:a + len(values)] = values
        for m in maps.values():
            m.flush()
        del maps
        total = _all_sum([float(calls[0])])[0]  # also waits until every process has written its chunks
        if rank == 0:
            try:
                (tmp / "bank.json").write_text(json.dumps({**meta, "teacher_calls": int(total)}, indent=1) + "\n")
                os.rename(tmp, path)
            except OSError as err:
                # A search started at the same time on the same folder finished first: its bank is complete (it was
                # renamed into place whole), so ours is dropped and _open_bank checks that theirs is this bank.
                if not os.path.lexists(path / "bank.json"):
                    raise InputFileError(f"{flag}: cannot move the finished bank into place ({err.strerror or err})"
                                         ) from None
                shutil.rmtree(tmp, ignore_errors=True)
        _all_sum([0.0])  # the others open it only once it is there
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_bank(path: Path, meta: dict) -> tuple[np.ndarray, Any]:
    """The training trajectories of the bank folder `path`, memory-mapped read-only, and its validation finals;
    InvalidInput if it holds another search's bank, InputFileError if it is not a readable bank (both name the flag)."""
    import torch

    flag = f"--teacher-bank {path}"
    if path.is_dir() and not os.path.lexists(path / "bank.json"):
        raise InputFileError(f"{flag}: not a teacher bank (no bank.json in it); give a new folder for the bank")
    try:
        saved = json.loads((path / "bank.json").read_text())
        states = np.load(path / "teacher.npy", mmap_mode="r")
        finals = np.load(path / "validation.npy")
    except (OSError, ValueError) as err:  # missing, truncated, not .npy or not JSON
        why = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())
        raise InputFileError(f"{flag}: not a readable teacher bank ({why}); remove it or give another path") from None
    if not isinstance(saved, dict) or saved.get("format") != BANK_FORMAT:
        raise InputFileError(f"{flag}: not a fewstep teacher bank (bank.json has no format {BANK_FORMAT!r})")
    for key, value in meta.items():
        if saved.get(key) != value:
            there, here = saved.get(key), value
            if isinstance(there, dict) and isinstance(here, dict):  # the model's description: name what differs in it
                inner = next(k for k in {**there, **here} if there.get(k) != here.get(k))
                key, there, here = f"{key}.{inner}", there.get(inner), here.get(inner)
            there, here = (json.dumps(v, default=str)[:80] for v in (there, here))
            raise InvalidInput(f"{flag} holds the teacher bank of another search ({key} {there} there, {here} "
                               "here); give another path, or remove it to solve the teacher again")
    for name, array in (("teacher.npy", states), ("validation.npy", finals)):
        shape, dtype = _bank_files(meta)[name]
        if array.shape != shape or array.dtype != dtype:
            raise InputFileError(f"{flag}: damaged ({name} holds {array.dtype} {array.shape}, bank.json says "
                                 f"{np.dtype(dtype)} {shape}); remove it or give another path")
    if not np.isfinite(finals).all():
        raise NonFiniteError(f"{flag}: validation.npy holds NaN or Inf; remove it or give another path")
    return states, torch.from_numpy(finals)


def _bank_from_noise(noise: Any, trajectories: tuple[Any, Any] | None, model: Callable, teacher: str,
                     teacher_points: int, validation: int) -> _Bank:
    """A given noise bank (and optionally its trajectories): the last `validation` samples are held out."""
    import torch

    calls = [0]
    if trajectories is None:
        trajectories = teacher_bank(model, noise, teacher, teacher_points, calls)
    sigmas, states = trajectories
    n = len(noise)
    k = n - validation
    index = torch.arange(n)
    return _Bank(noise[:k], index[:k], sigmas, states[:, :k], noise[k:], index[k:], states[-1, k:], calls[0])


def _fewstep_version() -> str:
    from fewstep import __version__

    return __version__


def _removes_failed_checkpoint(search: Callable[..., SolverFile]) -> Callable[..., SolverFile]:
    """`search` given a `_done` record it fills in ("resumed", "saved"): a search that fails on bad input (a model's
    NaN, a damaged bank) or diverges leaves no checkpoint it wrote, unless it resumed one that still resumes (a
    diverged search would diverge again)."""

    @functools.wraps(search)
    def wrapper(*args: Any, **kwargs: Any) -> SolverFile:
        done = {"resumed": False, "saved": False}
        try:
            return search(*args, **kwargs, _done=done)
        except FewstepError as err:
            if done["saved"] and (isinstance(err, SearchDiverged) or not done["resumed"]):
                Path(kwargs["checkpoint"]).unlink(missing_ok=True)
            raise

    return wrapper


@_removes_failed_checkpoint
def search_target(target: Target | Sequence[Target], steps: int | Sequence[int], *, samples: int | None = None,
                  validation: int | None = None, teacher: str | None = None, teacher_points: int = TEACHER_POINTS,
                  teacher_dtype: Any = None, iterations: int = DEFAULT_ITERATIONS, batch: int | None = None,
                  lr: float = DEFAULT_LR, loss: str = DEFAULT_LOSS, restarts: int = DEFAULT_RESTARTS,
                  explore: float = 0.2, eval_every: int = 0, order_cap: bool = False, shift: float = 1.0,
                  mu: float | None = None, seed: int = 0,
                  init: str = "adams2", progress: bool = False, checkpoint: str | os.PathLike | None = None,
                  stop: Callable[[], bool] | None = None, bank: _Bank | Sequence[_Bank] | None = None,
                  log: Callable[[str], None] | None = None, teacher_chunk: int = TEACHER_CHUNK,
                  teacher_bank: str | os.PathLike | None = None,
                  _done: dict | None = None) -> SolverFile:
    """Search solvers for `target` at each step count in `steps` (one file with several step counts), sharing one
    teacher bank. `checkpoint`: a file the state is saved to (every 30 s, after each step count and when `stop()`
    turns true, which then raises `Interrupted`); an existing checkpoint of the same configuration is resumed, and
    the result is bit-identical to an uninterrupted search. `teacher_bank`: a folder for the teacher bank on disk,
    memory-mapped, written once and reused (`make_bank`'s `path`; the checkpoint then holds no trajectories). See the
    module docstring for the method.

    A family (`target` a list of two or more models with distinct names): one solver for all of them (module
    docstring). `samples`, `validation`, `batch` and `teacher` then apply to each member (None: each member's own
    default); every member's noises are drawn from `seed`, as its own search would; `bank` is one bank per member and
    `teacher_bank` a folder holding one bank folder per member (`<k>-<model>`). A list of one is the plain search."""
    import torch

    targets = [_checked(t) for t in (target if isinstance(target, (list, tuple)) else [target])]
    given = None if bank is None else (list(bank) if isinstance(bank, (list, tuple)) else [bank])
    single = len(targets) == 1
    wanted = (steps,) if np.ndim(steps) == 0 else tuple(steps)
    if not wanted or not all(isinstance(n, (int, np.integer)) and n >= 2 for n in wanted):
        raise InvalidInput(f"steps must be integers of at least 2 (model calls of the solver), got {steps!r}")
    steps = tuple(int(n) for n in wanted)
    if not (isinstance(iterations, (int, np.integer)) and iterations >= 1):
        raise InvalidInput(f"iterations must be an integer of at least 1, got {iterations!r}")
    if batch is not None and not (isinstance(batch, (int, np.integer)) and not isinstance(batch, bool)
                                  and 1 <= batch <= MAX_BATCH):
        raise InvalidInput(f"batch must be an integer from 1 to {MAX_BATCH} (noises per iteration), got {batch!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(lr) and lr > 0):
        raise InvalidInput(f"lr must be a finite number above 0 (the learning rate), got {lr!r}")
    # The same rules as --shift and --mu: a shift of 0 or NaN would surface as a "diverged" search blaming the lr.
    check_shift_arguments(shift, mu)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if init not in ("adams2", "euler"):
        raise ValueError(f"init must be 'adams2' or 'euler', got {init!r}")
    names = [str(t.info.get("model", t.name)) for t in targets]
    if not targets or len(set(names)) < len(names):
        raise ValueError(f"a family needs distinct models, got {names}")
    if given is not None and len(given) != len(targets):
        raise ValueError(f"a family search takes one bank per member: {len(given)} banks for {len(targets)} models")
    if not single and validation == 0:
        raise ValueError("a family search needs validation noises: each member's error is normalised on its own")
    teachers = [t.default_teacher if teacher is None else teacher for t in targets]
    for spec in teachers:
        parse_teacher(spec) if spec != "euler" else None
    rank, world = _world()
    if bank is not None and teacher_bank is not None:
        raise ValueError("teacher_bank stores the bank the search draws itself; it cannot take a given bank or noise")
    if world > 1 and loss == "robust":
        raise ValueError("the robust loss needs the whole minibatch in one process; use another loss with torchrun")
    counts = [t.default_samples if samples is None else samples for t in targets]
    held = [t.default_validation if validation is None else validation for t in targets]
    batches = [t.default_batch if batch is None else batch for t in targets]
    cfg = SearchConfig(steps, iterations, batches[0], lr, loss, max(1, restarts), explore, eval_every, order_cap,
                       shift, mu, seed, init, targets[0].time_h)
    stop = stop or (lambda: False)
    say = log or (lambda text: None)

    def one(values: list) -> Any:  # a single model's checkpoint key and provenance keep their plain-search form
        return values[0] if single else values

    key = json.dumps({"search": cfg.fingerprint(), "model": one([t.info or t.name for t in targets]),
                      "samples": one(counts), "validation": one(held), "teacher": one(teachers),
                      "teacher_points": teacher_points, "teacher_dtype": str(teacher_dtype),
                      **({} if single else {"batch": batches, "time_h": [t.time_h for t in targets]}),
                      **({} if teacher_bank is None else {"teacher_bank": os.fspath(teacher_bank)})},
                     sort_keys=True, default=str)
    state: dict[str, Any] = {}
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            saved = torch.load(checkpoint, weights_only=False)
        except Exception:  # a damaged checkpoint is ignored (and replaced)
            saved = {}
        if saved.get("key") == key:
            state = saved
            if _done is not None:
                _done["resumed"] = True
            say(f"resuming from {checkpoint} ({len(state.get('done', {}))} of {len(steps)} step counts done)")
        else:
            say(f"checkpoint {checkpoint} is of another search; starting afresh")

    def save() -> None:
        if checkpoint is None or rank != 0:
            return
        from fewstep.files import atomic_write

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(checkpoint, buf.getvalue(), "checkpoint")
        if _done is not None:
            _done["saved"] = True

    started = time.perf_counter() - state.get("seconds_total", 0.0)
    saved_bank = state.get("bank")
    saved_banks = None if saved_bank is None else (saved_bank if isinstance(saved_bank, list) else [saved_bank])
    # A family keeps each member's bank folder inside --teacher-bank, named so that no two members share one.
    folders = [None] * len(targets) if teacher_bank is None else (
        [Path(teacher_bank)] if single else
        [Path(teacher_bank) / f"{m}-{''.join(c if c.isalnum() or c in '._-' else '_' for c in name)}"
         for m, name in enumerate(names)])
    banks = []
    for m, t in enumerate(targets):
        who = "" if single else f"{names[m]}: "
        if folders[m] is not None:
            say(f"{who}teacher: the bank in {folders[m]}" if os.path.lexists(folders[m]) else
                f"{who}teacher: {teachers[m]} on {counts[m]} + {held[m]} noises, into {folders[m]}")
            found = make_bank(t, counts[m], held[m], seed, teachers[m], teacher_points, teacher_dtype, teacher_chunk,
                              folders[m])
            if saved_banks is not None:  # a resumed search counts the teacher calls its first part spent
                found.teacher_calls = saved_banks[m].teacher_calls
        elif given is not None:
            found = given[m]
        elif saved_banks is not None:
            found = saved_banks[m]
        else:
            say(f"{who}teacher: {teachers[m]} on {counts[m]} + {held[m]} noises")
            found = make_bank(t, counts[m], held[m], seed, teachers[m], teacher_points, teacher_dtype, teacher_chunk)
        banks.append(found)
    # The checkpoint never copies a bank on disk: a resume maps the same folder again.
    stored = [replace(b, t_states=None) if teacher_bank is not None else b for b in banks]
    state.update(key=key, bank=one(stored))
    state.setdefault("done", {})
    save()
    fam = _Family([t.velocity for t in targets], banks,
                  [min(n, len(b.train_noise)) for n, b in zip(batches, banks, strict=True)], [1.0],
                  loss == "robust", [t.time_h for t in targets])

    for n in steps:
        if n in state["done"]:
            continue
        current = state.setdefault("current", {})
        if current.get("steps") != n:
            current.clear()
            current["steps"] = n

        def save_all() -> None:
            state["seconds_total"] = time.perf_counter() - started
            save()

        dt, matrix, info = _search_steps(fam, n, cfg, current, progress and rank == 0, save_all, stop)
        if not (np.isfinite(dt).all() and np.isfinite(matrix).all() and (dt > 0).all()):
            raise SearchDiverged(f"N={n}: the search diverged (lr {lr:g}; its time steps are {dt.tolist()}); give a "
                                 f"smaller --lr (default {DEFAULT_LR:g})")
        for m, part in enumerate(info.get("members", [info])):  # a family reports Adams-2 per member
            spent = [0]
            part["adams2_validation_rmse"] = (baseline_rmse(fam.models[m], banks[m], "adams2", n, shift, mu, spent)
                                              if rank == 0 else math.nan)
            part["calls"]["validation"] += spent[0]
            if part is not info:
                info["calls"]["validation"] += spent[0]
        state["done"][n] = (dt, matrix, info)
        state.pop("current")
        save_all()

    done = state["done"]
    per_steps = {str(n): done[n][2] for n in steps}
    mine = [sum(b.teacher_calls for b in banks), sum(i["calls"]["training"] for i in per_steps.values()),
            sum(i["calls"]["validation"] for i in per_steps.values())]
    per_process = [mine]
    member_teacher = [b.teacher_calls for b in banks]
    if world > 1:  # every process's own calls, and the per-N counts summed over the processes
        import torch.distributed as dist

        gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor(mine, dtype=torch.float64))
        per_process = [[int(v) for v in g.tolist()] for g in gathered]
        for info in per_steps.values():
            for part in [info, *info.get("members", [])]:
                part["calls"] = dict(zip(part["calls"], map(int, _all_sum(list(part["calls"].values()))),
                                         strict=True))
        member_teacher = [int(v) for v in _all_sum([float(v) for v in member_teacher])]
    teacher_calls, training, validating = (sum(p[k] for p in per_process) for k in range(3))
    element_bytes = torch.empty((), dtype=teacher_dtype or torch.float64).element_size()

    def teacher_info(m: int) -> dict:
        return {"solver": teachers[m], "points": teacher_points + 1, "dtype": str(teacher_dtype or torch.float64),
                "bytes_per_sample": (teacher_points + 1) * int(np.prod(targets[m].shape)) * element_bytes}

    provenance = {
        **(targets[0].info if single else {}), "model": names[0] if single else "+".join(names),
        "grid": {"shift": shift, "mu": mu},
        **({"teacher": teacher_info(0)} if single else {}),
        "samples": sum(len(b.train_noise) for b in banks), "validation_samples": sum(len(b.val_noise) for b in banks),
        "seed": seed, "loss": loss, "iterations": iterations, "batch": batches[0] if single else fam.batches, "lr": lr,
        "restarts": cfg.restarts, "order_cap": order_cap, "optimizer": "adam, cosine decay to 0.1x",
        "model_calls": {"teacher": teacher_calls, "training": training, "validation": validating,
                        "total": teacher_calls + training + validating,
                        "per_process": [dict(zip(("teacher", "training", "validation"), p, strict=True))
                                        for p in per_process]},
        "processes": world,
        "steps": per_steps,
        "seconds": round(time.perf_counter() - started, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": "fewstep.search", "fewstep": _fewstep_version(),
    }
    if not single:
        members = []
        for m, t in enumerate(targets):
            spent = [member_teacher[m], *(sum(i["members"][m]["calls"][k] for i in per_steps.values())
                                          for k in ("training", "validation"))]
            members.append({**t.info, "model": names[m], "samples": len(banks[m].train_noise),
                            "validation_samples": len(banks[m].val_noise), "batch": fam.batches[m],
                            "teacher": teacher_info(m),
                            "model_calls": {**dict(zip(("teacher", "training", "validation"), spent, strict=True)),
                                            "total": sum(spent)}})
        provenance["members"] = members
        provenance["normalisation"] = ("loss and validation error: the mean over the members of each member's own, "
                                       "divided by its start solver's validation RMSE (squared for the loss)")
    result = SolverFile("flow", {n: done[n][:2] for n in steps}, 1.0, provenance)
    if checkpoint is not None and rank == 0:
        Path(checkpoint).unlink(missing_ok=True)
    return result


def noise_bank(model: Callable[[Any, float], Any], noise: Any, *, validation: int | None = None,
               trajectories: tuple[Any, Any] | None = None, teacher: str = "exact",
               teacher_steps: int = TEACHER_POINTS) -> _Bank:
    """A bank of given noises (first axis = samples) for `search_target(..., bank=)`, e.g. one per member of a
    family: the last `validation` samples (default: an eighth) are held out for validation; `trajectories`:
    `teacher_bank(model, noise, teacher, teacher_steps)` if already solved, else it is solved here."""
    import torch

    try:
        noise = torch.as_tensor(noise).to(torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInput(f"noise must be a tensor or array of numbers, got {type(noise).__name__}") from None
    if noise.ndim < 2 or not bool(torch.isfinite(noise).all()):
        raise InvalidInput(f"noise must be a finite bank of samples with the samples on the first axis (at least 2-D), "
                           f"got shape {tuple(noise.shape)}{'' if noise.ndim < 2 else ' with NaN or infinite values'}")
    held = max(1, len(noise) // 8) if validation is None else validation
    if not 0 <= held < len(noise):
        raise ValueError(f"validation must leave training samples: {held} of {len(noise)}")
    return _bank_from_noise(noise, trajectories, model, teacher, teacher_steps, held)


def search(model: Callable[[Any, float], Any], steps: int, *, teacher: str = "exact",
           teacher_steps: int = TEACHER_POINTS, iterations: int = DEFAULT_ITERATIONS, batch: int | None = None,
           noise: Any = None, bank: int = 1024, validation: int | None = None, loss: str = DEFAULT_LOSS,
           lr: float = DEFAULT_LR, init: str = "adams2", restarts: int = DEFAULT_RESTARTS, progress: bool = False,
           seed: int = 0, order_cap: bool = True,
           dim: int | None = None, model_name: str = "", shift: float = 1.0, mu: float | None = None,
           trajectories: tuple[Any, Any] | None = None, **options: Any) -> SolverFile:
    """Search a `steps`-step solver for the flow model `model(x, sigma)` (torch, returns v = ε − x0).

    `noise`: the noise bank (a tensor, first axis = samples) or a callable n → tensor (called once for `bank`
    samples); its last `validation` samples (default: an eighth) are held out for validation and never give
    gradients. Default: `bank` standard normals of shape (dim,) for training and 256 more for validation.
    `trajectories`: `teacher_bank(model, noise, teacher, teacher_steps)` computed once and shared by searches of
    several step counts on the same noise (on a trained model the teacher solve costs more than the search).
    Other options: see `search_target`."""

    if validation is not None and not (isinstance(validation, (int, np.integer)) and validation >= 1):
        raise InvalidInput(f"validation must be an integer of at least 1 (the kept solver is the best on the held-out "
                           f"noises), got {validation!r}")
    if not (isinstance(bank, (int, np.integer)) and bank >= 1):
        raise InvalidInput(f"bank must be a positive integer number of noises, got {bank!r}")
    if noise is None:
        if dim is None:
            raise ValueError("give `noise` (a tensor bank or a callable n → noise) or `dim`")
        if not (isinstance(dim, (int, np.integer)) and dim >= 1):
            raise InvalidInput(f"dim must be a positive integer (the size of one sample), got {dim!r}")
        target = plain_target(model, (dim,), model_name)
        return search_target(target, steps, samples=bank, validation=256 if validation is None else validation,
                             teacher=teacher, teacher_points=teacher_steps, iterations=iterations, batch=batch,
                             lr=lr, loss=loss, restarts=restarts, order_cap=order_cap, shift=shift, mu=mu, seed=seed,
                             init=init, progress=progress, **options)
    if callable(noise):
        noise = noise(bank)
    data = noise_bank(model, noise, validation=validation, trajectories=trajectories, teacher=teacher,
                      teacher_steps=teacher_steps)
    target = plain_target(model, tuple(data.train_noise.shape[1:]), model_name)
    return search_target(target, steps, teacher=teacher, teacher_points=teacher_steps, iterations=iterations,
                         batch=batch, lr=lr, loss=loss, restarts=restarts, order_cap=order_cap, shift=shift, mu=mu,
                         seed=seed, init=init, progress=progress, bank=data, **options)


# -------------------------------------------------------------------------------------------------- shipped files

def shipped_dir() -> Path:
    from fewstep.solvers.neuralsolver import DATA

    return DATA


def shipped_solver(model: str, shift: float = 1.0, mu: float | None = None) -> Path | None:
    """The searched solver file shipped for an embedded model on a grid: data/neuralsolver/<model>-shift<k>.json
    for the shipped shift closest to `shift` (in log), or None if the model has none. `mu` (dynamic shift) is read
    as shift e^μ."""
    import glob
    import re

    wanted = math.exp(mu) if mu is not None else float(shift)
    found = {}
    for path in glob.glob(str(shipped_dir() / f"{glob.escape(model)}-shift*.json")):
        m = re.fullmatch(re.escape(model) + r"-shift([0-9.]+)\.json", Path(path).name)
        if m:
            found[float(m.group(1))] = Path(path)
    if not found:
        return None
    return found[min(found, key=lambda k: abs(math.log(k) - math.log(wanted)))]


class GridMismatchWarning(UserWarning):
    """A solver file used on another grid than the one it was searched on (`grid_mismatch`): `fewstep generate`
    prints it as one line, the diffusers scheduler warns once per scheduler."""


def grid_mismatch(file: SolverFile, shift: float = 1.0, mu: float | None = None) -> str | None:
    """A warning if `file` was searched on another grid than the caller samples on (None if it fits or the file
    does not say). The searched grid is used verbatim, so the caller's shift does not change the sampling; what
    differs is the grid the search started from and was validated against, recorded in provenance['grid']."""
    grid = file.provenance.get("grid") if isinstance(file.provenance, dict) else None
    if not isinstance(grid, dict):
        return None
    f_mu, f_shift = grid.get("mu"), grid.get("shift", 1.0)
    searched = math.exp(f_mu) if f_mu is not None else float(f_shift or 1.0)
    asked = math.exp(mu) if mu is not None else float(shift)
    if abs(math.log(searched) - math.log(asked)) <= 1e-6:
        return None
    return (f"solver file {file.source} was searched on the shift-{searched:g} grid, sampling asks for shift "
            f"{asked:g}: the file's own searched grid is used (the requested shift has no effect)")


# ------------------------------------------------------------------------------------------------------------- CLI

MAX_SEARCH_STEPS = 50
MAX_ITERATIONS = 10**6
MAX_BATCH = 2**16
MAX_SAMPLES = 10**7
MAX_SAMPLE_ELEMENTS = 2**24  # --shape: 16 M numbers per sample, 64× a Flux 1024² latent
MAX_PROMPTS_BYTES = 2**24  # a prompts file: 16 MiB of text is far more prompts than a search uses


def parse_steps(text: str) -> list[int]:
    """'6', '4,6,8' or '4-10' → sorted distinct step counts; ValueError otherwise."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"--steps: {text!r} is not a step count, a list (4,6,8) or a range (4-10)")
        if len(low) > 6 or len(high) > 6:  # no huge integers to convert
            raise ValueError(f"--steps must be integers from 2 to {MAX_SEARCH_STEPS}, got {part!r}")
        lo, hi = int(low), int(high) if dash else int(low)
        if lo > hi:
            raise ValueError(f"--steps: empty range {part!r}")
        if lo < 2 or hi > MAX_SEARCH_STEPS:  # checked before the range is expanded
            raise ValueError(f"--steps must be integers from 2 to {MAX_SEARCH_STEPS}, got {part!r}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewstep.testbed import PRESETS

    parser.add_argument("--model", default=None,
                        help="what to search on: a Gaussian mixture (" + ", ".join(PRESETS) + "), an embedded model "
                             "(digits, ...), module:function, a Python velocity f(x, sigma) (with --shape), or a "
                             "diffusers pipeline folder or hub id (with --prompts); a comma list of mixtures, embedded "
                             "models or velocities (gmm8d,digits) searches one solver for the whole family")
    parser.add_argument("--problem", choices=PRESETS, default=None, help="a Gaussian mixture (same as --model)")
    parser.add_argument("--prompts", default=None,
                        help="a text file, one prompt per line: --model is then a diffusers pipeline (folder or hub "
                             "id); bank sample k uses prompt k mod P")
    parser.add_argument("--height", type=int, default=None, help="image height for a pipeline (its default)")
    parser.add_argument("--width", type=int, default=None, help="image width for a pipeline (its default)")
    parser.add_argument("--shape", default=None, help="noise shape of one sample for module:function, e.g. 64 or 4,64")
    parser.add_argument("--steps", default="6",
                        help=f"model calls (NFE) of the searched solver, 2-{MAX_SEARCH_STEPS}; a list (4,6,8) or a "
                             "range (4-10) searches each and writes them into one file (default 6)")
    parser.add_argument("--out", "--output", "-o", dest="out", required=True,
                        help="where to write the solver file (JSON, written atomically; checked before the search); "
                             "the checkpoint goes to OUT.ckpt (--output and -o as in generate)")
    parser.add_argument("--shift", type=float, default=1.0,
                        help="the grid the model samples on (static shift, default 1): the search starts there and "
                             "the file records it")
    parser.add_argument("--mu", type=float, default=None, help="dynamic (Flux) shift μ instead of --shift")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance of an embedded model (default: the model's)")
    parser.add_argument("--teacher", default=None,
                        help="teacher trajectories: exact[:RTOL] (DOP853; default rtol 1e-9, 1e-7 for an embedded "
                             "model), euler:STEPS or heun:STEPS (default heun:50 for a pipeline)")
    parser.add_argument("--teacher-points", type=int, default=TEACHER_POINTS,
                        help=f"σ intervals of the stored teacher trajectories (default {TEACHER_POINTS})")
    parser.add_argument("--teacher-dtype", choices=("float64", "float32", "float16"), default="float64",
                        help="storage precision of the teacher trajectories (default float64)")
    parser.add_argument("--teacher-bank", default=None, metavar="DIR",
                        help="keep the teacher trajectories on disk in this folder (memory-mapped, not in RAM): "
                             "written if it does not exist, reused if it holds the same bank, refused otherwise")
    parser.add_argument("--samples", type=int, default=None,
                        help="training noises (default: 4096 for a mixture or a callable, 256 for an embedded model)")
    parser.add_argument("--validation", type=int, default=None,
                        help="held-out validation noises (default 2048; 128 for an embedded model)")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"optimizer steps per step count, 1-{MAX_ITERATIONS} (default {DEFAULT_ITERATIONS})")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"noise samples per step, 1-{MAX_BATCH} (default 256; 64 for an embedded model)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"learning rate (default {DEFAULT_LR:g})")
    parser.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS,
                        help=f"starts explored, the best by validation continues (default {DEFAULT_RESTARTS})")
    parser.add_argument("--loss", choices=LOSSES, default=DEFAULT_LOSS, help=f"training loss (default {DEFAULT_LOSS})")
    parser.add_argument("--order-cap", action="store_true",
                        help="the paper's cap for N <= 6: the last two steps use only the last two evaluations")
    parser.add_argument("--seed", type=int, default=0, help="0 to 2**32-1 (torch's CPU generator keeps 32 bits)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint OUT.ckpt")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or 'wrote' line")


def check_arguments(args: argparse.Namespace) -> None:
    """InvalidInput naming the flag for any value that would make the search fail or write an unsearched solver;
    InputFileError if --out or --teacher-bank cannot be written. Runs before any computation."""
    from fewstep.files import check_output
    from fewstep.generate import MAX_SEED  # torch's CPU generator keeps 32 bits, as for generate's noise

    if args.model is not None and args.problem is not None and args.model != args.problem:
        raise InvalidInput(f"--model {args.model} and --problem {args.problem} disagree; give one")
    args.model = args.model or args.problem or "gmm8d"
    # A family: a comma list (a pipeline folder whose name holds a comma is still one model).
    args.family = ([m.strip() for m in args.model.split(",")] if "," in args.model and not os.path.exists(args.model)
                   else None)
    if args.family is not None:
        if len(args.family) < 2 or not all(args.family) or len(set(args.family)) < len(args.family):
            raise InvalidInput(f"--model {args.model}: a family is two or more distinct models, e.g. gmm8d,digits")
        if args.prompts is not None:
            raise InvalidInput("--prompts: a family (--model A,B) takes mixtures, embedded models and module:function "
                               "velocities, not diffusers pipelines")
    try:
        args.steps = parse_steps(args.steps) if isinstance(args.steps, str) else list(args.steps)
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    if not args.steps or not (2 <= args.steps[0] and args.steps[-1] <= MAX_SEARCH_STEPS):
        raise InvalidInput(f"--steps must be integers from 2 to {MAX_SEARCH_STEPS}, got {args.steps}")
    for flag, value, low, high in (("--iterations", args.iterations, 1, MAX_ITERATIONS),
                                   ("--batch", 1 if args.batch is None else args.batch, 1, MAX_BATCH),
                                   ("--seed", args.seed, 0, MAX_SEED),
                                   ("--restarts", args.restarts, 1, 16),
                                   ("--teacher-points", args.teacher_points, 2, 10**5)):
        if not low <= value <= high:
            raise InvalidInput(f"{flag} must be an integer from {low} to {high}, got {value}")
    # --validation 0 would keep unvalidated parameters and record a NaN error: the best-by-validation needs noises.
    for flag, value, low in (("--samples", args.samples, 1), ("--validation", args.validation, 1)):
        if value is not None and not low <= value <= MAX_SAMPLES:
            raise InvalidInput(f"{flag} must be an integer from {low} to {MAX_SAMPLES}, got {value}")
    if not (np.isfinite(args.lr) and args.lr > 0):
        raise InvalidInput(f"--lr must be a positive number, got {args.lr}")
    for flag, problem in (("--shift", shift_problem(args.shift)), ("--mu", shift_problem(1.0, args.mu))):
        if problem:
            raise InvalidInput(f"{flag}: {problem}")
    if args.mu is not None and args.shift != 1.0:
        raise InvalidInput("give --shift or --mu, not both")
    if args.guidance is not None and not (np.isfinite(args.guidance) and args.guidance >= 0):
        raise InvalidInput(f"--guidance must be a number ≥ 0, got {args.guidance}")
    try:
        if args.teacher is not None:
            parse_teacher(args.teacher)
    except ValueError as err:
        raise InvalidInput(f"--teacher: {err}") from None
    if args.shape is not None:
        parts = [p.strip() for p in args.shape.split(",")]
        if not all(p.isdigit() and len(p) <= 9 and int(p) > 0 for p in parts):
            raise InvalidInput(f"--shape must be positive integers separated by commas, e.g. 4,64; got {args.shape!r}")
        args.shape = tuple(int(p) for p in parts)
        if math.prod(args.shape) > MAX_SAMPLE_ELEMENTS:
            raise InvalidInput(f"--shape {args.shape!r} has {math.prod(args.shape):,} numbers per sample; at most "
                               f"{MAX_SAMPLE_ELEMENTS:,} (a Flux 1024² latent has 262,144)")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not 1 <= value <= 2**16:
            raise InvalidInput(f"{flag} must be a positive number of pixels, got {value}")
        if value is not None and args.prompts is None:
            raise InvalidInput(f"{flag} applies to a diffusers pipeline (searched with --prompts)")
    if args.shape is not None and not any(is_velocity_spec(m) for m in args.family or [args.model]):
        raise InvalidInput("--shape applies to a module:function velocity; mixtures, embedded models and pipelines "
                           "know their own shape")
    if args.prompts is not None:
        args.prompt_list = read_prompts(args.prompts)
    if not args.out or args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
        raise InvalidInput(f"--out {args.out!r} names a directory; give the solver file's path, e.g. my6.json")
    if args.teacher_bank is not None:
        if not args.teacher_bank.strip():
            raise InvalidInput("--teacher-bank is empty; give the folder for the teacher bank (a new path is created)")
        if (args.family is None and os.path.isdir(args.teacher_bank)
                and not os.path.lexists(os.path.join(args.teacher_bank, "bank.json"))):
            raise InputFileError(f"--teacher-bank {args.teacher_bank}: not a teacher bank (no bank.json in it); give "
                                 "a new folder for the bank")
        bank = os.path.realpath(args.teacher_bank)
        for path in (args.out, checkpoint_path(args.out)):
            real = os.path.realpath(path)
            if real == bank or real.startswith(bank.rstrip(os.sep) + os.sep):
                raise InvalidInput(f"--out {args.out}: {path} is the --teacher-bank folder {args.teacher_bank} or "
                                   "lies inside it; give an --out outside the bank")
    check_output(args.out, "--out")
    check_output(checkpoint_path(args.out), "checkpoint")
    if args.teacher_bank is not None:
        if os.path.lexists(args.teacher_bank) and not os.path.isdir(args.teacher_bank):
            raise InputFileError(f"--teacher-bank {args.teacher_bank} is not a folder; the bank is a folder (a new "
                                 "path is created)")
        if not os.path.lexists(args.teacher_bank):
            check_output(os.path.join(args.teacher_bank, "bank.json"), "--teacher-bank")


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file; InputFileError if it cannot be read, InvalidInput if empty."""
    try:
        if not Path(path).is_file():
            raise InputFileError(f"--prompts {path}: no such file")
        if Path(path).stat().st_size > MAX_PROMPTS_BYTES:
            raise InputFileError(f"--prompts {path}: larger than {MAX_PROMPTS_BYTES // 2**20} MiB; a prompts file "
                                 "holds one prompt per line")
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputFileError(f"--prompts {path}: not a UTF-8 text file") from None
    except OSError as err:
        if isinstance(err, InputFileError):
            raise
        raise InputFileError(f"--prompts {path}: cannot read it ({err.strerror or err})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInput(f"--prompts {path}: no prompts (one per line)")
    return prompts


def checkpoint_path(out: str | os.PathLike) -> str:
    return os.fspath(out) + ".ckpt"


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1): the default process group for the block, gloo on CPU and nccl on GPU,
    destroyed after it.

    torch._dynamo is imported first. torch.optim imports it at the first optimizer, and imported after
    init_process_group it keeps a reference to the default group: destroy_process_group then frees nothing, and
    gloo's threads are torn down at interpreter exit, where a peer closing its sockets at the same moment aborts the
    process ("terminate called without an active exception"; 1 run in about 50 on a loaded 2-core machine, after
    the solver file was written)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    import torch._dynamo  # noqa: F401  (see above)
    import torch.distributed as dist

    if dist.is_initialized():  # the caller's group: theirs to destroy
        yield
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _new_folders_removed_on_error(path: str) -> Iterator[None]:
    """The folders above `path` that do not exist yet are removed again, where still empty, when the block raises: a
    failed search leaves no empty folder behind (one holding a checkpoint stays, for the rerun)."""
    missing = [folder for folder in Path(os.path.abspath(path)).parents if not folder.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


class _SigintStop:
    """While active, the first Ctrl-C asks the search to stop at the next iteration boundary (it then saves its
    checkpoint and raises); a second one interrupts at once."""

    def __init__(self) -> None:
        self.hit = False
        self.previous: Any = None

    def __call__(self) -> bool:
        return self.hit

    def __enter__(self) -> _SigintStop:
        def handler(signum: int, frame: Any) -> None:
            if self.hit:
                raise KeyboardInterrupt
            self.hit = True

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    import torch

    torch.set_num_threads(1)  # small models: intra-op threads only add overhead on a shared machine
    if args.quiet and getattr(args, "prompt_list", None) is not None:
        from fewstep.generate import quiet_libraries

        quiet_libraries()
    if args.family is not None:  # each member takes --samples, --validation, --batch, --guidance and --shape
        target: Target | list[Target] = [resolve_target(m, args.shape, args.guidance) for m in args.family]
        batch = args.batch
    else:
        target = resolve_target(args.model, args.shape, args.guidance, getattr(args, "prompt_list", None),
                                args.height, args.width)
        samples = args.samples if args.samples is not None else target.default_samples
        batch = min(target.default_batch if args.batch is None else args.batch, samples)
    ckpt = checkpoint_path(args.out)
    if args.fresh and os.environ.get("RANK", "0") == "0":
        Path(ckpt).unlink(missing_ok=True)
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    with _process_group(), _new_folders_removed_on_error(args.out):
        rank, _ = _world()
        if rank != 0:
            log = lambda text: None  # noqa: E731
        with _SigintStop() as stop:
            try:
                result = search_target(target, args.steps, samples=args.samples, validation=args.validation,
                                       teacher=args.teacher, teacher_points=args.teacher_points,
                                       teacher_dtype=getattr(torch, args.teacher_dtype), iterations=args.iterations,
                                       batch=batch, lr=args.lr, loss=args.loss, restarts=args.restarts,
                                       order_cap=args.order_cap, shift=args.shift, mu=args.mu, seed=args.seed,
                                       progress=not args.quiet, checkpoint=ckpt, stop=stop, log=log,
                                       teacher_bank=args.teacher_bank)
            except Interrupted:
                if rank == 0:
                    print(f"\nfewstep search: interrupted; the checkpoint {ckpt} resumes it (run the same command "
                          "again)", file=sys.stderr)
                return 130
        if rank != 0:
            return 0
        result.save(args.out)
        if not args.quiet:
            p = result.provenance
            calls = p["model_calls"]
            for n, info in p["steps"].items():
                if "members" in info:  # a family
                    each = ", ".join(f"{m['model']} {part['validation_rmse']:.3e} (adams2 "
                                     f"{part['adams2_validation_rmse']:.3e})"
                                     for m, part in zip(p["members"], info["members"], strict=True))
                    print(f"N={n}: validation score {info['validation_score']:.3f} (mean over the members of RMSE ÷ "
                          f"the start solver's); RMSE {each}, {info['seconds']} s")
                    continue
                print(f"N={n}: validation RMSE {info['validation_rmse']:.3e} (adams2 "
                      f"{info['adams2_validation_rmse']:.3e} on the same {p['validation_samples']} held-out noises), "
                      f"{info['seconds']} s")
            print(f"wrote {','.join(p['steps'])}-step solver for {args.model} to {args.out}: model calls "
                  f"{calls['total']:,} (teacher {calls['teacher']:,}, training {calls['training']:,}, validation "
                  f"{calls['validation']:,}; {p['processes']} process(es)), {p['seconds']} s")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m fewstep.search")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
