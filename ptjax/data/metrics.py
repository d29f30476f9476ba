"""Dev-set metrics for GLUE / SuperGLUE / SQuAD-style tasks, defined as T5 defines them.

Every function takes lists of strings (the verbalized targets and the model's
predictions, e.g. "True" / "False", "entailment", an answer span) and returns a dict of
percentages (0-100) as T5 reports them. The reference is the T5 code base
(google-research/text-to-text-transfer-transformer):

* ``t5/evaluation/metrics.py``: ``accuracy``, ``f1_score_with_invalid``,
  ``mean_multiclass_f1``, ``all_match`` (formerly ``exact_match``), ``mean_group_metric``,
  ``multirc_f1_over_all_answers``, ``deduplicate_metric``, ``squad``;
* ``t5/evaluation/qa_utils.py``: ``normalize_squad``, ``_f1_score``,
  ``_metric_max_over_ground_truths``, ``qa_metrics``;
* ``t5/data/glue_utils.py``: which metrics each GLUE / SuperGLUE task reports;
* ``t5/evaluation/eval_utils.py``: ``compute_avg_glue`` (the benchmark averages, in
  ``ptjax.data.benchmarks``).

T5 first maps a label string to its class id (``string_label_to_class_id``), a string
outside the label set becoming -1; here the strings are compared directly, which gives
the same numbers as long as every *target* is a valid label (checked where it matters).
Nothing here imports jax or sklearn; the few sklearn computations T5 uses are written out.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from ptjax.errors import PtjaxError


class MetricError(PtjaxError, ValueError):
    """Bad metric input (no examples, lengths that differ, a target outside the labels).

    A ``ValueError`` for callers of this module, and a ``PtjaxError`` so the CLI prints
    the message as a user's mistake."""


# ------------------------------------------------------------------- input checks


def _check(name: str, *columns: Sequence) -> int:
    """All columns non-empty and of one length; returns that length."""
    lengths = [len(c) for c in columns]
    if not lengths or lengths[0] == 0:
        raise MetricError(f"{name}: no examples (empty targets / predictions); a metric "
                          "over zero examples is undefined")
    if len(set(lengths)) != 1:
        raise MetricError(f"{name}: inputs differ in length ({', '.join(map(str, lengths))});"
                          " give one target, prediction (and group) per example")
    return lengths[0]


def _group_key(group) -> Hashable:
    """A group id usable as a dict key (a TFDS idx dict or a list becomes a tuple)."""
    if isinstance(group, Mapping):
        return tuple(sorted((k, _group_key(v)) for k, v in group.items()))
    if isinstance(group, (list, tuple)):
        return tuple(_group_key(g) for g in group)
    if isinstance(group, np.ndarray):
        return tuple(group.tolist()) if group.ndim else group.item()
    if isinstance(group, np.generic):
        return group.item()
    return group


def mean_score(values) -> float:
    """The plain mean as a float (T5 averages metrics and tasks unweighted)."""
    return float(np.mean(values))


# ------------------------------------------------------------------- classification


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict:
    """{"accuracy": 100 * the fraction of examples whose prediction equals the target}.

    T5: ``metrics.accuracy`` (``100 * sklearn.metrics.accuracy_score``). Strings are
    compared exactly (no stripping or lower-casing), so a prediction outside the label
    set is simply wrong, as T5's -1 class id is.
    """
    _check("accuracy", targets, predictions)
    return {"accuracy": 100.0 * mean_score([p == t for t, p in zip(targets, predictions)])}


def _binary_f1(targets: Sequence[str], predictions: Sequence[str], positive: str) -> float:
    """T5's ``f1_score_with_invalid`` on label strings, in percent.

    T5 maps a prediction that is neither class to ``1 - target``, i.e. always to the
    wrong class, then takes sklearn's binary F1 of class 1. So a prediction counts as
    right only when it equals its target, and a wrong one is a false negative on a
    positive target and a false positive on a negative target:
    F1 = 2 TP / (2 TP + FP + FN), 0 when there is no positive target or prediction
    (sklearn's zero_division default)."""
    kinds = set(targets)
    if len(kinds - {positive}) > 1:
        raise MetricError(f"binary F1: the targets hold more than two labels "
                          f"({', '.join(sorted(map(repr, kinds)))}); the positive label is "
                          f"{positive!r}")
    tp = fp = fn = 0
    for t, p in zip(targets, predictions):
        if t == positive:
            tp += p == t
            fn += p != t
        else:
            fp += p != t
    denom = 2 * tp + fp + fn
    return 100.0 * 2 * tp / denom if denom else 0.0


