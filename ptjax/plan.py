"""``ptjax plan``: memory per device of a run's train step, before any weight is loaded.

The step is compiled ahead of time (as MaxText does) on abstract inputs that carry the
run's shardings: ``jax.ShapeDtypeStruct`` params, train state and batch, so an 11B model
is planned on a laptop. XLA's memory analysis of the compiled step gives the argument,
output and temporary (activation) buffers per device; the weights, trainable state and
batch are also counted from their shardings, so the report can say what takes the room.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np

from ptjax import methods
from ptjax.aot import (GiB, check_fits, compile_decode, compile_eval, compile_step, compiled_peak,
                       device_memory_limit, per_device_bytes, resolve_remat, step_flops,
                       step_peak, with_shardings)
from ptjax.errors import PtjaxError
from ptjax.methods.base import check_run
from ptjax.methods.prefix import model_sites, site_geometry
from ptjax.models.attention import cudnn_serves
from ptjax.models.hf_config import architecture
from ptjax.models.model import DTYPES, Model, abstract_params, count_params, param_shardings
from ptjax.models.named import model_path
from ptjax.sharding import initialize_distributed, logical_rules, make_mesh
from ptjax.targets import Target


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


@dataclasses.dataclass
class Planned:
    """A run's train step compiled on abstract inputs (``compile_plan``): the model (its
    remat resolved) and method, the mesh, the abstract trainable / frozen trees, the
    compiled step with its state and batch, the accelerator peak estimate, the remat
    policies tried, and the device memory it is held against (and where that came from)."""
    model: object
    method: object
    mesh: object
    trainable: object
    frozen: object
    compiled: object
    state: object
    batch: object
    estimate: int
    remat_tried: dict
    limit: float | None
    source: str


def compile_plan(cfg, device_memory: float | None = None,
                 target: Target | None = None) -> Planned:
    """Compile the run's train step on abstract inputs, for this machine's devices or for
    ``target``'s (``ptjax.targets.describe``), with ``model.remat=auto`` resolved against
    ``device_memory`` (default: the target's, else the device's own)."""
    if target is None:
        initialize_distributed(cfg.mesh.distributed)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model,
                     devices=None if target is None else target.devices)
    path = model_path(cfg.model)
    config = architecture(path)
    dtype = DTYPES[cfg.model.dtype]
    model = Model(config=config, params=None, dtype=dtype, path=path, remat=cfg.model.remat,
                  attention=cfg.model.attention, mesh=mesh, fsdp=cfg.mesh.fsdp)
    method = methods.build(cfg, config, dtype)
    check_run(model, method, cfg, mesh)
    rules = logical_rules(cfg.mesh.fsdp)
    frozen = None
    if not method.tunes_weights:
        frozen = with_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                             abstract_params(config)),
                                param_shardings(config, mesh, rules))
    shapes = method.shapes()
    trainable = with_shardings(shapes, method.shardings(shapes, mesh, rules))
    if device_memory:
        limit, source = device_memory, "--device-memory"
    elif target is not None:
        limit, source = target.memory, f"{target.name}'s memory"
    else:
        limit, source = device_memory_limit()
    model, remat_tried = resolve_remat(model, method, cfg, mesh, trainable, frozen, limit)
    compiled, state, batch, estimate = check_fits(
        lambda: compile_step(model, method, cfg, mesh, trainable, frozen),
        f"the train step (model.remat={model.remat})")
    return Planned(model, method, mesh, trainable, frozen, compiled, state, batch, estimate,
                   remat_tried, limit, source)


def plan(cfg, device_memory: float | None = None, target: Target | None = None,
         steps=("train",)) -> dict:
    """``compile_plan``'s step summarised: memory per device in bytes (what the weights,
    the trainable state, the batch and the temporaries take), FLOPs, the remat chosen,
    whether it fits. ``steps`` may add "eval" (rank scoring of one eval batch) and
    "decode" (KV-cache decoding behind every member; not for a masked LM, which does not
    decode), each compiled for the same devices:
    their peaks per device in ``per_device`` as eval_peak / decode_peak. With
    train.microbatches > 1 the step is also compiled in one pass: its accelerator peak is
    ``per_device["one_pass_peak"]``, what the microbatches save."""
    p = compile_plan(cfg, device_memory, target)
    if p.model.kind == "masked":  # a masked LM has no decoding (docs/masked-lm.md)
        steps = tuple(s for s in steps if s != "decode")
    others = {f"{name}_peak": compiled_peak(check_fits(
        lambda: compile(p.model, p.method, cfg, p.mesh, p.trainable, p.frozen), what))
        for name, compile, what in (("eval", compile_eval, "the eval step"),
                                    ("decode", compile_decode, "decoding"))
        if name in steps}
    M = cfg.train.microbatches
    if M > 1:  # what they save: the same step (remat as chosen) in one pass, compiled too
        one_pass = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                      microbatches=1))
        others["one_pass_peak"] = step_peak(p.model, p.method, one_pass, p.mesh, p.trainable,
                                            p.frozen)
    model, method, mesh, tc = p.model, p.method, p.mesh, cfg.train
    config, frozen, compiled, estimate = model.config, p.frozen, p.compiled, p.estimate
    limit, source = p.limit, p.source
    B, Li, Lt = tc.batch_size, cfg.task.max_input_length, cfg.task.max_target_length
    peak = compiled_peak(compiled)
    flops = step_flops(model, method, cfg, p.trainable, frozen)
    return {
        "model": model.path, "model_type": config.model_type,
        "parameters": count_params(abstract_params(config)),
        "dtype": cfg.model.dtype, "remat": model.remat, "remat_setting": cfg.model.remat,
        "remat_tried": p.remat_tried, "attention": attention_summary(model, cfg),
        "method": method.name,
        "prompts": method.K, "prompt_length": method.prompt_tokens,
        "trainable_parameters_per_member": int(sum(
            math.prod(x.shape[1:]) for x in jax.tree.leaves(p.trainable))),
        "batch_size": B, "input_length": Li, "target_length": Lt,
        "microbatches": M, "microbatch_size": B // M,
        "mesh": {"data": mesh.shape["data"], "model": mesh.shape["model"],
                 "fsdp": cfg.mesh.fsdp},
        "target": None if target is None else str(target),
        "devices": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}",
        "per_device": {
            "frozen_weights": 0 if frozen is None else per_device_bytes(frozen),
            "trainable_and_optimizer": per_device_bytes(p.state),
            "batch": per_device_bytes(p.batch),
            "temporaries": compiled.memory_analysis().temp_size_in_bytes,
            "peak": peak,
            "cpu_weight_upcast": peak - estimate,
            "accelerator_peak": estimate,
            **others,
        },
        "flops_per_step": flops,
        "flops_per_step_per_device": flops / mesh.devices.size,
        "device_memory": limit, "device_memory_source": source,
        "fits": None if limit is None else bool(estimate <= limit),
    }


def attention_summary(model, cfg) -> dict:
    """What attention the planned step runs (on the mesh's platform) and why."""
    config = model.config
    head_dim = site_geometry(config, model_sites(config)[0])[2]
    rate = cfg.train.attention_dropout
    setting = cfg.model.attention
    if rate > 0:
        used, why = "einsum", (f"train.attention_dropout={rate} > 0: fused attention has no "
                               "dropout (set it to 0 for the fused path)")
    elif setting != "auto":
        used, why = setting, "model.attention"
    elif cudnn_serves(model.options(right_padded=True), head_dim=head_dim, dtype=model.dtype,
                      T=2, S=2):
        used, why = "cudnn", ("auto: GPU, bf16/fp16, head size fits (at even sequence "
                              "lengths; an odd one runs xla)")
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
        f"{p['target_length']})"
        + (f" in {p['microbatches']} microbatches of {p['microbatch_size']}"
           if p.get("microbatches", 1) > 1 else "") + f" on {p['devices']}"
        + (f" (compiled for {p['target']}, no hardware needed)" if p.get("target") else "")
        + f", mesh data={p['mesh']['data']} model={p['mesh']['model']}"
        + (" fsdp" if p['mesh']['fsdp'] else ""),
        f"model FLOPs per step {p['flops_per_step']:.3g} ({p['flops_per_step_per_device']:.3g} "
        "per device; every layer counted, no recomputation)",
        "per device:",
        f"  frozen weights          {g(d['frozen_weights'])}",
        f"  trainable + optimizer   {g(d['trainable_and_optimizer'])}",
        f"  batch                   {g(d['batch'])}",
        f"  activations, temporaries{g(d['temporaries'])}   (compiled step)",
        f"  peak                    {g(d['peak'])}   (arguments + outputs - donated + "
        "temporaries)",
    ]
    for name, label, what in (("eval_peak", "eval step peak", "one eval batch, rank scoring"),
                              ("decode_peak", "decoding peak", "KV cache, every member")):
        if name in d:
            lines.append(f"  {label:<24}{g(d[name])}   ({what})")
    if d["cpu_weight_upcast"]:
        lines += [
            f"  of which fp32 weights   {g(d['cpu_weight_upcast'])}   (XLA's CPU backend "
            f"converts {p['dtype']} weights for its matmuls; GPUs and TPUs do not)",
            f"  peak on an accelerator  {g(d['accelerator_peak'])}   (estimate: peak minus "
            "that copy)"]
    if "one_pass_peak" in d:
        saved = d["one_pass_peak"] - d["accelerator_peak"]
        lines.append(f"  without microbatches    {g(d['one_pass_peak'])}   (the batch in one "
                     f"pass: train.microbatches={p['microbatches']} saves {g(saved).strip()})")
    if p["fits"] is None:
        lines.append("device memory unknown: pass --device-memory (e.g. 80GB) to check a fit")
    else:
        room = p["device_memory"] - d["accelerator_peak"]
        verdict = (f"fits, {room / GiB:.2f} GiB to spare" if p["fits"] else
                   f"does NOT fit: {-room / GiB:.2f} GiB short (try model.remat=full, "
                   "model.dtype=bfloat16, train.microbatches, or more devices)")
        lines.append(f"device memory {p['device_memory'] / GiB:.2f} GiB "
                     f"({p['device_memory_source']}): {verdict}")
    return "\n".join(lines)


def write_plan(p: dict, path: str):
    with open(path, "w") as f:
        json.dump(p, f, indent=2, default=lambda x: x.item() if isinstance(x, np.generic)
                  else str(x))
