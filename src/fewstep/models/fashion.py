"""The embedded Fashion-MNIST model: a class-conditional rectified-flow U-Net on 28×28 clothing images, small enough
to ship, and a small convolutional classifier whose penultimate features give a Fréchet distance (FD).

Convention (the same as everything in fewstep): x_σ = (1−σ)·x0 + σ·ε, the network predicts v = ε − x0 = dx/dσ,
sampled from σ = 1 to 0. An image is 28×28 in [−1, 1] with ink (cloth) = +1 on a −1 background, as Fashion-MNIST's
bytes scaled by 2/255 − 1; the velocity function takes and returns either (B, 1, 28, 28) or flattened (B, 784).
Label 10 is the "null" class for classifier-free guidance.

The data set (Debian's `dataset-fashion-mnist`) is needed only to train and to measure, never to sample.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fewstep.errors import InvalidInput
from fewstep.models.digits import frechet_distance, guided_velocity, image_grid, load_network, sinusoidal

if TYPE_CHECKING:
    from PIL import Image

SIDE = 28
DIM = SIDE * SIDE
NULL_CLASS = 10
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
# Words (after lower-casing; plurals by a trailing "s" are accepted too) → class. Multi-word names first.
SYNONYMS = {
    "ankle boot": 9, "t-shirt": 0, "t shirt": 0, "tshirt": 0, "tee": 0, "top": 0, "tank top": 0,
    "trouser": 1, "pants": 1, "pant": 1, "jeans": 1, "slacks": 1, "leggings": 1,
    "pullover": 2, "sweater": 2, "jumper": 2, "sweatshirt": 2, "hoodie": 2,
    "dress": 3, "gown": 3, "frock": 3,
    "coat": 4, "jacket": 4, "parka": 4, "overcoat": 4,
    "sandal": 5, "flip-flop": 5, "flip flop": 5,
    "shirt": 6, "blouse": 6,
    "sneaker": 7, "trainer": 7, "running shoe": 7, "shoe": 7,
    "bag": 8, "handbag": 8, "purse": 8, "tote": 8, "backpack": 8,
    "boot": 9,
}
FLOW_FILE = "fashion_flow.safetensors"
CLASSIFIER_FILE = "fashion_classifier.safetensors"
DEFAULT_STEPS = 8  # what `fewstep generate --model fashion` uses when not told
DEFAULT_GUIDANCE = 3.0
METADATA_KEY = "fewstep"  # one key holding JSON, as for digits (several keys are written in a random order)
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
DATA_ENV = "FEWSTEP_FASHION_MNIST"  # a directory holding the four idx .gz files, to override DATA_DIR
Velocity = Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV, DATA_DIR))


def data_available() -> bool:
    return (data_dir() / "t10k-images-idx3-ubyte.gz").exists()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST `split` ("train": 60000, "test": 10000) as (N, 1, 28, 28) float32 in [−1, 1] and labels (N,)."""
    if split not in ("train", "test"):
        raise InvalidInput(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    folder = data_dir()
    if not (folder / f"{prefix}-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"Fashion-MNIST not found in {folder}: `apt-get install dataset-fashion-mnist` "
                                f"(Debian/Ubuntu) or set {DATA_ENV} to a directory with the four idx .gz files")
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) * (2.0 / 255.0) - 1.0).reshape(-1, 1, SIDE, SIDE)
    return x, torch.from_numpy(labels.astype(np.int64))


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, conditioning as a per-channel scale and shift of the second norm, → conv, + skip."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the 7×7 positions of the bottleneck, pre-norm, residual."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class FashionFlow(nn.Module):
    """A small U-Net velocity network: 28×28 (c0 channels) → 14×14 (c1) → 7×7 (c2, with self-attention) and back,
    skip connections by concatenation; σ and the class (10 = null) condition every block. The up-path convolutions
    run before the (nearest) upsampling, at the lower resolution, to keep training cheap on a CPU."""

    def __init__(self, c0: int = 16, c1: int = 64, c2: int = 128, cond_dim: int = 128, heads: int = 4):
        super().__init__()
        self.config = {"c0": c0, "c1": c1, "c2": c2, "cond_dim": cond_dim, "heads": heads}
        self.cond_dim = cond_dim
        self.time = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.label = nn.Embedding(NULL_CLASS + 1, cond_dim)
        self.stem = nn.Conv2d(1, c0, 3, padding=1)
        self.enc0 = ResBlock(c0, c0, cond_dim)
        self.down1 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.enc1 = ResBlock(c1, c1, cond_dim)
        self.down2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(c2, c2, cond_dim)
        self.attn = Attention(c2, heads)
        self.mid2 = ResBlock(c2, c2, cond_dim)
        self.up2 = nn.Conv2d(c2, c1, 3, padding=1)  # at 7×7, then upsampled
        self.dec1 = ResBlock(2 * c1, c1, cond_dim)
        self.up1 = nn.Conv2d(c1, c0, 3, padding=1)  # at 14×14, then upsampled
        self.dec0 = ResBlock(2 * c0, c0, cond_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, c0), nn.SiLU(), nn.Conv2d(c0, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28, 28), sigma () or (B,), labels (B,) → v (B, 1, 28, 28)."""
        sigma = sigma.to(x.dtype).expand(len(x))
        cond = F.silu(self.time(sinusoidal(sigma, self.cond_dim)) + self.label(labels))
        h0 = self.enc0(self.stem(x), cond)
        h1 = self.enc1(self.down1(h0), cond)
        h = self.mid1(self.down2(h1), cond)
        h = self.mid2(self.attn(h), cond)
        h = self.dec1(torch.cat([F.interpolate(self.up2(h), scale_factor=2.0), h1], 1), cond)
        h = self.dec0(torch.cat([F.interpolate(self.up1(h), scale_factor=2.0), h0], 1), cond)
        return self.out(h)

    def velocity_fn(self, labels: torch.Tensor | int, guidance: float = 1.0) -> Velocity:
        """`model(x, sigma) -> v` for `fewstep.sample` on (B, 1, 28, 28) or flattened (B, 784) states (v has the
        shape of x): one label for the whole batch or one per sample. With guidance g ≠ 1, classifier-free guidance
        v_null + g·(v_cond − v_null) in one batched forward."""
        return guided_velocity(self, labels, guidance, NULL_CLASS, (1, SIDE, SIDE))


class FashionClassifier(nn.Module):
    """A small convnet classifier of Fashion-MNIST; `features` (the 128-d penultimate layer) feed the Fréchet
    distance. Takes (B, 1, 28, 28) or flattened (B, 784) images in [−1, 1]."""

    def __init__(self, c1: int = 32, c2: int = 64, feature_dim: int = 128):
        super().__init__()
        self.config = {"c1": c1, "c2": c2, "feature_dim": feature_dim}
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * 7 * 7, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(-1, 1, SIDE, SIDE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _weights_path(filename: str):
    return resources.files("fewstep.models").joinpath("weights", filename)


def load_embedded(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FashionFlow:
    """The shipped flow model (package data; architecture in the safetensors metadata), in eval mode, no grads."""
    return load_network(FLOW_FILE, FashionFlow, device, dtype)


def load_classifier(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FashionClassifier:
    """The shipped Fashion-MNIST classifier used to measure samples (class accuracy, FD on its features)."""
    return load_network(CLASSIFIER_FILE, FashionClassifier, device, dtype)


def training_settings(filename: str = FLOW_FILE) -> dict:
    """The architecture and training settings stored in a shipped weight file's metadata."""
    from safetensors import safe_open

    with resources.as_file(_weights_path(filename)) as file, safe_open(str(file), "pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


def _phrase_pattern(phrase: str) -> str:
    words = r"[\s-]+".join(re.escape(w) for w in re.split(r"[\s-]+", phrase))  # "t-shirt" = "t shirt"
    return rf"(?<![a-z]){words}(?:s|es)?(?![a-z])"  # plurals: "trousers", "dresses"


def parse_prompt(text: str) -> int:
    """"a sneaker", "trousers", "pants", "a tee", "an ankle boot", "handbag" → the class index (0-9); a prompt naming
    no class, or two different ones, is an InvalidInput that lists the classes."""
    rest = text.lower()
    found = set()
    for phrase in sorted({*SYNONYMS, *CLASSES}, key=len, reverse=True):  # "t-shirt" before "shirt"
        pattern = _phrase_pattern(phrase)
        if re.search(pattern, rest):
            found.add(SYNONYMS[phrase] if phrase in SYNONYMS else CLASSES.index(phrase))
            rest = re.sub(pattern, " ", rest)
    if len(found) != 1:
        why = ("names no class" if not found
               else "names several classes: " + ", ".join(CLASSES[k] for k in sorted(found)))
        raise InvalidInput(f"the embedded fashion model cannot draw {text!r}: it {why}; it draws one of the 10 "
                           f"Fashion-MNIST classes: {', '.join(CLASSES)} (synonyms such as 'tee', 'pants', 'jeans', "
                           "'sweater', 'jacket', 'handbag', 'shoe', 'boot' work too)"
                           + ("; digits are drawn by --model digits" if not found else ""))
    return found.pop()


def to_image(x: torch.Tensor, scale: int = 8, nrow: int | None = None):
    """(784,), (B, 784) or (B, 1, 28, 28) samples → a greyscale PIL image as Fashion-MNIST shows them (cloth light
    on black), each image nearest-upscaled to 28·scale pixels; a batch becomes a grid of `nrow` images per row
    (default: about square) with grey 2-pixel gaps."""
    images = x.detach().float().cpu().reshape(-1, SIDE, SIDE).clamp(-1, 1)
    pixels = ((images + 1) / 2 * 255).round().to(torch.uint8).numpy()
    return image_grid(pixels, scale, nrow, gap=2, background=128)


def image_to_x(image: Image.Image) -> torch.Tensor:
    """A decoded image (`fewstep.generate.read_image`: 16-bit and float images already scaled to 0-255) as one
    (1, 784) Fashion-MNIST-style state in [−1, 1] (grey values as they are: cloth light on a dark background), for
    img2img."""
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float64) / 255.0
    return torch.from_numpy(grey * 2.0 - 1.0).reshape(1, DIM).float()


