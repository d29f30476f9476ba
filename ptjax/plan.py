"""``ptjax plan``: memory per device of a run's train step, before any weight is loaded.

The step is compiled ahead of time (as MaxText does) on abstract inputs that carry the
run's shardings: ``jax.ShapeDtypeStruct`` params, train state and batch, so an 11B model
is planned on a laptop. XLA's memory analysis of the compiled step gives the argument,
output and temporary (activation) buffers per device; the weights, trainable state and
batch are also counted from their shardings, so the report can say what takes the room.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.errors import PtjaxError

GiB = 1024 ** 3


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs / arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None \
            else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def parse_bytes(text: str) -> float:
    """'80GB', '24GiB', '80e9' -> bytes (GB and GiB both read as 2**30, as GPUs are sold)."""
    t = str(text).strip().upper().replace(" ", "")
    for suffix in ("GIB", "GB", "G"):
        if t.endswith(suffix):
            return float(t[:-len(suffix)]) * GiB
    try:
        return float(t)
    except ValueError:
        raise PtjaxError(f"--device-memory {text!r} is not a size; give e.g. 80GB or "
                         "24GiB") from None


def device_memory_limit():
    """(bytes, where it came from) for the first local device, or (None, why not)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"], "reported by the device"
    if jax.default_backend() == "cpu":
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size / max(jax.local_device_count(), 1), "host RAM / CPU devices"
    return None, "unknown"


# model.remat=auto tries these in order (least recomputation first) and keeps the first
# whose compiled step fits HEADROOM of the device (XLA's own buffers, fragmentation and
# the estimate's error need the rest).
REMAT_ORDER = ("none", "dots", "full")
HEADROOM = 0.9


def choose_remat(peak_of, limit: float | None, order=REMAT_ORDER, headroom: float = HEADROOM):
    """(policy, {policy: peak bytes tried}) for ``model.remat=auto``: the first policy of
    ``order`` whose ``peak_of(policy)`` is within ``headroom`` x ``limit``; the last one
    (full remat, the smallest) when none fits, or the first when the limit is unknown."""
    peaks = {}
    for policy in order:
        peaks[policy] = peak_of(policy)
        if limit is None or peaks[policy] <= headroom * limit:
            return policy, peaks
    return order[-1], peaks


def abstract_batch(model, cfg, mesh) -> dict:
    """ShapeDtypeStructs of one train batch of a run (sharded over data)."""
    from ptjax.sharding import batch_sharding

    from ptjax.verbalizers import scoring

    B, Li, Lt = cfg.train.batch_size, cfg.task.max_input_length, cfg.task.max_target_length
    s = scoring(cfg.task)
    R = B * (1 if s is None else s.W)  # the class-level loss pairs each example with W words
    ids = lambda L, rows=R: jax.ShapeDtypeStruct((rows, L), jnp.int32,  # noqa: E731
                                                 sharding=batch_sharding(mesh))
    if model.is_encoder_decoder:
        out = dict(input_ids=ids(Li), input_mask=ids(Li), decoder_input_ids=ids(Lt),
                   targets=ids(Lt), target_mask=ids(Lt))
    else:
        out = {k: ids(Li + Lt) for k in ("input_ids", "input_mask", "targets", "target_mask")}
    if s is not None:
        out["word_mask"] = ids(Lt if model.is_encoder_decoder else Li + Lt)
        out["label"] = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=batch_sharding(mesh))
    return out


def as_abstract(tree):
    """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs with their shardings."""
    if tree is None:
        return None
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def compile_step(model, method, cfg, mesh, trainable, frozen):
    """AOT-compile the run's train step on abstract inputs -> (compiled, state, batch,
    peak bytes per device on an accelerator)."""
    from ptjax.train import setup

    _, state, step = setup(model, method, cfg, mesh, as_abstract(trainable),
                           as_abstract(frozen), abstract=True)
    batch = abstract_batch(model, cfg, mesh)
    compiled = step.lower(state, frozen if frozen is None else as_abstract(frozen),
                          batch).compile()
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    return compiled, state, batch, peak - cpu_weight_upcast(model, trainable, frozen)


