"""The embedded Fashion-MNIST model and its classifier: shipped bytes, recipe metadata, prompts, shapes, conventions,
and stored sample-quality numbers reproduced on a small sample count (docs/fashion.md has the full measurements)."""

import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep.models
from fewstep.errors import InputFileError, InvalidInput
from fewstep.models import fashion
from fewstep.models.fashion import (
    CLASSES,
    DIM,
    NULL_CLASS,
    frechet_distance,
    load_classifier,
    load_embedded,
    parse_prompt,
    to_image,
    training_settings,
)

torch.set_num_threads(1)
# A retrained or edited weight file changes these: update them together with docs/fashion.md and the numbers below.
WEIGHTS_SHA256 = {
    "fashion_flow.safetensors": "70b3bdfad0596807660efd490c9967e535642aacc80d4b892d9b3a5de7b5436f",
    "fashion_classifier.safetensors": "9e999604ad887a4932f8f037fdf87b427b0fd51e0b5f11bff3c629beacebe18c",
}
# Measured on the shipped weights (1 thread, this repository's CPU); another CPU rounds differently, hence tolerances.
MEASURED = {
    "mean_rmse": {1: 0.0571, 7: 0.0442},  # σ = 1 prediction vs the class mean of 2000 test images, RMSE per pixel
    "accuracy": {"8-3": 0.99, "20-1": 0.82},  # 100 samples (10 per class), Euler: 8 steps guidance 3; 20 steps g 1
    "fd_100": 87.752,  # 100 samples, 10 Euler steps, guidance 1, to the first 2000 test images
    "fd_floor_100": 71.461,  # the first 100 training images to the same 2000 test images
    "classifier_accuracy_2000": 0.9105,  # on the first 2000 test images (0.9096 on all 10000)
}
# The first 2000 test and 100 training images of Fashion-MNIST (tests/data/README.md): the measurements need data,
# sampling never does, and the suite must not depend on a system package.
SUBSET = np.load(Path(__file__).parent / "data" / "fashion_mnist_subset.npz")


def images(key: str) -> torch.Tensor:
    """uint8 images as the model's (N, 1, 28, 28) float32 in [−1, 1] (fewstep.models.fashion.load_data's scaling)."""
    return torch.from_numpy(SUBSET[key].astype(np.float32) * (2.0 / 255.0) - 1.0).reshape(-1, 1, 28, 28)


@pytest.fixture(scope="module")
def net():
    return load_embedded()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def test_images():
    """The first 2000 test images and labels (the full 10k set is for docs/fashion.md; 2000 keep the tests fast)."""
    return images("test_images"), torch.from_numpy(SUBSET["test_labels"].astype(np.int64))


