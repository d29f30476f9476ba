"""Typed, frozen run configs: YAML files plus ``dotted.key=value`` overrides.

    cfg = load_config("experiments/demo.yaml", ["train.steps=200", "prompt.length=20"])
    cfg.prompt.length, cfg.optim.learning_rate, ...

Every section is a frozen dataclass; the defaults are the paper's (Lester et al. 2021):
prompt length 100, Adafactor at a constant 0.3 with weight decay 1e-5 and decay rate 0.8,
no parameter scaling, batch 32, 30,000 steps, dropout 0.1. An unknown key is a one-line
error naming the closest valid key; a bad value names the key and what is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from typing import Any

import yaml

from ptjax.errors import PtjaxError
from ptjax.methods.prefix import INITS as PREFIX_INITS
from ptjax.methods.prefix import PrefixConfig
from ptjax.methods.ptuning import ENCODERS, PTuningConfig

PROMPT_INITS = ("random_uniform", "sampled_vocab", "class_label", "text", "file")
OPTIMIZERS = ("adafactor", "adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
METHODS = ("prompt", "prefix", "ptuning", "model", "design")  # = ptjax.methods.NAMES
EVAL_MODES = ("auto", "rank", "generate")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots", "dots_no_batch", "auto")
ATTENTIONS = ("auto", "xla", "cudnn", "einsum")  # = ptjax.models.attention.IMPLEMENTATIONS
PRNGS = ("threefry", "rbg", "unsafe_rbg")  # = ptjax.train.PRNGS
ENSEMBLES = ("majority", "mean_logprob")


# {class: [word, ...]} as ((class, (word, ...)), ...): frozen, ordered, hashable
LabelWords = tuple[tuple[str, tuple[str, ...]], ...]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = "tiny-t5"  # checkpoint dir, hub id, or a built-in: tiny-t5 | tiny-gpt2
    dtype: str = "float32"  # weights and activations; softmax, norms and loss stay fp32
    remat: str = "none"  # auto: the cheapest policy whose compiled step fits the device
    tiny_dir: str = "runs/models"  # where built-in tiny models are written
    # auto: cuDNN fused attention on GPUs, XLA's elsewhere (see ptjax.models.attention)
    attention: str = "auto"


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    length: int = 100
    init: str = "sampled_vocab"
    seeds: tuple[int, ...] = (0,)  # one prompt per seed: K = len(seeds)
    low: float = -0.5  # random_uniform range (the official code uses [0, 0.5))
    high: float = 0.5
    vocab_limit: int = 5000  # sampled_vocab draws from the first N ids
    fallback: str = "sampled_vocab"  # class_label's filler for positions past the labels
    text: str = ""  # text init
    file: str = ""  # file init: .npy [P, D] / [K, P, D] or safetensors
    inits: tuple[str, ...] = ()  # one init per seed (packed sweeps); empty = `init` for all


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adafactor"
    learning_rate: float = 0.3
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-5
    decay_rate: float = 0.8  # Adafactor's second-moment decay exponent
    clipping_threshold: float = 1.0  # Adafactor's update clipping (T5X's default)
    multiply_by_parameter_scale: bool = False
    b1: float = 0.9  # Adam / AdamW
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 0.0  # global-norm gradient clipping per prompt; 0 = off


@dataclasses.dataclass(frozen=True)
class MixtureTask:
    """One task of ``task.mixture`` (multi-task prompted training, strategy 3): what makes
    it a task of its own; everything else (lengths, dev_size, data_dir) is the ``task``
    section's."""
    name: str = ""  # a built-in, jsonl or TFDS task
    template: str = ""  # its own template ("" = its own format, {inputs})
    verbalizer: LabelWords = ()  # its own label words; training targets are first words
    verbalizer_tokens: str = "mean"
    labels: tuple[str, ...] = ()
    eval_mode: str = "auto"
    train_file: str = ""  # jsonl
    dev_file: str = ""
    rate: float = 0.0  # its mixing weight; 0 = from task.mixture_rates


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str = "synthetic_sentiment"  # built-in, "jsonl", or a TFDS task (e.g. rte, boolq)
    data_dir: str = ""  # TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets)
    prefix: bool = False  # keep T5's task-name prefix ("rte sentence1: ..."); the paper drops it
    train_file: str = ""  # jsonl: {"inputs": ..., "targets": ...} per line
    dev_file: str = ""
    labels: tuple[str, ...] = ()  # verbalized classes; empty = the task's own (if any)
    max_input_length: int = 64  # input tokens; longer inputs are truncated
    max_target_length: int = 8
    eval_mode: str = "auto"  # rank classification when there are labels, else greedy EM
    dev_size: int = 0  # evaluate on the first N dev examples; 0 = all
    transfer: tuple[str, ...] = ()  # tasks the best prompts are evaluated on zero-shot
    # T5: every target starts with <extra_id_0> (token space), like span-corruption
    # targets; the paper's "span corruption + sentinel" (Figure 3c)
    target_sentinel: bool = False
    # lay the input out: fields, hard text, {soft:N} slots, {mask} (ptjax.data.templates);
    # "" = the task's own format ({inputs}) with the prompt prepended
    template: str = ""
    # one template per member (prompt.seeds), trained and scored side by side in one
    # batch and ensembled like K prompts (train.ensemble); excludes task.template
    templates: tuple[str, ...] = ()
    # label words per class, {class: [word, ...]}: classes ranked by their words'
    # log-probabilities; training targets are each class's first word (task.verbalizer_loss)
    verbalizer: LabelWords = ()
    verbalizer_tokens: str = "mean"  # a multi-token word's score: first | mean | max
    # the training loss with a verbalizer: first_word (cross-entropy of each class's first
    # label word as the target) | class (cross-entropy over classes of the class scores
    # evaluation ranks by, OpenPrompt's ManualVerbalizer + CE; ptjax.verbalizers)
    verbalizer_loss: str = "first_word"
    # manual (label words scored by the LM head) | soft (WARP: learned class vectors, from
    # the label words' output embeddings, trained with the method; loss over classes)
    verbalizer_kind: str = "manual"
    # prompt design (method.name=design): in-context examples drawn from the train split
    # (per dev example, seeded by prompt.seeds[0]) before every evaluated input
    shots: int = 0
    # multi-task prompted training (strategy 3): the tasks trained together, each with its
    # own template / verbalizer / labels (MixtureTask); entries named in task.transfer are
    # held out (never trained) and evaluated zero-shot through their own template. The
    # first trained entry's dev set picks the best step. task.name is then unused.
    mixture: tuple[MixtureTask, ...] = ()
    # each row's task is drawn with these weights: proportional (to train examples) |
    # equal | one number per task.mixture entry (0 for held-out entries), e.g. "2,1,0"
    mixture_rates: str = "proportional"


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """What trains: ``name`` picks the method (ptjax.methods); each method with settings
    of its own has a subsection here, read only when it is the one named."""
    name: str = "prompt"  # prompt | prefix | ptuning | model | design
    prefix: PrefixConfig = PrefixConfig()
    ptuning: PTuningConfig = PTuningConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 30000
    batch_size: int = 32
    dropout: float = 0.1
    seed: int = 0  # data order and dropout
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_batch_size: int = 64
    metric: str = ""  # the metric that picks the best step; "" = the task's default
    ensemble: str = ""  # "", majority or mean_logprob: also score the K prompts' ensemble
    data_shards: int = 0  # train data shards (one per process by default); see pipeline
    progress: bool = True  # a progress bar; false = one log line every log_every steps
    wandb: str = ""  # a Weights & Biases project to log to ("" = off; WANDB_MODE=offline works)
    # Dropout on attention probabilities, apart from train.dropout (hidden). 0 (T5X's
    # prompt-tuning default, per DESIGN.md) lets the fused attention run; > 0 forces the
    # einsum path. Before this key existed attention dropout was the checkpoint's rate.
    attention_dropout: float = 0.0
    dropout_broadcast: bool = False  # T5X's masks: shared over length (hidden), queries
    prng: str = "threefry"  # dropout masks: threefry | rbg | unsafe_rbg (cheaper on GPUs)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel devices; -1 = all remaining
    model: int = 1  # tensor-parallel devices for the frozen weights
    fsdp: bool = False  # also split the weights' embed axis over data (the largest models)
    distributed: str = "auto"  # jax.distributed.initialize(): auto (cluster found) | on | off


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """``ptjax pretrain``: every weight of a T5 trained on a corpus with one of T5's
    objectives (ptjax.objectives), from scratch or from a checkpoint; train.*, optim.*,
    mesh.* and model.dtype apply as in ``ptjax train``."""
    objective: str = "span_corruption"  # span_corruption | prefix_lm (LM adaptation)
    corpus: str = "shakespeare"  # ptjax.data.corpus
    documents: int = 0  # read only the first N train documents (smoke runs); 0 = all
    init: str = "scratch"  # scratch (a T5 v1.1 of the size below) or a checkpoint dir
    noise_density: float = 0.15  # span corruption: fraction of tokens dropped
    mean_span_length: float = 3.0  # span corruption: mean noise span length
    input_length: int = 128  # encoder tokens, EOS included (targets: what the objective needs)
    eval_examples: int = 256  # held-out sequences scored for the validation loss
    # scratch: the tokenizer trained on the corpus (unigram, T5's special ids, extra_ids
    # sentinels last, cached in tokenizer_dir) and a T5 v1.1 (gated-GELU, untied head)
    vocab_size: int = 8000
    extra_ids: int = 100
    tokenizer_dir: str = "runs/lab/tokenizers"
    d_model: int = 64
    d_kv: int = 16
    d_ff: int = 128
    num_layers: int = 2  # encoder and decoder each
    num_heads: int = 4


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    prompt: PromptConfig = PromptConfig()
    optim: OptimConfig = OptimConfig()
    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    pretrain: PretrainConfig = PretrainConfig()


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. (YAML 1.1 also reads yes/no/on/off as
    booleans, which would turn labels such as [no, yes] into [False, True].)"""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


CHOICES = {
    "model.dtype": DTYPES, "model.remat": REMATS, "model.attention": ATTENTIONS,
    "train.prng": PRNGS, "prompt.init": PROMPT_INITS,
    "prompt.fallback": ("sampled_vocab", "random_uniform"), "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES, "task.eval_mode": EVAL_MODES, "method.name": METHODS,
    "method.prefix.init": PREFIX_INITS, "method.ptuning.encoder": ENCODERS,
    "task.verbalizer_tokens": ("first", "mean", "max"),
    "task.verbalizer_loss": ("first_word", "class"), "task.verbalizer_kind": ("manual", "soft"),
    "train.ensemble": ("", *ENSEMBLES), "mesh.distributed": ("auto", "on", "off"),
    "pretrain.objective": ("span_corruption", "prefix_lm"), "pretrain.corpus": ("shakespeare",),
}
POSITIVE = ("prompt.length", "train.steps", "train.batch_size", "train.log_every",
            "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
            "train.eval_batch_size", "task.max_input_length", "task.max_target_length",
            "prompt.vocab_limit", "method.prefix.hidden", "pretrain.input_length",
            "pretrain.eval_examples", "pretrain.vocab_size", "pretrain.d_model", "pretrain.d_kv",
            "pretrain.d_ff", "pretrain.num_layers", "pretrain.num_heads")
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
# pair; mesh sizes, checked against the devices by ptjax.sharding).
FREE = ("train.seed", "prompt.seeds", "prompt.low", "prompt.high", "mesh.data", "mesh.model")


def _in_domain(value, low: str, high: str) -> bool:
    lo, hi = float(low[1:]), float(high[:-1])
    above = value >= lo if low[0] == "[" else value > lo
    below = value <= hi if high[-1] == "]" else value < hi
    return math.isfinite(value) and above and below


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, e.g. 'optim.learning_rate'."""
    keys = []
    for name, typ in _fields(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown(key: str, where: str) -> PtjaxError:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # compare the last part alone: "lr" is far from "optim.learning_rate"
        tails = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [tails[t] for t in difflib.get_close_matches(key.rsplit(".", 1)[-1], tails,
                                                              n=1, cutoff=0.5)]
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(keys)}"
    return PtjaxError(f"{where}: unknown config key {key!r}{hint}")


