"""MixUp / CutMix: timm's semantics as properties, and no image data crossing devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.data import mix
from jaxvision.parallel.mesh import make_mesh

C = 10


def batch(n=6, h=16, w=12, seed=0):
    images = jax.random.normal(jax.random.key(seed), (n, h, w, 3))
    labels = jnp.arange(n) % C
    return images, labels


@pytest.mark.parametrize("mode", mix.MODES)
@pytest.mark.parametrize("n", [6, 7])  # odd batches work too
def test_targets_are_distributions_and_follow_lambda(mode, n):
    cfg = mix.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1)
    images, labels = batch(n)
    for seed in range(5):
        out, targets, d = mix.mix_local(jax.random.key(seed), images, labels, cfg, C)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        off, on = 0.1 / C, 1 - 0.1 + 0.1 / C
        y = np.full((n, C), off)
        y[np.arange(n), np.asarray(labels)] = on
        lam = np.asarray(d.lam)[:, None]
        np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-5, atol=1e-7)
        if mode == "batch":
            assert len(set(np.asarray(d.lam).tolist())) == 1
        if mode == "pair":
            np.testing.assert_array_equal(d.lam, d.lam[::-1])


@pytest.mark.parametrize("mode", mix.MODES)
def test_cutmix_pastes_the_partners_box_and_lambda_is_the_unpasted_area(mode):
    cfg = mix.MixConfig(cutmix_alpha=1.0, mode=mode)
    images, labels = batch(8, 20, 24)
    for seed in range(8):
        out, _, d = mix.mix_local(jax.random.key(seed), images, labels, cfg, C)
        out, img, partner = np.asarray(out), np.asarray(images), np.asarray(images)[::-1]
        for i, (y0, y1, x0, x1) in enumerate(np.asarray(d.box)):
            inside = np.zeros((20, 24), bool)
            inside[y0:y1, x0:x1] = True
            np.testing.assert_array_equal(out[i][inside], partner[i][inside])
            np.testing.assert_array_equal(out[i][~inside], img[i][~inside])
            np.testing.assert_allclose(d.lam[i], 1 - inside.mean(), rtol=1e-6)


def test_cutmix_minmax_box_sides_are_in_range():
    cfg = mix.MixConfig(cutmix_minmax=(0.2, 0.8), mode="elem")
    images, labels = batch(64, 40, 40)
    d = mix.mix_local(jax.random.key(0), images, labels, cfg, C)[2]
    box = np.asarray(d.box)
    sides = np.concatenate([box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]])
    assert sides.min() >= 8 and sides.max() < 32
    assert (box[:, 1] <= 40).all() and (box[:, 3] <= 40).all()


def test_prob_zero_leaves_the_batch_unchanged():
    cfg = mix.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, mode="elem", label_smoothing=0.1)
    images, labels = batch()
    out, targets, _ = mix.mix_local(jax.random.key(0), images, labels, cfg, C)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, mix.soft_targets(labels, C, 0.1))


def test_mixup_is_the_convex_combination():
    cfg = mix.MixConfig(mixup_alpha=0.4, mode="elem")
    images, labels = batch(5)
    out, _, d = mix.mix_local(jax.random.key(3), images, labels, cfg, C)
    lam = np.asarray(d.lam)[:, None, None, None]
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_lambda_matches_the_beta_distribution(alpha):
    cfg = mix.MixConfig(mixup_alpha=alpha, mode="elem", correct_lam=False)
    lam = np.concatenate([np.asarray(mix.draw(jax.random.key(s), 4096, 8, 8, cfg).lam) for s in range(4)])
    assert abs(lam.mean() - 0.5) < 0.01  # Beta(a, a) mean
    np.testing.assert_allclose(lam.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.05)


def test_switch_prob_chooses_cutmix_that_often():
    cfg = mix.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.3, mode="elem")
    d = mix.draw(jax.random.key(0), 20000, 8, 8, cfg)
    assert abs(float(d.cutmix.mean()) - 0.3) < 0.015


def test_sharded_mix_has_no_collective_over_images():
    """Compiled on 8 devices, mixing is local: the HLO holds no cross-device communication."""
    mesh = make_mesh({"data": 4, "fsdp": 2})
    images, labels = batch(32, 16, 16)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    images, labels = jax.device_put(images, sharding), jax.device_put(labels, sharding)
    for mode in mix.MODES:
        cfg = mix.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode)
        fn = jax.jit(lambda k, x, y: mix.mix(k, x, y, cfg, C, mesh))
        hlo = fn.lower(jax.random.key(0), images, labels).compile().as_text()
        for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter"):
            assert op not in hlo, f"{mode}: {op} in the compiled mixing step"
        out, targets = fn(jax.random.key(0), images, labels)
        assert out.sharding.is_equivalent_to(sharding, 4)
        # Each device mixed within its own shard of 4: the partner of local sample i is 3 - i.
        local = mix.mix_local(jax.random.key(0), images[:4], labels[:4], cfg, C)[0] if mode == "batch" else None
        if local is not None:
            np.testing.assert_allclose(out[:4], local, rtol=1e-5, atol=1e-6)
