"""Image generation with mflux's shape of interface, on top of diffusers (CUDA, MPS, CPU) or the embedded model.

    from fewstep import Flux1, Config
    image = Flux1.from_alias("schnell").generate_image(seed=42, prompt="a fox",
                                                       config=Config(num_inference_steps=4, scheduler="stork-2"))
    image.save("fox.png")

`fewstep.load()` (no argument) gives the embedded digits model with the same `generate_image`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EULER_ALIASES = {"linear": "euler", "flow_match_euler_discrete": "euler", "FlowMatchEulerDiscreteScheduler": "euler"}
DEFAULT_SCHEDULER = "adams2"


@dataclass(frozen=True)
class Alias:
    repo: str
    steps: int
    guidance: float


ALIASES = {
    "schnell": Alias("black-forest-labs/FLUX.1-schnell", 4, 0.0),
    "dev": Alias("black-forest-labs/FLUX.1-dev", 25, 3.5),
    "qwen": Alias("Qwen/Qwen-Image", 20, 4.0),
    "sd3": Alias("stabilityai/stable-diffusion-3.5-medium", 28, 3.5),
}


class ModelNotFoundError(FileNotFoundError):
    """The weights of a named model are neither at the given path nor in the local Hugging Face cache."""


@dataclass
class Config:
    """Generation settings (mflux's `Config`); None = the model's default."""

    num_inference_steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    scheduler: str = DEFAULT_SCHEDULER
    scheduler_kwargs: dict = field(default_factory=dict)
    image_path: str | None = None
    image_strength: float | None = None


FAMILIES = {"stork": "stork-{}", "adams": "adams{}"}  # scheduler families whose member is picked by `order`


def resolve_scheduler(scheduler: str, kwargs: dict) -> tuple[str, dict]:
    """(fewstep solver name, its options) from a CLI/`Config` scheduler name and its kwargs; ValueError if unknown.
    Accepts mflux's Euler aliases and the STORK docs' `{"order": 2}`: `order` picks the member of a family ("stork"
    alone is STORK-4, the official default) and must agree with an explicit one ("stork-2" with order 4 is an error)."""
    from fewstep import solvers

    name = EULER_ALIASES.get(scheduler, scheduler)
    options = dict(kwargs)
    order = options.pop("order", None)
    family = next((f for f in FAMILIES if name == f or (name.startswith(f) and name in solvers.names())), None)
    if order is not None:
        if family is None:
            raise ValueError(f"scheduler {scheduler!r} has no option 'order' (it picks the member of: "
                             f"{', '.join(FAMILIES)})")
        member = FAMILIES[family].format(order)
        if name not in (family, member):
            raise ValueError(f"scheduler {scheduler!r} contradicts scheduler_kwargs order={order!r}")
        name = member
    elif name == "stork":
        name = "stork-4"
    solvers.info(name)  # an unknown name (or order) raises, listing the solvers
    return name, options


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    metadata: dict

    def save(self, path: str | os.PathLike, export_json_metadata: bool = False) -> Path:
        """Write a PNG (metadata in its text chunks) atomically; with `export_json_metadata`, also PATH.json."""
        from PIL.PngImagePlugin import PngInfo

        from fewstep.files import atomic_write

        path = Path(path)
        info = PngInfo()
        for key, value in self.metadata.items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        png = io.BytesIO()
        self.image.save(png, format="PNG", pnginfo=info)
        atomic_write(path, png.getvalue())
        if export_json_metadata:
            atomic_write(path.with_suffix(".json"), json.dumps(self.metadata, indent=2, sort_keys=True).encode())
        return path


def _metadata(model: str, prompt: str, seed: int, config: Config, steps: int, guidance: float) -> dict:
    from fewstep import __version__

    return {"prompt": prompt, "seed": seed, "model": model, "scheduler": config.scheduler, "steps": steps,
            "scheduler_kwargs": config.scheduler_kwargs, "guidance": guidance, "height": config.height,
            "width": config.width, "image_path": config.image_path, "image_strength": config.image_strength,
            "generator": f"fewstep {__version__}"}


class EmbeddedModel:
    """The class-conditional digits flow model that ships inside the package (`fewstep.models.digits`)."""

    name = "embedded-digits"
    default_steps = 8
    default_guidance = 1.0

    def __init__(self) -> None:
        from fewstep.models.digits import load_embedded

        self.net = load_embedded()

    def generate_image(self, seed: int, prompt: str, config: Config | None = None) -> GeneratedImage:
        import numpy as np
        import torch

        from fewstep.models.digits import parse_prompt, to_image
        from fewstep.sampling import sample

        config = config or Config()
        label = parse_prompt(prompt)
        steps = config.num_inference_steps or self.default_steps
        guidance = self.default_guidance if config.guidance is None else config.guidance
        solver, options = resolve_scheduler(config.scheduler, config.scheduler_kwargs)
        noise = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed))
        model = self.net.velocity_fn(torch.tensor([label]), guidance)
        sigmas = None
        if config.image_path:
            strength = 0.4 if config.image_strength is None else config.image_strength
            if not 0 < strength <= 1:
                raise ValueError(f"image strength must be in (0, 1], got {strength}")
            noise = (1 - strength) * _digit_from_image(config.image_path) + strength * noise
            sigmas = np.linspace(strength, 0.0, steps + 1)
        with torch.no_grad():
            x = sample(model, noise, solver, steps, sigmas=sigmas, progress=True, **options)
        image = to_image(x[0])
        if config.width or config.height:
            size = (config.width or config.height, config.height or config.width)
            image = image.resize(size, resample=0)
        return GeneratedImage(image, _metadata(self.name, prompt, seed, config, steps, guidance))


def _digit_from_image(path: str):
    """An image file as an 8×8 digit in the model's [−1, 1] range (ink = +1, as in scikit-learn's digits)."""
    import numpy as np
    import torch
    from PIL import Image

    grey = np.asarray(Image.open(path).convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float64) / 255.0
    return torch.from_numpy((1.0 - grey) * 2.0 - 1.0).reshape(1, 64).float()


class DiffusersModel:
    """A diffusers text-to-image pipeline (Flux, Qwen-Image, SD3, ...) with a fewstep scheduler swapped in."""

    def __init__(self, pipe: Any, name: str, default_steps: int, default_guidance: float):
        self.pipe, self.name = pipe, name
        self.default_steps, self.default_guidance = default_steps, default_guidance

    @classmethod
    def from_pretrained(cls, model: str, alias: Alias | None = None) -> DiffusersModel:
        """Load from a local path, or a hub id / alias already in the local Hugging Face cache (never downloads)."""
        import torch
        from diffusers import DiffusionPipeline

        source = alias.repo if alias else model
        device, dtype = _device_and_dtype(torch)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as err:
            hint = (f"download it first: `huggingface-cli download {source}` (accept its licence on the Hub if "
                    "gated), or pass --model PATH to a local copy") if not Path(source).exists() else str(err)
            raise ModelNotFoundError(f"model {model!r} ({source}) is not available locally; {hint}") from None
        pipe.to(device)
        steps, guidance = (alias.steps, alias.guidance) if alias else _defaults_for(pipe)
        return cls(pipe, model, steps, guidance)

    def generate_image(self, seed: int, prompt: str, config: Config | None = None) -> GeneratedImage:
        import torch

        from fewstep.diffusers import FewstepScheduler

        config = config or Config()
        steps = config.num_inference_steps or self.default_steps
        guidance = self.default_guidance if config.guidance is None else config.guidance
        pipe = self.pipe
        solver, options = resolve_scheduler(config.scheduler, config.scheduler_kwargs)
        pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver=solver, solver_options=options)
        kwargs: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps,
                                  "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "pil"}
        if config.height:
            kwargs["height"] = config.height
        if config.width:
            kwargs["width"] = config.width
        if type(pipe).__name__.startswith("QwenImage"):
            kwargs["true_cfg_scale"] = guidance
        else:
            kwargs["guidance_scale"] = guidance
        if config.image_path:
            from diffusers import AutoPipelineForImage2Image
            from PIL import Image

            pipe = AutoPipelineForImage2Image.from_pipe(pipe)
            kwargs["image"] = Image.open(config.image_path).convert("RGB")
            kwargs["strength"] = 0.4 if config.image_strength is None else config.image_strength
        image = pipe(**kwargs).images[0]
        return GeneratedImage(image, _metadata(self.name, prompt, seed, config, steps, guidance))


def _device_and_dtype(torch) -> tuple[str, Any]:
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps", torch.bfloat16
    return "cpu", torch.float32


def _defaults_for(pipe: Any) -> tuple[int, float]:
    """Default steps/guidance of a pipeline loaded from a path: Flux without dynamic shifting is schnell-like."""
    kind = type(pipe).__name__
    if kind.startswith("Flux"):
        return (25, 3.5) if pipe.scheduler.config.get("use_dynamic_shifting") else (4, 0.0)
    if kind.startswith("QwenImage"):
        return 20, 4.0
    return 28, 3.5


def load(model: str | None = None) -> EmbeddedModel | DiffusersModel:
    """The embedded digits model (no argument), an alias (schnell, dev, qwen, sd3), a hub id or a local path."""
    if model is None or model in ("embedded", "digits"):
        return EmbeddedModel()
    return DiffusersModel.from_pretrained(model, ALIASES.get(model))


class Flux1:
    @staticmethod
    def from_alias(alias: str, path: str | None = None) -> DiffusersModel:
        if alias not in ("schnell", "dev"):
            raise ValueError(f"Flux1 aliases are 'schnell' and 'dev', got {alias!r}")
        return DiffusersModel.from_pretrained(path or alias, None if path else ALIASES[alias])


class QwenImage:
    @staticmethod
    def from_alias(alias: str = "qwen", path: str | None = None) -> DiffusersModel:
        return DiffusersModel.from_pretrained(path or "qwen", None if path else ALIASES["qwen"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="alias (schnell, dev, qwen, sd3), Hugging Face id or local path; default: the embedded "
                             "digits model")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, default=None, help="model calls (default per model: embedded 8, "
                        "schnell 4, dev 25, qwen 20, sd3 28)")
    parser.add_argument("--seed", type=int, nargs="+", default=[42], help="one image per seed")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER,
                        help="a fewstep solver (see `fewstep solvers`); linear / flow_match_euler_discrete = euler")
    parser.add_argument("--scheduler-kwargs", type=json.loads, default={},
                        help='JSON solver options, e.g. \'{"order": 2}\' or \'{"stages": 9}\'')
    parser.add_argument("--image", nargs="+", metavar=("PATH", "STRENGTH"), default=None,
                        help="img2img: start from PATH, noised to STRENGTH (default 0.4)")
    parser.add_argument("--output", default="image.png", help="PNG path; {seed} is replaced by the seed")
    parser.add_argument("--metadata", action="store_true", help="also write a JSON sidecar")


def run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if not isinstance(args.scheduler_kwargs, dict):
        raise ValueError("--scheduler-kwargs must be a JSON object, e.g. '{\"stages\": 9}'")
    solver, _ = resolve_scheduler(args.scheduler, args.scheduler_kwargs)  # fail before loading a model
    image_path, strength = None, None
    if args.image:
        image_path = args.image[0]
        strength = float(args.image[1]) if len(args.image) > 1 else None
        if not Path(image_path).exists():
            raise FileNotFoundError(f"--image: no such file {image_path}")
    model = load(args.model)
    if args.model == "dev" and args.steps is None and solver != "euler":
        print(f"fewstep generate: note: dev defaults to {ALIASES['dev'].steps} steps (its Euler setting); with {solver}"
              " 10-15 usually suffice (--steps)", file=sys.stderr)
    config = Config(args.steps, args.height, args.width, args.guidance, args.scheduler, args.scheduler_kwargs,
                    image_path, strength)
    for seed in args.seed:
        output = args.output.replace("{seed}", str(seed))
        if len(args.seed) > 1 and "{seed}" not in args.output:
            stem = Path(output)
            output = str(stem.with_name(f"{stem.stem}_{seed}{stem.suffix}"))
        path = model.generate_image(seed, args.prompt, config).save(output, export_json_metadata=args.metadata)
        print(f"wrote {path}")
    return 0


__all__ = ["ALIASES", "Config", "DiffusersModel", "EmbeddedModel", "Flux1", "GeneratedImage", "ModelNotFoundError",
           "QwenImage", "load"]
