"""Task sources: lists of ``{"inputs": str, "targets": str}`` per split.

Built in (no network): ``synthetic_sentiment`` (classification, labels negative /
positive) and ``synthetic_qa`` (a colour question answered by a word of the input, scored
by greedy exact match or by ranking the colours). ``jsonl`` reads one JSON object per
line with "inputs" and "targets".
"""
from __future__ import annotations

import dataclasses
import json
import os
import random

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
    for a generative task. ``metric``: the dev metric that picks the best step."""
    name: str
    splits: dict
    labels: tuple = ()
    metric: str = "accuracy"

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


def _qa_example(rng: random.Random) -> dict:
    animals = rng.sample(ANIMALS, 3)
    colours = [rng.choice(COLOURS) for _ in animals]
    facts = " and ".join(f"the {a} is {c}" for a, c in zip(animals, colours))
    i = rng.randrange(3)
    return {"inputs": f"question: what is the {animals[i]} context: {facts}",
            "targets": colours[i]}


def synthetic(name: str, n_train: int = 2048, n_dev: int = 128, seed: int = 0) -> Task:
    """A deterministic built-in task: the same examples on every machine."""
    make = {"synthetic_sentiment": _sentiment_example, "synthetic_qa": _qa_example}[name]
    rng = random.Random(f"{name}-{seed}")
    splits = {"train": [make(rng) for _ in range(n_train)],
              "validation": [make(rng) for _ in range(n_dev)]}
    labels = ("negative", "positive") if name == "synthetic_sentiment" else ()
    return Task(name, splits, labels, "accuracy" if labels else "exact_match")


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise PtjaxError(f"{path}: task file not found")
    examples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
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
            examples.append({"inputs": ex["inputs"], "targets": ex["targets"]})
    if not examples:
        raise PtjaxError(f"{path}: no examples")
    return examples


BUILTIN = ("synthetic_sentiment", "synthetic_qa")


def load_task(cfg) -> Task:
    """The task a ``TaskConfig`` names; ``cfg.labels`` overrides the task's labels."""
    if cfg.name in BUILTIN:
        task = synthetic(cfg.name)
    elif cfg.name == "jsonl":
        task = Task("jsonl", {"train": read_jsonl(cfg.train_file),
                              "validation": read_jsonl(cfg.dev_file)})
    else:
        raise PtjaxError(f"unknown task {cfg.name!r}; valid: {', '.join(BUILTIN)}, jsonl")
    if cfg.labels:
        task = dataclasses.replace(task, labels=tuple(cfg.labels), metric="accuracy")
    mode = cfg.eval_mode
    if mode == "rank" and not task.labels:
        raise PtjaxError(f"task.eval_mode=rank needs labels; task {task.name!r} has none "
                         "(set task.labels)")
    if mode == "generate":
        task = dataclasses.replace(task, metric="exact_match")
    if cfg.dev_size:
        dev = task.splits["validation"][:cfg.dev_size]
        task = dataclasses.replace(task, splits={**task.splits, "validation": dev})
    return task
