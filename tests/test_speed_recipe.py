"""The CIFAR speed recipes' parts (configs/cifar10_94.py, cifar10_90.py): the speednet zoo model,
alternating flips, reflected translations, learning-rate multipliers, training without a held-out
split, and the recipe end to end on a small folder."""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxvision import config as config_lib, models
from jaxvision.data import pipeline, sources, transforms
from jaxvision.errors import UserError
from jaxvision.models import speednet
from jaxvision.train import loop, optim, whiten
from tests.images import image_folder
from tests.test_engine import ROOT, configure, final_params


def test_speednet_convolutions_start_as_the_identity_on_their_inputs():
    kernel = np.asarray(speednet.identity_init()(jax.random.key(0), (3, 3, 4, 6)))
    np.testing.assert_array_equal(kernel[1, 1, :, :4], np.eye(4))
    assert not kernel[:, :, :, :4].sum(axis=(2, 3))[[0, 0, 2, 2], [0, 2, 0, 2]].any()  # corner taps
    assert np.abs(kernel[..., 4:]).max() > 0  # the remaining filters are random
    model = models.create("speednet", widths=(8, 8, 8))
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
    assert whiten.first_conv(variables["params"]) == ("stem", "kernel")  # the 2x2 stem is what whitening sets
    assert "scale" not in variables["params"]["groups_0"]["norm1"]
    logits = jax.jit(model.apply)(variables, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 10)


