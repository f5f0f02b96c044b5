"""oneDNN's kernels (`jaxvision.backends.cpu.native`) compute what XLA computes, values and
gradients, for the convolutions, dense layers, LayerNorms and attention the zoo uses; a CPU run
on one device uses them and says so; a missing oneDNN is a clear message. Skipped where oneDNN
cannot be built (the `cpu` extra installs it on x86-64 Linux; .ci/run checks that it builds)."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxvision import backends, models
from jaxvision.backends.cpu import attention, conv, layers, native, onednn as ops
from jaxvision.backends.cpu.ops import CpuOps
from jaxvision.models.ops import PORTABLE
from tests.test_cpu_rewrites import DENSE_CASES, dense_results

try:
    native.library()
    REASON = None
except native.Unavailable as e:
    REASON = str(e).splitlines()[0]
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"oneDNN kernels unavailable: {REASON}")

CASES = [  # (size, channels in, channels out, kernel, stride, groups, padding, dilation)
    (9, 8, 16, 3, 1, 1, "SAME", 1),
    (10, 8, 16, 3, 2, 1, ((1, 1), (1, 1)), 1),  # ResNet downsampling
    (11, 3, 8, 7, 2, 1, ((3, 3), (3, 3)), 1),  # ResNet stem
    (11, 3, 8, 3, 2, 1, "SAME", 1),  # TensorFlow's asymmetric padding
    (10, 16, 8, 1, 1, 1, "VALID", 1),  # pointwise
    (9, 8, 16, 1, 2, 1, "VALID", 1),  # strided pointwise (ResNet shortcut)
    (9, 8, 8, 3, 1, 8, "SAME", 1),  # depthwise
    (11, 8, 8, 5, 2, 8, ((2, 2), (2, 2)), 1),  # depthwise 5x5, stride 2
    (9, 8, 12, 3, 1, 4, "SAME", 2),  # grouped, dilated
    (2, 8, 16, 3, 1, 1, ((1, 1), (1, 1)), 1),  # tiny map, taps that see only padding
    (8, 3, 16, 4, 4, 1, "VALID", 1),  # a patch embedding: stays `conv.patch_matmul`
]


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))  # both zero: 0


def hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("size,cin,cout,k,stride,groups,padding,dilation", CASES)
def test_convolution_matches_lax(size, cin, cout, k, stride, groups, padding, dilation):
    x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout))
    kw = dict(dimension_numbers=conv.NHWC, feature_group_count=groups, rhs_dilation=(dilation, dilation))
    native_conv = functools.partial(conv.conv_general_dilated, native=True)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, (stride, stride), padding, **kw)))

    ours = jax.jit(lambda x, w: native_conv(x, w, (stride, stride), padding, **kw))(x, w)
    grads = jax.jit(jax.grad(loss(native_conv), (0, 1)))(x, w)
    ref = lax.conv_general_dilated(x, w, (stride, stride), padding, **kw)
    assert ours.shape == ref.shape and rel(ours, ref) < 1e-5
    for g, g_ref in zip(grads, jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)):
        assert rel(g, g_ref) < 1e-5
    text = hlo(lambda x, w: native_conv(x, w, (stride, stride), padding, **kw), x, w)
    patch_embedding = k == stride > 1 and padding == "VALID"
    assert ("jaxvision_conv_fwd" in text) != patch_embedding


def test_bfloat16_convolution_accumulates_in_float32():
    x = jax.random.normal(jax.random.key(0), (4, 12, 12, 16))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
    pads = ((1, 1), (1, 1))
    ref = lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=conv.NHWC)
    half = jax.jit(lambda x, w: ops.conv(x, w, (1, 1), pads))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16 and rel(half, ref) < 1e-2
    dw = jax.grad(lambda w: jnp.sum(ops.conv(x.astype(jnp.bfloat16), w, (1, 1), pads).astype(jnp.float32) ** 2))(
        w.astype(jnp.bfloat16))
    dw_ref = jax.grad(lambda w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=conv.NHWC)
                                        ** 2))(w)
    assert dw.dtype == jnp.bfloat16 and rel(dw, dw_ref) < 2e-2


def test_bfloat16_depthwise_gradients_run_on_the_float32_kernels():
    """oneDNN 3.2 has float32 depthwise gradient kernels but sends bfloat16 to its generic grouped
    ones (2.5-9x slower), so a bfloat16 depthwise layer's gradients are the float32 kernels' on the
    converted operands, rounded to bfloat16 once; the forward stays bfloat16."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 11, 8)).astype(jnp.bfloat16)
    w = (0.3 * jax.random.normal(jax.random.key(1), (5, 5, 1, 8))).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), (2, 6, 6, 8)).astype(jnp.bfloat16)
    attrs = ((2, 2), ((2, 2), (2, 2)), (1, 1), 8)
    grads = lambda x, w, dy: jax.vjp(lambda x, w: ops.conv(x, w, *attrs), x, w)[1](dy)  # noqa: E731
    half = jax.jit(grads)(x, w, dy)
    full = jax.jit(grads)(*(a.astype(jnp.float32) for a in (x, w, dy)))
    for h, f in zip(half, full):
        assert h.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(f.astype(jnp.bfloat16), np.float32))
    text = hlo(grads, x, w, dy)
    calls = [line for line in text.splitlines() if "custom_call @jaxvision_conv" in line]
    assert len(calls) == 2 and all("bf16" not in line and "xf32>" in line for line in calls), calls


