"""The core package imports with NumPy only (no torch), and fewstep.mflux needs no torch or diffusers: runs in any
environment (the main one has no mlx, so there only the torch-free core is checked)."""

from __future__ import annotations

import subprocess
import sys

BLOCK = "import sys\nfor m in ('torch', 'diffusers', 'transformers', 'scipy', 'sklearn'):\n    sys.modules[m] = None\n"


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_core_imports_without_torch():
    result = run("import numpy as np\n"
                 "import fewstep, fewstep.solvers, fewstep.sampling, fewstep.schedules\n"
                 "from fewstep.solvers.plan import PlanRun, combine\n"
                 "x = fewstep.sample(lambda x, s: -x, np.ones(3), solver='euler', sigmas=[1.0, 0.5])\n"
                 "print(x.tolist(), sorted(fewstep.solvers.names()))\n"
                 "heavy = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in\n"
                 "         ('torch', 'diffusers', 'transformers', 'scipy', 'sklearn', 'PIL', 'safetensors')]\n"
                 "assert not heavy, heavy\n")
    assert result.returncode == 0, result.stderr
    # Euler on dx/dσ = −x from σ = 1: x·(1 + ½)·(1 + ½) = 2.25 (steps of h = ½ downwards)
    assert result.stdout.startswith("[2.25, 2.25, 2.25]")
    assert "stork-4" in result.stdout


def test_lazy_exports_resolve():
    import fewstep

    for name in fewstep.__all__:
        assert getattr(fewstep, name) is not None
    assert set(dir(fewstep)) >= set(fewstep.__all__)
    try:
        fewstep.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("fewstep.no_such_name did not raise AttributeError")


def test_mflux_module_needs_no_torch():
    """Where mlx is installed, fewstep.mflux imports with torch and diffusers blocked; elsewhere the only thing it
    lacks is mlx (never torch: mflux would report any ImportError as 'module not found', hiding the cause)."""
    result = run("try:\n"
                 "    import fewstep.mflux\n"
                 "except ModuleNotFoundError as e:\n"
                 "    print('missing', e.name)\n"
                 "else:\n"
                 "    print('imported', 'torch' in sys.modules and sys.modules['torch'] is not None)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("imported False", "missing mlx", "missing mflux"), result.stdout


class Operators:
    """An array type that only has `*` by a Python float, `+` and `astype` (the way combine uses MLX arrays)."""

    def __init__(self, values, dtype="float32"):
        self.values, self.dtype = list(values), dtype

    def __mul__(self, c):
        assert type(c) is float, type(c)  # NumPy scalars would promote MLX arrays: combine passes Python floats
        return Operators([c * v for v in self.values], self.dtype)

    def __add__(self, other):
        return Operators([a + b for a, b in zip(self.values, other.values, strict=True)], self.dtype)

    def astype(self, dtype):
        return Operators(self.values, dtype)


def test_combine_on_an_operator_array_type():
    """The framework-agnostic branch of the plan's linear combination (MLX arrays take it): Σ c·t by operators."""
    import numpy as np

    from fewstep.solvers.plan import Plan, PlanRun, Row, combine

    out = combine([(1.0, Operators([1.0, 2.0])), (np.float64(-0.5), Operators([4.0, 8.0])), (2.0, Operators([1, 1]))])
    assert isinstance(out, Operators) and out.values == [1.0, 0.0] and out.dtype == "float32"
    assert combine([(3.0, Operators([1.0]))], "bfloat16").dtype == "bfloat16"
    # a two-call plan on it: x1 = x0 − ½·v0, x2 = x1 − ½·v1 (Euler on [1, ½, 0])
    plan = Plan(np.array([1.0, 0.5]), 0.0, (Row.step(0, 0.5, {0: 1.0}), Row.step(1, 0.5, {1: 1.0})))
    run = PlanRun(plan)
    x1 = run.advance(0, Operators([2.0]), Operators([2.0]))
    assert run.advance(1, x1, Operators([-4.0])).values == [3.0]
