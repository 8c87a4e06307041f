"""Image generation with mflux's shape of interface, on top of diffusers (CUDA, MPS, CPU) or the embedded model.

    from fewstep import Flux1, Config
    image = Flux1.from_alias("schnell").generate_image(seed=42, prompt="a fox",
                                                       config=Config(num_inference_steps=4, scheduler="stork-2"))
    image.save("fox.png")

`fewstep.load()` (no argument) gives the embedded Fashion-MNIST model with the same `generate_image`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import numbers
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewstep.errors import FewstepError, InputFileError, InvalidInput, NonFiniteError, close_match
from fewstep.models import EMBEDDED
from fewstep.solvers.denoise import guided_options
from fewstep.solvers.plan import StepCountError
from fewstep.solvers.registry import RECOMMENDED

EULER_ALIASES = {"linear": "euler", "flow_match_euler_discrete": "euler", "FlowMatchEulerDiscreteScheduler": "euler"}
DEFAULT_SCHEDULER = RECOMMENDED
MAX_STEPS = 1000  # model calls; more is never few-step sampling and usually a typo
MAX_SIDE = 4096  # pixels per side, checked before anything is allocated
MFLUX_IMAGE_STRENGTH = 0.4  # mflux's --image-strength default (its meaning: higher = closer to the input)
MAX_SEED = 2**32 - 1  # torch's CPU generator (Mersenne Twister) keeps 32 bits: 2**32 + 5 would repeat seed 5
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # output suffix → PIL format
DEFAULT_EMBEDDED = "fashion"  # the model `fewstep generate` runs when none is named (docs/fashion.md)
EMBEDDED_NAMES = ("embedded", *EMBEDDED)  # "embedded" = DEFAULT_EMBEDDED; the others name a module in EMBEDDED
DEVICES = ("cpu", "cuda", "mps")


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


class ModelNotFoundError(InputFileError, FileNotFoundError):
    """The weights of a named model are neither at the given path nor in the local Hugging Face cache, or the name
    is neither an alias, a path nor a Hugging Face id."""


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
    image_strength: float | None = None  # diffusers' meaning: how much noise (1 = all, the input is ignored)


def _suggest(word: str, choices: Any) -> str:
    close = close_match(word, choices)
    return f"; did you mean {close!r}?" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # NumPy integers too


def check_config(config: Config, default_steps: int, default_guidance: float) -> tuple[int, float]:
    """(steps, guidance) of `config` with the model's defaults filled in; `InvalidInput` naming the field if a value
    is unusable (0 is refused, never replaced by a default). Checks the img2img file too, without decoding it."""
    steps = default_steps if config.num_inference_steps is None else config.num_inference_steps
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InvalidInput(f"num_inference_steps (--steps) must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    for name, value in (("height", config.height), ("width", config.width)):
        if value is not None and (not _is_int(value) or not 1 <= value <= MAX_SIDE):
            raise InvalidInput(f"{name} (--{name}) must be an integer from 1 to {MAX_SIDE} pixels, got {value!r}")
    guidance = default_guidance if config.guidance is None else config.guidance
    if (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance)
            or guidance < 0):
        raise InvalidInput(f"guidance (--guidance) must be a finite number ≥ 0, got {guidance!r}")
    strength = config.image_strength
    if strength is not None:
        if config.image_path is None:
            raise InvalidInput("image_strength (--strength) is given without an input image (--image)")
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
            raise InvalidInput(f"image_strength (--strength) must be a number in (0, 1], got {strength!r}")
    if config.image_path is not None:
        check_input_file(config.image_path, "--image")
    return int(steps), float(guidance)


def check_input_file(path: str | os.PathLike, flag: str) -> Path:
    """A path the user named as an input: it must exist and be a regular file (checked before opening, so that a FIFO
    cannot block the read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(f"{flag} {os.fspath(path)}: no such file") from None
    except (OSError, ValueError) as err:
        raise InputFileError(f"{flag} {os.fspath(path)}: cannot read it ({getattr(err, 'strerror', None) or err})"
                             ) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{flag} {os.fspath(path)} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{flag} {os.fspath(path)} is not a regular file (a FIFO, device or socket)")
    return Path(path)


def read_image(path: str | os.PathLike, flag: str = "--image"):
    """The image at `path`, fully decoded (a PIL image); `InputFileError` naming the file if it is missing, not a
    regular file, not an image, truncated or too large to decode safely."""
    import numpy as np
    from PIL import Image

    check_input_file(path, flag)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.copy()
    except Image.DecompressionBombError:
        raise InputFileError(f"{flag} {os.fspath(path)}: the image is too large to decode safely") from None
    except (OSError, SyntaxError, ValueError) as err:  # not an image (UnidentifiedImageError), truncated, corrupt
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputFileError(f"{flag} {os.fspath(path)}: not a readable image ({reason})") from None
    if image.mode.startswith(("I", "F")):
        # 16-bit and float images: PIL's convert("L"/"RGB") clips them to 0-255 (a 16-bit photo turns white, a 0-1
        # float one black); scaled by their type's full range instead (float: 0-1).
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode.startswith("F") else (65535.0 if values.max() > 255 or "16" in image.mode else 255.0)
        image = Image.fromarray(np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8), "L")
    return image


