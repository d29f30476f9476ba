"""Mixed-task evaluation (``ptjax.multirun``, ``ptjax eval RUN_DIR RUN_DIR ...``): runs
of different tasks, templates, verbalizers and methods (prompt tuning, P-tuning, prefix
tuning) with different prompt lengths through one frozen model in shared batches, each
row behind its own prompt or prefix; every run's metrics equal to its own ``ptjax eval``,
every row's logits to its run's alone, on T5 and GPT-2."""
import json
import os

import numpy as np
import pytest

import ptjax
from ptjax import cli
from ptjax.errors import PtjaxError
from ptjax.evaluation import predict, verbalize
from ptjax.multirun import MultiRun, uses_slots
from ptjax.taskdata import run_dev_set

COLOURS = "[red, green, blue, yellow, black, white]"
VERBALIZER = "{negative: [bad, awful], positive: [good, great]}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


def train(tmp_path_factory, tiny_dir, name, **kw):
    run_dir = str(tmp_path_factory.mktemp(name))
    args = {"run_dir": run_dir, "model.tiny_dir": tiny_dir, "model.path": "tiny-t5",
            "prompt.length": 4, "task.max_input_length": 24, "task.max_target_length": 4,
            "task.dev_size": 12, "train.batch_size": 8, "train.eval_batch_size": 8,
            "train.steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3,
            "train.log_every": 3, "train.dropout": 0.0, "train.progress": False}
    args.update(kw)
    assert cli.main(["train", *[f"{k}={v}" for k, v in args.items()]]) == 0
    return run_dir


@pytest.fixture(scope="module")
def t5_runs(tmp_path_factory, tiny_dir):
    """Three T5 runs: prompt tuning (K = 2, P = 4) on sentiment; P-tuning (P = 3) on the
    shifted sentiment task with a verbalizer and a template that puts its vectors inside
    the input; prefix tuning (P = 5, every site) on the QA task scored by rank over its
    colours, a longer target."""
    return [
        train(tmp_path_factory, tiny_dir, "prompt", **{"prompt.seeds": "[0,1]"}),
        train(tmp_path_factory, tiny_dir, "ptuning", **{
            "method.name": "ptuning", "method.ptuning.hidden": 8, "prompt.length": 3,
            "task.name": "synthetic_sentiment_shifted",
            "task.template": "'{inputs} {soft:3} so it was {mask}'",
            "task.verbalizer": VERBALIZER}),
        train(tmp_path_factory, tiny_dir, "prefix", **{
            "method.name": "prefix", "method.prefix.hidden": 8, "prompt.length": 5,
            "task.name": "synthetic_qa", "task.labels": COLOURS, "task.eval_mode": "rank",
            "task.max_input_length": 32, "task.max_target_length": 5}),
    ]


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory, tiny_dir):
    """GPT-2: prompt tuning (P = 4) on sentiment, prefix tuning (P = 2) on QA by rank
    (absolute positions that a prefix shifts by its own length), P-tuning (P = 3) with a
    soft verbalizer (class vectors, K = 2) on the shifted sentiment task."""
    gpt2 = {"model.path": "tiny-gpt2"}
    return [
        train(tmp_path_factory, tiny_dir, "gpt2-prompt", **gpt2),
        train(tmp_path_factory, tiny_dir, "gpt2-prefix", **gpt2, **{
            "method.name": "prefix", "method.prefix.hidden": 8, "prompt.length": 2,
            "task.name": "synthetic_qa", "task.labels": COLOURS, "task.eval_mode": "rank",
            "task.max_input_length": 32}),
        train(tmp_path_factory, tiny_dir, "gpt2-soft", **gpt2, **{
            "method.name": "ptuning", "method.ptuning.hidden": 8, "prompt.length": 3,
            "prompt.seeds": "[0,1]", "task.name": "synthetic_sentiment_shifted",
            "task.verbalizer": VERBALIZER, "task.verbalizer_kind": "soft"}),
    ]


