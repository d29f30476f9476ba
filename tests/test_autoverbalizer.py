"""Automatic label words (ptjax.autoverbalizer, ``ptjax verbalizer``): LM-BFF's
candidates equal the paper's formula computed by a plain loop (one example per forward,
log_softmax at the mask, summed per class in Python, whole words picked by the tokenizer);
the assignments equal a brute force over V_1 x ... x V_C; the dev accuracy of the chosen
words equals ptjax's own evaluation of that verbalizer; the command's JSON and its
override train in a later run; bad input is one line."""
import dataclasses
import itertools
import json
import math
import os
import random

import numpy as np
import pytest

from ptjax import autoverbalizer, cli
from ptjax.config import TaskConfig, load_config
from ptjax.data.encoding import MASK_SLOT, tokenize
from ptjax.data.tasks import synthetic
from ptjax.data.templates import parse
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, predict
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model
from ptjax.taskdata import encoding, verbalizing

TEMPLATE = "{inputs} it was {mask}"
CLASSES = ("negative", "positive")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The built-in tiny-t5, tiny-gpt2 and tiny-bert, in a model.tiny_dir the command
    reuses."""
    d = tmp_path_factory.mktemp("tiny-autoverbalizer")
    return {"t5": load_model(build_tiny_model(str(d / "tiny-t5"), "t5")),
            "gpt2": load_model(build_tiny_model(str(d / "tiny-gpt2"), "gpt2")),
            "bert": load_model(build_tiny_model(str(d / "tiny-bert"), "bert")),
            "dir": str(d)}


def _examples(n_per_class=3):
    train = synthetic("synthetic_sentiment").split("train")
    out = []
    for c in CLASSES:
        out += [ex for ex in train if ex["targets"] == c][:n_per_class]
    return out


def _plain_mask_logprobs(model, ex, tcfg):
    """log P([MASK] = v | T(x)) for every v, float64: one example, no padding, the full
    logits, log_softmax by hand at the position that predicts the answer."""
    enc = encoding(model, tcfg)
    (ids, _, _), = tokenize(model, [ex], tcfg.max_input_length, tcfg.max_target_length,
                            enc["target_prefix"], parse(TEMPLATE))
    if model.is_encoder_decoder:
        sentinel = model.tokenizer.convert_tokens_to_ids("<extra_id_0>")
        assert enc["target_prefix"] == (sentinel,) and sentinel in ids
        dec = np.array([[model.config.decoder_start_token_id, sentinel]])
        logits = model.logits(model.params, np.array([ids]), decoder_input_ids=dec)[0, 1]
    elif model.kind == "masked":  # the first of the template's mask tokens
        at = ids.index(MASK_SLOT)
        ids = [model.tokenizer.mask_token_id if i == MASK_SLOT else i for i in ids]
        logits = model.logits(model.params, np.array([ids]))[0, at]
    else:
        logits = model.logits(model.params, np.array([ids]))[0, -1]
    x = np.asarray(logits, np.float64)
    return x - (x.max() + math.log(np.exp(x - x.max()).sum()))


def _is_whole_word(model, i):
    """The word token i is, by the tokenizer alone: '▁word' / 'Ġword' / WordPiece's 'word',
    alphabetic, and the word (GPT-2, BERT: after a space) tokenizes back to exactly [i]."""
    piece = model.tokenizer.convert_ids_to_tokens(i)
    mark = "▁" if model.is_encoder_decoder else "Ġ"
    if model.kind == "masked":
        piece = "Ġ" + piece  # WordPiece marks a word's continuation (##), not its start
    if not piece.startswith(mark) or not piece[1:].isalpha():
        return None
    word = piece[1:]
    text = word if model.is_encoder_decoder else " " + word
    return word if model.tokenizer(text, add_special_tokens=False)["input_ids"] == [i] else None


@pytest.mark.parametrize("family", ["t5", "gpt2", "bert"])
def test_candidates_equal_the_papers_sum_by_a_plain_loop(tiny, family):
    """V_c = Top-k over whole words v of sum_{x in class c} log P([MASK] = v | T(x))."""
    model, k = tiny[family], 6
    tcfg = TaskConfig(template=TEMPLATE, max_input_length=32, max_target_length=4)
    examples = _examples(2)
    labels = np.array([CLASSES.index(ex["targets"]) for ex in examples])
    V = len(model.tokenizer)
    sums = {c: np.zeros(V) for c in CLASSES}
    for ex in examples:
        sums[ex["targets"]] += _plain_mask_logprobs(model, ex, tcfg)[:V]
    want = {}
    for c in CLASSES:
        ranked = []
        for i in sorted(range(V), key=lambda i: -sums[c][i]):
            word = _is_whole_word(model, i)
            if word is not None:
                ranked.append((word, sums[c][i]))
            if len(ranked) == k:
                break
        want[c] = ranked
    lp = autoverbalizer.mask_logprobs(model, examples, encoding(model, tcfg), 32, 4,
                                      batch_size=3)  # 2 batches, the last padded
    got = autoverbalizer.candidates(model, autoverbalizer.class_scores(lp, labels, 2), k)
    for c, kept in zip(CLASSES, got):
        assert [w for _, w, _ in kept] == [w for w, _ in want[c]]
        np.testing.assert_allclose([s for _, _, s in kept], [s for _, s in want[c]],
                                   rtol=1e-5)


def test_assignments_equal_a_brute_force_over_every_combination():
    """Every assignment's train accuracy by a plain loop (first class wins a tie), the
    top-n by accuracy with ties in product order; words shared by classes included."""
    rng = np.random.default_rng(0)
    N, sizes = 40, (4, 3, 5)
    # log-probabilities on a coarse grid, so ties between classes happen
    cand = [np.round(rng.normal(size=(N, s)), 0) for s in sizes]
    cand[2][:, 0] = cand[0][:, 0]  # the same word in two classes
    labels = rng.integers(0, 3, N)
    combos = list(itertools.product(*[range(s) for s in sizes]))
    acc = []
    for combo in combos:
        correct = 0
        for i in range(N):
            scores = [cand[c][i][j] for c, j in enumerate(combo)]
            pred = max(range(3), key=lambda c: (scores[c], -c))
            correct += pred == labels[i]
        acc.append(correct / N)
    np.testing.assert_allclose(autoverbalizer.assignment_accuracy(cand, labels), acc)
    n = 7
    want = sorted(range(len(combos)), key=lambda a: (-acc[a], a))[:n]
    got = autoverbalizer.top_assignments(cand, labels, n)
    assert [combo for combo, _ in got] == [combos[a] for a in want]
    assert [a for _, a in got] == pytest.approx([acc[a] for a in want])
    assert len(set(acc[a] for a in want)) < n  # ties were broken


def test_dev_accuracy_is_ptjax_evaluation_of_the_chosen_words(tiny):
    """The search's zero-shot dev accuracy of each kept assignment equals rank
    classification of that task.verbalizer by ptjax.evaluation (bare model, one row per
    label word), and the chosen one is the best on dev."""
    model = tiny["gpt2"]
    tcfg = TaskConfig(template=TEMPLATE, max_input_length=32, max_target_length=4,
                      dev_size=24)
    task = synthetic("synthetic_sentiment")
    train = _examples(8)
    train_labels = autoverbalizer.labels_of(train, CLASSES, "t", "train")
    dev = task.split("validation")[:24]
    dev_labels = autoverbalizer.labels_of(dev, CLASSES, "t", "validation")
    found = autoverbalizer.search(model, CLASSES, train, train_labels, dev, dev_labels,
                                  encoding(model, tcfg), k=3, n=4, max_input_length=32,
                                  max_target_length=4, batch_size=16)
    assert len(found.assignments) == 4
    for a in found.assignments:
        verbalizer = tuple((c, (w,)) for c, w in a["words"].items())
        t = dataclasses.replace(tcfg, verbalizer=verbalizer)
        small = type(task)(task.name, {"validation": dev}, task.labels)
        dset = build_dev_set(model, small, "rank", 32, 4, **encoding(model, t),
                             **verbalizing(t))
        texts = predict(model, None, None, model.params, dset, 16, 1).texts[0]
        acc = 100 * np.mean([p == ex["targets"] for p, ex in zip(texts, dev)])
        assert a["dev_accuracy"] == pytest.approx(acc)
    best = max(a["dev_accuracy"] for a in found.assignments)
    assert found.assignments[found.best]["dev_accuracy"] == best
    assert found.verbalizer == {c: [w] for c, w in found.assignments[found.best]["words"]
                                .items()}


def test_few_shot_draws_per_class_with_the_seed():
    examples = synthetic("synthetic_sentiment").split("train")[:100]
    labels = autoverbalizer.labels_of(examples, CLASSES, "t", "train")
    a, la = autoverbalizer.few_shot(examples, labels, 2, 5, seed=1)
    b, _ = autoverbalizer.few_shot(examples, labels, 2, 5, seed=1)
    c, _ = autoverbalizer.few_shot(examples, labels, 2, 5, seed=2)
    assert a == b and a != c and list(np.bincount(la)) == [5, 5]
    rng = random.Random(1)
    rows = [[i for i in range(100) if labels[i] == k] for k in range(2)]
    want = sorted(rng.sample(rows[0], 5) + rng.sample(rows[1], 5))
    assert a == [examples[i] for i in want]


def test_override_reads_back_as_the_verbalizer():
    v = {"negative": ["bad"], "true": ["null"], "a: b": ["x"]}
    cfg = load_config(None, [autoverbalizer.override(v)])
    assert cfg.task.verbalizer == tuple((c, tuple(w)) for c, w in v.items())


def test_command_writes_json_and_its_words_train(tiny, tmp_path, capsys):
    """`ptjax verbalizer` on the tiny GPT-2: the JSON has the method, candidates,
    assignments and verbalizer; the printed override trains in a later `ptjax train`."""
    common = [f"model.tiny_dir={tiny['dir']}", "model.path=tiny-gpt2", f"task.template={TEMPLATE}",
              "task.max_input_length=32", "task.max_target_length=4", "task.dev_size=16",
              "train.eval_batch_size=16"]
    out = tmp_path / "verbalizer.json"
    assert cli.main(["verbalizer", *common, f"run_dir={tmp_path / 'search'}", "--k", "3",
                     "--n", "4", "--per-class", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    found = json.loads(out.read_text())
    assert found["method"] == "LM-BFF automatic label word selection (Gao et al. 2021)"
    assert set(found["candidates"]) == set(CLASSES)
    assert all(len(v) == 3 for v in found["candidates"].values())
    assert len(found["assignments"]) == 4 and found["train_examples"] == 16
    assert {"words", "train_accuracy", "dev_accuracy"} <= set(found["assignments"][0])
    assert set(found["verbalizer"]) == set(CLASSES)
    assert printed[-1] == found["override"]
    assert found["override"].startswith("task.verbalizer={negative: [")
    run = tmp_path / "run"
    assert cli.main(["train", *common, printed[-1], f"run_dir={run}", "prompt.length=2",
                     "train.steps=2", "train.eval_every=2", "train.batch_size=8",
                     "--no-progress"]) == 0
    saved = load_config(str(run / "config.yaml"))
    assert saved.task.verbalizer == tuple((c, tuple(w)) for c, w in
                                          found["verbalizer"].items())


@pytest.mark.parametrize("args, message", [
    (["task.template={inputs} it was"], "has no {mask}"),
    (["task.template={inputs} {soft:2} it was {mask}"], "has soft slots"),
    (["task.template="], "needs task.template with {mask}"),
    (["task.name=synthetic_qa", "task.template={inputs} answer {mask}"], "has no labels"),
    (["task.template={inputs} it was {mask}", "--k", "0"], "--k 0 --n 20: both must be"),
    (["task.template={inputs} it was {mask}", "--k", "1001"],
     "1,002,001 assignments of label words to the 2 classes"),
    (["task.template={inputs} it was {mask}", "--per-class", "0"], "--per-class 0"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert cli.main(["verbalizer", f"model.tiny_dir={tmp_path}", "model.path=tiny-gpt2",
                     f"run_dir={tmp_path / 'r'}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "tiny-gpt2")  # stopped before loading the model



def test_examples_that_cannot_be_searched_are_one_line(tiny):
    """A target that is none of the labels; a class with no train examples (refused before
    any forward)."""
    with pytest.raises(PtjaxError, match=r"train example 1: target 'meh' is not one of its "
                                         r"labels \(negative, positive\)"):
        autoverbalizer.labels_of([{"targets": "negative"}, {"targets": "meh"}], CLASSES, "t",
                                 "train")
    model = tiny["gpt2"]
    tcfg = TaskConfig(template=TEMPLATE, max_input_length=32, max_target_length=4)
    train = _examples(2)[:2]  # negatives only
    labels = autoverbalizer.labels_of(train, CLASSES, "t", "train")
    with pytest.raises(PtjaxError, match="class 'positive' has no train examples"):
        autoverbalizer.search(model, CLASSES, train, labels, train, labels,
                              encoding(model, tcfg), 3, 2, 32, 4)


def test_two_passes_find_what_one_finds(tiny, monkeypatch):
    """A train split too large to keep [N, V] is summed batch by batch, then read again at
    the candidates' columns alone: the same candidates, scores and assignments."""
    model = tiny["gpt2"]
    tcfg = TaskConfig(template=TEMPLATE, max_input_length=32, max_target_length=4)
    train, dev = _examples(6), synthetic("synthetic_sentiment").split("validation")[:8]
    labels = autoverbalizer.labels_of(train, CLASSES, "t", "train")
    dev_labels = autoverbalizer.labels_of(dev, CLASSES, "t", "validation")

    def run():
        return autoverbalizer.search(model, CLASSES, train, labels, dev, dev_labels,
                                     encoding(model, tcfg), 4, 6, 32, 4, batch_size=5)
    one = run()
    monkeypatch.setattr(autoverbalizer, "CACHE_FLOATS", 0)
    two = run()
    assert [[w for _, w, _ in c] for c in one.candidates] == \
        [[w for _, w, _ in c] for c in two.candidates]
    np.testing.assert_allclose([s for c in one.candidates for _, _, s in c],
                               [s for c in two.candidates for _, _, s in c], rtol=1e-9)
    assert one.assignments == two.assignments and one.best == two.best