def euler(net, labels: torch.Tensor, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Plain Euler from σ = 1 to 0 on flattened states, written here so the model is checked independently of
    fewstep's solvers."""
    model = net.velocity_fn(labels, guidance)
    x = torch.randn(len(labels), DIM, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            x = x - (sigmas[i] - sigmas[i + 1]) * model(x, float(sigmas[i]))
    return x


@pytest.mark.parametrize("name", sorted(WEIGHTS_SHA256))
def test_shipped_weights_are_the_trained_ones(name):
    data = resources.files("fewstep.models").joinpath("weights", name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == WEIGHTS_SHA256[name]
    assert len(data) < 10_000_000


def test_weight_files_record_architecture_and_recipe(net):
    meta = training_settings()
    assert meta["config"] == net.config == {"c0": 16, "c1": 64, "c2": 128, "cond_dim": 128, "heads": 4}
    training = meta["training"]
    assert (training["steps"], training["stop_at"], training["batch"], training["seed"]) == (4000, 2000, 64, 0)
    assert training["threads"] == 1
    assert training["bf16"] is True and training["weights"] == "EMA" and training["label_dropout"] == 0.1
    assert sum(p.numel() for p in net.parameters()) == 1_171_665
    assert training_settings(fashion.CLASSIFIER_FILE)["training"]["test_accuracy"] >= 0.9


def test_registry_names_both_embedded_models():
    assert fewstep.models.embedded("fashion") is fashion
    assert fewstep.models.embedded("digits").DIM == 64
    with pytest.raises(InvalidInput, match="available: digits, fashion"):
        fewstep.models.embedded("cifar")


@pytest.mark.parametrize("text,label", [
    ("a sneaker", 7), ("sneakers", 7), ("t-shirt", 0), ("a T-Shirt", 0), ("tee", 0), ("T shirt", 0), ("trousers", 1),
    ("pants", 1), ("a pair of jeans", 1), ("pullover", 2), ("a sweater", 2), ("sweatshirt", 2), ("dress", 3),
    ("Dresses", 3), ("coat", 4), ("a jacket", 4), ("sandal", 5), ("shirt", 6), ("a shirt", 6), ("bag", 8),
    ("handbag", 8), ("ankle boot", 9), ("Ankle Boots", 9), ("boot", 9), ("t-shirt/top", 0), ("a boot, ankle boot", 9)])
def test_prompts_map_to_classes(text, label):
    assert parse_prompt(text) == label


@pytest.mark.parametrize("text,why", [("a cat", "names no class"), ("", "names no class"), ("shirtless", "names no "
                                      "class"), ("a dress shirt", "names several classes: dress, shirt"),
                                      ("sneakers and a bag", "names several classes: sneaker, bag")])
def test_prompts_it_cannot_draw_raise_and_list_the_classes(text, why):
    with pytest.raises(InvalidInput, match="t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, "
                       "ankle boot") as err:
        parse_prompt(text)
    assert why in str(err.value)
    assert len(CLASSES) == 10


def test_velocity_shapes_dtypes_and_guidance(net):
    x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0))
    v = net.velocity_fn(3)(x, 0.5)
    assert v.shape == (5, DIM) and v.dtype == torch.float32
    # Flattened or image-shaped states, one label or one per sample, σ as a float or a 0-d tensor: the same velocity.
    image = net.velocity_fn(torch.full((5,), 3))(x.reshape(5, 1, 28, 28), torch.tensor(0.5))
    assert image.shape == (5, 1, 28, 28)
    torch.testing.assert_close(image.reshape(5, DIM), v, atol=1e-6, rtol=0)
    null = net.velocity_fn(NULL_CLASS)(x, 0.5)
    guided = net.velocity_fn(3, guidance=3.0)(x, 0.5)
    assert (guided - v).abs().max() > 1e-2
    torch.testing.assert_close(guided, null + 3.0 * (v - null), atol=1e-4, rtol=0)
    v64 = load_embedded(dtype=torch.float64).velocity_fn(3)(x.double(), 0.5)
    assert v64.dtype == torch.float64
    torch.testing.assert_close(v64, v.double(), atol=1e-3, rtol=0)


def test_velocity_follows_the_library_convention(net, test_images):
    # At σ = 1, x = ε and the exact v = ε − E[x0 | class], so x − v is the class mean (MEASURED: RMSE per pixel); a
    # model trained with σ reversed or with v = x0 − ε lands ~1 away.
    x, y = test_images
    for k in (1, 7):
        eps = torch.randn(200, DIM, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            x0 = (eps - net.velocity_fn(k)(eps, 1.0)).mean(0)
        rmse = (x0 - x[y == k].mean(0).reshape(DIM)).pow(2).mean().sqrt().item()
        assert rmse == pytest.approx(MEASURED["mean_rmse"][k], abs=0.01)
        assert rmse < 0.1


@pytest.mark.parametrize("steps,guidance", [(8, 3.0), (20, 1.0)])
def test_generated_images_are_the_requested_class(net, classifier, steps, guidance):
    labels = torch.arange(100) % 10
    with torch.no_grad():
        accuracy = (classifier(euler(net, labels, steps, guidance, seed=0)).argmax(1) == labels).float().mean().item()
    # An untrained model scores ~0.1; guidance 3 sharpens the classes (cfg. docs/fashion.md).
    assert accuracy == pytest.approx(MEASURED["accuracy"][f"{steps}-{guidance:g}"], abs=0.03)


def test_samples_are_near_the_test_set_in_fd(net, classifier, test_images):
    # 100 samples at 10 Euler steps, guidance 1, against 2000 test images; 100 real training images give the floor at
    # this sample count (FD is biased upwards at small counts: docs/fashion.md has the 10k-image floor).
    labels = torch.arange(100) % 10
    with torch.no_grad():
        real = classifier.features(test_images[0])
        fd = frechet_distance(classifier.features(euler(net, labels, 10, 1.0, seed=1)), real)
        floor = frechet_distance(classifier.features(images("train_images")), real)
    assert fd == pytest.approx(MEASURED["fd_100"], rel=0.05)
    assert floor == pytest.approx(MEASURED["fd_floor_100"], rel=0.01)
    assert fd < 3 * floor


def test_classifier_is_accurate_on_test_images(classifier, test_images):
    x, y = test_images
    with torch.no_grad():
        accuracy = (classifier(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(MEASURED["classifier_accuracy_2000"], abs=0.003)
    assert accuracy >= 0.9


def test_to_image_sizes_and_cloth_is_light():
    one = to_image(torch.ones(DIM))
    assert one.size == (224, 224) and one.mode == "L" and one.getpixel((0, 0)) == 255
    assert to_image(-torch.ones(1, 1, 28, 28) * 5).getpixel((10, 10)) == 0  # clamped to [−1, 1]: background black
    grid = to_image(torch.zeros(20, DIM), scale=2, nrow=10)
    assert grid.size == (10 * 56 + 9 * 2, 2 * 56 + 2)


def test_bench_reference_is_cached(monkeypatch, tmp_path, capsys):
    # A reference solve the package does not ship costs minutes, so it is computed once per weights, noises, guidance,
    # tolerance and model dtype and then read from the bench's cache folder (here a stand-in solver counts the
    # solves); with no folder (`fewstep bench --no-cache`) nothing is written.
    import fewstep.testbed

    calls = []

    def fake_solve(velocity, x, **kwargs):
        calls.append(kwargs)
        return fewstep.testbed.ReferenceSolution(x + velocity(x, 1.0), 0.0, 1)

    monkeypatch.setattr(fewstep.testbed, "reference_solve", fake_solve)
    noise = torch.randn(2, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([7, 9])
    cache = tmp_path / "cache"
    first = fashion.cached_reference(labels, noise, 3.0, 1e-7, seed=0, cache=cache)
    assert calls == [{"rtol": 1e-7, "atol": 1e-7, "check": False, "progress": None}]
    (path,) = cache.iterdir()
    assert path.name.startswith(f"fashion-ref-{WEIGHTS_SHA256['fashion_flow.safetensors'][:16]}-n2-seed0-")
    assert path.name.endswith("-g3-rtol1e-07-f32.pt")
    assert first.dtype == torch.float64 and first.shape == (2, DIM)
    torch.testing.assert_close(fashion.cached_reference(labels, noise, 3.0, 1e-7, seed=0, cache=cache), first)
    assert len(calls) == 1  # read back, not solved again
    torch.testing.assert_close(fashion.cached_reference(labels, noise, 3.0, 1e-7, seed=0, cache=None), first)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == [cache]  # no cache: solved again, nothing written
    fashion.cached_reference(labels, noise, 1.0, 1e-7, seed=0, cache=cache)  # another guidance: another file
    fashion.cached_reference(labels, noise + 1, 1.0, 1e-7, seed=0, cache=cache)  # other noises, same seed: another
    fashion.cached_reference(labels, noise, 1.0, 1e-7, seed=0, dtype=torch.float64, cache=cache)  # float64 model
    assert len(calls) == 5 and len(list(cache.iterdir())) == 4
    # a cache file that cannot be written (a folder in its place): the solve is used, with a note (it was silent)
    blocked = tmp_path / "blocked"
    fashion.cached_reference(labels, noise, 3.0, 1e-7, seed=0, cache=blocked)
    (stored,) = blocked.iterdir()
    stored.unlink()
    stored.mkdir()
    capsys.readouterr()
    torch.testing.assert_close(fashion.cached_reference(labels, noise, 3.0, 1e-7, seed=0, cache=blocked), first)
    assert f"note: this reference solve is not stored in the cache {blocked} (" in capsys.readouterr().err


def test_bench_problem_reads_the_shipped_reference(monkeypatch, tmp_path):
    # The bench's own noises (seed 0 and the --refine seed 1000, guidance 1 and 3) ship their reference solves, so a
    # fresh machine runs the fashion problem without the ~25 min solve; the notes report the shipped check's error.
    import fewstep.testbed

    def no_solve(*args, **kwargs):
        raise AssertionError("the shipped reference should have been used")

    monkeypatch.setattr(fewstep.testbed, "reference_solve", no_solve)
    for seed in fashion.SHIPPED_SEEDS:
        for guidance in (1.0, 3.0):
            reference, check = fashion.bench_references(fashion.BENCH_SAMPLES, seed, guidance, tmp_path)
            assert reference.shape == (fashion.BENCH_SAMPLES, DIM) and check.shape == (fashion.BENCH_CHECK, DIM)
            # the float32-model solve against the float64-model one at 100x tighter tolerance
            assert (check - reference[:fashion.BENCH_CHECK]).abs().max() < 1e-4
    assert not list(tmp_path.iterdir())


def test_shipped_reference_is_the_flow_ode_solution():
    # One shipped noise re-solved here, independently of the shipped batch: same ODE, looser tolerance (rtol 1e-6).
    from fewstep.testbed import reference_solve

    labels, noise = fashion.bench_noise(fashion.BENCH_SAMPLES, 0)
    shipped, _ = fashion.bench_references(fashion.BENCH_SAMPLES, 0, 3.0)
    velocity = fashion.load_embedded().velocity_fn(labels[5:6], 3.0)
    with torch.no_grad():
        x = reference_solve(lambda y, s: velocity(y.float(), s), noise[5:6], rtol=1e-6, atol=1e-6, check=False).x
    error = (x - shipped[5:6]).abs().max()
    assert error < 3e-4, error  # rtol 1e-6 solves are off by up to ~2e-4 (docs/fashion.md)


def test_the_bench_hands_its_cache_folder_to_the_fashion_problem(monkeypatch, tmp_path):
    # `fewstep bench --cache DIR` / `--no-cache` decide where a fashion reference solve is kept (it wrote to ~/.cache
    # whatever the flags said).
    from fewstep.bench.problems import load_problem

    seen = []

    def fake_problem(samples, seed, guidance, cache, progress):
        seen.append((samples, seed, guidance, cache, progress))
        raise FileNotFoundError(2, "stop here", "weights")

    monkeypatch.setattr(fashion, "bench_problem", fake_problem)
    for cache, progress in ((tmp_path, True), (None, False)):
        with pytest.raises(InputFileError):
            load_problem("fashion-cfg3", 4, 5, cache, progress)
    assert seen == [(4, 5, 3.0, tmp_path, "reference solve fashion-cfg3"), (4, 5, 3.0, None, None)]


def test_the_reference_solve_bar_counts_the_noises_actually_solved(monkeypatch):
    # The fashion problem caps its noises at BENCH_SAMPLES; the bar said the count asked for (512) before.
    seen = []

    def fake_references(n, seed, guidance, cache, progress):
        seen.append((n, progress))
        raise FileNotFoundError(2, "stop here", "weights")

    monkeypatch.setattr(fashion, "bench_references", fake_references)
    with pytest.raises(FileNotFoundError):
        fashion.bench_problem(512, 0, 1.0, None, "reference solve fashion")
    assert seen == [(fashion.BENCH_SAMPLES, f"reference solve fashion ({fashion.BENCH_SAMPLES} noises)")]