@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory, tiny_dir):
    """BERT (a masked LM: label words at its mask tokens): prompt tuning (P = 4) on
    sentiment, P-tuning (P = 3, an LSTM encoder) with P-tuning's template (P1, x, P2,
    [MASK], P3) on the shifted task, prefix tuning (P = 2) at the encoder."""
    bert = {"model.path": "tiny-bert", "task.max_target_length": 2,
            "task.verbalizer": VERBALIZER, "task.template": "'{inputs} it was {mask}'"}
    return [
        train(tmp_path_factory, tiny_dir, "bert-prompt", **bert),
        train(tmp_path_factory, tiny_dir, "bert-ptuning", **{
            **bert, "method.name": "ptuning", "method.ptuning.hidden": 8,
            "method.ptuning.encoder": "lstm", "prompt.length": 3,
            "task.name": "synthetic_sentiment_shifted",
            "task.template": "'{soft:1} {inputs} {soft:1} {mask} {soft:1}'"}),
        train(tmp_path_factory, tiny_dir, "bert-prefix", **{
            **bert, "method.name": "prefix", "method.prefix.hidden": 8,
            "prompt.length": 2}),
    ]


def alone(run_dir, tmp_path, capsys, *overrides):
    """A run's own ``ptjax eval`` metrics ({metric: [K]})."""
    out = str(tmp_path / f"{os.path.basename(run_dir)}.json")
    assert cli.main(["eval", run_dir, *overrides, "--out", out]) == 0
    capsys.readouterr()
    with open(out) as f:
        metrics = json.load(f)
    return {k: v for k, v in metrics.items() if k not in ("task", "split", "prompt_file")}


def check_equal_alone(run_dirs, tmp_path, capsys):
    multi = ptjax.load_runs(run_dirs)
    assert len({id(r.model) for r in multi.runs}) == 1  # one frozen model, loaded once
    mixed = multi.evaluate()
    for d in run_dirs:
        assert mixed[d] == alone(d, tmp_path, capsys)  # exactly
    # the scores behind them: those of each run's own forward, to fp32 rounding
    for run, dev, preds in zip(multi.runs, multi.dev_sets(), multi.predict()):
        own = predict(run.model, run.method, run.trainables, run.model.params, dev,
                      run.config.train.eval_batch_size, 4)
        np.testing.assert_allclose(preds.scores, own.scores, rtol=1e-5, atol=1e-5)
        assert preds.texts == own.texts
    return multi


def test_t5_mixed_equals_alone(t5_runs, tmp_path, capsys):
    multi = check_equal_alone(t5_runs, tmp_path, capsys)
    assert [r.method.name for r in multi.runs] == ["prompt", "ptuning", "prefix"]
    # one table row per member: 2 prompts, 1 P-tuning encoder, 1 prefix (no vectors)
    assert multi.table.embeds.shape[:2] == (4, 4)
    assert np.asarray(multi.table.embeds_mask).sum(1).tolist() == [4, 4, 3, 0]
    assert sorted(multi.table.prefix) == ["cross", "decoder", "encoder"]
    assert np.asarray(multi.table.prefix["encoder"]["mask"]).sum(1).tolist() == [0, 0, 0, 5]
    # shared batches really mix runs: the first batch holds rows of all three
    devs = multi.dev_sets()
    columns, _ = multi._pack([(e, multi._member_arrays(devs[entry.run], e))
                              for e, entry in enumerate(multi.entries)])
    assert set(columns["entry"][:8]) == {0, 1, 2, 3}
    # the P-tuning rows place their vectors by slots (shifted past the table's padding),
    # the others prepend theirs
    assert set(columns["slotted"][columns["entry"] == 2]) == {1}
    assert set(columns["slotted"][columns["entry"] != 2]) == {0}
    slots = columns["slots"][columns["entry"] == 2]
    assert sorted(set(slots[slots >= 0])) == [1, 2, 3]
    assert (columns["slots"][columns["entry"] != 2] == -1).all()


