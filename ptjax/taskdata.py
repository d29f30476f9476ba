"""A run's data, read and encoded for its model: the task (or mixture) and its train
stream, the dev set that picks the best step, and the transfer tasks' dev sets, with each
task's template, verbalizer and labels checked before any step runs."""
from __future__ import annotations

import dataclasses

import jax

from ptjax import config as config_lib
from ptjax import verbalizers
from ptjax.data import pipeline, templates
from ptjax.data.encoding import target_prefix
from ptjax.data.tasks import load_task, task_names
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, metric_names
from ptjax.methods.base import check_lengths


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
    parsed = [templates.parse(t) for t in (tcfg.templates or (tcfg.template,) * bool(
        tcfg.template))]
    for t in parsed:
        templates.check_for_model(t, model.kind)
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
            "target_prefix": target_prefix(model, sentinel, tcfg.max_target_length,
                                                    why)}


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


def mixture_stream(model, cfg, first, owned, n_shards):
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


def transfer_dev_set(model, cfg, name: str):
    """The validation set of a task the prompts never trained on (domain transfer), read
    through its own task.mixture entry (template, verbalizer) when it has one."""
    entry = next((e for e in cfg.task.mixture if e.name == name), None)
    tcfg = (mixture_task_config(cfg.task, entry) if entry is not None else
            dataclasses.replace(cfg.task, name=name, labels=(), transfer=()))
    task = load_task(tcfg, splits=("validation",))
    return build_dev_set(model, task, tcfg.eval_mode, tcfg.max_input_length,
                         tcfg.max_target_length, **encoding(model, tcfg),
                         **verbalizing(tcfg))


def check_transfer_names(cfg):
    """One line for a task.transfer entry that names no task."""
    for name in cfg.task.transfer:
        if name not in task_names():
            raise PtjaxError(f"task.transfer names unknown task {name!r}; valid: "
                             f"{', '.join(task_names())}")


@dataclasses.dataclass
class RunData:
    """What a run trains and scores on. task: the dev task (a mixture's first trained
    one), its train split verbalized; dev: the set that picks each member's best step by
    ``metric``; transfer: {task name: dev set} scored zero-shot after training; stream:
    the seeded train stream over ``n_shards`` data shards."""
    task: object
    dev: object
    metric: str
    transfer: dict
    stream: object
    n_shards: int


def prepare_data(model, cfg, n_shards: int) -> RunData:
    """Every task a run needs, read, checked and encoded before step 1 (a missing transfer
    task's data stops the run there, not after training); this process reads its own of
    ``n_shards`` train shards."""
    tc = cfg.train
    check_transfer_names(cfg)
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
    transfer = {name: transfer_dev_set(model, cfg, name) for name in cfg.task.transfer}
    if cfg.task.mixture:
        stream = mixture_stream(model, cfg, task, owned, n_shards)
    else:
        stream = pipeline.TrainStream(model, task.shards, n_shards, tc.batch_size,
                                      cfg.task.max_input_length, cfg.task.max_target_length,
                                      tc.seed, **enc, scoring=scoring)
    return RunData(task, dev, metric, transfer, stream, n_shards)


def run_dev_set(model, method, cfg, split: str = "validation", task=None):
    """The dev set ``ptjax eval`` scores a run on: its dev task's ``split`` (read, or
    ``task`` already read), encoded with the run's lengths, template and verbalizer."""
    tcfg = dev_task_config(cfg)
    if task is None:
        task = load_task(tcfg, splits=(split,))
    check_lengths(model, method, cfg)
    return build_dev_set(model, task, tcfg.eval_mode, cfg.task.max_input_length,
                         cfg.task.max_target_length, split=split, **encoding(model, tcfg),
                         **verbalizing(tcfg))
