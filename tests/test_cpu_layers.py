"""The CPU backend's attention, GELU and half-precision GEMMs (without oneDNN's kernels) equal the
library definitions they replace: values, and for the hand-written backward passes, every
gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxvision.backends.cpu import attention, conv, layers


def _qkv(dtype, shape=(2, 7, 3, 3, 8)):
    """A fused projection's (batch, tokens, 3, heads, head_dim) output."""
    return (2 * jax.random.normal(jax.random.key(0), shape)).astype(dtype)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_cpu_attention_matches_dot_product_attention_values_and_gradients(dtype, tol):
    qkv = _qkv(dtype)
    cotangent = jax.random.normal(jax.random.key(1), qkv[:, :, 0].shape).astype(dtype)

    def pullback(fn, qkv):
        out, vjp = jax.vjp(fn, qkv)
        return (out, *vjp(cotangent.astype(out.dtype)))

    ours = pullback(lambda t: attention.fused_attention(t, native=False), qkv)
    reference = pullback(lambda t: jax.nn.dot_product_attention(t[:, :, 0], t[:, :, 1], t[:, :, 2]),
                         qkv.astype(jnp.float32))
    for name, a, b in zip(("output", "dqkv"), ours, reference):
        assert a.dtype == dtype, name
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), atol=tol * scale, err_msg=name)


def test_cpu_attention_is_the_custom_backward_not_autodiff():
    """The hand-written backward is what runs: its jaxpr holds the custom VJP, so a change that
    drops it (and the speed) fails here rather than only in a benchmark."""
    jaxpr = jax.make_jaxpr(lambda t: attention.fused_attention(t, native=False))(_qkv(jnp.float32))
    assert "custom_vjp_call" in str(jaxpr)


def test_gelu_is_the_exact_gelu():
    x = jnp.linspace(-8.0, 8.0, 2001)
    np.testing.assert_allclose(layers.gelu(x), nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda t: layers.gelu(t).sum())(x),
                               jax.grad(lambda t: nn.gelu(t, approximate=False).sum())(x), atol=1e-6)
    # rematerialised: the backward computes erf again rather than keeping the forward's
    assert str(jax.make_jaxpr(jax.grad(lambda t: layers.gelu(t).sum()))(x)).count("erf") == 2


def test_bfloat16_gelu_is_rounded_once():
    """Computed in float32 and rounded at the end, as PyTorch's bfloat16 GELU: the float32 values
    rounded, where rounding after every op (XLA's bfloat16 arithmetic) differs."""
    x = (jax.random.normal(jax.random.key(0), (4096,)) * 3).astype(jnp.bfloat16)
    want = np.asarray(jax.jit(lambda t: layers.gelu(t.astype(jnp.float32)).astype(jnp.bfloat16))(x), np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.gelu)(x), np.float32), want)
    per_op = np.asarray(jax.jit(lambda t: 0.5 * t * (1.0 + jax.lax.erf(t * 0.7071067811865476)))(x), np.float32)
    assert np.any(per_op != want)


def test_bfloat16_feature_matmul_accumulates_in_float32_and_returns_bfloat16():
    """XLA:CPU runs bfloat16 GEMMs at speed only with float32 results (conv._dot); the layer still
    returns bfloat16, and forward and both gradients equal float32 products rounded once."""
    x = jax.random.normal(jax.random.key(0), (4, 5, 64)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (64, 32)).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), (4, 5, 32)).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, w: conv.feature_matmul(x, w), x, w)
    grads = vjp(dy)
    assert "preferred_element_type=float32" in str(jax.make_jaxpr(conv.feature_matmul)(x, w))
    x32, w32, dy32 = (t.astype(jnp.float32) for t in (x, w, dy))
    expected = (x32 @ w32, dy32 @ w32.T, jnp.einsum("abi,abo->io", x32, dy32))
    for name, got, want in zip(("output", "dx", "dw"), (out, *grads), expected):
        assert got.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32),
                                   rtol=1e-2, atol=1e-2, err_msg=name)
