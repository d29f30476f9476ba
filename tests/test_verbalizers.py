"""Verbalizers in training (ptjax.verbalizers): the class-level loss equals a plain loop
over classes and label words computed from the model's log-probabilities (T5 and GPT-2,
multi-token words); the soft verbalizer's class logits start as the LM head's first-token
logits, its class vectors get gradients, and runs with either pack K and resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import cli, load_run
from ptjax.config import TaskConfig
from ptjax.data import pipeline
from ptjax.data.encoding import tokenize
from ptjax.data.templates import parse
from ptjax.methods import for_model
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model
from ptjax.taskdata import encoding
from ptjax.train import loss_fn, member_class_logits
from ptjax.verbalizers import initial_class_vectors, scoring

EXAMPLES = [{"inputs": "review: the movie was great", "targets": "positive"},
            {"inputs": "review: a dull and boring film", "targets": "negative"},
            {"inputs": "review: what a lovely day", "targets": "positive"},
            {"inputs": "review: bad", "targets": "negative"}]
MULTI = (("negative", ("bad", "awful terrible")), ("positive", ("good", "very great", "fine")))
TEMPLATES = {"t5": "{inputs} it was {mask}", "t5v10": "{inputs} it was {mask}",
             "gpt2": "{inputs} it was {mask}"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-verbalizers")
    return {"t5": load_model(build_tiny_model(str(d / "t5"), "t5", extra_ids=2)),
            # T5 v1.0: the LM head is the tied embedding behind a d_model**-0.5 rescale
            "t5v10": load_model(build_tiny_model(str(d / "t5v10"), "t5", extra_ids=2,
                                                 scale_decoder_outputs=True,
                                                 tie_lm_head=True)),
            "gpt2": load_model(build_tiny_model(str(d / "gpt2"), "gpt2"))}


def _stream_batch(model, tcfg, B=4):
    enc = encoding(model, tcfg)
    stream = pipeline.TrainStream(model, {0: EXAMPLES}, 1, B, tcfg.max_input_length,
                                  tcfg.max_target_length, 0, **enc, scoring=scoring(tcfg))
    arrays, _ = stream.batch(0)
    return enc, stream.examples(0), {k: jnp.asarray(v) for k, v in arrays.items()
                                     if not k.startswith("gen_")}


def _answer_logprobs(model, prompt, input_ids, word, prefix):
    """Per token of ``word`` its log-probability after the input (and T5's sentinel), by a
    plain forward over the single sequence."""
    tok = model.tokenizer
    if model.is_encoder_decoder:
        tgt = list(prefix) + tok(word, add_special_tokens=False)["input_ids"]
        dec = np.array([[model.config.decoder_start_token_id] + tgt[:-1]])
        logp = jax.nn.log_softmax(model.logits(model.params, np.array([input_ids]),
                                               decoder_input_ids=dec, prompt=prompt))[0]
        return [float(logp[i, t]) for i, t in enumerate(tgt)][len(prefix):]
    tgt = tok(" " + word, add_special_tokens=False)["input_ids"]
    seq = np.array([list(input_ids) + tgt])
    logp = jax.nn.log_softmax(model.logits(model.params, seq, prompt=prompt))[0]
    n = len(input_ids)
    return [float(logp[n - 1 + i, t]) for i, t in enumerate(tgt)]


@pytest.mark.parametrize("family", [pytest.param("t5", marks=pytest.mark.slow), "gpt2"])
@pytest.mark.parametrize("word_tokens", [pytest.param("first", marks=pytest.mark.slow), "mean",
                                         pytest.param("max", marks=pytest.mark.slow)])
def test_class_loss_equals_a_plain_loop_over_classes_and_words(tiny, family, word_tokens):
    """task.verbalizer_loss=class: each member's loss is the mean over examples of
    -log softmax_c(class score)[gold], a class scoring the mean over its label words of
    the word's first / mean / max token log-probability after the template's {mask}."""
    model = tiny[family]
    assert any(len(model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) > 1
               for _, ws in MULTI for w in ws)
    tcfg = TaskConfig(template=TEMPLATES[family], verbalizer=MULTI, verbalizer_loss="class",
                      verbalizer_tokens=word_tokens, max_input_length=16, max_target_length=6)
    enc, examples, batch = _stream_batch(model, tcfg)
    method = for_model(model, "prompt", ["prompt.length=3", "prompt.seeds=[0,1]"])
    prompts = jax.random.normal(jax.random.key(0), (2, 3, model.config.hidden_size))
    _, per_k = loss_fn(model, method, {"prompt": prompts}, model.params, batch,
                       jax.random.key(1), 0.0, scoring=scoring(tcfg))
    agg = {"first": lambda x: x[0], "mean": np.mean, "max": np.max}[word_tokens]
    gold = {"negative": 0, "positive": 1}
    for k in range(2):
        losses = []
        for ex in examples:
            (ids, _, _), = tokenize(model, [ex], 16, 6, enc["target_prefix"],
                                             parse(TEMPLATES[family]))
            scores = np.array([np.mean([agg(_answer_logprobs(model, prompts[k], ids, w,
                                                             enc["target_prefix"]))
                                        for w in words]) for _, words in MULTI])
            logp = scores - np.log(np.sum(np.exp(scores - scores.max()))) - scores.max()
            losses.append(-logp[gold[ex["targets"]]])
        np.testing.assert_allclose(float(per_k[k]), np.mean(losses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [pytest.param("t5", marks=pytest.mark.slow),
                                    pytest.param("t5v10", marks=pytest.mark.slow), "gpt2"])
def test_soft_verbalizer_starts_as_the_first_token_logits(tiny, family):
    """At init each class vector is its label word's output embedding, so with single-token
    words the class logits are the LM head's logits of those words at the answer position
    (T5 v1.0: behind its d_model**-0.5 rescale); the class vectors get gradients."""
    model = tiny[family]
    tok = model.tokenizer
    words = (("negative", ("bad",)), ("positive", ("great",)))
    space = "" if model.is_encoder_decoder else " "
    ids = [tok(space + w, add_special_tokens=False)["input_ids"] for _, (w,) in words]
    assert all(len(i) == 1 for i in ids)
    tcfg = TaskConfig(template=TEMPLATES[family], verbalizer=words, verbalizer_kind="soft",
                      max_input_length=16, max_target_length=4)
    s = scoring(tcfg)
    enc, examples, batch = _stream_batch(model, tcfg)
    assert batch["input_ids"].shape[0] == len(examples)  # one row per example
    method = for_model(model, "prompt", ["prompt.length=3", "prompt.seeds=[0,1]"])
    prompts = jax.random.normal(jax.random.key(0), (2, 3, model.config.hidden_size))
    trainable = {"prompt": prompts, "verbalizer": jnp.asarray(
        initial_class_vectors(model, words, 2))}
    got = member_class_logits(model, method, trainable, model.params,
                              {k: v for k, v in batch.items() if k not in ("label", "word_mask")},
                              batch["word_mask"])
    for k in range(2):
        for b, ex in enumerate(examples):
            (inp, _, _), = tokenize(model, [ex], 16, 4, enc["target_prefix"],
                                             parse(TEMPLATES[family]))
            if model.is_encoder_decoder:
                dec = np.array([[model.config.decoder_start_token_id, *enc["target_prefix"]]])
                logits = model.logits(model.params, np.array([inp]), decoder_input_ids=dec,
                                      prompt=prompts[k])[0, -1]
            else:
                logits = model.logits(model.params, np.array([inp]), prompt=prompts[k])[0, -1]
            want = [float(logits[i[0]]) for i in ids]
            np.testing.assert_allclose(np.asarray(got[k, b]), want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda t: loss_fn(model, method, t, model.params, batch,
                                       jax.random.key(1), 0.0, scoring=s)[0])(trainable)
    assert (np.abs(np.asarray(grads["verbalizer"])).sum(axis=(1, 2)) > 0).all()
    assert (np.abs(np.asarray(grads["prompt"])).sum(axis=(1, 2)) > 0).all()


def _train(tmp_path, name, **kw):
    args = {"run_dir": str(tmp_path / name), "model.tiny_dir": str(tmp_path / "models"),
            "model.path": "tiny-gpt2", "prompt.seeds": "[0,1]", "prompt.length": 4,
            "task.max_input_length": 24, "task.max_target_length": 4, "task.dev_size": 32,
            "train.batch_size": 8, "train.eval_batch_size": 32, "train.steps": 6,
            "train.eval_every": 3, "train.checkpoint_every": 3, "train.progress": False,
            "optim.name": "adam", "optim.learning_rate": 0.05, "train.dropout": 0.1,
            "task.template": "{inputs} it was {mask}",
            "task.verbalizer": "{negative: [bad, awful terrible], positive: [good, great]}",
            **kw}
    code = cli.main(["train", *[f"{k}={v}" for k, v in args.items()]])
    assert code == 0
    return args["run_dir"]


def _losses(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_class_loss_trains_the_tiny_model(tmp_path):
    """A short run with the class-level loss lowers it: the first logged mean loss (steps
    1-4) is above the last one (steps 17-20), for both members."""
    run = _train(tmp_path, "class", **{"task.verbalizer_loss": "class", "train.steps": 20,
                                       "train.log_every": 4, "train.eval_every": 20,
                                       "train.checkpoint_every": 20, "train.dropout": 0.0})
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    train = {k: [r["loss"] for r in rows if r["split"] == "train" and r["prompt"] == k]
             for k in (0, 1)}
    assert all(v[-1] < v[0] for v in train.values()), train
    assert all(0 < v[0] < 2 for v in train.values())  # a CE over two classes, not token NLL


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    {"task.verbalizer_loss": "class"},
    {"task.verbalizer_kind": "soft"},
    {"task.verbalizer_kind": "soft", "model.path": "tiny-t5", "method.name": "prefix",
     "method.prefix.hidden": 16, "task.template": "{inputs} it was"},
    {"task.verbalizer_kind": "soft", "method.name": "ptuning", "method.ptuning.hidden": 8},
], ids=["class-prompt-gpt2", "soft-prompt-gpt2", "soft-prefix-t5", "soft-ptuning-gpt2"])
def test_verbalizer_runs_pack_and_resume(tmp_path, kw):
    """Two packed members end where two separate runs end (SGD: Adam's normalised steps
    would blow the packed batch's float rounding up), and a run stopped at step 3 and
    resumed ends exactly where an uninterrupted one does (the class vectors included)."""
    kw = {"optim.name": "sgd", "optim.learning_rate": 0.1, **kw}
    both = _train(tmp_path, "both", **kw)
    runs = [load_run(both)] + [load_run(_train(tmp_path, f"one{s}", **kw,
                                               **{"prompt.seeds": f"[{s}]"})) for s in (0, 1)]
    for k in range(2):
        jax.tree.map(lambda a, c: np.testing.assert_allclose(
            np.asarray(a)[k], np.asarray(c)[0], rtol=1e-5, atol=2e-5),
            runs[0].trainables, runs[1 + k].trainables)
    _train(tmp_path, "cut", **kw, **{"train.steps": 3})
    cut = load_run(_train(tmp_path, "cut", **kw))
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), np.asarray(c)),
                 cut.trainables, runs[0].trainables)
    if kw.get("task.verbalizer_kind") == "soft":
        assert cut.trainables["verbalizer"].shape == (2, 2, cut.model.config.hidden_size)
        assert os.path.exists(os.path.join(both, "export", "verbalizer.npy"))
    results = json.load(open(os.path.join(both, "results.json")))
    assert all(0 <= p["best_accuracy"] <= 100 for p in results["prompts"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["class", "soft"])
def test_model_tuning_with_a_verbalizer_trains_and_resumes(tmp_path, kind):
    kw = {"method.name": "model", "prompt.seeds": "[0]", "optim.learning_rate": 0.001,
          **({"task.verbalizer_loss": "class"} if kind == "class" else
             {"task.verbalizer_kind": "soft"})}
    full = load_run(_train(tmp_path, "full", **kw))
    _train(tmp_path, "cut", **kw, **{"train.steps": 3})
    cut = load_run(_train(tmp_path, "cut", **kw))
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), np.asarray(c)),
                 cut.trainables, full.trainables)


def test_verbalizer_settings_are_checked(tmp_path, capsys):
    for kw, message in [
        ({"task.verbalizer_loss": "class", "task.verbalizer": ""},
         "task.verbalizer_loss=class needs task.verbalizer"),
        ({"task.verbalizer_kind": "soft", "task.verbalizer": ""},
         "task.verbalizer_kind=soft needs task.verbalizer"),
        ({"task.verbalizer_loss": "words"}, "task.verbalizer_loss='words' is not valid; "
                                             "valid: first_word, class"),
        ({"task.verbalizer_kind": "soft", "method.name": "design", "prompt.seeds": "[0]",
          "task.verbalizer": "{negative: [bad], positive: [good]}"},
         "task.verbalizer_kind=soft learns class vectors"),
    ]:
        args = {"run_dir": str(tmp_path / "bad"), "model.tiny_dir": str(tmp_path / "models"),
                **kw}
        code = cli.main(["train", *[f"{k}={v}" for k, v in args.items()]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and message in err, err
