"""The training recipe: optimizers, layer-wise decay, masks, freezing, EMA, losses, sampling,
per-class metrics, RandAugment / Random Erasing."""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxvision import config as config_lib, models
from jaxvision.errors import UserError
from jaxvision.data import augment, pipeline, sources, transforms
from jaxvision.train import evaluate, losses, loop, optim
from jaxvision.train import step as step_lib
from jaxvision.train.state import TrainState
from tests.test_engine import final_params, losses as logged_losses, tiny

# timm 1.0.31's layer-decay grouping: (number of ids, smallest scale at decay 0.75)
LAYER_DECAY_REFERENCE = {
    "vit_base_patch16_224": (14, 0.75 ** 13), "resnet50": (18, 0.75 ** 17),
    "efficientnet_b0": (18, 0.75 ** 17), "mobilenetv3_large_100": (18, 0.75 ** 17),
    "mobilenetv2_100": (19, 0.75 ** 18), "deit_tiny_distilled_patch16_224": (14, 0.75 ** 13),
}
HEADS = {"vit_base_patch16_224": ["head"], "resnet50": ["fc"], "efficientnet_b0": ["classifier"],
         "mobilenetv3_large_100": ["classifier", "conv_head"], "mobilenetv2_100": ["classifier"],
         "deit_tiny_distilled_patch16_224": ["head", "head_dist"]}
STEMS = {"vit_base_patch16_224": ["patch_embed", "pos_embed", "cls_token"], "resnet50": ["conv1", "bn1"],
         "efficientnet_b0": ["conv_stem", "bn1"], "mobilenetv3_large_100": ["conv_stem", "bn1"],
         "mobilenetv2_100": ["conv_stem", "bn1"], "deit_tiny_distilled_patch16_224": ["dist_token", "cls_token"]}


@pytest.mark.parametrize("name", sorted(LAYER_DECAY_REFERENCE))
def test_layer_ids_match_the_reference_grouping(name):
    params = models.init_shapes(models.create(name), 32)["params"]
    ids = optim.layer_ids(name, params)
    scales = optim.layer_scales(name, params, 0.75)
    num, smallest = LAYER_DECAY_REFERENCE[name]
    assert len(set(jax.tree_util.tree_leaves(ids))) == num
    assert min(jax.tree_util.tree_leaves(scales)) == pytest.approx(smallest)
    for head in HEADS[name]:
        assert set(jax.tree_util.tree_leaves(scales[head])) == {1.0}
    for stem in STEMS[name]:
        assert jax.tree_util.tree_leaves(scales[stem]) == pytest.approx(
            [smallest] * len(jax.tree_util.tree_leaves(scales[stem])))


def test_mobilenetv3_last_block_and_efficientnet_head_conv_get_decay_once():
    p = models.init_shapes(models.create("mobilenetv3_large_100"), 32)["params"]
    s = optim.layer_scales("mobilenetv3_large_100", p, 0.5)
    assert set(jax.tree_util.tree_leaves(s["blocks"]["6"])) == {0.5}  # the 960-channel conv
    p = models.init_shapes(models.create("efficientnet_b0"), 32)["params"]
    s = optim.layer_scales("efficientnet_b0", p, 0.5)
    assert set(jax.tree_util.tree_leaves((s["conv_head"], s["bn2"], s["blocks"]["6"]))) == {0.5}


def _optim_config(**kw):
    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "constant",
                                     "warmup_steps": 0, "weight_decay": 0.0})
    cfg.update(kw)
    return cfg


def test_layer_decay_scales_updates_with_any_optimizer():
    name = "resnet18"
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape), models.init_shapes(models.create(name), 32)["params"])
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    scales = optim.layer_scales(name, params, 0.8)
    for opt in ("sgd", "adamw", "lamb"):
        plain = optim.optimizer(_optim_config(name=opt), 10, name, params)
        decayed = optim.optimizer(_optim_config(name=opt, layer_decay=0.8), 10, name, params)
        u0, _ = plain.update(grads, plain.init(params), params)
        u1, _ = decayed.update(grads, decayed.init(params), params)
        ratio = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(b)) / jnp.max(jnp.abs(a))), u0, u1)
        jax.tree_util.tree_map(lambda r, s: np.testing.assert_allclose(r, s, rtol=1e-5), ratio, scales)


