"""The jaxvision model zoo, usable without the trainer.

    from jaxvision import models
    model = models.create("resnet50", num_classes=10)
    variables = model.init(jax.random.key(0), images)          # images: NHWC, normalised
    logits = model.apply(variables, images, train=False)
    features = model.apply(variables, images, pre_logits=True)  # pooled, without the head

Models run on portable ops (`jaxvision.models.ops.Ops`); `ops=jaxvision.backends.ops_for(platform)`
gives a platform's own, e.g. the CPU backend's kernels.
"""

from jaxvision.models import (  # noqa: F401  (registration)
    classic, convnext, efficientnet, inception, mobilenet, resnet, speednet, swin, vgg, vit)
from jaxvision.models.ops import Ops
from jaxvision.models.registry import ModelCard, architecture, create, list_models, model_card
from jaxvision.models.util import count_params, init_shapes, output_shapes

__all__ = ["ModelCard", "Ops", "architecture", "create", "list_models", "model_card", "count_params", "init_shapes", "output_shapes"]
