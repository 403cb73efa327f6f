"""Device meshes from the config: ICI axes with -1 fill, multi-slice over DCN on the data axis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

# Least to most communication-intensive: the last axis gets the fastest ICI links.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """The configured mesh cannot be laid out on the available devices."""


def fill_axis_sizes(sizes: Sequence[int], num_devices: int, *, what: str = "mesh") -> list[int]:
    """Replaces a single -1 by whatever makes the product equal ``num_devices``."""
    sizes = [int(s) for s in sizes]
    if sizes.count(-1) > 1:
        raise MeshError(f"{what}: at most one axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"{what}: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"{what}: {num_devices} devices are not divisible by the fixed axes {sizes} (product {known})"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"{what}: axis sizes {sizes} use {math.prod(sizes)} devices but {num_devices} are available"
        )
    return sizes


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[list[int], list[int]]:
    """(ici_sizes, dcn_sizes) for ``MESH_AXES`` from a config's ``mesh`` section."""
    num_slices = int(getattr(mesh_cfg, "num_slices", 1))
    if num_slices < 1 or num_devices % num_slices:
        raise MeshError(f"mesh: {num_devices} devices cannot form {num_slices} equal slices")
    ici = fill_axis_sizes(
        [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor],
        num_devices // num_slices,
        what="mesh (ICI)",
    )
    dcn = [num_slices, 1, 1]  # DCN parallelism only on the data axis (MaxText's recommendation)
    return ici, dcn


def build_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the training mesh over ``devices`` (all global devices by default).

    Axes are ``Auto`` so Flax's logical-axis rules and sharding constraints apply (jax_scaling.md 2.3);
    ``jax.make_mesh`` defaults to Explicit, so the types are always passed.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shape(mesh_cfg, len(devices))
    if dcn[0] > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    elif devices[0].platform == "cpu":
        grid = np.asarray(devices).reshape(ici)  # no physical topology to respect
    else:
        grid = mesh_utils.create_device_mesh(ici, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of distinct batch shards: the product of the data-like axes."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
