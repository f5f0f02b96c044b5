"""Deployment modes: calibration maths, and predict / calibrate / export end to end on a folder
of 32 px JPEGs in 10 classes (made by tests/images.py) with a tiny trained model."""

import csv
import json
import os

import numpy as np
import pytest

from jaxvision import trained as trained_lib
from jaxvision.deploy import calibration, export
from jaxvision.train import setup as setup_lib
from tests.images import CLASSES, image_folder
from tests.test_engine import TINY, cli, configure, flags, load_config


def test_fitted_temperature_recovers_the_one_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 10))
    labels = np.array([rng.choice(10, p=p) for p in calibration.softmax(logits, 2.0)])
    assert calibration.fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)
    assert calibration.nll(logits, labels, 2.0) < calibration.nll(logits, labels, 1.0)
    # Overconfident logits (true T = 2): scaling must cut the calibration error.
    assert calibration.ece(calibration.softmax(logits, 2.0), labels) < 0.02
    assert calibration.ece(calibration.softmax(logits), labels) > 0.05


def test_ece_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    probs = calibration.softmax(rng.normal(0, 2, (500, 5)))
    labels = rng.integers(0, 5, 500)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    direct = 0.0
    for lo in np.linspace(0, 1, 16)[:-1]:
        inside = (conf >= lo) & (conf < lo + 1 / 15)
        if inside.any():
            direct += inside.sum() / 500 * abs(correct[inside].mean() - conf[inside].mean())
    assert calibration.ece(probs, labels, 15) == pytest.approx(direct, abs=1e-9)


def test_threshold_and_auroc():
    scores = np.arange(1000.0)
    assert np.mean(scores >= calibration.threshold_for(scores, 0.9)) == pytest.approx(0.9, abs=0.002)
    assert calibration.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert calibration.auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
    logits = np.array([[5.0, 0.0], [0.1, 0.0]])
    assert np.all(np.diff(calibration.ood_score(logits, "msp")) < 0)
    assert np.all(np.diff(calibration.ood_score(logits, "energy")) < 0)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """20 JPEGs per class, 32 x 32 like CIFAR-10, as an image folder of 10 classes."""
    return str(image_folder(tmp_path_factory.mktemp("images"), CLASSES, per_class=20, size=(32, 32), png_every=0))


# 28 px crops of the 32 px images at crop_pct 0.875: no resize, so export must match exactly.
JPEG_TINY = {**TINY, "data.image_size": 28, "data.crop_pct": 0.875, "data.val_fraction": 0.3,
              "batch_size": 16, "eval_batch_size": 16, "data.augment": "pad_crop_flip"}


