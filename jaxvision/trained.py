"""The trained model in a workdir, for evaluation and every deploy mode: its set-up, its class
names, and its weights, from the best good checkpoint (else the latest, else `init_from`),
restored without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision import checkpoint
from jaxvision.train import setup as setup_lib

CLASSES_FILE = "classes.json"  # class names in the workdir, for modes that run without the data


def class_names(config, workdir: str) -> list[str]:
    """From the workdir (written by training), else from the dataset the config names."""
    path = os.path.join(workdir, CLASSES_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    dataset = config.data.eval_dataset or config.data.dataset
    return list(setup_lib.open_source(config, dataset, config.data.eval_split).class_names)


def variables(s: setup_lib.Setup, workdir: str):
    """(variables, their shardings, step) of the workdir's best (else latest) good checkpoint, or
    of `init_from` (step None)."""
    config = s.config
    _, shapes, shardings = s.abstract_state(s.optimizer(1))
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints, create=False)
    try:
        restored = ckpts.restore_good(shapes, shardings, setup_lib.identity(s), prefer=ckpts.best_step(),
                                      only=("params", "batch_stats"))
    finally:
        ckpts.close()
    if restored:
        weights, _, step = restored
        return weights, shardings.variables(), step
    source = setup_lib.initial_weights(config)
    if not source:
        where = ckpts.directory if os.path.isdir(workdir) else f"{workdir} (no such directory)"
        raise checkpoint.CheckpointError(f"no trained model: no checkpoint in {where}, no config.init_from "
                                         "and no config.model.pretrained")

    def init():
        images = jnp.zeros((1, s.image_size, s.image_size, 3), jnp.float32)
        fresh = nn.meta.unbox(s.model.init(jax.random.key(config.seed), images, train=False))
        return {"params": fresh["params"], "batch_stats": fresh.get("batch_stats", {})}

    fresh = jax.jit(init, out_shardings=shardings.variables())()
    params, stats, heads = checkpoint.init_from(source, config.model.name, fresh["params"], fresh["batch_stats"])
    if heads:
        raise checkpoint.CheckpointError(f"{source} has no head for "
                                         f"{s.num_classes} classes; this mode needs a trained head")
    return {"params": params, "batch_stats": stats}, shardings.variables(), None


@dataclasses.dataclass
class Trained:
    setup: setup_lib.Setup
    variables: dict
    shardings: dict
    step: int | None
    class_names: list[str]


def load(config, workdir: str, *, evaluate: bool = False) -> Trained:
    """The trained model of `workdir` with the set-up to use it (and its eval split with `evaluate`)."""
    names = class_names(config, workdir)
    config = config.copy_and_resolve_references()
    config.model.num_classes = config.model.num_classes or len(names)
    s = setup_lib.setup(config, train=False, evaluate=evaluate)
    weights, shardings, step = variables(s, workdir)
    return Trained(s, weights, shardings, step, names)
