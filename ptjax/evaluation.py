"""Dev-set evaluation of K prompts at once: rank classification and greedy exact match.

Rank classification (T5X's ``rank_classification``): every example is paired with every
verbalized label, each label scored by the summed log-likelihood of its tokens (EOS
included) behind the prompt, and the best-scoring label is the prediction.
Generation: greedy decoding with the KV cache, then exact match after stripping spaces.

Metrics are percentages, one value per prompt: {"accuracy": [K]} or {"exact_match": [K]}.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.data import metrics, pipeline
from ptjax.errors import PtjaxError
from ptjax.train import prompt_rows, sequence_nll, tile_rows


@dataclasses.dataclass
class DevSet:
    """A task's dev split, encoded once. mode: "rank" or "generate"."""
    mode: str
    metric_set: str
    examples: list  # the formatted examples (targets, answers, groups)
    arrays: dict  # rank: one row per (example, candidate), example-major; generate: examples
    candidates: list | None = None  # rank: each example's candidate strings
    labels: tuple = ()
    select: str = "accuracy"  # the metric that picks the best step


def build_dev_set(model, task, mode: str, max_input_length: int, max_target_length: int,
                  split: str = "validation") -> DevSet:
    """Rank candidates are the task's labels, or an example's own "candidates" (COPA's
    choices, ReCoRD's entities)."""
    examples = task.split(split)
    if not examples:
        raise PtjaxError(f"task {task.name!r} has no {split} examples")
    per_example = any("candidates" in ex for ex in examples)
    if mode == "auto":
        mode = "rank" if task.labels or per_example else "generate"
    metric_set = task.metric_set or task.metric
    if mode == "rank":
        candidates = [list(ex.get("candidates") or task.labels) for ex in examples]
        for i, (ex, cands) in enumerate(zip(examples, candidates)):
            if not cands:
                raise PtjaxError(f"task {task.name!r} {split} example {i} has no rank "
                                 "candidates (set task.labels or task.eval_mode=generate)")
            gold = ex.get("answers") or [ex["targets"]]
            if ex["targets"] != "<unk>" and not set(gold) & set(cands):
                raise PtjaxError(f"task {task.name!r} {split} example {i}: target "
                                 f"{ex['targets']!r} is not one of its candidates "
                                 f"({', '.join(cands[:10])})")
        pairs = [{"inputs": ex["inputs"], "targets": c}
                 for ex, cands in zip(examples, candidates) for c in cands]
        arrays, _ = pipeline.encode(model, pairs, max_input_length, max_target_length)
        _check_labels_fit(model, sorted({c for cands in candidates for c in cands}),
                          max_target_length)
        return DevSet("rank", metric_set, examples, arrays, candidates, tuple(task.labels),
                      task.metric)
    arrays, _ = pipeline.encode(model, examples, max_input_length, max_target_length)
    select = task.metric
    if metric_set == "accuracy":  # a classification task decoded greedily
        metric_set = select = "exact_match"
    return DevSet("generate", metric_set, examples, arrays, labels=tuple(task.labels),
                  select=select)


def _check_labels_fit(model, labels, max_target_length):
    extra = 0 if model.is_encoder_decoder else 1  # GPT-2: " " + label, then EOS appended
    for lab in labels:
        n = len(model.tokenizer(lab if model.is_encoder_decoder else " " + lab)["input_ids"])
        if n + extra > max_target_length:
            raise PtjaxError(f"label {lab!r} is {n + extra} tokens, over "
                             f"task.max_target_length={max_target_length}; raise it so labels "
                             "are scored whole")


@functools.partial(jax.jit, static_argnums=(0,))
def _scores(model, params, prompts, batch):
    """Summed log-likelihood of each row's targets for each prompt -> [K, R]."""
    if prompts is None:
        nll, _ = sequence_nll(model, params, batch, None)
        return -nll[None]
    K, R = prompts.shape[0], batch["input_ids"].shape[0]
    nll, _ = sequence_nll(model, params, tile_rows(batch, K), prompt_rows(prompts, R))
    return -nll.reshape(K, R)


def evaluate(model, params, prompts_KxPxD, dev: DevSet, batch_size: int,
             max_new_tokens: int) -> dict:
    """Metrics per prompt ({metric: [K] floats}); prompts None = the bare model (K = 1).

    batch_size counts rows per prompt (example-candidate pairs for rank classification).
    """
    if dev.mode == "rank":
        scores = [np.asarray(_scores(model, params, prompts_KxPxD, b))[:, :n]
                  for b, n in pipeline.eval_batches(dev.arrays, batch_size)]
        scores = np.concatenate(scores, axis=1)  # [K, total candidates]
        bounds = np.cumsum([0] + [len(c) for c in dev.candidates])
        predictions = [[cands[int(np.argmax(row[a:b]))]
                        for cands, a, b in zip(dev.candidates, bounds[:-1], bounds[1:])]
                       for row in scores]
    else:
        predictions = [[o.strip() for o in outs] for outs in
                       _generate(model, params, prompts_KxPxD, dev.arrays, batch_size,
                                 max_new_tokens)]
    per_prompt = [task_metrics(dev.metric_set, dev.examples, p, dev.labels)
                  for p in predictions]
    return {name: [m[name] for m in per_prompt] for name in per_prompt[0]}


def task_metrics(metric_set: str, examples, predictions, labels=()) -> dict:
    """A metric set (``ptjax.data.metrics``) over one prompt's predictions, or greedy
    exact match after stripping spaces."""
    if metric_set == "exact_match":
        return {"exact_match": float(100.0 * np.mean(
            [p.strip() == ex["targets"].strip() for p, ex in zip(predictions, examples)]))}
    return metrics.compute(metric_set, examples, predictions, labels)


def metric_names(metric_set: str) -> tuple:
    """The metrics a set reports ("score": the mean a benchmark average counts)."""
    return ("exact_match",) if metric_set == "exact_match" else metrics.METRIC_KEYS[metric_set]


def _generate(model, params, prompts, arrays, batch_size, max_new_tokens):
    """Greedy outputs as text, one list of N strings per prompt."""
    ids_key, mask_key = (("input_ids", "input_mask") if model.is_encoder_decoder
                         else ("gen_ids", "gen_mask"))
    K = 1 if prompts is None else prompts.shape[0]
    outs = [[] for _ in range(K)]
    for batch, n in pipeline.eval_batches({"ids": arrays[ids_key], "mask": arrays[mask_key]},
                                          batch_size):
        rows = tile_rows(batch, K)
        p = None if prompts is None else prompt_rows(jnp.asarray(prompts), len(batch["ids"]))
        tokens = np.asarray(model.generate(params, rows["ids"], attention_mask=rows["mask"],
                                           prompt=p, max_new_tokens=max_new_tokens))
        tokens = tokens.reshape(K, -1, tokens.shape[-1])[:, :n]
        for k in range(K):
            outs[k] += model.tokenizer.batch_decode(tokens[k], skip_special_tokens=True)
    return outs
