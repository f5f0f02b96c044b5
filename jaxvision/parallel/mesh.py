"""The device mesh from the config: named axes `data`, `fsdp`, `tensor`; `-1` takes what is left.

The batch is split over `data` and `fsdp` (FSDP is data parallelism whose parameters are sharded
too) and replicated over `tensor`. With `dcn` sizes set, the mesh is hybrid: `ici` sizes within a
slice or node, `dcn` sizes across them (MaxText's layout), so slow links only carry data-parallel
gradients.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxvision.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(UserError):
    """The requested mesh does not fit the devices, or the batch does not fit the mesh."""


def resolve_shape(sizes: Mapping[str, int], num_devices: int, what: str = "mesh") -> tuple[int, ...]:
    """Axis sizes in `AXES` order with a single -1 filled in so the product is `num_devices`."""
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise MeshError(f"unknown {what} axes {sorted(unknown)}; the axes are {', '.join(AXES)}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    if shape.count(-1) > 1:
        raise MeshError(f"{what} {dict(zip(AXES, shape))}: only one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"{what} {dict(zip(AXES, shape))}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(f"{what} {dict(zip(AXES, shape))}: {num_devices} devices do not divide "
                            f"by the fixed axes' product {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise MeshError(f"{what} {dict(zip(AXES, shape))} needs {math.prod(shape)} devices but "
                        f"there are {num_devices}; set one axis to -1 to use them all")
    return tuple(shape)


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None,
              devices=None) -> Mesh:
    """A mesh over all devices (or `devices`); `dcn` makes it hybrid across slices or hosts."""
    devices = list(devices if devices is not None else jax.devices())
    types = (AxisType.Auto,) * len(AXES)
    if not dcn or all(int(v) == 1 for v in dcn.values()):
        shape = resolve_shape(ici, len(devices))
        if devices == jax.devices():
            return jax.make_mesh(shape, AXES, axis_types=types)
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=types)
    num_granules = math.prod(int(v) for v in dcn.values() if int(v) > 0)
    dcn_shape = resolve_shape(dcn, num_granules, "dcn mesh")
    ici_shape = resolve_shape(ici, len(devices) // num_granules, "ici mesh")
    # Multi-slice TPU devices carry distinct `slice_index`es; elsewhere (GPU nodes, CPU hosts, one
    # slice) a process is the unit that slow links connect.
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    by_process = slices <= 1
    granules = jax.process_count() if by_process else slices
    if granules != num_granules:
        raise MeshError(f"mesh_dcn {dict(zip(AXES, dcn_shape))} spans {num_granules} "
                        f"{'processes' if by_process else 'slices'} but there are {granules}")
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=by_process,
                                                allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=types)


def abstract_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None, num_devices: int) -> AbstractMesh:
    """The mesh `make_mesh` would build over `num_devices` devices, without devices: for lowering
    a program for a pod from any host. Each axis spans its ICI and DCN sizes."""
    dcn = dict(dcn or {})
    num_granules = math.prod(int(v) for v in dcn.values() if int(v) > 0)
    if num_devices % num_granules:
        raise MeshError(f"mesh_dcn {dcn} spans {num_granules} slices or hosts, which do not divide "
                        f"{num_devices} devices")
    dcn_shape = resolve_shape(dcn, num_granules, "dcn mesh") if dcn else (1,) * len(AXES)
    ici_shape = resolve_shape(ici, num_devices // num_granules, "ici mesh")
    shape = tuple(i * d for i, d in zip(ici_shape, dcn_shape))
    return AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, name: str = "batch_size") -> int:
    """Per-process batch for a global batch; fails with the numbers when it does not split."""
    dp = data_parallel_size(mesh)
    if global_batch % dp:
        raise MeshError(f"{name} {global_batch} does not split over the data-parallel size {dp} "
                        f"(mesh {dict(mesh.shape)}: data x fsdp); use a multiple of {dp}")
    if dp % jax.process_count():
        raise MeshError(f"the data-parallel size {dp} does not split over {jax.process_count()} "
                        "processes: each process must hold whole batch shards; give the data or fsdp "
                        "axis a multiple of the process count")
    return global_batch // jax.process_count()
