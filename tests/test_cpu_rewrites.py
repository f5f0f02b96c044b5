"""The CPU backend's XLA rewrites (`jaxvision.backends.cpu.conv`, `winograd`, `layers`) equal what
they replace: `lax.conv_general_dilated`, flax's Dense and pools, autodiff's gradients, for every
stride/padding/size combination the zoo uses. oneDNN's kernels, which replace most convolutions
on one-device meshes, are tests/test_cpu_native.py's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from jaxvision.backends.cpu import conv, layers, winograd
from jaxvision.models.ops import Ops, windows

CASES = [  # (size, channels in, channels out, kernel, stride, groups, padding)
    (9, 8, 8, 3, 1, 8, "SAME"),
    (10, 8, 8, 3, 2, 8, "SAME"),
    (11, 8, 8, 5, 2, 8, ((2, 2), (2, 2))),
    (10, 8, 8, 3, 2, 8, ((1, 1), (1, 1))),
    (10, 8, 16, 1, 1, 1, "SAME"),
    (10, 16, 8, 1, 1, 1, "SAME"),  # fewer channels out: the kernel gradient's other operand order
    (9, 8, 16, 1, 2, 1, ((0, 0), (0, 0))),
    (10, 8, 16, 1, 2, 1, "SAME"),
    (2, 8, 16, 3, 1, 1, ((1, 1), (1, 1))),  # dense, tiny output: im2col
    (1, 8, 16, 3, 1, 1, ((1, 1), (1, 1))),  # 1x1 output: only the centre tap sees input
    (3, 8, 8, 3, 2, 1, ((1, 1), (1, 1))),  # 2x2 output, stride 2
    (12, 8, 32, 3, 2, 1, ((1, 1), (1, 1))),  # stride-2 3x3 (ResNet downsampling): im2col
    (11, 3, 32, 3, 2, 1, "SAME"),  # stride 2, TensorFlow's asymmetric padding, 3 channels (a stem)
    (7, 16, 32, 3, 1, 1, ((1, 1), (1, 1))),  # stride 1 on a 7x7 map (ResNet-50's layer4): im2col
    (8, 3, 16, 4, 4, 1, "VALID"),  # stride = kernel (a patch embedding): reshape and GEMM
    (10, 4, 8, 4, 4, 1, ((0, 0), (0, 0))),  # ... with rows and columns no patch covers
    (2, 8, 8, 5, 1, 8, "SAME"),  # depthwise on a tiny map: taps that see only padding get no gradient
    (33, 4, 4, 3, 1, 4, "SAME"),  # depthwise on a map of 32+ rows: its kernel gradient keeps the rows
    (9, 4, 4, 5, 1, 4, ((1, 3), (2, 2))),  # depthwise 5x5: input gradient by the rotated kernel
    (6, 4, 4, 5, 1, 4, ((5, 0), (0, 0))),  # padding beyond the kernel: autodiff's input gradient
]


@pytest.mark.parametrize("size,cin,cout,k,stride,groups,padding", CASES)
def test_lowering_matches_lax_conv(size, cin, cout, k, stride, groups, padding):
    x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout))
    args = ((stride, stride), padding)
    kw = dict(dimension_numbers=conv.NHWC, feature_group_count=groups)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, *args, **kw)))

    ours, ref = conv.conv_general_dilated(x, w, *args, **kw), lax.conv_general_dilated(x, w, *args, **kw)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    for g_ours, g_ref in zip(jax.grad(loss(conv.conv_general_dilated), (0, 1))(x, w),
                             jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))))


def test_pointwise_depthwise_and_small_or_strided_dense_are_rewritten_on_cpu_and_others_are_not():
    """The rewrite is what makes them fast: no convolution left in the HLO for those."""
    def hlo(k, groups, size=8, stride=1, features=4):
        x = jnp.zeros((1, size, size, 4))
        w = jnp.zeros((k, k, 4 // groups, features))
        f = lambda x, w: conv.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=conv.NHWC,
                                                   feature_group_count=groups)
        return jax.jit(f).lower(x, w).as_text()

    assert "convolution" not in hlo(1, 1) and "dot_general" in hlo(1, 1)
    assert "convolution" not in hlo(3, 4)
    assert "convolution" in hlo(3, 1) and "convolution" in hlo(3, 2)  # (Winograd: test below)
    assert "convolution" not in hlo(3, 1, size=2) and "convolution" in hlo(3, 1, size=3)
    assert "convolution" not in hlo(3, 1, size=7, features=32) and "dot_general" in hlo(3, 1, size=7, features=32)
    assert "convolution" not in hlo(3, 1, size=32, stride=2, features=32)
    assert "convolution" in hlo(3, 1, size=32, stride=2, features=16)  # too narrow a GEMM
    assert "convolution" in hlo(7, 1, size=32, stride=2) and "convolution" in hlo(5, 1, size=32)
    assert "convolution" not in hlo(4, 1, size=16, stride=4)  # "SAME" here has no padding: patches


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_transforms_compute_a_correlation(m):
    at, g, bt = (t.astype(np.float64) for t in winograd.transforms(m))
    d, k = np.random.RandomState(0).randn(2, m + 2)
    k = k[:3]
    np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), np.correlate(d, k, "valid"), atol=1e-6)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 14, 10, 3), (3, 6, 7, 4)])  # 7 and 10: padded
def test_winograd_matches_lax_conv(m, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 6))
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=conv.NHWC)
    ours = lambda x, w: winograd.conv3x3(x, w, m)
    tol = {2: 4e-6, 4: 4e-5}[m]  # of the largest magnitude; XLA's own rounding is ~1e-6

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    for a, b in [(ours(x, w), ref(x, w)), *zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w))]:
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(jnp.max(jnp.abs(b))))


def test_winograd_block_size_follows_the_measured_wins():
    """F(4x4) on maps divisible by 4, F(2x2) on even ones (ResNet-50's 14x14 layer3), and the
    direct convolution on odd maps (7x7), with fewer tiles than channels, or below MIN_MACS
    (docs/performance.md)."""
    assert winograd.block_size((16, 56, 56, 64), (3, 3, 64, 64)) == 4
    assert winograd.block_size((16, 14, 14, 256), (3, 3, 256, 256)) == 2
    assert winograd.block_size((16, 7, 7, 512), (3, 3, 512, 512)) is None
    assert winograd.block_size((1, 28, 28, 128), (3, 3, 128, 128)) is None  # 49 tiles
    assert winograd.block_size((2, 32, 32, 64), (3, 3, 64, 64)) is None  # 7.5e7 multiply-adds
    assert winograd.block_size(jax.export.symbolic_shape("b, 112, 112, 64"), (3, 3, 64, 64)) == 4
    assert winograd.block_size(jax.export.symbolic_shape("b, 48, 48, 32"), (3, 3, 32, 32)) is None
    f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=conv.NHWC)
    x, w = jnp.zeros((4, 64, 64, 64)), jnp.zeros((3, 3, 64, 64))
    assert "convolution" not in jax.jit(f).lower(x, w).as_text()
    assert "convolution" in jax.jit(f).lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()  # float32 only


def test_strided_pointwise_subsamples_with_a_reduce_window():
    """Not a slice under differentiation: XLA:CPU fuses a slice's producers into the transposed copy
    the kernel gradient reads (see `conv.subsample`); a slice without."""
    f = lambda x, w: conv.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=conv.NHWC)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(f(x, w)), (0, 1)))(jnp.ones((1, 8, 8, 4)), jnp.ones((1, 1, 4, 8)))
    names = {e.primitive.name for e in jaxpr.eqns}
    assert "reduce_window_sum" in names and not names & {"slice", "conv_general_dilated"}
    inference = jax.jit(f).lower(jnp.ones((1, 8, 8, 4)), jnp.ones((1, 1, 4, 8))).as_text()
    assert "slice" in inference and "reduce_window" not in inference  # free for XLA's GEMM


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_position_embedding_gradient_sums_the_batch_by_halves(batch):
    """`conv.add_across_batch`: autodiff's values, and on CPU no reduce, which XLA:CPU runs 10x
    slower over a leading axis (`conv.sum_by_halves`)."""
    x, y = jax.random.normal(jax.random.key(0), (batch, 7, 6)), jax.random.normal(jax.random.key(1), (1, 7, 6))
    loss = lambda add: lambda x, y: jnp.sum(jnp.sin(add(x, y)))  # noqa: E731
    got = jax.jit(jax.grad(loss(conv.add_across_batch), (0, 1)))(x, y)
    want = jax.grad(loss(jnp.add), (0, 1))(x, y)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert "reduce" not in jax.jit(jax.grad(loss(conv.add_across_batch), 1)).lower(x, y).as_text()
    if batch > 1:  # what it replaces
        assert "reduce" in jax.jit(jax.grad(loss(jnp.add), 1)).lower(x, y).as_text()


DENSE_CASES = [  # (input shape, contracted axes, features)
    ((2, 5, 8), -1, 16),  # MLP fc1
    ((2, 5, 16), -1, 8),  # MLP fc2
    ((2, 5, 8), -1, (3, 2, 4)),  # qkv: several output axes
    ((2, 5, 2, 4), (-2, -1), 8),  # attention output: several input axes
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,axis,features", DENSE_CASES)
def test_zoo_dense_is_flax_dense_with_the_bias_gradient_summed_in_float32(shape, axis, features, dtype):
    """`layers.Dense`: flax's parameters, values and gradients, its bias gradient summed from the
    float32 output gradient (`conv.add_bias`; XLA:CPU sums bfloat16 30x slower)."""
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    ours, ref = (cls(features, axis=axis, dtype=dtype, bias_init=nn.initializers.normal(1.0))
                 for cls in (layers.Dense, nn.DenseGeneral))
    params = ref.init(jax.random.key(1), x)
    for a, b in zip(jax.tree.leaves(ours.init(jax.random.key(1), x)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ours.apply(params, x).astype(jnp.float32), ref.apply(params, x).astype(jnp.float32))
    loss = lambda layer: lambda p: jnp.sum(jnp.sin(layer.apply(p, x).astype(jnp.float32)))  # noqa: E731
    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours))(params)), jax.tree.leaves(jax.grad(loss(ref))(params))):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * float(jnp.max(jnp.abs(b))))
    summed = {cls: [str(e.invars[0].aval.dtype) for e in jax.make_jaxpr(jax.grad(loss(layer)))(params).eqns
                    if e.primitive.name == "reduce_sum"] for cls, layer in ((layers.Dense, ours), (nn, ref))}
    assert set(summed[layers.Dense]) == {"float32"}
    assert ("bfloat16" in summed[nn]) == (dtype == jnp.bfloat16)  # what it replaces


def dense_results(shape, axis, features, native=False):
    """(output, gradients of params and input) of a DenseGeneral through `conv.dot_general`
    (oneDNN's with `native`), jitted, and the same through `lax.dot_general`."""
    x = jax.random.normal(jax.random.key(0), shape)
    ours, ref = (nn.DenseGeneral(features, axis=axis, dot_general=d)
                 for d in (functools.partial(conv.dot_general, native=native), lax.dot_general))
    params = ref.init(jax.random.key(1), x)

    def grads(layer):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x))), (0, 1))(params, x)

    got = jax.jit(ours.apply)(params, x), jax.jit(lambda: grads(ours))()
    return got, (ref.apply(params, x), grads(ref))