FAMILIES = {"stork": "stork-{}", "adams": "adams{}"}  # scheduler families whose member is picked by `order`
FAMILY_DEFAULTS = {"stork": 4, "adams": 2}  # without `order`: the official STORK default, AdamsScheduler's default


def resolve_scheduler(scheduler: str, kwargs: dict) -> tuple[str, dict]:
    """(fewstep solver name, its options) from a CLI/`Config` scheduler name and its kwargs; InvalidInput if unknown.
    Accepts mflux's Euler aliases and the STORK docs' `{"order": 2}`: `order` picks the member of a family ("stork"
    alone is STORK-4, the official default) and must agree with an explicit one ("stork-2" with order 4 is an error)."""
    from fewstep import solvers

    if not isinstance(scheduler, str):
        raise InvalidInput(f"scheduler (--scheduler) must be a name, got {scheduler!r}")
    if not isinstance(kwargs, dict):
        raise InvalidInput(f"scheduler_kwargs (--scheduler-kwargs) must be a JSON object, got {kwargs!r}")
    name = EULER_ALIASES.get(scheduler, scheduler)
    known = [*solvers.names(), *EULER_ALIASES, *FAMILIES]
    if name not in known:
        raise InvalidInput(f"unknown solver {scheduler!r} (--scheduler); available: {', '.join(solvers.names())}"
                           f"{_suggest(scheduler, known)}")
    options = dict(kwargs)
    # A family member is "stork-4" or "adams3", not "adams-denoise", whose `order` is an option like any other.
    family = next((f for f in FAMILIES if name == f or re.fullmatch(FAMILIES[f].format(r"\d+"), name)), None)
    order = options.pop("order", None) if family is not None else None
    if order is not None and not _is_int(order):  # "3" or 3.0 would name "adams3" by its text
        raise InvalidInput(f"--scheduler-kwargs (scheduler_kwargs) order must be an integer, got {order!r}")
    if order is not None:
        member = FAMILIES[family].format(order)
        if name not in (family, member):
            raise InvalidInput(f"--scheduler {scheduler!r} contradicts --scheduler-kwargs (scheduler_kwargs) "
                               f"order={order!r}")
        name = member
    elif name in FAMILY_DEFAULTS:
        name = FAMILIES[name].format(FAMILY_DEFAULTS[name])
    if name not in solvers.names():
        raise InvalidInput(f"--scheduler-kwargs (scheduler_kwargs) order={order!r} names no {family} solver; "
                           f"available: {', '.join(n for n in solvers.names() if n.startswith(str(family)))}")
    accepted = solvers.info(name).options()
    for key in options:
        if key not in accepted:
            called = repr(name) if name == scheduler else f"{name!r} (--scheduler {scheduler!r})"
            raise InvalidInput(f"solver {called} has no option {key!r} (--scheduler-kwargs); its options: "
                               f"{', '.join(accepted) or 'none'}{_suggest(key, accepted)}")
    return name, options


def build_solver(name: str, options: dict, steps: int) -> Any:
    """The solver `name` with `options`, checked to make exactly `steps` model calls: InvalidInput (or the solver
    file's own InputFileError) before any model is loaded."""
    from fewstep import solvers

    try:
        solver = solvers.get(name, **options)
    except InputFileError:  # a solver file that is missing or unreadable names itself
        raise
    except (TypeError, ValueError) as err:  # the solver's own check of an option value (or of a solver file)
        raise InvalidInput(f"--scheduler-kwargs {json.dumps(options)}: {' '.join(str(err).split())}") from None
    solvers.intervals_for(solver, steps, name)  # StepCountError (an InvalidInput) if it cannot make exactly `steps`
    return solver


def with_shipped_solver(solver: str, options: dict, model: str) -> dict:
    """`neuralsolver` with no `solver_file` on an embedded model runs the solver searched for that model, shipped in
    the package (`fewstep.search.shipped_solver`, docs/search.md); other solvers and explicit files are unchanged."""
    if solver != "neuralsolver" or "solver_file" in options:
        return options
    from fewstep.search import shipped_solver

    found = shipped_solver(model)  # by its shipped name, which the metadata records and any fewstep install resolves
    return options if found is None else {**options, "solver_file": found.stem}


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    metadata: dict

    def save(self, path: str | os.PathLike, export_json_metadata: bool = False) -> Path:
        """Write the image atomically in the format its suffix names (.png with the metadata in text chunks, .jpg /
        .jpeg with it as a JPEG comment, .webp); with `export_json_metadata`, also PATH with suffix .json. Both paths
        are checked before either is written."""
        from fewstep.files import atomic_write, check_output

        path = Path(path)
        image_format = output_format(path)
        sidecar = path.with_suffix(".json")
        check_output(path)
        if export_json_metadata:
            check_output(sidecar, "metadata file")
        text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in self.metadata.items()}
        buffer = io.BytesIO()
        if image_format == "PNG":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            for key, value in text.items():
                info.add_text(key, value)
            self.image.save(buffer, format="PNG", pnginfo=info)
        elif image_format == "JPEG":
            image = self.image if self.image.mode in ("L", "RGB") else self.image.convert("RGB")
            image.save(buffer, format="JPEG", quality=95, comment=json.dumps(self.metadata, sort_keys=True).encode())
        else:
            self.image.save(buffer, format=image_format, quality=95)
        atomic_write(path, buffer.getvalue())
        if export_json_metadata:
            atomic_write(sidecar, json.dumps(self.metadata, indent=2, sort_keys=True).encode(), "metadata file")
        return path


