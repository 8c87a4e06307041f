"""diffusers scheduler adapter: any registered fewstep solver as a drop-in scheduler (contract: docs/diffusers.md).

One `step()` = one model call and `len(timesteps)` = NFE, for every solver and both model kinds:

* `prediction_type="flow_prediction"` (Flux, SD3, Qwen-Image): the model returns v = dx/dσ and the solver's plan
  runs on (x, v) as it is.
* `prediction_type="epsilon"` (PixArt-Σ, SD): the VP training schedule (ᾱ and the timestep spacing) is diffusers'
  own DDIMScheduler built from the config's keys, and the solver runs in flow coordinates s = σ/(α+σ),
  x̃ = x/(α+σ); the flow plan is rewritten on (x, ε) once, in float64, at `set_timesteps`
  (`fewstep.entry.epsilon_plan`), so `step()` is the same single linear combination in both modes. Euler there is
  DDIM(η=0). Timesteps are VP indices (floats between training timesteps for a searched grid). A call below the
  lowest training noise (Heun's last stage, at σ = 0) is made at timestep 0.

Mid-schedule entry (img2img, inpaint, `set_begin_index`, or a first `step()` at a later timestep) is
`fewstep.entry.enter`, the same as `fewstep.sample(..., begin_index=k)` and `fewstep generate --image`.

from_config: users switch schedulers back and forth (`Ours.from_config(FlowMatchEuler.from_config(ours.config))`).
What the *source* scheduler did is kept: a FlowMatch* class is flow matching; UniPC / DPM-Solver / DEIS with
`use_flow_sigmas` or `prediction_type="flow_prediction"` are flow matching with shift = their `flow_shift`; DDIM-like
classes are ε with their betas and spacing, defaults included. Our own config records every schedule key explicitly
(none in `_use_default_values` but a `timestep_spacing` that was only a default, which the next diffusers class
replaces by its own, as it would from the source directly) and mirrors `shift` as `flow_shift`, so that diffusers'
flow schedulers built from it (UniPC/DPM-Solver with `use_flow_sigmas=True`) get the same shift and flow prediction,
and the keys they do not know travel along as hidden config. A config dict, a FrozenDict or a saved config folder /
JSON path is accepted.
"""
from __future__ import annotations

import inspect
import math
import numbers
import operator
import warnings
from dataclasses import dataclass

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from fewstep.entry import enter, epsilon_plan, flow_time, vp_scale
from fewstep.errors import InvalidInput
from fewstep.sampling import resolve_solver
from fewstep.schedules import SPACINGS, flow_sigmas, resample_grid, respace, shift_problem
from fewstep.search import GridMismatchWarning, grid_mismatch
from fewstep.solvers.denoise import guided_options
from fewstep.solvers.neuralsolver import NeuralSolver
from fewstep.solvers.plan import PlanRun, grid_plan, intervals_for
from fewstep.solvers.registry import RECOMMENDED