@pytest.mark.slow
def test_gpt2_mixed_equals_alone(gpt2_runs, tmp_path, capsys):
    multi = check_equal_alone(gpt2_runs, tmp_path, capsys)
    row_logits_match(multi, np.random.default_rng(1))
    # the soft verbalizer run's two members have class vectors
    assert np.asarray(multi.classes["mask"]).sum(1).tolist() == [0, 0, 2, 2]
    answers = multi.score([{"run": gpt2_runs[2], "inputs": "sentence: this red cat is good"}])
    assert answers[0]["classes"] == ["negative", "positive"]
    # greedy decoding: left-padded inputs of two widths behind prompts of two lengths
    overrides = [["task.eval_mode=generate"], ["task.labels=[]", "task.eval_mode=generate"],
                 []]
    multi = MultiRun([ptjax.load_run(d, o) for d, o in zip(gpt2_runs, overrides)])
    mixed, texts = multi.evaluate(), multi.texts()
    assert texts[2] is None  # the soft verbalizer's run is still ranked, beside them
    for d, o, run, t in zip(gpt2_runs, overrides, multi.runs, texts):
        assert mixed[d] == alone(d, tmp_path, capsys, *o)
        if t is not None:
            dev = run_dev_set(run.model, run.method, run.config)
            assert t == predict(run.model, run.method, run.trainables, run.model.params,
                                dev, 8, run.config.task.max_target_length).texts


@pytest.mark.slow
def test_bert_mixed_equals_alone(bert_runs, tmp_path, capsys):
    multi = check_equal_alone(bert_runs, tmp_path, capsys)
    assert [r.method.name for r in multi.runs] == ["prompt", "ptuning", "prefix"]
    answers = multi.score([{"run": bert_runs[0], "inputs": "sentence: this red cat is good"}])
    assert answers[0]["classes"] == ["negative", "positive"]


def row_logits_match(multi, rng):
    """Rows of every (run, member) in one batch: the mixed logits equal each run's own."""
    model = multi.model
    entries = [(e.run, e.k) for e in multi.entries
               if not uses_slots(multi.runs[e.run].method)] * 2
    B = len(entries)
    ids = rng.integers(5, 60, (B, 9))
    mask = np.ones((B, 9), np.int32)
    mask[::3, 6:] = 0  # some rows padded
    dec = rng.integers(5, 60, (B, 3)) if model.is_encoder_decoder else None
    mixed = np.asarray(multi.logits(ids, entries, attention_mask=mask,
                                    decoder_input_ids=dec))
    for b, (i, k) in enumerate(entries):
        kw = {"decoder_input_ids": dec[b:b + 1]} if dec is not None else {}
        own = multi.runs[i].logits(ids[b:b + 1], k=k, attention_mask=mask[b:b + 1], **kw)
        np.testing.assert_allclose(mixed[b:b + 1], np.asarray(own), rtol=1e-5, atol=1e-5)


def test_row_logits(t5_runs):
    multi = ptjax.load_runs(t5_runs)
    row_logits_match(multi, np.random.default_rng(0))
    with pytest.raises(PtjaxError, match="its template puts soft tokens inside the input"):
        multi.logits(np.ones((1, 4), np.int32), [(1, 0)],
                     decoder_input_ids=np.zeros((1, 2), np.int32))


