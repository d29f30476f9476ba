"""Value checks of a run's config: choices, ranges and the settings that only go together,
each a one-line error that names the key, its value and what is valid."""
from __future__ import annotations

import dataclasses
import math

from ptjax.config.schema import (ATTENTIONS, DTYPES, ENCODERS, ENSEMBLE_WEIGHTINGS, ENSEMBLES,
                                 EVAL_MODES, METHODS, OPTIMIZERS, PREFIX_INITS, PRNGS,
                                 PROMPT_INITS, REMATS, SCHEDULES, RunConfig, get)
from ptjax.data.tasks import task_names
from ptjax.data.templates import parse
from ptjax.errors import PtjaxError

CHOICES = {
    "model.dtype": DTYPES, "model.remat": REMATS, "model.attention": ATTENTIONS,
    "train.prng": PRNGS, "prompt.init": PROMPT_INITS,
    "prompt.fallback": ("sampled_vocab", "random_uniform"), "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES, "task.eval_mode": EVAL_MODES, "method.name": METHODS,
    "task.source": ("tfds", "hf"),
    "method.prefix.init": PREFIX_INITS, "method.ptuning.encoder": ENCODERS,
    "task.verbalizer_tokens": ("first", "mean", "max"),
    "task.verbalizer_loss": ("first_word", "class"), "task.verbalizer_kind": ("manual", "soft"),
    "train.ensemble": ("", *ENSEMBLES), "train.ensemble_weighting": ENSEMBLE_WEIGHTINGS,
    "mesh.distributed": ("auto", "on", "off"),
    "pretrain.objective": ("span_corruption", "prefix_lm"), "pretrain.corpus": ("shakespeare",),
}
POSITIVE = ("prompt.length", "train.steps", "train.batch_size", "train.log_every",
            "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
            "train.eval_batch_size", "task.max_input_length", "task.max_target_length",
            "prompt.vocab_limit", "method.prefix.hidden", "pretrain.input_length",
            "pretrain.eval_examples", "pretrain.vocab_size", "pretrain.d_model", "pretrain.d_kv",
            "pretrain.d_ff", "pretrain.num_layers", "pretrain.num_heads", "train.microbatches")
NON_NEGATIVE = ("method.prefix.embed_dim", "method.ptuning.hidden", "task.shots",
                "pretrain.documents", "pretrain.extra_ids")
# The domain of every other numeric setting: (low, high, what it means), the bounds
# written as "[a" / "(a" (closed / open) so the one error line says exactly what is valid.
# Every int / float key is in POSITIVE, NON_NEGATIVE, DOMAINS or FREE (tested), so a new
# numeric setting cannot go unchecked.
DOMAINS = {
    "optim.learning_rate": ("(0", "inf)", "a positive learning rate"),
    "optim.warmup_steps": ("[0", "inf)", "0 = no warm-up"),
    "optim.weight_decay": ("[0", "inf)", "0 = off"),
    "optim.decay_rate": ("(0", "1]", "Adafactor's decay exponent"),
    "optim.clipping_threshold": ("[0", "inf)", "0 = off"),
    "optim.b1": ("[0", "1)", "Adam's first-moment decay"),
    "optim.b2": ("[0", "1)", "Adam's second-moment decay"),
    "optim.eps": ("(0", "inf)", "Adam's epsilon"),
    "optim.max_grad_norm": ("[0", "inf)", "0 = off"),
    "train.dropout": ("[0", "1)", "a dropout rate"),
    "train.attention_dropout": ("[0", "1)", "a dropout rate"),
    "pretrain.noise_density": ("(0", "1)", "span corruption's fraction of noise tokens"),
    "pretrain.mean_span_length": ("[1", "inf)", "span corruption's mean noise span"),
    "train.data_shards": ("[0", "inf)", "0 = one per process"),
    "task.dev_size": ("[0", "inf)", "0 = all dev examples"),
    "method.ptuning.model_learning_rate": ("[0", "inf)", "0 = the weights stay as they are"),
}
# Numeric settings any value of which is valid (seeds; the uniform range, checked as a
# pair; mesh sizes, checked against the devices by ptjax.sharding), or checked apart
# (train.profile_steps: a pair of steps within train.steps; train.ensemble_weights: one
# per member of prompt.seeds).
FREE = ("train.seed", "prompt.seeds", "prompt.low", "prompt.high", "mesh.data", "mesh.model",
        "train.profile_steps", "train.ensemble_weights")


