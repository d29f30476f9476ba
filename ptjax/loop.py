"""The step loop ``ptjax train`` and ``ptjax pretrain`` share, and early stopping's record
of each member's best step."""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ptjax import config as config_lib
from ptjax.data import pipeline
from ptjax.errors import PtjaxError
from ptjax.optim import learning_rate_schedule
from ptjax import preemption
from ptjax.rundir import newest_checkpoint
from ptjax.sharding import global_batch, to_host


class Best:
    """Per member, the best dev metric and step so far and the trainable at that step (the
    paper's early stopping). The best tree stays on the devices, with the state's
    shardings, and never aliases the donated state."""

    def __init__(self, trainable, K: int, metric=None, step=None, tree=None):
        self.metric = list(metric) if metric is not None else [-math.inf] * K
        self.step = list(step) if step is not None else [0] * K
        self.tree = tree if tree is not None else jax.tree.map(jnp.copy, trainable)

    def update(self, values, step, trainable):
        improved = [v > m for v, m in zip(values, self.metric)]
        for k, up in enumerate(improved):
            if up:
                self.metric[k], self.step[k] = float(values[k]), int(step)
        if any(improved):
            self.tree = _keep_improved(jnp.asarray(improved), trainable, self.tree)

    def meta(self) -> dict:
        return {"best_metric": self.metric, "best_step": self.step}


