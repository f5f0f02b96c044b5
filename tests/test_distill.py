"""Knowledge distillation: the loss against float64, its gradient, a frozen teacher in the step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxvision.train import loop, losses, step as step_lib
from tests.test_engine import configure, final_params, load_config, losses as logged, tiny


def _reference_kd(s, t, temperature):
    s, t = np.asarray(s, np.float64) / temperature, np.asarray(t, np.float64) / temperature
    log_ps = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    log_pt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    return temperature ** 2 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), -1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 10.0])
def test_distillation_loss_matches_float64_and_its_gradient(temperature):
    key_s, key_t = jax.random.split(jax.random.key(0))
    s = 3 * jax.random.normal(key_s, (16, 10))
    t = 3 * jax.random.normal(key_t, (16, 10))
    loss = losses.distillation_loss(s, t, temperature)
    np.testing.assert_allclose(loss, _reference_kd(s, t, temperature), rtol=2e-5)
    grad = jax.grad(losses.distillation_loss)(s, t, temperature)
    want = temperature * (jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature)) / 16
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
    assert float(losses.distillation_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_view_resizes_and_uses_the_teachers_statistics():
    x = jnp.full((2, 8, 8, 3), 0.5)
    d = step_lib.Distill(teacher=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), image_size=16)
    out = step_lib.teacher_view(x, d)
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher trained by the engine (width-16 ResNet-18 on digits)."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    loop.train(tiny(num_steps=3, **{"model.kwargs.width": 16}), workdir)
    return workdir


def distill(teacher_dir, **overrides):
    return tiny(num_steps=3, **{"distill.teacher": "resnet18", "distill.teacher_kwargs": {"stem": "3x3", "width": 16},
                                "distill.teacher_init": teacher_dir, **overrides})


def _teacher_state(teacher_dir):
    m = ocp.CheckpointManager(os.path.join(teacher_dir, "checkpoints"), item_names=("state", "data"))
    return m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_teacher_is_frozen_untouched_and_not_checkpointed(teacher_dir, tmp_path):
    before = _teacher_state(teacher_dir)
    config = distill(teacher_dir)
    loop.train(config, str(tmp_path))
    rows = [r for r in map(__import__("json").loads, open(tmp_path / "metrics.jsonl")) if "kd_loss" in r]
    assert len(rows) == 3 and all(r["kd_loss"] > 0 for r in rows)
    after = _teacher_state(teacher_dir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, after["params"], before["params"])
    student = final_params(tmp_path)
    assert student["fc"]["kernel"].shape == (64, 10)  # the student's own width; no teacher arrays
    assert student["layer1"]["0"]["conv1"]["kernel"].shape[-1] == 8

    # No gradient reaches the teacher: d(loss)/d(teacher variables) is exactly zero.
    s = loop.setup(config)
    tx = s.optimizer(10)
    init, shapes, shardings = s.abstract_state(tx)
    train_step = jax.jit(step_lib.make_train_step(s.model, tx, loop.step_options(s, shapes.params, shapes.batch_stats), s.mesh))
    state = jax.jit(init, out_shardings=shardings)()
    teacher = loop.load_teacher(s)
    batch = {"image": jnp.asarray(np.random.RandomState(0).randint(0, 255, (32, 8, 8, 3)), jnp.uint8),
             "label": jnp.arange(32) % 10}
    grads = jax.grad(lambda tv: train_step(state, batch, tv)[1]["loss"])(teacher)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_teacher_of_another_shape_is_refused(teacher_dir, tmp_path):
    config = distill(teacher_dir, **{"distill.teacher_kwargs": {"stem": "3x3", "width": 8}})
    with pytest.raises(loop.checkpoint.CheckpointError, match="teacher .* does not fit resnet18"):
        loop.train(config, str(tmp_path))


def test_feature_distillation_learns_a_projection_between_widths(teacher_dir, tmp_path):
    loop.train(distill(teacher_dir, **{"distill.kind": "feature"}), str(tmp_path))
    params = final_params(tmp_path)
    assert params["distill_proj"]["kernel"].shape == (64, 128)


@pytest.mark.parametrize("kind", ["deit_soft", "deit_hard"])
def test_deit_distillation_token_trains_against_a_cnn_teacher(teacher_dir, tmp_path, kind):
    config = distill(teacher_dir, **{"model.name": "deit_tiny_distilled_patch16_224",
                                     "model.kwargs": {"img_size": 16, "patch_size": 8},
                                     "data.image_size": 16, "distill.teacher_image_size": 8,
                                     "distill.kind": kind})
    summary = loop.train(config, str(tmp_path))
    assert summary["steps"] == 3 and len(logged(tmp_path)) == 3
    with pytest.raises(loop.UserError, match="distillation token"):
        loop.setup(distill(teacher_dir, **{"distill.kind": kind}))


def test_distillation_recipes_build_and_compile():
    config = configure(load_config("imagenet_deit_distill"), {
        "data.image_size": 32, "batch_size": 8, "distill.teacher_image_size": 32,
        "model.kwargs": {"img_size": 32}})
    text = loop.plan(config)
    assert "compiled in" in text
    cifar = load_config("cifar10_distill", "/data/cifar,/runs/teacher")
    assert cifar.distill.teacher_init == "/runs/teacher" and cifar.data.dataset == "folder:/data/cifar"
    assert cifar.model.kwargs.width == 8 and cifar.distill.teacher_kwargs.width == 16
