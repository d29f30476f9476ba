"""Dev-set evaluation of K members (prompts, prefixes, prompt encoders) at once: rank
classification and greedy exact match, for any ``ptjax.methods`` method.

Rank classification (T5X's ``rank_classification``): every example is paired with every
verbalized label, each label scored by the summed log-likelihood of its tokens (EOS
included) behind the prompt, and the best-scoring label is the prediction.
Generation: greedy decoding with the KV cache, then exact match after stripping spaces.

Metrics are percentages, one value per member: {"accuracy": [K]} or {"exact_match": [K]}.
K members run in one forward pass of K x B rows; ``ensemble`` combines their predictions
(majority vote or mean log-likelihood), as in the paper's prompt ensembles. ``method``
None scores the bare model (K = 1).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import sharding, verbalizers
from ptjax.data import encoding, metrics, pipeline
from ptjax.errors import PtjaxError
from ptjax.models.common import PromptInputs
from ptjax.train import member_class_logits, member_nll, sequence_nll


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
    # a verbalizer: rows are (example, label word), example-major, words grouped by class;
    # row_class[r] is row r's class index, word_mask [R, T] marks the word's own tokens
    verbalizer: tuple = ()
    row_class: np.ndarray | None = None
    word_mask: np.ndarray | None = None
    word_tokens: str = "mean"
    # a soft verbalizer: one row per example, classes ranked by its class logits
    soft: bool = False


def build_dev_set(model, task, mode: str, max_input_length: int, max_target_length: int,
                  split: str = "validation", target_prefix: tuple = (),
                  template=None, verbalizer: tuple = (), word_tokens: str = "mean",
                  soft: bool = False) -> DevSet:
    """Rank candidates are the task's labels, or an example's own "candidates" (COPA's
    choices, ReCoRD's entities). target_prefix: ids put before every target and candidate
    (task.target_sentinel); greedy outputs are decoded without special tokens, so without
    T5's sentinels. verbalizer: ((class, (word, ...)), ...): classes are ranked by their
    label words' log-probabilities (``verbalize``), or with ``soft`` by a soft
    verbalizer's class logits (``ptjax.verbalizers``)."""
    examples = task.split(split)
    if not examples:
        raise PtjaxError(f"task {task.name!r} has no {split} examples")
    if verbalizer:
        return _verbalized_dev_set(model, task, split, examples, max_input_length,
                                   max_target_length, target_prefix, template, verbalizer,
                                   word_tokens, soft)
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
        pairs = [{"inputs": ex["inputs"], "fields": ex.get("fields", {}), "targets": c}
                 for ex, cands in zip(examples, candidates) for c in cands]
        arrays, _ = encoding.encode(model, pairs, max_input_length, max_target_length,
                                    target_prefix, template)
        _check_labels_fit(model, sorted({c for cands in candidates for c in cands}),
                          max_target_length - len(target_prefix))
        return DevSet("rank", metric_set, examples, arrays, candidates, tuple(task.labels),
                      task.metric)
    if model.kind == "masked":
        raise PtjaxError(f"task {task.name!r}: task.eval_mode=generate (or auto without "
                         "labels) decodes left to right, which a masked LM does not; give "
                         "task.labels or task.verbalizer and task.eval_mode=rank")
    arrays, _ = encoding.encode(model, examples, max_input_length, max_target_length,
                                target_prefix, template)
    select = task.metric
    if metric_set == "accuracy":  # a classification task decoded greedily
        metric_set = select = "exact_match"
    return DevSet("generate", metric_set, examples, arrays, labels=tuple(task.labels),
                  select=select)


def _verbalized_dev_set(model, task, split, examples, max_input_length, max_target_length,
                        target_prefix, template, verbalizer, word_tokens,
                        soft: bool = False) -> DevSet:
    classes = tuple(c for c, _ in verbalizer)
    for i, ex in enumerate(examples):
        if ex["targets"] not in classes:
            raise PtjaxError(f"task {task.name!r} {split} example {i}: target "
                             f"{ex['targets']!r} has no label words in task.verbalizer "
                             f"(classes: {', '.join(classes)})")
    rows = [(c, w) for c, (_, words) in enumerate(verbalizer) for w in words]
    _check_labels_fit(model, sorted({w for _, w in rows}),
                      max_target_length - len(target_prefix))
    if soft:  # one row per example: its answer position is all a soft verbalizer reads
        rows = rows[:1]
    pairs = [{"inputs": ex["inputs"], "fields": ex.get("fields", {}), "targets": w}
             for ex in examples for _, w in rows]
    arrays, _ = encoding.encode(model, pairs, max_input_length, max_target_length,
                                target_prefix, template)
    # the word's own tokens: the target tokens after the prefix, without the final EOS
    word_mask = verbalizers.word_mask(arrays["target_mask"], len(target_prefix),
                                      model.kind != "masked")
    return DevSet("rank", task.metric_set or task.metric, examples, arrays,
                  [list(classes)] * len(examples), classes, task.metric,
                  verbalizer=tuple(verbalizer),
                  row_class=np.tile([c for c, _ in rows], len(examples)),
                  word_mask=word_mask, word_tokens=word_tokens, soft=soft)


WORD_TOKENS = ("first", "mean", "max")


def verbalize(token_logprobs_KxRxT, dev: DevSet) -> np.ndarray:
    """Class scores [K, N x C] (example-major) from each (example, word) row's token
    log-probabilities: a word scores the log-probability of its first token, the mean of
    its tokens' or the max of them (``dev.word_tokens``); a class scores the mean of its
    words' scores."""
    lp = np.where(dev.word_mask[None], token_logprobs_KxRxT, np.nan)
    if dev.word_tokens == "first":
        first = dev.word_mask.argmax(1)[None, :, None]
        word = np.take_along_axis(lp, np.broadcast_to(first, lp.shape[:2] + (1,)), 2)[..., 0]
    elif dev.word_tokens == "mean":
        word = np.nanmean(lp, axis=2)
    else:
        word = np.nanmax(lp, axis=2)
    K, C, N = word.shape[0], len(dev.verbalizer), len(dev.examples)
    per_example = word.reshape(K, N, -1)
    row_class = dev.row_class[:per_example.shape[2]]
    scores = np.stack([per_example[:, :, row_class == c].mean(2) for c in range(C)], axis=2)
    return scores.reshape(K, N * C)


def _check_labels_fit(model, labels, max_target_length):
    extra = 0 if model.is_encoder_decoder else 1  # GPT-2: " " + label, then EOS appended
    if model.kind == "masked":  # " " + label at the mask tokens, nothing more
        extra = 0
    for lab in labels:
        if model.kind == "masked":
            n = len(model.tokenizer(" " + lab, add_special_tokens=False)["input_ids"])
        else:
            n = len(model.tokenizer(lab if model.is_encoder_decoder else " " + lab)["input_ids"])
        if n + extra > max_target_length:
            what = " (on a masked LM, the mask tokens {mask} becomes)" \
                if model.kind == "masked" else ""
            raise PtjaxError(f"label {lab!r} is {n + extra} tokens, over "
                             f"task.max_target_length={max_target_length}{what}; raise it so "
                             "labels are scored whole")


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def member_scores(model, method, trainable, frozen, batch, per_token=False):
    """Summed log-likelihood of each row's targets for each member -> [K, R] (per_token:
    each target position's log-probability, [K, R, T])."""
    if method is None:
        nll, _ = sequence_nll(model, frozen, batch, None, per_token=per_token)
        return -nll[None]
    nll, _ = member_nll(model, method, trainable, frozen, batch, per_token=per_token)
    return -nll


@functools.partial(jax.jit, static_argnums=(0, 1))
def _soft_scores(model, method, trainable, frozen, batch, word_mask):
    """A soft verbalizer's class log-probabilities (log-softmax over its class logits) of
    each row for each member -> [K, R, C]."""
    return jax.nn.log_softmax(member_class_logits(model, method, trainable, frozen, batch,
                                                  word_mask), axis=-1)


@dataclasses.dataclass
class Predictions:
    """K prompts' outputs on a dev set. texts[k][i]: prompt k's answer to example i.
    scores: rank mode, [K, total candidates] log-likelihoods (example-major)."""
    texts: list
    scores: np.ndarray | None = None


def rows_per_batch(batch_size: int, mesh) -> int:
    """Eval batches split evenly over the mesh's data axis (padding rows are dropped)."""
    data = 1 if mesh is None else mesh.shape["data"]
    return -(-batch_size // data) * data


def predict(model, method, trainable, frozen, dev: DevSet, batch_size: int,
            max_new_tokens: int, mesh=None) -> Predictions:
    """Every member's prediction for every dev example (method None: the bare model with
    params ``frozen``). trainable: the method's tree, leaves [K, ...].

    batch_size counts rows per prompt (example-candidate pairs for rank classification);
    with a mesh the rows are split over its data axis and the weights stay where they are.
    """
    batch_size = rows_per_batch(batch_size, mesh)
    put = (lambda b: b) if mesh is None else (lambda b: sharding.replicated_batch(b, mesh))
    if dev.mode == "rank" and dev.soft:
        columns = {**dev.arrays, "word_mask": dev.word_mask.astype(np.int32)}
        scores = []
        for b, n in pipeline.eval_batches(columns, batch_size):
            b = put(b)
            wm = b.pop("word_mask")
            scores.append(sharding.to_host(_soft_scores(model, method, trainable, frozen, b,
                                                        wm))[:, :n])
        return soft_predictions(dev, np.concatenate(scores, axis=1))
    if dev.mode == "rank":
        per_token = dev.verbalizer != ()
        scores = [sharding.to_host(member_scores(model, method, trainable, frozen, put(b),
                                           per_token))[:, :n]
                  for b, n in pipeline.eval_batches(dev.arrays, batch_size)]
        return rank_predictions(dev, np.concatenate(scores, axis=1))
    outs = _generate(model, method, trainable, frozen, dev.arrays, batch_size, max_new_tokens,
                     put)
    return Predictions([[o.strip() for o in texts] for texts in outs])


def soft_predictions(dev: DevSet, scores_KxNxC) -> Predictions:
    """A soft verbalizer's predictions from K members' class log-probabilities [K, N, C]
    (scores kept as [K, N x C], example-major)."""
    scores = np.asarray(scores_KxNxC).reshape(len(scores_KxNxC), -1)
    C = len(dev.verbalizer)
    texts = [[dev.labels[int(np.argmax(row[i * C:(i + 1) * C]))]
              for i in range(len(dev.examples))] for row in scores]
    return Predictions(texts, scores)


def rank_predictions(dev: DevSet, scores) -> Predictions:
    """Rank classification's predictions from K members' scores of the dev rows: [K, rows]
    summed log-likelihoods, or with a verbalizer [K, rows, T] token log-probabilities
    (``verbalize``); each example's best-scoring candidate wins."""
    if dev.verbalizer:
        scores = verbalize(scores, dev)  # [K, examples x classes]
    bounds = np.cumsum([0] + [len(c) for c in dev.candidates])
    texts = [[cands[int(np.argmax(row[a:b]))]
              for cands, a, b in zip(dev.candidates, bounds[:-1], bounds[1:])]
             for row in scores]
    return Predictions(texts, scores)


def score(dev: DevSet, texts_K) -> dict:
    """{metric: [K]} for K lists of predictions."""
    per_prompt = [task_metrics(dev.metric_set, dev.examples, p, dev.labels) for p in texts_K]
    return {name: [m[name] for m in per_prompt] for name in per_prompt[0]}


def evaluate(model, method, trainable, frozen, dev: DevSet, batch_size: int,
             max_new_tokens: int, mesh=None) -> dict:
    """Metrics per member ({metric: [K] floats}); method None = the bare model (K = 1)."""
    return score(dev, predict(model, method, trainable, frozen, dev, batch_size,
                              max_new_tokens, mesh).texts)


ENSEMBLE_METHODS = ("majority", "mean_logprob")


def ensemble(dev: DevSet, preds: Predictions, method: str = "majority",
             weights=None) -> list[str]:
    """One prediction per example from K prompts (Lester et al.'s prompt ensembling),
    each prompt weighted by ``weights`` [K] (None: equally; PET's weighted fusion).

    majority: the answer with the most (weighted) votes; a tie goes to the tied answer
      with the highest (weighted) mean log-likelihood (rank mode) or to the one the
      lowest-numbered prompt gave.
    mean_logprob: rank mode only, the candidate with the highest log-likelihood averaged
      over prompts (a weighted average with ``weights``).
    """
    if method not in ENSEMBLE_METHODS:
        raise PtjaxError(f"ensemble method {method!r} is not valid; valid: "
                         f"{', '.join(ENSEMBLE_METHODS)}")
    if method == "mean_logprob" and preds.scores is None:
        raise PtjaxError("ensemble method mean_logprob needs rank classification (scored "
                         "candidates); this dev set is decoded greedily, use majority")
    K, n = len(preds.texts), len(preds.texts[0])
    w = np.ones(K) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (K,) or (w < 0).any() or not w.sum() > 0:
        raise PtjaxError(f"ensemble weights {list(w)}: give {K} (one per prompt), none "
                         "negative, not all 0")
    if preds.scores is not None:
        mean = np.average(preds.scores, axis=0, weights=w)
        bounds = np.cumsum([0] + [len(c) for c in dev.candidates])
        by_candidate = [dict(zip(c, mean[a:b]))
                        for c, a, b in zip(dev.candidates, bounds[:-1], bounds[1:])]
    if method == "mean_logprob":
        return [max(cands, key=cands.get) for cands in by_candidate]
    out = []
    for i in range(n):
        votes = {}  # insertion order = prompt order
        for k, texts in enumerate(preds.texts):
            votes[texts[i]] = votes.get(texts[i], 0.0) + w[k]
        top = max(votes.values())
        tied = [a for a in votes if votes[a] == top]
        if len(tied) > 1 and preds.scores is not None:
            tied = sorted(tied, key=lambda a: -by_candidate[i][a])
        out.append(tied[0])
    return out


def ensemble_table(dev: DevSet, preds: Predictions, method: str = "majority",
                   weights=None) -> dict:
    """The paper's ensemble table for one metric set: each prompt's metrics, their mean,
    the best prompt's, and the ensemble's (its prompts weighted by ``weights``, None:
    equally). {"prompts": {metric: [K]}, "average": {...}, "best": {...}, "ensemble":
    {...}, "weights": [K] or None}; best = the prompt best on ``dev.select``."""
    per_prompt = score(dev, preds.texts)
    best = int(np.argmax(per_prompt[dev.select]))
    return {
        "method": method,
        "weights": None if weights is None else [float(x) for x in weights],
        "prompts": per_prompt,
        "average": {m: float(np.mean(v)) for m, v in per_prompt.items()},
        "best": {m: float(v[best]) for m, v in per_prompt.items()},
        "best_prompt": best,
        "ensemble": {m: v[0] for m, v in score(dev, [ensemble(dev, preds, method,
                                                             weights)]).items()},
    }


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


def member_inputs(method, trainable, frozen):
    """(params, PromptInputs with a leading K axis or None) of K members for inference:
    weights come from the member when the method tunes them (K = 1), else ``frozen``."""
    if method is None:
        return frozen, None
    if method.tunes_weights:
        params = method.inputs(jax.tree.map(lambda x: x[0], trainable), frozen)[0]
    else:
        params = frozen
    return params, _member_prompts(method, trainable)


@functools.partial(jax.jit, static_argnums=(0,))
def _member_prompts(method, trainable):
    """K members' PromptInputs with a leading K axis (jitted once per method and shapes)."""
    return jax.vmap(lambda m: method.inputs(m, None)[1])(trainable)


def rows_of(prompts_K: PromptInputs | None, B: int) -> PromptInputs | None:
    """K members' prompt inputs laid out per row: row b*K + k gets member k."""
    if prompts_K is None:
        return None
    embeds = None if prompts_K.embeds is None else jnp.tile(prompts_K.embeds, (B, 1, 1))
    prefix = None if prompts_K.prefix is None else jax.tree.map(
        lambda x: jnp.tile(jnp.swapaxes(x, 0, 1), (1, B, 1, 1, 1)), prompts_K.prefix)
    return PromptInputs(embeds=embeds, prefix=prefix)


def _generate(model, method, trainable, frozen, arrays, batch_size, max_new_tokens, put):
    """Greedy outputs as text, one list of N strings per member. Each example is
    replicated over K rows (row b*K + k holds example b behind member k). Special tokens
    are dropped, T5's sentinels among them (task.target_sentinel's <extra_id_0>)."""
    ids_key, mask_key, slots_key = (("input_ids", "input_mask", "slots")
                                    if model.is_encoder_decoder
                                    else ("gen_ids", "gen_mask", "gen_slots"))
    K = 1 if method is None else jax.tree.leaves(trainable)[0].shape[0]
    params, prompts = member_inputs(method, trainable, frozen)
    columns = {"ids": arrays[ids_key], "mask": arrays[mask_key]}
    if slots_key in arrays:
        columns["slots"] = arrays[slots_key]
    if columns["ids"].ndim == 3:  # several templates: each member decodes its own layout
        one = lambda k: jax.tree.map(lambda x: x[k:k + 1], prompts)  # noqa: E731
        return [_decode(model, params, one(k), {c: v[:, k] for c, v in columns.items()},
                        1, batch_size, max_new_tokens, put)[0] for k in range(K)]
    return _decode(model, params, prompts, columns, K, batch_size, max_new_tokens, put)


def _decode(model, params, prompts, columns, K, batch_size, max_new_tokens, put):
    """Greedy outputs of K members over the same rows (row b*K + k: member k)."""
    outs = [[] for _ in range(K)]
    for batch, n in pipeline.eval_batches(columns, batch_size):
        B = len(batch["ids"])
        rows = put({k: np.repeat(v, K, axis=0) for k, v in batch.items()})
        p = rows_of(prompts, B)
        if "slots" in rows and p is not None:
            p = p.replace(slots=rows["slots"])
        tokens = sharding.to_host(model.generate(
            params, rows["ids"], attention_mask=rows["mask"], prompt=p,
            max_new_tokens=max_new_tokens))
        tokens = tokens.reshape(B, K, -1)[:n]
        for k in range(K):
            outs[k] += model.tokenizer.batch_decode(tokens[:, k], skip_special_tokens=True)
    return outs
