"""Differentiable solver search (NEURALSOLVER.md §6): fit a NeuralSolver's grid and weights to one flow model.

Paper parameterisation (§4): Δt = softmax(r), free strictly-lower C with the diagonal implied (rows sum to 1), and
for N ≤ 6 the last two rows use only Q_{i−1}, Q_i. Reweighted loss (§6, `TrajsReWeightTrainer`): Σ_i MSE of the
student state x_i against the teacher at σ_i, plus 1000·Huber(δ=1e−3) on the final sample.

Departures from the released recipe, each for a measured reason (§6.1, §8): the teacher is a precomputed bank of
accurate trajectories (exact DOP853 by default; the Euler-100 teacher caps the student at its own error, §6.1.6),
teacher states are interpolated at the student's σ_i instead of rounded to a teacher index, the start is Adams-2
instead of Euler, and the optimizer is Adam. The model gets σ_i as a float, so Δt gets gradients through the update
only.

Also the `fewstep search` subcommand (`add_arguments`, `run`).
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fewstep.solvers.neuralsolver import SolverFile

LOSSES = ("reweighted", "trajectory")


def teacher_bank(model: Callable, noise: Any, teacher: str = "exact", teacher_steps: int = 200) -> tuple[Any, Any]:
    """Teacher states at `teacher_steps + 1` uniform σ from 1 to 0: (sigmas (L+1,), states (L+1, B, ...))."""
    import torch

    sigmas = torch.linspace(1.0, 0.0, teacher_steps + 1, dtype=torch.float64)
    if teacher == "euler":  # the official teacher (§6), here on a fixed bank
        states = [noise]
        with torch.no_grad():
            for k in range(teacher_steps):
                states.append(states[-1] - (sigmas[k] - sigmas[k + 1]) * model(states[-1], float(sigmas[k])))
        return sigmas, torch.stack(states)
    if teacher != "exact":
        raise ValueError(f"teacher must be 'exact' or 'euler', got {teacher!r}")
    from scipy.integrate import solve_ivp

    shape = tuple(noise.shape)

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(y.reshape(shape)), s).to(torch.float64).numpy().ravel()

    sol = solve_ivp(rhs, (1.0, 0.0), noise.numpy().ravel(), method="DOP853", rtol=1e-9, atol=1e-9,
                    t_eval=sigmas.numpy())
    if not sol.success:
        raise RuntimeError(f"teacher solve failed: {sol.message}")
    return sigmas, torch.from_numpy(sol.y.T.reshape((teacher_steps + 1, *shape)).copy())


def _interpolate(sigmas: Any, states: Any, sigma: Any) -> Any:
    """Teacher state at σ, linear in σ between bank points (σ uniform from 1 to 0)."""
    import torch

    u = (1.0 - sigma) * (len(sigmas) - 1)
    k = int(torch.clamp(u.detach().floor(), 0, len(sigmas) - 2))
    w = u - k
    return (1 - w) * states[k] + w * states[k + 1]


def _with_time_gradient(model: Callable, x: Any, sigma: Any, h: float = 1e-5) -> Any:
    """model(x, σ) with ∂v/∂σ attached by a one-sided finite difference: the model takes σ as a float, but Δt must
    also get its gradient through where the model is evaluated (§6: "t_i fed to the model"); without it the grid
    drifts the wrong way and the search diverges (measured)."""
    import torch

    s = float(sigma.detach())
    v = model(x, s)
    with torch.no_grad():
        dv = (v - model(x, s - h)) / h
    return v + (sigma - s) * dv


def _initial_coefficients(steps: int, init: str) -> np.ndarray:
    """Strictly-lower C: zero (Euler, the official start) or constant-step AB2 (C[i, i−1] = −½)."""
    c = np.zeros((steps, steps))
    if init == "adams2":
        c[np.arange(1, steps), np.arange(steps - 1)] = -0.5
    elif init != "euler":
        raise ValueError(f"init must be 'adams2' or 'euler', got {init!r}")
    return c


def _free_mask(steps: int, order_cap: bool) -> np.ndarray:
    """Strictly-lower entries that are searched; the N ≤ 6 order cap keeps only column i−1 in the last two rows."""
    mask = np.tril(np.ones((steps, steps), dtype=bool), -1)
    if order_cap and steps <= 6:
        for i in range(max(steps - 2, 1), steps):
            mask[i, :] = False
            mask[i, i - 1] = True
    return mask


def search(model: Callable[[Any, float], Any], steps: int, *, teacher: str = "exact", teacher_steps: int = 200,
           iterations: int = 1500, batch: int = 64, noise: Any = None, bank: int = 1024, loss: str = "reweighted",
           lr: float = 1e-2, optimizer: str = "adam", init: str = "adams2", progress: bool = False, seed: int = 0,
           order_cap: bool = True, dim: int | None = None, model_name: str = "",
           trajectories: tuple[Any, Any] | None = None) -> SolverFile:
    """Search a `steps`-step solver for the flow model `model(x, sigma)` (torch, returns v = ε − x0).

    `noise`: the training noise bank (a tensor, first axis = samples) or a callable n → tensor (called once for
    `bank` samples); default: `bank` standard normals of shape (dim,). The teacher bank is computed once from it.
    `order_cap=False` drops the paper's N ≤ 6 cap (gmm8d N=6: RMSE 1.4e−2 instead of 2.9e−2).
    `trajectories`: `teacher_bank(model, noise, teacher, teacher_steps)` computed once and shared by searches of
    several step counts on the same noise (on a trained model the teacher solve costs more than the search).
    """
    import torch
    from tqdm.auto import tqdm

    if steps < 2:
        raise ValueError(f"steps must be at least 2 to search anything, got {steps}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    gen = torch.Generator().manual_seed(seed)
    if noise is None:
        if dim is None:
            raise ValueError("give `noise` (a tensor bank or a callable n → noise) or `dim`")
        noise = torch.randn(bank, dim, generator=gen, dtype=torch.float64)
    elif callable(noise):
        noise = noise(bank)
    noise = torch.as_tensor(noise).to(torch.float64)
    started = time.perf_counter()
    t_sigmas, t_states = trajectories or teacher_bank(model, noise, teacher, teacher_steps)

    mask = torch.from_numpy(_free_mask(steps, order_cap))
    logits = torch.zeros(steps, dtype=torch.float64, requires_grad=True)
    coeffs = torch.from_numpy(_initial_coefficients(steps, init)).requires_grad_(True)
    params = [logits, coeffs]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif optimizer == "lion":
        from lion_pytorch import Lion

        opt = Lion(params, lr=lr, weight_decay=0.0)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'lion', got {optimizer!r}")

    def rollout(x: Any) -> tuple[Any, list[Any], list[Any]]:
        dt = torch.softmax(logits, 0)
        c = coeffs * mask
        m = c + torch.diag(1.0 - c.sum(1))
        sigma = torch.ones((), dtype=torch.float64)
        states, sigmas, vs = [], [], []
        for i in range(steps):
            vs.append(_with_time_gradient(model, x, sigma))
            x = x - dt[i] * sum(m[i, j] * vs[j] for j in range(i + 1))
            sigma = sigma - dt[i]
            states.append(x)
            sigmas.append(sigma)
        return dt, states, sigmas

    bar = tqdm(range(iterations), desc=f"search N={steps}", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(noise), (min(batch, len(noise)),), generator=gen)
        _, states, sigmas = rollout(noise[idx])
        targets = [_interpolate(t_sigmas, t_states[:, idx], s) for s in sigmas]
        value = sum(torch.mean((x - t) ** 2) for x, t in zip(states, targets, strict=True))
        if loss == "reweighted":
            final = t_states[-1, idx]
            value = value + 1000.0 * torch.nn.functional.huber_loss(states[-1], final, delta=1e-3)
        opt.zero_grad()
        value.backward()
        opt.step()
        bar.set_postfix(loss=f"{value.item():.3e}", refresh=False)

    with torch.no_grad():
        dt = torch.softmax(logits, 0).numpy().copy()
        c = (coeffs * mask).numpy()
    matrix = c + np.diag(1.0 - c.sum(1))
    provenance = {"model": model_name or getattr(model, "__qualname__", type(model).__name__),
                  "teacher": f"{teacher}-{teacher_steps}", "loss": loss, "iterations": iterations, "batch": batch,
                  "bank": len(noise), "order_cap": order_cap, "lr": lr, "optimizer": optimizer, "init": init,
                  "seed": seed,
                  "seconds": round(time.perf_counter() - started, 2),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "source": "fewstep.search"}
    return SolverFile("flow", {steps: (dt, matrix)}, 1.0, provenance)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewstep.testbed import PRESETS

    parser.add_argument("--problem", choices=PRESETS, default="gmm8d", help="Gaussian-mixture flow to search on")
    parser.add_argument("--steps", type=int, default=6, help="model calls (NFE) of the searched solver")
    parser.add_argument("--out", required=True, help="where to write the solver file (JSON, written atomically)")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from fewstep.testbed import preset

    torch.set_num_threads(1)  # tiny problems: intra-op threads only add overhead (§6.1.7)
    problem = preset(args.problem)
    result = search(problem.velocity, args.steps, iterations=args.iterations, batch=args.batch, lr=args.lr,
                    seed=args.seed, dim=problem.dim, progress=True, model_name=args.problem)
    result.save(args.out)
    print(f"wrote {args.steps}-step solver for {args.problem} to {args.out} ({result.provenance['seconds']} s)")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m fewstep.search")
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