@pytest.mark.parametrize("shape,axis,features", DENSE_CASES)
def test_dense_lowering_matches_lax(shape, axis, features):
    (out, grads), (ref_out, ref_grads) = dense_results(shape, axis, features)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    for g_ours, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,cout", [(4, 16), (16, 4)])
def test_kernel_gradient_puts_the_operand_with_fewer_channels_on_the_left(cin, cout):
    """XLA:CPU transposes that operand in memory (see `conv.feature_matmul`)."""
    x, w = jnp.ones((2, 5, 5, cin)), jnp.ones((cin, cout))
    jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv.feature_matmul(x, w) ** 2)))(w)
    (lhs,) = [e.invars[0] for e in jaxpr.eqns if e.primitive.name == "dot_general"
              and tuple(e.params["dimension_numbers"][0][0]) == (0, 1, 2)]
    assert lhs.aval.shape[-1] == min(cin, cout)


@pytest.mark.parametrize("window,stride,padding", [
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet stem
    ((3, 3), (2, 2), ((0, 0), (0, 0))),  # Inception reductions
    ((3, 3), (1, 1), ((1, 1), (1, 1))),  # Inception branch pool
    ((2, 2), (2, 2), ((0, 1), (0, 1))),  # ResNet-D ceil-mode shortcut
])
def test_pools_match_flax(window, stride, padding):
    """The CPU max pool and the pools of shifted views (the CPU backend's and the ONNX export's)."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
    views = Ops(pool_by_views=True)
    for ours in (layers.max_pool, views.max_pool):
        np.testing.assert_array_equal(ours(x, window, stride, padding),
                                      nn.max_pool(x, window, strides=stride, padding=padding))
    for include in (True, False):
        np.testing.assert_allclose(views.avg_pool(x, window, stride, padding, count_include_pad=include),
                                   nn.avg_pool(x, window, strides=stride, padding=padding,
                                               count_include_pad=include), atol=1e-6)


@pytest.mark.parametrize("window,stride,padding", [((3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 2), (2, 2), ((0, 0), (0, 0)))])
def test_max_pool_gradient_equals_autodiff_of_the_maximum(window, stride, padding):
    """Without ties (216 distinct integers, exact in bfloat16) the custom backward is exactly autodiff's."""
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.permutation(jax.random.key(0), jnp.arange(9 * 8 * 3)).reshape(1, 9, 8, 3).astype(dtype)
        g = jax.random.normal(jax.random.key(1), layers.max_pool(x, window, stride, padding).shape, dtype)
        views = lambda x: [v for _, _, v in windows(x, window, stride, padding, fill=-jnp.inf)]
        chain = lambda x: functools.reduce(jnp.maximum, views(x))
        ours = jax.vjp(lambda x: layers.max_pool(x, window, stride, padding), x)[1](g)[0]
        np.testing.assert_array_equal(ours, jax.vjp(chain, x)[1](g)[0])


