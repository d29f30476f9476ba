"""Accelerators a step is compiled for without the hardware: ``ptjax plan --target``.

    target = ptjax.targets.describe("h100", "8")      # 8 x H100 on one host
    mesh = make_mesh(devices=target.devices)          # compile-only devices
    jax.jit(step).lower(...).compile()                # the real H100 executable

JAX compiles for a GPU or TPU that is not there from a topology description:
``jax.experimental.topologies.get_topology_desc``. A GPU is described by XLA's own target
spec (``ptjax/target_specs/*.txtpb``, from openxla/xla, Apache-2.0), a TPU by libtpu.
Both need packages that a CPU install does not have: ``pip install 'ptjax[targets]'``
(jax's CUDA 12 plugin and PJRT, cuDNN, CUDA's ptxas, libtpu). JAX must start on its CPU
backend (``JAX_PLATFORMS=cpu``, which ``ptjax plan --target`` sets): the CUDA plugin on
a machine without a GPU otherwise fails to load and no GPU topology can be described.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies

from ptjax.errors import PtjaxError

GiB = 1024 ** 3
SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "target_specs")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One kind of accelerator. gpu: XLA's spec file; tpu: libtpu's name, the rank of its
    topology, its chip config (v4: megacore, one device per chip as JAX runs it), the
    chips one host holds, and its HBM per chip in GiB (Google Cloud's TPU pages)."""
    platform: str
    spec: str = ""
    tpu: str = ""
    dims: int = 2
    chip_config: str = "default"
    host: tuple = (2, 2, 1)
    hbm_gib: float = 0.0


CHIPS = {
    "h100": Chip("gpu", spec="h100_sxm.txtpb"),
    "h200": Chip("gpu", spec="h200.txtpb"),
    "a100": Chip("gpu", spec="a100_sxm_80.txtpb"),
    "tpu-v4": Chip("tpu", tpu="v4", dims=3, chip_config="megacore", hbm_gib=32),
    "tpu-v5e": Chip("tpu", tpu="v5e", dims=2, host=(2, 4, 1), hbm_gib=16),
    "tpu-v5p": Chip("tpu", tpu="v5p", dims=3, hbm_gib=95),
    "tpu-v6e": Chip("tpu", tpu="v6e", dims=2, host=(2, 4, 1), hbm_gib=32),
}
INSTALL = "pip install 'ptjax[targets]'"


@dataclasses.dataclass(frozen=True)
class Target:
    """name: e.g. "h100"; topology: as given ("8", "2x2"); devices: compile-only devices
    to build a mesh on; memory: bytes per device; kind: what one device is."""
    name: str
    topology: str
    devices: tuple
    memory: float
    kind: str

    @property
    def platform(self) -> str:
        return CHIPS[self.name].platform

    def __str__(self) -> str:
        return f"{self.name} {self.topology} ({len(self.devices)} x {self.kind})"


def start_on_cpu():
    """Let JAX start on its CPU backend only, before anything asks for a device: the
    CUDA plugin of ``ptjax[targets]`` fails to load without a GPU, and then no GPU
    topology can be described. A no-op once JAX has started."""
    jax.config.update("jax_platforms", "cpu")


def describe(name: str, topology: str = "") -> Target:
    """The compile-only devices of ``topology`` of ``name`` chips. GPUs: "N" (N GPUs on
    one host, default 1) or "HxN" (H hosts of N); TPUs: the chips per axis, "2x2" (v5e,
    v6e) or "2x2x1" (v4, v5p), default one chip."""
    if name not in CHIPS:
        raise PtjaxError(f"--target {name!r} is not a known accelerator; valid: "
                         f"{', '.join(CHIPS)}")
    chip = CHIPS[name]
    if chip.platform == "gpu":
        devices, memory = _gpu(name, chip, topology or "1")
    else:
        devices, memory = _tpu(name, chip, topology or "x".join(["1"] * chip.dims))
    return Target(name, topology or "1", tuple(devices), memory, devices[0].device_kind)


def _sizes(name: str, topology: str, rank: tuple[int, ...], example: str) -> list[int]:
    if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)*", topology) or \
            len(topology.split("x")) not in rank:
        raise PtjaxError(f"--topology {topology!r} does not describe {name} chips; give e.g. "
                         f"{example}")
    return [int(n) for n in topology.split("x")]


def _gpu(name: str, chip: Chip, topology: str):
    sizes = _sizes(name, topology, (1, 2), "8 (GPUs on one host) or 2x8 (2 hosts of 8)")
    hosts, per_host = (1, sizes[0]) if len(sizes) == 1 else sizes
    with open(os.path.join(SPECS, chip.spec), encoding="utf-8") as f:
        spec = f.read()
    memory = float(re.search(r"device_memory_size:\s*(\d+)", spec).group(1))
    try:
        topo = topologies.get_topology_desc("", "cuda", topology=f"1x{hosts}x{per_host}",
                                            target_config=spec)
    except NotImplementedError:  # the CUDA plugin is not installed, or failed to load
        raise PtjaxError(f"--target {name} needs jax's CUDA plugin, loaded while JAX starts "
                         f"on its CPU: {INSTALL}, and start with JAX_PLATFORMS=cpu (ptjax "
                         "plan --target does)") from None
    return topo.devices, memory


def _tpu(name: str, chip: Chip, topology: str):
    sizes = _sizes(name, topology, (chip.dims,), "x".join(["2"] * (chip.dims - 1) + ["1"])
                   if chip.dims == 3 else "2x2")
    sizes = sizes + [1] * (3 - len(sizes))
    host = tuple(min(s, h) for s, h in zip(sizes, chip.host))
    # libtpu takes a machine-wide lock file as it loads, meant for the processes of one
    # TPU host; a compile-only use holds no chip, so several may load it at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topo = topologies.get_topology_desc(
            f"{chip.tpu}:{topology}", "tpu", chip_config_name=chip.chip_config,
            chips_per_host_bounds=host, num_slices=1, wrap=(False, False, False))
    except RuntimeError as e:  # "JAX TPU support not installed", or libtpu's own refusal
        if "not installed" in str(e):
            raise PtjaxError(f"--target {name} needs libtpu: {INSTALL}") from None
        raise PtjaxError(f"--target {name} --topology {topology}: libtpu cannot describe it "
                         f"({str(e).splitlines()[0]})") from None
    if len(topo.devices) != math.prod(sizes):
        raise PtjaxError(f"--target {name} --topology {topology}: libtpu gave "
                         f"{len(topo.devices)} devices for {math.prod(sizes)} chips")
    return topo.devices, chip.hbm_gib * GiB