def output_format(path: str | os.PathLike) -> str:
    """The PIL format an output path's suffix names; InvalidInput for any other suffix (or none)."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise InvalidInput(f"--output {os.fspath(path)}: unknown image format {suffix or '(no suffix)'!r}; use "
                           f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def image_strength(config: Config, steps: int) -> float | None:
    """The img2img strength a run of `steps` steps uses, in diffusers' meaning; an image given without one gets the
    CLI's default, mflux's 0.4 (`mflux_strength`: 0.625 at 8 steps), so the API and the CLI make the same picture."""
    if config.image_strength is None and config.image_path:
        return mflux_strength(MFLUX_IMAGE_STRENGTH, steps, "image_strength", "num_inference_steps")
    return config.image_strength


def _metadata(model: str, prompt: str, seed: int, config: Config, steps: int, guidance: float, image: Any,
              options: dict) -> dict:
    """What made `image`; its height and width are the image's own (a flag left out has a model default);
    `solver_options` are the options the solver ran with (scheduler_kwargs plus what `generate` chose)."""
    from fewstep import __version__

    return {"prompt": prompt, "seed": seed, "model": model, "scheduler": config.scheduler, "steps": steps,
            "scheduler_kwargs": dict(config.scheduler_kwargs), "solver_options": dict(options), "guidance": guidance,
            "height": image.height, "width": image.width, "image_path": config.image_path,
            "image_strength": image_strength(config, steps),
            "generator": f"fewstep {__version__}"}


class EmbeddedModel:
    """A class-conditional flow model that ships inside the package: `kind` names its module in
    `fewstep.models.EMBEDDED` (fashion: `fewstep.models.fashion`, the default; digits: `fewstep.models.digits`)."""

    name = f"embedded-{DEFAULT_EMBEDDED}"
    default_steps = 8
    default_guidance = 1.0
    progress = True  # a progress bar while sampling (`fewstep generate --quiet` turns it off)

    def __init__(self, device: str = "cpu", kind: str = DEFAULT_EMBEDDED) -> None:
        from fewstep.models import embedded

        self.kind, self.module = kind, embedded(kind)
        self.name = f"embedded-{kind}"
        self.default_steps = getattr(self.module, "DEFAULT_STEPS", self.default_steps)
        self.default_guidance = getattr(self.module, "DEFAULT_GUIDANCE", self.default_guidance)
        self.dim = getattr(self.module, "DIM", 64)
        self.net = self.module.load_embedded(device)  # noise and solver stay on the CPU: same pixels on every device

    def generate_image(self, seed: int, prompt: str, config: Config | None = None) -> GeneratedImage:
        import torch

        from fewstep.sampling import sample

        config = config or Config()
        steps, guidance = check_config(config, self.default_steps, self.default_guidance)
        _check_prompt(prompt)
        label = self.module.parse_prompt(prompt)  # InvalidInput when it names no class, or several
        seed = _check_seed(seed)
        solver, chosen = resolve_scheduler(config.scheduler, config.scheduler_kwargs)
        chosen = guided_options(solver, chosen, guidance)
        # A solver file searched on a shifted grid: `sample` warns (GridMismatchWarning); the embedded models sample
        # unshifted.
        options = with_shipped_solver(solver, chosen, self.kind)
        noise = torch.randn(1, self.dim, generator=torch.Generator().manual_seed(seed))
        model = self.net.velocity_fn(torch.tensor([label]), guidance)
        begin = 0
        if config.image_path:  # enter the t2i schedule at diffusers' t_start, as the diffusers adapter does
            from fewstep.entry import begin_index_for_strength
            from fewstep.sampling import make_plan

            strength = image_strength(config, steps)
            begin = begin_index_for_strength(steps, strength)
            sigma = float(make_plan(solver, steps, begin_index=begin, **options).sigmas[0])  # or refuse, before a call
            noise = (1 - sigma) * self._image_to_x(config.image_path) + sigma * noise
        with torch.no_grad():
            try:
                x = sample(model, noise, solver, steps, begin_index=begin, progress=self.progress, **options)
            except NonFiniteError as err:  # the model is fixed and finite: the guidance is what can overflow it
                raise NonFiniteError(f"{err} (seed {seed}, guidance {guidance:g}); lower --guidance") from None
        image = self.module.to_image(x[0])
        if config.width is not None or config.height is not None:
            size = (config.width or config.height, config.height or config.width)
            image = image.resize(size, resample=0)
        return GeneratedImage(image, _metadata(self.name, prompt, seed, config, steps, guidance, image, options))


    def _image_to_x(self, path: str):
        """An image file as one model state (1, dim), after `read_image` has checked that it is a readable image."""
        if self.kind == "digits":
            return _digit_from_image(path)
        return self.module.image_to_x(read_image(path))


def _digit_from_image(path: str):
    """An image file as an 8×8 digit in the model's [−1, 1] range (ink = +1, as in scikit-learn's digits)."""
    import numpy as np
    import torch
    from PIL import Image

    grey = np.asarray(read_image(path).convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float64) / 255.0
    return torch.from_numpy((1.0 - grey) * 2.0 - 1.0).reshape(1, 64).float()


class DiffusersModel:
    """A diffusers text-to-image pipeline (Flux, Qwen-Image, SD3, ...) with a fewstep scheduler swapped in."""

    progress = True  # diffusers' progress bar (`fewstep generate --quiet` turns it off)

    def __init__(self, pipe: Any, name: str, default_steps: int, default_guidance: float):
        self.pipe, self.name = pipe, name
        self.default_steps, self.default_guidance = default_steps, default_guidance

    @classmethod
    def from_pretrained(cls, model: str, alias: Alias | None = None, device: str | None = None) -> DiffusersModel:
        """Load from a local path, or a hub id / alias already in the local Hugging Face cache (never downloads).
        `device`: cpu, cuda or mps (default: the best available; bfloat16 on an accelerator, float32 on the CPU)."""
        alias = alias or ALIASES.get(model)
        pipe = load_pipeline(model, device, alias=alias)
        steps, guidance = (alias.steps, alias.guidance) if alias else _defaults_for(pipe)
        return cls(pipe, model, steps, guidance)

    def generate_image(self, seed: int, prompt: str, config: Config | None = None) -> GeneratedImage:
        import numpy as np
        import torch
        from PIL import Image

        from fewstep.diffusers import FewstepScheduler

        config = config or Config()
        steps, guidance = check_config(config, self.default_steps, self.default_guidance)
        _check_prompt(prompt)
        seed = _check_seed(seed)
        pipe = self.pipe
        solver, options = resolve_scheduler(config.scheduler, config.scheduler_kwargs)
        options = guided_options(solver, options, guidance, classifier_free=_classifier_free(pipe))
        try:
            pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver=solver, solver_options=options)
        except InvalidInput as err:  # a key of the model's scheduler config, which no flag sets
            raise InvalidInput(f"--model {self.name}: scheduler/scheduler_config.json: {err}") from None
        # "np", not "pil": a NaN image must fail here, not become black pixels (PIL's uint8 cast turns NaN into 0)
        kwargs: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps,
                                  "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np"}
        if config.height is not None:
            kwargs["height"] = config.height
        if config.width is not None:
            kwargs["width"] = config.width
        if type(pipe).__name__.startswith("QwenImage"):
            kwargs["true_cfg_scale"] = guidance
            if guidance > 1:  # diffusers runs Qwen-Image's CFG only with a negative prompt; " " is the model card's
                kwargs["negative_prompt"] = " "
        else:
            kwargs["guidance_scale"] = guidance
        if config.image_path:
            from diffusers import AutoPipelineForImage2Image

            try:
                pipe = AutoPipelineForImage2Image.from_pipe(pipe)
            except ValueError:
                raise InvalidInput(f"--image: {type(pipe).__name__} has no image-to-image pipeline in diffusers"
                                   ) from None
            kwargs["image"] = read_image(config.image_path).convert("RGB")
            kwargs["strength"] = image_strength(config, steps)
        pipe.set_progress_bar_config(disable=not self.progress)
        try:
            pixels = pipe(**kwargs).images[0]
        except FewstepError:
            raise
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError, TypeError) as err:
            # size, config or model failure; TypeError: a pipeline that takes no prompt (unconditional DDPM)
            raise InvalidInput(f"--model {self.name}: the pipeline failed ({type(err).__name__}: "
                               f"{' '.join(str(err).split())})") from None
        if not np.isfinite(pixels).all():
            raise NonFiniteError(f"--model {self.name} produced NaN or Inf pixels (seed {seed}, guidance {guidance:g}"
                                 "); lower --guidance or check the model")
        image = Image.fromarray((pixels * 255).round().astype(np.uint8))  # as diffusers' numpy_to_pil
        return GeneratedImage(image, _metadata(self.name, prompt, seed, config, steps, guidance, image, options))


def _classifier_free(pipe: Any) -> bool:
    """Whether the pipeline applies `--guidance` as classifier-free guidance (two predictions combined: SD3, PixArt,
    Qwen-Image's true CFG): the FLUX.1 family takes it as an input of one call (dev's distilled guidance) or ignores
    it (schnell)."""
    return not type(pipe).__name__.startswith("Flux")


def quiet_libraries() -> None:
    """--quiet with a diffusers pipeline: diffusers' and transformers' loading bars and warnings off too, and Python
    warnings (fewstep's note that a source config's clip_sample is not applied, libraries' deprecations); errors
    still show."""
    import importlib

    warnings.simplefilter("ignore")

    for name in ("diffusers", "transformers"):
        try:
            library = importlib.import_module(f"{name}.utils")
        except ImportError:
            continue
        library.logging.set_verbosity_error()
        library.logging.disable_progress_bar()


def _check_pipeline_folder(folder: Path, model: str) -> None:
    """Every component model_index.json names must have its folder: transformers fills a missing tokenizer with an
    empty one and the prompt is silently ignored."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # not a pipeline folder: from_pretrained says so
    if not isinstance(index, dict):
        raise InputFileError(f"--model {model}: model_index.json must be a JSON object (component name → [library, "
                             f"class]), got {type(index).__name__}")
    missing = [name for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list)
               and len(spec) == 2 and spec[0] is not None and spec[1] is not None and not (folder / name).is_dir()]
    if missing:
        raise InputFileError(f"--model {model}: the pipeline folder has no {', '.join(missing)} folder "
                             "(model_index.json lists it)")