@jax.jit
def _keep_improved(improved_K, trainable, best):
    """Member k of every leaf [K, ...] from ``trainable`` where it improved, else ``best``."""
    return jax.tree.map(
        lambda new, old: jnp.where(improved_K.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
        trainable, best)


def resume(ckpt_dir: str, tc, state, K: int):
    """(start step, state, ``Best``, damaged checkpoints) from the newest intact checkpoint
    in ``ckpt_dir`` (read without writing anything), or step 0 with ``state`` as given."""
    best = Best(state.trainable, K)
    start, restored, damaged = newest_checkpoint(
        ckpt_dir, tc.keep_checkpoints, lambda r, step: r.restore(step, state, best.tree))
    if restored is not None:
        state, best_tree, meta = restored
        best = Best(state.trainable, K, meta["best_metric"], meta["best_step"], best_tree)
        assert meta["data_position"] == start * tc.batch_size
    return start, state, best, damaged


def step_events(s: int, tc) -> tuple[bool, bool]:
    """(evaluate, checkpoint) after step ``s`` of a run: every ``eval_every`` /
    ``checkpoint_every`` steps and at the last step (ptjax train and ptjax pretrain)."""
    last = s == tc.steps
    return s % tc.eval_every == 0 or last, s % tc.checkpoint_every == 0 or last


def profile_dir(run_dir: str) -> str:
    """Where train.profile_steps' trace goes: run_dir/profile, or with several processes
    run_dir/profile/process-i (each traces its own devices, and jax names its files by
    host name, which processes may share)."""
    root = os.path.join(run_dir, "profile")
    return root if jax.process_count() == 1 else os.path.join(
        root, f"process-{jax.process_index()}")


def profile_window(tc, start: int) -> tuple[int, int] | None:
    """(first, last) step of train.profile_steps to trace, or None: none asked for, or a
    run resumed at or after the first (its window has begun or passed; a trace of part of
    it would be a different window)."""
    if not tc.profile_steps or start >= tc.profile_steps[0]:
        return None
    return tuple(tc.profile_steps)


class Profile:
    """A ``jax.profiler`` trace of steps ``first``..``last``: started once the step before
    first is done (so none of its work runs into the trace) and before step first is
    dispatched, stopped once step last's results are ready (so the trace holds its device
    work). Writes TensorBoard's ``plugins/profile/<time>/<host>.xplane.pb`` and Perfetto's
    ``perfetto_trace.json.gz`` under ``directory``."""

    def __init__(self, window, directory: str, main: bool):
        self.window, self.directory, self.main, self.active = window, directory, main, False

    def before(self, s: int, inputs):
        if self.window and s == self.window[0]:
            jax.block_until_ready(inputs)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True

    def after(self, s: int, outputs):
        if self.active and s == self.window[1]:
            jax.block_until_ready(outputs)
            self.stop()
            if self.main:
                print(f"profile of steps {self.window[0]}-{s} written to {self.directory} "
                      f"(tensorboard --logdir {self.directory}, or its perfetto_trace.json.gz "
                      "in ui.perfetto.dev)", flush=True)

    def stop(self):
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def step_loop(cfg, main, ckpt, stream, state, step_fn, frozen, mesh, start, log, evaluate_at,
              saved, members: bool = True):
    """The loop ``ptjax train`` and ``ptjax pretrain`` share: steps ``start`` + 1 ..
    ``train.steps``, one jitted ``step_fn`` per batch of ``stream`` (``batch(step) -> (this
    process's rows, examples cut)``, prefetched on a thread). The device metrics are read
    back in bulk and written to ``log`` every ``log_every`` steps and before every
    evaluation and checkpoint; a non-finite loss or update stops the run there, naming
    the newest checkpoint (which holds a finite state). ``evaluate_at(step, trainable)``
    runs every ``eval_every`` steps and at the last; a checkpoint every
    ``checkpoint_every`` steps and at the last holds the state, ``saved() -> (tree or None,
    meta)`` and the data position. ``members``: train rows name the member k (K prompts);
    False: one model (pretrain). train.profile_steps: a ``Profile`` of those steps.
    Returns the last state.

    A preemption notice (``ptjax.preemption``) ends the loop after the step in flight (and
    its evaluation): that step is checkpointed and ``Preempted`` raised. The train losses
    not yet logged go into that checkpoint (meta "log_window") and the resumed run logs
    them in its next row, so its metrics.jsonl equals an uninterrupted run's."""
    run_dir, tc = cfg.run_dir, cfg.train
    name = os.path.basename(run_dir.rstrip("/"))
    if start and main:
        print(f"resuming {run_dir} from step {start} (checkpoint {ckpt.directory}/{start})")
    if main:
        config_lib.save_config(cfg, os.path.join(run_dir, "config.yaml"))
    lr_at = learning_rate_schedule(cfg.optim, tc.steps)
    pending = []  # (step, device metrics): read in bulk, not every step
    window = {"t": time.perf_counter(), "truncated": 0, "noted": False}
    if start:  # a preempted run's train losses not yet logged
        kept = ckpt.restore_meta(start).get("log_window")
        if kept:
            pending.extend((s, {"loss": np.asarray(loss, np.float32), "finite": np.True_})
                           for s, loss in zip(kept["steps"], kept["loss"]))
            window["truncated"] = kept["truncated"]

    def unlogged():
        """The pending window as JSON for a preemption checkpoint (every step finite: a
        non-finite one stops the run in ``flush`` first)."""
        losses = [to_host(p[1]["loss"]) for p in pending]
        if not all(to_host(p[1]["finite"]) for p in pending):
            flush(pending[-1][0])  # raises, naming the step
        return {"steps": [p[0] for p in pending], "loss": [x.tolist() for x in losses],
                "truncated": window["truncated"]}

    def flush(s):
        if not pending:
            return
        steps = [p[0] for p in pending]
        losses = np.stack([to_host(p[1]["loss"]) for p in pending])  # [n, K]
        finite = np.stack([to_host(p[1]["finite"]) for p in pending])  # [n]
        if not finite.all():
            # The step kept its old state (see make_train_step) and every checkpoint was
            # saved after a flush, so the newest checkpoint holds a finite state.
            i = int(np.argmin(finite))
            ckpt.wait()  # a save still in flight is a good one: let it land
            last = ckpt.latest_step()
            where = (f"the last good checkpoint is step {last} in {ckpt.directory}"
                     if last else "no checkpoint was written")
            bad = np.flatnonzero(~np.isfinite(losses[i]))
            what = (f"loss is {losses[i, bad[0]]} at step {steps[i]}"
                    + (f" (member {bad[0]})" if members else "") if bad.size else
                    f"the update at step {steps[i]} is not finite (the learning rate may "
                    "be too high)")
            raise PtjaxError(f"{what}; training stopped and {where}")
        rate = len(steps) / max(time.perf_counter() - window["t"], 1e-9)
        mean = losses.mean(0)
        log.write([{"step": s, "split": "train", **({"prompt": k} if members else {}),
                    "loss": float(mean[k]), "learning_rate": float(lr_at(s - 1)),
                    "steps_per_s": round(rate, 3), "truncated": window["truncated"]}
                   for k in range(len(mean) if members else 1)])
        if bar is not None:
            bar.set_postfix(loss=f"{mean.mean():.4f}")
        elif main:  # --no-progress: a line per log step, so a cluster's log fills as it runs
            print(f"{name} step {s}/{tc.steps}: loss " + " ".join(f"{x:.4f}" for x in mean)
                  + f" ({rate:.2f} steps/s)", flush=True)
        pending.clear()
        window.update(t=time.perf_counter(), truncated=0)

    bar = None
    if tc.progress and main:
        bar = tqdm(total=tc.steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    batches = pipeline.prefetch(stream.batch, range(start, tc.steps))
    profile = Profile(profile_window(tc, start), profile_dir(run_dir), main)
    try:
        if preemption.heard():  # during the start: stop before the first step
            raise preemption.Preempted(
                f"before step {start + 1}" + (f"; its newest checkpoint is {ckpt.path(start)}"
                                              if start else " (no checkpoint yet)"), start)
        for step, (local, cut) in zip(range(start, tc.steps), batches):
            s = step + 1
            profile.before(s, state)
            state, metrics = step_fn(state, frozen, global_batch(local, mesh))
            profile.after(s, (state, metrics))
            pending.append((s, metrics))
            window["truncated"] += cut
            if cut and not window["noted"] and main:
                window["noted"] = True
                print(f"note: train examples longer than task.max_input_length="
                      f"{cfg.task.max_input_length} / task.max_target_length="
                      f"{cfg.task.max_target_length} are truncated (counted in "
                      "metrics.jsonl as 'truncated')")
            if bar is not None:
                bar.update(1)
            do_eval, do_ckpt = step_events(s, tc)
            if s % tc.log_every == 0 or do_eval or do_ckpt:
                flush(s)
            if do_eval:
                evaluate_at(s, state.trainable)
            stop = preemption.reached(s)
            if do_ckpt or stop:
                tree, meta = saved()
                ckpt.save(s, state, tree, {"data_position": s * tc.batch_size, **meta,
                                           **({"log_window": unlogged()} if stop else {})})
            if stop:
                ckpt.wait()
                raise preemption.Preempted(
                    f"after step {s}; its checkpoint is {ckpt.path(s)}", s)
        ckpt.wait()
    finally:
        profile.stop()  # a run stopped inside the window keeps what was traced
        batches.close()
        if bar is not None:
            bar.close()
    return state