def _coerce(key: str, typ, value, where: str):
    """``value`` (from YAML or an override) as the field's type, or a one-line error."""
    def bad(expected):
        return PtjaxError(f"{where}: {key}={value!r} is not {expected}")

    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("a boolean (true / false)")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("an integer")
        try:
            return int(value)
        except ValueError:
            raise bad("an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:  # PyYAML reads "1e-5" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if typ is str:
        if value is None:
            return ""
        if key == "task.mixture_rates" and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)  # [2, 1, 0] in YAML
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    if typ == LabelWords:
        if value is None or value == "" or value == ():
            return ()
        items = value.items() if isinstance(value, dict) else value
        try:
            pairs = [(str(c), words) for c, words in items]
        except (TypeError, ValueError):
            raise bad("a mapping of classes to label words, e.g. {negative: [bad], "
                      "positive: [good, great]}") from None
        out = []
        for c, words in pairs:
            words = [words] if isinstance(words, str) else words
            if not isinstance(words, (list, tuple)) or not words or \
                    not all(isinstance(w, str) and w.strip() for w in words):
                raise bad(f"a mapping of classes to label words; class {c!r} needs a "
                          "non-empty list of words")
            out.append((c, tuple(words)))
        return tuple(out)
    if dataclasses.is_dataclass(typ):  # an entry of a list of sections (task.mixture)
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise bad(f"a list of mappings ({', '.join(_fields(typ))})")
        return _build(typ, value, f"{key}.", where)
    if typing.get_origin(typ) is tuple:
        (inner, _) = typing.get_args(typ)
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(key, inner, v, where) for v in value)
    raise AssertionError(f"unhandled config type {typ}")