def test_cli_several_runs(t5_runs, tmp_path, capsys):
    out = str(tmp_path / "mixed.json")
    assert cli.main(["eval", *t5_runs, "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    written = json.load(open(out))
    assert list(written) == t5_runs
    tasks = ["synthetic_sentiment", "synthetic_sentiment_shifted", "synthetic_qa"]
    for d, task, method in zip(t5_runs, tasks, ["prompt", "ptuning", "prefix"]):
        own = alone(d, tmp_path, capsys)
        assert {k: v for k, v in written[d].items()
                if k not in ("task", "method", "split")} == own
        assert written[d]["task"] == task and written[d]["method"] == method
        for k, v in enumerate(own["accuracy"]):
            assert f"{d} member {k}: validation accuracy {v:.2f} on task {task}" in lines


def test_score_requests(t5_runs):
    """``score``: requests of several runs (raw fields) -> each class's score and
    probability, those of the dev rows the same examples make."""
    multi = ptjax.load_runs(t5_runs)
    devs, scores = multi.dev_sets(), multi.scores()
    requests = [{"run": d, "inputs": dev.examples[j]["inputs"], "k": 0}
                for j in range(3) for d, dev in zip(t5_runs, devs)]
    requests.append({"run": "synthetic_qa", "inputs": devs[2].examples[0]["inputs"]})
    answers = multi.score(requests)
    for req, ans in zip(requests[:-1], answers):
        i = t5_runs.index(req["run"])
        dev = devs[i]
        j = [ex["inputs"] for ex in dev.examples].index(req["inputs"])
        C = len(dev.candidates[j])
        row = scores[i][0]
        if dev.verbalizer:
            row = verbalize(scores[i], dev)[0]
        np.testing.assert_allclose(ans["scores"], row[j * C:(j + 1) * C], rtol=1e-5,
                                   atol=1e-5)
        assert ans["classes"] == dev.candidates[j] and ans["run"] == req["run"]
        assert abs(sum(ans["probabilities"]) - 1) < 1e-6
        assert ans["prediction"] == dev.candidates[j][int(np.argmax(ans["scores"]))]
    assert answers[-1]["run"] == t5_runs[2] and answers[-1]["k"] == multi.runs[2].best_member
    with pytest.raises(PtjaxError, match="request 0 needs 'run' and 'inputs'"):
        multi.score([{"inputs": "x"}])
    with pytest.raises(PtjaxError, match="k=3 is not a member of this run; valid: 0..1"):
        multi.score([{"run": 0, "inputs": "x", "k": 3}])


def test_refusals(t5_runs, tmp_path, capsys):
    # a run on another model (its config is all that is read): one line naming both
    other = tmp_path / "gpt2-run"
    other.mkdir()
    text = open(os.path.join(t5_runs[0], "config.yaml")).read()
    (other / "config.yaml").write_text(text.replace("path: tiny-t5", "path: tiny-gpt2"))
    with pytest.raises(PtjaxError) as e:
        ptjax.load_runs([t5_runs[0], str(other)])
    msg = str(e.value)
    assert "\n" not in msg and t5_runs[0] in msg and str(other) in msg
    assert "different models" in msg and "tiny-t5" in msg and "tiny-gpt2" in msg
    assert cli.main(["eval", t5_runs[0], t5_runs[0]]) == 2
    assert "is given twice" in capsys.readouterr().err
    assert cli.main(["eval", t5_runs[0], t5_runs[1], "--ensemble", "majority"]) == 2
    assert "--ensemble takes one run" in capsys.readouterr().err


GENERATE = {0: ["task.eval_mode=generate"],
            2: ["task.labels=[]", "task.eval_mode=generate"]}


@pytest.mark.slow
def test_t5_generation_mixed(t5_runs, tmp_path, capsys):
    """Runs decoded greedily (prompt tuning, prefix tuning: different lengths of prompt
    and of answer) share the decoding batches; a rank run (P-tuning with a verbalizer) is
    scored beside them; each run's metrics are its own ``ptjax eval``'s."""
    runs = [ptjax.load_run(d, GENERATE.get(i, ())) for i, d in enumerate(t5_runs)]
    multi = MultiRun(runs)
    mixed = multi.evaluate()
    assert [d.mode for d in multi.dev_sets()] == ["generate", "rank", "generate"]
    for i, d in enumerate(t5_runs):
        assert mixed[d] == alone(d, tmp_path, capsys, *GENERATE.get(i, ()))
    texts = multi.texts()
    for i, run in enumerate(runs):
        if i in GENERATE:  # the answers themselves, not just their metric
            dev = run_dev_set(run.model, run.method, run.config)
            own = predict(run.model, run.method, run.trainables, run.model.params, dev, 8,
                          run.config.task.max_target_length).texts
            assert texts[i] == own


@pytest.mark.slow
def test_refuses_model_tuning_and_other_models(t5_runs, gpt2_runs, tmp_path_factory,
                                               tiny_dir, capsys):
    """Trained runs that cannot share the frozen model: model tuning (its weights are its
    own), and runs loaded separately on different models."""
    with pytest.raises(PtjaxError, match="different models"):
        MultiRun([ptjax.load_run(t5_runs[0]), ptjax.load_run(gpt2_runs[0])])
    model_run = train(tmp_path_factory, tiny_dir, "model", **{
        "method.name": "model", "optim.learning_rate": 1e-3, "train.steps": 1,
        "train.eval_every": 1, "train.checkpoint_every": 1})
    assert cli.main(["eval", t5_runs[0], model_run]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and model_run in err and "method.name=model" in err


def test_dev_set_is_evals(t5_runs):
    """The rows mixed evaluation scores are ``ptjax eval``'s dev set itself."""
    run = ptjax.load_run(t5_runs[1])
    dev = run_dev_set(run.model, run.method, run.config)
    mixed = MultiRun([run]).dev_sets()[0]
    for name, a in dev.arrays.items():
        np.testing.assert_array_equal(a, mixed.arrays[name])
