"""Automatic templates (ptjax.autotemplate, ``ptjax template``): the joint beam search
over the train examples equals the paper's objective maximised by brute force (every
output of a small vocabulary enumerated, each example's log-probabilities summed by a
plain loop of full forwards), and on one example it equals transformers' beam search; the
fills become templates as the shape says; each template's dev accuracy equals rank
classification by a plain loop; the command's JSON and its overrides train in a later
run; bad input is one line."""
import itertools
import json
import math
import os

import numpy as np
import pytest

from ptjax import autotemplate, cli
from ptjax.config import TaskConfig, load_config
from ptjax.data.encoding import tokenize
from ptjax.data.tasks import synthetic
from ptjax.data.templates import parse
from ptjax.errors import PtjaxError
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model

CLASSES = ("negative", "positive")
WORDS = ["bad", "good"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The built-in tiny T5 (100 sentinels), in a model.tiny_dir the command reuses."""
    d = tmp_path_factory.mktemp("tiny-autotemplate")
    return {"t5": load_model(build_tiny_model(str(d / "tiny-t5"), "t5")), "dir": str(d)}


def _examples(n_per_class):
    train = synthetic("synthetic_sentiment").split("train")
    out = []
    for c in CLASSES:
        out += [ex for ex in train if ex["targets"] == c][:n_per_class]
    return out, np.array([CLASSES.index(ex["targets"]) for ex in out])


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - (x.max(-1, keepdims=True) +
                np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))


def _plain_logprobs(model, input_ids, outputs, width=8):
    """log P_T5(output | input) of one example for each output, float64: one full forward
    of the decoder over [start, <extra_id_0>, output[:-1]] (right-padded to ``width``,
    which a causal decoder never reads back), no cache, the input unpadded."""
    s0 = model.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    dec = np.zeros((len(outputs), width), np.int32)
    for r, o in enumerate(outputs):
        row = [model.config.decoder_start_token_id, s0] + list(o[:-1])
        dec[r, :len(row)] = row
    logits = model.logits(model.params, np.array([input_ids] * len(outputs)),
                          decoder_input_ids=dec)
    lp = _log_softmax(logits)[:, 1:]  # position 1 (after <extra_id_0>) predicts output[0]
    return np.array([sum(lp[r, j, t] for j, t in enumerate(o)) for r, o in enumerate(outputs)])


def test_joint_beam_equals_the_papers_objective_by_brute_force(tiny):
    """With a beam as wide as the outputs, the search returns every output T (fills over
    three tokens, sentinels in order, at most 4 tokens, ending with <extra_id_2>) ranked by
    sum over examples of log P_T5(T | T_g(x, y)), each term by a plain forward."""
    model = tiny["t5"]
    shape = "{inputs} {fill} {mask} {fill}"
    train, labels = _examples(2)
    ids, mask = autotemplate.generation_inputs(model, shape, train, labels, WORDS, 32)
    rows = [list(r[m]) for r, m in zip(ids, mask)]
    s = [model.tokenizer.convert_tokens_to_ids(f"<extra_id_{j}>") for j in range(3)]
    words = [model.tokenizer.convert_tokens_to_ids(w) for w in ("▁the", "▁was", "▁a")]
    T = 4
    outputs = []
    for n0 in range(T - 1):
        for n1 in range(T - 1 - n0):
            for a in itertools.product(words, repeat=n0):
                for b in itertools.product(words, repeat=n1):
                    outputs.append(list(a) + [s[1]] + list(b) + [s[2]])
    assert len(outputs) == 1 + 2 * 3 + 3 * 9  # 34
    total = sum(_plain_logprobs(model, r, outputs) for r in rows)
    want = sorted(zip(outputs, total), key=lambda x: -x[1])
    allowed = np.zeros(model.config.vocab_size, bool)
    allowed[words] = True
    got = autotemplate.joint_beam_search(model, ids, mask, 2, beam=40, max_new_tokens=T,
                                         allowed=allowed)
    assert [o for o, _ in got] == [o for o, _ in want]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-5)


@pytest.mark.slow
def test_joint_beam_of_width_one_is_greedy_on_the_summed_logprobs(tiny):
    """Beam 1: at each step the token of highest summed log-probability (a plain loop over
    the ordinary tokens), the last sentinel forced when it needs the last place."""
    model = tiny["t5"]
    shape = "{fill} {mask} {inputs}"
    train, labels = _examples(2)
    ids, mask = autotemplate.generation_inputs(model, shape, train, labels, WORDS, 32)
    rows = [list(r[m]) for r, m in zip(ids, mask)]
    s1 = model.tokenizer.convert_tokens_to_ids("<extra_id_1>")
    ok = autotemplate.ordinary_tokens(model)
    ok[s1] = True
    T, out = 5, []
    s0 = model.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    for i in range(T):
        total = 0.0
        dec = np.zeros((1, T + 2), np.int32)
        dec[0, :i + 2] = [model.config.decoder_start_token_id, s0] + out
        for r in rows:  # the decoder right-padded: position i + 1 reads only what is before
            total = total + _log_softmax(model.logits(
                model.params, np.array([r]), decoder_input_ids=dec)[0, i + 1])
        choice = s1 if i == T - 1 else int(np.argmax(np.where(ok, total, -np.inf)))
        out.append(choice)
        if choice == s1:
            break
    (got, score), = autotemplate.joint_beam_search(model, ids, mask, 1, 1, T)
    assert got == out
    assert score == pytest.approx(sum(_plain_logprobs(model, r, [out])[0] for r in rows),
                                  rel=1e-5)


@pytest.mark.torch
def test_one_example_equals_transformers_beam_search(tiny):
    """On one example the joint search is transformers' beam search (no length penalty)
    from [start, <extra_id_0>], EOS <extra_id_1>, the other special tokens banned and
    <extra_id_1> forced at the last place with its own log-probability."""
    torch = pytest.importorskip("torch")
    import transformers
    model = tiny["t5"]
    ref = transformers.T5ForConditionalGeneration.from_pretrained(
        os.path.join(tiny["dir"], "tiny-t5")).eval()
    shape = "{inputs} {fill} {mask}"
    train, labels = _examples(1)
    ids, mask = autotemplate.generation_inputs(model, shape, train[:1], labels[:1], WORDS, 32)
    s0, s1 = (model.tokenizer.convert_tokens_to_ids(f"<extra_id_{j}>") for j in (0, 1))
    ok = autotemplate.ordinary_tokens(model)
    T, N = 6, 4

    class LastIsEos(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - 2 == T - 1:
                keep = scores[:, s1].clone()
                scores = torch.full_like(scores, -math.inf)
                scores[:, s1] = keep
            return scores

    banned = [[i] for i in range(model.config.vocab_size) if not ok[i] and i != s1]
    with torch.no_grad():
        out = ref.generate(torch.tensor(ids[:, :mask.sum()]),
                           decoder_input_ids=torch.tensor([[0, s0]]), num_beams=N,
                           num_return_sequences=N, length_penalty=0.0, max_new_tokens=T,
                           eos_token_id=s1, pad_token_id=0, bad_words_ids=banned,
                           logits_processor=transformers.LogitsProcessorList([LastIsEos()]),
                           do_sample=False, return_dict_in_generate=True, output_scores=True)
    want = []
    for row in out.sequences.numpy()[:, 2:]:
        want.append([int(t) for t in row[:list(row).index(s1) + 1]])
    got = autotemplate.joint_beam_search(model, ids, mask, 1, N, T)
    assert [o for o, _ in got] == want
    np.testing.assert_allclose([x for _, x in got], out.sequences_scores.numpy(), rtol=1e-5)


def test_fills_become_the_shapes_template(tiny):
    """T_g puts the label word at {mask} and the sentinels at the fills; the template puts
    each fill's text at its place (braces kept literal) and reads back as text, fields and
    {mask}."""
    model = tiny["t5"]
    shape = "{inputs} {fill} {mask} {fill}"
    assert autotemplate.generation_template(shape, "g{o}od") == \
        "{inputs} <extra_id_0> g{{o}}od <extra_id_1>"
    t = autotemplate.to_template(shape, ["it was", "{x} ."])
    assert t == "{inputs} it was {mask} {{x}} ."
    kinds = [(p.kind, p.text or p.name) for p in parse(t).pieces]
    assert kinds == [("field", "inputs"), ("text", "it was"), ("mask", ""), ("text", "{x} .")]
    assert autotemplate.to_template("{fill} {mask} {fill} {inputs}", ["", "x"]) == \
        "{mask} x {inputs}"
    train, labels = _examples(1)
    ids, mask = autotemplate.generation_inputs(model, shape, train, labels, WORDS, 32)
    for r, ex, w in zip(range(2), train, WORDS):
        text = model.tokenizer.decode(ids[r][mask[r]], skip_special_tokens=False)
        want = model.tokenizer.decode(model.tokenizer(
            f"{ex['inputs']} <extra_id_0> {w} <extra_id_1>")["input_ids"])  # with </s>
        assert " ".join(text.split()) == " ".join(want.split())
    s = [model.tokenizer.convert_tokens_to_ids(f"<extra_id_{j}>") for j in range(3)]
    assert autotemplate.split_fills([7, 8, s[1], s[2]], s) == [[7, 8], []]


def test_dev_accuracy_is_rank_classification_by_a_plain_loop(tiny):
    """Each template's dev accuracy: per dev example, the class whose label word is most
    likely right after <extra_id_0> (a plain forward per example and class; ties: the first
    class); the templates come ranked by it."""
    model = tiny["t5"]
    task = synthetic("synthetic_sentiment")
    dev = task.split("validation")[:12]
    small = type(task)(task.name, {"validation": dev, "train": task.split("train")},
                       task.labels)
    tcfg = TaskConfig(verbalizer=(("negative", ("bad",)), ("positive", ("good",))),
                      max_input_length=32, max_target_length=4)
    train, labels = _examples(3)
    found = autotemplate.search(model, tcfg, small, CLASSES, train, labels,
                                ["{fill} {mask} {inputs}"], 6, 4)
    word_ids = []
    for w in WORDS:
        (i,) = model.tokenizer(w, add_special_tokens=False)["input_ids"]
        word_ids.append(i)
    s0 = model.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    accs = []
    for row in found.templates:
        t = parse(row["template"])
        correct = 0
        for ex in dev:
            (ids, _, _), = tokenize(model, [ex], 32, 4, (s0,), t)
            padded, mask = np.zeros((1, 32), np.int32), np.zeros((1, 32), np.int32)
            padded[0, :len(ids)], mask[0, :len(ids)] = ids, 1
            lp = _log_softmax(model.logits(model.params, padded, attention_mask=mask,
                                           decoder_input_ids=np.array([[0, s0]]))[0, -1])
            scores = [lp[i] for i in word_ids]
            correct += CLASSES[int(np.argmax(scores))] == ex["targets"]
        accs.append(100 * correct / len(dev))
        assert row["dev"]["accuracy"] == pytest.approx(accs[-1])
    assert len(found.templates) >= 4 and len(set(accs)) > 1 and accs == sorted(accs, reverse=True)
    assert found.best == found.templates[0]["template"] and found.metric == "accuracy"


def test_overrides_read_back():
    for t in ["{inputs} it was {mask}", "{mask}: {inputs}", "{inputs} 'a' {mask} #1"]:
        o = autotemplate.overrides(t, [t, "{inputs} {mask} x"])
        assert load_config(None, [o["template"]]).task.template == t
        cfg = load_config(None, o["templates"])
        assert cfg.task.templates == (t, "{inputs} {mask} x") and cfg.prompt.seeds == (0, 1)


def _common(tiny):
    return [f"model.tiny_dir={tiny['dir']}", "model.path=tiny-t5",
            "task.name=synthetic_sentiment", "task.verbalizer={negative: [bad], positive: [good]}",
            "task.max_input_length=32", "task.max_target_length=4", "task.dev_size=16",
            "train.eval_batch_size=16"]


@pytest.mark.slow
def test_command_writes_json_and_its_templates_train(tiny, tmp_path, capsys):
    """`ptjax template` on the tiny T5: the JSON has the method, every template with its
    scores, the best and the top K; the printed override trains in a later `ptjax train`,
    and so do the top K as task.templates in one batch."""
    common = _common(tiny)
    out = tmp_path / "templates.json"
    assert cli.main(["template", *common, f"run_dir={tmp_path / 'search'}", "--beam", "3",
                     "--per-class", "4", "--max-tokens", "5", "--top", "2",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    found = json.loads(out.read_text())
    assert found["method"] == autotemplate.METHOD and found["train_examples"] == 8
    assert found["shapes"] == list(autotemplate.SHAPES) and found["metric"] == "accuracy"
    assert len(found["templates"]) > 3
    for r in found["templates"]:
        assert {"template", "shape", "fills", "score", "mean_score", "dev"} <= set(r)
        assert "{mask}" in r["template"] and "{inputs}" in r["template"]
    dev = [r["dev"]["accuracy"] for r in found["templates"]]
    assert dev == sorted(dev, reverse=True)
    assert found["template"] == found["templates"][0]["template"]
    assert found["top"] == [r["template"] for r in found["templates"][:2]]
    assert printed[-1] == found["overrides"]["template"]
    run = tmp_path / "run"
    assert cli.main(["train", *common, printed[-1], f"run_dir={run}", "prompt.length=2",
                     "train.steps=2", "train.eval_every=2", "train.batch_size=8",
                     "--no-progress"]) == 0
    assert load_config(str(run / "config.yaml")).task.template == found["template"]
    run2 = tmp_path / "run-k"
    assert cli.main(["train", *common, *found["overrides"]["templates"], f"run_dir={run2}",
                     "prompt.length=2", "train.steps=2", "train.eval_every=2",
                     "train.batch_size=8", "train.ensemble=mean_logprob", "--no-progress"]) == 0
    saved = load_config(str(run2 / "config.yaml"))
    assert saved.task.templates == tuple(found["top"])
    results = json.loads((run2 / "results.json").read_text())
    assert results["ensemble"]["method"] == "mean_logprob"
    assert len(results["ensemble"]["prompts"]["accuracy"]) == 2


@pytest.mark.parametrize("args, message", [
    (["model.path=tiny-gpt2"], "fills spans with T5's sentinels"),
    (["task.name=synthetic_qa"], "has no labels"),
    (["--beam", "0"], "--beam 0: must be at least 1"),
    (["--top", "0"], "--top 0: must be at least 1"),
    (["--per-class", "0"], "--per-class 0"),
    (["--shape", "{inputs} it was {mask}"], "has no {fill}"),
    (["--shape", "{inputs} {fill} it was"], "has no {mask}"),
    (["--shape", "{inputs} {soft:2} {fill} {mask}"], "has soft slots"),
    (["--shape", "{fill} {mask}"], "has no field of the example"),
    (["--shape", "{inputs} {fill} {mask} {fill}", "--max-tokens", "1"],
     "--max-tokens 1: a shape with 2 fills"),
    (['task.templates=["{inputs} {mask}"]', "prompt.seeds=[0]"], "unset task.mixture"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    model = "model.path=tiny-gpt2" if "model.path=tiny-gpt2" in args else "model.path=tiny-t5"
    assert cli.main(["template", f"model.tiny_dir={tmp_path}", model,
                     "task.name=synthetic_sentiment", f"run_dir={tmp_path / 'r'}",
                     *[a for a in args if a != model]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not any(os.path.exists(tmp_path / m) for m in ("tiny-t5", "tiny-gpt2"))  # not built


def test_a_t5_without_sentinels_is_one_line(tmp_path, capsys):
    d = build_tiny_model(str(tmp_path / "t5-plain"), "t5", extra_ids=0)
    assert cli.main(["template", f"model.path={d}", "task.name=synthetic_sentiment",
                     f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "has no <extra_id_0> token" in err and err.count("\n") == 1, err


def test_a_class_without_train_examples_is_one_line(tiny):
    model = tiny["t5"]
    train, labels = _examples(2)
    with pytest.raises(PtjaxError, match="class 'positive' has no train examples"):
        autotemplate.search(model, TaskConfig(), synthetic("synthetic_sentiment"), CLASSES,
                            train[:2], labels[:2], autotemplate.SHAPES, 2, 4)


def test_a_masked_lm_is_one_line_naming_it(tmp_path, capsys):
    """A BERT written to a directory (not a built-in name) is refused once loaded, saying
    what it is: its {mask} is its own token, there are no spans to fill."""
    d = build_tiny_model(str(tmp_path / "bert"), "bert")
    assert cli.main(["template", f"model.path={d}", "task.name=synthetic_sentiment",
                     f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "this is a masked LM" in err and err.count("\n") == 1, err
