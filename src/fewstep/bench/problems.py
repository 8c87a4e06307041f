"""The problems `fewstep bench` measures on: the exact Gaussian-mixture testbed and the embedded digits model.

Each problem brings its flow model, the bench noises with a high-accuracy reference solve from them, distribution
metrics of a sample set, and a separate training noise bank for searching a NeuralSolver on the problem itself
(drawn with another seed, so the searched solver is scored on noises it never saw).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fewstep.testbed import PRESETS

PROBLEMS = (*PRESETS, "digits")
DIGITS_RTOL = 1e-8  # measured 3e-8 RMSE against an rtol 1e-10 solve, far below any solver's error at 20 NFE (~1e-2)
DIGITS_CHECK = 32  # samples re-solved 100x tighter to measure the digits reference's own accuracy
DIGITS_BANK = 128  # training noises: the teacher solve on the trained model costs ~0.2 s per noise
GMM_BANK = 1024


@dataclass(frozen=True)
class Problem:
    name: str
    velocity: Callable  # model(x, sigma) on `noise` (float64)
    noise: torch.Tensor
    reference: torch.Tensor  # the flow ODE solved accurately from `noise` to σ = 0
    quality: Callable[[torch.Tensor], dict[str, float]]  # distribution metrics of a sample set, by column name
    search_model: Callable  # model(x, sigma) on `train_noise`, for fewstep.search
    train_noise: torch.Tensor
    notes: tuple[str, ...]  # what the reader needs to judge the numbers: reference accuracy, noise floors
    image: bool = False


def _normal(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def load_problem(name: str, samples: int, seed: int) -> Problem:
    """The problem `name` with `samples` bench noises drawn from `seed` (training noises from seed + 1)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; available: {', '.join(PROBLEMS)}")
    if samples < 2:
        raise ValueError(f"--samples must be at least 2 (distribution metrics need a spread), got {samples}")
    return digits(samples, seed) if name == "digits" else mixture(name, samples, seed)


def mixture(name: str, samples: int, seed: int) -> Problem:
    """A testbed mixture: exact velocity, DOP853 reference (rtol 1e-10), energy distance to fresh data samples and
    the mode-flip rate against the reference (RMSE on a mixture is dominated by the few samples that switch modes)."""
    from fewstep.testbed import energy_distance, preset, reference_solve

    g = preset(name)
    noise = _normal(samples, g.dim, seed)
    ref = reference_solve(g.velocity, noise)
    data_gen = torch.Generator().manual_seed(seed + 2)
    data = g.sample(samples, data_gen)
    floor = energy_distance(g.sample(samples, data_gen), data)
    notes = (f"reference: scipy DOP853, rtol = atol = 1e-10, the whole batch as one system; max |error| against a "
             f"100x tighter solve {ref.error:.1e}",
             f"ED: energy distance to {samples} exact data samples; its noise floor (two independent data sets of "
             f"{samples}) is {floor:.4f}, and the reference samples score {energy_distance(ref.x, data):.4f}",
             "mode flips: the fraction of samples that end in another mixture component than the reference's")
    modes = g.component(ref.x)

    def quality(x: torch.Tensor) -> dict[str, float]:
        flips = (g.component(x) != modes).double().mean()
        return {"energy_distance": energy_distance(x, data), "mode_flips": float(flips)}

    return Problem(name, g.velocity, noise, ref.x, quality, g.velocity, _normal(GMM_BANK, g.dim, seed + 1), notes)


def labelled(model: torch.nn.Module) -> Callable:
    """`model(x, sigma)` on states that carry their class label as one extra, constant coordinate (velocity 0): the
    search draws random minibatches from its noise bank, and each noise has to keep its own label."""

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        v = model.velocity_fn(x[:, -1].round().long())(x[:, :-1], sigma)
        return torch.cat([v, torch.zeros_like(x[:, -1:])], dim=1)

    return velocity


def digits(samples: int, seed: int) -> Problem:
    """The embedded digits model in float64, labels cycling 0..9, guidance 1; FD in the shipped classifier's
    features to the real data and to the reference samples (FD-ref)."""
    from fewstep.models.digits import DIM, frechet_distance, load_classifier, load_data, load_embedded
    from fewstep.testbed import reference_solve

    model = load_embedded(dtype=torch.float64)
    labels = torch.arange(samples) % 10
    noise = _normal(samples, DIM, seed)
    reference = reference_solve(model.velocity_fn(labels), noise, rtol=DIGITS_RTOL, atol=DIGITS_RTOL, check=False).x
    k = min(samples, DIGITS_CHECK)
    tight = reference_solve(model.velocity_fn(labels[:k]), noise[:k], rtol=DIGITS_RTOL / 100, atol=DIGITS_RTOL / 100,
                            check=False).x
    error = tight - reference[:k]

    classifier = load_classifier(dtype=torch.float64)
    data, _ = load_data()
    real = classifier.features(data.double())
    halves = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed)).chunk(2)
    floor = frechet_distance(real[halves[0]], real[halves[1]])
    ref_features = classifier.features(reference)

    def quality(x: torch.Tensor) -> dict[str, float]:
        f = classifier.features(x.double())
        return {"fd": frechet_distance(f, real), "fd_ref": frechet_distance(f, ref_features)}

    notes = ("model: the embedded digits flow in float64, labels cycling 0..9, guidance 1 (no CFG)",
             f"reference: scipy DOP853 on the flattened batch, model in float64, rtol = atol = {DIGITS_RTOL:g}; "
             f"against an rtol {DIGITS_RTOL / 100:g} solve of its first {k} samples: max |error| "
             f"{float(error.abs().max()):.1e}, RMSE {float(error.pow(2).mean().sqrt()):.1e}",
             f"FD: Fréchet distance in the shipped classifier's 128-d features to all {len(real)} real digits; "
             f"noise floor (two random halves of the real data, {len(halves[0])} and {len(halves[1])}) "
             f"{floor:.3f}; the reference samples score {frechet_distance(ref_features, real):.3f}. "
             f"FD-ref: to the reference samples from the same noises (0 for the exact ODE solution)")
    train_labels = (torch.arange(DIGITS_BANK) % 10).to(torch.float64)[:, None]
    train = torch.cat([_normal(DIGITS_BANK, DIM, seed + 1), train_labels], dim=1)
    return Problem("digits", model.velocity_fn(labels), noise, reference, quality, labelled(model), train, notes,
                   image=True)