def _check_seed(seed: Any) -> int:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidInput(f"seed (--seed) must be an integer from 0 to 2**32-1, got {seed!r}")
    return int(seed)


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise InvalidInput(f"prompt (--prompt) must be a string, got {prompt!r}")


def _available(torch, device: str) -> bool:
    if device == "cuda":
        return bool(torch.cuda.is_available())
    if device == "mps":
        return getattr(torch.backends, "mps", None) is not None and bool(torch.backends.mps.is_available())
    return device == "cpu"


def pick_device(device: str | None = None) -> str:
    """`device` if torch can use it (InvalidInput naming --device otherwise); None: cuda, then mps, then cpu."""
    import torch

    if device is None:
        return next(d for d in ("cuda", "mps", "cpu") if _available(torch, d))
    if device not in DEVICES:
        raise InvalidInput(f"--device {device!r}: use one of {', '.join(DEVICES)}{_suggest(device, DEVICES)}")
    if not _available(torch, device):
        raise InvalidInput(f"--device {device}: this torch build or machine has no {device} device")
    return device


def load_pipeline(model: str, device: str | None = None, dtype: Any = None, alias: Alias | None = None) -> Any:
    """The diffusers pipeline `model` names (an alias, a local folder, or a hub id already in the local Hugging Face
    cache; never downloads; `alias` loads its repo instead) on `device` (default: the best available) in `dtype`
    (default: bfloat16 on an accelerator, float32 on the CPU). A failure is one InvalidInput line naming --model."""
    import torch

    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise InvalidInput(f"--model {model}: a diffusers pipeline needs diffusers (pip install diffusers)") from None
    if model in EMBEDDED_NAMES:
        raise InvalidInput(f"--model {model} is an embedded model, not a diffusers pipeline")
    check_model_name(model)
    alias = alias or ALIASES.get(model)
    source = alias.repo if alias else model
    device, default_dtype = _device_and_dtype(torch, device)
    if Path(source).is_dir():
        _check_pipeline_folder(Path(source), model)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype or default_dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        if Path(source).exists():  # there, but not loadable: say why, not that it is missing
            raise InputFileError(f"--model {model}: cannot load this pipeline folder ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())})") from None
        raise ModelNotFoundError(f"model {model!r} ({source}) is not available locally; download it first: `hf "
                                 f"download {source}` (accept its licence on the Hub if gated), or pass --model "
                                 "PATH to a local copy") from None
    return pipe.to(device)


