"""mflux's real FLUX.1 `generate_image` loop (and `mflux-generate`'s `main`) offline, without weights: the model object
is built without loading anything, the transformer is the exact velocity of a Gaussian mixture in mflux's latent
shape, the text encoders are a cached prompt and the VAE is a fixed latent (encode) / a capture (decode).

The mixture is the same 1-D mixture in every latent coordinate, so the exact flow map is a scalar ODE per coordinate,
solved here in float64 by RK4 on a fine grid (`exact`, checked against a grid twice as fine).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mflux.models.common.config.model_config import ModelConfig
from mflux.models.flux.flux_initializer import FluxInitializer
from mflux.models.flux.latent_creator.flux_latent_creator import FluxLatentCreator
from mflux.models.flux.variants.txt2img.flux import Flux1
from mflux.models.qwen.qwen_initializer import QwenImageInitializer
from mflux.models.qwen.variants.txt2img.qwen_image import QwenImage
from mlx import nn

WIDTH = HEIGHT = 128  # 64 tokens of 64 channels: 4096 latent coordinates
PROMPT = "a closed-form velocity"


@dataclass(frozen=True)
class Mixture:
    """x0 ~ Σ_k π_k N(μ_k, s_k²) in every coordinate; x_σ = (1−σ)·x0 + σ·ε; v = E[ε − x0 | x_σ] in closed form."""

    weights: tuple[float, ...] = (0.3, 0.45, 0.25)
    means: tuple[float, ...] = (-1.6, 0.4, 1.9)
    stds: tuple[float, ...] = (0.25, 0.15, 0.35)

    def velocity(self, x: np.ndarray, sigma: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)[..., None]
        w, mu, s2 = (np.asarray(a, dtype=np.float64) for a in (self.weights, self.means, self.stds))
        s2 = s2 * s2
        a, b = 1.0 - sigma, sigma
        var = a * a * s2 + b * b
        dev = x - a * mu
        logr = np.log(w) - 0.5 * np.log(var) - 0.5 * dev * dev / var
        r = np.exp(logr - logr.max(-1, keepdims=True))
        r /= r.sum(-1, keepdims=True)
        return (r * ((b - a * s2) / var * dev - mu)).sum(-1)

    def exact(self, x: np.ndarray, sigma_start: float, sigma_end: float = 0.0, steps: int = 2000) -> np.ndarray:
        """The flow ODE dx/dσ = v from σ_start to σ_end: RK4 with `steps` equal steps, float64."""
        x = np.asarray(x, dtype=np.float64)
        grid = np.linspace(sigma_start, sigma_end, steps + 1)
        for s0, s1 in zip(grid[:-1], grid[1:], strict=True):
            h = s1 - s0
            k1 = self.velocity(x, s0)
            k2 = self.velocity(x + 0.5 * h * k1, s0 + 0.5 * h)
            k3 = self.velocity(x + 0.5 * h * k2, s0 + 0.5 * h)
            k4 = self.velocity(x + h * k3, s1)
            x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x


class VelocityTransformer:
    """Stands in for FLUX.1's and Qwen-Image's transformers: reads its σ as the real ones do
    (`config.scheduler.sigmas[t]`) and returns the mixture's exact velocity in float32 (for Qwen's positive and
    negative prompt alike, so its guidance leaves it unchanged); records every call."""

    def __init__(self, mixture: Mixture):
        self.mixture = mixture
        self.calls: list[tuple[int, float, np.ndarray]] = []

    def __call__(self, t, config, hidden_states, **kwargs):
        sigma = float(config.scheduler.sigmas[t].item())
        x = np.array(hidden_states, dtype=np.float64)
        self.calls.append((int(t), sigma, x))
        return mx.array(self.mixture.velocity(x, sigma).astype(np.float32))


class StandInVAE:
    """encode: a fixed clean latent (1, 16, H/8, W/8); decode: records the final latents and returns an image made of
    their first three channels."""

    def __init__(self, clean: mx.array):
        self.clean = clean
        self.decoded: mx.array | None = None

    def encode(self, image):
        return self.clean

    def decode(self, latent):
        self.decoded = latent
        rgb = mx.repeat(mx.repeat(latent[:, :3], 8, axis=2), 8, axis=3)
        return mx.tanh(rgb / 2)


@dataclass
class Offline:
    """The stand-ins of one offline model."""

    mixture: Mixture = field(default_factory=Mixture)
    clean_seed: int = 7

    def __post_init__(self):
        self.transformer = VelocityTransformer(self.mixture)
        rng = np.random.default_rng(self.clean_seed)
        # An "encoded image": a sample of the mixture in every coordinate, so img2img starts on the data's path.
        k = rng.choice(3, size=(1, 16, HEIGHT // 8, WIDTH // 8), p=self.mixture.weights)
        clean = np.take(self.mixture.means, k) + np.take(self.mixture.stds, k) * rng.standard_normal(k.shape)
        self.vae = StandInVAE(mx.array(clean.astype(np.float32)))

    def build(self, model: Flux1, model_config: ModelConfig) -> None:
        """What FluxInitializer.init does, without weights, tokenizers or encoders."""
        nn.Module.__init__(model)
        FluxInitializer._init_config(model, model_config)
        model.vae = self.vae
        model.transformer = self.transformer
        model.t5_text_encoder = None
        model.clip_text_encoder = None
        model.tokenizers = {"t5": None, "clip": None}
        model.prompt_cache[PROMPT] = (mx.zeros((1, 4, 8)), mx.zeros((1, 8)))
        model.bits = None
        model.lora_paths = None
        model.lora_scales = None

    def build_qwen(self, model: QwenImage, model_config: ModelConfig) -> None:
        """What QwenImageInitializer.init does, without weights, tokenizer or text encoder."""
        nn.Module.__init__(model)
        QwenImageInitializer._init_config(model, model_config)
        model.vae = self.vae
        model.transformer = self.transformer
        model.text_encoder = None
        model.tokenizers = {"qwen": None}
        mask = mx.ones((1, 4))
        model.prompt_cache[f"{PROMPT}|NEG| "] = (mx.zeros((1, 4, 8)), mask, mx.zeros((1, 4, 8)), mask)
        model.bits = None
        model.lora_paths = None
        model.lora_scales = None

    def model(self, name: str) -> Flux1 | QwenImage:
        model_config = ModelConfig.from_name(model_name=name, base_model=None)
        if name.startswith("qwen"):
            model = QwenImage.__new__(QwenImage)
            self.build_qwen(model, model_config)
        else:
            model = Flux1.__new__(Flux1)
            self.build(model, model_config)
        return model

    def final_latents(self) -> np.ndarray:
        """The latents the loop ended with (unpacked, as the VAE got them), float64."""
        return np.array(self.vae.decoded, dtype=np.float64)

    def reference(self) -> np.ndarray:
        """The exact solution from the state and σ of the first transformer call down to σ = 0, unpacked."""
        _, sigma, x = self.transformer.calls[0]
        exact = self.mixture.exact(x, sigma)
        return np.array(FluxLatentCreator.unpack_latents(mx.array(exact), HEIGHT, WIDTH), dtype=np.float64)


def generate(offline: Offline, name: str, scheduler: str, steps: int, image_path: Path | None = None,
             strength: float | None = None, seed: int = 3):
    """`Flux1.generate_image` (or `QwenImage.generate_image` for a qwen model name) on the offline model; returns the
    GeneratedImage."""
    offline.transformer.calls.clear()
    return offline.model(name).generate_image(seed=seed, prompt=PROMPT, num_inference_steps=steps, height=HEIGHT,
                                              width=WIDTH, guidance=3.5, image_path=image_path,
                                              image_strength=strength, scheduler=scheduler)


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def run_cli(offline: Offline, argv: list[str]) -> None:
    """`mflux-generate`'s entry point (mflux.models.flux.cli.flux_generate:main) with `argv`, its Flux1 built by
    `offline` instead of loading weights."""
    from mflux.models.flux.cli import flux_generate

    def init(model, model_config=None, **kwargs):
        offline.build(model, model_config or ModelConfig.schnell())

    saved_init, saved_argv = Flux1.__init__, sys.argv
    Flux1.__init__ = init
    sys.argv = ["mflux-generate", *argv]
    offline.transformer.calls.clear()
    try:
        flux_generate.main()
    finally:
        Flux1.__init__, sys.argv = saved_init, saved_argv


def write_image(path: Path) -> Path:
    """A small PNG for --image-path (the stand-in VAE ignores its pixels)."""
    from PIL import Image

    Image.new("RGB", (WIDTH, HEIGHT), (120, 60, 200)).save(path)
    return path