def quality(samples: torch.Tensor, labels: torch.Tensor, classifier: FashionClassifier | None = None,
            real_features: torch.Tensor | None = None) -> dict[str, float]:
    """FD of `samples` to the test set in the classifier's features, and the fraction the classifier assigns to the
    requested `labels`."""
    classifier = classifier or load_classifier()
    with torch.no_grad():
        if real_features is None:
            real_features = torch.cat([classifier.features(x) for x in load_data("test")[0].split(1000)])
        x = samples.float().reshape(-1, 1, SIDE, SIDE)
        feats = torch.cat([classifier.features(b) for b in x.split(1000)])
        accuracy = (classifier.head(feats).argmax(1) == labels).float().mean().item()
    return {"fd": frechet_distance(feats, real_features), "class_accuracy": accuracy}


# --- the `fashion` problem of `fewstep bench` ---------------------------------------------------------------------
# At most this many bench noises. The reference solve is the cost: DOP853 needs ~2600 model calls at rtol 1e-7 (the
# stiff region near σ = 0 sets the step); a float32 call on 32 samples costs 0.09 s on one core (0.18 s with CFG),
# float64 five times that. Measured on 4 noises with guidance 3 against a float64 rtol-1e-9 solve: the float32 model
# at rtol 1e-7 is off by RMSE 8.1e-7 (max 8.0e-6), as close as the float64 model at that tolerance (4.5e-7) and
# 5x cheaper; at rtol 1e-6 both are off by 1.3e-5. The bench's solvers run the float32 model too.
BENCH_SAMPLES = 32
BENCH_RTOL = 1e-7  # reference solve tolerance (rtol = atol), float32 model; see `bench_problem`'s notes
CHECK_RTOL = 1e-9  # the accuracy check: the first BENCH_CHECK noises re-solved with the float64 model
BENCH_CHECK = 2
BENCH_BANK = 16  # training noises for a NeuralSolver search on the problem (its teacher solve is costly here)
SHIPPED_SEEDS = (0, 1000)  # the bench's default seed and the extra noises of `--refine` (seed + 1000)
REFERENCE_FILE = "fashion_bench_reference.npz"  # package data: the reference solves of SHIPPED_SEEDS, guidance 1, 3


