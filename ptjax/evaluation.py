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

from ptjax.data import pipeline
from ptjax.errors import PtjaxError
from ptjax.train import prompt_rows, sequence_nll, tile_rows


@dataclasses.dataclass
class DevSet:
    """A task's dev split, encoded once. mode: "rank" or "generate"."""
    mode: str
    metric: str
    arrays: dict  # rank: one row per (example, label), example-major; generate: examples
    targets: list
    gold: np.ndarray | None = None  # rank: [N] label index
    n_labels: int = 0


def build_dev_set(model, task, mode: str, max_input_length: int, max_target_length: int,
                  split: str = "validation") -> DevSet:
    examples = task.split(split)
    if mode == "auto":
        mode = "rank" if task.labels else "generate"
    if mode == "rank":
        labels = list(task.labels)
        gold = []
        for i, ex in enumerate(examples):
            if ex["targets"] not in labels:
                raise PtjaxError(f"task {task.name!r} {split} example {i}: target "
                                 f"{ex['targets']!r} is not one of the labels "
                                 f"({', '.join(labels)})")
            gold.append(labels.index(ex["targets"]))
        pairs = [{"inputs": ex["inputs"], "targets": lab} for ex in examples for lab in labels]
        arrays, _ = pipeline.encode(model, pairs, max_input_length, max_target_length)
        _check_labels_fit(model, labels, max_target_length)
        return DevSet("rank", "accuracy", arrays, [ex["targets"] for ex in examples],
                      np.asarray(gold), len(labels))
    arrays, _ = pipeline.encode(model, examples, max_input_length, max_target_length)
    return DevSet("generate", "exact_match", arrays, [ex["targets"] for ex in examples])


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

    batch_size counts rows per prompt (example-label pairs for rank classification).
    """
    if dev.mode == "rank":
        scores = [np.asarray(_scores(model, params, prompts_KxPxD, b))[:, :n]
                  for b, n in pipeline.eval_batches(dev.arrays, batch_size)]
        scores = np.concatenate(scores, axis=1)  # [K, N * L]
        pred = scores.reshape(scores.shape[0], -1, dev.n_labels).argmax(-1)
        return {"accuracy": [float(100.0 * np.mean(p == dev.gold)) for p in pred]}
    outputs = _generate(model, params, prompts_KxPxD, dev.arrays, batch_size, max_new_tokens)
    return {"exact_match": [float(100.0 * np.mean([o.strip() == t.strip()
                                                   for o, t in zip(outs, dev.targets)]))
                            for outs in outputs]}


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