@pytest.mark.parametrize("shape,axis,features", DENSE_CASES)
def test_dense_matches_lax(shape, axis, features):
    (got, got_grads), (ref, ref_grads) = dense_results(shape, axis, features, native=True)
    layer = nn.DenseGeneral(features, axis=axis, dot_general=functools.partial(conv.dot_general, native=True))
    x = jnp.zeros(shape)
    assert "jaxvision_matmul" in hlo(layer.apply, layer.init(jax.random.key(1), x), x)
    assert rel(got, ref) < 1e-6
    for g, g_ref in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        assert rel(g, g_ref) < 1e-5


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_matmul_reads_either_operand_transposed(batch, transpose_a, transpose_b, dtype, tolerance):
    """Row blocks of one matrix as well as batches (bfloat16 ones described as dense for AMX)."""
    a = jax.random.normal(jax.random.key(0), batch + ((7, 5) if transpose_a else (5, 7))).astype(dtype)
    b = jax.random.normal(jax.random.key(1), batch + ((9, 7) if transpose_b else (7, 9))).astype(dtype)
    swap = lambda t, yes: (jnp.swapaxes(t, -1, -2) if yes else t).astype(jnp.float32)  # noqa: E731
    got = jax.jit(lambda a, b: ops.matmul(a, b, transpose_a, transpose_b))(a, b)
    want = swap(a, transpose_a) @ swap(b, transpose_b)
    assert got.shape == batch + (5, 9) and got.dtype == dtype and rel(got, want) < tolerance


def _matmul_cases():
    """Every transposition of a 2-D and a batched product on the kernels, against numpy."""
    rng = np.random.RandomState(0)
    for batch in ((), (3,)):
        for ta in (False, True):
            for tb in (False, True):
                a, b = rng.randn(*batch, 5, 7).astype(np.float32), rng.randn(*batch, 7, 9).astype(np.float32)
                stored_a, stored_b = (np.swapaxes(a, -1, -2) if ta else a), (np.swapaxes(b, -1, -2) if tb else b)
                yield rel(jax.jit(lambda x, y: ops.matmul(x, y, ta, tb))(stored_a, stored_b), a @ b)


