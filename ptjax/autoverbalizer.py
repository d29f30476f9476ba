"""Automatic label words: LM-BFF's automatic label word selection (Gao, Fisch & Chen 2021,
"Making Pre-trained Language Models Better Few-shot Learners", section 5.1), on the frozen
model with the task's template (``ptjax verbalizer``).

With the model L and a template T whose ``{mask}`` is where the answer goes:

1. candidates: for each class c, V_c = the top-k vocabulary words v by
   sum over the class's train examples x of log P_L([MASK] = v | T(x));
2. assignments: every (v_1, ..., v_C) in V_1 x ... x V_C scored by its zero-shot accuracy
   on the train examples (predict the class whose word is most likely at the mask), the
   top-n kept;
3. the final choice: the n assignments ranked by zero-shot accuracy on the dev split (the
   paper fine-tunes a model per assignment and ranks them by dev accuracy after it; ptjax
   does not fine-tune here).

"At the mask" is where ptjax's verbalizers score a label word (``ptjax.verbalizers``):
T5 predicts it in the decoder after <extra_id_0> (the template puts the sentinel at
{mask} and in front of the target); GPT-2 predicts it as the next token after the input.
A vocabulary word is a single token that is a whole word: a SentencePiece piece "▁word"
(T5) or a byte-level BPE token "Ġword" (GPT-2), ``word`` alphabetic, that the task's
verbalizer turns back into that one token (so the word scores what the search scored).
LM-BFF's code keeps every "Ġ" token; words of several tokens are not searched.

One forward per batch gives each example's log-distribution at the mask [N, V]; the
assignment search then reads only the cached log-probabilities of the candidate words
(past ``CACHE_FLOATS``, step 1 sums batch by batch and a second pass keeps only the
candidates' columns).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.config.load import parse_yaml
from ptjax.data import templates
from ptjax.data.encoding import encode
from ptjax.data.pipeline import eval_batches
from ptjax.data.tasks import load_task
from ptjax.errors import PtjaxError
from ptjax.models.named import load_run_model
from ptjax.taskdata import encoding
from ptjax.verbalizers import class_indices, label_token_ids

METHOD = "LM-BFF automatic label word selection (Gao et al. 2021)"
FINAL_CHOICE = ("zero-shot dev accuracy of each of the top-n assignments (LM-BFF fine-tunes "
                "a model per assignment and ranks by dev accuracy after it; not done here)")
MAX_ASSIGNMENTS = 1_000_000  # k^C assignments scored; LM-BFF's MNLI search is 30^3
CHUNK = 4096  # assignments scored at once: [CHUNK, N, C] floats
CACHE_FLOATS = 2 ** 28  # train log-probabilities [N, V] kept up to 1 GiB, else two passes


# ---------------------------------------------------------------- the mask's distribution


@functools.partial(jax.jit, static_argnums=0)
def _answer_logprobs(model, params, batch, position):
    """[B, V] fp32: log_softmax of the logits at each row's ``position`` [B]."""
    if model.is_encoder_decoder:
        logits = model.logits(params, batch["input_ids"], attention_mask=batch["input_mask"],
                              decoder_input_ids=batch["decoder_input_ids"])
    else:
        logits = model.logits(params, batch["input_ids"], attention_mask=batch["input_mask"])
    at = jnp.take_along_axis(logits, position[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(at.astype(jnp.float32), axis=-1)


def answer_position(arrays: dict, prefix_length: int) -> np.ndarray:
    """[N]: the position whose logits predict the answer's first token: the first target
    position after ``prefix_length`` prefix ids (T5: 1, after <extra_id_0>; GPT-2: the
    input's last token)."""
    return np.asarray(arrays["target_mask"]).argmax(1).astype(np.int32) + prefix_length


def batch_logprobs(model, examples, enc: dict, max_input_length: int,
                   max_target_length: int, batch_size: int = 32):
    """Yields (start, [n, V] fp32): each example's log-distribution over the vocabulary at
    the template's {mask} (``enc``: ``taskdata.encoding``), one jitted forward per batch of
    ``batch_size``. The targets encoded are a placeholder: the position read sees only
    the input (and T5's decoder start and sentinel), never the target."""
    prefix = enc["target_prefix"]
    placeholder = [{**ex, "targets": "a"} for ex in examples]
    arrays, _ = encode(model, placeholder, max_input_length, max_target_length, prefix,
                       enc["template"])
    position = answer_position(arrays, len(prefix))
    if model.is_encoder_decoder:  # the decoder needs only the positions up to the answer's
        width = len(prefix) + 1
        arrays = {"input_ids": arrays["input_ids"], "input_mask": arrays["input_mask"],
                  "decoder_input_ids": arrays["decoder_input_ids"][:, :width]}
    else:  # the input alone: the answer position is its last token
        width = max_input_length
        arrays = {"input_ids": arrays["input_ids"][:, :width],
                  "input_mask": arrays["input_mask"][:, :width]}
    arrays["position"] = position
    V = vocabulary_size(model)
    for start, (batch, n) in zip(itertools.count(0, batch_size),
                                 eval_batches(arrays, batch_size)):
        pos = batch.pop("position")
        yield start, np.asarray(_answer_logprobs(model, model.params, batch, pos))[:n, :V]


def mask_logprobs(model, examples, enc: dict, max_input_length: int,
                  max_target_length: int, batch_size: int = 32, columns=None) -> np.ndarray:
    """[N, V] fp32 (``batch_logprobs``), or only the vocabulary ids ``columns`` [N, len]."""
    out = [lp if columns is None else lp[:, columns]
           for _, lp in batch_logprobs(model, examples, enc, max_input_length,
                                       max_target_length, batch_size)]
    return np.concatenate(out)


def summed_logprobs(model, examples, labels_N, C: int, enc: dict, max_input_length: int,
                    max_target_length: int, batch_size: int = 32) -> np.ndarray:
    """``class_scores`` of the examples, batch by batch: [C, V] float64 without holding
    [N, V]."""
    total = None
    for start, lp in batch_logprobs(model, examples, enc, max_input_length,
                                    max_target_length, batch_size):
        part = class_scores(lp, labels_N[start:start + len(lp)], C)
        total = part if total is None else total + part
    return total


def vocabulary_size(model) -> int:
    """The ids that are tokens: the tokenizer's (T5's embedding has padding rows beyond)."""
    return min(len(model.tokenizer), model.config.vocab_size)


# ---------------------------------------------------------------- step 1: candidates


def whole_word(model, token_id: int) -> str | None:
    """The word a token is, if it is a whole word the verbalizer scores as this one token
    (T5: "▁word"; GPT-2: "Ġword"; a masked LM: RoBERTa's "Ġword" or WordPiece's "word", not
    "##word"; ``word`` alphabetic), else None."""
    piece = model.tokenizer.convert_ids_to_tokens(int(token_id))
    mark = {"seq2seq": "▁", "causal": "Ġ", "masked": ""}[model.kind]
    if not isinstance(piece, str) or not piece.startswith(mark):
        return None
    word = piece[len(mark):] if mark else piece.removeprefix("Ġ")
    if not word.isalpha() or label_token_ids(model, [word]) != [int(token_id)]:
        return None
    return word


def class_scores(logprobs_NxV: np.ndarray, labels_N: np.ndarray, C: int) -> np.ndarray:
    """[C, V]: for each class, the sum over its examples of log P([MASK] = v | T(x))."""
    return np.stack([logprobs_NxV[labels_N == c].sum(0, dtype=np.float64) for c in range(C)])


def candidates(model, scores_CxV: np.ndarray, k: int) -> list[list[tuple]]:
    """Per class the top-k whole words by score: [[(token id, word, score), ...], ...]
    (best first; equal scores in id order)."""
    out = []
    for scores in scores_CxV:
        kept = []
        for i in np.argsort(-scores, kind="stable"):
            word = whole_word(model, i)
            if word is not None:
                kept.append((int(i), word, float(scores[i])))
                if len(kept) == k:
                    break
        out.append(kept)
    return out


# ---------------------------------------------------------------- step 2: assignments


def check_assignments(sizes, k: int):
    """One line when V_1 x ... x V_C has more than ``MAX_ASSIGNMENTS`` assignments."""
    total = int(np.prod(sizes, dtype=np.float64))
    if total > MAX_ASSIGNMENTS:
        raise PtjaxError(f"--k {k} gives {total:,} assignments of label words to the "
                         f"{len(sizes)} classes (k^C), over the {MAX_ASSIGNMENTS:,} searched; "
                         "give a smaller --k")
    return total


def assignment_accuracy(cand_logprobs, labels_N: np.ndarray) -> np.ndarray:
    """Accuracy of every assignment in V_1 x ... x V_C (``itertools.product`` order):
    the mean over examples of [argmax_c log P(v_c | x) == label] (ties: the first class,
    as np.argmax and LM-BFF's code). cand_logprobs: per class [N, k_c]."""
    sizes = [lp.shape[1] for lp in cand_logprobs]
    combos = np.array(list(itertools.product(*[range(s) for s in sizes])), np.int64)
    combos = combos.reshape(-1, len(sizes))
    out = np.empty(len(combos))
    for a in range(0, len(combos), CHUNK):
        idx = combos[a:a + CHUNK]  # [A, C]
        scores = np.stack([lp[:, idx[:, c]].T for c, lp in enumerate(cand_logprobs)], -1)
        out[a:a + CHUNK] = (scores.argmax(-1) == labels_N[None]).mean(1)  # [A, N, C] -> [A]
    return out


def top_assignments(cand_logprobs, labels_N: np.ndarray, n: int) -> list[tuple]:
    """The n best assignments by train accuracy: [(per class candidate index, accuracy)],
    best first, equal accuracies in ``itertools.product`` order."""
    sizes = [lp.shape[1] for lp in cand_logprobs]
    acc = assignment_accuracy(cand_logprobs, labels_N)
    order = np.argsort(-acc, kind="stable")[:n]
    combos = list(itertools.product(*[range(s) for s in sizes]))
    return [(combos[i], float(acc[i])) for i in order]


# ---------------------------------------------------------------- the search


def labels_of(examples, classes, task_name: str, split: str) -> np.ndarray:
    """[N] class indices of the examples' targets; a target that is no class is one line."""
    return class_indices(examples, classes, task_name, split,
                         f"is not one of its labels ({', '.join(classes)})")


def few_shot(examples, labels_N, C: int, per_class: int, seed: int):
    """LM-BFF's few-shot train set: ``per_class`` examples of each class drawn with
    ``seed`` (all of a class with fewer), in their original order."""
    rng = random.Random(seed)
    keep = []
    for c in range(C):
        rows = [i for i in range(len(examples)) if labels_N[i] == c]
        keep += rows if len(rows) <= per_class else rng.sample(rows, per_class)
    keep.sort()
    return [examples[i] for i in keep], labels_N[keep]


@dataclasses.dataclass
class Search:
    """What ``search`` found: ``candidates`` per class [(id, word, score)];
    ``assignments`` the top-n [{"words": {class: word}, "train_accuracy",
    "dev_accuracy"}] in train order; ``best`` the index of the one dev picks."""
    classes: tuple
    candidates: list
    assignments: list
    best: int

    @property
    def verbalizer(self) -> dict:
        return {c: [w] for c, w in self.assignments[self.best]["words"].items()}


def search(model, classes, train, train_labels, dev, dev_labels, enc: dict, k: int, n: int,
           max_input_length: int, max_target_length: int, batch_size: int = 32) -> Search:
    """LM-BFF's three steps (the module docstring) on encoded examples; accuracies in %."""
    if k < 1 or n < 1:
        raise PtjaxError(f"--k {k} --n {n}: both must be at least 1")
    C = len(classes)
    for c, name in enumerate(classes):
        if not np.any(train_labels == c):
            raise PtjaxError(f"class {name!r} has no train examples; the candidates of a "
                             "class are ranked on its own train examples")
    check_assignments([k] * C, k)  # before any forward
    lengths = (max_input_length, max_target_length, batch_size)
    if len(train) * vocabulary_size(model) <= CACHE_FLOATS:  # one pass, [N, V] kept
        lp_train = mask_logprobs(model, train, enc, *lengths)
        scores = class_scores(lp_train, train_labels, C)
    else:  # summed batch by batch; a second pass reads the candidates' columns alone
        lp_train, scores = None, summed_logprobs(model, train, train_labels, C, enc, *lengths)
    cands = candidates(model, scores, k)
    for c, kept in enumerate(cands):
        if not kept:
            raise PtjaxError(f"class {classes[c]!r}: the vocabulary of {model.path} has no "
                             "single-token whole words to search")
    ids = [np.array([i for i, _, _ in kept]) for kept in cands]
    union = sorted({int(i) for x in ids for i in x})
    column = {v: j for j, v in enumerate(union)}
    if lp_train is None:
        cols = mask_logprobs(model, train, enc, *lengths, columns=union)
    else:
        cols = lp_train[:, union]
    top = top_assignments([cols[:, [column[int(i)] for i in x]] for x in ids], train_labels, n)
    lp_dev = mask_logprobs(model, dev, enc, *lengths, columns=union)
    rows = []
    for combo, train_acc in top:
        chosen = [column[int(ids[c][j])] for c, j in enumerate(combo)]
        dev_acc = float((lp_dev[:, chosen].argmax(1) == dev_labels).mean())
        rows.append({"words": {classes[c]: cands[c][j][1] for c, j in enumerate(combo)},
                     "train_accuracy": 100.0 * train_acc, "dev_accuracy": 100.0 * dev_acc})
    best = max(range(len(rows)), key=lambda r: (rows[r]["dev_accuracy"], -r))
    return Search(tuple(classes), cands, rows, best)


def override(verbalizer: dict) -> str:
    """``task.verbalizer={c: [w], ...}`` as a dotted override the config reads back;
    a name YAML would read as something else (true, null, 1) is quoted."""
    def q(s):
        return s if parse_yaml(s) == s and s.strip() == s and not set(s) & set(":,[]{}#'\"") \
            else '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    body = ", ".join(f"{q(c)}: [{', '.join(q(w) for w in ws)}]" for c, ws in verbalizer.items())
    return "task.verbalizer={" + body + "}"


def check_task_config(tcfg):
    """One line for a task the search cannot run on: no {mask} template, several
    templates, a mixture, soft slots."""
    if tcfg.mixture or tcfg.templates:
        raise PtjaxError("ptjax verbalizer searches one task with one template; unset "
                         "task.mixture / task.templates and give task.template")
    if not tcfg.template:
        raise PtjaxError("ptjax verbalizer needs task.template with {mask} (where the "
                         "label word goes), e.g. task.template=\"{inputs} It was {mask}\"")
    t = templates.parse(tcfg.template)
    if not t.has_mask:
        raise PtjaxError(f"task.template={tcfg.template!r} has no {{mask}}; the label words "
                         "are searched at the mask (e.g. \"{inputs} It was {mask}\")")
    if t.soft_tokens:
        raise PtjaxError(f"task.template={tcfg.template!r} has soft slots, which are "
                         "untrained here; the search scores the frozen model with a hard "
                         "template")


def run_search(cfg, k: int = 10, n: int = 20, per_class: int | None = None,
               seed: int = 0) -> dict:
    """``ptjax verbalizer``: the search on the config's model, task and template (train
    split, optionally ``per_class`` examples of each class drawn with ``seed``; dev:
    the validation split) -> the results JSON (``results``)."""
    tcfg = cfg.task
    check_task_config(tcfg)
    if per_class is not None and per_class < 1:
        raise PtjaxError(f"--per-class {per_class}: must be at least 1")
    if k < 1 or n < 1:
        raise PtjaxError(f"--k {k} --n {n}: both must be at least 1")
    task = load_task(tcfg)
    if not task.labels:
        raise PtjaxError(f"task {task.name!r} has no labels (a generative task); the search "
                         "assigns label words to classes: set task.labels")
    check_assignments([k] * len(task.labels), k)  # before the model is loaded
    model = load_run_model(cfg.model)
    enc = encoding(model, tcfg)
    classes = tuple(task.labels)
    train = task.split("train")
    train_labels = labels_of(train, classes, task.name, "train")
    if per_class is not None:
        train, train_labels = few_shot(train, train_labels, len(classes), per_class, seed)
    dev = task.split("validation")
    dev_labels = labels_of(dev, classes, task.name, "validation")
    found = search(model, classes, train, train_labels, dev, dev_labels, enc, k, n,
                   tcfg.max_input_length, tcfg.max_target_length, cfg.train.eval_batch_size)
    return results(found, cfg, k, n, per_class, seed, len(train), len(dev))


def results(found: Search, cfg, k, n, per_class, seed, n_train, n_dev) -> dict:
    """The search's JSON: method, settings, candidates, assignments, the verbalizer."""
    return {"method": METHOD, "final_choice": FINAL_CHOICE,
            "model": cfg.model.path, "task": cfg.task.name, "template": cfg.task.template,
            "k": k, "n": n, "per_class": per_class, "seed": seed,
            "train_examples": n_train, "dev_examples": n_dev,
            "candidates": {c: [[w, s] for _, w, s in kept]
                           for c, kept in zip(found.classes, found.candidates)},
            "assignments": found.assignments,
            "verbalizer": found.verbalizer,
            "override": override(found.verbalizer)}
