"""The embedded model: a class-conditional rectified-flow model of scikit-learn's 8×8 digits, small enough to ship.

Convention: x_σ = (1−σ)·x0 + σ·ε, the network predicts v = ε − x0; x is a flattened 8×8 image in [−1, 1].
Class 10 is the "null" class for classifier-free guidance.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources

import torch
from torch import nn

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NULL_CLASS = 10


class DigitsFlow(nn.Module):
    """Residual MLP with a sinusoidal σ embedding and a class embedding (+ null class)."""

    def __init__(self, width: int = 256, blocks: int = 3, time_dim: int = 32):
        super().__init__()
        self.config = {"width": width, "blocks": blocks, "time_dim": time_dim}
        self.time_dim = time_dim
        self.inp = nn.Linear(64 + time_dim, width)
        self.label = nn.Embedding(NULL_CLASS + 1, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 64))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(torch.arange(half, device=x.device) * (-math.log(1000.0) / half))
        angles = 1000.0 * sigma.reshape(-1, 1).to(x.dtype) * freqs
        h = self.inp(torch.cat([x, torch.sin(angles).expand(len(x), -1), torch.cos(angles).expand(len(x), -1)], 1))
        h = h + self.label(labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def velocity_fn(self, labels: torch.Tensor, guidance: float = 1.0):
        """model(x, sigma) -> v for `fewstep.sample`; guidance g ≠ 1 is classifier-free guidance in one batch."""
        labels = torch.as_tensor(labels, dtype=torch.long)

        def model(x: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.tensor(float(sigma), dtype=x.dtype)
            lab = labels.expand(len(x)) if labels.numel() == 1 else labels
            if guidance == 1.0:
                return self(x, s, lab)
            both = self(torch.cat([x, x]), s, torch.cat([lab, torch.full_like(lab, NULL_CLASS)]))
            cond, uncond = both.chunk(2)
            return uncond + guidance * (cond - uncond)

        return model


def load_embedded(dtype: torch.dtype = torch.float32) -> DigitsFlow:
    """The shipped weights (package data, safetensors with the architecture in its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = resources.files("fewstep.models").joinpath("weights/digits_flow.safetensors")
    with resources.as_file(path) as file:
        with safe_open(str(file), "pt") as f:
            config = json.loads(f.metadata()["config"])
        state = load_file(str(file))
    net = DigitsFlow(**config)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.to(dtype).eval().requires_grad_(False)


def parse_prompt(text: str) -> int:
    """"7", "seven", "a handwritten seven", "digit 7" → 7; a prompt naming no digit, or two, is a ValueError."""
    found = {int(d) for d in re.findall(r"\b(\d)\b", text)}
    found |= {WORDS.index(w) for w in re.findall(r"[a-z]+", text.lower()) if w in WORDS}
    if len(found) != 1:
        why = "names no digit" if not found else f"names several digits {sorted(found)}"
        raise ValueError(f"the embedded digits model cannot draw {text!r}: it {why}; it understands one digit 0-9 "
                         "or its English name, e.g. '7' or 'a handwritten seven'")
    return found.pop()


def to_image(x: torch.Tensor, scale: int = 8):
    """(64,) or (B, 64) samples in [−1, 1] → a greyscale PIL image (ink dark on white), nearest-upscaled."""
    from PIL import Image

    x = x.detach().float().reshape(-1, 8, 8).clamp(-1, 1)
    grid = torch.cat(list(x), dim=1)  # side by side
    pixels = ((1 - (grid + 1) / 2) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="L").resize((pixels.shape[1] * scale, 8 * scale), Image.NEAREST)
