"""Parity with timm: convert a randomly initialised timm model and compare logits.

Skipped only where torch/timm are not installed (the `parity` extra); CI installs them."""

import functools
import json

import flax

import jax
import numpy as np
import pytest

from jaxvision import models
from jaxvision.models import convert

torch = pytest.importorskip("torch", reason="parity tests need the `parity` extra (torch, timm)")
timm = pytest.importorskip("timm", reason="parity tests need the `parity` extra (torch, timm)")

PARITY_MODELS = ["resnet50", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100",
                 "mobilenetv2_100", "vit_small_patch16_224", "deit_tiny_distilled_patch16_224",
                 "resnext50_32x4d", "resnet50d", "tf_efficientnetv2_s", "tf_efficientnet_lite0",
                 "convnext_tiny", "vgg16_bn", "inception_v3", "swin_tiny_patch4_window7_224"]
# Input sizes for the parity run: small where the architecture allows it (VGG-16-BN's 64x64
# convolutions at 64 px go through Winograd's algorithm on CPU).
PARITY_SIZE = {"inception_v3": 107, "swin_tiny_patch4_window7_224": 224, "resnet50d": 65}


def _timm_model(name: str, **kwargs):
    """A timm model in eval mode with randomised BatchNorm statistics, norm affine parameters and
    layer scales, so that a mistake in mapping any of them shows in the logits. The ranges keep
    activations bounded: with statistics that inflate every layer, a 40-block network amplifies
    float32 rounding until the comparison measures chaos rather than the mapping."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(1.0, 2.0)
            m.weight.data.uniform_(0.5, 1.0)
            m.bias.data.normal_(0.0, 0.1)
        if isinstance(getattr(m, "gamma", None), torch.nn.Parameter):
            m.gamma.data.uniform_(0.3, 0.7)
    return model


def _logits(name, variables, images_nchw, **kwargs):
    model = models.create(name, **kwargs)
    apply = jax.jit(functools.partial(model.apply, train=False))
    return np.asarray(apply(variables, images_nchw.transpose(0, 2, 3, 1)))


def _assert_parity(ours, ref):
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, f"max |diff| / max |ref| = {rel:.2e}"


@pytest.mark.parity
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_logits_match_timm(name):
    kwargs = {"img_size": 64} if name.startswith(("vit", "deit")) else {}
    ref_model = _timm_model(name, **kwargs)
    size = PARITY_SIZE.get(name, 64)
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    variables = convert.from_torch(name, ref_model.state_dict(), **kwargs)
    _assert_parity(_logits(name, variables, x, **kwargs), ref)


@pytest.mark.parity
@pytest.mark.parity
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_scanned_blocks_convert_and_match_timm(name):
    """`from_torch(..., scan_blocks=True)` gives the stacked layout of `create(..., scan_blocks=True)`."""
    kwargs = {"img_size": 64, "scan_blocks": True}
    ref_model = _timm_model(name, img_size=64)
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    variables = convert.from_torch(name, ref_model.state_dict(), **kwargs)
    assert variables["params"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == len(ref_model.blocks)
    _assert_parity(_logits(name, variables, x, **kwargs), ref)


def test_num_classes_is_read_from_the_checkpoint_and_pos_embed_resampled():
    ref_model = _timm_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    variables = convert.from_torch("vit_tiny_patch16_224", ref_model.state_dict(), img_size=64)
    assert variables["params"]["head"]["kernel"].shape == (192, 10)
    assert variables["params"]["pos_embed"].shape == (1, 1 + 16, 192)  # 2x2 grid -> 4x4 grid


@pytest.mark.parity
def test_checkpoint_of_another_model_is_rejected_with_the_keys_named():
    state = _timm_model("resnet18").state_dict()
    with pytest.raises(convert.ConversionError) as err:
        convert.from_torch("resnet50", state)
    message = str(err.value)
    assert "is it a resnet50 checkpoint" in message
    assert "missing (165)" in message and "layer1.0.bn3." in message
    assert "wrong shape" in message and "layer1.0.conv1.weight" in message


@pytest.mark.parity
def test_pth_reader_needs_no_torch_and_matches_torch_load(tmp_path):
    state = _timm_model("mobilenetv3_small_100").state_dict()
    state["half"] = torch.arange(6, dtype=torch.float16).reshape(2, 3).t()  # non-contiguous
    state["bf16"] = torch.ones(3, dtype=torch.bfloat16)
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pth")
    loaded = convert.load_state_dict(str(tmp_path / "ckpt.pth"))
    assert set(loaded) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(loaded[k], dtype=np.float32), v.float().numpy())


@pytest.mark.parity
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_command_line_writes_weights_the_trainer_can_load(tmp_path, suffix):
    import orbax.checkpoint as ocp

    ref_model = _timm_model("resnet18", num_classes=5)
    path = str(tmp_path / f"r18{suffix}")
    if suffix == ".pth":
        torch.save(ref_model.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(ref_model.state_dict(), path)
    out = tmp_path / "converted"
    name = "resnet18" if suffix == ".pth" else "resnet18.a1_in1k"  # a tag brings its preprocessing
    assert convert.main(["--model", name, "--checkpoint", path, "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert {k: meta[k] for k in ("model", "num_classes", "params", "source")} == {
        "model": "resnet18", "num_classes": 5, "params": 11_179_077, "source": path}
    assert meta["preprocessing"] == {"input_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                     **({"crop_pct": 0.875, "interpolation": "bilinear"} if suffix == ".pth"
                                        else {"crop_pct": 0.95, "interpolation": "bicubic"})}
    variables = ocp.StandardCheckpointer().restore(str(out / "variables"))
    x = np.random.RandomState(1).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    _assert_parity(_logits("resnet18", variables, x, num_classes=5), ref)
    # A second run must not overwrite what the first wrote.
    assert convert.main(["--model", "resnet18", "--checkpoint", path, "--out", str(out)]) == 2


@pytest.mark.parity
def test_trainer_fine_tunes_from_converted_timm_weights(tmp_path):
    """timm weights -> converter command -> `config.init_from`: backbone loaded, new head."""
    import orbax.checkpoint as ocp
    from tests.test_engine import tiny
    from jaxvision.train import loop

    path = str(tmp_path / "r18.pth")
    torch.save(_timm_model("resnet18", num_classes=5).state_dict(), path)
    assert convert.main(["--model", "resnet18", "--checkpoint", path, "--out", str(tmp_path / "w")]) == 0
    config = tiny(num_steps=1, init_from=str(tmp_path / "w"), **{"model.kwargs": {}, "data.image_size": 32,
                                                                  "optim.trainable": "^fc/"})
    loop.train(config, str(tmp_path / "run"))
    manager = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"), item_names=("state", "data"))
    state = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    converted = ocp.StandardCheckpointer().restore(str(tmp_path / "w" / "variables"))
    np.testing.assert_array_equal(state["params"]["layer4"]["1"]["conv2"]["kernel"],
                                  converted["params"]["layer4"]["1"]["conv2"]["kernel"])
    assert state["params"]["fc"]["kernel"].shape == (512, 10)


@pytest.mark.parity
@pytest.mark.parametrize("name, size", [("resnet50", 64), ("convnext_tiny", 64),
                                        ("swin_tiny_patch4_window7_224", 224)])
def test_features_only_match_timm(name, size):
    ref_model = _timm_model(name)
    variables = convert.from_torch(name, ref_model.state_dict())
    x = np.random.RandomState(0).randn(1, 3, size, size).astype(np.float32)
    with torch.no_grad():  # what timm's features_only wrapper returns, from the same weights
        want = [f.numpy().transpose(0, 2, 3, 1) for f in ref_model.forward_intermediates(
            torch.from_numpy(x), intermediates_only=True)]  # NCHW -> our NHWC
    model = models.create(name, features_only=True)
    got = jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.shape == w.shape
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-4


LAYER_DECAY_MODELS = ["resnet50", "resnext50_32x4d", "resnet50d", "efficientnet_b0", "mobilenetv2_100",
                      "mobilenetv3_large_100", "tf_efficientnetv2_s", "tf_efficientnet_lite0",
                      "vit_small_patch16_224", "deit_tiny_distilled_patch16_224", "convnext_tiny",
                      "swin_tiny_patch4_window7_224", "vgg16_bn", "inception_v3"]


@pytest.mark.parity
@pytest.mark.parametrize("name", LAYER_DECAY_MODELS)
def test_layer_ids_equal_timms_grouping_parameter_by_parameter(name):
    from timm.models._manipulate import group_parameters
    from jaxvision.train import optim

    ref_model = timm.create_model(name, pretrained=False)
    want = group_parameters(ref_model, ref_model.group_matcher(coarse=False), reverse=True)
    params = models.init_shapes(models.create(name), 32)["params"]
    ids = flax.traverse_util.flatten_dict(optim.layer_ids(name, params))
    got = {convert._torch_key("params", path): i for path, i in ids.items()}
    assert got == {k: v for k, v in want.items() if k in got}
    assert set(got) == set(want)
