"""Orbax checkpoints of the trainable state only: never the frozen weights.

Each checkpoint step holds three items:
  state: ``TrainState`` (prompt or, for model tuning, the weights; optimizer state; step;
         rng)
  best:  the best trainable so far (early stopping on dev), same tree as state.trainable
  meta:  JSON: data position (examples consumed), data shards (the order's layout),
         best metric and step per prompt

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, best, meta: dict):
        """Asynchronous: device arrays are copied before this returns, so the caller may
        donate ``state`` to the next train step at once."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if best is not None:  # None: a run without early stopping (ptjax pretrain)
            items["best"] = ocp.args.StandardSave(best)
        self._manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, state_like, best_like):
        """-> (state, best, meta), with the structure and shapes of the ``*_like`` trees
        (best None when ``best_like`` is None)."""
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa
        items = {"state": ocp.args.StandardRestore(abstract(state_like)),
                 "meta": ocp.args.JsonRestore()}
        if best_like is not None:
            items["best"] = ocp.args.StandardRestore(abstract(best_like))
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["best"] if best_like is not None else None, out["meta"]

    def restore_best(self, step: int, best_like) -> tuple:
        """(best, meta) alone: what inference needs (``ptjax.load_run``)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, best_like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            best=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["best"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        """The JSON item alone (data position, data shards, best metrics)."""
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()