def cpu_weight_upcast(model, trainable, frozen) -> int:
    """XLA's CPU backend has no bf16/fp16 matmuls: it converts the (loop-invariant) weights
    to fp32 once, a weight-sized temporary that GPUs and TPUs never allocate."""
    if jax.default_backend() != "cpu" or model.dtype == jnp.float32:
        return 0
    weights = frozen if frozen is not None else trainable["params"]
    return _per_device_bytes(weights) * 4 // jnp.dtype(model.dtype).itemsize


def resolve_remat(model, method, cfg, mesh, trainable, frozen, device_memory=None):
    """``model`` with ``remat="auto"`` replaced by ``choose_remat``'s pick (compiling the
    step once per policy tried); returns (model, {policy: peak bytes tried})."""
    import dataclasses

    if model.remat != "auto":
        return model, {}
    limit = device_memory or device_memory_limit()[0]

    def peak_of(policy):
        return compile_step(dataclasses.replace(model, remat=policy), method, cfg, mesh,
                            trainable, frozen)[3]

    policy, peaks = choose_remat(peak_of, limit)
    return dataclasses.replace(model, remat=policy), peaks


def plan(cfg, device_memory: float | None = None) -> dict:
    """Compile the run's train step on abstract inputs; memory per device in bytes.
    With ``model.remat=auto`` the policy it would pick is planned (``remat_tried``)."""
    from ptjax import methods
    from ptjax.models.model import Model, abstract_params, architecture, param_shardings
    from ptjax.run import TINY, check_lengths, model_dir
    from ptjax.sharding import initialize_distributed, logical_rules, make_mesh

    initialize_distributed(cfg.mesh.distributed)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    path = model_dir(cfg.model)  # one line for a path that is no model (tiny-t6)
    if cfg.model.path in TINY:
        from ptjax.models.tiny import build_tiny_model

        path = build_tiny_model(path, family=TINY[cfg.model.path])
    config = architecture(path)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[
        cfg.model.dtype]
    model = Model(config=config, params=None, dtype=dtype, path=path, remat=cfg.model.remat,
                  attention=cfg.model.attention, mesh=mesh, fsdp=cfg.mesh.fsdp)
    method = methods.build(cfg, config, dtype)
    method.check(model)
    check_lengths(model, method, cfg)
    tc = cfg.train
    if tc.batch_size % mesh.shape["data"]:
        raise PtjaxError(f"train.batch_size={tc.batch_size} is not a multiple of the mesh's "
                         f"{mesh.shape['data']} data-parallel devices (mesh.data)")

    rules = logical_rules(cfg.mesh.fsdp)
    frozen = None
    if not method.tunes_weights:
        frozen = _abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                        abstract_params(config)),
                           param_shardings(config, mesh, rules))
    shapes = method.shapes()
    trainable = _abstract(shapes, method.shardings(shapes, mesh, rules))
    B, Li, Lt = tc.batch_size, cfg.task.max_input_length, cfg.task.max_target_length
    model, remat_tried = resolve_remat(model, method, cfg, mesh, trainable, frozen,
                                       device_memory)
    compiled, state, batch, estimate = compile_step(model, method, cfg, mesh, trainable,
                                                    frozen)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax returns one dict per computation
        cost = cost[0] if cost else {}
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    limit, source = (device_memory, "--device-memory") if device_memory else \
        device_memory_limit()
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
    upcast = peak - estimate
    return {
        "model": path, "model_type": config.model_type, "parameters": n_params,
        "dtype": cfg.model.dtype, "remat": model.remat, "remat_setting": cfg.model.remat,
        "remat_tried": remat_tried, "attention": attention_summary(model, cfg),
        "method": method.name,
        "prompts": method.K, "prompt_length": method.prompt_tokens,
        "trainable_parameters_per_member": int(sum(
            math.prod(x.shape[1:]) for x in jax.tree.leaves(shapes))),
        "batch_size": B, "input_length": Li, "target_length": Lt,
        "mesh": {"data": mesh.shape["data"], "model": mesh.shape["model"],
                 "fsdp": cfg.mesh.fsdp},
        "devices": f"{len(mesh.devices.flat)} x {jax.devices()[0].device_kind}",
        "per_device": {
            "frozen_weights": 0 if frozen is None else _per_device_bytes(frozen),
            "trainable_and_optimizer": _per_device_bytes(state),
            "batch": _per_device_bytes(batch),
            "temporaries": mem.temp_size_in_bytes,
            "peak": peak,
            "cpu_weight_upcast": upcast,
            "accelerator_peak": estimate,
        },
        "flops_per_step_per_device": float(cost.get("flops", 0.0)),
        "device_memory": limit, "device_memory_source": source,
        "fits": None if limit is None else bool(estimate <= limit),
    }


