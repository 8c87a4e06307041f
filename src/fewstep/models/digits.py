"""The embedded model: a class-conditional rectified-flow model of scikit-learn's 8×8 digits, small enough to ship,
and a small digits classifier whose penultimate features give a Fréchet distance (FD) for measuring samples offline.

Convention: x_σ = (1−σ)·x0 + σ·ε, the network predicts v = ε − x0 = dx/dσ; x is a flattened 8×8 image in [−1, 1]
(ink = +1, as in scikit-learn's digits). Label 10 is the "null" class for classifier-free guidance.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from importlib import resources

import numpy as np
import torch
from torch import nn

from fewstep.errors import InvalidInput

DIM = 64
NULL_CLASS = 10
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FLOW_FILE = "digits_flow.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
# One metadata key holding JSON: safetensors writes several keys in a random order, which would make the weight
# files' bytes (and their SHA-256) differ between two identical training runs.
METADATA_KEY = "fewstep"
Velocity = Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]  # model(x, sigma) -> v


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 64) float32 in [−1, 1] and their labels (N,) long."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 8.0 - 1.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed train/test split of the classifier: (train indices, test indices) of a seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:], perm[:n_test]


def sinusoidal(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) noise levels → (B, dim) features; frequencies 1…1000 so both coarse and fine σ differences show."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=sigma.device, dtype=sigma.dtype) * (-math.log(1000.0) / half))
    angles = 1000.0 * sigma[:, None] * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def guided_velocity(net: nn.Module, labels: torch.Tensor | int, guidance: float, null_class: int,
                    net_shape: tuple[int, ...] | None = None) -> Velocity:
    """`model(x, sigma) -> v` for `fewstep.sample` from a class-conditional `net(x, sigma, labels)`: one label for the
    whole batch or one per sample; states are reshaped to (B, *net_shape) for the network and v has the shape of x.
    With guidance g ≠ 1, classifier-free guidance v_null + g·(v_cond − v_null) in one batched forward."""
    param = next(net.parameters())
    labels = torch.as_tensor(labels, dtype=torch.long, device=param.device).reshape(-1)

    def model(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        h = x.to(param.device, param.dtype)
        if net_shape is not None:
            h = h.reshape(-1, *net_shape)
        s = torch.as_tensor(sigma, dtype=param.dtype, device=param.device)
        lab = labels.expand(len(h)) if labels.numel() == 1 else labels
        if guidance == 1.0:
            v = net(h, s, lab)
        else:
            cond, null = net(torch.cat([h, h]), s, torch.cat([lab, torch.full_like(lab, null_class)])).chunk(2)
            v = null + guidance * (cond - null)
        return v.reshape(x.shape).to(x.device, x.dtype)

    return model


class DigitsFlow(nn.Module):
    """Residual MLP velocity network; σ and the class (10 = null) condition every block through an added vector."""

    def __init__(self, width: int = 256, blocks: int = 3, time_dim: int = 32):
        super().__init__()
        self.config = {"width": width, "blocks": blocks, "time_dim": time_dim}
        self.time_dim = time_dim
        self.inp = nn.Linear(DIM, width)
        self.time = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(NULL_CLASS + 1, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, DIM))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x (B, 64), sigma () or (B,), labels (B,) → v (B, 64)."""
        sigma = sigma.to(x.dtype).expand(len(x))
        cond = self.time(sinusoidal(sigma, self.time_dim)) + self.label(labels)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + cond)
        return self.out(h)

    def velocity_fn(self, labels: torch.Tensor | int, guidance: float = 1.0) -> Velocity:
        """`model(x, sigma) -> v` for `fewstep.sample` (see `guided_velocity`)."""
        return guided_velocity(self, labels, guidance, NULL_CLASS)


class DigitsClassifier(nn.Module):
    """MLP classifier of 8×8 digits; `features` (penultimate layer) feed the Fréchet distance."""

    def __init__(self, width: int = 256, feature_dim: int = 128):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        self.body = nn.Sequential(nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_network(filename: str, cls: type[nn.Module], device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """The network `cls` from the package's weights/`filename`: architecture from the file's metadata (the JSON under
    METADATA_KEY), in eval mode without gradients; shared by every embedded model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with resources.as_file(resources.files("fewstep.models").joinpath("weights", filename)) as file:
        with safe_open(str(file), "pt") as f:
            config = json.loads(f.metadata()[METADATA_KEY])["config"]
        state = load_file(str(file))
    net = cls(**config)
    net.load_state_dict(state)  # load_state_dict copies the fp16 storage into the float32 parameters
    return net.to(device, dtype).eval().requires_grad_(False)


def load_embedded(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DigitsFlow:
    """The shipped flow model (package data; architecture in the safetensors metadata), in eval mode, no grads."""
    return load_network(FLOW_FILE, DigitsFlow, device, dtype)


def load_classifier(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DigitsClassifier:
    """The shipped digits classifier used to measure samples (class accuracy, FD on its features)."""
    return load_network(CLASSIFIER_FILE, DigitsClassifier, device, dtype)


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, F) feature sets, in float64:
    |μa − μb|² + tr(Ca + Cb − 2 (Ca^½ Cb Ca^½)^½), with symmetric eigendecompositions (no complex sqrtm noise)."""
    a, b = (np.asarray(torch.as_tensor(f).detach().cpu(), dtype=np.float64) for f in (feats_a, feats_b))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, q = np.linalg.eigh(cov_a)
    root_a = (q * np.sqrt(w.clip(min=0))) @ q.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def parse_prompt(text: str) -> int:
    """"7", "seven", "a handwritten seven", "digit 7", "the number 7" → 7; a prompt naming no digit, or two different
    ones, is a ValueError that says what is understood."""
    found = {int(d) for d in re.findall(r"(?<!\d)\d(?!\d)", text)}  # a lone digit: "12" names neither 1 nor 2
    found |= {WORDS.index(w) for w in re.findall(r"[a-z]+", text.lower()) if w in WORDS}
    if len(found) != 1:
        why = "names no digit" if not found else f"names several digits {sorted(found)}"
        raise InvalidInput(f"the embedded digits model cannot draw {text!r}: it {why}; it understands one digit 0-9 "
                         "or its English name, e.g. '7' or 'a handwritten seven'")
    return found.pop()


def to_image(x: torch.Tensor, scale: int = 8, nrow: int | None = None):
    """(64,) or (B, 64) samples → a greyscale PIL image, ink dark on white, each digit nearest-upscaled to
    8·scale pixels; a batch becomes a grid of `nrow` digits per row (default: about square) with grey 1-pixel gaps."""
    digits = x.detach().float().cpu().reshape(-1, 8, 8).clamp(-1, 1)
    pixels = ((1 - digits) / 2 * 255).round().to(torch.uint8).numpy()  # +1 (ink) → 0 (black)
    return image_grid(pixels, scale, nrow, gap=1, background=160)


def image_grid(pixels: np.ndarray, scale: int, nrow: int | None, gap: int, background: int):
    """(B, H, W) uint8 images → one greyscale PIL image: each nearest-upscaled by `scale`, `nrow` per row (default:
    about square), `gap` pixels of grey `background` between them (none for a single image)."""
    from PIL import Image

    cells = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    nrow = min(nrow or math.ceil(math.sqrt(len(cells))), len(cells))
    rows = math.ceil(len(cells) / nrow)
    height, width = cells.shape[1:]
    gap = gap if len(cells) > 1 else 0
    grid = np.full((rows * (height + gap) - gap, nrow * (width + gap) - gap), background, dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, nrow)
        grid[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = cell
    return Image.fromarray(grid, mode="L")
