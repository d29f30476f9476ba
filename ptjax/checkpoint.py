"""Orbax checkpoints of the trainable state only: never the frozen weights.

Each checkpoint step holds three items:
  state: ``TrainState`` (prompt or, for model tuning, the weights; optimizer state; step;
         rng)
  best:  the best trainable so far (early stopping on dev), same tree as state.trainable
  meta:  JSON: data position (examples consumed), data shards (the order's layout),
         best metric and step per prompt

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest. A checkpoint damaged later
(a truncated file, a missing item, corrupted array data, a non-finite array) is named in
one line and skipped for the newest intact one (``newest_intact``); training moves it to
``damaged-checkpoints/`` beside ``checkpoints/`` so the run can write that step again.

The directory may be a ``gs://`` URL: orbax writes there through tensorstore and, where a
store cannot rename, marks each finished step with a commit file instead, so a killed save
is still never taken for a checkpoint.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from ptjax import storage
from ptjax.errors import PtjaxError


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


def _drop_unretrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


@contextlib.contextmanager
def _abandoned_reads_muted(damaged: list):
    """orbax reads a checkpoint's arrays as concurrent tasks, raises the first failure and
    closes its event loop: a damaged checkpoint's other reads are left behind. As they
    finish or are garbage-collected, each pending one's tensorstore callback meets the
    closed loop (a "RuntimeError: Event loop is closed" traceback on stderr, from another
    thread) and asyncio logs each failed one ("Task exception was never retrieved", a
    traceback per array). They repeat the damage ptjax names in one line, so while ptjax
    looks for an intact checkpoint those two messages are muted, and after a damaged one
    the leftovers are collected and the reads still in flight waited for (until none has
    been heard of for 0.3 s, at most 3 s) before the messages are heard again."""
    logger = logging.getLogger("asyncio")
    hook = sys.unraisablehook
    heard = [time.monotonic()]

    def closed_loop_muted(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and \
                str(unraisable.exc_value) == "Event loop is closed":
            heard[0] = time.monotonic()
        else:
            hook(unraisable)

    logger.addFilter(_drop_unretrieved)
    sys.unraisablehook = closed_loop_muted
    try:
        yield
        if damaged:
            start = time.monotonic()
            while time.monotonic() - max(start, heard[0]) < 0.3 and \
                    time.monotonic() - start < 3.0:
                time.sleep(0.05)
            with warnings.catch_warnings():  # and its coroutines that never ran
                warnings.filterwarnings("ignore", "coroutine .* was never awaited",
                                        RuntimeWarning)
                gc.collect()
    finally:
        sys.unraisablehook = hook
        logger.removeFilter(_drop_unretrieved)


class Checkpointer:
    def __init__(self, directory: str, keep: int, create: bool = True):
        self.directory = storage.absolute(directory)
        # create=False: a reader (eval, load_run) that writes nothing in the run
        options = (ocp.CheckpointManagerOptions(max_to_keep=keep, create=True) if create else
                   ocp.CheckpointManagerOptions(max_to_keep=None, create=False,
                                                read_only=True, save_interval_steps=0))
        # orbax announces every read-only manager with an absl warning ("Given directory is
        # read only=..."), which reads as a problem with a writable run directory; read_only
        # is ptjax's choice (a reader writes nothing), so that one message is dropped, here
        logger = logging.getLogger("absl")
        logger.addFilter(_drop_read_only_notice)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            logger.removeFilter(_drop_read_only_notice)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def newest_intact(self, restore, report: bool = True):
        """(step, restore(step), damaged) for the newest checkpoint that ``restore`` reads
        whole and finite, or (None, None, []) when there is none; damaged: [(step, why)]
        of the newer ones, which ``report`` names on stderr. A checkpoint that exists but
        none intact is a one-line error naming the newest one."""
        damaged, found = [], None
        with _abandoned_reads_muted(damaged):
            for step in sorted(self._manager.all_steps(), reverse=True):
                try:
                    out = restore(step)
                    if not all(np.isfinite(np.asarray(jax.device_get(x))).all()
                               for x in jax.tree.leaves(out) if hasattr(x, "dtype")
                               and np.issubdtype(x.dtype, np.floating)):
                        raise ValueError("it holds non-finite values")
                except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many kinds)
                    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    damaged.append((step, why))
                    continue
                found = step, out
                break
        if found is not None:
            step, out = found
            if report:
                self.report_damaged(damaged, step)
            return step, out, damaged
        if damaged:
            step, why = damaged[0]
            raise PtjaxError(f"checkpoint {self.path(step)} (step {step}) is damaged ({why}) and "
                             f"no older checkpoint in {self.directory} is intact; move the "
                             "directory away to start the run over")
        return None, None, []

    def report_damaged(self, damaged, used: int, quarantine: bool = False):
        """Name each damaged checkpoint on stderr and, with ``quarantine``, move it out of
        the way (training: the run will write that step again)."""
        for step, why in damaged:
            moved = self.quarantine(step) if quarantine else None
            print(f"warning: checkpoint {self.path(step)} (step {step}) is damaged ({why}); "
                  f"using step {used} instead"
                  + (f"; the damaged one was moved to {moved}" if moved else ""),
                  file=sys.stderr)

    def quarantine(self, step: int) -> str:
        """Move checkpoint ``step`` to ../damaged-checkpoints/ so orbax no longer sees it.
        Locally one rename (a kill leaves it in one place or the other); on object storage
        a copy, then a delete: a kill in between leaves it in both, and the next run finds
        it damaged again and moves what is left (to ``<step>-1``)."""
        target_dir = os.path.join(os.path.dirname(self.directory), "damaged-checkpoints")
        storage.makedirs(target_dir)
        target, n = os.path.join(target_dir, str(step)), 1
        while storage.exists(target):
            target, n = os.path.join(target_dir, f"{step}-{n}"), n + 1
        storage.move(self.path(step), target)
        self._manager.reload()
        return target

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

    def reload(self):
        """Read the step list from disk again (after another process moved a step)."""
        self._manager.reload()

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()