def in_domain(value, low: str, high: str) -> bool:
    lo, hi = float(low[1:]), float(high[:-1])
    above = value >= lo if low[0] == "[" else value > lo
    below = value <= hi if high[-1] == "]" else value < hi
    return math.isfinite(value) and above and below


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    """One-line errors for values outside their choices or ranges."""
    for key, valid in CHOICES.items():
        value = get(cfg, key)
        if value not in valid:
            raise PtjaxError(f"{where}: {key}={value!r} is not valid; valid: {', '.join(valid)}")
    for key in POSITIVE:
        if get(cfg, key) < 1:
            raise PtjaxError(f"{where}: {key}={get(cfg, key)} must be >= 1")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise PtjaxError(f"{where}: {key}={get(cfg, key)} must be >= 0")
    for key, (low, high, meaning) in DOMAINS.items():
        if not in_domain(get(cfg, key), low, high):
            raise PtjaxError(f"{where}: {key}={get(cfg, key)} is out of range; valid: "
                             f"{low}, {high} ({meaning})")
    if not cfg.prompt.low < cfg.prompt.high:
        raise PtjaxError(f"{where}: prompt.low={cfg.prompt.low} must be below "
                         f"prompt.high={cfg.prompt.high} (the random_uniform range)")
    if cfg.train.batch_size % cfg.train.microbatches:
        raise PtjaxError(f"{where}: train.microbatches={cfg.train.microbatches} does not "
                         f"divide train.batch_size={cfg.train.batch_size}; give a divisor of it")
    steps = cfg.train.profile_steps
    if steps and not (len(steps) == 2 and 0 < steps[0] <= steps[1] <= cfg.train.steps):
        raise PtjaxError(f"{where}: train.profile_steps={list(steps)} is not valid; give "
                         f"[first, last] with 0 < first <= last <= train.steps "
                         f"({cfg.train.steps}), e.g. [100, 105], or [] for no trace")
    if not cfg.prompt.seeds:
        raise PtjaxError(f"{where}: prompt.seeds is empty; give one seed per prompt, e.g. [0]")
    single = {"model": "trains one model",
              "ptuning": "with method.ptuning.tune_model=true trains one model",
              "design": "draws one set of in-context examples (a sweep's seeds: one run each)"}
    if (cfg.method.name in ("model", "design") or (cfg.method.name == "ptuning" and
                                                   cfg.method.ptuning.tune_model)) \
            and len(cfg.prompt.seeds) > 1:
        raise PtjaxError(f"{where}: method.name={cfg.method.name} {single[cfg.method.name]}; "
                         "prompt.seeds must hold one seed")
    for site in cfg.method.prefix.sites:
        if site not in ("encoder", "decoder", "cross"):
            raise PtjaxError(f"{where}: method.prefix.sites has {site!r}; valid: encoder, "
                             "decoder, cross (T5), decoder (GPT-2)")
    if cfg.task.name == "jsonl" and not (cfg.task.train_file and cfg.task.dev_file):
        raise PtjaxError(f"{where}: task.name=jsonl needs task.train_file and task.dev_file")
    if cfg.prompt.inits:
        if len(cfg.prompt.inits) != len(cfg.prompt.seeds):
            raise PtjaxError(f"{where}: prompt.inits has {len(cfg.prompt.inits)} entries but "
                             f"prompt.seeds has {len(cfg.prompt.seeds)}; give one init per seed")
        for init in cfg.prompt.inits:
            if init not in PROMPT_INITS:
                raise PtjaxError(f"{where}: prompt.inits has {init!r}; valid: "
                                 f"{', '.join(PROMPT_INITS)}")
    if cfg.train.ensemble and len(cfg.prompt.seeds) < 2:
        raise PtjaxError(f"{where}: train.ensemble={cfg.train.ensemble} needs several prompts "
                         "(prompt.seeds with two or more seeds)")
    weights, K = cfg.train.ensemble_weights, len(cfg.prompt.seeds)
    if (cfg.train.ensemble_weighting == "fixed") != bool(weights):
        raise PtjaxError(f"{where}: train.ensemble_weights goes with (and only with) "
                         "train.ensemble_weighting=fixed")
    if weights and (len(weights) != K or min(weights) < 0 or not sum(weights) > 0):
        raise PtjaxError(f"{where}: train.ensemble_weights={list(weights)}: give {K} weights "
                         "(one per member of prompt.seeds), none negative, not all 0")
    if "file" in (cfg.prompt.init, *cfg.prompt.inits) and not cfg.prompt.file:
        raise PtjaxError(f"{where}: prompt.init=file needs prompt.file (a .npy or "
                         ".safetensors prompt)")
    if cfg.task.templates:
        if cfg.task.template:
            raise PtjaxError(f"{where}: give task.template (one for all members) or "
                             "task.templates (one per member), not both")
        if cfg.method.name == "design" or len(cfg.task.templates) != len(cfg.prompt.seeds):
            raise PtjaxError(f"{where}: task.templates has {len(cfg.task.templates)} "
                             f"templates for {len(cfg.prompt.seeds)} members (prompt.seeds); "
                             "give one template per seed of a trained method")
    sources = cfg.task.templates or ((cfg.task.template,) if cfg.task.template else ())
    counts = [parse(source, f"{where}: task.template" + (f"s[{i}]" if cfg.task.templates
                                                          else "")).soft_tokens
              for i, source in enumerate(sources)]
    soft = max(counts or [0])
    if soft and min(counts) == 0:
        raise PtjaxError(f"{where}: task.templates mixes templates with and without soft "
                         "slots; give every template {soft:N} slots, or none (then the prompt "
                         "is prepended to each)")
    if soft:
        if cfg.method.name not in ("prompt", "ptuning"):
            raise PtjaxError(f"{where}: task.template has soft slots, which "
                             f"method.name={cfg.method.name} does not train; use prompt or "
                             "ptuning, or a template without {soft:N}")
        # the templates' soft tokens are the prompt: P = their count (the most of any)
        cfg = dataclasses.replace(cfg, prompt=dataclasses.replace(cfg.prompt, length=soft))
    if not cfg.task.verbalizer:
        for key, default in (("verbalizer_loss", "first_word"), ("verbalizer_kind", "manual")):
            if getattr(cfg.task, key) != default:
                raise PtjaxError(f"{where}: task.{key}={getattr(cfg.task, key)} needs "
                                 "task.verbalizer (label words per class)")
    if cfg.task.verbalizer_kind == "soft" and cfg.method.name == "design":
        raise PtjaxError(f"{where}: task.verbalizer_kind=soft learns class vectors, which "
                         "method.name=design does not train; use a manual verbalizer")
    if cfg.task.mixture:
        _check_mixture(cfg, where)
    elif cfg.task.mixture_rates != "proportional":
        raise PtjaxError(f"{where}: task.mixture_rates={cfg.task.mixture_rates!r} needs "
                         "task.mixture (the tasks it weights)")
    if cfg.task.shots and cfg.method.name != "design":
        raise PtjaxError(f"{where}: task.shots={cfg.task.shots} (in-context examples) is for "
                         "method.name=design, prompt design without training")
    if cfg.method.name == "prefix" and cfg.method.prefix.init == "text" and not cfg.prompt.text:
        raise PtjaxError(f"{where}: method.prefix.init=text needs prompt.text (the words whose "
                         "keys and values initialise the prefix)")
    if "text" in (cfg.prompt.init, *cfg.prompt.inits) and not cfg.prompt.text:
        raise PtjaxError(f"{where}: prompt.init=text needs prompt.text")
    return cfg