def test_weight_decay_mask_spares_1d_params_and_tokens():
    params = models.init_shapes(models.create("deit_tiny_distilled_patch16_224"), 32)["params"]
    mask = optim.decay_mask(params)
    assert mask["blocks"]["0"]["mlp"]["fc1"]["kernel"] and not mask["blocks"]["0"]["mlp"]["fc1"]["bias"]
    assert not mask["pos_embed"] and not mask["cls_token"] and not mask["dist_token"]
    assert not mask["norm"]["scale"] and mask["patch_embed"]["proj"]["kernel"]


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_builds_and_moves_the_parameters(name):
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    tx = optim.optimizer(_optim_config(name=name, weight_decay=0.01, grad_clip=1.0), 10)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_schedules_warm_up_then_decay():
    cfg = _optim_config(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lr = optim.schedule(cfg, 110)
    assert lr(0) == 0 and lr(5) == pytest.approx(0.05) and lr(10) == pytest.approx(0.1)
    assert lr(110) == pytest.approx(0.01)
    step = optim.schedule(_optim_config(schedule="step", step_boundaries=(0.5,), step_factor=0.1), 100)
    assert step(49) == pytest.approx(0.1) and step(51) == pytest.approx(0.01)
    lin = optim.schedule(_optim_config(schedule="linear"), 100)
    assert lin(50) == pytest.approx(0.05)


def test_gradient_accumulation_updates_every_k_steps():
    params = {"w": jnp.ones((2,))}
    tx = optim.optimizer(_optim_config(accumulate=3), 30)
    state = tx.init(params)
    moved = []
    for _ in range(6):
        updates, state = tx.update({"w": jnp.ones((2,))}, state, params)
        moved.append(bool(jnp.any(updates["w"] != 0)))
    assert moved == [False, False, True, False, False, True]


def test_frozen_parameters_get_no_update_and_no_optimizer_memory():
    params = {"backbone": {"w": jnp.ones((64, 64))}, "fc": {"kernel": jnp.ones((64, 2))}}
    tx = optim.optimizer(_optim_config(name="adamw", trainable="^fc/"), 10, "resnet18", params)
    state = tx.init(params)
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) < 3 * 128 + 10  # adam moments of fc only
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    assert float(jnp.abs(updates["backbone"]["w"]).max()) == 0 and float(jnp.abs(updates["fc"]["kernel"]).max()) > 0


