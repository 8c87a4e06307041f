"""fewstep: few-step sampling for diffusion and flow-matching models.

    import fewstep
    x = fewstep.sample(model, noise, solver="stork-4", steps=8)   # model(x, sigma) -> velocity
"""

from fewstep import solvers
from fewstep.generate import Config, Flux1, QwenImage, load
from fewstep.sampling import NonFiniteError, make_plan, sample
from fewstep.schedules import VPSchedule, flow_sigmas

__version__ = "0.1.0"
__all__ = ["Config", "Flux1", "NonFiniteError", "QwenImage", "VPSchedule", "flow_sigmas", "load", "make_plan", "sample",
           "solvers"]