def mixture_weights(cfg, where: str = "config", sizes=None) -> list[float]:
    """One weight per task.mixture entry (0 for held-out ones), unnormalised: an entry's own
    ``rate``, else task.mixture_rates (proportional: ``sizes``, the train examples; None =
    only checked)."""
    tcfg = cfg.task
    held = set(tcfg.transfer)
    trained = [e for e in tcfg.mixture if e.name not in held]
    own = [e.rate > 0 for e in trained]
    if any(own):
        if not all(own) or tcfg.mixture_rates != "proportional":
            raise PtjaxError(f"{where}: task.mixture gives some entries a rate; give every "
                             "trained entry one (and leave task.mixture_rates), or none")
        return [0.0 if e.name in held else e.rate for e in tcfg.mixture]
    rates = tcfg.mixture_rates.strip()
    if rates == "equal":
        return [0.0 if e.name in held else 1.0 for e in tcfg.mixture]
    if rates == "proportional":
        sizes = sizes or [1] * len(tcfg.mixture)
        return [0.0 if e.name in held else float(n) for e, n in zip(tcfg.mixture, sizes)]
    try:
        numbers = [float(x) for x in rates.strip("[]").split(",")]
    except ValueError:
        numbers = None
    if numbers is None or len(numbers) != len(tcfg.mixture) or \
            not all(math.isfinite(x) and x >= 0 for x in numbers):
        raise PtjaxError(f"{where}: task.mixture_rates={tcfg.mixture_rates!r} is not valid; "
                         f"valid: proportional, equal, or {len(tcfg.mixture)} numbers >= 0 "
                         "(one per task.mixture entry)")
    for e, x in zip(tcfg.mixture, numbers):
        if e.name in held and x:
            raise PtjaxError(f"{where}: task.mixture_rates gives {e.name!r} {x:g}, but "
                             "task.transfer holds it out; give it 0")
    if not any(x for e, x in zip(tcfg.mixture, numbers) if e.name not in held):
        raise PtjaxError(f"{where}: task.mixture_rates={tcfg.mixture_rates!r} gives every "
                         "trained task 0")
    return numbers


