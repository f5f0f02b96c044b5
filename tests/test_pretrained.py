"""`models.create("arch.tag", pretrained=True)` and `--config.model.pretrained`: weights through a
Hugging Face cache these tests build from randomly initialised timm models (offline: nothing here
reaches the network), checked against timm's logits, with each tag's own preprocessing."""

import json
import os

import huggingface_hub
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxvision import models
from jaxvision.models import pretrained
from jaxvision.train import loop
from tests.test_engine import cli, configure, load_config

torch = pytest.importorskip("torch", reason="pretrained tests need the `parity` extra (torch, timm)")
timm = pytest.importorskip("timm", reason="pretrained tests need the `parity` extra (torch, timm)")
from safetensors.torch import save_file  # noqa: E402  (parity extra)
from tests.test_convert import _assert_parity, _timm_model  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# One tag per family, small members; ra4/augreg tags normalise with mean = std = 0.5.
TAGS = {"resnet18.a1_in1k": 64, "efficientnet_b0.ra4_e3600_r224_in1k": 64, "mobilenetv3_small_100.lamb_in1k": 64,
        "vit_tiny_patch16_224.augreg_in21k_ft_in1k": 64, "deit_tiny_distilled_patch16_224.fb_in1k": 64,
        "convnext_tiny.fb_in1k": 64, "swin_tiny_patch4_window7_224.ms_in1k": 224, "inception_v3.tv_in1k": 107,
        "vgg16.tv_in1k": 32}


def publish(cache, tag: str, model) -> None:
    """`model`'s weights where huggingface_hub finds timm/<tag>'s model.safetensors offline."""
    repo = cache / f"models--timm--{tag}"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, repo / "snapshots" / COMMIT / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline, empty Hugging Face cache and jaxvision cache, for this test only."""
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("JAXVISION_CACHE", str(tmp_path / "jv"))
    return cache


@pytest.mark.parity
@pytest.mark.parametrize("tag", list(TAGS))
def test_pretrained_weights_give_timms_logits(tag, hub):
    arch, size = tag.split(".")[0], TAGS[tag]
    kwargs = {"img_size": size} if arch.startswith(("vit", "deit")) else {}  # smaller, quicker
    ref_model = _timm_model(arch, **kwargs)
    publish(hub, tag, ref_model)
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
    model, variables = models.create(tag, pretrained=True, **kwargs)
    _assert_parity(np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))), ref)
    card = models.model_card(tag, feature_info=False)
    cfg = timm.models.get_pretrained_cfg(tag)
    assert (card.mean, card.std, card.crop_pct, card.interpolation) == (cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation)


def test_a_new_head_features_only_and_the_cache(hub, tmp_path):
    publish(hub, "resnet18.a1_in1k", _timm_model("resnet18"))
    model, variables = models.create("resnet18.a1_in1k", pretrained=True, num_classes=7)
    assert variables["params"]["fc"]["kernel"].shape == (512, 7)  # reset, as timm's reset_classifier
    folder = pretrained.weights_dir("resnet18.a1_in1k")
    meta = json.loads(open(os.path.join(folder, "model.json")).read())
    assert meta["model"] == "resnet18" and meta["preprocessing"]["crop_pct"] == 0.95
    converted = models.create("resnet18", pretrained=folder)[1]  # the converted folder itself
    np.testing.assert_array_equal(variables["params"]["layer1"]["0"]["conv1"]["kernel"],
                                  converted["params"]["layer1"]["0"]["conv1"]["kernel"])
    mtime = os.path.getmtime(os.path.join(folder, "model.json"))
    features, fvars = models.create("resnet18", pretrained="resnet18.a1_in1k", features_only=True)
    assert os.path.getmtime(os.path.join(folder, "model.json")) == mtime  # converted once
    maps = features.apply(fvars, np.zeros((1, 64, 64, 3), np.float32))
    assert [m.shape[-1] for m in maps] == [64, 64, 128, 256, 512] and "fc" not in fvars["params"]
    nnx_model = models.create("resnet18.a1_in1k", api="nnx", pretrained=True)  # into Flax NNX too
    linen, linen_vars = models.create("resnet18.a1_in1k", pretrained=True)
    x = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    np.testing.assert_allclose(nnx_model(x), linen.apply(linen_vars, x), rtol=1e-5, atol=1e-5)
    local = tmp_path / "mine.safetensors"  # a local file works too
    save_file({k: v.contiguous() for k, v in _timm_model("resnet18").state_dict().items()}, local)
    assert "fc" in models.create("resnet18", pretrained=str(local))[1]["params"]


def test_unknown_tags_and_an_empty_offline_cache_are_one_clear_line(hub):
    with pytest.raises(pretrained.PretrainedError, match="the tags for resnet18 are: a1_in1k, a2_in1k"):
        models.create("resnet18.nope", pretrained=True)
    with pytest.raises(pretrained.PretrainedError, match=f"not in the Hugging Face cache {hub}"):
        models.create("resnet34.a1_in1k", pretrained=True)
    config = configure(load_config("default"), {"model.name": "resnet18", "model.pretrained": "resnet50.a1_in1k"})
    with pytest.raises(Exception, match="config.model.pretrained must be weights of resnet18"):
        loop.train(config, "/nonexistent/never-made")


@pytest.mark.parity
def test_fine_tuning_from_a_tag_uses_its_preprocessing_in_training_eval_and_export(hub, tmp_path):
    """ViT-Ti's augreg weights are normalised with mean = std = 0.5, not ImageNet's statistics."""
    tag = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    publish(hub, tag, _timm_model("vit_tiny_patch16_224"))
    args = ["--config", "configs/default.py:vit", "--workdir", str(tmp_path / "run"),
            f"--config.model.pretrained={tag}", "--config.model.kwargs.patch_size=16",
            "--config.model.kwargs.num_heads=3", "--config.model.kwargs.img_size=32",
            "--config.data.image_size=32", "--config.num_steps=2", "--config.batch_size=16",
            "--config.optim.trainable=^head/"]
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "JAXVISION_CACHE": str(tmp_path / "jv")}
    os.environ.update(env)  # for the command-line runs (cli passes os.environ on)
    try:
        cli(*args)
        cli(*args, "--mode", "export", "--config.export.platforms=cpu")
    finally:
        for k in env:
            os.environ.pop(k)
    manager = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"), item_names=("state", "data"))
    state = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    converted = ocp.StandardCheckpointer().restore(os.path.join(pretrained.weights_dir(tag), "variables"))
    np.testing.assert_array_equal(state["params"]["blocks"]["11"]["mlp"]["fc2"]["kernel"],
                                  converted["params"]["blocks"]["11"]["mlp"]["fc2"]["kernel"])
    assert state["params"]["head"]["kernel"].shape == (192, 10)  # the digits' classes
    meta = json.loads((tmp_path / "run" / "export" / "model.json").read_text())
    assert meta["preprocessing"]["mean"] == [0.5] * 3 and meta["preprocessing"]["std"] == [0.5] * 3
    config = configure(load_config("default", "vit"), {"model.pretrained": tag, "model.num_classes": 10})
    s = loop.setup(config, train=False, evaluate=False)
    assert s.card.mean == (0.5,) * 3 and s.card.crop_pct == 0.9  # what the train and eval steps use