def f1_and_accuracy(targets: Sequence[str], predictions: Sequence[str],
                    positive: str) -> dict:
    """{"f1", "accuracy"}: MRPC / QQP, as T5's GLUE_METRICS list them
    (``[f1_score_with_invalid, accuracy]``).

    "f1" is the F1 of the ``positive`` label string (T5's class 1: "equivalent",
    "duplicate"). As in T5's ``f1_score_with_invalid``, a prediction that is not one of
    the two labels counts as wrong: a false negative when the target is positive, a
    false positive when it is negative. The targets must hold at most two labels.
    """
    _check("f1_and_accuracy", targets, predictions)
    return {"f1": _binary_f1(targets, predictions, positive),
            **accuracy(targets, predictions)}


def _macro_f1(targets: Sequence[str], predictions: Sequence[str],
              labels: Sequence[str]) -> float:
    """sklearn ``fbeta_score(beta=1, labels=labels, average="macro")`` in percent: the
    unweighted mean over ``labels`` of each class's 2 TP / (2 TP + FP + FN), a class
    with no TP, FP or FN scoring 0. A prediction outside ``labels`` is a false negative
    of its target's class and a false positive of no class."""
    per_class = []
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(targets, predictions))
        fp = sum(t != c and p == c for t, p in zip(targets, predictions))
        fn = sum(t == c and p != c for t, p in zip(targets, predictions))
        denom = 2 * tp + fp + fn
        per_class.append(2 * tp / denom if denom else 0.0)
    return 100.0 * mean_score(per_class)


def cb_metrics(targets: Sequence[str], predictions: Sequence[str],
               labels: Sequence[str]) -> dict:
    """{"accuracy", "macro_f1", "score"}: CommitmentBank, as T5's SUPERGLUE_METRICS
    (``[mean_multiclass_f1(num_classes=3), accuracy]``; T5 logs the F1 as
    "mean_3class_f1").

    "macro_f1" is the unweighted mean of the per-class F1 over *all* ``labels`` (CB's
    three: entailment, contradiction, neutral), so a class never predicted contributes
    an F1 of 0. A prediction outside ``labels`` is wrong (a miss for its target's class,
    a false alarm for none, as T5's -1 class id under ``labels=range(3)``).
    "score" = the mean of accuracy and macro_f1, how the SuperGLUE average counts CB.
    """
    _check("cb_metrics", targets, predictions)
    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise MetricError(f"cb_metrics: labels must be two or more distinct class names, "
                          f"got {labels!r}")
    unknown = sorted(set(targets) - set(labels))
    if unknown:
        raise MetricError(f"cb_metrics: targets {unknown!r} are not among the labels "
                          f"{labels!r}")
    acc = accuracy(targets, predictions)["accuracy"]
    f1 = _macro_f1(targets, predictions, labels)
    return {"accuracy": acc, "macro_f1": f1, "score": (acc + f1) / 2}