def _device_and_dtype(torch, device: str | None = None) -> tuple[str, Any]:
    device = pick_device(device)
    return device, (torch.float32 if device == "cpu" else torch.bfloat16)


def _defaults_for(pipe: Any) -> tuple[int, float]:
    """Default steps/guidance of a pipeline loaded from a path: Flux without dynamic shifting is schnell-like."""
    kind = type(pipe).__name__
    if kind.startswith("Flux"):
        return (25, 3.5) if pipe.scheduler.config.get("use_dynamic_shifting") else (4, 0.0)
    if kind.startswith("QwenImage"):
        return 20, 4.0
    return 28, 3.5


def check_model_name(model: str | None) -> None:
    """ModelNotFoundError, with a suggestion, for a name that is neither an embedded model, an alias, an existing
    path nor shaped like a Hugging Face id (owner/name): `schnel` → did you mean 'schnell'?"""
    if model is None or model in EMBEDDED_NAMES or model in ALIASES:
        return
    if not isinstance(model, str) or not model.strip():
        raise InvalidInput(f"--model must be a name or path, got {model!r}")
    if os.path.lexists(model):
        return
    # A missing path, not owner/name: relative or absolute, deeper than one "/", or with Windows' separator.
    if model.startswith((".", "~", os.sep, "/")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
        raise ModelNotFoundError(f"--model {model}: no such directory (a local model is a folder saved by diffusers' "
                                 "save_pretrained or downloaded with `hf download`)")
    if "/" in model:  # owner/name: a Hugging Face id, looked up in the local cache when loading
        return
    raise ModelNotFoundError(f"unknown model {model!r} (--model): not an alias ({', '.join(ALIASES)}), "
                             f"an embedded model ({', '.join(EMBEDDED_NAMES)}), a Hugging Face id (owner/name) or "
                             f"an existing path{_suggest(model, [*ALIASES, *EMBEDDED_NAMES])}")


def embedded_kind(model: str | None) -> str:
    """The `fewstep.models.EMBEDDED` name of an embedded `--model` (none and "embedded" mean DEFAULT_EMBEDDED)."""
    return DEFAULT_EMBEDDED if model in (None, "embedded") else model


def load(model: str | os.PathLike | None = None, device: str | None = None) -> EmbeddedModel | DiffusersModel:
    """The embedded Fashion-MNIST model (no argument; "digits": the digits model), an alias (schnell, dev, qwen, sd3),
    a hub id or a local path, on `device` (cpu, cuda, mps; default: the CPU for the embedded model, the best available
    for a pipeline)."""
    model = os.fspath(model) if isinstance(model, os.PathLike) else model
    check_model_name(model)
    if model is None or model in EMBEDDED_NAMES:
        return EmbeddedModel(pick_device(device) if device is not None else "cpu", embedded_kind(model))
    return DiffusersModel.from_pretrained(model, ALIASES.get(model), device)


class Flux1:
    @staticmethod
    def from_alias(alias: str, path: str | None = None) -> DiffusersModel:
        if alias not in ("schnell", "dev"):
            raise InvalidInput(f"Flux1 aliases are 'schnell' and 'dev', got {alias!r}{_suggest(str(alias), ALIASES)}")
        return DiffusersModel.from_pretrained(path or alias, None if path else ALIASES[alias])


class QwenImage:
    @staticmethod
    def from_alias(alias: str = "qwen", path: str | None = None) -> DiffusersModel:
        return DiffusersModel.from_pretrained(path or "qwen", None if path else ALIASES["qwen"])


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"stages\": 9}}', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate images. img2img strength comes in two directions: --image PATH [STRENGTH] (as mflux, and its "
        "older --image-path / --image-strength) uses mflux's meaning (higher = closer to the input, fewer model "
        "calls: the run starts at step max(1, int(steps·S))); --image PATH --strength S uses diffusers' (how much "
        "noise is added: higher = further from the input, more model calls: the run starts at step "
        "int(steps − steps·S)).")
    parser.add_argument("--model", "-m", default=None,
                        help=f"alias ({', '.join(ALIASES)}), embedded model ({', '.join(EMBEDDED)}), Hugging Face id "
                             "(owner/name, from the local cache: `hf download ID` first) or local path; default: the "
                             "embedded Fashion-MNIST model (--model digits: the 8×8 digits model)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, default=None, help=f"model calls, 1-{MAX_STEPS} (default per model: "
                        "embedded 8, schnell 4, dev 25, qwen 20, sd3 28)")
    parser.add_argument("--seed", type=int, nargs="+", default=[42], help="one image per seed, 0 to 2**32-1 "
                        "(default 42)")
    parser.add_argument("--height", type=int, default=None, help=f"pixels, 1-{MAX_SIDE}")
    parser.add_argument("--width", type=int, default=None, help=f"pixels, 1-{MAX_SIDE}")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default per model)")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER,
                        help="a fewstep solver (see `fewstep solvers`); linear / flow_match_euler_discrete = euler")
    parser.add_argument("--scheduler-kwargs", type=_json_object, default={},
                        help='JSON solver options, e.g. \'{"order": 2}\', \'{"stages": 9}\' or '
                             '\'{"solver_file": "my.json"}\' (neuralsolver)')
    parser.add_argument("--image", nargs="+", metavar=("PATH", "STRENGTH"), default=None,
                        help="img2img from PATH; STRENGTH in (0, 1) with mflux's meaning: higher = closer to the "
                             f"input (default {MFLUX_IMAGE_STRENGTH:g}, as mflux)")
    parser.add_argument("--strength", type=float, default=None,
                        help="with --image PATH: img2img strength in (0, 1] with diffusers' meaning instead "
                             "(higher = more change; 1 ignores the input)")
    parser.add_argument("--image-path", default=None, metavar="PATH",
                        help="img2img from PATH (mflux's older flag; same as --image PATH)")
    parser.add_argument("--image-strength", type=float, default=None, metavar="S",
                        help=f"mflux's older strength flag, its meaning (default {MFLUX_IMAGE_STRENGTH:g})")
    parser.add_argument("--output", "-o", default="image.png",
                        help="image path; {seed} is replaced by the seed; the suffix picks the format (.png, .jpg, "
                             ".jpeg, .webp); an existing directory or a path ending in / means DIR/image_{seed}.png")
    parser.add_argument("--metadata", action="store_true", help="also write the settings to OUTPUT with suffix .json")
    parser.add_argument("--device", default=None, choices=DEVICES,
                        help="default: the best available for a pipeline (cuda, mps, cpu), cpu for the embedded model")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars, notes or 'wrote' lines")


