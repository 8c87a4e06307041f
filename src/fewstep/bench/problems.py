"""The problems `fewstep bench` measures on: the exact Gaussian-mixture testbed and the embedded image models.

Each problem brings its flow model, the bench noises with a high-accuracy reference solve from them, distribution
metrics of a sample set, and a separate training noise bank for searching a NeuralSolver on the problem itself
(drawn with another seed, so the searched solver is scored on noises it never saw).

Problems are registered by name in `PROBLEMS` (name → loader(name, samples, seed, cache, progress)); an embedded
model with the interface of `fewstep.models.digits` (DIM, load_embedded, load_classifier, load_data, velocity_fn(labels,
guidance)) becomes a problem with one line: `PROBLEMS["name"] = embedded("fewstep.models.name", guidance)`.
Reference solves are cached on disk (`cache`), keyed by everything they depend on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.errors import InputFileError, InvalidInput
from fewstep.files import atomic_write

EMBEDDED_RTOL = 1e-8  # digits: 3e-8 RMSE against an rtol 1e-10 solve, far below any solver's error at 20 NFE (~1e-2)
EMBEDDED_CHECK = 32  # samples re-solved 100x tighter to measure the reference's own accuracy
EMBEDDED_BANK = 128  # training noises: the teacher solve on a trained model costs ~0.2 s per noise
GMM_BANK = 1024
MIN_SAMPLES = 2


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
    to_image: Callable | None = None  # samples → PIL image grid (image problems)
    guidance: float = 1.0  # the classifier-free guidance scale in `velocity` (1: none)


def default_cache() -> Path:
    """~/.cache/fewstep/bench (or $XDG_CACHE_HOME/fewstep/bench)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fewstep" / "bench"


def _normal(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, torch.nn.Module):
            for t in p.state_dict().values():
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:24]


def _label(name: str, samples: int | None, progress: bool) -> str | None:
    """The progress bar's label for the reference solve of `name` on `samples` noises (None: no bar; a model module
    that picks its own noise count gets the label without it and appends it)."""
    if not progress:
        return None
    return f"reference solve {name}" + ("" if samples is None else f" ({samples} noises)")


def cached(cache: Path | None, key: str, compute: Callable[[], dict]) -> dict:
    """`compute()` (a dict of tensors and numbers), stored under `cache`/`key`.pt and read back on the next run
    (None: computed every time). A file that cannot be stored is noted on stderr; the value is still returned."""
    if cache is None:
        return compute()
    path = Path(cache) / f"{key}.pt"
    if path.is_file():
        try:
            value = torch.load(path, weights_only=True)
            if isinstance(value, dict):  # a file of another format is recomputed and replaced, as a damaged one
                return value
        except Exception:
            pass
    value = compute()
    buf = io.BytesIO()
    torch.save(value, buf)
    try:  # the cache only saves time: a solve that cannot be stored is still used
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue())
    except (OSError, InputFileError) as err:
        print(f"note: this reference solve is not stored in the cache {cache} ({err})", file=sys.stderr)
    return value


def mixture(name: str, samples: int, seed: int, cache: Path | None = None, progress: bool = False) -> Problem:
    """A testbed mixture: exact velocity, DOP853 reference (rtol 1e-10), energy distance to fresh data samples and
    the mode-flip rate against the reference (RMSE on a mixture is dominated by the few samples that switch modes)."""
    from fewstep.testbed import energy_distance, preset, reference_solve

    g = preset(name)
    noise = _normal(samples, g.dim, seed)

    def solve() -> dict:
        ref = reference_solve(g.velocity, noise, progress=_label(name, samples, progress))
        return {"x": ref.x, "error": ref.error}

    ref = cached(cache, f"{name}-{_digest(name, g.means, g.variances, g.log_weights, noise, 1e-10)}", solve)
    data_gen = torch.Generator().manual_seed(seed + 2)
    data = g.sample(samples, data_gen)
    floor = energy_distance(g.sample(samples, data_gen), data)
    notes = (f"reference: scipy DOP853, rtol = atol = 1e-10, the whole batch as one system; max |error| against a "
             f"100x tighter solve {float(ref['error']):.1e}",
             f"ED: energy distance to {samples} exact data samples; its noise floor (two independent data sets of "
             f"{samples}) is {floor:.4f}, and the reference samples score {energy_distance(ref['x'], data):.4f}",
             "mode flips: the fraction of samples that end in another mixture component than the reference's")
    modes = g.component(ref["x"])

    def quality(x: torch.Tensor) -> dict[str, float]:
        flips = (g.component(x) != modes).double().mean()
        return {"energy_distance": energy_distance(x, data), "mode_flips": float(flips)}

    return Problem(name, g.velocity, noise, ref["x"], quality, g.velocity, _normal(GMM_BANK, g.dim, seed + 1), notes)