def _check_mixture(cfg, where: str):
    tcfg = cfg.task
    names = [e.name for e in tcfg.mixture]
    for i, e in enumerate(tcfg.mixture):
        at = f"{where}: task.mixture[{i}]"
        if e.name not in task_names():
            raise PtjaxError(f"{at}.name={e.name!r} is not a task; valid: "
                             f"{', '.join(task_names())}")
        if names.count(e.name) > 1:
            raise PtjaxError(f"{at}: task {e.name!r} is in task.mixture twice")
        if e.verbalizer_tokens not in ("first", "mean", "max"):
            raise PtjaxError(f"{at}.verbalizer_tokens={e.verbalizer_tokens!r} is not valid; "
                             "valid: first, mean, max")
        if e.eval_mode not in EVAL_MODES:
            raise PtjaxError(f"{at}.eval_mode={e.eval_mode!r} is not valid; valid: "
                             f"{', '.join(EVAL_MODES)}")
        if not (math.isfinite(e.rate) and e.rate >= 0):
            raise PtjaxError(f"{at}.rate={e.rate} must be >= 0 (0 = from task.mixture_rates)")
        if e.name == "jsonl" and not (e.train_file and e.dev_file):
            raise PtjaxError(f"{at}: name=jsonl needs train_file and dev_file")
        if e.template and parse(e.template, f"{at}.template").soft_tokens:
            raise PtjaxError(f"{at}.template has soft slots; a mixture's templates are text "
                             "and fields (a prompt method prepends its prompt to every task)")
    for key in ("template", "templates", "verbalizer"):
        if getattr(tcfg, key):
            raise PtjaxError(f"{where}: task.{key} is set with task.mixture; give each task "
                             "its own in its task.mixture entry")
    if tcfg.verbalizer_loss != "first_word" or tcfg.verbalizer_kind != "manual":
        raise PtjaxError(f"{where}: task.mixture trains each task's first label words "
                         "(text to text); task.verbalizer_loss=class and "
                         "task.verbalizer_kind=soft are for one task")
    if not [n for n in names if n not in tcfg.transfer]:
        raise PtjaxError(f"{where}: task.transfer holds out every task.mixture entry; "
                         "leave at least one to train on")
    mixture_weights(cfg, where)
