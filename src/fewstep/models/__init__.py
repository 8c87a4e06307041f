"""Models that ship with the package, by name: the module of each embedded model (`load_embedded`,
`load_classifier`, `parse_prompt`, `to_image`; its velocity network has `velocity_fn(labels, guidance)`).

- `digits`: a class-conditional rectified-flow MLP on scikit-learn's 8×8 digits (`fewstep.models.digits`).
- `fashion`: a class-conditional rectified-flow U-Net on 28×28 Fashion-MNIST (`fewstep.models.fashion`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

EMBEDDED = {"digits": "fewstep.models.digits", "fashion": "fewstep.models.fashion"}


def embedded(name: str) -> ModuleType:
    """The module of the embedded model `name`; an InvalidInput naming the available ones if there is none."""
    from fewstep.errors import InvalidInput

    if name not in EMBEDDED:
        raise InvalidInput(f"no embedded model {name!r}; available: {', '.join(EMBEDDED)}")
    return importlib.import_module(EMBEDDED[name])
