"""Benchmark averages over tasks' dev metrics (``ptjax.data.metrics``), as T5's
``t5/evaluation/eval_utils.py`` ``compute_avg_glue`` and the leaderboards take them:
SuperGLUE and GLUE."""
from __future__ import annotations

import numbers
from typing import Mapping, Sequence

from ptjax.data.metrics import MetricError, mean_score

# The metrics each task contributes to its benchmark average (T5 eval_utils.METRIC_NAMES,
# named as this module names them).
SUPERGLUE_METRICS = {
    "boolq": ("accuracy",),
    "cb": ("accuracy", "macro_f1"),
    "copa": ("accuracy",),
    "multirc": ("f1a", "em"),
    "record": ("em", "f1"),
    "rte": ("accuracy",),
    "wic": ("accuracy",),
    "wsc": ("accuracy",),
}


# T5's GLUE average leaves out WNLI (T5 trains on WSC / DPR instead) and counts MNLI
# once, as the mean of its matched and mismatched accuracies.
GLUE_METRICS = {
    "cola": ("matthews_corrcoef",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson_corrcoef", "spearman_corrcoef"),
    "qqp": ("f1", "accuracy"),
    "mnli": ("matched", "mismatched"),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
}


_DIAGNOSTICS = {"axb", "axg", "ax"}  # test-only diagnostics: never in the average


def _task_score(benchmark: str, task: str, value, expected: Sequence[str]) -> float:
    """One task's score: a number as given; from a metric dict, the mean of the task's
    metrics (``expected``), else its "score", else its one metric for a one-metric task
    (e.g. WSC scored by "exact_match")."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, Mapping):
        raise MetricError(f"{benchmark}: task {task!r} has {value!r}; give a number or a "
                          "dict of metrics")
    if all(k in value for k in expected):
        return mean_score([float(value[k]) for k in expected])
    if "score" in value:
        return float(value["score"])
    others = [k for k in value if k != "score"]
    if len(expected) == 1 and len(others) == 1:
        return float(value[others[0]])
    raise MetricError(f"{benchmark}: task {task!r} needs the metrics "
                      f"{', '.join(expected)} (or a 'score'); got {', '.join(value) or 'none'}")


def _benchmark_score(benchmark: str, task_scores: Mapping, tasks: Mapping) -> float:
    if not task_scores:
        raise MetricError(f"{benchmark}: no task scores given")
    unknown = sorted(set(task_scores) - set(tasks) - _DIAGNOSTICS)
    missing = [t for t in tasks if t not in task_scores]
    if unknown or missing:
        raise MetricError(f"{benchmark}: the average needs exactly the tasks "
                          f"{', '.join(tasks)}" + (f"; missing {', '.join(missing)}"
                                                    if missing else "")
                          + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    return mean_score([_task_score(benchmark, t, task_scores[t], m) for t, m in tasks.items()])


def superglue_score(task_scores: Mapping[str, Mapping | float]) -> float:
    """The SuperGLUE average, as the leaderboard and T5's ``compute_avg_glue`` take it:
    each task's score is the mean of its metrics (CB: accuracy and macro_f1; MultiRC:
    f1a and em; ReCoRD: em and f1; the rest: accuracy), then the unweighted mean over
    the 8 tasks boolq, cb, copa, multirc, record, rte, wic, wsc.

    ``task_scores`` maps each task to its metric dict (as the functions here return
    them) or directly to its score; a dict without the task's metrics may give its
    "score". The diagnostics axb / axg may be present and are left out; any other task
    name, or a missing task, is an error.
    """
    return _benchmark_score("superglue_score", task_scores, SUPERGLUE_METRICS)


def glue_score(task_scores: Mapping[str, Mapping | float]) -> float:
    """The GLUE average as T5's ``compute_avg_glue`` takes it: per task the mean of its
    metrics (CoLA: matthews_corrcoef; MRPC, QQP: f1 and accuracy; STS-B: pearson and
    spearman; MNLI: its "matched" and "mismatched" accuracies; SST-2, QNLI, RTE:
    accuracy), then the mean over those 8 tasks. WNLI is not counted, as in T5 (the
    official leaderboard, which scores WNLI too, averages 9 tasks). MNLI may also be
    given as two tasks "mnli_matched" and "mnli_mismatched" (each with an "accuracy").
    """
    scores = dict(task_scores)
    if "mnli" not in scores and {"mnli_matched", "mnli_mismatched"} <= set(scores):
        scores["mnli"] = {
            "matched": _task_score("glue_score", "mnli_matched",
                                   scores.pop("mnli_matched"), ("accuracy",)),
            "mismatched": _task_score("glue_score", "mnli_mismatched",
                                      scores.pop("mnli_mismatched"), ("accuracy",))}
    return _benchmark_score("glue_score", scores, GLUE_METRICS)