PREDICTIONS = {"flow_prediction": "flow", "epsilon": "epsilon"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
# How `timestep_spacing` places N VP timesteps. DDIM (and PNDM, DDPM, Euler): N values from the top down to t ≈ 0, so
# the last call is at the lowest training noise; DPM-Solver (and UniPC, DEIS): N + 1 values without the lowest, the
# last step going from t > 0 to σ = 0. The same name means different grids to the two families.
SPACING_RULES = {"ddim": DDIMScheduler, "dpm-solver": DPMSolverMultistepScheduler}
# Keys that describe the model's training schedule (flow: the shift and its variants; ε: the VP betas and spacing).
# `from_config` keeps them even when the source scheduler only had them as defaults (DDIMScheduler() records every key
# in `_use_default_values`): DDIM's default prediction_type "epsilon" says what the model predicts, it is not a
# default of ours to replace. Our own config never lists them as defaults, so they survive a trip through other classes.
SCHEDULE_KEYS = ("num_train_timesteps", "prediction_type", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                 "base_image_seq_len", "max_image_seq_len", "time_shift_type", "shift_terminal", "invert_sigmas",
                 "beta_start", "beta_end", "beta_schedule", "trained_betas", "timestep_spacing", "steps_offset",
                 "timestep_spacing_rule",
                 *(f"use_{name}_sigmas" for name in SPACINGS))
# diffusers schedulers whose configs describe no VP or flow model these solvers can sample (by class name; a live
# EDM config is recognised by its sigma_data key).
UNSUPPORTED_CLASSES = {
    **dict.fromkeys(("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"),
                    "an EDM-parameterised model (σ-scaled inputs, sigma_data)"),
    **dict.fromkeys(("DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"),
                    "an inverse scheduler (data to noise)"),
    **dict.fromkeys(("CMStochasticIterativeScheduler", "KarrasVeScheduler", "ScoreSdeVeScheduler",
                     "IPNDMScheduler", "DDPMWuerstchenScheduler", "VQDiffusionScheduler", "AmusedScheduler"),
                    "a scheduler whose model is neither a VP ε nor a flow-matching model"),
}
# Source-scheduler options that change what the sampler computes and that no fewstep solver does: refused in
# from_config rather than kept as hidden config that silently does nothing. clip_sample is only refused when asked for
# (a keyword of from_config): DDIMScheduler() and DDPMScheduler() default to it and write it into every saved file, so a
# source config that has it is taken with a warning, the same before and after a save.
UNSUPPORTED = {"rescale_betas_zero_snr": "zero terminal SNR", "thresholding": "dynamic thresholding of x0",
               "stochastic_sampling": "stochastic sampling (fewstep solvers are ODE solvers)",
               "use_lu_lambdas": "a grid uniform in log-SNR",
               "clip_sample": "clipping x0 to clip_sample_range"}


# EulerDiscreteScheduler's bounds of its Karras / exponential / beta sigmas: refused (our sigmas span the schedule).
SIGMA_BOUNDS = ("sigma_min", "sigma_max")


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


def _schedule_of(config: dict, cls: type) -> dict:
    """`config` with the source scheduler's own schedule made explicit in our keys, so that `from_config` keeps what
    the source did (module doc, "from_config"): flow or ε, and the shift under its name here."""
    config = dict(config)
    source = config.get("_class_name")
    # Ours: a live config has no _class_name but our fewstep_class; a file saved before that key, our _class_name.
    ours = _is_ours(config)
    if source is None and not ours:
        source = _live_unsupported_class(config)
    if source in UNSUPPORTED_CLASSES or "sigma_data" in config:
        what = UNSUPPORTED_CLASSES.get(source, UNSUPPORTED_CLASSES["EDMEulerScheduler"])
        raise InvalidInput(f"{source or 'a config with sigma_data'}: {what} is not supported")
    flow_class = isinstance(source, str) and source.startswith("FlowMatch")
    if flow_class:  # FlowMatchEuler/Heun/LCM are flow matching whatever prediction_type an older config left hidden
        config["prediction_type"] = "flow_prediction"
    elif not ours and (config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction"):
        # UniPC, DPM-Solver(++), DEIS, SA-Solver in flow mode: their shift is `flow_shift`
        config["prediction_type"] = "flow_prediction"
        if "flow_shift" in config:
            config["shift"] = config["flow_shift"]
    elif isinstance(source, str) and not ours and "prediction_type" not in config:
        # Early configs (SD 1.x's PNDMScheduler JSON) have no prediction_type: the class default, ε, is what ran.
        config["prediction_type"] = "epsilon"
    if isinstance(source, str) and not ours and "timestep_spacing" not in config:
        # An older file of a class whose default spacing is not ours ("leading"): DPM-Solver's and Euler's is
        # "linspace"; DPMSolverSinglestep has no such key and spaces as DPM-Solver's "linspace".
        param = inspect.signature(getattr(diffusers, source, cls).__init__).parameters.get("timestep_spacing")
        config["timestep_spacing"] = param.default if param is not None else "linspace"
    if not ours and ("solver_order" in config or source == "DPMSolverSinglestepScheduler"):
        config["timestep_spacing_rule"] = "dpm-solver"  # DPM-Solver, UniPC, DEIS (a live config has no _class_name)
    mine = config.pop("fewstep_class", source if source in _our_classes() else cls.__name__)  # not an __init__ key
    if mine != cls.__name__:
        # Another fewstep scheduler's solver and its options (StorkScheduler's order 4 is not AdamsScheduler's order
        # 4): the schedule is kept, the solver is this class's default, as between two diffusers classes.
        config = {k: v for k, v in config.items() if k not in _solver_keys()}
    # A default of the source class is still what that scheduler did, not a default of ours to replace.
    config["_use_default_values"] = [k for k in config.get("_use_default_values", []) if k not in SCHEDULE_KEYS]
    return config


def _is_ours(config: dict) -> bool:
    """A config of one of fewstep's schedulers: live (our fewstep_class key) or saved (our _class_name)."""
    return "fewstep_class" in config or config.get("_class_name") in _our_classes()


def _live_unsupported_class(config: dict) -> str | None:
    """The unsupported class a live config (a `.config` never saved: no `_class_name`) comes from, recognised by its
    keys being exactly that class's __init__ parameters (no two diffusers schedulers share a parameter set; checked
    against diffusers 0.42.1)."""
    keys = {k for k in config if not k.startswith("_")}
    for name in UNSUPPORTED_CLASSES:
        cls = getattr(diffusers, name, None)
        if cls is not None and keys == set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}:
            return name
    return None


def _our_classes() -> set[str]:
    return {cls.__name__ for cls in _our_types()}


def _our_types() -> list[type]:
    classes, todo = [], [FewstepScheduler]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo += cls.__subclasses__()
    return classes


def _solver_keys() -> set[str]:
    """The config keys that choose a solver and its options (every class's own __init__ keys, not schedule keys)."""
    base = set(inspect.signature(FewstepScheduler.__init__.__wrapped__).parameters) - {"solver", "solver_options"}
    own = {name for cls in _our_types() for name in inspect.signature(cls.__init__).parameters}
    return own - base - {"self", "schedule"}


def _number(value: object, what: str) -> object:
    """A one-element tensor or array (a pipeline's `mu`, a 0-d shift) as its Python number; anything else as given,
    for the caller's own check. `what` names it when it holds several values."""
    if not hasattr(value, "item"):
        return value
    size = value.numel() if hasattr(value, "numel") else np.size(value)
    if size != 1:
        raise InvalidInput(f"{what} must be one number, got {size} values")
    return value.item()


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Every fewstep solver as a diffusers scheduler: `FewstepScheduler.from_config(pipe.scheduler.config,
    solver="stork-4", solver_options={...})`. Accepts FlowMatchEulerDiscreteScheduler's keys (shift, dynamic
    shifting, shift_terminal) and, with `prediction_type="epsilon"`, DDIMScheduler's schedule keys."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "DDIMScheduler",
                    "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler"]
    # One timesteps entry per model call for every solver, Heun included: num_inference_steps counts model calls, so
    # img2img's `timesteps[t_start * order:]`, with t_start computed from num_inference_steps, must count calls too.
    # FlowMatchHeun's order = 2 goes with its num_inference_steps counting Heun steps (2 calls each); here it would run
    # strength 0.6 of 6 calls as 2 calls instead of 4. Repeated Heun values without a begin index: see `step`.
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, solver: str = RECOMMENDED, solver_options: dict | None = None,
                 classifier_free_guidance: float | None = None, num_train_timesteps: int = 1000,
                 shift: float = 1.0, use_dynamic_shifting: bool = False, base_shift: float = 0.5,
                 max_shift: float = 1.15, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 time_shift_type: str = "exponential", shift_terminal: float | None = None,
                 invert_sigmas: bool = False, prediction_type: str = "flow_prediction", beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 timestep_spacing: str = "leading", steps_offset: int = 0, timestep_spacing_rule: str = "ddim",
                 use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False):
        if not isinstance(solver, str):
            raise InvalidInput(f"solver must be a fewstep solver name (`fewstep solvers` lists them), got {solver!r}")
        if solver_options is not None and not isinstance(solver_options, dict):
            raise InvalidInput(f"solver_options must be a dict of the solver's options, got {solver_options!r}")
        if prediction_type not in PREDICTIONS:
            raise InvalidInput(f"prediction_type must be one of {', '.join(PREDICTIONS)}, got {prediction_type!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise InvalidInput(f"num_train_timesteps must be an integer of at least 2, got {num_train_timesteps!r}")
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise InvalidInput(f"shift must be a finite number > 0, got {shift!r}")
        if invert_sigmas:
            raise InvalidInput("invert_sigmas=True (Mochi) is not supported")
        if time_shift_type not in ("exponential", "linear"):
            raise InvalidInput(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        if shift_terminal is not None and not (isinstance(shift_terminal, numbers.Real) and not isinstance(
                shift_terminal, bool) and (shift_terminal == 0 or 0 < shift_terminal < 1)):  # 0 is off, as None
            raise InvalidInput(f"shift_terminal must be the last σ before 0, a number in (0, 1) (Qwen-Image: 0.02), or "
                               f"None or 0 (off), got {shift_terminal!r}")
        options = dict(solver_options or {})
        if classifier_free_guidance is not None:
            if (isinstance(classifier_free_guidance, bool) or not isinstance(classifier_free_guidance, (int, float))
                    or not math.isfinite(classifier_free_guidance) or classifier_free_guidance < 0):
                raise InvalidInput("classifier_free_guidance must be the pipeline's guidance scale (a finite number "
                                   f">= 0) or None, got {classifier_free_guidance!r}")
            # A scheduler never sees the guidance; told it, it chooses as `fewstep generate` does.
            options = guided_options(solver, options, float(classifier_free_guidance))
        # Unknown solver or option, or a solver made for the other prediction type: an error here, not in step().
        self._solver, _ = resolve_solver(solver, options, PREDICTIONS[prediction_type])
        self._solver_name = solver
        self._epsilon = prediction_type == "epsilon"
        self._vp = None
        # UniPC / DPM-Solver in flow mode with use_*_sigmas re-space the VP σ range of their betas, not the shifted
        # flow grid (UniPC: Karras over √((1−ᾱ)/ᾱ), then s = σ/(1 + σ), flow_shift unused); so the betas matter there.
        vp_spaced = timestep_spacing_rule == "dpm-solver" and any(
            self.config[f"use_{name}_sigmas"] for name in SPACINGS)
        if self._epsilon or vp_spaced:
            if beta_schedule not in BETA_SCHEDULES and trained_betas is None:
                raise InvalidInput(f"beta_schedule must be {', '.join(BETA_SCHEDULES)}, got {beta_schedule!r}")
            if timestep_spacing not in TIMESTEP_SPACINGS:
                raise InvalidInput(f"timestep_spacing must be {', '.join(TIMESTEP_SPACINGS)}, got "
                                   f"{timestep_spacing!r}")
            if timestep_spacing_rule not in SPACING_RULES:
                raise InvalidInput(f"timestep_spacing_rule must be {', '.join(SPACING_RULES)}, got "
                                   f"{timestep_spacing_rule!r}")
            if trained_betas is not None and len(trained_betas) != num_train_timesteps:
                raise InvalidInput(f"trained_betas has {len(trained_betas)} values; it must have one per training "
                                   f"timestep (num_train_timesteps={num_train_timesteps})")
            # diffusers' own VP schedule: ᾱ and the timestep spacing of DDIMScheduler (or DPM-Solver) with the same
            # keys, so that a timestep means the same noise level to both.
            self._vp = SPACING_RULES[timestep_spacing_rule](
                num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                beta_schedule=beta_schedule, trained_betas=trained_betas, timestep_spacing=timestep_spacing,
                steps_offset=steps_offset)
            # What every diffusers VP scheduler exposes (training utilities such as compute_snr read them).
            if self._epsilon:
                self.betas, self.alphas, self.alphas_cumprod = (self._vp.betas, self._vp.alphas,
                                                                self._vp.alphas_cumprod)
            # Flow time of every training timestep; increasing in t, so t ↔ s is a monotone interpolation.
            self._flow_time = flow_time(self._vp.alphas_cumprod.double().numpy())
        spacings = [name for name in SPACINGS if self.config[f"use_{name}_sigmas"]]
        if len(spacings) > 1:
            raise InvalidInput(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be True, "
                               f"got {', '.join(f'use_{name}_sigmas' for name in spacings)}")
        self._spacing = spacings[0] if spacings else None
        self._shift = shift
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._plan = None
        self._run = None
        self._offset = 0
        self._repeat_at = None
        self._grid_warned = False
        # Every schedule key explicit (so it survives a trip through another scheduler's config), the shift also under
        # the name UniPC / DPM-Solver read in flow mode, and the defaults list sorted (diffusers builds it from a set)
        # and absent when empty (as diffusers leaves it after from_pretrained): configs are compared as dicts.
        # register_to_config can add keys but not remove one.
        config = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        defaults = sorted(k for k in self.config.get("_use_default_values", [])
                          if k not in SCHEDULE_KEYS or k == "timestep_spacing")
        self._internal_dict = FrozenDict({**config, **({"_use_default_values": defaults} if defaults else {}),
                                          "flow_shift": shift, "fewstep_class": type(self).__name__})

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """As diffusers' `from_config` (a config dict, a FrozenDict, or a saved config folder / JSON file path), keeping
        the source scheduler's schedule: flow or ε, shift, dynamic shifting, terminal shift (module doc)."""
        if "pretrained_model_name_or_path" in kwargs:
            config = kwargs.pop("pretrained_model_name_or_path")
        if config is None:
            raise InvalidInput("from_config needs a config (a scheduler's .config, a dict, or a saved config folder)")
        if not isinstance(config, dict):  # a path, as diffusers' own schedulers still accept
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        # `set_alpha_to_one` needs no key: sampling always ends at σ = 0.
        merged = {**config, **kwargs}
        for key, what in UNSUPPORTED.items():
            if not merged.get(key):
                continue
            if key == "clip_sample" and key not in kwargs:
                if not _is_ours(config):  # said once, when the source scheduler's config came in
                    warnings.warn(f"the source scheduler's clip_sample=True ({what}) is not applied: fewstep's "
                                  "solvers integrate the ODE without clipping (latent-diffusion configs switch it off)",
                                  stacklevel=2)
                continue
            raise InvalidInput(f"{key}=True ({what}) is not supported; pass {key}=False")
        if any(merged.get(f"use_{name}_sigmas") for name in SPACINGS) and any(
                merged.get(key) is not None for key in SIGMA_BOUNDS):
            raise InvalidInput("sigma_min / sigma_max (EulerDiscreteScheduler's bounds of its Karras, exponential or "
                               "beta sigmas) are not supported: the sigmas span the training schedule; pass "
                               "sigma_min=None, sigma_max=None")
        if str(merged.get("algorithm_type", "")).startswith("sde-"):
            raise InvalidInput(f"algorithm_type={merged['algorithm_type']!r} (stochastic sampling) is not supported; "
                               "fewstep solvers are ODE solvers")
        # A keyword that overrides a refused key of the source is written into the config it keeps (it is not one of
        # our __init__ keys, so diffusers would leave the source's value hidden there, refused again after a save).
        config = {**config, **{key: kwargs.pop(key) for key in (*UNSUPPORTED, *SIGMA_BOUNDS) if key in kwargs}}
        if "flow_shift" in kwargs and "shift" not in kwargs:  # UniPC's / DPM-Solver's name for the shift
            kwargs["shift"] = kwargs.pop("flow_shift")
        if "solver" in kwargs and kwargs["solver"] != config.get("solver") and "solver_options" not in kwargs:
            config = {k: v for k, v in config.items() if k != "solver_options"}  # they were the old solver's
        # A spacing the source only had as its default (DDIMScheduler(), SD 1.x's PNDM file without the key) stays a
        # default for the next class, as between two diffusers classes: DPM-Solver from DDIM() spaces as DPM-Solver.
        spacing_default = "timestep_spacing" not in kwargs and (
            "timestep_spacing" not in config or "timestep_spacing" in config.get("_use_default_values", ()))
        made = super().from_config(_schedule_of(config, cls), return_unused_kwargs=return_unused_kwargs, **kwargs)
        scheduler = made[0] if return_unused_kwargs else made
        # not the source's hidden ones
        scheduler.register_to_config(flow_shift=scheduler.config.shift, fewstep_class=cls.__name__)
        if spacing_default:
            defaults = {*scheduler.config.get("_use_default_values", ()), "timestep_spacing"}
            scheduler.register_to_config(_use_default_values=sorted(defaults))
        return made

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        shift = _number(shift, "set_shift: shift")
        if problem := shift_problem(shift):
            raise InvalidInput(f"set_shift: {problem}")
        self._shift = float(shift)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None,
                      timesteps: list[float] | np.ndarray | None = None) -> None:
        """`num_inference_steps` = model calls. `sigmas` (flow): N values as Flux passes them, shifted like
        FlowMatchEuler, N calls. `timesteps` alone: the grid nodes, used as given (no shift; flow: σ·1000, epsilon:
        VP indices); the calls are the solver's on them. Both (CogView4, GLM-Image): as FlowMatchEuler, the shifted
        `sigmas` are integrated and the model is given `timesteps` (a call between nodes, Heun's stage, gets the
        timestep interpolated between its nodes')."""
        cfg = self.config
        if num_inference_steps is not None:
            try:  # an int, a NumPy integer or a 0-d integer tensor, not a float, a string or a bool
                if isinstance(num_inference_steps, bool):
                    raise TypeError
                num_inference_steps = operator.index(num_inference_steps)
            except TypeError:
                raise InvalidInput(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}"
                                   ) from None
        model_timesteps = None
        if sigmas is not None and timesteps is not None:
            model_timesteps = np.asarray(timesteps, dtype=np.float64).ravel()
            if len(model_timesteps) != len(np.ravel(sigmas)):
                raise InvalidInput(f"`sigmas` and `timesteps` must have the same length, got {len(np.ravel(sigmas))} "
                                   f"and {len(model_timesteps)}")
            # what the model is given; a trailing 0 goes with the sigmas' trailing 0 (σ = 0, where every run ends)
            self._check_timesteps(model_timesteps[:-1] if len(model_timesteps) > 1 and model_timesteps[-1] == 0
                                  else model_timesteps)
            timesteps = None
        if self._epsilon and (sigmas is not None or mu is not None):
            raise InvalidInput("prediction_type='epsilon' uses VP timesteps: pass `timesteps`, not sigmas or mu")
        if not self._epsilon and cfg.use_dynamic_shifting and mu is None:
            raise InvalidInput("use_dynamic_shifting=True needs `mu` in set_timesteps (Flux and Qwen compute it from "
                               "the image size)")
        # mu is read only with dynamic shifting (ignored otherwise, as FlowMatchEuler does); a NaN there was
        # "σ grid contains non-finite values".
        if cfg.use_dynamic_shifting and mu is not None:
            mu = _number(mu, "set_timesteps: mu")
            # a linear time shift uses μ itself as the shift (μ/(μ + 1/σ − 1)): it must be a shift, > 0
            problem = shift_problem(mu) if cfg.time_shift_type == "linear" else shift_problem(1.0, mu)
            if problem:
                raise InvalidInput(f"set_timesteps: {problem.replace('shift must', 'mu (a linear time shift) must')}")
        calls = num_inference_steps  # what the caller asked for; None when it gave the grid itself as timesteps
        if timesteps is not None:
            nodes = np.asarray(timesteps, dtype=np.float64).ravel()
            if not self._epsilon and len(nodes) > 1 and nodes[-1] == 0:
                nodes = nodes[:-1]  # flow timestep 0 is σ = 0, where every run ends (as for `sigmas`)
            if num_inference_steps not in (None, len(nodes)):
                raise InvalidInput(f"{len(nodes)} timesteps given but num_inference_steps={num_inference_steps}")
            calls = None
            self._check_timesteps(nodes)
            grid = np.r_[self._flow_time_of(nodes) if self._epsilon else nodes / cfg.num_train_timesteps, 0.0]
        elif sigmas is not None:
            body = np.asarray(sigmas, dtype=np.float64).ravel()
            if body.size == 0 or body[0] == 0:
                raise InvalidInput(f"sigmas needs at least one value above 0, got {body.tolist()}")
            body = body[:-1] if body[-1] == 0 else body
            if num_inference_steps not in (None, len(body)):
                raise InvalidInput(f"{len(body)} sigmas given but num_inference_steps={num_inference_steps}")
            calls = len(body)
            n = self._intervals(calls)
            grid = flow_sigmas(sigmas=body.tolist(), **self._shifting(mu))
            nodes = grid[:-1]  # the shifted σ of each given sigma (and of each given timestep)
            if model_timesteps is not None:
                model_timesteps = model_timesteps[:len(body)]
            if n != calls:  # Heun: 2 calls per interval, so N calls need N/2 nodes of the same schedule
                grid = flow_sigmas(sigmas=resample_grid(body, n - 1).tolist(), **self._shifting(mu))
        elif num_inference_steps is None:
            raise InvalidInput("set_timesteps needs num_inference_steps, sigmas or timesteps")
        elif self._spacing and (self._epsilon or cfg.timestep_spacing_rule == "dpm-solver"):
            # DPM-Solver's and UniPC's use_*_sigmas: VP σ = s/(1−s) from the highest training timestep's down to the
            # lowest's, re-spaced, then σ = 0 (in flow mode too: UniPC's Karras grid; DPM-Solver's own flow-mode
            # code passes the VP σ, > 1, unconverted, which no model can use).
            top, low = self._flow_time[-1], self._flow_time[0]
            vp = respace(top / (1 - top), low / (1 - low), self._intervals(calls), self._spacing)
            grid = np.r_[vp / (1 + vp), 0.0]
        elif self._epsilon:
            grid = np.r_[self._flow_time_of(self._vp_timesteps(self._intervals(calls))), 0.0]
        elif cfg.timestep_spacing_rule == "dpm-solver":
            # UniPC / DPM-Solver in flow mode (Wan, Sana): linspace(1, 1/T, n + 1) without its last value, shifted
            # (no call at FlowMatchEuler's σ_min); the run ends at 0.
            body = np.linspace(1.0, 1.0 / cfg.num_train_timesteps, self._intervals(calls) + 1)[:-1]
            grid = flow_sigmas(sigmas=body.tolist(), **self._shifting(mu))
        else:
            grid = flow_sigmas(self._intervals(calls), **self._shifting(mu))
        plan = grid_plan(self._solver, grid)  # a solver that cannot run this grid (NeuralSolver's table) fails here
        if calls is not None and plan.calls != calls:
            raise InvalidInput(f"{self._solver_name} makes {plan.calls} model calls on this grid, not {calls}")
        if self._epsilon and plan.sigmas.max() > self._flow_time[-1] + 1e-12:
            top = cfg.num_train_timesteps - 1
            raise InvalidInput(
                f"{self._solver_name} calls the model at a noise level (flow time s = {plan.sigmas.max():.6g}) above "
                f"the highest training timestep of this config ({top}: s = {self._flow_time[-1]:.6g}, from "
                f"num_train_timesteps={cfg.num_train_timesteps} and beta_end={cfg.beta_end}); a searched solver's grid "
                "is fixed, so num_train_timesteps and the betas must be the model's own (1000 and 0.02 for DiT, "
                "PixArt, SD)")
        if not self._epsilon and timesteps is None:
            self._warn_grid(mu)
        self._grid = np.asarray(grid, dtype=np.float64)
        self._plan = plan  # in flow variables; `_start_at` rewrites the plan it runs for ε models
        if model_timesteps is not None:  # (σ = 0, Heun's last stage, is timestep 0)
            t = np.interp(plan.sigmas, np.r_[0.0, nodes[::-1]], np.r_[0.0, model_timesteps[::-1]])
        else:
            t = self._timestep_of(plan.sigmas) if self._epsilon else plan.sigmas * cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(t).to(torch.float32).to(device)
        # σ of every call plus the end (flow time s for epsilon), kept on the CPU: the solver reads them as numbers.
        self.sigmas = torch.from_numpy(np.r_[plan.sigmas, plan.sigma_end]).to(torch.float32)
        self.num_inference_steps = plan.calls
        self._step_index = None
        self._begin_index = None
        self._repeat_at = None
        self._start_at(0)

    def _warn_grid(self, mu: float | None) -> None:
        """Warn once per scheduler when a searched solver file was searched on another grid than this config's shift
        / mu: the file's own grid runs, so the config's shift has no effect (`fewstep.search.grid_mismatch`)."""
        if self._grid_warned or not isinstance(self._solver, NeuralSolver):
            return
        cfg = self.config
        if cfg.use_dynamic_shifting:  # the grid's shift is e^μ, or μ itself with a linear time shift
            shift, mu = (mu, None) if cfg.time_shift_type == "linear" else (1.0, mu)
        else:
            shift, mu = self._shift, None
        text = grid_mismatch(self._solver.file, shift, mu)
        if text:
            self._grid_warned = True
            warnings.warn(text, GridMismatchWarning, stacklevel=3)

    def _check_timesteps(self, nodes: np.ndarray) -> None:
        """ε: VP indices in [0, num_train_timesteps − 1]; flow: σ·num_train_timesteps with σ a noise level in (0, 1]
        (1500 would start at σ = 1.5)."""
        cfg = self.config
        top = cfg.num_train_timesteps - 1 if self._epsilon else cfg.num_train_timesteps
        # flow: a few ulps above the top is diffusers' own float32 grid at shift < 1 (σ = 1.0000006), fed back in
        slack = 0 if self._epsilon else 1e-4 * top
        low_ok = len(nodes) and (nodes.min() >= 0 if self._epsilon else nodes.min() > 0)
        if len(nodes) and not (low_ok and nodes.max() <= top + slack):  # (NaN fails both)
            raise InvalidInput(f"timesteps must lie in {'[0' if self._epsilon else '(0'}, {top}] "
                               f"(num_train_timesteps={cfg.num_train_timesteps}), got {nodes.min():.9g} to "
                               f"{nodes.max():.9g}")

    def _intervals(self, calls: int) -> int:
        return intervals_for(self._solver, int(calls), self._solver_name)

    def _vp_timesteps(self, n: int) -> np.ndarray:
        """n decreasing VP timesteps: DDIMScheduler's (or DPM-Solver's) own, for the config's timestep_spacing and
        steps_offset."""
        if n > self.config.num_train_timesteps:
            raise InvalidInput(f"{n} grid nodes need num_train_timesteps >= {n}, got "
                               f"num_train_timesteps={self.config.num_train_timesteps}")
        self._vp.set_timesteps(n)
        t = self._vp.timesteps.double().numpy()
        if len(np.unique(t)) < len(t):  # DPM-Solver's rounded linspace at n = num_train_timesteps repeats one
            raise InvalidInput(f"{n} grid nodes repeat a training timestep with timestep_spacing="
                               f"{self.config.timestep_spacing!r} (as {type(self._vp).__name__}'s own grid does); use "
                               f"fewer num_inference_steps")
        return t

    def _shifting(self, mu: float | None) -> dict:
        cfg = self.config
        return dict(shift=self._shift, mu=mu if cfg.use_dynamic_shifting else None, time_shift_type=cfg.time_shift_type,
                    dynamic_shifting=cfg.use_dynamic_shifting, shift_terminal=cfg.shift_terminal,
                    num_train_timesteps=cfg.num_train_timesteps, spacing=self._spacing, train_shift=cfg.shift)

    def _flow_time_of(self, t: np.ndarray) -> np.ndarray:
        """VP timestep (float OK) → flow time s, piecewise linear between training timesteps."""
        return np.interp(t, np.arange(self.config.num_train_timesteps), self._flow_time)

    def _timestep_of(self, s: np.ndarray) -> np.ndarray:
        return np.interp(s, self._flow_time, np.arange(self.config.num_train_timesteps))

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where the pipeline enters (img2img: `t_start * order`). Re-plans here, so that a solver that cannot start
        mid-schedule fails before the denoising loop."""
        if self._step_index is not None:  # the run's history is from where it started: a new entry is a new run
            raise InvalidInput(f"set_begin_index({begin_index}) after step() has run (step index {self._step_index}): "
                               "call set_timesteps first to start a new run")
        fresh = self._offset == begin_index  # set_timesteps already started there
        if self._plan is not None and begin_index == self._plan.calls:
            # Nothing left to run (img2img at strength 0): as FlowMatchEuler, accepted here; the pipeline then says
            # it has no steps, and a step() would say there are none.
            self._run, self._offset = None, begin_index
        elif self._plan is not None and not fresh:
            self._start_at(begin_index)
        self._begin_index = begin_index
        self._repeat_at = None

    def _start_at(self, k: int) -> None:
        """Run the plan from call k on (`fewstep.entry.enter`), rewritten on (x, ε) for ε models."""
        plan = enter(self._solver, self._grid, self._plan, k, self._solver_name)
        self._run = PlanRun(epsilon_plan(plan) if self._epsilon else plan)
        self._offset = k

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if schedule_timesteps is None:
            raise InvalidInput("call set_timesteps before stepping")
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise InvalidInput(f"timestep {float(timestep)} is not one of this scheduler's timesteps; use the values "
                               "in `scheduler.timesteps` (or set_begin_index)")
        return int(indices[1 if len(indices) > 1 else 0].item())  # FlowMatchEuler's rule: the second occurrence

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            k = self.index_for_timestep(timestep)
            if k > 0:  # mid-schedule entry without set_begin_index (FluxControl, ControlNet, SD3 t2i, Wan v2v)
                self._start_at(k)
                # A repeated value (Heun: the stage at σ_k, then node k) was taken as its second occurrence; a pipeline
                # that sliced at the first one makes one more call at this timestep (see `step`).
                if float(self.timesteps[k - 1]) == float(self.timesteps[k]):
                    self._repeat_at = k
            self._step_index = k
        else:
            self._step_index = self._begin_index

    def _noised(self, clean: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The state at flow time s (one value per batch element, or one for all): (1−s)·x0 + s·ε, which in VP
        coordinates is α·x0 + σ·ε = that divided by k(s) (`fewstep.entry.vp_scale`)."""
        work = torch.float64 if clean.dtype == torch.float64 else torch.float32
        x = s.to(clean.device, work).reshape(-1, *[1] * (clean.ndim - 1)) * noise + (
            1.0 - s.to(clean.device, work).reshape(-1, *[1] * (clean.ndim - 1))) * clean
        if self._epsilon:
            k = torch.from_numpy(vp_scale(s.double().cpu().numpy())).to(clean.device, work)
            x = x / k.reshape(-1, *[1] * (clean.ndim - 1))
        return x.to(clean.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process at the scheduler's current σ (img2img before the first step, inpaint after each)."""
        if self.timesteps is None:
            raise InvalidInput("call set_timesteps before scale_noise (its noise level is a σ of that schedule)")
        if self._step_index is not None:
            indices = [self._step_index]
        elif self._begin_index is not None:
            indices = [self._begin_index]
        else:
            timestep = torch.atleast_1d(torch.as_tensor(timestep)).to(self.timesteps.device)
            indices = [self.index_for_timestep(t) for t in timestep]
        return self._noised(sample, noise, self.sigmas[indices])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process at arbitrary timesteps (flow: σ = t/num_train_timesteps; epsilon: VP indices)."""
        t = torch.atleast_1d(torch.as_tensor(timesteps)).double().cpu().numpy()
        s = self._flow_time_of(t) if self._epsilon else t / self.config.num_train_timesteps
        return self._noised(original_samples, noise, torch.from_numpy(s))

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True,
             per_token_timesteps: torch.Tensor | None = None) -> FewstepSchedulerOutput | tuple[torch.Tensor]:
        """One model call. Integrates from `sample` (a callback may have replaced it) in float32 (float64 for float64
        tensors) and returns `model_output`'s dtype. bf16/fp16 inputs are kept as they are (upcasting them is exact)
        and read into float32 by the combination itself (`fewstep.solvers.plan.combine`), not upcast first. What later
        steps read is copied (`PlanRun.advance`): the pipeline may reuse the output buffer or overwrite `sample`.

        Repeated timesteps without a begin index (Heun's stage at σ_k and node k share a value; WanVideoToVideo and
        older img2img pipelines slice `timesteps[t_start:]` and call no set_begin_index): the first step takes the
        second occurrence, as FlowMatchEuler/FlowMatchHeun do. If the pipeline had sliced at the first one, its second
        call comes at the same timestep: that call re-synchronises (returns `sample` as it is, as a Heun entry between
        stages does with a begin index), and the run ends exactly where it does with set_begin_index."""
        if per_token_timesteps is not None:
            raise InvalidInput("per_token_timesteps (a noise level per token, LTX-Video conditioning) is not supported "
                               "by fewstep's multistep solvers; use FlowMatchEulerDiscreteScheduler for this pipeline")
        if self._run is None and self._plan is not None:
            raise InvalidInput("no model calls are left: set_begin_index was given the number of calls")
        if self._step_index is None:
            if self._run is None:
                raise InvalidInput("call set_timesteps before step")
            self._init_step_index(timestep)
        elif self._repeat_at is not None:
            k, self._repeat_at = self._repeat_at, None
            if self._step_index == k + 1 and float(timestep) == float(self.timesteps[k]):
                out = sample.to(model_output.dtype)
                out = out.clone() if out is sample else out
                return (out,) if not return_dict else FewstepSchedulerOutput(prev_sample=out)
        if (self.config.get("variance_type") in ("learned", "learned_range") and model_output.ndim > 1
                and model_output.shape[1] == 2 * sample.shape[1]):
            # A learned-variance model (Kandinsky, DeepFloyd IF, Latte) with such a source config: its pipeline
            # passes ε and the variance channels, as DDPMScheduler expects; an ODE solver uses ε only.
            model_output = model_output[:, :sample.shape[1]]
        if model_output.shape != sample.shape:  # a broadcast would silently give every element the same output
            raise InvalidInput(f"model_output has shape {tuple(model_output.shape)}, sample {tuple(sample.shape)}; "
                               "they must be equal")
        i = self._step_index - self._offset
        if i >= self._run.plan.calls:
            raise InvalidInput(f"step called {self._step_index + 1} times but there are {len(self.timesteps)} "
                               "timesteps; call set_timesteps again for a new run")
        prev = self._run.advance(i, sample, model_output, model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FewstepSchedulerOutput(prev_sample=prev)


def _named(init):
    """register_to_config for a named scheduler whose __init__ takes its solver's options and passes every
    FewstepScheduler schedule key through **schedule. diffusers reads config keys from the signature (and refuses
    **kwargs there), so the signature shown is the explicit one: own options + FewstepScheduler's keys."""
    base = inspect.signature(FewstepScheduler.__init__.__wrapped__).parameters
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not p.VAR_KEYWORD]
    keys = [p for name, p in base.items() if name not in ("self", "solver", "solver_options")]
    init.__signature__ = inspect.Signature(own + keys)
    return register_to_config(init)


