"""Ahead-of-time compiles of a run's train step on abstract inputs: the peak memory per
device, and ``model.remat=auto``'s choice of the cheapest remat policy that fits.

The step is compiled (as MaxText does) on ``jax.ShapeDtypeStruct`` params, train state and
batch that carry the run's shardings, so no weight is loaded and an 11B model is planned
on a laptop.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

import jax
import jax.numpy as jnp

from ptjax.errors import PtjaxError
from ptjax.evaluation import member_inputs, member_scores, rows_of
from ptjax.models.generate import gpt2_generate, t5_generate
from ptjax.sharding import batch_sharding, make_mesh, replicated
from ptjax.train import setup
from ptjax.verbalizers import scoring

GiB = 1024 ** 3


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs / arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None \
            else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of ``tree``'s leaves carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


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
    B, Li, Lt = cfg.train.batch_size, cfg.task.max_input_length, cfg.task.max_target_length
    s = scoring(cfg.task)
    R = B * (1 if s is None else s.W)  # the class-level loss pairs each example with W words
    ids = lambda L, rows=R: jax.ShapeDtypeStruct((rows, L), jnp.int32,  # noqa: E731
                                                 sharding=batch_sharding(mesh))
    width = Li if model.kind == "masked" else Li + Lt  # a masked LM's targets are in Li
    if model.is_encoder_decoder:
        out = dict(input_ids=ids(Li), input_mask=ids(Li), decoder_input_ids=ids(Lt),
                   targets=ids(Lt), target_mask=ids(Lt))
    else:
        out = {k: ids(width) for k in ("input_ids", "input_mask", "targets", "target_mask")}
    if s is not None:
        out["word_mask"] = ids(Lt if model.is_encoder_decoder else width)
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
    _, state, step = setup(model, method, cfg, mesh, as_abstract(trainable),
                           as_abstract(frozen), abstract=True)
    batch = abstract_batch(model, cfg, mesh)
    compiled = compile_lowered(mesh, step.lower(state, as_abstract(frozen), batch))
    return (compiled, state, batch,
            compiled_peak(compiled) - cpu_weight_upcast(model, trainable, frozen))


def compile_lowered(mesh, lowered):
    """``lowered.compile()`` for ``mesh``'s devices. For a GPU this machine does not have
    (``ptjax.targets``) XLA cannot autotune, and its Triton matmuls then fail to find tile
    sizes for some shapes ("Couldn't find output tile sizes"): those compile with cuBLAS's
    matmuls (``xla_gpu_enable_triton_gemm`` off), the same buffers for the plan."""
    platform = mesh.devices.flat[0].platform
    if platform == "gpu" and jax.default_backend() != "gpu":
        return lowered.compile(compiler_options={"xla_gpu_enable_triton_gemm": False})
    return lowered.compile()


def compiled_peak(compiled) -> int:
    """Peak bytes per device of a compiled step: arguments + outputs - donated (aliased)
    buffers + temporaries, from XLA's memory analysis."""
    mem = compiled.memory_analysis()
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def cpu_weight_upcast(model, trainable, frozen) -> int:
    """XLA's CPU backend has no bf16/fp16 matmuls: it converts the (loop-invariant) weights
    to fp32 once, a weight-sized temporary that GPUs and TPUs never allocate."""
    if (model.options().platform or jax.default_backend()) != "cpu" or \
            model.dtype == jnp.float32:
        return 0
    weights = frozen if frozen is not None else trainable["params"]
    return per_device_bytes(weights) * 4 // jnp.dtype(model.dtype).itemsize


# libtpu refuses, while compiling, a program whose temporaries exceed the chip's HBM (a GPU
# compiles it and fails when it runs): "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the
# total memory required for HLO temporaries (27.02G) exceeds available HBM (15.75G)."
_REFUSED = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds available "
                      r"HBM \(([0-9.]+)([KMGT])\)")


def _bytes(number: str, unit: str) -> float:
    return float(number) * 1024 ** ("KMGT".index(unit) + 1)  # libtpu's G: GiB


class DoesNotFit(PtjaxError):
    """``check_fits``'s one line, carrying the refused program's temporaries (bytes)."""

    def __init__(self, message: str, temporaries: float):
        super().__init__(message)
        self.temporaries = temporaries


def refused_bytes(error: BaseException | str) -> float | None:
    """The temporaries (bytes; a lower bound of the peak) of a program the TPU compiler
    refused for not fitting its HBM (libtpu's error or ``check_fits``'s), or None for any
    other error."""
    if isinstance(error, DoesNotFit):
        return error.temporaries
    m = _REFUSED.search(str(error))
    return None if m is None else _bytes(m.group(1), m.group(2))


def check_fits(compile_fn, what: str):
    """``compile_fn()``, with the TPU compiler's refusal of ``what`` (e.g. "the train
    step") as one line that says so and what to change."""
    try:
        return compile_fn()
    except jax.errors.JaxRuntimeError as e:
        m = _REFUSED.search(str(e))
        if m is None:
            raise
        need, hbm = _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
        raise DoesNotFit(
            f"{what} does not fit: the TPU compiler refuses it (its temporaries alone "
            f"take {need / GiB:.2f} GiB of the chip's {hbm / GiB:.2f} GiB); use more chips "
            "(--topology, mesh.*), model.remat=full, a smaller train.batch_size or "
            "train.eval_batch_size, or shorter inputs", need) from None


