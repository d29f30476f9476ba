"""The frozen model a run's config names: a checkpoint directory, a hub id, or a built-in
tiny model (``TINY``, written once under ``model.tiny_dir`` by process 0), loaded straight
into its shards on the run's mesh."""
from __future__ import annotations

import dataclasses
import difflib
import os

from ptjax.errors import PtjaxError
from ptjax.models import checkpoint_files
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model
from ptjax.sharding import initialize_distributed, is_main_process, make_mesh, sync

TINY = {"tiny-t5": "t5", "tiny-gpt2": "gpt2", "tiny-bert": "bert",
        "tiny-roberta": "roberta"}


def model_dir(cfg) -> str:
    """Where the frozen model a ``ModelConfig`` names is: a built-in's directory (under
    model.tiny_dir), a local directory, or a hub id as given (fetched when loaded); a path
    that can be none of these, or a name close to a built-in's, is one line listing them."""
    path = cfg.path
    if path in TINY:
        return os.path.join(cfg.tiny_dir, path)
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return path
    close = difflib.get_close_matches(path, TINY, n=1, cutoff=0.8)
    if close or os.path.exists(local) or not checkpoint_files.is_hub_id(path):
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PtjaxError(f"model.path={path}: no such directory; {hint}give a "
                         "checkpoint directory, a Hugging Face hub id (e.g. "
                         f"google/t5-small-lm-adapt) or a built-in model: {', '.join(TINY)}")
    return path


def model_path(cfg) -> str:
    """The checkpoint a ``ModelConfig`` names (``model_dir``): a built-in tiny model is
    built there once, by process 0, the first time it is asked for."""
    path = model_dir(cfg)
    if cfg.path in TINY:
        if is_main_process():
            build_tiny_model(path, family=TINY[cfg.path])
        sync("ptjax-tiny-model")
    return path


def load_run_model(cfg, mesh=None, fsdp: bool = False):
    """The frozen model a ``ModelConfig`` names (``model_path``), its weights placed on
    ``mesh``."""
    path = model_path(cfg)
    if cfg.path not in TINY:
        try:  # a hub id not found names the built-in models too (a mistyped tiny-t5)
            path = checkpoint_files.resolve(path)
        except PtjaxError as e:
            raise PtjaxError(f"{e}; built-in models: {', '.join(TINY)}") from None
    model = load_model(path, dtype=cfg.dtype, mesh=mesh, fsdp=fsdp)
    return dataclasses.replace(model, remat=cfg.remat,  # the train step's policy
                               attention=cfg.attention)


def base_model_path(cfg) -> str:
    """What a PEFT adapter names as its base model: an absolute dir or the hub id."""
    if cfg.model.path in TINY:
        return os.path.abspath(os.path.join(cfg.model.tiny_dir, cfg.model.path))
    return os.path.abspath(cfg.model.path) if os.path.isdir(cfg.model.path) else cfg.model.path


def prepare(cfg):
    """Devices, mesh and frozen model for a run: joins the other processes of a multi-host
    job, builds the (data, model) mesh and loads the weights straight into their shards."""
    initialize_distributed(cfg.mesh.distributed)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    return mesh, load_run_model(cfg.model, mesh, cfg.mesh.fsdp)
