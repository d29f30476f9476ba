"""``ptjax config show``'s checks: the errors ``ptjax train`` gives before its first step,
found with no weights, no devices and nothing written.

They are the run's own checks (``ptjax.taskdata``, ``ptjax.methods``) on the model's
architecture and tokenizer alone: the model path (``model_dir``: a directory, a hub id
or a built-in name), the method against the model and the prompt's length, the templates
against the tokenizer (``encoding``: ``{mask}`` needs T5's sentinels, GPT-2's ``{mask}``
comes last), and the dev sets of the task and its transfer tasks (a template's fields,
label words that fit, targets among the labels). Left to the run: a hub checkpoint's
files (fetched when it is loaded), TFDS data (read when the run starts) and what depends
on the devices.
"""
from __future__ import annotations

import os

from ptjax import methods
from ptjax.data.tasks import TFDS_TASKS, load_task
from ptjax.evaluation import build_dev_set
from ptjax.methods.base import check_lengths
from ptjax.models.hf_config import architecture
from ptjax.models.model import Model, load_tokenizer
from ptjax.models.named import TINY, model_dir
from ptjax.models.tiny import reusable, tiny_parts
from ptjax.rundir import check_output_dir
from ptjax.taskdata import (check_transfer_names, dev_task_config, encoding, transfer_dev_set,
                            verbalizing)


def weightless_model(mcfg) -> Model | None:
    """The frozen model a ``ModelConfig`` names, architecture and tokenizer without weights
    (a built-in not built yet: what ``build_tiny_model`` would save); None for a hub id,
    which is not fetched here."""
    path = model_dir(mcfg)
    if mcfg.path in TINY:
        family = TINY[mcfg.path]
        if not reusable(path, family):
            check_output_dir(path, "model.tiny_dir")
            config, tokenizer = tiny_parts(family)
            return Model(config=config, params=None, tokenizer=tokenizer, path=path)
    elif not os.path.isdir(os.path.expanduser(path)):
        return None
    return Model(config=architecture(path), params=None, tokenizer=load_tokenizer(path),
                 path=path)


def check_config(cfg):
    """One-line errors (``PtjaxError``) for a config ``ptjax train`` would refuse."""
    model = weightless_model(cfg.model)
    if model is None:
        return
    method = methods.build(cfg, model.config, model.dtype)
    method.check(model)
    check_lengths(model, method, cfg)
    check_transfer_names(cfg)
    tcfg = dev_task_config(cfg)
    enc = encoding(model, tcfg)
    if tcfg.name not in TFDS_TASKS:
        task = load_task(tcfg, splits=("validation",))
        build_dev_set(model, task, tcfg.eval_mode, cfg.task.max_input_length,
                      cfg.task.max_target_length, **enc, **verbalizing(tcfg))
    for name in cfg.task.transfer:
        if name not in TFDS_TASKS:
            transfer_dev_set(model, cfg, name)