def test_linear_probe_leaves_the_backbone_bit_identical(tmp_path):
    loop.train(tiny(num_steps=2), str(tmp_path / "pre"))
    pre = final_params(tmp_path / "pre")
    probe = tiny(num_steps=3, init_from=str(tmp_path / "pre"), **{"optim.trainable": "^fc/"})
    loop.train(probe, str(tmp_path / "probe"))
    import orbax.checkpoint as ocp
    m = ocp.CheckpointManager(str(tmp_path / "probe" / "checkpoints"), item_names=("state", "data"))
    state = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    m0 = ocp.CheckpointManager(str(tmp_path / "pre" / "checkpoints"), item_names=("state", "data"))
    pre_state = m0.restore(m0.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    for key in pre:
        if key != "fc":
            jax.tree_util.tree_map(np.testing.assert_array_equal, state["params"][key], pre[key])
    jax.tree_util.tree_map(np.testing.assert_array_equal, state["batch_stats"], pre_state["batch_stats"])
    assert not np.array_equal(state["params"]["fc"]["kernel"], pre["fc"]["kernel"])


def test_ema_is_trained_evaluated_and_warms_up(tmp_path):
    opts = step_lib.StepOptions(num_classes=2, mean=(0.0,), std=(1.0,), ema_decay=0.999)
    assert float(step_lib.ema_decay_at(jnp.asarray(0), opts)) == pytest.approx(0.1)
    assert float(step_lib.ema_decay_at(jnp.asarray(10 ** 6), opts)) == pytest.approx(0.999)
    ramped = dataclasses.replace(opts, ema_ramp=3.0, total_steps=100)
    assert float(step_lib.ema_decay_at(jnp.asarray(50), ramped)) == pytest.approx(0.999 / 8)
    summary = loop.train(tiny(num_steps=4, **{"ema.decay": 0.9}), str(tmp_path))
    assert summary["final_ema_val_top1"] is not None
    import json
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert any("ema_val_top1" in r for r in rows)


def test_lookahead_restarts_from_the_average_every_n_steps_and_at_the_end():
    """Weights climb by 1 a step; every third step and at the last (7th) the average takes half
    (then 0.3) of them and they restart from it. A weight that does not train stays bit-exact
    (0.123 * 0.3 + 0.123 * 0.7 is not 0.123 in float32)."""
    def run(decay, steps=7):
        opts = step_lib.StepOptions(num_classes=2, mean=(0.0,), std=(1.0,), ema_decay=decay, ema_warmup=False,
                                    ema_sync_every=3, total_steps=steps)
        start = {"w": jnp.zeros(()), "frozen": jnp.full((), 0.123)}
        state = TrainState(step=jnp.zeros((), jnp.int32), params=start, batch_stats={}, opt_state=None,
                           ema={"params": start, "batch_stats": {}})
        seen = []
        for _ in range(steps):
            params, stats, ema = step_lib.update_average(state, {**state.params, "w": state.params["w"] + 1}, {},
                                                         opts)
            seen.append((float(params["w"]), float(ema["params"]["w"])))
            state = state.replace(step=state.step + 1, params=params, batch_stats=stats, ema=ema)
            assert params["frozen"] == start["frozen"] and ema["params"]["frozen"] == start["frozen"]
        return seen
    assert run(0.5) == [(1, 0), (2, 0), (1.5, 1.5), (2.5, 1.5), (3.5, 1.5), (3.0, 3.0), (3.5, 3.5)]
    assert run(0.7, 3)[-1] == pytest.approx((0.9, 0.9))


def test_lookahead_trains_and_evaluates_the_averaged_weights_once(tmp_path):
    import orbax.checkpoint as ocp
    loop.train(tiny(num_steps=4, **{"ema.decay": 0.5, "ema.sync_every": 3}), str(tmp_path))
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "data"))
    state = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, state["params"], state["ema"]["params"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("val_top1" in r for r in rows) and not any("ema_val_top1" in r for r in rows)
    c = config_lib.base()
    c.ema.sync_every = 5
    with pytest.raises(UserError, match="config.ema.sync_every must be lookahead with ema.decay > 0"):
        config_lib.check(c)


def test_mixing_trains_end_to_end(tmp_path):
    config = tiny(num_steps=3, **{"mix.mixup_alpha": 0.8, "mix.cutmix_alpha": 1.0, "mix.mode": "elem"})
    loop.train(config, str(tmp_path))
    assert len(logged_losses(tmp_path)) == 3


def test_losses():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    targets = losses.soft_targets(jnp.array([0, 2]), 3, 0.1)
    np.testing.assert_allclose(losses.focal_loss(logits, targets, 0.0), losses.cross_entropy(logits, targets), rtol=1e-6)
    assert np.all(losses.focal_loss(logits, targets, 2.0) < losses.cross_entropy(logits, targets))
    p = jax.nn.sigmoid(logits)
    bce = -(targets * jnp.log(p) + (1 - targets) * jnp.log(1 - p)).mean(-1)
    np.testing.assert_allclose(losses.binary_cross_entropy(logits, targets), bce, rtol=1e-5)
    per = jnp.array([1.0, 3.0])
    w = jnp.array([2.0, 1.0, 1.0])
    hard = jax.nn.one_hot(jnp.array([0, 2]), 3)
    assert float(losses.weighted_mean(per, hard, w)) == pytest.approx((2 * 1 + 1 * 3) / 3)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.per_example_loss("hinge")


def test_balanced_class_weights_and_sampling():
    labels = np.array([0] * 90 + [1] * 10)
    src = sources.ArraySource(np.zeros((100, 4, 4, 3), np.uint8), labels, ["a", "b"])
    w = loop.class_weights("balanced", src, 2)
    np.testing.assert_allclose(w, [100 / 180, 100 / 20])
    it = iter(pipeline.train_batches(src, transforms.TrainTransform(4, "none"), batch_size=50, seed=0,
                                     balanced=True))
    drawn = np.concatenate([next(it)["label"] for _ in range(20)])
    assert abs(drawn.mean() - 0.5) < 0.05  # uniform sampling would give 0.1
    again = iter(pipeline.train_batches(src, transforms.TrainTransform(4, "none"), batch_size=50, seed=0,
                                        balanced=True, start_step=7))
    it = iter(pipeline.train_batches(src, transforms.TrainTransform(4, "none"), batch_size=50, seed=0,
                                     balanced=True))
    np.testing.assert_array_equal([next(it) for _ in range(8)][-1]["label"], next(again)["label"])


def test_per_class_metrics_and_confusion_png(tmp_path):
    confusion = np.array([[8, 2, 0], [0, 5, 5], [0, 0, 0]], float)
    np.testing.assert_allclose(evaluate.per_class_accuracy(confusion)[:2], [0.8, 0.5])
    assert evaluate.balanced_accuracy(confusion) == pytest.approx(0.65)
    summary = loop.train(tiny(num_steps=2, per_class_metrics=True), str(tmp_path))
    pngs = os.listdir(tmp_path / "confusion")
    assert any(p.endswith(".png") for p in pngs) and summary["final_val_top1"] is not None
    from PIL import Image
    assert Image.open(tmp_path / "confusion" / sorted(p for p in pngs if p.endswith(".png"))[0]).size[0] > 100


def test_randaugment_and_random_erasing():
    ra = augment.RandAugment.parse("rand-m9-mstd0.5-n3")
    assert (ra.magnitude, ra.magnitude_std, ra.num_ops) == (9.0, 0.5, 3)
    with pytest.raises(ValueError, match="unknown RandAugment option"):
        augment.RandAugment.parse("rand-m9-q3")
    rng = np.random.default_rng(0)
    img = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)
    outs = [ra(img, rng) for _ in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, img) for o in outs) > 10
    for name in augment._OPS:  # every op runs at full magnitude
        assert augment._apply(name, augment.Image.fromarray(img), 1.0, rng).size == (32, 32)
    erased = augment.random_erase(img, rng, 1.0, "const")
    changed = np.any(erased != img, axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one box
    t = transforms.TrainTransform(24, "rrc_flip", randaugment="rand-m9-mstd0.5", reprob=0.25)
    assert t({"image": img, "label": 1}, rng)["image"].shape == (24, 24, 3)


class _Tiny(nn.Module):
    """A convolution and a dense layer over the flattened map: position-dependent, so neither
    flip- nor shift-invariant."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(5)(nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1))


def test_test_time_augmentation_leaves_a_flip_invariant_model_unchanged():
    """A model made mirror-symmetric (logits of an image plus its mirror image's) gives the same
    logits under "flip" TTA; the plain model does not, and on a uniform image, which moving with
    repeated edges cannot change, "flip_translate" gives the symmetric model's logits too."""
    model = _Tiny()
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    variables = model.init(jax.random.key(1), images)
    plain = lambda v, x: model.apply(v, x)  # noqa: E731
    symmetric = lambda v, x: plain(v, x) + plain(v, x[:, :, ::-1])  # noqa: E731
    want = symmetric(variables, images)
    np.testing.assert_allclose(step_lib.test_time_augmented(symmetric, "flip")(variables, images), want,
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(step_lib.test_time_augmented(plain, "flip")(variables, images),
                           plain(variables, images), atol=1e-3)
    uniform = jnp.full((2, 16, 16, 3), 0.3)
    np.testing.assert_allclose(step_lib.test_time_augmented(symmetric, "flip_translate")(variables, uniform),
                               symmetric(variables, uniform), rtol=1e-5, atol=1e-5)
    assert not np.allclose(step_lib.test_time_augmented(plain, "flip_translate")(variables, images),
                           step_lib.test_time_augmented(plain, "flip")(variables, images), atol=1e-3)
    moved = step_lib._shift(images, 2)
    np.testing.assert_array_equal(moved[:, 2:, 2:], images[:, :-2, :-2])
    np.testing.assert_array_equal(step_lib._shift(images, -2)[:, :-2, :-2], images[:, 2:, 2:])


def _photo_crops(count: int, size: int = 24) -> np.ndarray:
    """Standardised float32 NHWC crops of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    rng, photos = np.random.default_rng(0), load_sample_images().images
    crops = []
    for i in range(count):
        photo = photos[i % 2]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[top:top + size, left:left + size])
    crops = np.stack(crops).astype(np.float32) / 255.0
    return (crops - crops.mean((0, 1, 2))) / crops.std((0, 1, 2))


def test_the_whitened_first_layer_outputs_identity_covariance_on_the_data():
    """Through the convolution itself (HWIO kernel, VALID): the d = 27 whitening filters' outputs
    on the data have covariance within 1e-3 of the identity, the next 27 are their negations."""
    from jaxvision.train import whiten

    images = _photo_crops(60)
    kernel = whiten.whitening_kernel(images, 3, 3, channels=64, eps=1e-9)
    assert kernel.shape == (3, 3, 3, 54)
    out = jax.lax.conv_general_dilated(jnp.asarray(images), jnp.asarray(kernel), (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    flat = np.asarray(out, np.float64).reshape(-1, 54)
    cov = np.cov(flat[:, :27], rowvar=False, bias=True)
    assert np.abs(cov - np.eye(27)).max() < 1e-3, np.abs(cov - np.eye(27)).max()
    np.testing.assert_allclose(flat[:, 27:], -flat[:, :27], atol=1e-4)
    raw = np.cov(np.asarray(jax.lax.conv_general_dilated(
        jnp.asarray(images), jnp.ones((3, 3, 3, 1)), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))).reshape(-1), bias=True)
    assert raw > 10  # neighbouring pixels correlate: the data itself is far from white


def test_model_whiten_sets_the_stem_of_a_zoo_model_and_keeps_its_other_filters():
    from jaxvision.train import setup as setup_lib, whiten

    config = tiny(**{"model.whiten": 50, "data.image_size": 16, "model.kwargs.width": 64})  # a 3x3x3 -> 64 stem
    s = setup_lib.setup(config)
    init, _, shardings = s.abstract_state(s.optimizer(10))
    state = jax.jit(init, out_shardings=shardings)()
    path = whiten.first_conv(state.params)
    assert path == ("conv1", "kernel")
    before = np.asarray(functools.reduce(lambda n, k: n[k], path, state.params))
    after = np.asarray(functools.reduce(lambda n, k: n[k], path, loop.whiten_first_conv(s, state).params))
    images = whiten.sample(s.train_source, setup_lib.eval_transform(s), 50, s.card.mean, s.card.std, config.seed)
    want = whiten.whitening_kernel(images, *before.shape[:2], before.shape[-1])
    k = want.shape[-1]
    assert (k, after.shape[-1]) == (54, 64)  # 27 whitening filters, their negations, 10 left as they were
    np.testing.assert_allclose(after[..., :k], want, rtol=1e-6)
    np.testing.assert_array_equal(after[..., k:], before[..., k:])


class _Fixed:
    """A generator stand-in whose draws pick the positive sign and bicubic interpolation."""

    def random(self):
        return 0.9


def test_geometric_randaugment_ops_move_pixels_as_pillows_do():
    """OpenCV runs the warps; shear, translation and rotation (counter-clockwise) go the way
    Pillow's affine transform and rotate do: within 1.5 grey levels (edges differ), against 15+
    for the mirror image."""
    from PIL import Image
    yy, xx = np.mgrid[0:64, 0:64]
    img = Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8))
    cubic, fill = Image.BICUBIC, augment._FILL
    cases = {"ShearX": lambda s: img.transform(img.size, Image.AFFINE, (1, s * 0.3, 0, 0, 1, 0), cubic, fillcolor=fill),
             "TranslateYRel": lambda s: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, s * 0.45 * 64), cubic,
                                                      fillcolor=fill),
             "Rotate": lambda s: img.rotate(s * 30.0, cubic, fillcolor=fill)}
    for name, pillow in cases.items():
        ours = np.asarray(augment._apply(name, img, 1.0, _Fixed()), float)
        assert np.abs(ours - np.asarray(pillow(1), float)).mean() < 1.5, name
        assert np.abs(ours - np.asarray(pillow(-1), float)).mean() > 15, name


def test_the_logged_learning_rate_is_the_optimizer_steps_with_accumulation(tmp_path):
    """With `accumulate=2` the schedule runs over optimizer steps; the lr logged at micro-step k is
    the schedule's at optimizer step k // 2 (it was read at k, running the schedule twice as fast)."""
    config = tiny(num_steps=8, log_every=1, **{"optim.accumulate": 2, "optim.schedule": "linear",
                                               "optim.warmup_steps": 0})
    loop.train(config, str(tmp_path))
    logged = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "lr" in r}
    lr = optim.schedule(config.optim, 8 // 2)
    assert logged == pytest.approx({k: float(lr(k // 2)) for k in range(1, 9)})
    assert logged[6] > 0  # read at the micro-step, the linear schedule had reached 0 by step 4