def _numbered(n: int, size: int = 8) -> sources.ArraySource:
    """Image i is 10 + 2i on its left half and 0 on its right: its brightest pixel names it, and
    the bright half's side says whether it was mirrored."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[:, :, : size // 2] = (10 + 2 * np.arange(n))[:, None, None, None]
    return sources.ArraySource(images, np.arange(n) % 2, ["a", "b"])


def test_alternating_flips_show_every_image_both_ways_in_consecutive_epochs_and_resume_exactly():
    n, batch, epochs = 40, 8, 4
    t = transforms.TrainTransform(8, "pad_crop_flip", interpolation="bilinear", flip="alternate", translate=1,
                                  pad_mode="reflect", seed=3)
    stream = iter(pipeline.train_batches(_numbered(n), t, batch_size=batch, seed=0))
    flips = {}
    for _ in range(epochs * n // batch):
        x = next(stream)["image"].astype(int)
        for image in x:
            flips.setdefault((image.max() - 10) // 2, []).append(image[:, -3:].mean() > image[:, :3].mean())
    assert sorted(flips) == list(range(n)) and all(len(v) == epochs for v in flips.values())
    for v in flips.values():
        assert v == [v[0], not v[0]] * (epochs // 2)
    assert 8 <= sum(v[0] for v in flips.values()) <= 32  # a coin toss per image in the first epoch
    assert any(transforms.first_flip(3, i) != transforms.first_flip(4, i) for i in range(n))  # seeded
    resumed = next(iter(pipeline.train_batches(_numbered(n), t, batch_size=batch, seed=0, start_step=7)))
    fresh = iter(pipeline.train_batches(_numbered(n), t, batch_size=batch, seed=0))
    for _ in range(7):
        next(fresh)
    np.testing.assert_array_equal(resumed["image"], next(fresh)["image"])


def test_reflected_translation_is_a_window_of_the_mirrored_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    seen = set()
    for _ in range(60):
        crop = transforms.pad_random_crop(image, rng, 8, "bilinear", pad=2, mode="reflect")
        match = [(y, x) for y in range(5) for x in range(5) if np.array_equal(crop, padded[y:y + 8, x:x + 8])]
        assert match
        seen.add(match[0])
    assert len(seen) > 15  # shifts of up to 2 px each way, 25 in all


def test_learning_rate_multipliers_scale_the_matching_updates():
    params = {"groups_0": {"norm1": {"bias": jnp.ones(4)}, "conv1": {"kernel": jnp.ones((3, 3, 4, 4))}}}
    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "constant",
                                     "warmup_steps": 0, "weight_decay": 0.0, "lr_mults": (("norm", 64.0),)})
    tx = optim.optimizer(cfg, 10, "speednet", params)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["groups_0"]["norm1"]["bias"], -6.4)
    np.testing.assert_allclose(updates["groups_0"]["conv1"]["kernel"], -0.1)
    c = config_lib.base()
    c.optim.wd_mults = (("norm",),)
    with pytest.raises(UserError, match="config.optim.wd_mults must be"):
        config_lib.check(c)
    c.optim.wd_mults = ()
    c.optim.lr_mults = (("norm", "fast"),)
    with pytest.raises(UserError, match="config.optim.lr_mults must be"):
        config_lib.check(c)
    c.optim.lr_mults = ()
    c.data.flip = "sometimes"
    with pytest.raises(UserError, match="config.data.flip must be one of random, alternate"):
        config_lib.check(c)


def test_weight_decay_multipliers_undo_the_learning_rate_multipliers():
    """wd_mults (("norm", 1/64), (".", 1)) beside a 64x norm rate decay every parameter at the same
    rate (airbench's bias_scaler); without wd_mults 1-D parameters are not decayed."""
    params = {"groups_0": {"norm1": {"bias": jnp.full(4, 2.0)}, "conv1": {"kernel": jnp.full((3, 3, 4, 4), 2.0)}}}
    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "constant",
                                     "warmup_steps": 0, "weight_decay": 0.5, "lr_mults": (("norm", 64.0),),
                                     "wd_mults": (("norm", 1 / 64), (".", 1.0))})
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

    def decay_steps(cfg):
        tx = optim.optimizer(cfg, 10, "speednet", params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        return updates["groups_0"]["norm1"]["bias"], updates["groups_0"]["conv1"]["kernel"]
    bias, kernel = decay_steps(cfg)
    np.testing.assert_allclose(bias, -0.1, rtol=1e-6)
    np.testing.assert_allclose(kernel, -0.1, rtol=1e-6)
    cfg.wd_mults = ()
    bias, kernel = decay_steps(cfg)
    np.testing.assert_array_equal(bias, 0.0)
    np.testing.assert_allclose(kernel, -0.1, rtol=1e-6)
    cfg.update({"name": "adamw", "wd_mults": (("norm", 0.5),)})
    with pytest.raises(UserError, match="adamw decays weights itself"):
        optim.optimizer(cfg, 10, "speednet", params)


def _recipe(name: str, folder, **overrides):
    """The recipe shrunk to seconds: narrow groups, a few steps, on a small folder."""
    c = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"), str(folder))
    return configure(c, {"model.kwargs.widths": (8, 8, 8), "model.whiten": 20, "batch_size": 8,
                         "eval_batch_size": 8, "num_steps": 3, "optim.warmup_steps": 1, "data.threads": 1,
                         **overrides})


@pytest.mark.parametrize("name", ["cifar10_94", "cifar10_90"])
def test_the_speed_recipes_train_and_evaluate_with_tta_on_a_folder(tmp_path, name):
    folder = image_folder(tmp_path / "data", per_class=12, size=(32, 32))
    summary = loop.train(_recipe(name, folder, **{"data.val_fraction": 0.3}), str(tmp_path / "run"))
    assert summary["steps"] == 3 and summary["final_val_top1"] is not None
    kernel = np.asarray(final_params(tmp_path / "run")["stem"]["kernel"])
    assert np.abs(kernel).max() > 1  # whitening filters (unit-variance outputs), not a random start, and frozen
    assert summary["ops"]


def test_val_fraction_zero_trains_on_every_image_without_evaluating(tmp_path):
    folder = image_folder(tmp_path / "data", per_class=4, size=(32, 32))
    summary = loop.train(_recipe("cifar10_94", folder, **{"data.val_fraction": 0.0}), str(tmp_path / "run"))
    assert summary["steps"] == 3 and summary["final_val_top1"] is None and summary["best_step"] is None
    assert not any("val_top1" in json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl"))
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")


def test_the_pytorch_port_computes_speednets_logits():
    """experiments/cifar10_speed_torch.py trains the same network: with speednet's weights copied
    in, its logits (inference) agree."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("port", os.path.join(ROOT, "experiments", "cifar10_speed_torch.py"))
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    model = models.create("speednet", widths=(8, 16, 16))
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), jnp.asarray(x)))
    stats = jax.tree_util.tree_map(lambda v: v + 0.1, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    want = np.asarray(model.apply(variables, jnp.asarray(x)))
    net = port.SpeedNet(widths=(8, 16, 16)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            path = port.jaxvision_path(name).split("/")
            if path[-1] == "scale":
                continue
            value = _lookup(variables["params"], path)
            p.copy_(torch.from_numpy(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2
                                     else value))
        for name, b in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                path = name.split(".")
                key = "mean" if path[-1] == "running_mean" else "var"
                b.copy_(torch.from_numpy(_lookup(stats, path[:-1] + [key])))
        got = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)
