"""Training methods behind one seam (``ptjax.methods.base.Method``), chosen by
``method.name``:

  prompt   prompt tuning: a soft prompt [P, D] prepended to the input (Lester et al.)
  prefix   prefix tuning: keys/values at every layer, MLP reparameterisation (Li & Liang)
  ptuning  P-tuning: prompt vectors through an MLP / biLSTM encoder (Liu et al.)
  model    model tuning: every weight trained (the paper's Figure 1 baseline)
  design   prompt design: no training, a manual template and k in-context examples

    method = ptjax.methods.build(cfg, model.config, model.dtype)
    params, prompt_inputs = method.inputs(member, model.params)
"""
from __future__ import annotations

import jax.numpy as jnp

from ptjax.config import load_config
from ptjax.errors import PtjaxError
from ptjax.methods.base import Method
from ptjax.methods.design import DesignMethod
from ptjax.methods.model import ModelMethod
from ptjax.methods.prefix import PrefixConfig, PrefixMethod
from ptjax.methods.prompt import PromptMethod
from ptjax.methods.ptuning import PTuningConfig, PTuningMethod
from ptjax.methods.verbalizer import SoftVerbalized

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (PromptMethod, PrefixMethod, PTuningMethod, ModelMethod, DesignMethod)}
NAMES = tuple(REGISTRY)


def build(cfg, model_config, dtype=None) -> Method:
    """The method a ``RunConfig`` names, bound to a model architecture."""
    name = cfg.method.name
    if name not in REGISTRY:
        raise PtjaxError(f"method.name={name!r} is not valid; valid: {', '.join(NAMES)}")
    settings = getattr(cfg.method, name, None)
    templates = cfg.task.templates or (cfg.task.template,) * len(cfg.prompt.seeds) * bool(
        cfg.task.template)
    method = REGISTRY[name](model_config, cfg.prompt, settings,
                            jnp.float32 if dtype is None else dtype, tuple(templates))
    if cfg.task.verbalizer_kind == "soft" and method.trains:  # class vectors train with it
        return SoftVerbalized(method, tuple(cfg.task.verbalizer))
    return method


def for_model(model, name: str = "prompt", overrides=()) -> Method:
    """A method with default settings (plus ``key=value`` overrides) for a loaded model:
    ``for_model(model, "prefix", ["prompt.length=10", "method.prefix.hidden=64"])``."""
    return build(load_config(None, [f"method.name={name}", *overrides]), model.config,
                 model.dtype)


__all__ = ["Method", "NAMES", "PTuningConfig", "PrefixConfig", "REGISTRY", "build", "for_model"]
