"""Prompt design runs (``method.name=design``): the frozen model, a manual template and
``task.shots`` in-context examples, evaluated once; no training.

Each evaluated input is preceded by k demonstrations drawn from the train split, a fresh
draw per example seeded by (``prompt.seeds[0]``, example index), as GPT-3's few-shot
evaluation does. A demonstration is the template's text with the answer in place of
{mask} (a class's first label word with a verbalizer), or ``inputs + " " + target``
without a template. The demonstrations enter as a field ({demos}) before the template,
so they are what truncation shortens first when the input is too long.
"""
from __future__ import annotations

import dataclasses
import os
import random

from ptjax import config as config_lib
from ptjax import storage
from ptjax.data.tasks import load_task
from ptjax.data.templates import field_values, parse
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, evaluate
from ptjax.models.model import count_params
from ptjax.rundir import MetricsLog, check_resumable, write_json
from ptjax.sharding import is_main_process
from ptjax.taskdata import encoding, verbalizing


def demonstration(example: dict, template, answer: str) -> str:
    """One solved example as text."""
    if template is None:
        return f"{example['inputs']} {answer}"
    values, parts = field_values(example), []
    for p in template.pieces:
        if p.kind == "text":
            parts.append(p.text)
        elif p.kind == "field":
            parts.append(str(values[p.name]))
        elif p.kind == "mask":
            parts.append(answer)
        else:
            raise PtjaxError(f"task.template={template.source!r}: prompt design trains "
                             "nothing, so a template for it has no {soft:N} slots")
    return " ".join(parts)


def with_demonstrations(examples: list, pool: list, k: int, seed: int, template,
                        verbalizer=()) -> list:
    """``examples`` with fields["demos"]: k solved examples from ``pool`` each."""
    if k > len(pool):
        raise PtjaxError(f"task.shots={k} is more than the {len(pool)} train examples")
    first_word = {c: words[0] for c, words in verbalizer}
    out = []
    for i, ex in enumerate(examples):
        rng = random.Random(f"{seed}-{i}")
        demos = [demonstration(d, template, first_word.get(d["targets"], d["targets"]))
                 for d in rng.sample(pool, k)]
        out.append({**ex, "fields": {**ex.get("fields", {}), "demos": " ".join(demos)}})
    return out


def design_template(tcfg) -> str:
    """The template a design run encodes with: {demos} before the task's own."""
    if not tcfg.shots:
        return tcfg.template
    return "{demos} " + (tcfg.template or "{inputs}")


def run_design(cfg, mesh, model, method) -> dict:
    """Evaluate the bare model with the design (template + k shots); write the run dir."""
    tcfg = cfg.task
    if tcfg.transfer:
        raise PtjaxError("task.transfer is not evaluated for method.name=design; evaluate "
                         "the other task with its own design run")
    task = load_task(tcfg, splits=("train", "validation") if tcfg.shots else ("validation",))
    if tcfg.shots:
        template = parse(tcfg.template) if tcfg.template else None
        demos = with_demonstrations(task.split("validation"), task.split("train"),
                                    tcfg.shots, method.seeds[0], template, tcfg.verbalizer)
        task = dataclasses.replace(task, splits={**task.splits, "validation": demos})
    tcfg = dataclasses.replace(tcfg, template=design_template(tcfg))
    dev = build_dev_set(model, task, tcfg.eval_mode, tcfg.max_input_length,
                        tcfg.max_target_length, **encoding(model, tcfg), **verbalizing(tcfg))
    values = evaluate(model, None, None, model.params, dev, cfg.train.eval_batch_size,
                      tcfg.max_target_length, mesh)
    metric = cfg.train.metric or dev.select
    results = {"run_dir": cfg.run_dir, "method": method.name, "metric": metric, "steps": 0,
               "export": None, "model": cfg.model.path, "task": tcfg.name, "shots": tcfg.shots,
               "parameters": count_params(model.params),
               "prompts": [{"prompt": 0, "seed": int(method.seeds[0]), "best_step": 0,
                            f"best_{metric}": values[metric][0]}]}
    if is_main_process():
        storage.makedirs(cfg.run_dir)
        check_resumable(cfg.run_dir, cfg)
        config_lib.save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        log = MetricsLog(cfg.run_dir, 0)
        log.write([{"step": 0, "split": "validation", "prompt": 0,
                    **{m: v[0] for m, v in values.items()}, f"best_{metric}": values[metric][0],
                    "best_step": 0}])
        log.close()
        write_json(os.path.join(cfg.run_dir, "results.json"), results)
    return results
