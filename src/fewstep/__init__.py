"""fewstep: few-step sampling for diffusion and flow-matching models.

    import fewstep
    x = fewstep.sample(model, noise, solver="stork-4", steps=8)   # model(x, sigma) -> velocity
"""

from fewstep import solvers
from fewstep.sampling import NonFiniteError, make_plan, sample
from fewstep.schedules import VPSchedule, flow_sigmas

__version__ = "0.1.0"
__all__ = ["NonFiniteError", "VPSchedule", "flow_sigmas", "make_plan", "sample", "solvers"]
