"""``ptjax train`` and ``ptjax eval``: one run directory from a config.

    runs/NAME/
      config.yaml        the resolved config (a rerun must match it to resume)
      metrics.jsonl      one row per (step, split, prompt): loss / dev metric
      tb/                TensorBoard events
      checkpoints/       orbax: trainable state + best + data position, never frozen weights
      export/            the best members, as the method exports them (prompt tuning:
                         prompts.npy [K, P, D], prompt-k/ with npy, safetensors and a PEFT
                         adapter; prefix: prefix-k/; model tuning: model/ in HF form)
      results.json       best step and metric per member, for notebooks
      damaged-checkpoints/  checkpoints found damaged on resume, moved out of orbax's way

The run directory is the one named when the run starts (a copied or moved run continues
where it is); one process trains it at a time (``RunLock``).

Rerunning the same command after a crash or a kill resumes from the last checkpoint and
reaches the same prompts and metrics as an uninterrupted run.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import config as config_lib
from ptjax import methods, verbalizers
from ptjax.checkpoint import Checkpointer
from ptjax.data import pipeline
from ptjax.data.tasks import load_task, task_names
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, ensemble_table, evaluate, metric_names, predict
from ptjax.models import checkpoint_files
from ptjax.models.model import load_model
from ptjax.prompts import load_table
from ptjax.sharding import (global_batch, initialize_distributed, is_main_process,
                            logical_rules, make_mesh, place, replicated, to_host)
from ptjax.train import learning_rate_schedule, setup

TINY = {"tiny-t5": "t5", "tiny-gpt2": "gpt2"}
# Keys a rerun may change and still resume the same run: its length, its display, and
# the devices it runs on (orbax restores into the new mesh's shardings).
# The run directory is the one named now (a run may be moved or copied), and what is only
# scored after training (zero-shot transfer, the ensemble) may change too.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.wandb", "train.eval_batch_size",
                     "mesh.data", "mesh.model", "mesh.fsdp", "mesh.distributed", "run_dir",
                     "task.transfer", "train.ensemble")


def load_run_model(cfg, mesh=None, fsdp: bool = False):
    """The frozen model a ``ModelConfig`` names (built-in tiny models are built once, by
    process 0), its weights placed on ``mesh``."""
    from ptjax.models.tiny import build_tiny_model

    path = model_dir(cfg)
    if cfg.path in TINY:
        if is_main_process():
            build_tiny_model(path, family=TINY[cfg.path])
        _sync("ptjax-tiny-model")
    else:
        try:  # a hub id not found names the built-in models too (a mistyped tiny-t5)
            path = checkpoint_files.resolve(path)
        except PtjaxError as e:
            raise PtjaxError(f"{e}; built-in models: {', '.join(TINY)}") from None
    model = load_model(path, dtype=cfg.dtype, mesh=mesh, fsdp=fsdp)
    return dataclasses.replace(model, remat=cfg.remat,  # the train step's policy
                               attention=cfg.attention)


def model_dir(cfg) -> str:
    """Where the frozen model a ``ModelConfig`` names is: a built-in's directory (under
    model.tiny_dir), a local directory, or a hub id as given (fetched when loaded); a path
    that can be none of these, or a name close to a built-in's, is one line listing them."""
    path = cfg.path
    if path in TINY:
        return os.path.join(cfg.tiny_dir, path)
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return path
    close = difflib.get_close_matches(path, TINY, n=1, cutoff=0.8)
    if close or os.path.exists(local) or not checkpoint_files.is_hub_id(path):
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PtjaxError(f"model.path={path}: no such directory; {hint}give a "
                         "checkpoint directory, a Hugging Face hub id (e.g. "
                         f"google/t5-small-lm-adapt) or a built-in model: {', '.join(TINY)}")
    return path


