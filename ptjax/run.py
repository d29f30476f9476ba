"""``ptjax train`` and ``ptjax eval``: one run directory from a config (its layout:
``ptjax.rundir``).

A run reads as a few calls: prepare the model and method; prepare the data (task, dev
set, stream, transfer sets: ``ptjax.taskdata``); set up the step (``ptjax.train``);
the loop (``ptjax.loop``) with its hooks: evaluation and early stopping, checkpoints; then
the export, ensemble and transfer scores and results.json.

Rerunning the same command after a crash or a kill resumes from the last checkpoint and
reaches the same prompts and metrics as an uninterrupted run.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os

import jax
import numpy as np

from ptjax import methods, storage
from ptjax.aot import auto_remat
from ptjax.data.tasks import load_task
from ptjax.design import run_design
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, ensemble_table, evaluate, predict
from ptjax.loop import resume, step_loop
from ptjax.methods.base import check_run, place_trainable
from ptjax.models.model import count_params
from ptjax.models.named import base_model_path, prepare
from ptjax.prompts import load_table
from ptjax.rundir import (MetricsLog, NullLog, check_start, claim_run_dir, data_shards, locked_run,
                          member_names, open_checkpoints, write_json)
from ptjax.sharding import is_main_process, place, replicated, sync, to_host
from ptjax.taskdata import dev_task_config, encoding, prepare_data, run_dev_set, verbalizing
from ptjax.train import setup
from ptjax.trained import restore_run


def train(cfg) -> dict:
    """Run (or resume) the training a ``RunConfig`` describes; returns results.json's dict.

    Every process of a multi-host job runs this; only process 0 writes files other than
    checkpoints (which orbax writes together). Everything the run needs (model, every
    task's data, transfer tasks included, output paths) is checked before the run
    directory is created or changed; process 0 holds the run directory's lock throughout.
    """
    return locked_run(cfg, _train)


def _train(cfg, main, locks) -> dict:
    check_start(cfg, main)
    mesh, model = prepare(cfg)
    method = methods.build(cfg, model.config, model.dtype)
    if not method.trains:  # prompt design: evaluate the bare model, nothing to train
        return run_design(cfg, mesh, model, method)
    check_run(model, method, cfg, mesh)
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    data = prepare_data(model, cfg, data_shards(ckpt_dir, cfg.train))
    trainable = place_trainable(method, method.init(model, cfg, data.task), mesh, cfg)
    frozen = None if method.tunes_weights else model.params
    # the step's model has model.remat=auto resolved; evaluation runs ``model`` (no remat)
    _, state, step_fn = setup(auto_remat(model, method, cfg, mesh, trainable, frozen), method,
                              cfg, mesh, trainable, frozen)
    start, state, best, damaged = resume(ckpt_dir, cfg.train, state, method.K)
    # Every check has passed: from here the run directory is created and written.
    claim_run_dir(cfg.run_dir, main, locks)
    ckpt = open_checkpoints(ckpt_dir, cfg.train.keep_checkpoints, main, damaged, start)
    try:
        return _loop(cfg, main, ckpt, model, method, mesh, data, state, step_fn, best, frozen,
                     start)
    finally:
        ckpt.close()


def _loop(cfg, main, ckpt, model, method, mesh, data, state, step_fn, best, frozen, start):
    """``step_loop`` with the dev set: each evaluation updates every member's best step
    (the paper's early stopping), which checkpoints carry; then ``_finish``."""
    run_dir, tc, K = cfg.run_dir, cfg.train, method.K
    dev, metric = data.dev, data.metric
    log = (MetricsLog(run_dir, start, names=member_names(cfg, method),
                      wandb_project=tc.wandb, config=cfg) if main else NullLog())

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
        step_loop(cfg, main, ckpt, data.stream, state, step_fn, frozen, mesh, start, log,
                  evaluate_at,
                  lambda: (best.tree, {"data_shards": data.n_shards, **best.meta()}))
    finally:
        log.close()
    return _finish(model, method, cfg, best, data, mesh, frozen)


def majority_baseline(dev):
    """Dev accuracy (%) of always answering the most frequent class: the floor a prompt
    must beat (rank classification over a fixed label set scored by accuracy; else None)."""
    if dev.mode != "rank" or not dev.labels or dev.select != "accuracy":
        return None
    counts = collections.Counter(ex["targets"] for ex in dev.examples)
    return 100.0 * max(counts.values()) / len(dev.examples)


def _finish(model, method, cfg, best, data, mesh, frozen) -> dict:
    """Export the best members, score their ensemble and their zero-shot transfer (on the
    transfer dev sets read before training), and write results.json. Every process
    computes; process 0 writes."""
    run_dir, main = cfg.run_dir, is_main_process()
    dev, metric = data.dev, data.metric
    export_dir = os.path.join(run_dir, "export")
    tc = cfg.train
    results = {
        "run_dir": run_dir, "method": method.name, "metric": metric,
        "steps": tc.steps, "export": export_dir, "model": cfg.model.path,
        "parameters": count_params(model.params),
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
        with storage.staged_dir(export_dir) as local:  # a URL: written here, then uploaded
            method.export(local, host, model, base_model_path(cfg))
    if tc.ensemble:
        preds = predict(model, method, best.tree, frozen, dev, tc.eval_batch_size,
                        cfg.task.max_target_length, mesh)
        results["ensemble"] = ensemble_table(
            dev, preds, tc.ensemble, ensemble_weights(model, method, cfg, data, best.metric,
                                                      frozen, mesh))
    if cfg.task.transfer:
        results["transfer"] = {
            name: evaluate(model, method, best.tree, frozen, data.transfer[name],
                           tc.eval_batch_size, cfg.task.max_target_length, mesh)
            for name in cfg.task.transfer}
    if main:
        write_json(os.path.join(run_dir, "results.json"), results)
    sync("ptjax-finish")
    return results


def ensemble_weights(model, method, cfg, data, best_metric, frozen, mesh):
    """The K members' weights in the ensemble (``train.ensemble_weighting``), or None for
    equal weights. train: PET's weighted fusion (Schick & Schuetze 2021), each member's
    dev metric on train examples before training (its initial members, the first as many
    train examples as the dev set has); dev: each member's best dev score."""
    tc = cfg.train
    if tc.ensemble_weighting == "equal":
        return None
    if tc.ensemble_weighting == "fixed":
        return list(tc.ensemble_weights)
    if tc.ensemble_weighting == "dev":
        return list(best_metric)
    tcfg = dev_task_config(cfg)
    task = load_task(tcfg, splits=("train",))  # every process: the same examples
    task = dataclasses.replace(task, splits={"train": task.split("train")[:len(data.dev.examples)]})
    seen = build_dev_set(model, task, tcfg.eval_mode, cfg.task.max_input_length,
                         cfg.task.max_target_length, split="train", **encoding(model, tcfg),
                         **verbalizing(tcfg))
    initial = place_trainable(method, method.init(model, cfg, data.task), mesh, cfg)
    return evaluate(model, method, initial, frozen, seen, tc.eval_batch_size,
                    cfg.task.max_target_length, mesh)[data.metric]


def saved_weights(cfg, run_dir: str):
    """The ensemble weights ``ptjax eval --ensemble`` uses: fixed ones from the config,
    train / dev ones as the finished run computed them (its results.json)."""
    how = cfg.train.ensemble_weighting
    if how in ("equal", "fixed"):
        return list(cfg.train.ensemble_weights) or None
    path = os.path.join(run_dir, "results.json")
    weights = None
    if storage.exists(path):
        weights = (json.loads(storage.read_text(path)).get("ensemble") or {}).get("weights")
    if weights is None:
        raise PtjaxError(f"train.ensemble_weighting={how}: the weights are computed when a "
                         f"run with train.ensemble finishes, and {path} has none; finish the "
                         "run, or evaluate with train.ensemble_weighting=equal")
    return weights


def evaluate_prompts(cfg, prompt_path: str | None = None, split: str = "validation",
                     ensemble_method: str = "", run_dir: str | None = None) -> dict:
    """``ptjax eval``: metrics of a run's trained members (the best ones, from its newest
    checkpoint; any method), or of soft prompts in a file (``prompt_path``), and with
    ``ensemble_method`` the ensemble table of the K members."""
    if prompt_path is None:
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
    dev = run_dev_set(model, method, cfg, split)
    size, lengths = cfg.train.eval_batch_size, cfg.task.max_target_length
    frozen = None if method.tunes_weights else model.params
    if ensemble_method:
        preds = predict(model, method, trainable, frozen, dev, size, lengths, mesh)
        return ensemble_table(dev, preds, ensemble_method,
                              saved_weights(cfg, run_dir or cfg.run_dir))
    return evaluate(model, method, trainable, frozen, dev, size, lengths, mesh)
