"""``ptjax train`` and ``ptjax eval``: one run directory from a config.

    runs/NAME/
      config.yaml        the resolved config (a rerun must match it to resume)
      metrics.jsonl      one row per (step, split, prompt): loss / dev metric
      tb/                TensorBoard events
      checkpoints/       orbax: trainable state + best + data position, never frozen weights
      export/            the best prompts: prompts.npy [K, P, D], prompt-k/ (npy,
                         safetensors, PEFT adapter); model tuning: export/model/ (HF form)
      results.json       best step and metric per prompt, for notebooks

Rerunning the same command after a crash or a kill resumes from the last checkpoint and
reaches the same prompts and metrics as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import config as config_lib
from ptjax.checkpoint import Checkpointer
from ptjax.data import pipeline
from ptjax.data.tasks import load_task
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, evaluate, metric_names
from ptjax.export import export_prompts
from ptjax.prompts import init_prompts, load_table
from ptjax.train import (init_state, learning_rate_schedule, make_optimizer, make_train_step,
                         per_prompt, trainable_params)

TINY = {"tiny-t5": "t5", "tiny-gpt2": "gpt2"}
# Keys a rerun may change and still resume the same run.
RESUMABLE_CHANGES = ("train.steps", "train.progress")


def load_run_model(cfg):
    """The frozen model a ``ModelConfig`` names (built-in tiny models are built once)."""
    from ptjax.models.model import load_model
    from ptjax.models.tiny import build_tiny_model

    path = cfg.path
    if path in TINY:
        path = build_tiny_model(os.path.join(cfg.tiny_dir, path), family=TINY[path])
    return load_model(path, dtype=cfg.dtype)


def base_model_path(cfg) -> str:
    """What a PEFT adapter names as its base model: an absolute dir or the hub id."""
    if cfg.model.path in TINY:
        return os.path.abspath(os.path.join(cfg.model.tiny_dir, cfg.model.path))
    return os.path.abspath(cfg.model.path) if os.path.isdir(cfg.model.path) else cfg.model.path


def check_lengths(model, cfg):
    """One-line errors for a prompt or sequence the model cannot position."""
    P = cfg.prompt.length if cfg.train.method == "prompt" else 0
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


def initial_prompts(model, cfg, task):
    p = cfg.prompt
    emb = _input_embedding(model)
    tok = model.tokenizer
    label_ids = text_ids = None
    if p.init == "class_label":
        if not task.labels:
            raise PtjaxError(f"prompt.init=class_label needs class labels; task {task.name!r} "
                             "has none (set task.labels or choose another prompt.init)")
        # T5's tokenizer appends EOS: the label's embedding is its word pieces alone
        label_ids = [_strip_special(tok, lab) for lab in task.labels]
    if p.init == "text":
        text_ids = _strip_special(tok, p.text)
    return init_prompts(p.init, p.seeds, p.length, emb, low=p.low, high=p.high,
                        vocab_limit=p.vocab_limit, label_ids=label_ids, fallback=p.fallback,
                        text_ids=text_ids, path=p.file or None)


def _input_embedding(model):
    if model.is_encoder_decoder:
        return model.params["shared"]["embedding"]
    return model.params["wte"]["embedding"]


def _strip_special(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [i for i in ids if i not in set(tok.all_special_ids)]


class MetricsLog:
    """metrics.jsonl + TensorBoard. On resume from step s, rows after s are dropped (and
    TensorBoard purges them) so a resumed run's log equals an uninterrupted one's."""

    def __init__(self, run_dir: str, resume_step: int, enabled_tb: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line cut by a kill
                        continue
                    if row["step"] <= resume_step:
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

    def write(self, rows):
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            if self._tb is not None:
                for key, value in row.items():
                    if key in ("step", "split", "prompt") or not isinstance(value, (int, float)):
                        continue
                    suffix = f"/prompt-{row['prompt']}" if "prompt" in row else ""
                    self._tb.add_scalar(f"{row['split']}/{key}{suffix}", value, row["step"])
        self._file.flush()

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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


@dataclasses.dataclass
class _Best:
    metric: list  # [K] best dev metric so far (-inf before the first eval)
    step: list  # [K]

    def update(self, values, step, best_tree, trainable, method):
        """Keep, per prompt, the trainable at the best dev step (early stopping)."""
        improved = [v > m for v, m in zip(values, self.metric)]
        for k, up in enumerate(improved):
            if up:
                self.metric[k], self.step[k] = float(values[k]), int(step)
        if not any(improved):
            return best_tree
        if method == "prompt":
            mask = np.asarray(improved)[:, None, None]
            return {"prompt": np.where(mask, np.asarray(trainable["prompt"]),
                                       best_tree["prompt"])}
        return jax.tree.map(np.asarray, trainable)


def train(cfg) -> dict:
    """Run (or resume) the training a ``RunConfig`` describes; returns results.json's dict."""
    run_dir = cfg.run_dir
    model = load_run_model(cfg.model)
    task = load_task(cfg.task)
    method, tc = cfg.train.method, cfg.train
    check_lengths(model, cfg)
    os.makedirs(run_dir, exist_ok=True)
    _check_resumable(run_dir, cfg)

    train_arrays, cut = pipeline.encode(model, task.split("train"), cfg.task.max_input_length,
                                        cfg.task.max_target_length)
    if cut:
        print(f"note: {cut} of {len(task.split('train'))} train examples were truncated to "
              f"task.max_input_length={cfg.task.max_input_length} / "
              f"task.max_target_length={cfg.task.max_target_length}")
    dev = build_dev_set(model, task, cfg.task.eval_mode, cfg.task.max_input_length,
                        cfg.task.max_target_length)
    metric = tc.metric or dev.select
    valid = metric_names(dev.metric_set)
    if metric not in valid:
        raise PtjaxError(f"train.metric={metric!r} is not computed for task "
                         f"{cfg.task.name!r}; valid: {', '.join(valid)}")

    tx = make_optimizer(cfg.optim, tc.steps)
    if method == "prompt":
        tx = per_prompt(tx)
        trainable = trainable_params(model, method, initial_prompts(model, cfg, task))
        frozen = model.params
    else:
        trainable = trainable_params(model, method)
        frozen = None
    K = len(cfg.prompt.seeds) if method == "prompt" else 1
    state = init_state(tx, trainable, tc.seed)
    best_tree = jax.tree.map(np.asarray, trainable)
    best = _Best([-math.inf] * K, [0] * K)

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), tc.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state, best_tree, meta = ckpt.restore(start, state, best_tree)
        best = _Best(meta["best_metric"], meta["best_step"])
        assert meta["data_position"] == start * tc.batch_size
        print(f"resuming {run_dir} from step {start} (checkpoint {ckpt.directory}/{start})")
    config_lib.save_config(cfg, os.path.join(run_dir, "config.yaml"))
    log = MetricsLog(run_dir, start)

    step_fn = make_train_step(model, tx, method, tc.dropout)
    lr_at = learning_rate_schedule(cfg.optim, tc.steps)
    n_train = len(train_arrays["input_ids"])
    pending = []  # (step, device metrics): read in bulk, not every step
    t_window = time.perf_counter()

    def flush(s):
        nonlocal pending, t_window
        if not pending:
            return
        steps = [p[0] for p in pending]
        losses = np.stack([np.asarray(p[1]["loss"]) for p in pending])  # [n, K]
        bad = ~np.isfinite(losses)
        if bad.any():
            i, k = np.argwhere(bad)[0]
            ckpt.wait()  # a save still in flight is a good one: let it land
            last = ckpt.latest_step()
            where = (f"the last good checkpoint is step {last} in {ckpt.directory}"
                     if last else "no checkpoint was written")
            raise PtjaxError(f"loss is {losses[i, k]} at step {steps[i]} (prompt {k}); "
                             f"training stopped and {where}")
        rate = len(steps) / max(time.perf_counter() - t_window, 1e-9)
        mean = losses.mean(0)
        log.write([{"step": s, "split": "train", "prompt": k, "loss": float(mean[k]),
                    "learning_rate": float(lr_at(s - 1)), "steps_per_s": round(rate, 3)}
                   for k in range(K)])
        if bar is not None:
            bar.set_postfix(loss=f"{mean.mean():.4f}")
        pending, t_window = [], time.perf_counter()

    bar = None
    if tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc=os.path.basename(run_dir.rstrip("/")),
                   unit="step", dynamic_ncols=True)
    try:
        for step in range(start, tc.steps):
            idx = pipeline.train_indices(step, tc.batch_size, n_train, tc.seed)
            state, metrics = step_fn(state, frozen, pipeline.take(train_arrays, idx))
            s = step + 1
            pending.append((s, metrics))
            if bar is not None:
                bar.update(1)
            do_eval = s % tc.eval_every == 0 or s == tc.steps
            do_ckpt = s % tc.checkpoint_every == 0 or s == tc.steps
            if s % tc.log_every == 0 or do_eval or do_ckpt:
                flush(s)
            if do_eval:
                values = _evaluate_state(model, method, state, frozen, dev, cfg)[metric]
                best_tree = best.update(values, s, best_tree, state.trainable, method)
                log.write([{"step": s, "split": "validation", "prompt": k, metric: values[k],
                            f"best_{metric}": best.metric[k], "best_step": best.step[k]}
                           for k in range(K)])
            if do_ckpt:
                ckpt.save(s, state, best_tree,
                          {"data_position": s * tc.batch_size, "best_metric": best.metric,
                           "best_step": best.step})
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        log.close()
    results = _finish(model, cfg, best_tree, best, metric, run_dir)
    ckpt.close()
    return results