def _build(cls, data: dict, prefix: str, where: str):
    fields = _fields(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            while isinstance(value, dict) and value:  # name the whole key: a.b.c, not a.b
                name, value = next(iter(value.items()))
                key = f"{key}.{name}"
            raise _unknown(key, where)
        typ = fields[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise PtjaxError(f"{where}: {key!r} is a section; give it as a mapping of "
                                 f"keys ({', '.join(_fields(typ))})")
            kwargs[name] = _build(typ, value, f"{key}.", where)
        else:
            kwargs[name] = _coerce(key, typ, value, where)
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value, where: str):
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown(key, where)
        node = child
    node[parts[-1]] = value


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
        if not _in_domain(get(cfg, key), low, high):
            raise PtjaxError(f"{where}: {key}={get(cfg, key)} is out of range; valid: "
                             f"{low}, {high} ({meaning})")
    if not cfg.prompt.low < cfg.prompt.high:
        raise PtjaxError(f"{where}: prompt.low={cfg.prompt.low} must be below "
                         f"prompt.high={cfg.prompt.high} (the random_uniform range)")
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
    from ptjax.data.templates import parse

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
    from ptjax.data.tasks import task_names
    from ptjax.data.templates import parse

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


def get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def from_dict(data: dict, overrides=(), where: str = "config") -> RunConfig:
    """A validated ``RunConfig`` from a nested dict and ``dotted.key=value`` strings."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise PtjaxError(f"override {item!r} must look like dotted.key=value "
                             "(e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = current_key(key.strip())
        typ = _field_type(key)
        if typ is None:  # named as the override's, not the config file's, mistake
            raise _unknown(key, f"override {item!r}")
        if typ is str:  # a string is taken as given: "{inputs} {soft:3}"
            value = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"" \
                else raw
        else:
            try:
                value = _yaml(raw) if raw.strip() else ""
            except yaml.YAMLError as e:
                raise PtjaxError(f"override {item!r}: the value is not valid YAML "
                                 f"({str(e).splitlines()[0]})") from None
            if not dataclasses.is_dataclass(typ):  # a wrong type, too, is the override's
                _coerce(key, typ, value, f"override {item!r}")
            elif not isinstance(value, dict):
                raise PtjaxError(f"override {item!r}: {key!r} is a section; give one of its "
                                 f"keys ({key}.KEY=value) or a mapping")
        _set_dotted(data, key, value, "override")
    _moved_method(data, where)
    return validate(_build(RunConfig, data, "", where), where)


# Keys that were renamed: read under their new name (config files, overrides, sweep axes).
RENAMED = {"train.method": "method.name"}


def current_key(key: str) -> str:
    return RENAMED.get(key, key)


def _field_type(key: str):
    """The type of a dotted config key, or None for an unknown key."""
    cls = RunConfig
    for part in key.split("."):
        fields = _fields(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return None
        cls = fields[part]
    return cls


def _moved_method(data: dict, where: str):
    """``train.method`` (before the methods seam) is read as ``method.name``."""
    train = data.get("train")
    if not isinstance(train, dict) or "method" not in train:
        return
    old = train.pop("method")
    method = data.setdefault("method", {})
    if not isinstance(method, dict):
        return
    if "name" in method and method["name"] != old:
        raise PtjaxError(f"{where}: train.method={old!r} and method.name={method['name']!r} "
                         "disagree; train.method is the old name of method.name, give only "
                         "method.name")
    method["name"] = old


def _deepcopy(d):
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | None, overrides=()) -> RunConfig:
    """Read a YAML config (``None`` = all defaults) and apply overrides."""
    data = {}
    if path is not None:
        if not os.path.exists(path):
            raise PtjaxError(f"{path}: config file not found")
        if os.path.isdir(path):
            raise PtjaxError(f"{path}: is a directory, not a config file (a run directory "
                             "holds config.yaml)")
        try:
            with open(path, encoding="utf-8") as f:
                data = _yaml(f)
        except yaml.YAMLError as e:
            raise PtjaxError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise PtjaxError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise PtjaxError(f"{path}: cannot be read ({e.strerror})") from None
        if data is None:  # a run on all defaults is 30,000 steps: never by accident
            raise PtjaxError(f"{path}: the config file is empty; give at least one section "
                             "(e.g. train: {steps: 100}), or no file for the defaults")
        if not isinstance(data, dict):
            raise PtjaxError(f"{path}: must hold a mapping of config sections")
    return from_dict(data, overrides, where=path or "config")


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), ready for YAML / JSON."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str):
    """Atomic: a run killed while writing leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