def base_model_path(cfg) -> str:
    """What a PEFT adapter names as its base model: an absolute dir or the hub id."""
    if cfg.model.path in TINY:
        return os.path.abspath(os.path.join(cfg.model.tiny_dir, cfg.model.path))
    return os.path.abspath(cfg.model.path) if os.path.isdir(cfg.model.path) else cfg.model.path


def check_lengths(model, method, cfg):
    """One-line errors for a prompt or sequence the model cannot position."""
    P = method.positions()
    limit = model.config.max_prompt_positions
    if limit is None:  # T5: relative positions, any length
        return
    if P > limit:
        raise PtjaxError(f"prompt.length={P} is longer than the model's {limit} positions")
    total = P + cfg.task.max_input_length + cfg.task.max_target_length
    if total > limit:
        raise PtjaxError(f"prompt.length ({P}) + task.max_input_length "
                         f"({cfg.task.max_input_length}) + task.max_target_length "
                         f"({cfg.task.max_target_length}) = {total} exceeds the model's "
                         f"{limit} positions")


def verbalizing(tcfg) -> dict:
    """build_dev_set's verbalizer arguments from a TaskConfig."""
    return {"verbalizer": tcfg.verbalizer, "word_tokens": tcfg.verbalizer_tokens,
            "soft": tcfg.verbalizer_kind == "soft"}


def verbalized_train(task, verbalizer, keep_classes: bool = False):
    """The task with every train target (a class) replaced by its first label word (with
    ``keep_classes`` left as the class: the class-level loss and the soft verbalizer pair
    it with label words themselves, ``ptjax.verbalizers``); a train label without label
    words is a one-line error, as on dev."""
    if not verbalizer:
        return task
    first = {c: words[0] for c, words in verbalizer}

    def word(ex, q, i):
        if ex["targets"] not in first:
            raise PtjaxError(f"task {task.name!r} train example {i} (shard {q}): target "
                             f"{ex['targets']!r} has no label words in task.verbalizer "
                             f"(classes: {', '.join(first)})")
        return ex if keep_classes else {**ex, "targets": first[ex["targets"]]}
    shards = {q: [word(ex, q, i) for i, ex in enumerate(exs)] for q, exs in task.shards.items()}
    return dataclasses.replace(task, shards=shards)


def encoding(model, tcfg) -> dict:
    """How a task's text becomes ids: {"template": its Template (a tuple of them with
    task.templates) or None, "target_prefix":
    the ids before every target (T5's <extra_id_0> with task.target_sentinel or a
    template's {mask})}, the keyword arguments of build_dev_set and TrainStream."""
    from ptjax.data import templates

    parsed = [templates.parse(t) for t in (tcfg.templates or (tcfg.template,) * bool(
        tcfg.template))]
    for t in parsed:
        templates.check_for_model(t, model.is_encoder_decoder)
    masks = {t.has_mask for t in parsed}
    if len(masks) > 1 and model.is_encoder_decoder:
        raise PtjaxError("task.templates: on T5 either every template has {mask} or none "
                         "(it decides whether targets start with <extra_id_0>)")
    sentinel = tcfg.target_sentinel or (True in masks and model.is_encoder_decoder)
    template = tuple(parsed) if tcfg.templates else (parsed[0] if parsed else None)
    why = "task.target_sentinel=true"
    if sentinel and not tcfg.target_sentinel:  # a template's {mask} asked for it
        which = next(t.source for t in parsed if t.has_mask)
        why = f"{'task.templates' if tcfg.templates else 'task.template'}={which!r} ({{mask}})"
    return {"template": template,
            "target_prefix": pipeline.target_prefix(model, sentinel, tcfg.max_target_length,
                                                    why)}


