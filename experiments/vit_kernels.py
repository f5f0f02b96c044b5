"""ViT-S's pieces on the CPU backend's native kernels, batch 16 at 224 px (3152 tokens), best of N jitted calls:

  products   the dense layers' products through `jaxvision_matmul` (forward x w, kernel gradient
             x^T dy, input gradient dy w^T) in GFLOP/s; run with JAXVISION_MKL=1 and with
             JAXVISION_MKL=0 to compare MKL's and oneDNN's (unset: MKL on Intel CPUs only)
  attention  one attention layer (fused qkv in, output projection after), forward and forward +
             backward, in ms
  batch sum  the position embedding's gradient: XLA's reduce over the batch against
             `conv.sum_by_halves`, in ms
  bfloat16   a dense layer's bias gradient by autodiff against `conv.add_bias`, and GELU rounded
             after every op against `layers.gelu` (float32, rounded once), in ms

    python experiments/vit_kernels.py [--reps 15]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
from conv_layers import best_ms as best_call_ms

from jaxvision.backends.cpu import attention, conv, layers, native, onednn as ops


def best_ms(fn, *args, reps):
    """Best of `reps` calls of `fn` jitted, after a warm-up call."""
    fn = jax.jit(fn)
    return best_call_ms(lambda: jax.block_until_ready(fn(*args)), reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    reps = parser.parse_args().reps
    print("kernels:", native.info())
    print("\nproducts, GFLOP/s (m x k x n)      forward   x^T dy   dy w^T")
    for m, k, n in [(3152, 384, 1152), (3152, 384, 384), (3152, 384, 1536), (3152, 1536, 384)]:
        x, w, dy = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(m, k), (k, n), (m, n)]))
        mflop = 2 * m * k * n / 1e6
        fwd = best_ms(ops.matmul, x, w, reps=reps)
        dw = best_ms(functools.partial(ops.matmul, transpose_a=True), x, dy, reps=reps)
        dx = best_ms(functools.partial(ops.matmul, transpose_b=True), dy, w, reps=reps)
        print(f"  {m} x {k:4d} x {n:4d}              {mflop / fwd:7.0f}  {mflop / dw:7.0f}  {mflop / dx:7.0f}")

    qkv = jax.random.normal(jax.random.key(0), (16, 197, 3, 6, 64))
    proj = jax.random.normal(jax.random.key(1), (6, 64, 384)) * 0.05
    loss = lambda qkv, w: jnp.sum(jnp.einsum("bnhd,hde->bne", attention.fused_attention(qkv, native=True), w) ** 2)  # noqa: E731
    print(f"\nattention layer: forward {best_ms(loss, qkv, proj, reps=reps):.2f} ms, forward + backward "
          f"{best_ms(jax.grad(loss, (0, 1)), qkv, proj, reps=reps):.2f} ms")

    grad = jax.random.normal(jax.random.key(2), (16, 197, 384))
    print(f"batch sum 16x197x384: reduce {best_ms(lambda g: jnp.sum(g, 0, keepdims=True), grad, reps=reps):.2f} ms, "
          f"by halves {best_ms(conv.sum_by_halves, grad, reps=reps):.2f} ms")

    h = jax.random.normal(jax.random.key(3), (16, 197, 1536)).astype(jnp.bfloat16)
    bias = jnp.zeros((1536,), jnp.bfloat16)
    bias_grad = lambda add: lambda dy: jax.vjp(lambda b: add(h, b), bias)[1](dy)[0]  # noqa: E731
    print(f"bfloat16 16x197x1536: bias gradient, autodiff {best_ms(bias_grad(jnp.add), h, reps=reps):.2f} ms, "
          f"conv.add_bias {best_ms(bias_grad(conv.add_bias), h, reps=reps):.2f} ms")
    per_op = jax.checkpoint(lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476)))
    gelu_grad = lambda f: jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) ** 2))  # noqa: E731
    print(f"bfloat16 GELU 16x197x1536: forward {best_ms(per_op, h, reps=reps):.2f} -> {best_ms(layers.gelu, h, reps=reps):.2f} ms, "
          f"gradient {best_ms(gelu_grad(per_op), h, reps=reps):.2f} -> {best_ms(gelu_grad(layers.gelu), h, reps=reps):.2f} ms "
          "(rounded after every op -> layers.gelu)")


if __name__ == "__main__":
    main()
