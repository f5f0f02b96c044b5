"""Winograd convolution F(m x m, 3 x 3) for the stride-1 3x3 convolutions of a ResNet on CPU.

XLA:CPU runs a 3x3 convolution with 64 channels on a 56x56 map at about half the FLOP rate it
reaches with 128 or more (YNNPACK: 99 against 185-193 GFLOP/s; docs/performance.md), and
layer1 of a ResNet-50 is three of them. Winograd's algorithm computes each m x m block of
outputs from a (m+2) x (m+2) tile of inputs with (m+2)^2 multiplies per channel pair instead of
9 m^2: transform the tiles and the kernel, do (m+2)^2 independent channel GEMMs, transform back.
The transforms are additions fused by XLA into memory passes; the GEMMs run at full speed.
F(4x4, 3x3) does 4x fewer multiplies (forward and backward of 16x56x56x64: 115 -> 57 ms,
`python experiments/conv_layers.py`).

The backward pass is written out rather than autodiffed (autodiff of the transforms, 16x56x56x64:
592 ms forward and backward against 68 written out): the input gradient of a stride-1 'SAME' 3x3
convolution is the same convolution of the output gradient with the kernel rotated by 180
degrees and its channel axes swapped, so it reuses the forward; the kernel gradient is one
channel GEMM per tile position between the input tiles and the output gradient mapped back
through the output transform's adjoint, then the kernel transform's adjoint.

The price is float32 rounding: 1e-5 of the output's magnitude for F(4x4, 3x3), 1e-6 for
F(2x2, 3x3), against 1e-6 for XLA's direct convolution (tests/test_cpu_rewrites.py); float32 only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Finite interpolation points of the Toom-Cook construction for each output block size m (the
# last point is infinity). For m = 4, +-1/2 instead of the textbook +-2, after Barabasz et al.
# (2020, "Error analysis and improving the accuracy of Winograd convolution for deep neural
# networks"), who found them more accurate; on ResNet-50's layer1 shapes the two rounded alike.
POINTS = {2: (0.0, 1.0, -1.0), 4: (0.0, 1.0, -1.0, 0.5, -0.5)}


@functools.cache
def transforms(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T, G, B^T) of F(m, r): y = A^T [(G g) * (B^T d)] is the correlation of a length-(m+r-1)
    input d with a length-r kernel g. A^T and G follow from the interpolation points; B^T is
    solved for, so the identity is checked rather than typed in."""
    n, points = m + r - 1, np.asarray(POINTS[m], np.float64)
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for j, p in enumerate(points):
        at[:, j] = p ** np.arange(m)
        g[j] = p ** np.arange(r) / np.prod([p - q for q in points if q != p])
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    # For every output i, kernel tap k and input position l: sum_j at[i, j] g[j, k] bt[j, l]
    # must be 1 when l == i + k and 0 otherwise.
    coupling = np.einsum("ij,jk->ikj", at, g).reshape(m * r, n)
    target = np.array([[float(l == i + k) for l in range(n)] for i in range(m) for k in range(r)])
    bt = np.linalg.lstsq(coupling, target, rcond=None)[0]
    np.testing.assert_allclose(coupling @ bt, target, atol=1e-9)
    bt[np.abs(bt) < 1e-9] = 0.0  # the least-squares solution's round-off, which would cost adds
    return at.astype(np.float32), g.astype(np.float32), bt.astype(np.float32)


MIN_MACS = 10**8  # multiply-adds of the direct convolution below which it stays direct


