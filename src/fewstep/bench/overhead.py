"""Per-step overhead of fewstep's diffusers scheduler against diffusers' FlowMatchEulerDiscreteScheduler.

Both run FluxPipeline's loop without a model: a fixed model output, a Flux-size packed latent (default 1×4096×64,
a 1024² image), Flux-dev's config, `set_timesteps(sigmas=linspace(1, 1/N, N), mu=μ(seq_len))` and
`set_begin_index(0)`. The timed region is the N `step()` calls (set_timesteps is once per image, not per step);
per-step time = loop time / N, median over `repeats` runs, runs of all schedulers interleaved so that drift in the
machine's speed hits them alike.
"""

from __future__ import annotations

import statistics
import timeit

import numpy as np
import torch

from fewstep.bench.grids import FLUX_DEV, flux_mu
from fewstep.errors import InvalidInput
from fewstep.solvers.plan import StepCountError

DTYPES = (torch.bfloat16, torch.float32)


def _loop_seconds(scheduler, sample: torch.Tensor, output: torch.Tensor, steps: int, mu: float) -> float:
    """One timed run of the N `step()` calls (timeit, garbage collection off); `set_timesteps` is its untimed
    setup."""
    state = {}

    def setup() -> None:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=sample.device, mu=mu)
        scheduler.set_begin_index(0)
        state["timesteps"] = list(scheduler.timesteps)
        if sample.device.type == "cuda":
            torch.cuda.synchronize()

    def loop() -> None:
        x = sample
        for t in state["timesteps"]:
            x = scheduler.step(output, t, x, return_dict=False)[0]
        if sample.device.type == "cuda":
            torch.cuda.synchronize()

    return timeit.Timer(loop, setup=setup).timeit(number=1)


def _measurable(solvers: list[str] | None, steps: int) -> list[str]:
    """The solvers to time: all registered ones that can make `steps` calls with their default options (the shipped
    NeuralSolver tables stop at 10-15 steps), or the given list, each checked (InvalidInput naming --solvers)."""
    from fewstep import solvers as registry
    from fewstep.diffusers import FewstepScheduler

    usable = []
    for name in registry.names() if solvers is None else solvers:
        try:
            FewstepScheduler(solver=name, **FLUX_DEV).set_timesteps(steps, mu=1.0)
        except ValueError as err:
            if solvers is None:
                continue
            timed = f" (the overhead suite times {steps} steps)" if isinstance(err, StepCountError) else ""
            raise InvalidInput(f"--solvers: {' '.join(str(err).split())}{timed}") from None
        usable.append(name)
    return usable


def measure_overhead(solvers: list[str] | None = None, shape: tuple[int, ...] = (1, 4096, 64), steps: int = 28,
                     repeats: int = 5, device: str = "cpu") -> list[dict]:
    """One row per (solver, dtype): median µs per `step()` of fewstep's adapter and of FlowMatchEuler, and their
    ratio (< 1: the adapter is cheaper per step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.diffusers import FewstepScheduler

    names = _measurable(solvers, steps)
    mu = flux_mu(shape[1])  # shape is Flux's packed (batch, tokens, channels)
    rows = []
    for dtype in DTYPES:
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn(shape, generator=gen).to(device, dtype)
        output = (0.1 * torch.randn(shape, generator=gen)).to(device, dtype)
        schedulers = {"diffusers": FlowMatchEulerDiscreteScheduler(**FLUX_DEV)}
        schedulers |= {name: FewstepScheduler(solver=name, **FLUX_DEV) for name in names}
        for scheduler in schedulers.values():  # warm-up: allocator, kernels, first-call paths
            _loop_seconds(scheduler, sample, output, steps, mu)
        seconds: dict[str, list[float]] = {key: [] for key in schedulers}
        for _ in range(repeats):
            for key, scheduler in schedulers.items():
                seconds[key].append(_loop_seconds(scheduler, sample, output, steps, mu))
        per_step = {key: 1e6 * statistics.median(values) / steps for key, values in seconds.items()}
        for name in names:
            rows.append({"solver": name, "dtype": str(dtype).removeprefix("torch."),
                         "shape": "x".join(map(str, shape)), "steps": steps, "device": device,
                         "fewstep_us": per_step[name], "diffusers_us": per_step["diffusers"],
                         "ratio": per_step[name] / per_step["diffusers"]})
    return rows


def overhead_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table, with what was measured on one line above it."""
    if not rows:
        return "(no overhead rows)\n"
    first = rows[0]
    lines = [f"Per-step time of `step()`, latent {first['shape']}, {first['steps']} steps, {first['device']}, "
             f"{torch.get_num_threads()} torch thread(s); median over repeats. Ratio < 1: fewstep is cheaper than "
             "FlowMatchEulerDiscreteScheduler.", "",
             "| solver | dtype | fewstep µs/step | FlowMatchEuler µs/step | ratio |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['solver']} | {r['dtype']} | {r['fewstep_us']:.1f} | {r['diffusers_us']:.1f} | {r['ratio']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"
