"""The zoo on its own: names, cards, exact parameter counts, calling convention, dtypes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import models

# timm 1.0.31's counts (pretrained=False, 1000 classes).
REFERENCE_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
    "efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232, "efficientnet_b4": 19_341_616, "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704, "efficientnet_b7": 66_347_960,
    "mobilenetv2_100": 3_504_872, "mobilenetv3_small_100": 2_542_856,
    "mobilenetv3_large_100": 5_483_032,
    "vit_tiny_patch16_224": 5_717_416, "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656, "vit_large_patch16_224": 304_326_632,
    "deit_tiny_distilled_patch16_224": 5_910_800, "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
}
REFERENCE_PARAMS.update({f"tf_{k}": v for k, v in REFERENCE_PARAMS.items() if k.startswith("efficientnet")})
# The rest of the zoo (issue: "the rest of the zoo the field asks for").
REFERENCE_PARAMS.update({
    "convnext_tiny": 28_589_128, "convnext_small": 50_223_688, "convnext_base": 88_591_464,
    "swin_tiny_patch4_window7_224": 28_288_354, "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "tf_efficientnetv2_s": 21_458_488, "tf_efficientnetv2_m": 54_139_356,
    "tf_efficientnet_lite0": 4_652_008, "resnext50_32x4d": 25_028_904, "resnet50d": 25_576_264,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992, "inception_v3": 23_834_568,
})
# The seeds' historical networks: torchvision's counts (GoogLeNet with aux_logits=False, as its
# weights are served); LeNet-5's classic 61,706.
REFERENCE_PARAMS.update({"lenet5": 61_706, "alexnet": 61_100_840, "googlenet": 6_624_904})
# The CIFAR speed records' network, 10 classes: the trainable parameters of its PyTorch port
# (experiments/cifar10_speed_torch.py, whose frozen BatchNorm scales jaxvision does not create).
REFERENCE_PARAMS.update({"speednet": 1_971_640})

# One small model per family for the forward tests.
FAMILY_REPS = ["resnet18", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv2_100",
               "mobilenetv3_small_100", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]


@functools.lru_cache(maxsize=None)
def _init(name: str, num_classes: int = 1000, size: int = 48):
    """Variables of a model, initialised once per session (compiling init dominates test time)."""
    model = models.create(name, num_classes=num_classes)
    return jax.jit(model.init)(jax.random.key(0), jnp.ones((2, size, size, 3)))


def _apply(model, variables, x, **kw):
    """Jitted apply: eager mode compiles every op for every new shape, which is slower here."""
    return jax.jit(functools.partial(model.apply, **kw))(variables, x)


def test_every_reference_name_is_registered_and_nothing_else():
    assert set(models.list_models()) == set(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name):
    shapes = models.init_shapes(models.create(name), image_size=64 if name == "alexnet" else 32)  # AlexNet: >= 63 px
    assert models.count_params(shapes["params"]) == REFERENCE_PARAMS[name]


def test_list_models_wildcards():
    assert models.list_models("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "resnet50d"]
    assert models.list_models("*distilled*") == [
        "deit_base_distilled_patch16_224", "deit_small_distilled_patch16_224",
        "deit_tiny_distilled_patch16_224"]
    assert models.list_models("nothing*") == []


def test_model_cards_carry_preprocessing():
    vit = models.model_card("vit_base_patch16_224")
    assert (vit.mean, vit.std, vit.input_size, vit.family) == ((0.5,) * 3, (0.5,) * 3, 224, "vit")
    deit = models.model_card("deit_tiny_distilled_patch16_224")
    assert deit.mean == (0.485, 0.456, 0.406)
    b3 = models.model_card("tf_efficientnet_b3")
    assert b3.input_size == 300 and 0.85 < b3.crop_pct < 0.95 and b3.num_classes == 1000


@pytest.mark.parametrize("name, size", [("convnext_tiny", 80), ("swin_tiny_patch4_window7_224", 96),
                                        ("vgg16_bn", 64), ("inception_v3", 107), ("resnet50d", 65),
                                        ("tf_efficientnetv2_s", 72)])
def test_larger_families_trace_at_non_default_resolutions(name, size):
    """Shape-level forward (every op traced, nothing computed) at sizes the card does not name."""
    model = models.create(name, num_classes=3)
    x = jnp.zeros((2, size, size, 3))
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "convnext_tiny",
                                  "swin_tiny_patch4_window7_224", "vgg16", "inception_v3"])
def test_features_only_returns_the_maps_the_card_lists(name):
    card = models.model_card(name)
    model = models.create(name, features_only=True, out_indices=(1, 3))
    x = jnp.zeros((1, card.input_size, card.input_size, 3))
    maps = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x))
    assert len(maps) == 2
    for m, (channels, stride) in zip(maps, [card.feature_info[1], card.feature_info[3]]):
        assert m.shape[-1] == channels  # stride: the nominal power of two (Inception's are inexact)
        assert stride == 2 ** round(np.log2(card.input_size / m.shape[1]))
    assert card.feature_info[-1][1] == 32


def test_unknown_name_and_override_give_clear_errors():
    with pytest.raises(ValueError, match="Did you mean resnet50"):
        models.create("resnet05")
    with pytest.raises(ValueError, match="does not take patch_size"):
        models.create("resnet18", patch_size=8)


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_forward_at_non_default_resolution_and_features(name):
    model = models.create(name, num_classes=7)
    x = jnp.ones((2, 40, 40, 3))
    variables = _init(name, 7)
    logits = _apply(model, variables, x, train=False)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    feats = _apply(model, variables, x, pre_logits=True)
    headless = models.create(name, num_classes=0)
    assert jax.eval_shape(headless.apply, variables, x).shape == feats.shape
    assert feats.ndim == 2 and feats.shape[0] == 2


def test_train_mode_updates_batch_stats_and_drop_path_uses_dropout_rng():
    model = models.create("resnet18", num_classes=3, drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    v = model.init(jax.random.key(1), x)
    # Residual branches end in a zero-initialised BatchNorm; give them a non-zero scale.
    v = jax.tree_util.tree_map(lambda a: a + 0.1, v)
    out_a, new = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
    out_b, _ = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})
    stats_changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), v["batch_stats"], new["batch_stats"])
    assert all(jax.tree_util.tree_leaves(stats_changed))
    feats_a = model.apply(v, x, train=True, pre_logits=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})[0]
    feats_b = model.apply(v, x, train=True, pre_logits=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})[0]
    assert not np.allclose(feats_a, feats_b)  # different stochastic-depth draws


def test_deit_distilled_training_returns_both_heads():
    model = models.create("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32,
                          distilled_training=True)
    x = jnp.ones((2, 32, 32, 3))
    v = model.init(jax.random.key(0), x)
    v = jax.tree_util.tree_map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), v)
    cls, dist = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)})
    assert cls.shape == dist.shape == (2, 5) and not np.allclose(cls, dist)
    np.testing.assert_allclose(model.apply(v, x, train=False), (cls + dist) / 2, rtol=1e-5, atol=1e-6)


def test_parameters_carry_logical_axis_names():
    v = jax.eval_shape(models.create("vit_tiny_patch16_224").init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    specs = nn.get_partition_spec(v)["params"]
    assert tuple(specs["blocks"]["0"]["attn"]["qkv"]["kernel"]) == ("embed", None, "heads", "kv")
    assert tuple(specs["blocks"]["0"]["attn"]["proj"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["blocks"]["0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    v = jax.eval_shape(models.create("resnet18").init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    specs = nn.get_partition_spec(v)["params"]
    assert tuple(specs["layer1"]["0"]["conv1"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(specs["fc"]["kernel"]) == ("features", "classes")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "vit_tiny_patch16_224"])
def test_bfloat16_compute_is_close_to_float32_and_keeps_float32_params(name):
    x = jax.random.normal(jax.random.key(1), (4, 48, 48, 3))
    f32, bf16 = models.create(name, num_classes=7), models.create(name, num_classes=7, dtype=jnp.bfloat16)
    v = _init(name, 7)
    # Realistic BatchNorm statistics and a non-zero head, so the logits mean something.
    if "batch_stats" in v:
        _, stats = _apply(f32, v, x, train=True, mutable=["batch_stats"])
        v = {**v, **stats}
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: 0.05 * jax.random.normal(jax.random.key(2), a.shape)
        if jax.tree_util.keystr(p).startswith(("['params']['fc']", "['params']['classifier']", "['params']['head']"))
        else a, v)
    ref, out = _apply(f32, v, x), _apply(bf16, v, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(
        jax.eval_shape(bf16.init, jax.random.key(0), x)))
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert rel < 0.03, rel  # measured 0.003-0.012 across families


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_scanned_and_rematerialised_blocks_compute_what_the_unrolled_ones_do(name):
    """The same weights (stacked for `scan_blocks`) give the same logits under every remat
    policy, and the same losses over 3 training steps (without drop path, whose random draws
    differ between the layouts: the scanned blocks split the key per layer)."""
    import optax

    from jaxvision.models import vit
    from jaxvision.train import step as step_lib

    kw = dict(img_size=32, num_classes=10)
    plain = models.create(name, **kw)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    params = nn.unbox(plain.init(jax.random.key(1), x))["params"]
    want = _apply(plain, {"params": params}, x)
    for scan in (False, True):
        for policy in ("none", "full", "dots_saveable"):
            model = models.create(name, scan_blocks=scan, remat_policy=policy, **kw)
            got = _apply(model, {"params": vit.stack_blocks(params) if scan else params}, x)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    tx = optax.sgd(0.1)
    batches = [{"image": jax.random.randint(jax.random.key(i), (4, 32, 32, 3), 0, 256).astype(jnp.uint8),
                "label": jnp.arange(4) % 10} for i in range(3)]

    def losses(model, p):
        state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, batch_stats={}, opt_state=tx.init(p))
        step = jax.jit(step_lib.make_train_step(model, tx, step_lib.StepOptions(num_classes=10, mean=(0.5,) * 3,
                                                                                std=(0.5,) * 3)))
        out = []
        for batch in batches:
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
        return out

    unrolled = losses(plain, params)
    scanned = losses(models.create(name, scan_blocks=True, remat_policy="dots_saveable", **kw), vit.stack_blocks(params))
    assert len(set(unrolled)) > 1
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5)