def attention_summary(model, cfg) -> dict:
    """What attention the planned step runs (on this backend) and why."""
    from ptjax.models.attention import cudnn_serves
    from ptjax.models.common import ModelOptions

    config = model.config
    head_dim = config.d_kv if model.is_encoder_decoder else config.n_embd // config.n_head
    rate = cfg.train.attention_dropout
    setting = cfg.model.attention
    if rate > 0:
        used, why = "einsum", (f"train.attention_dropout={rate} > 0: fused attention has no "
                               "dropout (set it to 0 for the fused path)")
    elif setting != "auto":
        used, why = setting, "model.attention"
    elif cudnn_serves(ModelOptions(right_padded=True), head_dim=head_dim, dtype=model.dtype,
                      T=2, S=2, has_bias=False):
        used, why = "cudnn", "auto: GPU, bf16/fp16, head size fits"
    else:
        used, why = "xla", ("auto: cuDNN needs a GPU, bf16/fp16 and a head size that is a "
                            "multiple of 8 up to 256")
    return {"setting": setting, "train_step": used, "why": why, "attention_dropout": rate}


def format_plan(p: dict) -> str:
    d = p["per_device"]

    def g(x):
        return f"{x / GiB:9.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:9.2f} MiB"

    lines = [
        f"{p['model']} ({p['model_type']}, {p['parameters'] / 1e6:,.1f}M parameters, "
        f"{p['dtype']}, remat {p['remat']}"
        + (" (auto)" if p.get("remat_setting") == "auto" else "") + f"), {p['method']} tuning"
        + (f", {p['prompts']} x {p['prompt_length']} prompt tokens"
           if p["prompt_length"] else "")
        + f", {p['trainable_parameters_per_member']:,} trainable parameters each",
        f"attention {p['attention']['train_step']} ({p['attention']['why']})",
        f"batch {p['batch_size']} x (inputs {p['input_length']} + targets "
        f"{p['target_length']}) on {p['devices']}, mesh data={p['mesh']['data']} "
        f"model={p['mesh']['model']}{' fsdp' if p['mesh']['fsdp'] else ''}",
        "per device:",
        f"  frozen weights          {g(d['frozen_weights'])}",
        f"  trainable + optimizer   {g(d['trainable_and_optimizer'])}",
        f"  batch                   {g(d['batch'])}",
        f"  activations, temporaries{g(d['temporaries'])}   (compiled step)",
        f"  peak                    {g(d['peak'])}   (arguments + outputs - donated + "
        "temporaries)",
    ]
    if d["cpu_weight_upcast"]:
        lines += [
            f"  of which fp32 weights   {g(d['cpu_weight_upcast'])}   (XLA's CPU backend "
            f"converts {p['dtype']} weights for its matmuls; GPUs and TPUs do not)",
            f"  peak on an accelerator  {g(d['accelerator_peak'])}   (estimate: peak minus "
            "that copy)"]
    if p["fits"] is None:
        lines.append("device memory unknown: pass --device-memory (e.g. 80GB) to check a fit")
    else:
        room = p["device_memory"] - d["accelerator_peak"]
        verdict = (f"fits, {room / GiB:.2f} GiB to spare" if p["fits"] else
                   f"does NOT fit: {-room / GiB:.2f} GiB short (try model.remat=full, "
                   "model.dtype=bfloat16, a smaller train.batch_size, or more devices)")
        lines.append(f"device memory {p['device_memory'] / GiB:.2f} GiB "
                     f"({p['device_memory_source']}): {verdict}")
    return "\n".join(lines)


def write_plan(p: dict, path: str):
    import json

    with open(path, "w") as f:
        json.dump(p, f, indent=2, default=lambda x: x.item() if isinstance(x, np.generic)
                  else str(x))
