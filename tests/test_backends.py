"""The backend seam (`jaxvision.models.ops`, `jaxvision.backends`): what a TPU or GPU user runs is
chosen for the platform it is lowered for, never by the CPU host that traced it.

Every family's train step (MixUp/CutMix on, a data x fsdp x tensor mesh of 8 devices) and eval
step are lowered from this CPU host for tpu and cuda with default settings: no jaxvision custom
call, and exactly the model's convolutions as `stablehlo.convolution`, which the CPU backend's
rewrites would have replaced. The ops are a static part of the model that jit keys on; the
default export runs on cpu, cuda and tpu; the plan lowers for a pod from here."""

import ast
import functools
import os
import re
import subprocess
import sys
import tomllib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision import backends, models
from jaxvision.backends.cpu import native
from jaxvision.backends.cpu.ops import CpuOps
from jaxvision.deploy import export
from jaxvision.errors import UserError
from jaxvision.models.ops import PORTABLE, Ops
from jaxvision.train import loop
from tests.test_engine import ROOT, configure, load_config

# One model per family, small inputs: (name, image size, model kwargs).
FAMILIES = [
    ("resnet50", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("mobilenetv3_small_100", 64, {}),
    ("vit_tiny_patch16_224", 32, {"img_size": 32}),
    ("deit_tiny_distilled_patch16_224", 32, {"img_size": 32}),
    ("convnext_tiny", 64, {}),
    ("swin_tiny_patch4_window7_224", 56, {}),
    ("vgg16_bn", 32, {}),
    ("googlenet", 75, {}),  # the classic family: ceil-mode pooling at odd sizes
    ("inception_v3", 75, {}),
    ("speednet", 32, {}),
]


def family_config(name: str, size: int, kwargs: dict):
    return configure(load_config("default"), {
        "model.name": name, "model.kwargs": kwargs, "model.num_classes": 10, "data.image_size": size,
        "batch_size": 8, "mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_min_size": 1024,
        "mix.mixup_alpha": 0.8, "mix.cutmix_alpha": 1.0})


def conv_layers(model, size: int) -> int:
    """How many convolution layers the model calls (flax Conv modules), counted while tracing."""
    calls = []

    def count(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            calls.append(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return len(set(calls))


def convolutions(stablehlo: str) -> int:
    """The convolution ops of a StableHLO module's text (not its location strings)."""
    return len(re.findall(r"= stablehlo\.convolution\(", stablehlo))


def lowered_steps(config, platform: str):
    """(train step, eval step) of the trainer, lowered for `platform` from this host."""
    s = loop.setup(config, train=False, evaluate=False, platform=platform)
    tx = s.optimizer(10)
    _, shapes, shardings = s.abstract_state(tx)
    b, size = config.batch_size, s.image_size
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    train = loop.jit_train_step(s, tx, shapes, shardings).trace(shapes, batch, None)
    evaluate = loop.jit_eval_step(s, shardings.variables()).trace(
        {"params": shapes.params, "batch_stats": shapes.batch_stats},
        {**batch, "mask": jax.ShapeDtypeStruct((b,), jnp.float32)})
    return s, [t.lower(lowering_platforms=(platform,)).as_text() for t in (train, evaluate)]


@pytest.mark.parametrize("name,size,kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_train_and_eval_steps_lower_for_accelerators_with_only_portable_ops(name, size, kwargs, platform):
    s, (train, evaluate) = lowered_steps(family_config(name, size, kwargs), platform)
    assert not isinstance(s.model.ops, CpuOps)
    n = conv_layers(s.model, size)
    assert n > 0
    for text in (train, evaluate):
        assert "jaxvision_" not in text
    assert convolutions(evaluate) == n
    # forward, kernel gradient, and input gradient of all but the convolution of the image itself
    assert convolutions(train) == 3 * n - 1
    if name.startswith(("vit", "deit", "swin", "convnext")):  # activations laid out on the mesh per block
        assert len(re.findall(r'sharding_constraint .*\{"tensor"\}\]>', train)) >= 10


@pytest.mark.skipif(not native.installed(), reason="the cpu extra is not installed")
def test_the_same_steps_lowered_for_this_cpu_host_use_the_cpu_backend():
    """The contrast that makes the test above meaningful: on CPU (8 devices: no oneDNN calls, which
    XLA would not partition) the rewrites replace most convolutions."""
    config = family_config("resnet50", 64, {})
    s, (train, _) = lowered_steps(config, "cpu")
    assert isinstance(s.model.ops, CpuOps) and not s.model.ops.native
    assert loop.setup(config, train=False, evaluate=False).model.ops == s.model.ops
    assert convolutions(train) < conv_layers(s.model, 64)


def test_ops_are_static_and_part_of_what_jit_keys_on():
    """The same jitted function with models that differ only in their ops traces each afresh."""
    x = jnp.zeros((2, 32, 32, 3))
    apply = jax.jit(lambda model, v, x: model.apply(v, x), static_argnums=0)
    portable = models.create("resnet18", num_classes=3, width=8)
    cpu = portable.clone(ops=CpuOps(native=False))
    assert portable.ops == PORTABLE and hash(cpu) != hash(portable) and cpu != portable
    variables = portable.init(jax.random.key(0), x)
    first = apply.lower(portable, variables, x).as_text()
    second = apply.lower(cpu, variables, x).as_text()
    assert convolutions(first) == conv_layers(portable, 32)
    assert convolutions(second) < convolutions(first)
    np.testing.assert_allclose(apply(cpu, variables, x), apply(portable, variables, x), atol=1e-5)


def test_backend_choice_and_its_errors():
    assert backends.ops_for("tpu") == PORTABLE and backends.ops_for("rocm") == PORTABLE
    assert backends.ops_for("cuda") == Ops(cudnn_attention=True)
    assert backends.ops_for("cuda", "portable") == PORTABLE
    with pytest.raises(UserError, match="cpu, cuda, rocm, tpu.*'gpu'"):
        backends.ops_for("gpu")
    with pytest.raises(UserError, match="config.backend must be one of auto, portable, cpu"):
        backends.ops_for("cpu", "onednn")
    with pytest.raises(UserError, match="backend=cpu compiles for CPU only"):
        backends.ops_for("tpu", "cpu")
    assert backends.platform_of(jax.devices()) == "cpu"


def test_cudnn_attention_falls_back_to_xla_where_cudnn_cannot_be_traced():
    """Lowering a bfloat16 ViT for cuda on this host: cuDNN is absent, so XLA's attention, said once."""
    qkv = jax.random.normal(jax.random.key(0), (2, 5, 3, 2, 8)).astype(jnp.bfloat16)
    got = Ops(cudnn_attention=True).attention(qkv)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(PORTABLE.attention(qkv), np.float32))


def test_model_files_read_as_plain_flax():
    """The zoo's model files import jax, flax, numpy, the standard library and the zoo's own
    modules, nothing platform-specific."""
    libraries = {"jax", "flax", "numpy", "__future__", "functools", "math", "typing", "dataclasses", "re"}
    for name in ("resnet", "efficientnet", "mobilenet", "vit", "convnext", "swin", "vgg", "inception", "classic",
                 "layers"):
        tree = ast.parse(open(os.path.join(ROOT, "jaxvision", "models", f"{name}.py")).read())
        imported = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        other = [m for m in imported if m.split(".")[0] not in libraries
                 and not m.startswith("jaxvision.models") and m != "jaxvision.errors"]
        assert not other, (name, other)


def test_the_base_install_has_no_cpu_libraries():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    heavy = ("onednn", "mkl", "tbb", "intel")
    assert not [d for d in project["dependencies"] if d.lower().startswith(heavy)]
    assert {d.split("=")[0].split(">")[0] for d in project["optional-dependencies"]["cpu"]} >= {
        "onednn-cpu-gomp", "onednn-devel-cpu-gomp", "mkl", "tbb"}


@functools.cache
def _resnet():
    model = models.create("resnet18", num_classes=3, width=8, ops=CpuOps(native=False))
    return model, model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def _serve(model, variables):
    return export.serving_fn(lambda v, x: model.apply(v, x), variables, size=16, crop_pct=1.0,
                             interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)


def test_default_export_runs_everywhere_and_matches_the_model_here():
    model, variables = _resnet()
    platforms = export.check_platforms(load_config("default").export.platforms, "stablehlo")
    assert platforms == ("cpu", "cuda", "tpu")
    ops = export.export_ops("stablehlo")
    assert ops == PORTABLE
    serve = _serve(model.clone(ops=ops), variables)
    artifact = export.export_stablehlo(serve, (16, 16), platforms)
    exported = jax.export.deserialize(bytearray(artifact))
    assert exported.platforms == platforms and b"jaxvision_" not in artifact
    tpu_only = jax.export.deserialize(bytearray(export.export_stablehlo(serve, (16, 16), ("tpu",))))
    assert convolutions(tpu_only.mlir_module()) == conv_layers(model, 16)
    images = np.random.RandomState(0).randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    want = jax.jit(_serve(model, variables))(images)  # the in-process model, on the CPU backend
    np.testing.assert_allclose(exported.call(images), want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_a_cpu_only_export_with_the_rewrites_is_explicit_and_has_no_native_calls():
    model, variables = _resnet()
    with pytest.raises(UserError, match="export.platforms=cpu"):
        export.check_platforms("cpu,tpu", "stablehlo", cpu_rewrites=True)
    with pytest.raises(UserError, match="cpu, cuda, rocm, tpu.*'tpu7'"):
        export.check_platforms("cpu,tpu7", "stablehlo")
    ops = export.export_ops("stablehlo", cpu_rewrites=True)
    assert ops == CpuOps(native=False)
    artifact = export.export_stablehlo(_serve(model.clone(ops=ops), variables), (16, 16), ("cpu",))
    exported = jax.export.deserialize(bytearray(artifact))
    assert exported.platforms == ("cpu",) and b"jaxvision_" not in artifact
    assert convolutions(exported.mlir_module()) < conv_layers(model, 16)


def test_plan_lowers_for_a_tpu_pod_from_this_host(tmp_path):
    config = configure(load_config("imagenet_vit_s16"), {
        "data.image_size": 64, "model.kwargs.img_size": 64, "batch_size": 64, "model.num_classes": 10,
        "plan.platform": "tpu", "plan.devices": 32, "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
    text = loop.plan(config, str(tmp_path))
    path = tmp_path / "plan_tpu.stablehlo.mlir"
    hlo = path.read_text()
    assert "mhlo.num_partitions = 32" in hlo and "jaxvision_" not in hlo and convolutions(hlo) > 0
    assert "plan for tpu (portable" in text and "'fsdp': 32" in text and "not compiled" in text
    gflops = float(re.search(r"([0-9.]+) GFLOP per step", text).group(1))
    assert gflops > 0 and "optimizer state" in text and str(path) in text
    out = subprocess.run([sys.executable, "-m", "jaxvision.main", "--config", "configs/imagenet_vit_s16.py",
                          "--mode", "plan", "--config.plan.platform=tpu", "--config.plan.devices=8",
                          "--config.data.image_size=32", "--config.model.kwargs.img_size=32",
                          "--config.model.kwargs.scan_blocks=True", "--config.batch_size=16",
                          "--config.model.num_classes=10"], capture_output=True, text=True, cwd=ROOT)
    # model keyword arguments the recipe does not list pass through to models.create
    assert out.returncode == 0 and "20 arrays" in out.stdout and "undercounted" in out.stdout, out.stderr
    config.plan.platform = "tpu7"
    with pytest.raises(UserError, match="config.plan.platform must be one of cpu, cuda, rocm, tpu"):
        loop.plan(config)
