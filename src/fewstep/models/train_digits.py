"""Reproduce the shipped digits flow weights: `python -m fewstep.models.train_digits --out src/fewstep/models/weights`.

Rectified flow in the library's convention (target ε − x0 at x_σ = (1−σ)x0 + σε), Adam, 10 % label dropout for
classifier-free guidance, seeded; about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewstep.files import atomic_write
from fewstep.models.digits import NULL_CLASS, DigitsFlow


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 8.0 - 1.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def train(steps: int = 12000, batch: int = 256, seed: int = 0) -> tuple[DigitsFlow, float]:
    torch.manual_seed(seed)
    x0_all, labels_all = digits_data()
    net = DigitsFlow()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    ema = 0.0
    for step in range(steps):
        idx = torch.randint(len(x0_all), (batch,))
        x0, labels = x0_all[idx], labels_all[idx].clone()
        labels[torch.rand(batch) < 0.1] = NULL_CLASS
        eps = torch.randn_like(x0)
        sigma = torch.rand(batch, 1)
        loss = (net(((1 - sigma) * x0 + sigma * eps), sigma, labels) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if step == 0 else 0.99 * ema + 0.01 * loss.item()
        if step % 2000 == 0:
            print(f"step {step:6d}  loss {ema:.4f}", flush=True)
    return net, ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="src/fewstep/models/weights")
    parser.add_argument("--steps", type=int, default=12000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    net, loss = train(args.steps)
    from safetensors.torch import save

    state = {k: v.half().contiguous() for k, v in net.state_dict().items()}
    data = save(state, metadata={"config": json.dumps(net.config), "final_loss": f"{loss:.4f}",
                              "steps": str(args.steps), "data": "scikit-learn load_digits, scaled to [-1, 1]"})
    atomic_write(Path(args.out) / "digits_flow.safetensors", data)
    print(f"trained in {time.time() - start:.0f} s, final loss {loss:.4f}")


if __name__ == "__main__":
    main()
