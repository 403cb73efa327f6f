"""Cloud TPU slice names (``v5p-64``, ``v6e-256``, ``2xv5e-256``) -> topology descriptions and chip specs.

Used by ahead-of-time compilation (``unified_mm.tools.aot_compile``) to build abstract TPU devices
with ``jax.experimental.topologies.get_topology_desc`` on a CPU host, and by the TPU launcher to
name accelerator types. Chip figures are the vendor's (cloud.google.com/tpu/docs/<version>); the
peak and HBM tables are shared with the trainer's MFU logging (``unified_mm.train.metrics``).

Naming follows ``gcloud``: v4 and v5p count TensorCores (two per chip, one "megacore" JAX device
per chip), v5e and v6e count chips. Shapes are the standard slice shapes (powers of two).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip figures for memory reports and roofline estimates."""

    generation: str  # "v4" | "v5p" | "v5e" | "v6e"
    device_kind: str  # jax Device.device_kind of one chip
    topology_prefix: str  # get_topology_desc's name prefix ("v5" for v5p)
    chip_config_name: str  # "megacore" (one device per chip) or "default"
    cores_per_chip: int  # how gcloud counts the slice size
    dims: int  # 2D or 3D torus
    hbm_bandwidth_gbps: float  # GB/s
    ici_bandwidth_gbps: float  # bidirectional GB/s per chip
    dcn_bandwidth_gbps: float  # GB/s per chip across slices (ASSUMPTION for v4/v5e/v6e: 50 Gbit/s)
    runtime_version: str  # TPU VM software image for `gcloud compute tpus tpu-vm create`

    # The peak and HBM tables live with the trainer's MFU logging; imported lazily so the TPU
    # launcher can load this file without JAX.
    @property
    def peak_tflops(self) -> float:
        from unified_mm.train.metrics import CHIP_PEAK_TFLOPS

        return CHIP_PEAK_TFLOPS[self.device_kind]

    @property
    def hbm_gib(self) -> float:
        from unified_mm.train.metrics import CHIP_HBM_GIB

        return CHIP_HBM_GIB[self.device_kind]


CHIPS: dict[str, ChipSpec] = {
    # v4 ICI: 6 links x 50 GB/s (TPU v4 paper); the others from the Cloud TPU pages.
    "v4": ChipSpec(
        "v4", "TPU v4", "v4", "megacore", 2, 3, 1200.0, 300.0, 6.25, "tpu-ubuntu2204-base"
    ),
    "v5p": ChipSpec(
        "v5p", "TPU v5", "v5", "megacore", 2, 3, 2765.0, 1200.0, 6.25, "v2-alpha-tpuv5"
    ),
    "v5e": ChipSpec(
        "v5e", "TPU v5 lite", "v5e", "default", 1, 2, 819.0, 400.0, 6.25, "v2-alpha-tpuv5-lite"
    ),
    "v6e": ChipSpec(
        "v6e", "TPU v6 lite", "v6e", "default", 1, 2, 1638.0, 800.0, 6.25, "v2-alpha-tpuv6e"
    ),
}

_NAME = re.compile(r"^(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """One named slice (or several identical slices over DCN)."""

    name: str  # e.g. "v5p-64" (per slice)
    chip: ChipSpec
    num_chips: int  # per slice
    shape: tuple[int, ...]  # chip grid of one slice
    wrap: tuple[bool, bool, bool]
    num_slices: int = 1

    @property
    def topology_name(self) -> str:
        """get_topology_desc's topology string, e.g. "v5:2x4x4"."""
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        return (1, 1, 1) if self.num_chips == 1 else (2, 2, 1)

    @property
    def total_chips(self) -> int:
        return self.num_chips * self.num_slices

    @property
    def accelerator_type(self) -> str:
        """gcloud's --accelerator-type of one slice."""
        return self.name

    @property
    def hosts_per_slice(self) -> int:
        return max(1, self.num_chips // 4)

    def describe(self) -> str:
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        return f"{slices}{self.name} ({self.topology_name}, {self.num_chips} chips of {self.chip.device_kind})"


def _grid_2d(chips: int) -> tuple[int, int]:
    # Standard v5e/v6e slices: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16.
    a = b = 1
    while a * b < chips:
        if a == b:
            b *= 2
        else:
            a *= 2
    return a, b


def _grid_3d(chips: int) -> tuple[int, int, int]:
    # Standard v4/v5p slices: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...
    if chips == 4:
        return 2, 2, 1
    dims = [2, 2, 2]
    while dims[0] * dims[1] * dims[2] < chips:
        smallest = min(dims)
        i = max(j for j in range(3) if dims[j] == smallest)  # grow the rightmost smallest axis
        dims[i] *= 2
    return dims[0], dims[1], dims[2]


def parse_topology(name: str, num_slices: int | None = None) -> Topology:
    """``v5p-64``, ``v6e-256``, ``v4-32``, ``v5e-16`` (or ``v5litepod-16``), ``2xv5e-256``.

    ``num_slices`` overrides (or, if the name has no ``Nx`` prefix, sets) the slice count.
    """
    m = _NAME.match(name.strip().lower())
    if not m:
        raise ValueError(
            f"unknown TPU topology {name!r}; expected <v4|v5p|v5e|v6e>-<size> such as v5p-64, "
            "v6e-256 or 2xv5e-256 (multi-slice)"
        )
    prefix_slices, gen, size = m.group(1), m.group(2), int(m.group(3))
    gen = "v5e" if gen == "v5litepod" else gen
    chip = CHIPS[gen]
    if size % chip.cores_per_chip:
        raise ValueError(f"{name}: {gen} sizes count TensorCores and must be even, got {size}")
    chips = size // chip.cores_per_chip
    if chips & (chips - 1) or chips < 1:
        raise ValueError(f"{name}: only power-of-two slice sizes are supported, got {chips} chips")
    if chip.dims == 2:
        if chips > 256:
            raise ValueError(f"{name}: a {gen} slice has at most 256 chips")
        shape: tuple[int, ...] = _grid_2d(chips)
        # A full 16-chip row or column closes into a ring (as the 128/256-chip pods do).
        wrap = (shape[0] == 16, shape[1] == 16, False)
    else:
        if chips < 4:
            raise ValueError(f"{name}: the smallest {gen} slice is {gen}-8 (4 chips)")
        shape = _grid_3d(chips)
        full_cube = all(d >= 4 for d in shape)
        wrap = (full_cube, full_cube, full_cube)
    slices = int(num_slices or (int(prefix_slices) if prefix_slices else 1))
    if slices < 1:
        raise ValueError(f"{name}: num_slices must be >= 1, got {slices}")
    return Topology(f"{gen}-{size}", chip, chips, shape, wrap, slices)


def topology_devices(topo: Topology) -> list:
    """Abstract TPU devices of ``topo`` (needs the libtpu wheel, not TPU hardware)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            "ahead-of-time TPU compilation needs the libtpu wheel: pip install -e '.[tpu]' "
            "(works on a CPU-only host)"
        )
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology_name,
        chip_config_name=topo.chip.chip_config_name,
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=topo.num_slices,
        wrap=topo.wrap,
    )
    devices = list(desc.devices)
    if len(devices) != topo.total_chips:
        raise ValueError(
            f"{topo.describe()}: libtpu reports {len(devices)} devices, expected {topo.total_chips}"
        )
    return devices