class MetricsLog:
    """metrics.jsonl + TensorBoard. On resume from step s, rows after s are dropped (and
    TensorBoard purges them) so a resumed run's log equals an uninterrupted one's."""

    def __init__(self, run_dir: str, resume_step: int, enabled_tb: bool = True,
                 names=None, wandb_project: str = "", config=None):
        # TensorBoard / W&B tags name each member by its settings, e.g.
        # train/loss/prompt-P20-class_label-seed0 (metrics.jsonl keeps the index k)
        self.names = list(names) if names else None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        rows = []
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        line = raw.decode("utf-8")
                        keep = json.loads(line)["step"] <= resume_step
                    except (ValueError, KeyError, TypeError):  # a line cut by a kill, or
                        continue  # damaged: the rows after resume_step are written again
                    if keep:
                        rows.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w") as f:  # atomic: a kill here loses nothing
            f.writelines(rows)
        os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if enabled_tb:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"),
                                     purge_step=resume_step + 1 if resume_step else None)
        self._wandb = _wandb_run(run_dir, wandb_project, config) if wandb_project else None

    def _member(self, k) -> str:
        return self.names[k] if self.names and k < len(self.names) else f"prompt-{k}"

    def write(self, rows):
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            scalars = {}
            for key, value in row.items():
                if key in ("step", "split", "prompt") or not isinstance(value, (int, float)):
                    continue
                suffix = f"/{self._member(row['prompt'])}" if "prompt" in row else ""
                scalars[f"{row['split']}/{key}{suffix}"] = value
            if self._tb is not None:
                for tag, value in scalars.items():
                    self._tb.add_scalar(tag, value, row["step"])
            if self._wandb is not None:
                self._wandb.log(scalars, step=row["step"])
        self._file.flush()

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def member_names(cfg, method) -> list[str]:
    """One name per member from its run's settings: method, prompt length, init, seed."""
    length = "" if method.name in ("model", "design") else f"-P{cfg.prompt.length}"
    names = []
    for k, seed in enumerate(method.seeds):
        init = method.describe(k).get("init")
        names.append(f"{method.name}{length}{'-' + init if init else ''}-seed{seed}")
    return names


def _wandb_run(run_dir: str, project: str, cfg):
    """A W&B run for ``run_dir`` (train.wandb=PROJECT); a resumed run continues the same
    one. WANDB_MODE=offline writes it under run_dir/wandb for a later `wandb sync`."""
    try:
        import wandb
    except ImportError:
        raise PtjaxError(f"train.wandb={project!r} needs Weights & Biases: pip install "
                         "'ptjax[wandb]' (or set train.wandb='')") from None
    import hashlib

    run_id = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]
    return wandb.init(project=project, name=os.path.basename(run_dir.rstrip("/")), id=run_id,
                      dir=run_dir, resume="allow",
                      config=config_lib.to_dict(cfg) if cfg is not None else None)


def _check_resumable(run_dir: str, cfg):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return
    old = config_lib.load_config(path)
    a, b = config_lib.to_dict(old), config_lib.to_dict(cfg)
    for key in config_lib.all_keys():
        if key in RESUMABLE_CHANGES:
            continue
        va, vb = _get(a, key), _get(b, key)
        if va != vb:
            raise PtjaxError(f"{path}: this run was started with {key}={va!r}, not {vb!r}; "
                             "use another run_dir, or the same config to resume it")


def _get(d, key):
    for part in key.split("."):
        d = d[part]
    return d


def check_output_dir(path: str, key: str):
    """One line, before any work, if ``path`` cannot be a directory we write in: a file
    there or above it, or a directory (or the run's own subdirectory) not writable."""
    if not path.strip():  # (sweeps resolve configs with run_dir "" before naming jobs)
        raise PtjaxError(f"{key} is empty; name the directory")
    target = probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    subs = [os.path.join(target, n) for n in ("checkpoints", "export", "tb")] \
        if probe == target else []
    for p in (probe, *subs):
        if os.path.exists(p) and not os.path.isdir(p):
            raise PtjaxError(f"{key}={path}: {p} is a file, not a directory")
        if os.path.isdir(p) and not os.access(p, os.W_OK | os.X_OK):
            raise PtjaxError(f"{key}={path}: {p} is not writable; give a writable directory")


