"""The embedded digits model: shipped weights, prompt parsing, and sample quality with a real number."""

import hashlib
from importlib import resources

import pytest
import torch

import fewstep
from fewstep.models.digits import load_embedded, parse_prompt
from fewstep.models.train_digits import digits_data

torch.set_num_threads(1)
WEIGHTS_SHA256 = "01e95769b01027a4cd129565ad8e816812ab4e2086a7ceca24f9f0863f6078ea"


def test_shipped_weights_are_the_trained_ones():
    data = resources.files("fewstep.models").joinpath("weights/digits_flow.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == WEIGHTS_SHA256
    assert len(data) < 2_000_000


@pytest.mark.parametrize("text,digit", [("7", 7), ("seven", 7), ("a handwritten seven", 7), ("digit 0", 0),
                                        ("The number NINE", 9), ("a 3", 3)])
def test_prompts_map_to_classes(text, digit):
    assert parse_prompt(text) == digit


@pytest.mark.parametrize("text", ["a cat", "7 or 8", "", "12"])
def test_prompts_it_cannot_draw_raise_and_say_what_it_understands(text):
    with pytest.raises(ValueError, match="understands one digit 0-9"):
        parse_prompt(text)


def test_generated_digits_are_the_requested_class():
    # Nearest class mean of the real digits labels real data 90.5 % right; generated digits at 8 Euler calls measured
    # 96.3 % (they are cleaner than real ones), so ≥ 90 % per the mean over classes is a real bar.
    x, y = digits_data()
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    net = load_embedded()
    correct = 0.0
    for k in range(10):
        noise = torch.randn(100, 64, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            samples = fewstep.sample(net.velocity_fn(torch.tensor([k])), noise, "euler", 8)
        correct += (torch.cdist(samples, means).argmin(1) == k).float().mean().item() / 10
    assert correct >= 0.9


def test_guidance_changes_the_velocity_and_keeps_shapes():
    net = load_embedded()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    plain, guided = net.velocity_fn(torch.tensor([3]))(x, 0.5), net.velocity_fn(torch.tensor([3]), 3.0)(x, 0.5)
    assert plain.shape == guided.shape == (4, 64) and (plain - guided).abs().max() > 1e-3
