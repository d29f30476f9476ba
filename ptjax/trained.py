"""``ptjax.load_run``: a trained run of any method, ready for inference.

    run = ptjax.load_run("runs/prefix-demo")
    run.config, run.model, run.method, run.trainables     # trainables: leaves [K, ...]
    run.logits(input_ids, k=0, attention_mask=..., decoder_input_ids=...)  # [B, T, vocab]
    run.generate(input_ids, k=0, attention_mask=..., max_new_tokens=16)   # [B, new]
    run.generate(input_ids, k=0, num_beams=4)           # beam search (or do_sample=True, ...)

The trainables are the best members (early stopping on dev) from the run's newest
checkpoint, in the method's own form (a prefix's MLP, a P-tuning encoder), so inference
sees exactly what training evaluated.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from ptjax import config as config_lib
from ptjax import methods, storage
from ptjax.checkpoint import Checkpointer
from ptjax.errors import PtjaxError
from ptjax.models.named import prepare
from ptjax.sharding import logical_rules


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedRun:
    run_dir: str
    config: Any  # the run's RunConfig (run_dir = where it was loaded from)
    model: Any  # the frozen ptjax Model
    method: Any  # its ptjax.methods Method
    trainables: Any  # the best members, leaves [K, ...]
    step: int  # the checkpoint they come from
    mesh: Any = None
    # each member's best dev metric (the early-stopping one) as the checkpoint records it
    best_metric: tuple = ()

    @property
    def K(self) -> int:
        return self.method.K

    @property
    def best_member(self) -> int:
        """The member with the best dev metric (the first of equals; 0 if unrecorded)."""
        return int(np.argmax(self.best_metric)) if len(self.best_metric) else 0

    def member(self, k: int):
        if not 0 <= k < self.K:
            raise PtjaxError(f"{self.run_dir}: k={k} is not a member of this run; valid: "
                             f"0..{self.K - 1}")
        return self.method.member(self.trainables, k)

    def inputs(self, k: int = 0):
        """(params, PromptInputs or None) of member k."""
        frozen = None if self.method.tunes_weights else self.model.params
        return _inputs(self.method, self.member(k), frozen)

    def logits(self, input_ids, *, k: int = 0, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None):
        """fp32 logits [B, T, vocab] of the real positions with member k applied (T5:
        decoder positions; GPT-2: input positions), as ``Model.logits``."""
        params, prompt = self.inputs(k)
        return self.model.logits(params, input_ids, attention_mask=attention_mask,
                                 decoder_input_ids=decoder_input_ids,
                                 decoder_attention_mask=decoder_attention_mask, prompt=prompt)

    def generate(self, input_ids, *, k: int = 0, attention_mask=None,
                 max_new_tokens: int = 32, **decoding):
        """Decoding behind member k -> ids [B, max_new_tokens]: greedy, or beam search /
        sampling with ``Model.generate``'s keywords (num_beams, do_sample, top_k, ...)."""
        params, prompt = self.inputs(k)
        return self.model.generate(params, input_ids, attention_mask=attention_mask,
                                   prompt=prompt, max_new_tokens=max_new_tokens, **decoding)


@functools.partial(jax.jit, static_argnums=(0,))
def _inputs(method, member, frozen):
    """A member's (params, PromptInputs), compiled once per method (not once per call)."""
    return method.inputs(member, frozen)


def run_config(run_dir: str, overrides=()):
    """A run directory's config (config.yaml plus ``key=value`` overrides)."""
    path = os.path.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise PtjaxError(f"{run_dir}: not a run directory (no config.yaml)")
    return config_lib.load_config(path, overrides)


def load_run(run_dir: str, overrides=(), prepared=None) -> TrainedRun:
    """A trained run directory (``ptjax train`` or a sweep's jobs/<id>) of any method.
    overrides: ``key=value`` strings on top of its config.yaml (e.g. another task).
    prepared: (mesh, model) already loaded for the model it names (``restore_run``)."""
    return restore_run(run_config(run_dir, overrides), run_dir, prepared)


def restore_run(cfg, run_dir: str, prepared=None) -> TrainedRun:
    """The best members saved in ``run_dir``'s checkpoints, for the run config ``cfg``.
    prepared: (mesh, model) for cfg's model, to share one loaded model between runs
    (``ptjax.load_runs``); default: loaded here (``prepare``)."""
    cfg = dataclasses.replace(cfg, run_dir=run_dir)
    mesh, model = prepare(cfg) if prepared is None else prepared
    method = methods.build(cfg, model.config, model.dtype)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    # read only: evaluating a run never changes it (a damaged checkpoint is skipped, not moved)
    ckpt = Checkpointer(ckpt_dir, cfg.train.keep_checkpoints, create=False) \
        if storage.isdir(ckpt_dir) else None
    if not (ckpt and ckpt.latest_step()):
        raise PtjaxError(f"{ckpt_dir}: no checkpoint; the run has not saved its trained "
                         "members yet")
    shapes = method.shapes()
    shardings = method.shardings(shapes, mesh, logical_rules(cfg.mesh.fsdp))
    like = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
    step, (best, meta), _ = ckpt.newest_intact(lambda s: ckpt.restore_best(s, like))
    ckpt.close()
    return TrainedRun(run_dir, cfg, model, method, best, step, mesh,
                      tuple((meta or {}).get("best_metric", ())))