def _options(**options) -> dict:
    return {k: v for k, v in options.items() if v is not None}


class StorkScheduler(FewstepScheduler):
    """STORK as a diffusers scheduler; `order` 2|4 and the STORK options, as in the STORK docs' scheduler_kwargs."""

    @_named
    def __init__(self, order: int = 4, stages: int | None = None, derivative_order: int | None = None,
                 compat: str | None = None, extrapolate: str | None = None, jump: str | None = None, **schedule):
        if order not in (2, 4):
            raise InvalidInput(f"STORK order must be 2 or 4, got {order!r}")
        options = _options(stages=stages, derivative_order=derivative_order, compat=compat, extrapolate=extrapolate,
                           jump=jump)
        FewstepScheduler.__init__.__wrapped__(self, solver=f"stork-{order}", solver_options=options, **schedule)


class AdamsScheduler(FewstepScheduler):
    """Variable-step Adams–Bashforth (`order` 2|3|4) as a diffusers scheduler."""

    @_named
    def __init__(self, order: int = 2, startup: str | None = None, **schedule):
        if order not in (2, 3, 4):
            raise InvalidInput(f"Adams order must be 2, 3 or 4, got {order!r}")
        FewstepScheduler.__init__.__wrapped__(self, solver=f"adams{order}", solver_options=_options(startup=startup),
                                              **schedule)


class NeuralSolverScheduler(FewstepScheduler):
    """A searched NeuralSolver (`solver_file`: a shipped name — sit, flowdcn, dit, digits-shift1, digits-shift3 — or a
    path to a JSON file) as a diffusers scheduler; `dit` is the ε-prediction one (use it with
    prediction_type="epsilon")."""

    @_named
    def __init__(self, solver_file: str = "sit", **schedule):
        FewstepScheduler.__init__.__wrapped__(self, solver="neuralsolver", solver_options={"solver_file": solver_file},
                                              **schedule)