def mflux_strength(strength: float, steps: int, flag: str = "--image-strength", steps_flag: str = "--steps") -> float:
    """mflux's `image_strength` (higher = closer to the input) as diffusers' `strength` for `steps` steps: mflux
    starts at step k = max(1, int(steps·clamp(S, 0, 1))) and runs steps − k of them; the returned d = (steps − k)/steps
    (moved by a few ulps where rounding needs it) makes diffusers' get_timesteps start at the same step k. A strength
    ≤ 0, with which mflux ignores the input image, is refused (`flag` and `steps_flag` name the strength and the step
    count in the messages)."""
    from fewstep.entry import begin_index_for_strength

    if not (math.isfinite(strength) and strength > 0):
        raise InvalidInput(f"{flag} must be a finite number above 0 and below 1 (mflux's meaning: higher = closer to "
                           f"the input; at 0 mflux ignores the image), got {strength}")
    skipped = max(1, int(steps * min(strength, 1.0)))
    remaining = steps - skipped
    if remaining < 1 and steps < 2:  # whatever the strength, even the default one: mflux skips step 1 at least
        raise InvalidInput(f"{steps_flag} {steps} leaves no step to run from an input image (mflux starts img2img at "
                           f"step max(1, int(steps·strength)) ≥ 1); give {steps_flag} 2 or more")
    if remaining < 1:
        raise InvalidInput(f"{flag} {strength:g} with {steps} steps leaves no step to run (mflux starts at step "
                           f"max(1, int(steps·strength)) = {skipped}); it must be below 1")
    d = remaining / steps
    while begin_index_for_strength(steps, d) < skipped:
        d = math.nextafter(d, 0.0)
    while begin_index_for_strength(steps, d) > skipped:
        d = math.nextafter(d, 2.0)
    return d