@pytest.fixture(scope="module")
def trained(image_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    overrides = {**JPEG_TINY, "data.dataset": f"folder:{image_dir}", "data.eval_split": "val"}
    cli("--config", "configs/default.py", "--workdir", workdir, *flags(overrides))
    return workdir, overrides


def test_calibrate_writes_temperature_threshold_and_diagram(trained, image_dir):
    from jaxvision.data.sources import FolderSource

    workdir, overrides = trained
    out = cli("--config", "configs/default.py", "--workdir", workdir, "--mode", "calibrate",
              *flags({**overrides, "calibrate.ood_dataset": "digits", "calibrate.accept": 0.9}))
    result = json.load(open(os.path.join(workdir, "calibration.json")))
    assert result["nll_after"] <= result["nll_before"] + 1e-9  # T = 1 is inside the search
    assert result["validation_images"] == len(FolderSource(image_dir, "val", 0.3)) and result["ood_dataset"] == "digits"
    assert 0 <= result["auroc_msp"] <= 1 and 0 <= result["ood_rejected"] <= 1
    assert os.path.getsize(os.path.join(workdir, "reliability.png")) > 10_000
    assert "ece_after" in out.stdout


def test_predict_table_csv_and_unreadable_file(trained, image_dir, tmp_path):
    workdir, overrides = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for cls in ("cat", "owl"):
        name = sorted(os.listdir(os.path.join(image_dir, cls)))[0]
        (inputs / f"{cls}.jpg").write_bytes(open(os.path.join(image_dir, cls, name), "rb").read())
    (inputs / "broken.jpg").write_bytes(b"not an image")
    out = cli("--config", "configs/default.py", "--workdir", workdir, "--mode", "predict",
              *flags({**overrides, "predict.inputs": str(inputs), "predict.top_k": 3}))
    rows = list(csv.DictReader(open(os.path.join(workdir, "predictions.csv"))))
    assert [os.path.basename(r["path"]) for r in rows] == ["broken.jpg", "cat.jpg", "owl.jpg"]
    assert rows[0]["error"] == "unreadable image"
    classes = sorted(os.listdir(image_dir))
    for r in rows[1:]:
        probs = [float(r[f"prob_{k}"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {r[f"label_{k}"] for k in (1, 2, 3)} <= set(classes)
    assert "cat.jpg" in out.stdout and "1 unreadable" in out.stdout


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_export_reproduces_the_model_on_jpegs(fmt, trained, image_dir):
    """StableHLO through jax, ONNX through onnxruntime: raw JPEG pixels in, the model's logits out."""
    import jax

    if fmt == "onnx":
        pytest.importorskip("jax2onnx", reason="the deploy extra is not installed")
        pytest.importorskip("onnxruntime", reason="the deploy extra is not installed")
    from jaxvision.train import step as step_lib

    workdir, overrides = trained
    cli("--config", "configs/default.py", "--workdir", workdir, "--mode", "export",
        *flags({**overrides, "export.format": fmt}))
    meta = json.load(open(os.path.join(workdir, "export", "model.json")))
    assert meta["input"] == [None, 32, 32, 3] and len(meta["class_names"]) == 10 and meta["format"] == fmt
    assert meta["platforms"] == (["cpu", "cuda", "tpu"] if fmt == "stablehlo" else None)
    assert meta["ops"].startswith("portable")
    serve = export.load(os.path.join(workdir, "export", f"model.{fmt}"))

    config = configure(load_config("default"), overrides)
    t = trained_lib.load(config, workdir, evaluate=True)
    s, variables, _ = t.setup, t.variables, t.shardings
    images = np.stack([s.eval_source[i]["image"] for i in range(7)])  # decoded 32 px JPEGs
    transform = setup_lib.eval_transform(s)
    host = np.stack([transform({"image": im, "label": 0})["image"] for im in images])
    want = np.asarray(s.model.apply(jax.device_get(variables), step_lib.normalize(host, s.card.mean, s.card.std)))
    for batch in (1, 7):  # the batch dimension is symbolic
        got = np.asarray(serve(images[:batch]))
        assert np.max(np.abs(got - want[:batch])) / np.max(np.abs(want)) < 1e-4


def test_in_graph_resize_agrees_with_the_host_pipeline(image_dir):
    """When the artifact must resize (here 32 -> 27 px, antialiased bicubic), its pixels differ from
    PIL's by a fraction of a grey level on average."""
    from PIL import Image

    from jaxvision.data import transforms

    files = [os.path.join(image_dir, c, f) for c in sorted(os.listdir(image_dir))
             for f in sorted(os.listdir(os.path.join(image_dir, c)))[:3]]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    host = np.stack([transforms.center_crop(im, 24, 0.875, "bicubic") for im in images]).astype(np.float32)
    ours = 255 * np.asarray(export.preprocess(images, size=24, crop_pct=0.875, interpolation="bicubic",
                                              mean=(0, 0, 0), std=(1, 1, 1)))
    assert ours.shape == host.shape
    assert np.mean(np.abs(ours - host)) < 0.5


def test_bad_input_gets_a_clear_error(trained, image_dir, tmp_path):
    workdir, overrides = trained
    base = ["--config", "configs/default.py", "--workdir", workdir]
    empty = cli(*base, "--mode", "predict", *flags({**overrides, "predict.inputs": str(tmp_path)}), check=False)
    assert empty.returncode == 2 and "no images" in empty.stderr
    unknown = cli(*base, "--mode", "export", *flags({**overrides, "export.format": "tflite"}), check=False)
    assert unknown.returncode == 2 and "stablehlo, onnx" in unknown.stderr
    platform = cli(*base, "--mode", "export", *flags({**overrides, "export.platforms": "cpu,tpu7"}), check=False)
    assert platform.returncode == 2 and "'tpu7'" in platform.stderr and "cpu, cuda, rocm, tpu" in platform.stderr
    other = cli(*base, "--mode", "export", *flags({**overrides, "model.kwargs.width": 16}), check=False)
    assert other.returncode == 2 and "error:" in other.stderr
    nothing = cli("--config", "configs/default.py", "--workdir", str(tmp_path / "none"), "--mode", "predict",
                  *flags({**overrides, "predict.inputs": image_dir}), check=False)
    assert nothing.returncode == 2 and "no checkpoint" in nothing.stderr


def test_gradcam_of_a_resnet_equals_cam_from_its_classifier_weights():
    """With global average pooling and a linear head, Grad-CAM's channel weights are the head's
    weights of the class (divided by H*W), so it must equal CAM computed independently from the
    `features_only` map and the `fc` kernel."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxvision import models
    from jaxvision.deploy import explain

    model = models.create("resnet18", num_classes=5, width=8)
    x = jax.random.uniform(jax.random.key(0), (3, 64, 64, 3))
    variables = nn.meta.unbox(model.init(jax.random.key(1), x))
    fc = variables["params"]["fc"]  # a trained-like head (the init is zeros)
    fc["kernel"] = jax.random.normal(jax.random.key(2), fc["kernel"].shape)
    index, path, shape = explain.target_layer(model, variables, (64, 64, 3))
    assert path == ("layer4",) and shape[1:] == (2, 2, 64)
    heat, cls, logits = explain.gradcam(model, variables, x, index)
    assert heat.shape == (3, 64, 64) and np.all((heat >= 0) & (heat <= 1))
    np.testing.assert_array_equal(cls, jnp.argmax(logits, -1))
    features = models.create("resnet18", width=8, features_only=True, out_indices=(4,)).apply(variables, x)[0]
    kernel = variables["params"]["fc"]["kernel"]
    cam = jax.nn.relu(jnp.einsum("bhwc,cb->bhw", features, kernel[:, cls]))
    cam = cam / jnp.max(cam, axis=(1, 2), keepdims=True)
    want = jax.image.resize(cam, (3, 64, 64), "bilinear")
    np.testing.assert_allclose(heat, np.clip(want, 0, 1), atol=1e-4)


def test_gradcam_finds_the_last_feature_map_of_other_families_and_refuses_vit():
    import jax
    import jax.numpy as jnp

    from jaxvision import models
    from jaxvision.deploy import explain
    from jaxvision.errors import UserError

    for name, size, want in [("convnext_tiny", 64, (2, 2, 768)), ("mobilenetv3_small_100", 64, (2, 2, 576))]:
        model = models.create(name, num_classes=3)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
        assert explain.target_layer(model, variables, (size, size, 3))[2][1:] == want
    vit = models.create("vit_tiny_patch16_224", num_classes=3)
    variables = jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    with pytest.raises(UserError, match="attention rollout"):
        explain.target_layer(vit, variables, (224, 224, 3))


def test_explain_mode_writes_overlays(trained, image_dir, tmp_path):
    workdir, overrides = trained
    cat = sorted(os.listdir(os.path.join(image_dir, "cat")))[0]
    (tmp_path / "cat.jpg").write_bytes(open(os.path.join(image_dir, "cat", cat), "rb").read())
    out = cli("--config", "configs/default.py", "--workdir", workdir, "--mode", "explain",
              *flags({**overrides, "predict.inputs": str(tmp_path)}))
    assert os.path.getsize(os.path.join(workdir, "explain", "cat.png")) > 5_000
    assert "wrote 1 heatmap overlays" in out.stdout and "Grad-CAM on layer4" in out.stdout


def _tiny_vit():
    import flax.linen as nn
    import jax

    from jaxvision import models

    model = models.create("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    return model, nn.meta.unbox(model.init(jax.random.key(1), x)), x


def test_attention_maps_are_the_vits_own_attention():
    """Recomputed from the intercepted qkv, the probabilities must reproduce each block's attention
    output (probabilities @ values, then the output projection) as the fused kernel computed it."""
    import jax.numpy as jnp

    from jaxvision.deploy import explain

    model, variables, x = _tiny_vit()
    maps, logits = explain.attention_maps(model, variables, x)
    _, inter = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17)  # 3 heads, class token + 16 patches
    np.testing.assert_allclose(np.sum(maps[1], -1), 1.0, atol=1e-5)
    for i, probs in enumerate(maps):
        attn = inter["intermediates"]["blocks"][str(i)]["attn"]
        qkv = attn["qkv"]["__call__"][0]
        proj = variables["params"]["blocks"][str(i)]["attn"]["proj"]
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, qkv[:, :, 2])
        out = jnp.einsum("bqhd,hde->bqe", out, proj["kernel"]) + proj["bias"]
        np.testing.assert_allclose(out, attn["__call__"][0], atol=1e-5)
    heat, cls, _ = explain.attention_rollout(model, variables, x)
    assert heat.shape == (2, 32, 32) and np.all((heat >= 0) & (heat <= 1)) and np.max(heat) == pytest.approx(1)
    np.testing.assert_array_equal(cls, np.argmax(logits, -1))


def test_rollout_follows_attention_to_the_attended_patch():
    from jaxvision.deploy import explain

    n = 1 + 4  # class token + a 2x2 grid
    uniform = np.full((1, 2, n, n), 1 / n)
    np.testing.assert_allclose(explain.rollout([uniform, uniform], 1, (2, 2)), np.ones((1, 2, 2)), atol=1e-6)
    to_patch = np.zeros((1, 1, n, n))
    to_patch[..., 1 + 2] = 1.0  # every token attends to patch (1, 0)
    heat = np.asarray(explain.rollout([to_patch, uniform], 1, (2, 2)))[0]
    assert heat[1, 0] == pytest.approx(1) and np.all(np.delete(heat.ravel(), 2) < 1)


def test_int8_quantization_and_its_export(trained, image_dir):
    """`--mode quantize` measures float32 and int8 on the validation split; the int8 export keeps
    int8 weights (a smaller artifact) and reproduces the in-process int8 model."""
    import jax

    pytest.importorskip("qwix", reason="the deploy extra is not installed")

    from jaxvision.deploy import modes

    workdir, overrides = trained
    cli("--config", "configs/default.py", "--workdir", workdir, "--mode", "quantize", *flags(overrides))
    result = json.load(open(os.path.join(workdir, "quantize.json")))
    from jaxvision.data.sources import FolderSource

    assert result["images"] == len(FolderSource(image_dir, "val", 0.3)) and 0 <= result["top1_int8"] <= 1
    assert result["agreement"] >= 0.9 and 0.25 < result["size_ratio"] < 0.35
    cli("--config", "configs/default.py", "--workdir", workdir, "--mode", "export",
        *flags({**overrides, "export.quantize": "int8"}))
    out = os.path.join(workdir, "export")
    assert json.load(open(os.path.join(out, "model_int8.json")))["quantization"] == "int8"
    float_bytes = result["weights_mib_float32"] * 2 ** 20  # what a float32 artifact carries at least
    assert os.path.getsize(os.path.join(out, "model_int8.stablehlo")) < 0.5 * float_bytes

    config = configure(load_config("default"), overrides)
    t = trained_lib.load(config, workdir, evaluate=True)
    s, variables, _ = t.setup, t.variables, t.shardings
    apply, qvariables = modes._quantized(s, variables, "int8")
    images = np.stack([s.eval_source[i]["image"] for i in range(5)])
    meta = dict(size=28, crop_pct=0.875, interpolation=s.config.data.interpolation or s.card.interpolation,
                mean=s.card.mean, std=s.card.std)
    want = np.asarray(jax.jit(export.serving_fn(apply, qvariables, **meta))(images))
    got = np.asarray(export.load(os.path.join(out, "model_int8.stablehlo"))(images))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    floats = np.asarray(jax.jit(export.serving_fn(modes._float_apply(s), jax.device_get(variables), **meta))(images))
    assert 0 < np.max(np.abs(got - floats)) < 0.1 * np.max(np.abs(floats))  # quantized, and close


def test_missing_packages_and_bad_types_name_the_fix(monkeypatch):
    import importlib.util
    import sys

    from jaxvision.deploy import quantize
    from jaxvision.errors import UserError

    with pytest.raises(UserError, match="int8"):
        quantize.quantize(None, {}, (8, 8, 3), "int3")
    monkeypatch.setitem(sys.modules, "qwix", None)
    with pytest.raises(UserError, match=r"jaxvision\[deploy\]"):
        quantize.quantize(None, {}, (8, 8, 3))
    with pytest.raises(UserError, match="export.format=stablehlo"):
        export.check_format("onnx", "int8")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"jax2onnx and onnxruntime, not installed: pip install 'jaxvision\[deploy\]'"):
        export.check_format("onnx")