def labelled(model: torch.nn.Module, guidance: float = 1.0) -> Callable:
    """`model(x, sigma)` on states that carry their class label as one extra, constant coordinate (velocity 0): the
    search draws random minibatches from its noise bank, and each noise has to keep its own label."""

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        v = model.velocity_fn(x[:, -1].round().long(), guidance)(x[:, :-1], sigma)
        return torch.cat([v, torch.zeros_like(x[:, -1:])], dim=1)

    return velocity


def embedded_problem(module_name: str, guidance: float, name: str, samples: int, seed: int,
                     cache: Path | None = None, progress: bool = False) -> Problem:
    """An embedded class-conditional flow model in float64, labels cycling 0..9, classifier-free guidance
    `guidance` (1: none); FD in its shipped classifier's features to the real data and to the reference samples
    (FD-ref)."""
    from fewstep.models.digits import frechet_distance
    from fewstep.testbed import reference_solve

    mod = importlib.import_module(module_name)
    model = mod.load_embedded(dtype=torch.float64)
    labels = torch.arange(samples) % 10
    noise = _normal(samples, mod.DIM, seed)
    velocity = model.velocity_fn(labels, guidance)
    k = min(samples, EMBEDDED_CHECK)

    def solve() -> dict:
        label = _label(name, samples, progress)
        x = reference_solve(velocity, noise, rtol=EMBEDDED_RTOL, atol=EMBEDDED_RTOL, check=False, progress=label).x
        tight = reference_solve(model.velocity_fn(labels[:k], guidance), noise[:k], rtol=EMBEDDED_RTOL / 100,
                                atol=EMBEDDED_RTOL / 100, check=False, progress=label and f"{label}, its check").x
        error = tight - x[:k]
        return {"x": x, "max_error": float(error.abs().max()), "rmse": float(error.pow(2).mean().sqrt())}

    ref = cached(cache, f"{name}-{_digest(module_name, guidance, model, noise, EMBEDDED_RTOL)}", solve)
    reference = ref["x"]

    classifier = mod.load_classifier(dtype=torch.float64)
    data = mod.load_data()[0]
    real = classifier.features(data.reshape(len(data), -1).double())
    halves = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed)).chunk(2)
    floor = frechet_distance(real[halves[0]], real[halves[1]])
    ref_features = classifier.features(reference)

    def quality(x: torch.Tensor) -> dict[str, float]:
        f = classifier.features(x.double())
        return {"fd": frechet_distance(f, real), "fd_ref": frechet_distance(f, ref_features)}

    cfg = "guidance 1 (no CFG)" if guidance == 1 else f"classifier-free guidance {guidance:g}"
    notes = (f"model: the embedded {module_name.rsplit('.', 1)[-1]} flow in float64, labels cycling 0..9, {cfg}",
             f"reference: scipy DOP853 on the flattened batch, model in float64, rtol = atol = {EMBEDDED_RTOL:g}; "
             f"against an rtol {EMBEDDED_RTOL / 100:g} solve of its first {k} samples: max |error| "
             f"{float(ref['max_error']):.1e}, RMSE {float(ref['rmse']):.1e}",
             f"FD: Fréchet distance in the shipped classifier's {real.shape[1]}-d features to all {len(real)} real "
             f"images; noise floor (two random halves of the real data, {len(halves[0])} and {len(halves[1])}) "
             f"{floor:.3f}; the reference samples score {frechet_distance(ref_features, real):.3f}. "
             f"FD-ref: to the reference samples from the same noises (0 for the exact ODE solution)")
    train_labels = (torch.arange(EMBEDDED_BANK) % 10).to(torch.float64)[:, None]
    train = torch.cat([_normal(EMBEDDED_BANK, mod.DIM, seed + 1), train_labels], dim=1)
    return Problem(name, velocity, noise, reference, quality, labelled(model, guidance), train, notes, image=True,
                   to_image=getattr(mod, "to_image", None), guidance=guidance)


