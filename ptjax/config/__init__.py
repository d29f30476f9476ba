"""Typed, frozen run configs: YAML files plus ``dotted.key=value`` overrides.

    cfg = load_config("experiments/demo.yaml", ["train.steps=200", "prompt.length=20"])
    cfg.prompt.length, cfg.optim.learning_rate, ...

  schema.py   one frozen dataclass per section (every method's included), valid choices
  checks.py   value checks: choices, ranges, settings that only go together
  load.py     YAML and overrides into the schema; to_dict, save_config
"""
from ptjax.config.checks import (CHOICES, DOMAINS, FREE, NON_NEGATIVE, POSITIVE, in_domain,
                                 mixture_weights, validate)
from ptjax.config.load import (RENAMED, all_keys, current_key, fields_of, from_dict, load_config,
                               parse_yaml, save_config, to_dict, unknown_key)
from ptjax.config.schema import (ATTENTIONS, DTYPES, ENCODERS, ENSEMBLES, EVAL_MODES, METHODS,
                                 OPTIMIZERS, PREFIX_INITS, PRNGS, PROMPT_INITS, REMATS, SCHEDULES,
                                 LabelWords, MeshConfig, MethodConfig, MixtureTask, ModelConfig,
                                 OptimConfig, PrefixConfig, PretrainConfig, PromptConfig,
                                 PTuningConfig, RunConfig, TaskConfig, TrainConfig, get)

__all__ = [
    "ATTENTIONS", "CHOICES", "DOMAINS", "DTYPES", "ENCODERS", "ENSEMBLES", "EVAL_MODES", "FREE",
    "LabelWords", "METHODS", "MeshConfig", "MethodConfig", "MixtureTask", "ModelConfig",
    "NON_NEGATIVE", "OPTIMIZERS", "OptimConfig", "POSITIVE", "PREFIX_INITS", "PRNGS",
    "PROMPT_INITS", "PTuningConfig", "PrefixConfig", "PretrainConfig", "PromptConfig", "REMATS",
    "RENAMED", "RunConfig", "SCHEDULES", "TaskConfig", "TrainConfig", "all_keys",
    "current_key", "fields_of", "from_dict", "get", "in_domain", "load_config",
    "mixture_weights", "parse_yaml", "save_config", "to_dict", "unknown_key", "validate",
]
