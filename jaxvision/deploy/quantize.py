"""Post-training int8 quantization through qwix (`--mode quantize`, `export.quantize=int8`).

qwix intercepts every `lax.conv_general_dilated` and `dot_general` inside the model: weights become
int8 with one float32 scale per output channel, activations are quantized to int8 on the fly
(dynamic range, absmax), and the products run on integers. Nothing in the model code changes; the
model runs on the portable ops (`jaxvision.models.ops`), whose Conv and Dense call lax's own
convolution and dot_general, which qwix replaces.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.errors import DEPLOY_EXTRA, UserError
from jaxvision.models.ops import PORTABLE

QTYPES = ("int8",)


def _qwix():
    try:
        import qwix
    except ImportError as e:
        raise UserError(f"int8 quantization needs qwix, which is not installed: {DEPLOY_EXTRA}") from e
    return qwix


def quantize(model, variables, image_shape, qtype: str = "int8"):
    """(quantized model, its variables): float params replaced by int8 values and scales."""
    if qtype not in QTYPES:
        raise UserError(f"quantization type must be one of {', '.join(QTYPES)}, not {qtype!r}")
    qwix = _qwix()
    rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, act_qtype=qtype)]
    qmodel = qwix.quantize_model(model.clone(ops=PORTABLE), qwix.PtqProvider(rules))
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(lambda x: qmodel.init(jax.random.key(0), x, train=False), x))
    variables = jax.tree.map(jnp.asarray, nn.unbox(variables))
    params = qwix.quantize_params(variables["params"], abstract["params"])
    return qmodel, {**variables, "params": params}


def apply(qmodel, variables, images):
    """Logits of the quantized model."""
    return qmodel.apply(variables, images, train=False)


def nbytes(tree) -> int:
    """Bytes of every array in the tree (the weights a served artifact carries)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