def _evaluate_state(model, method, state, frozen, dev, cfg):
    if method == "prompt":
        return evaluate(model, frozen, state.trainable["prompt"], dev, cfg.train.eval_batch_size,
                        cfg.task.max_target_length)
    params = jax.tree.map(lambda p: p.astype(model.dtype), state.trainable["params"])
    return evaluate(model, params, None, dev, cfg.train.eval_batch_size,
                    cfg.task.max_target_length)


def _finish(model, cfg, best_tree, best, metric, run_dir) -> dict:
    export_dir = os.path.join(run_dir, "export")
    if cfg.train.method == "prompt":
        export_prompts(export_dir, best_tree["prompt"], model, base_model_path(cfg))
    else:
        params = jax.tree.map(lambda p: jnp.asarray(p, model.dtype), best_tree["params"])
        model.save_pretrained(os.path.join(export_dir, "model"), params=params)
    seeds = cfg.prompt.seeds if cfg.train.method == "prompt" else [cfg.prompt.seeds[0]]
    results = {
        "run_dir": run_dir, "method": cfg.train.method, "metric": metric,
        "steps": cfg.train.steps, "export": export_dir,
        "prompts": [{"prompt": k, "seed": int(seed), "best_step": best.step[k],
                     f"best_{metric}": best.metric[k]} for k, seed in enumerate(seeds)],
    }
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def evaluate_prompts(cfg, prompt_path: str | None = None, split: str = "validation") -> dict:
    """``ptjax eval``: metrics of saved prompts (default: the run's exported best)."""
    model = load_run_model(cfg.model)
    task = load_task(cfg.task, splits=(split,))
    check_lengths(model, cfg)
    dev = build_dev_set(model, task, cfg.task.eval_mode, cfg.task.max_input_length,
                        cfg.task.max_target_length, split=split)
    if cfg.train.method == "model":
        path = prompt_path or os.path.join(cfg.run_dir, "export", "model")
        from ptjax.models.model import load_model

        tuned = load_model(path, dtype=cfg.model.dtype)
        return evaluate(tuned, tuned.params, None, dev, cfg.train.eval_batch_size,
                        cfg.task.max_target_length)
    path = prompt_path or os.path.join(cfg.run_dir, "export", "prompts.npy")
    table = load_table(path, model.config.hidden_size)
    return evaluate(model, model.params, table, dev, cfg.train.eval_batch_size,
                    cfg.task.max_target_length)