def _image_arguments(args: argparse.Namespace) -> tuple[str | None, float | None, float | None, str]:
    """(path, diffusers strength, mflux strength, the flag that named the image) from the img2img flags: mflux's
    `--image PATH [STRENGTH]` (its preferred form) or its older `--image-path` / `--image-strength`, both in mflux's
    meaning; `--image PATH --strength S` in diffusers'. A mix is refused."""
    legacy = args.image_path is not None or args.image_strength is not None
    if args.image is not None and legacy:
        raise InvalidInput("use either --image PATH [STRENGTH] or the older --image-path / --image-strength, not both")
    if legacy:
        if args.strength is not None:
            raise InvalidInput("--strength (diffusers' meaning: higher = more change) goes with --image PATH, not with "
                               "--image-path / --image-strength (mflux's meaning); give one of them, not both")
        if args.image_path is None:
            raise InvalidInput("--image-strength needs --image-path")
        strength = MFLUX_IMAGE_STRENGTH if args.image_strength is None else args.image_strength
        return args.image_path, None, strength, "--image-path"
    if args.image is None:
        if args.strength is not None:
            raise InvalidInput("--strength needs --image PATH")
        return None, None, None, ""
    if len(args.image) > 2:
        raise InvalidInput(f"--image takes PATH and optionally STRENGTH, got {len(args.image)} values: "
                           f"{' '.join(args.image)}")
    if len(args.image) == 2:
        if args.strength is not None:
            raise InvalidInput("give the strength once: --image PATH STRENGTH (mflux's meaning: higher = closer to the "
                               "input) or --image PATH --strength S (diffusers' meaning: higher = more change), not "
                               "both")
        try:
            return args.image[0], None, float(args.image[1]), "--image"
        except ValueError:
            raise InvalidInput(f"--image STRENGTH must be a number (mflux's meaning: higher = closer to the input), "
                               f"got {args.image[1]!r}") from None
    if args.strength is None:
        return args.image[0], None, MFLUX_IMAGE_STRENGTH, "--image"
    if not 0 < args.strength <= 1:  # also refuses nan
        raise InvalidInput(f"--strength must be a number in (0, 1] (diffusers' meaning), got {args.strength}")
    return args.image[0], args.strength, None, "--image"