def test_float32_products_run_on_mkl_on_intel_cpus_unless_overridden():
    """With MKL installed (jaxvision's dependency on x86-64 Linux) float32 products run on its sgemm
    on Intel CPUs and on oneDNN's elsewhere (faster there), and say so; JAXVISION_MKL=1 or 0
    overrides the vendor, and both kernels must agree with numpy."""
    if native._find_mkl(native._onednn_roots()) is None:
        pytest.skip("MKL is not installed")
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    script = ("from tests.test_cpu_native import _matmul_cases, native; "
              "print(native.info(), max(_matmul_cases()))")
    for setting, mkl in (("", intel), ("1", True), ("0", False)):
        env = {**os.environ, "JAXVISION_MKL": setting, "JAX_NUM_CPU_DEVICES": "1"}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
        info, worst = out.strip().rsplit(" ", 1)
        assert info.startswith("oneDNN") and ("float32 products on MKL 20" in info) == mkl, (setting, info)
        assert float(worst) < 1e-5


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_vit_attention_products_on_onednn_match_xla(dtype, tolerance):
    """`attention._cpu_attention` with oneDNN's batched products (bfloat16 ViT inference's path)."""
    qkv = jax.random.normal(jax.random.key(0), (2, 9, 3, 3, 8)).astype(dtype)
    loss = lambda native: lambda t: jnp.sum(jnp.sin(attention._split_attention(t, native).astype(jnp.float32)))  # noqa: E731
    results = {native: (jax.jit(lambda t: attention._split_attention(t, native))(qkv), jax.jit(jax.grad(loss(native)))(qkv))
               for native in (True, False)}
    assert "jaxvision_matmul" in hlo(jax.grad(loss(True)), qkv)
    assert "jaxvision_" not in hlo(jax.grad(loss(False)), qkv)
    for got, want in zip(results[True], results[False]):
        assert got.dtype == dtype and rel(got, want) < tolerance


def _fused(qkv):
    """{native: (output, gradient)} of `attention.fused_attention` with and without the kernels."""
    loss = lambda native: lambda t: jnp.sum(jnp.sin(attention.fused_attention(t, native).astype(jnp.float32)))  # noqa: E731
    return {native: (jax.jit(lambda t: attention.fused_attention(t, native))(qkv), jax.jit(jax.grad(loss(native)))(qkv))
            for native in (True, False)}, loss


def test_fused_attention_reads_the_projection_in_place():
    """ViT's (batch, tokens, 3, heads, d) projection output straight into the kernel, and its
    gradient straight out: values and gradients as XLA's, and no transpose left to XLA."""
    qkv = jax.random.normal(jax.random.key(0), (2, 9, 3, 3, 8))
    results, loss = _fused(qkv)
    program = hlo(jax.grad(loss(True)), qkv)
    assert "jaxvision_attention_bwd" in program and "transpose" not in program
    for got, want in zip(results[True], results[False]):
        assert got.shape == want.shape and rel(got, want) < 1e-5


def test_bfloat16_fused_attention_trains_on_the_kernels_and_infers_on_xla():
    """Half-precision ViT attention: XLA's in inference, the float32 kernels under differentiation
    (`attention._half_attention`), both within bfloat16's precision of XLA's."""
    qkv = jax.random.normal(jax.random.key(0), (2, 9, 3, 3, 8)).astype(jnp.bfloat16)
    results, loss = _fused(qkv)
    assert "jaxvision_attention" not in hlo(lambda t: attention.fused_attention(t, True), qkv)
    assert "jaxvision_attention_bwd" in hlo(jax.grad(loss(True)), qkv)
    for got, want in zip(results[True], results[False]):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape and rel(got, want) < 2e-2


