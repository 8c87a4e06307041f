"""The error table of docs/mflux.md: mflux's `linear` against fewstep's schedulers inside mflux's own FLUX.1
`generate_image` loop (offline stand-ins of mflux_harness.py), RMS error against the exact ODE solution from the
loop's first state, for schnell and dev grids, 4 and 8 steps, text-to-image and img2img.

    .venv-mflux/bin/python tests/mflux/measure.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mflux_harness import Offline, generate, rms, write_image  # noqa: E402

SCHEDULERS = ("linear", "fewstep.mflux.Euler", "fewstep.mflux.Adams2", "fewstep.mflux.Stork2",
              "fewstep.mflux.Stork4", "fewstep.mflux.Recommended")
STRENGTH = 0.4  # mflux img2img: start at step int(n·0.4) (4 steps: σ of step 1; 8 steps: step 3)


def table(seeds: int) -> tuple[list[tuple], float]:
    """Mean RMS error per (model, mode, steps) and scheduler; and the largest RMS difference Euler − linear."""
    offline = Offline()
    rows, euler_vs_linear = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        image = write_image(Path(tmp) / "input.png")
        for model in ("schnell", "dev"):
            for mode in ("t2i", "img2img"):
                for steps in (4, 8):
                    errors = {s: [] for s in SCHEDULERS}
                    for seed in range(seeds):
                        reference, finals = None, {}
                        for scheduler in SCHEDULERS:
                            kwargs = dict(image_path=image, strength=STRENGTH) if mode == "img2img" else {}
                            generate(offline, model, scheduler, steps, seed=seed, **kwargs)
                            if reference is None:
                                reference = offline.reference()
                            finals[scheduler] = offline.final_latents()
                            errors[scheduler].append(rms(finals[scheduler], reference))
                        euler_vs_linear = max(euler_vs_linear, rms(finals["linear"], finals["fewstep.mflux.Euler"]))
                    rows.append((model, mode, steps, *(float(np.mean(errors[s])) for s in SCHEDULERS)))
    return rows, euler_vs_linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows, euler_vs_linear = table(args.seeds)
    names = [s.rsplit(".", 1)[-1] for s in SCHEDULERS]
    print(f"| model | mode | steps | {' | '.join(names)} |")
    print("|" + " --- |" * (3 + len(names)))
    for model, mode, steps, *errs in rows:
        print(f"| {model} | {mode} | {steps} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")
    print(f"\nlargest RMS difference fewstep Euler - mflux linear: {euler_vs_linear:.3g}")


if __name__ == "__main__":
    main()
