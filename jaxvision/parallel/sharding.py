"""Parameter shardings from the logical axis names the zoo attaches to every parameter.

Rules (MaxText/big_vision style, but read off the names rather than regexes):
- tensor parallelism: the first axis named ``heads`` or ``mlp`` goes to the `tensor` mesh axis
  (Megatron: qkv and fc1 split their outputs, proj and fc2 their inputs);
- FSDP: a parameter of at least `fsdp_min_size` elements has its largest still-free named axis
  that divides evenly sharded over `fsdp`; smaller ones are replicated (the gather costs more
  than the memory saved);
- everything else is replicated. Optimizer state and EMA copies follow their parameter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TENSOR_AXES = ("heads", "mlp")
# Activations, by the logical names the zoo gives them (`Ops.constrain`): the batch over the
# data-parallel axes; the residual stream's width, the MLP's hidden units and the attention heads
# over `tensor` (Megatron's layout, with the residual stream sharded between blocks rather than
# replicated: the same traffic, as all-gathers and reduce-scatters, and a tensor-th of its memory).
ACTIVATION_RULES = (("batch", ("data", "fsdp")), ("length", None), ("embed", "tensor"), ("mlp", "tensor"),
                    ("heads", "tensor"))


def spec_for(names: tuple, shape: tuple, mesh: Mesh, fsdp_min_size: int) -> P:
    """Partition spec for one parameter with logical axis `names` (None for unnamed axes)."""
    spec: list[Any] = [None] * len(shape)
    tensor, fsdp = mesh.shape.get("tensor", 1), mesh.shape.get("fsdp", 1)
    if tensor > 1:
        for i, name in enumerate(names):
            if name in TENSOR_AXES and shape[i] % tensor == 0:
                spec[i] = "tensor"
                break
    if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
        free = [i for i, name in enumerate(names)
                if name is not None and spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def variable_shardings(boxed_shapes, mesh: Mesh, fsdp_min_size: int = 2 ** 18):
    """NamedShardings for a tree of (possibly logically boxed) abstract variables."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            names, shape = tuple(leaf.names), leaf.value.shape
        else:
            names, shape = (None,) * len(leaf.shape), leaf.shape
        return NamedSharding(mesh, spec_for(names, shape, mesh, fsdp_min_size))
    return jax.tree_util.tree_map(one, boxed_shapes,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def follow_params(tree_shapes, param_shapes, param_shardings, mesh: Mesh):
    """Shardings for a tree (optimizer state, EMA) whose array leaves mirror parameters: a leaf
    whose key path ends with a parameter's path and has its shape takes that parameter's sharding;
    anything else (counts, scalars) is replicated."""
    by_path = {}
    for (path, shape), (_, sharding) in zip(
            jax.tree_util.tree_flatten_with_path(param_shapes)[0],
            jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[_dict_keys(path)] = (tuple(shape.shape), sharding)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys, shape = _dict_keys(path), tuple(getattr(leaf, "shape", ()))
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit and hit[0] == shape:
                return hit[1]
        return replicated
    return jax.tree_util.tree_map_with_path(one, tree_shapes)


def _dict_keys(path) -> tuple:
    """The dictionary keys of a key path (attribute and index steps of wrappers dropped)."""
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


@dataclasses.dataclass
class PlanRow:
    """One array of the plan, as clu's parameter overview lists them, with bytes per device."""

    name: str
    shape: tuple
    dtype: str
    size: int
    sharding: tuple
    mib: float
    mib_per_device: float


def plan_rows(param_shapes, shardings) -> list[PlanRow]:
    """A row for every array of `param_shapes` laid out by `shardings`."""
    rows = []
    for (path, leaf), (_, sharding) in zip(jax.tree_util.tree_flatten_with_path(param_shapes)[0],
                                           jax.tree_util.tree_flatten_with_path(shardings)[0]):
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        split = math.prod(sharding.mesh.shape[a] for axes in sharding.spec if axes
                          for a in ((axes,) if isinstance(axes, str) else axes))
        rows.append(PlanRow("/".join(_dict_keys(path)), tuple(leaf.shape), str(np.dtype(leaf.dtype)),
                            int(np.prod(leaf.shape)), tuple(sharding.spec), nbytes / 2**20, nbytes / split / 2**20))
    return rows


def format_plan(rows: list[PlanRow], mesh: Mesh, max_rows: int = 40) -> str:
    """The largest arrays' layout as clu's parameter-overview table, and the per-device totals."""
    from clu import parameter_overview

    shown = sorted(rows, key=lambda r: -r.mib)[:max_rows]
    total, per_device = sum(r.mib for r in rows), sum(r.mib_per_device for r in rows)
    lines = [f"mesh {dict(mesh.shape)} over {mesh.size} devices", parameter_overview.make_table(shown)]
    if len(rows) > len(shown):
        lines.append(f"... and {len(rows) - len(shown)} smaller arrays")
    lines.append(f"total: {len(rows)} arrays, {total:.2f} MiB, {per_device:.2f} MiB per device")
    return "\n".join(lines)