def test_layer_norm_matches_flax():
    """Same parameters as `nn.LayerNorm` (checkpoints and converted weights load either way),
    same values and gradients."""
    x = 2.0 * jax.random.normal(jax.random.key(0), (3, 7, 24)) + 0.5
    ours, ref = layers.LayerNorm(epsilon=1e-6, native=True), nn.LayerNorm(epsilon=1e-6)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), ref.init(jax.random.key(2), x))
    assert jax.tree.structure(nn.unbox(ours.init(jax.random.key(2), x))) == jax.tree.structure(params)

    def grads(layer):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x))), (0, 1))(params, x)

    got, got_grads = jax.jit(ours.apply)(params, x), jax.jit(lambda: grads(ours))()
    assert "jaxvision_layer_norm_fwd" in hlo(ours.apply, params, x)
    assert rel(got, ref.apply(params, x)) < 1e-5
    for g, g_ref in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads(ref))):
        assert rel(g, g_ref) < 1e-5


@pytest.mark.parametrize("name,size,kwargs", [
    ("resnet50", 64, {"width": 8}), ("efficientnet_b0", 64, {}), ("vit_tiny_patch16_224", 32, {})])
def test_whole_models_agree_with_xla_in_training(name, size, kwargs):
    """Logits, the loss's parameter gradients and BatchNorm's batch variances, train mode. (Not the
    batch means: after a normalised input they are zero up to rounding, so no relative measure
    applies; and at 32 px or batch 2 the last stages' statistics of 2 numbers amplify rounding.)"""
    x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
    variables = jax.jit(models.create(name, num_classes=10, **kwargs).init)(jax.random.key(1), x)

    def step(model, variables):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(logits)), (logits, updates)
        return jax.grad(loss, has_aux=True)(variables["params"])

    outputs = {}
    for ops_ in (CpuOps(native=True), PORTABLE):
        model = models.create(name, num_classes=10, ops=ops_, **kwargs)
        outputs[ops_] = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
            jax.jit(functools.partial(step, model))(variables))[0] if "mean" not in jax.tree_util.keystr(path)]
        assert ("jaxvision_" in hlo(functools.partial(step, model), variables)) == (ops_ != PORTABLE)
    for got, want in zip(*outputs.values()):
        assert rel(got, want) < 1e-4


def test_one_device_cpu_programs_get_the_kernels_and_others_do_not():
    assert backends.ops_for("cpu", devices=1) == CpuOps(native=True)
    assert backends.ops_for("cpu", devices=8) == CpuOps(native=False)  # XLA would not partition them
    assert backends.ops_for("cpu", "portable") == PORTABLE
    for platform in ("tpu", "cuda", "rocm"):
        assert not isinstance(backends.ops_for(platform, devices=1), CpuOps)


def test_a_missing_onednn_names_the_fix_and_the_path_that_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_onednn_roots", lambda: [str(tmp_path)])
    native.library.cache_clear()
    backends._note.cache_clear()
    try:
        assert "pip install 'jaxvision[cpu]'" in native.unavailable()
        assert backends.ops_for("cpu") == PORTABLE  # auto: the extra is missing
        assert backends.ops_for("cpu", "cpu") == CpuOps(native=False)  # asked for: the rewrites
        lines = [r.getMessage() for r in caplog.records]
        assert any("portable ops on CPU" in m and "jaxvision[cpu]" in m for m in lines), lines
        assert any("without oneDNN's kernels" in m for m in lines), lines
    finally:
        native.library.cache_clear()
        backends._note.cache_clear()


def test_kernels_are_built_once_into_the_cache(tmp_path, caplog):
    path = native.build(str(tmp_path))
    assert os.path.exists(path) and "compiling the oneDNN CPU kernels" in caplog.text
    caplog.clear()
    assert native.build(str(tmp_path)) == path and "compiling" not in caplog.text


def test_command_line_training_on_one_device_uses_it_and_says_so(tmp_path):
    """`backend=auto` on one CPU device, the default recipe shrunk: it trains, the summary names
    the CPU backend on oneDNN."""
    from tests.test_engine import TINY, cli, flags, losses
    cli("--config", "configs/default.py", "--workdir", str(tmp_path), *flags({**TINY, "num_steps": 6}), devices=1)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["ops"].startswith("cpu backend: oneDNN")
    assert len(losses(tmp_path)) == 6 and np.all(np.isfinite(losses(tmp_path)))
