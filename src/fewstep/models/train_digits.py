"""Retrain the digits weights: `python -m fewstep.models.train_digits --out src/fewstep/models/weights`.

Flow model: rectified flow in the library's convention (target ε − x0 at x_σ = (1−σ)x0 + σε, σ ~ U(0, 1)) on all
1797 digits, Adam with a cosine learning rate, 10 % label dropout for classifier-free guidance. Classifier: an MLP on
the train part of `split_indices`. About 5 minutes on 2 CPU cores; seeded. What reproduces is the quality, not the bytes
(float rounding depends on the CPU and thread count): docs/embedded-model.md, "Reproducibility".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from fewstep.files import atomic_write
from fewstep.models.digits import (
    CLASSIFIER_FILE,
    FLOW_FILE,
    METADATA_KEY,
    NULL_CLASS,
    DigitsClassifier,
    DigitsFlow,
    load_data,
    split_indices,
)

DATA = "scikit-learn load_digits, x/8 - 1 in [-1, 1]"
FLOW = {"steps": 30000, "batch": 256, "lr": 1e-3, "label_dropout": 0.1, "seed": 0}
CLASSIFIER = {"epochs": 100, "batch": 128, "lr": 1e-3, "weight_decay": 1e-4, "seed": 0}


def train_flow(steps: int, batch: int, lr: float, label_dropout: float, seed: int) -> tuple[DigitsFlow, float]:
    """The flow model and its final loss (mean over the last 1000 steps, less noisy than one batch)."""
    torch.manual_seed(seed)
    x_all, y_all = load_data()
    net = DigitsFlow()
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)  # fused: a third of the step time on CPU
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_all), (batch,))
        x0, labels = x_all[idx], y_all[idx]
        labels = torch.where(torch.rand(batch) < label_dropout, NULL_CLASS, labels)
        eps = torch.randn_like(x0)
        sigma = torch.rand(batch)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = (net(x, sigma, labels) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 2000 == 0 or step == steps:
            print(f"flow step {step:6d}/{steps}  loss {sum(losses[-1000:]) / len(losses[-1000:]):.4f}  "
                  f"{time.time() - start:5.0f} s", flush=True)
    return net, sum(losses[-1000:]) / len(losses[-1000:])


def train_classifier(epochs: int, batch: int, lr: float, weight_decay: float,
                     seed: int) -> tuple[DigitsClassifier, float]:
    """The classifier and its accuracy on the held-out part of `split_indices`."""
    torch.manual_seed(seed)
    x_all, y_all = load_data()
    train, test = split_indices(len(x_all))
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train))].split(batch):
            loss = nn.functional.cross_entropy(net(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_all[test]).argmax(1) == y_all[test]).float().mean().item()
    print(f"classifier: test accuracy {accuracy:.4f} on {len(test)} held-out digits", flush=True)
    return net, accuracy


def save(net: nn.Module, path: Path, training: dict) -> None:
    """fp16 safetensors (half the size; the models run in float32), architecture + training settings as metadata."""
    from safetensors.torch import save as to_bytes

    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    meta = json.dumps({"config": net.config, "training": training}, sort_keys=True)
    atomic_write(path, to_bytes(state, metadata={METADATA_KEY: meta}))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("src/fewstep/models/weights"))
    parser.add_argument("--steps", type=int, default=FLOW["steps"], help="Adam steps of the flow model")
    args = parser.parse_args()
    torch.set_num_threads(2)  # part of the recipe: the thread count changes float rounding, hence the bytes
    classifier, accuracy = train_classifier(**CLASSIFIER)
    save(classifier, args.out / CLASSIFIER_FILE, {**CLASSIFIER, "data": DATA, "split": "split_indices(1797), 20 % "
                                                  "test, seed 0", "test_accuracy": round(accuracy, 4)})
    settings = {**FLOW, "steps": args.steps}
    start = time.time()
    flow, loss = train_flow(**settings)
    save(flow, args.out / FLOW_FILE, {**settings, "data": DATA, "objective": "rectified flow, target eps - x0, "
                                      "sigma ~ U(0, 1)", "lr_schedule": "cosine", "final_loss": round(loss, 4)})
    print(f"flow model: {args.steps} steps in {time.time() - start:.0f} s, final loss {loss:.4f}")


if __name__ == "__main__":
    main()
