"""fewstep: few-step sampling for diffusion and flow-matching models.

    import fewstep
    x = fewstep.sample(model, noise, solver="stork-4", steps=8)   # model(x, sigma) -> velocity

`import fewstep` needs NumPy only: the names below are imported on first use (the generation API brings torch in
then), so that `fewstep.solvers` and `fewstep.mflux` work where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module it lives in (a module itself when the name is the module's last part)
_LAZY = {
    "Config": "fewstep.generate",
    "Flux1": "fewstep.generate",
    "QwenImage": "fewstep.generate",
    "load": "fewstep.generate",
    "NonFiniteError": "fewstep.sampling",
    "make_plan": "fewstep.sampling",
    "sample": "fewstep.sampling",
    "VPSchedule": "fewstep.schedules",
    "flow_sigmas": "fewstep.schedules",
    "solvers": "fewstep.solvers",
}
__all__ = ["Config", "Flux1", "NonFiniteError", "QwenImage", "VPSchedule", "flow_sigmas", "load", "make_plan", "sample",
           "solvers"]

if TYPE_CHECKING:
    from fewstep import solvers
    from fewstep.generate import Config, Flux1, QwenImage, load
    from fewstep.sampling import NonFiniteError, make_plan, sample
    from fewstep.schedules import VPSchedule, flow_sigmas


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
    value = importlib.import_module(module)
    if not module.endswith("." + name):
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