def test_bfloat16_max_pool_gradient_is_summed_in_float32_and_rounded_once():
    """The input at (1, 1) is the maximum of all four overlapping windows: 1 + 3 x 0.003 rounds to
    1.0078 in bfloat16 once, but to 1.0 when each add is rounded, as bfloat16 arithmetic does."""
    x = jnp.zeros((1, 4, 4, 1), jnp.bfloat16).at[0, 1, 1, 0].set(1.0)
    g = jnp.array([1.0, 0.003, 0.003, 0.003], jnp.bfloat16).reshape(1, 2, 2, 1)
    pool = lambda x: layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # noqa: E731
    out, vjp = jax.vjp(pool, x)
    assert out.dtype == jnp.bfloat16 and np.all(np.asarray(out, np.float32) == 1.0)
    dx = vjp(g)[0]
    want = jax.vjp(pool, x.astype(jnp.float32))[1](g.astype(jnp.float32))[0].astype(jnp.bfloat16)
    assert dx.dtype == jnp.bfloat16 and float(dx[0, 1, 1, 0]) == float(want[0, 1, 1, 0]) == 1.0078125
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want, np.float32))


def test_max_pool_gradient_goes_to_the_first_maximum_as_in_pytorch():
    x = jnp.zeros((1, 3, 4, 1)).at[0, 2, 3, 0].set(-1.0)
    dx = jax.grad(lambda x: layers.max_pool(x, (3, 3), (1, 1)).sum())(x)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