def block_size(x_shape, w_shape) -> int | None:
    """The output block size m for a stride-1 'SAME' 3x3 convolution of these shapes, or None
    where the direct convolution is as good: odd maps (7x7 would be padded to 8x8, 0.76x), too
    few tiles for the kernel transform to pay off, and small convolutions, whose few milliseconds
    saved per call would take hundreds of steps to repay the compile time (each Winograd layer
    adds about 0.7 s: ResNet-50's train step 6.8 -> 17.4 s). A symbolic batch (a
    shape-polymorphic export) counts as 1."""
    n, h, w, c = x_shape
    n = n if isinstance(n, int) else 1
    m = 4 if h % 4 == w % 4 == 0 else 2 if h % 2 == w % 2 == 0 else None
    if m is None or n * (h // m) * (w // m) < max(c, w_shape[-1]) or n * h * w * 9 * c * w_shape[-1] < MIN_MACS:
        return None
    return m


def _combine(coefs, terms):
    """sum_i coefs[i] * terms[i], with zero coefficients left out and +-1 as adds."""
    out = None
    for c, t in zip(coefs.tolist(), terms):
        if c == 0:
            continue
        t = t if c == 1 else -t if c == -1 else c * t
        out = t if out is None else out + t
    return out


def _input_tiles(x, m):
    """(n, h, w, c) -> ((m+2)^2, n*(h/m)*(w/m), c): B^T d B of every overlapping input tile."""
    n, h, w, c = x.shape
    bt, t = transforms(m)[2], m + 2
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = [x[:, a:a + h:m] for a in range(t)]
    rows = [_combine(bt[i], rows) for i in range(t)]
    tiles = [_combine(bt[j], [r[:, :, b:b + w:m] for b in range(t)]) for r in rows for j in range(t)]
    return jnp.stack(tiles).reshape(t * t, n * (h // m) * (w // m), c)


def _output(products, shape, m):
    """((m+2)^2, tiles, k) -> (n, h, w, k): A^T M A of every tile, blocks put side by side."""
    n, h, w, k = shape
    at, t = transforms(m)[0], m + 2
    products = products.reshape(t, t, n, h // m, w // m, k)
    rows = [_combine(at[p], list(products)) for p in range(m)]
    blocks = [[_combine(at[q], list(r)) for q in range(m)] for r in rows]
    return jnp.stack([jnp.stack(b, axis=3) for b in blocks], axis=2).reshape(shape)


def _output_adjoint(dy, m):
    """The transpose of `_output`: (n, h, w, k) -> ((m+2)^2, tiles, k), A dY A^T per block."""
    n, h, w, k = dy.shape
    at, t = transforms(m)[0], m + 2
    blocks = dy.reshape(n, h // m, m, w // m, m, k)
    rows = [_combine(at[:, i], [blocks[:, :, p] for p in range(m)]) for i in range(t)]
    tiles = [_combine(at[:, j], [r[:, :, :, q] for q in range(m)]) for r in rows for j in range(t)]
    return jnp.stack(tiles).reshape(t * t, -1, k)


def _kernel(w, m):
    g = transforms(m)[1]
    return jnp.einsum("ia,jb,abck->ijck", g, g, w).reshape(-1, *w.shape[2:])


def _padded(x, m):
    """Pads the bottom and right of a map to multiples of m (the extra outputs are cropped)."""
    return jnp.pad(x, ((0, 0), (0, -x.shape[1] % m), (0, -x.shape[2] % m), (0, 0)))


def _conv(x, w, m, precision):
    n, h, wd, _ = x.shape
    xp = _padded(x, m)
    products = jnp.einsum("tpc,tck->tpk", _input_tiles(xp, m), _kernel(w, m), precision=precision)
    return _output(products, xp.shape[:3] + w.shape[-1:], m)[:, :h, :wd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3x3(x, w, m, precision=None):
    """The stride-1 'SAME' convolution of NHWC x with HWIO 3x3 w, by F(m x m, 3 x 3)."""
    return _conv(x, w, m, precision)


def _conv3x3_fwd(x, w, m, precision):
    return _conv(x, w, m, precision), (x, w)


def _conv3x3_bwd(m, precision, residuals, dy):
    x, w = residuals
    dx = _conv(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), m, precision)
    du = jnp.einsum("tpc,tpk->tck", _input_tiles(_padded(x, m), m), _output_adjoint(_padded(dy, m), m),
                    precision=precision)
    g = transforms(m)[1]
    dw = jnp.einsum("ia,jb,ijck->abck", g, g, du.reshape(m + 2, m + 2, *du.shape[1:]))
    return dx, dw


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
