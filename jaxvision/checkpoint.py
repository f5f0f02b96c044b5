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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

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
        reshaped = self._reshaped(step, shapes)
        if reshaped:
            raise CheckpointError(
                f"{self.directory} holds a {data.get('model')} of another shape than this config "
                f"builds ({len(reshaped)} arrays differ, e.g. {'; '.join(reshaped[:3])}); use the "
                "model kwargs it was trained with, or a new --workdir")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_with_shardings(shapes, shardings))))
        except ValueError as e:  # a structure orbax cannot map: another version or config
            raise CheckpointError(f"cannot restore step {step} of {self.directory} into the state "
                                  f"this config builds: {str(e).splitlines()[0]} (was it written by "
                                  "another jaxvision version or with other optimizer/EMA settings?)") from None
        return restored["state"], data

    def _reshaped(self, step: int, shapes) -> list[str]:
        """'path: checkpoint shape vs config shape' for the model's arrays that differ."""
        stored = flax.traverse_util.flatten_dict(dict(self.manager.item_metadata(step)["state"]), sep="/")
        wanted = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(shapes), sep="/")
        return [f"{k}: {tuple(stored[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
                if k.startswith(("params/", "batch_stats/")) and k in stored
                and tuple(getattr(stored[k], "shape", ())) != tuple(v.shape)]

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


# Top-level parameters a fine-tune may start fresh: classifier heads (a new number of classes) and
# the feature-distillation projection, which only exists while distilling.
FRESH_OK = HEAD_NAMES + ("distill_proj",)


def _overlay(loaded: dict, targets: dict, fresh_ok, what: str) -> tuple[dict, list[str]]:
    """Place `loaded` arrays where `targets` (arrays or shape structs with shardings) expect them;
    a target under a `fresh_ok` top-level name that the checkpoint lacks or shapes differently
    keeps its value. Returns (placed tree, names kept fresh); any other mismatch is an error."""
    fresh, problems = [], []
    for collection in targets:
        source = flax.traverse_util.flatten_dict(loaded.get(collection, {}) or {})

        def pick(path, target):
            keys = tuple(p.key for p in path)
            got = source.get(keys)
            if got is not None and tuple(np.shape(got)) == tuple(target.shape):
                return jax.device_put(np.asarray(got, target.dtype), target.sharding)
            if keys[0] in fresh_ok:
                fresh.append("/".join(keys))
                return target
            problems.append(f"{collection}/{'/'.join(keys)}: checkpoint "
                            f"{'missing' if got is None else tuple(np.shape(got))}, model {tuple(target.shape)}")
            return target
        targets = {**targets, collection: jax.tree_util.tree_map_with_path(pick, targets[collection])}
    if problems:
        raise CheckpointError(f"{what} ({len(problems)} arrays differ):\n  " + "\n  ".join(problems[:10]))
    return targets, fresh


def _check_name(path: str, found: str | None, model_name: str, role: str) -> None:
    if found is not None and found != model_name:
        raise CheckpointError(f"{role} {path} holds {found} weights, not {model_name}; "
                              f"set the model name to {found} or convert {model_name} weights")


def init_from(path: str, model_name: str, params, batch_stats) -> tuple[Any, Any, list[str]]:
    """Overlay weights from `path` onto freshly initialised `params` / `batch_stats` (device
    arrays). The classifier keeps its fresh initialisation when its shape differs (a new number of
    classes); any other mismatch means another model and is an error.
    Returns (params, batch_stats, names of the parameters kept fresh)."""
    loaded, name = _load_variables(path)
    _check_name(path, name, model_name, "init_from")
    placed, fresh = _overlay(loaded, {"params": params, "batch_stats": batch_stats}, FRESH_OK,
                             f"init_from {path} does not fit {model_name}")
    return placed["params"], placed["batch_stats"], fresh


def load_exact(path: str, model_name: str, shapes: dict, shardings: dict) -> dict:
    """Variables from `path` placed with `shardings`; every array must match `shapes` (used for a
    distillation teacher, which must arrive complete, head included)."""
    loaded, name = _load_variables(path)
    _check_name(path, name, model_name, "teacher")
    targets = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                     shapes, shardings)
    placed, _ = _overlay(loaded, targets, (), f"teacher {path} does not fit {model_name}")
    return placed
