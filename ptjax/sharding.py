"""Device mesh, logical axis rules, and putting params and batches on the mesh.

One table (``logical_rules``) maps the logical axes every parameter carries (see
``ptjax.models.common.logical``) to the mesh axes ``data`` and ``model``:

    batch -> data            examples of a batch are split over data-parallel devices
    vocab, heads, mlp -> model    frozen weights are tensor-parallel on ``model``
    embed -> data with fsdp  (FSDP-style: also split the weights over ``data``)
    everything else          replicated (layers, kv, embed without fsdp, ...)

Activations carry the same names (``batch``, ``length``, ``embed``, ``heads``, ``kv``,
``mlp``, ``vocab``) and are pinned with ``constrain`` where the models make them: hidden
states [batch, length, embed] split on ``data``, attention heads, the MLP's intermediate
and the logits also on ``model``. Without it XLA picks activation shardings itself and may
replicate them or gather them back whole.

The prompt and its optimizer state are small and replicated. A dimension that the mesh
axis does not divide (T5-small's 6 heads on 4 devices) stays replicated.

Multi-host: every process runs the same program; ``initialize_distributed`` joins them
(TPU VM workers, SLURM tasks), each process feeds its own rows of the global batch
(``global_batch``), and only process 0 writes results (``is_main_process``).
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptjax.errors import PtjaxError

MESH_AXES = ("data", "model")


def logical_rules(fsdp: bool = False) -> tuple[tuple[str, str | None], ...]:
    """The logical-axis -> mesh-axis table (T5X's ``logical_axis_rules``)."""
    return (
        ("batch", "data"),
        ("vocab", "model"),
        ("heads", "model"),
        ("mlp", "model"),
        ("embed", "data" if fsdp else None),
        ("kv", None),
        ("layers", None),
        ("relpos", None),
        ("positions", None),
        ("length", None),  # activations' sequence axis
    )


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all); -1 = all remaining devices.

    A single process may ask for fewer devices than it has (the first ones are used); a
    multi-host mesh must span every device."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "model": model}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise PtjaxError(f"mesh.{name}={size} must be a positive size or -1 (all "
                             "remaining devices)")
    if data == -1 and model == -1:
        raise PtjaxError("mesh.data and mesh.model cannot both be -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if n % fixed and -1 in sizes.values():
        raise PtjaxError(f"mesh data={data} x model={model} does not divide the {n} devices "
                         "present")
    shape = tuple(n // fixed if s == -1 else s for s in sizes.values())
    used = math.prod(shape)
    if used > n or (used < n and jax.process_count() > 1):
        raise PtjaxError(f"mesh data={shape[0]} x model={shape[1]} = {used} devices, but {n} "
                         "are present; use -1 for one axis to take the rest")
    devices = devices[:used]  # one process may run on the first devices only
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)


def spec_for(axes, shape, mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec for one array with logical ``axes`` (one name or None per dim).

    A mesh axis is used at most once per array, and only where it divides the dimension.
    """
    table = dict(rules)
    used, out = set(), []
    for name, dim in zip(axes, shape):
        mesh_axis = table.get(name) if name is not None else None
        if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
                or dim % mesh.shape[mesh_axis]):
            out.append(None)
        else:
            used.add(mesh_axis)
            out.append(mesh_axis)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def constrain(x, axes, mesh: Mesh | None, rules):
    """``x`` pinned to the sharding its logical ``axes`` name (``spec_for``), for an
    activation inside a jitted function; ``x`` itself, with nothing added to the trace,
    without a mesh or on a one-device mesh. Under ``vmap`` (the K members) ``axes`` name
    the per-member dims and jax leaves the member axis to XLA."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))


def tree_shardings(logical_axes, shapes, mesh: Mesh, rules):
    """NamedShardings for a pytree, given its logical axes and shapes (same structure)."""
    return jax.tree.map(
        lambda axes, shape: NamedSharding(mesh, spec_for(axes, shape, mesh, rules)),
        logical_axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over ``data``, every other dim whole."""
    return NamedSharding(mesh, PartitionSpec("data"))


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array -> a global array with ``sharding``; each process puts only the
    shards its own devices hold (the whole array is never on one device)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This process's rows of a train batch -> global arrays sharded on ``data``.

    Process p holds rows [p * B/n, (p+1) * B/n) of the global batch of B rows.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicated_batch(arrays: dict, mesh: Mesh) -> dict:
    """A batch every process holds whole (dev sets) -> global arrays sharded on ``data``."""
    sharding = batch_sharding(mesh)
    return {k: place(np.asarray(v), sharding) for k, v in arrays.items()}


def to_host(x) -> np.ndarray:
    """A (possibly multi-host) array as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def is_main_process() -> bool:
    return jax.process_index() == 0


def _cluster_detected() -> bool:
    """True where ``jax.distributed.initialize()`` can find its peers by itself: a SLURM
    job step with several tasks, a multi-worker TPU VM, or an explicit coordinator."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get(
        "CLOUD_TPU_TASK_ID_HOSTNAMES", "")


def initialize_distributed(mode: str = "auto") -> bool:
    """Join the other processes of a multi-host job (``mesh.distributed``).

    mode: "auto" (when a cluster is detected), "on" (always), "off" (never). Must run before
    anything touches the devices. Returns True when running multi-process.
    """
    if mode not in ("auto", "on", "off"):
        raise PtjaxError(f"mesh.distributed={mode!r} is not valid; valid: auto, on, off")
    if mode == "off" or (mode == "auto" and not _cluster_detected()):
        return False
    if not jax.distributed.is_initialized():
        # CPU-only hosts (and CPU tests) need gloo for cross-process collectives;
        # GPU and TPU backends ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
    return jax.process_count() > 1


def sync(name: str):
    """A barrier across processes (no-op on one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_batch_size(batch_size: int, mesh, key: str = "train.batch_size",
                     microbatches: int = 1):
    """One line if a batch cannot be split evenly over the mesh's data-parallel devices,
    or into ``microbatches`` (train.microbatches) that each split evenly over them."""
    data = mesh.shape["data"]
    if batch_size % data:
        raise PtjaxError(f"{key}={batch_size} is not a multiple of the mesh's "
                         f"{data} data-parallel devices (mesh.data)")
    if batch_size % microbatches:
        raise PtjaxError(f"train.microbatches={microbatches} does not divide {key}="
                         f"{batch_size}; give a divisor of it")
    if (batch_size // microbatches) % data:
        raise PtjaxError(f"train.microbatches={microbatches} leaves {batch_size // microbatches}"
                         f" examples per microbatch ({key}={batch_size}), not a multiple of "
                         f"the mesh's {data} data-parallel devices (mesh.data); valid: a "
                         f"divisor of {batch_size // data}")
