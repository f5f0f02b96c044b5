"""Checkpoints through orbax: save (async), resume, and start from converted or earlier weights.

A checkpoint holds two items: `state` (the sharded train state; orbax writes it collectively from
every process) and `data` (JSON: the model it belongs to, the data position, which is the number
of batches consumed, and a checksum of the state's arrays). Kept: the last `keep` plus the best by
validation top-1, whose metrics orbax writes beside it, so the best survives restarts.

Restoring verifies: a checkpoint that cannot be read or whose arrays no longer match their
checksum is named, moved aside to WORKDIR/checkpoints_corrupt (never deleted), and the next one
back is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxvision.errors import UserError
from jaxvision.models import vit
from jaxvision.models.registry import HEAD_NAMES

log = logging.getLogger("jaxvision")
BEST_METRIC = "val_top1"


class CheckpointError(UserError):
    """A checkpoint does not fit the run; the message says which and how to proceed."""


def _with_shardings(shapes, shardings):
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _leaf_sums(x):
    """(sum of words, position-weighted sum of words) of an array's bits, in wrapping uint32
    arithmetic: exact whatever the sharding and the order of the sums, and no reshape (which would
    move a sharded array's data)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    words = words.astype(jnp.uint32)
    weight = jnp.ones(x.shape, jnp.uint32)
    for axis, prime in zip(range(x.ndim), (2654435761, 2246822519, 3266489917, 668265263, 374761393, 1181783497)):
        weight = weight + lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(prime)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weight, dtype=jnp.uint32)])


@jax.jit
def _sums(tree):
    return [_leaf_sums(x) for x in jax.tree_util.tree_leaves(tree)]


def checksum(tree) -> str:
    """A digest of every array in `tree`, computed where the arrays are."""
    sums = np.asarray(jax.device_get(_sums(tree)), np.uint32)
    return hashlib.sha256(sums.tobytes()).hexdigest()[:32]


def parts(state) -> dict:
    """The top-level parts of a train state (a dataclass) or of a dict, by name; each has its own
    checksum, so a part can be restored and verified alone (eval needs no optimizer state)."""
    if isinstance(state, dict):
        return dict(state)
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _best(metrics: dict) -> float:
    """The value the best checkpoint is chosen by; a non-finite one never wins."""
    value = float(metrics.get(BEST_METRIC, float("nan")))
    return value if math.isfinite(value) else float("-inf")


class Checkpoints:
    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, create: bool = True):
        if keep < 1:
            raise CheckpointError(f"keep_checkpoints must be at least 1, not {keep}: the run needs its latest "
                                  "checkpoint to resume")
        workdir = os.path.abspath(workdir)
        self.directory = os.path.join(workdir, "checkpoints")
        self.aside = os.path.join(workdir, "checkpoints_corrupt")
        if not create and not os.path.isdir(self.directory):
            self.manager = None
            return
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_best, reverse=False, n=1, keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_best, best_mode="max",
                                               create=create, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return list(self.manager.all_steps()) if self.manager else []

    def latest_step(self) -> int | None:
        return self.manager.latest_step() if self.manager else None

    def best_step(self) -> int | None:
        """The step with the best validation top-1 (None when no checkpoint has one)."""
        if not self.manager:
            return None
        best = self.manager.best_step()
        metrics = self.manager.metrics(best) if best is not None else None
        return best if metrics and math.isfinite(_best(metrics)) else None

    def save(self, step: int, state, data: dict, metrics: dict | None = None) -> None:
        data = {**data, "checksums": {name: checksum(part) for name, part in parts(state).items()}}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data)),
                          metrics=metrics, force=True)

    def restore_good(self, shapes, shardings, expect: dict, prefer: int | None = None,
                     only: tuple[str, ...] = ()):
        """(state, data, step) of the newest readable checkpoint whose arrays match their checksums,
        trying `prefer` first; every bad one on the way is moved aside with a warning. With `only`,
        just those parts of the state, as a dict. None when there is no checkpoint; an error of
        one line when none of them is good."""
        steps = sorted(self.steps(), reverse=True)
        if prefer is not None and prefer in steps:
            steps = [prefer] + [s for s in steps if s != prefer]
        bad = []
        for step in steps:
            try:
                state, data = self.restore(step, shapes, shardings, expect, only)
                sums = data.get("checksums", {})
                damaged = [name for name, part in parts(state).items() if name in sums and sums[name] != checksum(part)]
                problem = f"its {', '.join(damaged)} do not match the checksums written with them" if damaged else None
            except CheckpointError:
                raise  # another model or shape: no fallback would fix that
            except Exception as e:  # noqa: BLE001  (whatever orbax or tensorstore raise on a damaged file)
                problem = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            if problem is None:
                return state, data, step
            bad.append(step)
            self._move_aside(step, problem)
        if bad:
            raise CheckpointError(f"no good checkpoint in {self.directory}: steps {', '.join(map(str, bad))} were "
                                  f"damaged and moved to {self.aside}; use a new --workdir, or run again to start "
                                  "from step 0")
        return None

    def data(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def restore(self, step: int, shapes, shardings, expect: dict, only: tuple[str, ...] = ()) -> tuple[Any, dict]:
        """State (laid out by `shardings`; with `only`, those parts of it as a dict) and data item
        of `step`, after checking that the checkpoint's model matches `expect` (e.g. model name and
        number of classes)."""
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
        target = _with_shardings(shapes, shardings)
        try:
            if only:
                target = {name: part for name, part in parts(target).items() if name in only}
                restored = ocp.PyTreeCheckpointer().restore(
                    os.path.join(self.directory, str(step), "state"),
                    args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                                restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
                return restored, data
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
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

    def _move_aside(self, step: int, problem: str) -> None:
        target = os.path.join(self.aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(self.aside, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxvision checkpoint {step} moved aside")
        log.warning("jaxvision: checkpoint %d in %s is damaged: %s; moved it to %s and trying the one "
                    "before", step, self.directory, problem, target)
        self.manager.reload()

    def wait(self) -> None:
        if self.manager:
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager:
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
        checkpoints = Checkpoints(path, create=False)
        step = checkpoints.best_step() or checkpoints.latest_step()
        if step is None:
            raise CheckpointError(f"init_from {path}: no checkpoint under {path}/checkpoints")
        restored = checkpoints.manager.restore(step, args=ocp.args.Composite(
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
            if keys[0].partition(".")[0] in fresh_ok:  # torchvision's "classifier.6" too
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
    if found is not None and found.partition(".")[0] != model_name.partition(".")[0]:  # tags aside
        raise CheckpointError(f"{role} {path} holds {found} weights, not {model_name}; "
                              f"set the model name to {found} or convert {model_name} weights")


def init_from(path: str, model_name: str, params, batch_stats) -> tuple[Any, Any, list[str]]:
    """Overlay weights from `path` onto freshly initialised `params` / `batch_stats` (device
    arrays). The classifier keeps its fresh initialisation when its shape differs (a new number of
    classes); any other mismatch means another model and is an error.
    Returns (params, batch_stats, names of the parameters kept fresh)."""
    loaded, name = _load_variables(path)
    _check_name(path, name, model_name, "init_from")
    loaded = {**loaded, "params": vit.match_layout(dict(loaded["params"]), params)}  # ViT: layout, grid
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
