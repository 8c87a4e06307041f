"""Error statistics of a sample set against the reference solution from the same noises.

RMSE = sqrt(mean over samples and coordinates of (x − x_ref)²), with a bootstrap 95 % confidence interval
(`scipy.stats.bootstrap`, BCa, resampling the noises): on the mixtures a few samples that switch modes carry most of
it. The median error is defined once, here: the median over the noises of each sample's L2 error ‖x − x_ref‖₂.
"""

from __future__ import annotations

import numpy as np
import torch

CONFIDENCE = 0.95
RESAMPLES = 2000
MEDIAN_DEFINITION = ("median error: the median over the noises of each sample's L2 error ‖x − x_ref‖₂ (x_ref: the "
                     "reference solve from the same noise)")
RMSE_DEFINITION = ("RMSE: sqrt of the mean over noises and coordinates of (x − x_ref)²; [lo, hi]: its bootstrap 95 % "
                   "confidence interval (scipy.stats.bootstrap, BCa, resampling the noises)")


def per_sample_sq(x: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Each sample's mean squared error over its coordinates (float64, shape (N,))."""
    return (x.double() - reference.double()).flatten(1).pow(2).mean(dim=1).numpy()


def rmse(sq: np.ndarray) -> float:
    return float(np.sqrt(np.mean(sq)))


def rmse_ci(sq: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % interval of the RMSE from per-sample mean squared errors `sq`."""
    import scipy.stats

    sq = np.asarray(sq, dtype=np.float64)
    if np.ptp(sq) == 0:  # every sample has the same error: the interval is the point (BCa would divide by 0)
        return rmse(sq), rmse(sq)
    res = scipy.stats.bootstrap((sq,), lambda s, axis: np.sqrt(np.mean(s, axis=axis)), vectorized=True,
                                n_resamples=resamples, confidence_level=CONFIDENCE, method="BCa",
                                rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def median_error(sq: np.ndarray, dim: int) -> float:
    """The median per-sample L2 error, from per-sample mean squared errors over `dim` coordinates."""
    return float(np.median(np.sqrt(np.asarray(sq) * dim)))


def error_stats(x: torch.Tensor, reference: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    sq = per_sample_sq(x, reference)
    lo, hi = rmse_ci(sq, resamples, seed)
    return {"rmse": rmse(sq), "rmse_lo": lo, "rmse_hi": hi, "median_error": median_error(sq, x[0].numel())}


def ratio_ci(sq_a: np.ndarray, sq_b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95 % interval of RMSE(a) / RMSE(b) from the per-sample squared errors of two methods on the same
    noises (`scipy.stats.bootstrap`, paired, BCa): the noises are resampled together, so the noise that is hard for
    both cancels and the interval is far narrower than the two RMSE intervals side by side."""
    import scipy.stats

    a, b = np.asarray(sq_a, dtype=np.float64), np.asarray(sq_b, dtype=np.float64)
    ratio = rmse(a) / rmse(b)
    if np.ptp(a / np.maximum(b, 1e-300)) == 0:
        return ratio, ratio
    res = scipy.stats.bootstrap((a, b), lambda x, y, axis: np.sqrt(np.mean(x, axis=axis) / np.mean(y, axis=axis)),
                                paired=True, vectorized=True, n_resamples=resamples, confidence_level=CONFIDENCE,
                                method="BCa", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