def embedded(module_name: str, guidance: float = 1.0) -> Callable[..., Problem]:
    """The loader of an embedded model's problem (see `embedded_problem`)."""
    return functools.partial(embedded_problem, module_name, guidance)


def from_module(module_name: str, guidance: float = 1.0) -> Callable[..., Problem]:
    """The loader of a model module that builds its own problem: `module.bench_problem(samples, seed, guidance,
    cache, progress)` (it ships or caches its own reference solve and may use fewer noises than asked, so
    `progress` is the bar's label without the count), shown with the module's `to_image`."""

    def load(name: str, samples: int, seed: int, cache: Path | None = None, progress: bool = False) -> Problem:
        mod = importlib.import_module(module_name)
        try:
            problem = mod.bench_problem(samples, seed, guidance, cache, _label(name, None, progress))
        except FileNotFoundError as err:  # its weights or data are not installed here
            raise InputFileError(f"--problem {name}: {err.strerror or err}: {err.filename}") from None
        if problem.to_image is None and hasattr(mod, "to_image"):
            problem = dataclasses.replace(problem, to_image=mod.to_image)
        return dataclasses.replace(problem, name=name)

    return load


PROBLEMS: dict[str, Callable[..., Problem]] = {  # name → loader(name, samples, seed, cache, progress)
    "gmm2d": mixture,
    "gmm8d": mixture,
    "gmm-stiff": mixture,
    "digits": embedded("fewstep.models.digits"),
    "digits-cfg3": embedded("fewstep.models.digits", guidance=3.0),
    "fashion": from_module("fewstep.models.fashion"),  # its reference solves ship with the package
    "fashion-cfg3": from_module("fewstep.models.fashion", guidance=3.0),
    # strong guidance (SD3 samples at 7, Qwen-Image at 4): where two-step formulas go unstable (docs/solvers.md)
    "digits-cfg5": embedded("fewstep.models.digits", guidance=5.0),
    "digits-cfg7": embedded("fewstep.models.digits", guidance=7.0),
    "fashion-cfg5": from_module("fewstep.models.fashion", guidance=5.0),
}
HEADLINE_PROBLEMS = ("gmm8d", "gmm-stiff", "digits", "digits-cfg3", "fashion", "fashion-cfg3")  # `--problem all`


def load_problem(name: str, samples: int, seed: int, cache: Path | None = None, progress: bool = False) -> Problem:
    """The problem `name` with `samples` bench noises drawn from `seed` (training noises from seed + 1); `cache`: the
    folder of reference solves (None: solve, store nothing); `progress`: a bar while a reference is solved."""
    if name not in PROBLEMS:
        raise InvalidInput(f"--problem: unknown problem {name!r}; available: {', '.join(PROBLEMS)}, all")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < MIN_SAMPLES:
        raise InvalidInput(f"--samples must be an integer of at least {MIN_SAMPLES} (distribution metrics need a "
                           f"spread), got {samples!r}")
    try:
        return PROBLEMS[name](name, samples, seed, cache, progress)
    except RuntimeError as err:  # scipy's solve failed or its accuracy check did not hold: say which, in one line
        if "reference solve" not in str(err):
            raise
        raise InvalidInput(f"--problem {name}: {err} ({samples} noises, seed {seed})") from None


def is_image(name: str) -> bool:
    return PROBLEMS[name] is not mixture
