"""Everything a run derives from its config before any array exists: the mesh, the data sources,
the model (on the ops for the mesh's platform), the optimizer, the abstract state and its
shardings. Training, evaluation, the plan and every deploy mode start here.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision import backends, config as config_lib, models
from jaxvision.models import pretrained
from jaxvision.data import sources, transforms
from jaxvision.errors import UserError
from jaxvision.parallel import mesh as mesh_lib
from jaxvision.parallel import sharding
from jaxvision.train import optim
from jaxvision.train import state as state_lib
from jaxvision.train import step as step_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Setup:
    """Everything derived from the config before any array exists."""

    config: object
    mesh: jax.sharding.Mesh
    model: object
    card: models.ModelCard
    image_size: int
    num_classes: int
    train_source: sources.Source | None
    eval_source: sources.Source | None
    teacher: object = None  # the distillation teacher module, if any

    @property
    def distilling(self) -> bool:
        return self.teacher is not None

    def batch_shardings(self, with_mask: bool = False) -> dict:
        out = {"image": mesh_lib.batch_sharding(self.mesh, 4), "label": mesh_lib.batch_sharding(self.mesh, 1)}
        if with_mask:
            out["mask"] = mesh_lib.batch_sharding(self.mesh, 1)
        return out

    @property
    def teacher_size(self) -> int:
        return self.config.distill.teacher_image_size or self.image_size

    def extra_params(self) -> dict:
        """Feature distillation between different widths trains a projection beside the model."""
        if not self.distilling or self.config.distill.kind != "feature":
            return {}
        dims = [models.output_shapes(m, size, pre_logits=True).shape[-1]
                for m, size in ((self.model, self.image_size), (self.teacher, self.teacher_size))]
        if dims[0] == dims[1]:
            return {}
        return {"distill_proj": {"kernel": state_lib.extra_param(tuple(dims), ("features", "embed"))}}

    def param_shapes(self):
        return nn.meta.unbox(state_lib.boxed_variables(self.model, self.image_size, 0,
                                                       self.extra_params())["params"])

    def optimizer(self, steps: int):
        return optim.optimizer(self.config.optim, steps, self.config.model.name, self.param_shapes())

    def abstract_state(self, tx):
        return state_lib.abstract_state(self.model, tx, self.image_size, self.mesh,
                                        self.config.fsdp_min_size, self.config.seed,
                                        ema=self.config.ema.decay > 0, extra_params=self.extra_params())

    def teacher_shapes(self):
        """(abstract teacher variables, their shardings), by the same rules as the student's."""
        boxed = state_lib.boxed_variables(self.teacher, self.teacher_size)
        shardings = sharding.variable_shardings(boxed, self.mesh, self.config.fsdp_min_size)
        return nn.meta.unbox(boxed), shardings


def open_source(config, dataset: str, split: str) -> sources.Source:
    return sources.open_source(dataset, split, data_dir=config.data.data_dir or None,
                               val_fraction=config.data.val_fraction)


def setup(config, *, train: bool = True, evaluate: bool = True, platform: str = "", mesh=None) -> Setup:
    """Mesh, data sources and model from the config; fails early with a clear message. The model
    is traced with the ops for `platform` (default: the platform of the mesh's devices)."""
    config_lib.check(config)
    mesh = mesh or mesh_lib.make_mesh(config.mesh, config.mesh_dcn)
    if train:
        mesh_lib.check_batch(config.batch_size, mesh)
    if evaluate:
        mesh_lib.check_batch(config.eval_batch_size or config.batch_size, mesh, "eval_batch_size")
    train_src = open_source(config, config.data.dataset, config.data.train_split) if train else None
    eval_src = open_source(config, config.data.eval_dataset or config.data.dataset,
                     config.data.eval_split) if evaluate else None
    num_classes = config.model.num_classes or (train_src or eval_src).num_classes
    for src in (train_src, eval_src):
        if src is not None and src.num_classes != num_classes:
            raise sources.DataError(f"the dataset has {src.num_classes} classes but the model "
                                    f"{num_classes}; set config.model.num_classes={src.num_classes}")
    if config.model.dtype not in DTYPES:
        raise UserError(f"config.model.dtype must be one of {', '.join(DTYPES)}")
    card = pretrained.card_for(models.model_card(config.model.name), config.model.name,
                               config.model.pretrained or config.init_from)  # the weights' preprocessing
    kwargs = dict(config.model.kwargs)
    if platform:
        ops = backends.ops_for(platform, config.backend, mesh.size)
    else:
        ops = backends.for_mesh(mesh, config.backend)
    if mesh.size > 1:  # activations laid out by the rules next to the parameters'
        ops = dataclasses.replace(ops, mesh=mesh, activation_rules=sharding.ACTIVATION_RULES)
    teacher = None
    if config.distill.teacher:
        d = config.distill
        if d.kind not in step_lib.DISTILL_KINDS:
            raise UserError(f"config.distill.kind must be one of {', '.join(step_lib.DISTILL_KINDS)}")
        if d.kind.startswith("deit"):
            if not models.architecture(config.model.name).get("distilled"):
                raise UserError(f"distill.kind={d.kind} needs a student with a distillation token "
                                f"(deit_*_distilled_*), not {config.model.name}")
            kwargs["distilled_training"] = True
        teacher = models.create(d.teacher, num_classes=num_classes, dtype=DTYPES[config.model.dtype],
                                ops=ops, **dict(d.teacher_kwargs))
    model = models.create(config.model.name, num_classes=num_classes, dtype=DTYPES[config.model.dtype],
                          ops=ops, **kwargs)
    return Setup(config, mesh, model, card, int(config.data.image_size) or card.input_size,
                 num_classes, train_src, eval_src, teacher)


def train_transform(s: Setup) -> transforms.TrainTransform:
    d = s.config.data
    return transforms.TrainTransform(s.image_size, d.augment, tuple(d.rrc_scale),
                                     d.interpolation or s.card.interpolation, d.randaugment,
                                     d.reprob, d.remode, d.flip, d.translate, d.pad_mode, s.config.seed)


def eval_transform(s: Setup) -> transforms.EvalTransform:
    d = s.config.data
    return transforms.EvalTransform(s.image_size, d.crop_pct or s.card.crop_pct,
                                    d.interpolation or s.card.interpolation)


def identity(s: Setup) -> dict:
    """What a checkpoint must match to be resumed by this config."""
    return {"model": s.config.model.name, "num_classes": s.num_classes}


def initial_weights(config) -> str:
    """The weights folder a run starts from, and weightless modes fall back on: `init_from`, or
    the `model.pretrained` weights, fetched and converted on first use; "" for none."""
    if config.model.pretrained:
        return pretrained.weights_dir(config.model.name, config.model.pretrained)
    return config.init_from