def multirc_metrics(targets: Sequence[str], predictions: Sequence[str],
                    groups: Sequence, positive: str = "True") -> dict:
    """{"f1a", "em", "score"}: MultiRC, as T5's SUPERGLUE_METRICS
    (``[multirc_f1_over_all_answers, mean_group_metric(all_match)]``).

    Each example is one (question, candidate answer) pair labelled "True" / "False";
    ``groups`` holds the question each pair belongs to (T5 groups by ``idx/question``,
    unique over the split; pass (paragraph, question) ids if yours are not).

    * "f1a": binary F1 of ``positive`` over all answer pairs, pooled
      (``f1_score_with_invalid``: a prediction that is neither label counts as wrong).
    * "em": per question, 100 if every one of its answers is predicted right
      (``all_match``), else 0; then the mean over questions, each question counting
      once whatever its number of answers (``mean_group_metric``).
    * "score": the mean of f1a and em, how the SuperGLUE average counts MultiRC.
    """
    _check("multirc_metrics", targets, predictions, groups)
    by_question = collections.defaultdict(list)
    for t, p, g in zip(targets, predictions, groups):
        by_question[_group_key(g)].append(p == t)
    em = 100.0 * mean_score([all(ok) for ok in by_question.values()])
    f1a = _binary_f1(targets, predictions, positive)
    return {"f1a": f1a, "em": em, "score": (f1a + em) / 2}


# ------------------------------------------------------------------- extractive QA


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 answer normalisation (T5 ``qa_utils.normalize_squad``): lower-case,
    delete ASCII punctuation (``string.punctuation``), replace the words a / an / the
    by a space, then collapse whitespace runs to one space and strip the ends."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _token_f1(target: str, prediction: str) -> float:
    """T5 ``qa_utils._f1_score`` on normalised strings: bag-of-tokens overlap,
    P = common / |prediction|, R = common / |target|, F1 = 2PR / (P + R); 0 when
    nothing is shared (so also when both normalise to the empty string)."""
    pred_tokens, target_tokens = prediction.split(), target.split()
    common = collections.Counter(pred_tokens) & collections.Counter(target_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_lists(name: str, answers_list: Sequence) -> list[list[str]]:
    out = []
    for i, answers in enumerate(answers_list):
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers:
            raise MetricError(f"{name}: example {i} has no gold answers; the max over its "
                              "answers is undefined")
        out.append(answers)
    return out


def squad_metrics(answers_list: Sequence[Sequence[str]],
                  predictions: Sequence[str]) -> dict:
    """{"em", "f1"}: SQuAD v1.1 (T5 ``metrics.squad`` -> ``qa_utils.qa_metrics``).

    Gold answers and predictions go through ``normalize_answer``; per example, EM (the
    strings are equal) and token F1 each take their max over that example's gold
    answers (``_metric_max_over_ground_truths``), then both are averaged over
    examples. ``answers_list[i]`` is the list of example i's gold answers (a bare
    string counts as a one-answer list).
    """
    _check("squad_metrics", answers_list, predictions)
    golds = _gold_lists("squad_metrics", answers_list)
    em, f1 = [], []
    for answers, prediction in zip(golds, predictions):
        pred = normalize_answer(prediction)
        gold = [normalize_answer(a) for a in answers]
        em.append(max(float(g == pred) for g in gold))
        f1.append(max(_token_f1(g, pred) for g in gold))
    return {"em": 100.0 * mean_score(em), "f1": 100.0 * mean_score(f1)}


def record_metrics(answers_list: Sequence[Sequence[str]], predictions: Sequence[str],
                   groups: Sequence | None = None) -> dict:
    """{"em", "f1", "score"}: ReCoRD, as T5's SUPERGLUE_METRICS
    (``[deduplicate_metric(squad)]``).

    T5's ReCoRD preprocessor repeats a query once per gold answer; its metric keeps
    only the first example of each group (``idx/passage``, ``idx/query``) and scores
    those with ``squad_metrics``: EM and token F1 with the max over the query's gold
    answers (all of them, not just the one the copy was made for). With
    ``groups=None`` every example counts. "score" is the mean of em and f1, how the
    SuperGLUE average counts ReCoRD.
    """
    if groups is None:
        _check("record_metrics", answers_list, predictions)
    else:
        _check("record_metrics", answers_list, predictions, groups)
        seen, keep = set(), []
        for i, g in enumerate(groups):
            key = _group_key(g)
            if key not in seen:
                seen.add(key)
                keep.append(i)
        answers_list = [answers_list[i] for i in keep]
        predictions = [predictions[i] for i in keep]
    out = squad_metrics(answers_list, predictions)
    return {**out, "score": (out["em"] + out["f1"]) / 2}


# ------------------------------------------------------------------- metric sets

_WSC_DETERMINERS = frozenset(
    "a an few her his each every many much my our some that the their these this those "
    "which whose your".split())


def wsc_metrics(examples: Sequence[Mapping], predictions: Sequence[str]) -> dict:
    """{"accuracy"}: WSC in T5's "simple" form (``postprocessors.wsc_simple``). The model
    names a referent; it counts as "the pronoun refers to span1" when, determiners
    dropped and lower-cased, its words and span1's are a subset one of the other (and
    both or neither have an apostrophe). That bool is scored against the example's
    label (0 / 1)."""
    _check("wsc", examples, predictions)

    def clean(s):
        return " ".join(w for w in s.strip().lower().split(" ") if w not in _WSC_DETERMINERS)

    predicted = []
    for ex, pred in zip(examples, predictions):
        p, ref = clean(pred), clean(ex["targets"])
        if ("'" in p) != ("'" in ref):
            predicted.append(0)
            continue
        pw, rw = set(p.split(" ")), set(ref.split(" "))
        predicted.append(int(pw <= rw or rw <= pw))
    gold = [int(ex["label"]) for ex in examples]
    return {"accuracy": mean_score([100.0 * (a == b) for a, b in zip(predicted, gold)])}


METRICS: dict[str, Callable[..., dict]] = {
    "accuracy": accuracy,
    "f1_accuracy": f1_and_accuracy,
    "cb": cb_metrics,
    "multirc": multirc_metrics,
    "squad": squad_metrics,
    "record": record_metrics,
    "wsc": wsc_metrics,
}

# The keys each metric set returns through ``compute`` (multi-metric sets add "score").
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "f1_accuracy": ("f1", "accuracy", "score"),
    "cb": ("accuracy", "macro_f1", "score"),
    "multirc": ("f1a", "em", "score"),
    "squad": ("em", "f1", "score"),
    "record": ("em", "f1", "score"),
    "wsc": ("accuracy",),
}