def step_peak(model, method, cfg, mesh, trainable, frozen) -> float:
    """``compile_step``'s accelerator peak per device; a step the TPU compiler refuses for
    its memory counts its temporaries (a lower bound: more than the chip has)."""
    try:
        return compile_step(model, method, cfg, mesh, trainable, frozen)[3]
    except jax.errors.JaxRuntimeError as e:
        if refused_bytes(e) is None:
            raise
        return refused_bytes(e)


def resolve_remat(model, method, cfg, mesh, trainable, frozen, device_memory=None):
    """``model`` with ``remat="auto"`` replaced by ``choose_remat``'s pick (compiling the
    step once per policy tried); returns (model, {policy: peak bytes tried}). A policy the
    TPU compiler refuses for its memory counts its temporaries (more than the chip has)."""
    if model.remat != "auto":
        return model, {}
    limit = device_memory or device_memory_limit()[0]

    def peak_of(policy):
        return step_peak(dataclasses.replace(model, remat=policy), method, cfg, mesh,
                         trainable, frozen)

    policy, peaks = choose_remat(peak_of, limit)
    return dataclasses.replace(model, remat=policy), peaks


def auto_remat(model, method, cfg, mesh, trainable, frozen):
    """``model`` ready for ``ptjax.train.setup``: ``model.remat=auto`` resolved to the
    cheapest policy whose compiled step fits the device (``resolve_remat``: one AOT compile
    per policy tried; process 0 prints the peaks), any other policy as it is."""
    if model.remat != "auto":
        return model
    model, peaks = resolve_remat(model, method, cfg, mesh, trainable, frozen)
    if jax.process_index() == 0:
        print(f"model.remat=auto: {model.remat} (compiled peaks: " + ", ".join(
            f"{k} {v / GiB:.2f} GiB" for k, v in peaks.items()) + ")", flush=True)
    return model


def step_flops(model, method, cfg, trainable, frozen) -> float:
    """Model FLOPs of one train step, all devices together: the step lowered (not compiled)
    on one CPU device with every layer written out and attention as XLA's dots, so XLA's
    cost analysis counts each layer (a scanned body is counted once) and each attention
    product (cuDNN's custom calls count nothing); no remat, so no recomputation; the batch
    in one pass (train.microbatches' scan would be counted once too)."""
    flat = dataclasses.replace(model, unroll_layers=True, attention="xla", remat="none",
                               mesh=None)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=1))
    one = make_mesh(1, 1, devices=jax.local_devices(backend="cpu")[:1])
    rep = replicated(one)

    def on_one(tree):
        return None if tree is None else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
    _, state, step = setup(flat, method, cfg, one, on_one(trainable), on_one(frozen),
                           abstract=True)
    cost = step.lower(state, on_one(frozen), abstract_batch(flat, cfg, one)).cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _on(mesh, tree):
    """ShapeDtypeStructs of ``tree`` on ``mesh``: their own shardings, else replicated."""
    rep = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None) or rep), tree)


def compile_eval(model, method, cfg, mesh, trainable, frozen):
    """AOT-compile rank classification's scoring of one eval batch (every member's
    summed target log-likelihoods, ``ptjax.evaluation.member_scores``) on abstract inputs
    with the run's shardings: what ``ptjax eval`` and each dev evaluation run."""
    rows = -(-cfg.train.eval_batch_size // mesh.shape["data"]) * mesh.shape["data"]
    batch = {k: v for k, v in abstract_batch(model, cfg, mesh).items()
             if k not in ("word_mask", "label")}
    batch = {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype, sharding=v.sharding)
             for k, v in batch.items()}
    return compile_lowered(mesh, member_scores.lower(model, method, trainable, frozen, batch,
                                                     False))


def compile_decode(model, method, cfg, mesh, trainable, frozen):
    """AOT-compile greedy decoding with the KV cache behind every member (row b*K + k:
    member k), ``task.max_target_length`` new tokens from a batch of eval inputs: what
    generative tasks (exact match, F1) and ``ptjax generate`` run."""
    B = mesh.shape["data"]
    K = jax.tree.leaves(trainable)[0].shape[0]

    def inputs(trainable, frozen):  # (params, every row's prompt inputs) as decoding takes
        params, prompts = member_inputs(method, trainable, frozen)
        return params, None if prompts is None else rows_of(prompts, B)
    params, prompt = jax.eval_shape(inputs, trainable, frozen)
    params = _on(mesh, params) if method.tunes_weights else frozen
    L = cfg.task.max_input_length
    rows = jax.ShapeDtypeStruct((B * K, L), jnp.int32, sharding=batch_sharding(mesh))
    prompt = None if prompt is None else _on(mesh, prompt)
    fn = jax.jit(functools.partial(
        t5_generate if model.is_encoder_decoder else gpt2_generate, model.config,
        model.dtype, model.options()), static_argnames=("max_new_tokens",))
    return compile_lowered(mesh, fn.lower(params, rows, rows, prompt,
                                          max_new_tokens=cfg.task.max_target_length))
