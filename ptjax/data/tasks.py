"""Task sources: lists of ``{"inputs": str, "targets": str}`` per split.

Built in (no network): ``synthetic_sentiment`` (classification, labels negative /
positive), ``synthetic_sentiment_shifted`` (the same labels in another domain and form,
for zero-shot transfer) and ``synthetic_qa`` (a colour question answered by a word of the
input, scored by greedy exact match or by ranking the colours). ``jsonl`` reads one JSON
object per line with "inputs" and "targets". From the lab's corpus (``ptjax.data.corpus``,
``pip install 'ptjax[lab]'``): ``shakespeare_genre`` (comedy / history / tragedy of a
speech) and ``shakespeare_order`` (are a line's words in Shakespeare's order: true /
false). The paper's tasks (``TFDS_TASKS``: SuperGLUE, GLUE, SQuAD, MRQA) are read with
tensorflow-datasets, or with Hugging Face ``datasets`` and no TensorFlow
(``task.source=hf``, ``ptjax.data.hf``), and formatted as T5 does (``ptjax.data.formats``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np

from ptjax.data import corpus as corpus_lib
from ptjax.data import hf
from ptjax.data.formats import format_example
from ptjax.data.pipeline import shard_bounds
from ptjax.errors import PtjaxError

POSITIVE = "good great excellent wonderful lovely fine superb brilliant pleasant delightful"
NEGATIVE = "bad awful terrible poor boring dull horrible dreadful weak bland"
NOUNS = "movie film story plot actor scene music ending book song meal place day".split()
FILLER = "the a this that was is very quite rather really and".split()
COLOURS = "red green blue yellow black white".split()
ANIMALS = "cat dog bird fish horse cow".split()


@dataclasses.dataclass(frozen=True)
class Task:
    """A task's splits. ``labels``: the verbalized classes (rank classification), or ()
    for a generative task. ``metric``: the dev metric that picks the best step;
    ``metric_set``: the ``ptjax.data.metrics`` set computed on dev ("" = just ``metric``).
    Examples may also carry "candidates" (per-example rank candidates), "answers" (all
    gold answers) and "group" (e.g. MultiRC's question). ``shards``: the train shards this
    process read (``load_task(..., shards=)``), else empty."""
    name: str
    splits: dict
    labels: tuple = ()
    metric: str = "accuracy"
    metric_set: str = ""
    shards: dict = dataclasses.field(default_factory=dict)  # train: {shard: examples} read

    def split(self, name: str) -> list[dict]:
        if name not in self.splits:
            raise PtjaxError(f"task {self.name!r} has no split {name!r}; splits: "
                             f"{', '.join(self.splits)}")
        return self.splits[name]


def _sentiment_example(rng: random.Random) -> dict:
    n = rng.choice((1, 3, 5))  # odd: the majority polarity is the label
    words, score = [], 0
    for _ in range(n):
        pos = rng.random() < 0.5
        score += 1 if pos else -1
        words.append(rng.choice((POSITIVE if pos else NEGATIVE).split()))
    text = f"the {rng.choice(NOUNS)} was " + " and ".join(
        f"{rng.choice(FILLER)} {w}" for w in words)
    return {"inputs": f"review: {text}", "targets": "positive" if score > 0 else "negative"}


def _shifted_sentiment_example(rng: random.Random) -> dict:
    """The sentiment task in another domain (animals, not films) and surface form: the
    target of zero-shot transfer from ``synthetic_sentiment``."""
    ex = _sentiment_example(rng)
    words = ex["inputs"].split(" was ", 1)[1].replace(" and ", ", ")
    animal, colour = rng.choice(ANIMALS), rng.choice(COLOURS)
    return {"inputs": f"sentence: this {colour} {animal} is {words}", "targets": ex["targets"]}


def _qa_example(rng: random.Random) -> dict:
    animals = rng.sample(ANIMALS, 3)
    colours = [rng.choice(COLOURS) for _ in animals]
    facts = " and ".join(f"the {a} is {c}" for a, c in zip(animals, colours))
    i = rng.randrange(3)
    return {"inputs": f"question: what is the {animals[i]} context: {facts}",
            "targets": colours[i]}


def synthetic(name: str, n_train: int = 2048, n_dev: int = 128, seed: int = 0) -> Task:
    """A deterministic built-in task: the same examples on every machine."""
    make = {"synthetic_sentiment": _sentiment_example, "synthetic_qa": _qa_example,
            "synthetic_sentiment_shifted": _shifted_sentiment_example}[name]
    rng = random.Random(f"{name}-{seed}")
    splits = {"train": [make(rng) for _ in range(n_train)],
              "validation": [make(rng) for _ in range(n_dev)]}
    labels = ("negative", "positive") if name.startswith("synthetic_sentiment") else ()
    return Task(name, splits, labels, "accuracy" if labels else "exact_match")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise PtjaxError(f"{path}: task file not found")
    if os.path.isdir(path):
        raise PtjaxError(f"{path}: is a directory, not a JSONL task file")
    examples = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PtjaxError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PtjaxError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as e:
                raise PtjaxError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(ex, dict) or not isinstance(ex.get("inputs"), str) \
                    or not isinstance(ex.get("targets"), str):
                raise PtjaxError(f"{path}:{n}: each line needs string fields \"inputs\" and "
                                 "\"targets\"")
            fields = {k: str(v) for k, v in ex.items() if k not in ("inputs", "targets") and
                      isinstance(v, (str, int, float)) and not isinstance(v, bool)}
            examples.append({"inputs": ex["inputs"], "targets": ex["targets"],
                             **({"fields": fields} if fields else {})})
    if not examples:
        raise PtjaxError(f"{path}: no examples")
    return examples


BUILTIN = ("synthetic_sentiment", "synthetic_qa", "synthetic_sentiment_shifted")
CORPUS_TASKS = {"shakespeare_genre": ("comedy", "history", "tragedy"),
                "shakespeare_order": ("false", "true")}


def corpus_task(name: str) -> Task:
    """A classification task made from the lab's corpus (``ptjax.data.corpus``)."""
    make = {"shakespeare_genre": corpus_lib.genre_task,
            "shakespeare_order": corpus_lib.word_order_task}[name]
    return Task(name, make(corpus_lib.load_corpus("shakespeare")), CORPUS_TASKS[name])


def task_names() -> list[str]:
    return [*BUILTIN, *CORPUS_TASKS, "jsonl", *TFDS_TASKS]


def load_task(cfg, splits=("train", "validation"), shards=None) -> Task:
    """The task a ``TaskConfig`` names; ``cfg.labels`` overrides the task's labels.

    shards: (shard indices, n_shards) to read only those contiguous shards of the train
    split (``ptjax.data.pipeline.owned_shards``) into ``task.shards``; TFDS reads only them
    from disk (``tfds.even_splits``), Hugging Face datasets only those rows
    (``hf.even_bounds``, the same cut).
    """
    if cfg.name in BUILTIN:
        task = synthetic(cfg.name)
    elif cfg.name in CORPUS_TASKS:
        task = corpus_task(cfg.name)
    elif cfg.name == "jsonl":
        paths = {"train": cfg.train_file, "validation": cfg.dev_file}
        task = Task("jsonl", {s: read_jsonl(paths[s]) for s in splits if s in paths})
    elif cfg.name in TFDS_TASKS:
        read = load_hf_task if cfg.source == "hf" else load_tfds_task
        task = read(cfg.name, cfg, splits, shards)
    else:
        raise PtjaxError(f"unknown task {cfg.name!r}; valid: {', '.join(task_names())}")
    if shards is not None and not task.shards and "train" in task.splits:
        owned, n = shards
        bounds = shard_bounds(len(task.splits["train"]), n)
        task = dataclasses.replace(task, shards={
            q: task.splits["train"][bounds[q][0]:bounds[q][1]] for q in owned})
    if cfg.labels:
        task = dataclasses.replace(task, labels=tuple(cfg.labels), metric="accuracy")
    mode = cfg.eval_mode
    if mode == "rank" and not task.labels:
        raise PtjaxError(f"task.eval_mode=rank needs labels; task {task.name!r} has none "
                         "(set task.labels)")
    if mode == "generate":
        task = dataclasses.replace(task, metric="exact_match")
    if cfg.dev_size:  # evaluation splits cut to their first N examples
        task = dataclasses.replace(task, splits={
            k: v if k == "train" else v[:cfg.dev_size] for k, v in task.splits.items()})
    return task


# ---------------------------------------------------------------- TFDS tasks


@dataclasses.dataclass(frozen=True)
class TfdsTask:
    """A task read through tensorflow-datasets and formatted as T5 does.

    tfds_name: the TFDS dataset/config; format: the ``ptjax.data.formats`` name;
    metric: the ``ptjax.data.metrics`` metric set; select: the metric that picks the best
    step; splits: ptjax split -> TFDS split; labels: label names to use instead of the
    dataset's (a QQP prompt evaluated on MRPC reads MRPC's labels as QQP's).
    """
    tfds_name: str
    format: str
    metric: str = "accuracy"
    select: str = "accuracy"
    splits: tuple = (("train", "train"), ("validation", "validation"), ("test", "test"))
    labels: tuple = ()


SUPERGLUE = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
MRQA_OUT_OF_DOMAIN = ("bio_asq", "drop", "duo_rc", "race", "relation_extraction",
                      "textbook_qa")
_ONLY_TEST = (("validation", "test"), ("test", "test"))  # MRQA out-of-domain: dev sets

TFDS_TASKS = {
    "boolq": TfdsTask("super_glue/boolq", "boolq"),
    "cb": TfdsTask("super_glue/cb", "cb", "cb", "score"),
    "copa": TfdsTask("super_glue/copa", "copa"),
    "multirc": TfdsTask("super_glue/multirc", "multirc", "multirc", "score"),
    "record": TfdsTask("super_glue/record", "record", "record", "score"),
    "rte": TfdsTask("super_glue/rte", "rte"),
    "wic": TfdsTask("super_glue/wic", "wic"),
    # T5's WSC "simple": the model names the referent (greedy), scored against the label
    "wsc": TfdsTask("super_glue/wsc.fixed", "wsc", "wsc", "accuracy"),
    "mrpc": TfdsTask("glue/mrpc", "mrpc", "f1_accuracy", "score"),
    "qqp": TfdsTask("glue/qqp", "qqp", "f1_accuracy", "score"),
    "sst2": TfdsTask("glue/sst2", "sst2"),
    "squad": TfdsTask("squad/v1.1", "squad", "squad", "score",
                      (("train", "train"), ("validation", "validation"))),
    # Domain transfer: QQP <-> MRPC with the labels renamed (duplicate <-> equivalent).
    "mrpc_as_qqp": TfdsTask("glue/mrpc", "mrpc", "f1_accuracy", "score",
                            labels=("not_duplicate", "duplicate")),
    "qqp_as_mrpc": TfdsTask("glue/qqp", "qqp", "f1_accuracy", "score",
                            labels=("not_equivalent", "equivalent")),
    **{f"mrqa_{name}": TfdsTask(f"mrqa/{name}", "mrqa", "squad", "score", _ONLY_TEST)
       for name in MRQA_OUT_OF_DOMAIN},
}


def _tfds():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf  # noqa: PLC0415 (optional: the tfds extra)
        import tensorflow_datasets as tfds  # noqa: PLC0415 (optional: the tfds extra)
    except ImportError as e:  # the demo's install has neither
        raise PtjaxError(f"TFDS tasks need tensorflow-datasets and TensorFlow ({e.name} is not "
                         "installed): pip install -e '.[tfds]'") from None

    # TensorFlow only reads data here: keep it off the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
    return tfds


def raw_fields(ex: dict) -> dict:
    """An example's text and number fields as strings, for templates ({premise}, ...).
    TFDS gives numpy scalars and bytes, Hugging Face datasets Python numbers and str:
    both become the same strings (WiC's {start1}, an {idx}). The gold ``label`` is left
    out: a template that named it would train and score on the answer."""
    out = {}
    for key, value in ex.items():
        if key == "label":
            continue
        if isinstance(value, np.generic) and not isinstance(value, np.bool_):
            value = value.item()  # a numpy number (or bytes) as Python's
        if isinstance(value, bytes):
            out[key] = value.decode("utf-8")
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            out[key] = str(value)
    return out


def load_tfds_task(name: str, cfg, splits=("train", "validation"), shards=None) -> Task:
    """Read and format the splits of a registered TFDS task (no download at run time).

    shards: (indices, n) reads only those of n even train shards, into ``Task.shards``."""
    spec = TFDS_TASKS[name]
    tfds = _tfds()
    data_dir = cfg.data_dir or None
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    dataset_labels = tuple(getattr(label, "names", None) or ())
    labels = spec.labels or dataset_labels
    tfds_split = dict(spec.splits)

    def read(split, tfds_split_arg):
        try:
            ds = tfds.load(spec.tfds_name, split=tfds_split_arg, data_dir=data_dir,
                           download=False, shuffle_files=False)
        except (AssertionError, FileNotFoundError) as e:
            where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
            raise PtjaxError(
                f"task {name!r}: TFDS dataset {spec.tfds_name} ({tfds_split[split]}) is not "
                f"prepared in {where}; run `tfds build {spec.tfds_name}"
                f"{' --data_dir ' + data_dir if data_dir else ''}` on a machine with network "
                "(or copy a prepared directory) and set task.data_dir") from e
        return formatted(spec, tfds.as_numpy(ds), labels, cfg.prefix, split)

    out, train_shards = {}, {}
    for split in splits:
        if split not in tfds_split:
            continue
        if split == "train" and shards is not None:
            owned, n = shards
            pieces = tfds.even_splits(tfds_split[split], n)
            train_shards = {q: read(split, pieces[q]) for q in owned}
            out[split] = [ex for q in owned for ex in train_shards[q]]
        else:
            out[split] = read(split, tfds_split[split])
    return paper_task(name, out, labels, train_shards)


def formatted(spec: TfdsTask, examples, labels, prefix: bool, split: str) -> list[dict]:
    """Raw examples (TFDS's or the hub's rows) in T5's format, each with its raw
    text and number fields (for templates)."""
    return [{**f, "fields": raw_fields(ex)} for ex in examples
            for f in format_example(spec.format, ex, labels, prefix=prefix, split=split)]


def paper_task(name: str, splits: dict, labels, train_shards: dict) -> Task:
    spec = TFDS_TASKS[name]
    # classification tasks rank their label names; copa/record carry per-example candidates
    ranked = labels if spec.metric in ("accuracy", "cb", "multirc", "f1_accuracy") else ()
    return Task(name, splits, tuple(ranked), spec.select, metric_set=spec.metric,
                shards=train_shards)


def load_hf_task(name: str, cfg, splits=("train", "validation"), shards=None) -> Task:
    """A registered TFDS task read from Hugging Face datasets instead (``ptjax.data.hf``:
    the hub, its cache, or local Parquet / Arrow files; no TensorFlow), formatted as the
    TFDS path formats it. shards: (indices, n) formats only those of n train shards,
    cut as ``tfds.even_splits`` cuts them (``hf.even_bounds``)."""
    spec = TFDS_TASKS[name]
    hf_split = dict(spec.splits)
    out, train_shards, labels = {}, {}, spec.labels
    for split in splits:
        if split not in hf_split:
            continue
        ds = hf.read_split(name, spec.tfds_name, cfg.hf_path, hf_split[split])
        labels = spec.labels or hf.label_names(ds, name, hf_split[split])
        if split == "train" and shards is not None:
            owned, n = shards
            bounds = hf.even_bounds(len(ds), n)
            train_shards = {q: formatted(spec, hf.rows(ds, *bounds[q]), labels, cfg.prefix,
                                         split) for q in owned}
            out[split] = [ex for q in owned for ex in train_shards[q]]
        else:
            out[split] = formatted(spec, hf.rows(ds), labels, cfg.prefix, split)
    return paper_task(name, out, labels, train_shards)
