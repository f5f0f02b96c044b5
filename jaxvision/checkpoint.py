"""Checkpoints through orbax: save (async), resume, and start from converted or earlier weights.

A checkpoint holds two items: `state` (the sharded train state; orbax writes it collectively from
every process) and `data` (JSON: the model it belongs to and the data position, which is the
number of batches consumed). Kept: the last `keep` plus the best by validation top-1.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxvision.errors import UserError
from jaxvision.models.registry import HEAD_NAMES


class CheckpointError(UserError):
    """A checkpoint does not fit the run; the message says which and how to proceed."""


def _with_shardings(shapes, shardings):
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


class Checkpoints:
    def __init__(self, workdir: str, *, keep: int = 3, best_metric: str = "val_top1",
                 async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=False, n=1,
                           keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state, data: dict, metrics: dict | None = None) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data)),
                          metrics=metrics, force=True)

    def data(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def restore(self, step: int, shapes, shardings, expect: dict) -> tuple[Any, dict]:
        """State (laid out by `shardings`) and data item of `step`, after checking that the
        checkpoint's model matches `expect` (e.g. model name and number of classes)."""
        data = self.data(step)
        wrong = {k: (data.get(k), v) for k, v in expect.items() if data.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in wrong.items())
            raise CheckpointError(f"{self.directory} holds checkpoints of another model ({detail}); "
                                  "use a new --workdir, or make the config match to resume")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_with_shardings(shapes, shardings))))
        return restored["state"], data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _load_variables(path: str) -> tuple[dict, str | None]:
    """(variables, model name) from a converter output dir or a jaxvision training workdir."""
    path = os.path.abspath(os.path.expanduser(path))
    meta_file = os.path.join(path, "model.json")
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            name = json.load(f)["model"]
        return ocp.StandardCheckpointer().restore(os.path.join(path, "variables")), name
    if os.path.isdir(os.path.join(path, "checkpoints")):
        manager = ocp.CheckpointManager(os.path.join(path, "checkpoints"), item_names=("state", "data"))
        step = manager.best_step() or manager.latest_step()
        if step is None:
            raise CheckpointError(f"init_from {path}: no checkpoint under {path}/checkpoints")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
        state = restored["state"]
        return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, restored["data"].get("model")
    raise CheckpointError(f"init_from {path}: expected the output of `python -m jaxvision.models.convert` "
                          "(with model.json) or a jaxvision workdir (with checkpoints/)")


def init_from(path: str, model_name: str, params, batch_stats) -> tuple[Any, Any, list[str]]:
    """Overlay weights from `path` onto freshly initialised `params` / `batch_stats` (host or
    device arrays). The classifier keeps its fresh initialisation when its shape differs (a new
    number of classes); any other mismatch means another model and is an error.
    Returns (params, batch_stats, names of the re-initialised head parameters)."""
    loaded, name = _load_variables(path)
    if name is not None and name != model_name:
        raise CheckpointError(f"init_from {path} holds {name} weights but the config trains "
                              f"{model_name}; set config.model.name={name} or convert {model_name} weights")
    fresh_heads: list[str] = []

    def overlay(collection: str, tree):
        source = flax.traverse_util.flatten_dict(loaded.get(collection, {}) or {})
        problems = []

        def pick(path, value):
            keys = tuple(p.key for p in path)
            got = source.get(keys)
            is_head = keys[0] in HEAD_NAMES
            if got is not None and tuple(np.shape(got)) == tuple(value.shape):
                return jax.device_put(np.asarray(got, value.dtype), value.sharding)
            if is_head:
                fresh_heads.append("/".join(keys))
                return value
            problems.append(f"{'/'.join(keys)}: checkpoint "
                            f"{'missing' if got is None else tuple(np.shape(got))}, model {tuple(value.shape)}")
            return value
        out = jax.tree_util.tree_map_with_path(pick, tree)
        if problems:
            raise CheckpointError(f"init_from {path} does not fit {model_name} ({len(problems)} "
                                  "parameters differ):\n  " + "\n  ".join(problems[:10]))
        return out

    return overlay("params", params), overlay("batch_stats", batch_stats), fresh_heads
