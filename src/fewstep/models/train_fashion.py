"""Reproduce the shipped Fashion-MNIST weights: `python -m fewstep.models.train_fashion` (needs Debian's
`dataset-fashion-mnist`, or FEWSTEP_FASHION_MNIST pointing at the four idx .gz files).

Flow model: rectified flow in the library's convention (target ε − x0 at x_σ = (1−σ)x0 + σε, σ ~ U(0, 1)) on the 60k
training images, 10 % label dropout for classifier-free guidance, Adam (batch 64) with a linear warm-up and a cosine
learning rate over a 4000-step schedule that is stopped after step 2000 (`--stop-at`; the CPU time there was, with
seven jobs sharing two cores, what was available — `--stop-at 4000` runs the whole schedule), bfloat16 autocast for
the network's matrix products (twice as fast on a CPU with AVX-512 BF16; parameters, optimizer and loss stay float32),
and an exponential moving average (EMA, decay min(0.999, (1 + step)/(10 + step))) of the weights, which ships.
Classifier: a small convnet on the training images, accuracy measured on the 10k test images.

The recipe is ONE thread (`torch.set_num_threads(1)`): the thread count changes float rounding. A rerun on the same
machine writes identical tensors; another CPU (another oneDNN kernel) may give other bytes and slightly different
sample quality (docs/fashion.md states the tolerance).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from fewstep.files import atomic_write
from fewstep.models.fashion import (
    CLASSIFIER_FILE,
    FLOW_FILE,
    METADATA_KEY,
    NULL_CLASS,
    REFERENCE_FILE,
    FashionClassifier,
    FashionFlow,
    load_data,
    write_shipped_references,
)

DATA = "Debian dataset-fashion-mnist, 60000 training images, bytes * 2/255 - 1 in [-1, 1]"
FLOW = {"steps": 4000, "batch": 64, "lr": 1e-3, "warmup": 200, "ema": 0.999, "label_dropout": 0.1, "grad_clip": 1.0,
        "bf16": True, "seed": 0, "stop_at": 2000}
CLASSIFIER = {"epochs": 4, "batch": 128, "lr": 1e-3, "weight_decay": 1e-4, "seed": 0}


def train_flow(steps: int, batch: int, lr: float, warmup: int, ema: float, label_dropout: float, grad_clip: float,
               bf16: bool, seed: int, stop_at: int | None = None,
               checkpoints: Path | None = None) -> tuple[FashionFlow, float]:
    """The EMA flow model and its final training loss (mean over the last 500 steps). With `stop_at`, training ends
    after that step of the `steps`-step schedule (the learning rate not yet annealed to 0)."""
    torch.manual_seed(seed)
    x_all, y_all = load_data("train")
    net = FashionFlow()
    avg = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    start = time.time()
    for step in range(1, (stop_at or steps) + 1):
        idx = torch.randint(len(x_all), (batch,))
        x0, labels = x_all[idx], y_all[idx]
        labels = torch.where(torch.rand(batch) < label_dropout, NULL_CLASS, labels)
        eps = torch.randn_like(x0)
        sigma = torch.rand(batch)
        x = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = net(x, sigma, labels)
        loss = (v.float() - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))  # warm-up: the random initialisation does not linger
            for p_avg, p in zip(avg.parameters(), net.parameters(), strict=True):
                p_avg.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == (stop_at or steps):
            print(f"flow step {step:6d}/{steps}  loss {sum(losses[-500:]) / len(losses[-500:]):.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - start:6.0f} s", flush=True)
        if checkpoints is not None and step % 1000 == 0 and step < steps:
            save(avg, checkpoints / f"fashion_flow_step{step}.safetensors", {"step": step})
    return avg, sum(losses[-500:]) / len(losses[-500:])


def train_classifier(epochs: int, batch: int, lr: float, weight_decay: float,
                     seed: int) -> tuple[FashionClassifier, float]:
    """The classifier and its accuracy on the 10k test images."""
    torch.manual_seed(seed)
    x_train, y_train = load_data("train")
    x_test, y_test = load_data("test")
    net = FashionClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train)).split(batch):
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            accuracy = torch.cat([net(x).argmax(1) for x in x_test.split(1000)]).eq(y_test).float().mean().item()
        print(f"classifier epoch {epoch + 1}/{epochs}: test accuracy {accuracy:.4f}  {time.time() - start:5.0f} s",
              flush=True)
    return net, accuracy


EVAL = {"samples": 500, "seed": 1, "guidances": (1.0, 3.0), "solvers": ("euler", "heun", "adams2", "adams3", "adams4",
        "adams-denoise", "stork-2", "stork-4"), "nfe": (6, 8), "reference_steps": 100}


def evaluate(samples: int, seed: int, guidances: tuple[float, ...], solvers: tuple[str, ...], nfe: tuple[int, ...],
             reference_steps: int) -> list[dict]:
    """FD to the test set and class accuracy (by the shipped classifier) of the shipped flow's samples: `samples`
    noises (labels cycling 0..9) from `seed`, for each guidance: every solver at every NFE, then Euler with
    `reference_steps` steps. Also prints the classifier's test accuracy and the noise floors."""
    import fewstep
    from fewstep.models.fashion import DIM, frechet_distance, load_classifier, load_embedded, quality

    model, classifier = load_embedded(), load_classifier()
    (test, y_test), (train, _) = load_data("test"), load_data("train")
    with torch.no_grad():
        real = torch.cat([classifier.features(x) for x in test.split(1000)])
        accuracy = (classifier.head(real).argmax(1) == y_test).float().mean().item()
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples]
        floor_n = frechet_distance(classifier.features(train[perm]), real)
    print(f"classifier test accuracy {accuracy:.4f}; FD noise floor: test halves (5000/5000) "
          f"{frechet_distance(real[:5000], real[5000:]):.3f}, {samples} training images to the test set {floor_n:.3f}",
          flush=True)
    labels = torch.arange(samples) % 10
    noise = torch.randn(samples, DIM, generator=torch.Generator().manual_seed(seed))
    rows = []
    for g in guidances:
        velocity = model.velocity_fn(labels, g)
        runs = [*((s, n) for n in nfe for s in solvers), ("euler", reference_steps)]
        for solver, steps in runs:
            start = time.time()
            with torch.no_grad():
                x = fewstep.sample(velocity, noise, solver, steps)
            row = {"guidance": g, "solver": solver, "nfe": steps, **quality(x, labels, classifier, real),
                   "seconds": round(time.time() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


GRID = {"seeds": 8, "steps": 20, "solver": "adams2", "guidance": 3.0}


def sample_grid(path: Path, seeds: int, steps: int, solver: str, guidance: float) -> None:
    """docs/fashion-samples.png: one row per class, one column per seed 0..seeds-1, each sample from the noise
    `fewstep generate --model fashion --seed S` draws (torch.Generator().manual_seed(S), shape (1, 784))."""
    import io

    import fewstep
    from fewstep.files import atomic_write
    from fewstep.models.fashion import DIM, load_embedded, to_image

    model = load_embedded()
    noise = torch.cat([torch.randn(1, DIM, generator=torch.Generator().manual_seed(s)) for s in range(seeds)])
    rows = []
    with torch.no_grad():
        for label in range(10):
            rows.append(fewstep.sample(model.velocity_fn(label, guidance), noise, solver, steps))
    png = io.BytesIO()
    to_image(torch.cat(rows), scale=3, nrow=seeds).save(png, format="PNG")
    atomic_write(path, png.getvalue())
    print(f"wrote {path}", flush=True)


def save(net: nn.Module, path: Path, training: dict) -> None:
    """fp16 safetensors (half the size; the models run in float32), architecture + training settings as metadata."""
    from safetensors.torch import save as to_bytes

    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    meta = json.dumps({"config": net.config, "training": training}, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, to_bytes(state, metadata={METADATA_KEY: meta}))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("src/fewstep/models/weights"))
    parser.add_argument("--only", choices=("flow", "classifier"), default=None, help="train just one of the two")
    parser.add_argument("--steps", type=int, default=FLOW["steps"], help="Adam steps of the flow model")
    parser.add_argument("--stop-at", type=int, default=FLOW["stop_at"], help="end training after this step of the "
                        "--steps schedule (default: 2000, the shipped weights)")
    parser.add_argument("--evaluate", action="store_true", help="only measure the shipped weights (docs/fashion.md)")
    parser.add_argument("--eval-samples", type=int, default=EVAL["samples"], help="noises of --evaluate")
    parser.add_argument("--eval-guidance", type=float, nargs="+", default=EVAL["guidances"], help="of --evaluate")
    parser.add_argument("--grid", type=Path, default=None, help="only write the sample grid of the shipped weights")
    parser.add_argument("--checkpoints", type=Path, default=None, help="also save the EMA model every 1000 steps here")
    parser.add_argument("--bench-reference", action="store_true", help="only solve (or read from the bench cache) "
                        f"the `fashion` bench problem's reference solves and write them to --out/{REFERENCE_FILE}")
    args = parser.parse_args()
    torch.set_num_threads(1)  # part of the recipe: the thread count changes float rounding, hence the bytes
    if args.grid:
        sample_grid(args.grid, **GRID)
        return
    if args.bench_reference:  # ~25 min on one core when nothing is cached (docs/fashion.md)
        write_shipped_references(args.out / REFERENCE_FILE)
        return
    if args.evaluate:
        evaluate(**{**EVAL, "samples": args.eval_samples, "guidances": tuple(args.eval_guidance)})
        return
    if args.only in (None, "classifier"):
        classifier, accuracy = train_classifier(**CLASSIFIER)
        save(classifier, args.out / CLASSIFIER_FILE, {**CLASSIFIER, "data": DATA, "threads": 1,
                                                      "test_accuracy": round(accuracy, 4)})
    if args.only in (None, "flow"):
        settings = {**FLOW, "steps": args.steps, "stop_at": args.stop_at}
        start = time.time()
        flow, loss = train_flow(**settings, checkpoints=args.checkpoints)
        seconds = time.time() - start
        save(flow, args.out / FLOW_FILE, {**settings, "data": DATA, "threads": 1, "objective": "rectified flow, "
                                          "target eps - x0, sigma ~ U(0, 1)", "lr_schedule": "linear warm-up, cosine",
                                          "weights": "EMA", "final_loss": round(loss, 4)})
        print(f"flow model: {args.stop_at or args.steps} steps in {seconds:.0f} s, final loss {loss:.4f}")


if __name__ == "__main__":
    main()