def _weights_sha256() -> str:
    import hashlib

    return hashlib.sha256(_weights_path(FLOW_FILE).read_bytes()).hexdigest()


def reference_key(labels: torch.Tensor, noise: torch.Tensor, seed: int, guidance: float, rtol: float,
                  dtype: torch.dtype) -> str:
    """The name of one reference solve: the weights' SHA-256, the number of noises, their seed and a digest of the
    noises and labels themselves, the guidance, the tolerance and the model's dtype (all the solve depends on)."""
    import hashlib

    bits = {torch.float32: 32, torch.float64: 64}[dtype]
    digest = hashlib.sha256(noise.to(torch.float64).numpy().tobytes() + labels.to(torch.int64).numpy().tobytes())
    return (f"fashion-ref-{_weights_sha256()[:16]}-n{len(noise)}-seed{seed}-{digest.hexdigest()[:8]}-g{guidance:g}"
            f"-rtol{rtol:g}-f{bits}")


def _shipped_reference(key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The reference solve `key` from the package's REFERENCE_FILE, if it ships it (None otherwise)."""
    path = _weights_path(REFERENCE_FILE)
    if not path.is_file():
        return None
    with resources.as_file(path) as file, np.load(file) as shipped:
        if key not in shipped.files or shipped[key].shape != shape:
            return None
        return torch.from_numpy(shipped[key].astype(np.float64))


def cached_reference(labels: torch.Tensor, noise: torch.Tensor, guidance: float, rtol: float, seed: int,
                     dtype: torch.dtype = torch.float32, cache: Path | None = None,
                     progress: str | None = None) -> torch.Tensor:
    """The flow ODE solved with scipy's DOP853 from `noise` (the model in `dtype`), stored as float32: shipped in the
    package for the bench's own noises (`SHIPPED_SEEDS`), else read from or written to the folder `cache` under
    `reference_key` (None: solved every time) — the first run on other noises pays minutes, later ones load it.
    `progress`: the label of the solve's progress bar (None: none)."""
    from fewstep.bench.problems import cached
    from fewstep.testbed import reference_solve

    key = reference_key(labels, noise, seed, guidance, rtol, dtype)
    shipped = _shipped_reference(key, tuple(noise.shape))
    if shipped is not None:
        return shipped

    def solve() -> dict:
        velocity = load_embedded(dtype=dtype).velocity_fn(labels, guidance)
        with torch.no_grad():
            x = reference_solve(lambda y, s: velocity(y.to(dtype), s), noise, rtol=rtol, atol=rtol, check=False,
                                progress=progress).x
        # what the shipped file holds: a solve read from the cache or the package is the same
        return {"reference": x.float().double()}

    return cached(cache, key, solve)["reference"]


def bench_noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bench's labels (cycling 0..9) and float64 noises for `n` samples from `seed`."""
    labels = torch.arange(n) % 10
    return labels, torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def bench_references(n: int, seed: int, guidance: float, cache: Path | None = None,
                     progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bench's reference solve of `n` noises and the check solve of its first BENCH_CHECK noises (`cache` and
    `progress` as for `cached_reference`)."""
    labels, noise = bench_noise(n, seed)
    k = min(n, BENCH_CHECK)
    return (cached_reference(labels, noise, guidance, BENCH_RTOL, seed, cache=cache, progress=progress),
            cached_reference(labels[:k], noise[:k], guidance, CHECK_RTOL, seed, torch.float64, cache,
                             progress and f"{progress}, its check"))


def write_shipped_references(path: Path) -> None:
    """Solve (or read from the bench's default cache) the references of every SHIPPED_SEEDS × guidance 1, 3 and write
    them, float32, to `path` (an .npz; atomically): the package's REFERENCE_FILE."""
    import io

    from fewstep.bench.problems import default_cache
    from fewstep.files import atomic_write

    arrays = {}
    for seed in SHIPPED_SEEDS:
        labels, noise = bench_noise(BENCH_SAMPLES, seed)
        k = min(BENCH_SAMPLES, BENCH_CHECK)
        for guidance in (1.0, 3.0):
            reference, check = bench_references(BENCH_SAMPLES, seed, guidance, default_cache(), "reference solve")
            arrays[reference_key(labels, noise, seed, guidance, BENCH_RTOL, torch.float32)] = reference.float().numpy()
            arrays[reference_key(labels[:k], noise[:k], seed, guidance, CHECK_RTOL, torch.float64)] = \
                check.float().numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(Path(path), buffer.getvalue())


def labelled(model: FashionFlow, guidance: float) -> Velocity:
    """`model(x, sigma)` on flattened states carrying their class label as one extra, constant coordinate (velocity
    0), for the NeuralSolver search (each noise of a random minibatch keeps its own label)."""

    def velocity(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        v = model.velocity_fn(x[:, -1].round().long(), guidance)(x[:, :-1], sigma)
        return torch.cat([v, torch.zeros_like(x[:, -1:])], dim=1)

    return velocity


def bench_problem(samples: int, seed: int, guidance: float = 1.0, cache: Path | None = None,
                  progress: str | None = None):
    """The `fashion` problem of `fewstep bench` (a `fewstep.bench.problems.Problem`): the embedded Fashion-MNIST
    flow at `guidance`, min(samples, BENCH_SAMPLES) flattened noises with labels cycling 0..9, a DOP853 reference
    solve (`bench_references`: shipped for the bench's own noises, else cached), and FD in the shipped classifier's
    features to the 10k test images (when the data set is installed), FD-ref to the reference samples and the class
    accuracy of the samples. Solvers run the float32 network. `progress`: the label of the reference solve's progress
    bar, to which the noise count is appended (None: no bar)."""
    from fewstep.bench.problems import Problem

    n = min(samples, BENCH_SAMPLES)
    labels, noise = bench_noise(n, seed)
    reference, check = bench_references(n, seed, guidance, cache, progress and f"{progress} ({n} noises)")
    k = len(check)
    error = check - reference[:k]

    model = load_embedded()
    classifier = load_classifier()
    with torch.no_grad():
        ref_features = classifier.features(reference.float())
    # FD to the test set needs the data set; without it the problem still runs (RMSE, FD-ref, class accuracy).
    real = None
    fd_note = f"FD: not measured, the Fashion-MNIST data is not installed in {data_dir()} (see `load_data`)"
    if data_available():
        with torch.no_grad():
            real = torch.cat([classifier.features(x) for x in load_data("test")[0].split(1000)])
            train = load_data("train")[0]
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
            floor_n = frechet_distance(classifier.features(train[pick]), real)
        floor = frechet_distance(real[:5000], real[5000:])
        ref_quality = quality(reference, labels, classifier, real)
        fd_note = (f"FD: Fréchet distance in the shipped classifier's 128-d features to the 10000 test images; noise "
                   f"floor: two halves of the test set {floor:.2f}, {n} training images {floor_n:.2f}; the reference "
                   f"samples score {ref_quality['fd']:.2f} (class accuracy {ref_quality['class_accuracy']:.3f})")

    def measure(x: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            f = classifier.features(x.float())
            accuracy = (classifier.head(f).argmax(1) == labels).float().mean().item()
        fd = frechet_distance(f, real) if real is not None else float("nan")
        return {"fd": fd, "class_accuracy": accuracy, "fd_ref": frechet_distance(f, ref_features)}

    notes = (f"model: the embedded Fashion-MNIST U-Net (float32), labels cycling 0..9, guidance {guidance:g}; "
             f"{n} samples (at most {BENCH_SAMPLES}: a conv net on the CPU)",
             f"reference: scipy DOP853 on the flattened batch, float32 model, rtol = atol = {BENCH_RTOL:g}, shipped "
             f"for seeds {', '.join(map(str, SHIPPED_SEEDS))} (else solved once and kept in the bench's --cache); "
             f"against a float64-model rtol {CHECK_RTOL:g} solve of its first {k} samples: max |error| "
             f"{float(error.abs().max()):.1e}, RMSE {float(error.pow(2).mean().sqrt()):.1e}",
             f"{fd_note}. FD-ref: to the reference samples from the same noises (0 for the exact ODE solution)")
    bank_labels = (torch.arange(BENCH_BANK) % 10).to(torch.float64)[:, None]
    bank = torch.randn(BENCH_BANK, DIM, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    name = "fashion" if guidance == 1.0 else f"fashion-g{guidance:g}"
    return Problem(name, model.velocity_fn(labels, guidance), noise, reference, measure,
                   labelled(load_embedded(dtype=torch.float64), guidance), torch.cat([bank, bank_labels], dim=1),
                   notes, image=True, to_image=to_image, guidance=guidance)