def _answers(ex: Mapping) -> Sequence[str]:
    """An example's gold answers: its "answers", or its one target."""
    answers = ex.get("answers")
    return [ex["targets"]] if answers is None or len(answers) == 0 else answers


def compute(metric_set: str, examples: Sequence[Mapping], predictions: Sequence[str],
            labels: Sequence[str] = ()) -> dict:
    """A metric set over formatted examples ({"targets", optional "answers" and
    "group"}) and one prediction string per example. ``labels`` are the task's classes
    in T5's class-id order: f1_accuracy's and multirc's positive class is labels[1]
    (T5's class 1; multirc defaults to "True"), cb's classes are all of them. Sets of
    several metrics also get "score", their mean (as a benchmark average counts the
    task)."""
    if metric_set not in METRICS:
        raise MetricError(f"unknown metric set {metric_set!r}; known: {', '.join(METRICS)}")
    labels = tuple(labels)
    targets = [ex["targets"] for ex in examples]
    if metric_set == "wsc":
        return wsc_metrics(examples, predictions)
    if metric_set == "accuracy":
        out = accuracy(targets, predictions)
    elif metric_set == "f1_accuracy":
        if len(labels) != 2:
            raise MetricError(f"f1_accuracy needs the two labels (negative, positive); got "
                              f"{labels!r}")
        out = f1_and_accuracy(targets, predictions, positive=labels[1])
    elif metric_set == "cb":
        out = cb_metrics(targets, predictions, labels)
    elif metric_set == "multirc":
        if any("group" not in ex for ex in examples):
            raise MetricError("multirc needs each example's question in its 'group'")
        out = multirc_metrics(targets, predictions, [ex["group"] for ex in examples],
                              positive=labels[1] if len(labels) == 2 else "True")
    else:
        answers = [_answers(ex) for ex in examples]
        if metric_set == "squad":
            out = squad_metrics(answers, predictions)
        else:
            groups = ([ex["group"] for ex in examples]
                      if examples and all("group" in ex for ex in examples) else None)
            out = record_metrics(answers, predictions, groups)
    if len(out) > 1 and "score" not in out:
        out["score"] = mean_score(list(out.values()))
    return out