def check_output_file(path: str, what: str):
    """One line, before any work, if ``path`` cannot be written as a file."""
    if os.path.isdir(path):
        raise PtjaxError(f"{what} {path}: is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise PtjaxError(f"{what} {path}: its directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PtjaxError(f"{what} {path}: not writable")


def _makedirs(path: str, key: str):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PtjaxError(f"{key}={path}: cannot be created ({e.strerror})") from None


class RunLock:
    """An exclusive lock on a run directory (flock on the directory itself: nothing is
    written, and the kernel drops it when its process dies, even by SIGKILL)."""

    def __init__(self, run_dir: str):
        import fcntl

        self._fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise PtjaxError(f"run_dir={run_dir}: another ptjax process is training this run "
                             "now; wait for it to finish, or use another run_dir") from None
        except OSError:  # a file system without locks: run unguarded rather than not at all
            pass

    def release(self):
        os.close(self._fd)


def check_train_targets(task, tcfg):
    """Train targets must be among the task's labels, as dev targets are (build_dev_set):
    a label the model is never scored on would train silently."""
    if not task.labels or tcfg.eval_mode == "generate":
        return
    labels = set(task.labels)
    for i, ex in enumerate(task.splits.get("train", [])):
        if "candidates" in ex or ex["targets"] == "<unk>":
            continue
        if ex["targets"] not in labels:
            where = f"task.train_file={tcfg.train_file}" if tcfg.name == "jsonl" \
                else f"task {task.name!r} train"
            raise PtjaxError(f"{where}: example {i + 1} has target {ex['targets']!r}, which is "
                             f"not one of the task's labels ({', '.join(task.labels)})")


class _Best:
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


class _NullLog:
    def write(self, rows):
        pass

    def close(self):
        pass


def _sync(name: str):
    """A barrier across processes (no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def prepare(cfg):
    """Devices, mesh and frozen model for a run: joins the other processes of a multi-host
    job, builds the (data, model) mesh and loads the weights straight into their shards."""
    initialize_distributed(cfg.mesh.distributed)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    return mesh, load_run_model(cfg.model, mesh, cfg.mesh.fsdp)


def locked_run(cfg, body):
    """``body(cfg, main, locks)``: a run's output directory checked, the processes of a
    multi-host job joined, and process 0 holding the run directory's lock (from the start
    where it exists, else from ``claim_run_dir``) until ``body`` returns or fails."""
    check_output_dir(cfg.run_dir, "run_dir")
    initialize_distributed(cfg.mesh.distributed)  # before anything asks which process it is
    main = is_main_process()
    locks = [RunLock(cfg.run_dir)] if main and os.path.isdir(cfg.run_dir) else []
    try:
        return body(cfg, main, locks)
    finally:
        for lock in locks:
            lock.release()


def train(cfg) -> dict:
    """Run (or resume) the training a ``RunConfig`` describes; returns results.json's dict.

    Every process of a multi-host job runs this; only process 0 writes files other than
    checkpoints (which orbax writes together). Everything the run needs (model, every
    task's data, transfer tasks included, output paths) is checked before the run
    directory is created or changed; process 0 holds the run directory's lock throughout.
    """
    return locked_run(cfg, _train)


def claim_run_dir(run_dir: str, main: bool, locks: list):
    """Every check has passed: process 0 creates the run directory and takes its lock."""
    if main and not locks:
        _makedirs(run_dir, "run_dir")
        locks.append(RunLock(run_dir))
    _sync("ptjax-run-dir")


def newest_checkpoint(ckpt_dir: str, keep: int, restore) -> tuple[int, object, list]:
    """(step, ``restore(reader, step)``, damaged) for the newest intact checkpoint in
    ``ckpt_dir``, read without writing anything; (0, None, []) when there is none."""
    if not os.path.isdir(ckpt_dir):
        return 0, None, []
    reader = Checkpointer(ckpt_dir, keep, create=False)
    try:
        step, out, damaged = reader.newest_intact(lambda s: restore(reader, s), report=False)
        return step or 0, out, damaged
    finally:
        reader.close()


def open_checkpoints(ckpt_dir: str, keep: int, main: bool, damaged, start: int) -> Checkpointer:
    """The run's checkpoints opened for writing, once ``claim_run_dir`` has run; damaged
    ones (``newest_checkpoint``) are named and moved aside by process 0 first, so the run
    can write those steps again."""
    ckpt = Checkpointer(ckpt_dir, keep)
    if main:
        ckpt.report_damaged(damaged, start, quarantine=True)
    _sync("ptjax-damaged-moved")
    ckpt.reload()
    return ckpt


def _train(cfg, main, locks) -> dict:
    run_dir, tc = cfg.run_dir, cfg.train
    if main and os.path.isdir(run_dir):
        _check_resumable(run_dir, cfg)
    if cfg.model.path in TINY and not os.path.exists(
            os.path.join(cfg.model.tiny_dir, cfg.model.path, "config.json")):
        check_output_dir(os.path.join(cfg.model.tiny_dir, cfg.model.path), "model.tiny_dir")
    mesh, model = prepare(cfg)
    method = methods.build(cfg, model.config, model.dtype)
    if not method.trains:  # prompt design: evaluate the bare model, nothing to train
        from ptjax.design import run_design

        return run_design(cfg, mesh, model, method)
    method.check(model)
    check_lengths(model, method, cfg)
    data_size = mesh.shape["data"]
    if tc.batch_size % data_size:
        raise PtjaxError(f"train.batch_size={tc.batch_size} is not a multiple of the mesh's "
                         f"{data_size} data-parallel devices (mesh.data)")
    check_transfer_names(cfg)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    # the data order a run started with is kept (see TrainStream)
    _, meta, _ = newest_checkpoint(ckpt_dir, tc.keep_checkpoints, lambda r, s: r.restore_meta(s))
    n_shards = (meta or {}).get("data_shards", tc.data_shards or jax.process_count())
    owned = pipeline.owned_shards(n_shards, jax.process_index(), jax.process_count())
    dev_cfg = dev_task_config(cfg)  # a mixture's first trained task picks the best step
    enc = encoding(model, dev_cfg)
    task = load_task(dev_cfg, shards=(owned, n_shards))
    check_train_targets(task, dev_cfg)
    dev = build_dev_set(model, task, dev_cfg.eval_mode, cfg.task.max_input_length,
                        cfg.task.max_target_length, **enc, **verbalizing(dev_cfg))
    scoring = verbalizers.scoring(cfg.task)
    task = verbalized_train(task, dev_cfg.verbalizer, keep_classes=scoring is not None)
    metric = tc.metric or dev.select
    valid = metric_names(dev.metric_set)
    if metric not in valid:
        raise PtjaxError(f"train.metric={metric!r} is not computed for task "
                         f"{cfg.task.name!r}; valid: {', '.join(valid)}")
    # transfer tasks are read now: data that is missing must stop the run before step 1
    transfer = {name: _transfer_dev_set(model, cfg, name) for name in cfg.task.transfer}
    if cfg.task.mixture:
        stream = _mixture_stream(model, cfg, task, owned, n_shards)
    else:
        stream = pipeline.TrainStream(model, task.shards, n_shards, tc.batch_size,
                                      cfg.task.max_input_length, cfg.task.max_target_length,
                                      tc.seed, **enc, scoring=scoring)

    K = method.K
    trainable = place_trainable(method, method.init(model, cfg, task), mesh, cfg)
    frozen = None if method.tunes_weights else model.params
    _, state, step_fn = setup(model, method, cfg, mesh, trainable, frozen)
    best = _Best(state.trainable, K)
    start, restored, damaged = newest_checkpoint(
        ckpt_dir, tc.keep_checkpoints, lambda r, step: r.restore(step, state, best.tree))
    if restored is not None:
        state, best_tree, meta = restored
        best = _Best(state.trainable, K, meta["best_metric"], meta["best_step"], best_tree)
        assert meta["data_position"] == start * tc.batch_size
    # Every check has passed: from here the run directory is created and written.
    claim_run_dir(run_dir, main, locks)
    ckpt = open_checkpoints(ckpt_dir, tc.keep_checkpoints, main, damaged, start)
    try:
        return _loop(cfg, main, ckpt, model, method, mesh, dev, metric, transfer, stream,
                     state, step_fn, best, frozen, n_shards, start)
    finally:
        ckpt.close()


def check_transfer_names(cfg):
    for name in cfg.task.transfer:
        if name not in task_names():
            raise PtjaxError(f"task.transfer names unknown task {name!r}; valid: "
                             f"{', '.join(task_names())}")


def step_events(s: int, tc) -> tuple[bool, bool]:
    """(evaluate, checkpoint) after step ``s`` of a run: every ``eval_every`` /
    ``checkpoint_every`` steps and at the last step (ptjax train and ptjax pretrain)."""
    last = s == tc.steps
    return s % tc.eval_every == 0 or last, s % tc.checkpoint_every == 0 or last


def _loop(cfg, main, ckpt, model, method, mesh, dev, metric, transfer, stream, state,
          step_fn, best, frozen, n_shards, start):
    """``step_loop`` with the dev set: each evaluation updates every member's best step
    (the paper's early stopping), which checkpoints carry; then ``_finish``."""
    run_dir, tc, K = cfg.run_dir, cfg.train, method.K
    log = (MetricsLog(run_dir, start, names=member_names(cfg, method),
                      wandb_project=tc.wandb, config=cfg) if main else _NullLog())

    def evaluate_at(s, trainable):
        values = evaluate(model, method, trainable, frozen, dev, tc.eval_batch_size,
                          cfg.task.max_target_length, mesh)
        best.update(values[metric], s, trainable)
        if not tc.progress and main:
            print(f"{os.path.basename(run_dir.rstrip('/'))} step {s}/{tc.steps}: "
                  f"validation {metric} " + " ".join(f"{x:.2f}" for x in values[metric])
                  + " (best " + " ".join(f"{x:.2f}" for x in best.metric) + ")", flush=True)
        log.write([{"step": s, "split": "validation", "prompt": k,
                    **{m: v[k] for m, v in values.items()},
                    f"best_{metric}": best.metric[k], "best_step": best.step[k]}
                   for k in range(K)])

    try:
        step_loop(cfg, main, ckpt, stream, state, step_fn, frozen, mesh, start, log,
                  evaluate_at, lambda: (best.tree, {"data_shards": n_shards, **best.meta()}))
    finally:
        log.close()
    return _finish(model, method, cfg, best, metric, dev, mesh, frozen, transfer)


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
    False: one model (pretrain). Returns the last state."""
    run_dir, tc = cfg.run_dir, cfg.train
    name = os.path.basename(run_dir.rstrip("/"))
    if start and main:
        print(f"resuming {run_dir} from step {start} (checkpoint {ckpt.directory}/{start})")
    if main:
        config_lib.save_config(cfg, os.path.join(run_dir, "config.yaml"))
    lr_at = learning_rate_schedule(cfg.optim, tc.steps)
    pending = []  # (step, device metrics): read in bulk, not every step
    window = {"t": time.perf_counter(), "truncated": 0, "noted": False}

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
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    batches = pipeline.prefetch(stream.batch, range(start, tc.steps))
    try:
        for step, (local, cut) in zip(range(start, tc.steps), batches):
            state, metrics = step_fn(state, frozen, global_batch(local, mesh))
            s = step + 1
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
            if do_ckpt:
                tree, meta = saved()
                ckpt.save(s, state, tree, {"data_position": s * tc.batch_size, **meta})
        ckpt.wait()
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    return state


def place_trainable(method, tree, mesh, cfg):
    """A method's host trainable tree placed with its shardings on ``mesh``."""
    shardings = method.shardings(method.shapes(), mesh, logical_rules(cfg.mesh.fsdp))

    def put(x, sh):
        if isinstance(x, jax.Array):  # already on the devices (model weights): reshard there
            return jax.jit(lambda a: a.astype(jnp.float32), out_shardings=sh)(x)
        return place(np.asarray(x, np.float32), sh)
    return jax.tree.map(put, tree, shardings)


def majority_baseline(dev):
    """Dev accuracy (%) of always answering the most frequent class: the floor a prompt
    must beat (rank classification over a fixed label set scored by accuracy; else None)."""
    if dev.mode != "rank" or not dev.labels or dev.select != "accuracy":
        return None
    counts = collections.Counter(ex["targets"] for ex in dev.examples)
    return 100.0 * max(counts.values()) / len(dev.examples)


def _finish(model, method, cfg, best, metric, dev, mesh, frozen, transfer=None) -> dict:
    """Export the best members, score their ensemble and their zero-shot transfer (on
    ``transfer``: {task name: dev set}, read before training; None = read them now), and
    write results.json. Every process computes; process 0 writes."""
    run_dir, main = cfg.run_dir, is_main_process()
    export_dir = os.path.join(run_dir, "export")
    tc = cfg.train
    results = {
        "run_dir": run_dir, "method": method.name, "metric": metric,
        "steps": tc.steps, "export": export_dir, "model": cfg.model.path,
        "parameters": int(sum(x.size for x in jax.tree.leaves(model.params))),
        "task": dev_task_config(cfg).name, "majority": majority_baseline(dev),
        "prompts": [{"prompt": k, "seed": int(seed), **method.describe(k),
                     "best_step": best.step[k], f"best_{metric}": best.metric[k]}
                    for k, seed in enumerate(method.seeds)],
    }
    if cfg.task.mixture:
        results["mixture"] = [e.name for e in cfg.task.mixture
                              if e.name not in cfg.task.transfer]  # the trained tasks
    host = jax.tree.map(to_host, best.tree)
    if main:
        method.export(export_dir, host, model, base_model_path(cfg))
    if tc.ensemble:
        preds = predict(model, method, best.tree, frozen, dev, tc.eval_batch_size,
                        cfg.task.max_target_length, mesh)
        results["ensemble"] = ensemble_table(dev, preds, tc.ensemble)
    if cfg.task.transfer:
        if transfer is None:
            transfer = {name: _transfer_dev_set(model, cfg, name) for name in cfg.task.transfer}
        results["transfer"] = {
            name: evaluate(model, method, best.tree, frozen, transfer[name],
                           tc.eval_batch_size, cfg.task.max_target_length, mesh)
            for name in cfg.task.transfer}
    if main:
        tmp = os.path.join(run_dir, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(run_dir, "results.json"))
    _sync("ptjax-finish")
    return results


def mixture_task_config(tcfg, entry):
    """The TaskConfig of one task.mixture entry: its own name, template, verbalizer and
    labels; lengths and the rest from the task section."""
    return dataclasses.replace(
        tcfg, name=entry.name, template=entry.template, verbalizer=entry.verbalizer,
        verbalizer_tokens=entry.verbalizer_tokens, labels=entry.labels,
        eval_mode=entry.eval_mode, train_file=entry.train_file, dev_file=entry.dev_file,
        mixture=(), mixture_rates="proportional", transfer=(), templates=())


def dev_task_config(cfg):
    """The task whose dev set picks the best step: the task section, or with task.mixture
    its first entry that task.transfer does not hold out."""
    for entry in cfg.task.mixture:
        if entry.name not in cfg.task.transfer:
            return mixture_task_config(cfg.task, entry)
    return cfg.task


def _mixture_stream(model, cfg, first, owned, n_shards):
    """The train stream of task.mixture (``pipeline.MixtureStream``): every trained entry
    read, checked and encoded by its own settings (``first``: the dev task, already read)."""
    tc, parts, sizes = cfg.train, [], []
    for entry in cfg.task.mixture:
        tcfg = mixture_task_config(cfg.task, entry)
        if entry.name in cfg.task.transfer:  # held out: never read for training
            parts.append(None)
            sizes.append(0)
            continue
        if entry.name == first.name:
            task = first
        else:
            task = load_task(tcfg, shards=(owned, n_shards))
            check_train_targets(task, tcfg)
            task = verbalized_train(task, tcfg.verbalizer)
        sizes.append(len(task.splits.get("train", [])))
        parts.append(pipeline.TrainStream(model, task.shards, n_shards, tc.batch_size,
                                          cfg.task.max_input_length,
                                          cfg.task.max_target_length, tc.seed,
                                          **encoding(model, tcfg)))
    weights = config_lib.mixture_weights(cfg, "task.mixture", sizes)
    filler = next(p for p in parts if p is not None)
    return pipeline.MixtureStream([p or filler for p in parts], weights, tc.seed)


def _transfer_dev_set(model, cfg, name: str):
    """The validation set of a task the prompts never trained on (domain transfer), read
    through its own task.mixture entry (template, verbalizer) when it has one."""
    entry = next((e for e in cfg.task.mixture if e.name == name), None)
    tcfg = (mixture_task_config(cfg.task, entry) if entry is not None else
            dataclasses.replace(cfg.task, name=name, labels=(), transfer=()))
    task = load_task(tcfg, splits=("validation",))
    return build_dev_set(model, task, tcfg.eval_mode, tcfg.max_input_length,
                         tcfg.max_target_length, **encoding(model, tcfg),
                         **verbalizing(tcfg))


def evaluate_prompts(cfg, prompt_path: str | None = None, split: str = "validation",
                     ensemble_method: str = "", run_dir: str | None = None) -> dict:
    """``ptjax eval``: metrics of a run's trained members (the best ones, from its newest
    checkpoint; any method), or of soft prompts in a file (``prompt_path``), and with
    ``ensemble_method`` the ensemble table of the K members."""
    if prompt_path is None:
        from ptjax.trained import restore_run

        run = restore_run(cfg, run_dir or cfg.run_dir)
        mesh, model, method, trainable = run.mesh, run.model, run.method, run.trainables
    else:
        if cfg.task.verbalizer_kind == "soft":
            raise PtjaxError(f"task.verbalizer_kind=soft: a prompt file ({prompt_path}) has "
                             "no class vectors; evaluate the run itself, or with "
                             "task.verbalizer_kind=manual")
        mesh, model = prepare(cfg)
        method = methods.REGISTRY["prompt"](model.config, cfg.prompt, None, model.dtype)
        table = np.asarray(load_table(prompt_path, model.config.hidden_size))
        method = dataclasses.replace(method, prompt=dataclasses.replace(
            cfg.prompt, length=table.shape[1], seeds=tuple(range(table.shape[0])), inits=()))
        trainable = {"prompt": place(table, replicated(mesh))}
    tcfg = dev_task_config(cfg)
    task = load_task(tcfg, splits=(split,))
    check_lengths(model, method, cfg)
    dev = build_dev_set(model, task, tcfg.eval_mode, cfg.task.max_input_length,
                        cfg.task.max_target_length, split=split, **encoding(model, tcfg),
                        **verbalizing(tcfg))
    size, lengths = cfg.train.eval_batch_size, cfg.task.max_target_length
    frozen = None if method.tunes_weights else model.params
    if ensemble_method:
        preds = predict(model, method, trainable, frozen, dev, size, lengths, mesh)
        return ensemble_table(dev, preds, ensemble_method)
    return evaluate(model, method, trainable, frozen, dev, size, lengths, mesh)