def output_paths(template: str, seeds: list[int]) -> list[Path]:
    """One output path per seed: {seed} replaced; several seeds without {seed} get _SEED before the suffix; an
    existing directory or a path ending in a separator means DIR/image_{seed}.png."""
    if not template:
        raise InvalidInput("--output is empty")
    if template.endswith(("/", os.sep)) or os.path.isdir(template):
        template = os.path.join(template, "image_{seed}.png")
    paths = []
    for seed in seeds:
        path = Path(template.replace("{seed}", str(seed)))
        if len(seeds) > 1 and "{seed}" not in template:
            path = path.with_name(f"{path.stem}_{seed}{path.suffix}")
        paths.append(path)
    return paths


def _one_line_grid_warnings(show: Callable) -> Callable:
    """A `warnings.showwarning` that prints fewstep's warnings about the run's grid (GridMismatchWarning, the embedded
    model's or the diffusers scheduler's; StageEntryWarning, img2img entering at Heun's second stage) as one
    `fewstep generate: warning:` line, as the command reports everything, once per run (each seed warns again: the
    pipeline gets a new scheduler, and the default filter's once-per-place memory is reset whenever a library
    changes the filters), and passes the others to `show`."""
    from fewstep.entry import StageEntryWarning
    from fewstep.search import GridMismatchWarning

    shown: set[str] = set()

    def showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                    line: str | None = None) -> None:
        if issubclass(category, (GridMismatchWarning, StageEntryWarning)):
            if str(message) not in shown:
                shown.add(str(message))
                print(f"fewstep generate: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def run(args: argparse.Namespace) -> int:
    from fewstep.files import check_output

    # Everything that needs no model is checked first, and nothing is written until every check has passed.
    image_path, strength, mflux, image_flag = _image_arguments(args)
    for seed in args.seed:
        _check_seed(seed)
    check_model_name(args.model)
    solver, options = resolve_scheduler(args.scheduler, args.scheduler_kwargs)
    outputs = output_paths(args.output, args.seed)
    for path in outputs:
        output_format(path)
        check_output(path, "--output")
        if args.metadata:
            check_output(path.with_suffix(".json"), "metadata file (--metadata)")
    if image_path is not None:
        read_image(image_path, image_flag)
        for path in outputs:  # the input would be gone after the first seed, or after one run
            if path.exists() and os.path.samefile(path, image_path):
                raise InvalidInput(f"--output {path}: that is the input image ({image_flag} {image_path}); write the "
                                   "result to another file")

    def checked(default_steps: int, default_guidance: float) -> Config:
        steps = default_steps if args.steps is None else args.steps
        config = Config(args.steps, args.height, args.width, args.guidance, args.scheduler, args.scheduler_kwargs,
                        image_path, strength)
        if mflux is not None and _is_int(steps) and 1 <= steps <= MAX_STEPS:
            config.image_strength = mflux_strength(mflux, steps, "--image STRENGTH" if image_flag == "--image"
                                                   else "--image-strength")
        steps, _ = check_config(config, default_steps, default_guidance)
        from fewstep.entry import StageEntryWarning, begin_index_for_strength
        from fewstep.sampling import make_plan

        # The plan itself, before any model loads: a solver file without this step count, or a solver that cannot
        # enter the schedule mid-way for img2img, is refused here. The solver's message does not know --steps.
        begin = 0 if image_path is None else begin_index_for_strength(steps, image_strength(config, steps))
        try:
            build_solver(solver, options, steps)
            with warnings.catch_warnings():  # the run itself says it, once
                warnings.simplefilter("ignore", StageEntryWarning)
                make_plan(solver, steps, begin_index=begin, **options)
        except StepCountError as err:
            raise StepCountError(f"--steps {steps}: {err}") from None
        return config

    embedded = args.model is None or args.model in EMBEDDED_NAMES
    if embedded:
        options = with_shipped_solver(solver, options, embedded_kind(args.model))
    if args.model in ALIASES:
        checked(ALIASES[args.model].steps, ALIASES[args.model].guidance)  # before the (slow) model load
    if embedded:
        import torch

        # The digits MLP is tiny: more intra-op threads only add overhead (~70 ms a call instead of 1-14 ms on a
        # many-core machine); the fashion U-Net gains from a few.
        small = embedded_kind(args.model) == "digits"
        torch.set_num_threads(1 if small else max(1, min(4, os.cpu_count() or 1)))
    if args.quiet and not embedded:
        quiet_libraries()
    model = load(args.model, args.device)
    model.progress = not args.quiet
    config = checked(model.default_steps, model.default_guidance)
    if args.model == "dev" and args.steps is None and solver != "euler" and not args.quiet:
        print(f"fewstep generate: note: dev defaults to {ALIASES['dev'].steps} steps (its Euler setting); with {solver}"
              " 10-15 usually suffice (--steps)", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_grid_warnings(warnings.showwarning)
        for seed, output in zip(args.seed, outputs, strict=True):
            path = model.generate_image(seed, args.prompt, config).save(output, export_json_metadata=args.metadata)
            if not args.quiet:
                print(f"wrote {path}")
    return 0


__all__ = ["ALIASES", "Config", "DiffusersModel", "EmbeddedModel", "Flux1", "GeneratedImage", "ModelNotFoundError",
           "QwenImage", "load"]
