"""The paper's "span corruption + sentinel" setting (task.target_sentinel, Figure 3c): every
target, train and dev, rank candidates included, starts with T5's <extra_id_0> in token
space; greedy outputs are read without it; models without one are one-line errors."""
import os

import jax
import numpy as np
import pytest

from ptjax import cli
from ptjax.config import load_config
from ptjax.data import encoding, pipeline
from ptjax.data.tasks import Task
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, predict
from ptjax.methods import for_model
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model

EXAMPLES = [{"inputs": "review: the movie was great", "targets": "positive"},
            {"inputs": "review: a dull and boring film", "targets": "negative"},
            {"inputs": "review: what a lovely day", "targets": "positive"}]


@pytest.fixture(scope="module")
def sentinel_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("t5-sentinels")), family="t5",
                            extra_ids=3)


@pytest.fixture(scope="module")
def model(sentinel_dir):
    return load_model(sentinel_dir)


def test_sentinels_take_the_last_ids_and_decode_away(model):
    tok, V = model.tokenizer, model.config.vocab_size
    assert [tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(3)] == [V - 1, V - 2,
                                                                               V - 3]
    assert encoding.target_prefix(model, True, 4) == (V - 1,)
    assert encoding.target_prefix(model, False, 4) == ()
    ids = [V - 1] + tok("positive")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "positive"


def test_targets_start_with_the_sentinel_and_keep_their_eos(model):
    (sid,) = encoding.target_prefix(model, True, 4)
    plain, _ = encoding.encode(model, EXAMPLES, 16, 4)
    marked, _ = encoding.encode(model, EXAMPLES, 16, 4, (sid,))
    np.testing.assert_array_equal(marked["input_ids"], plain["input_ids"])
    for i in range(len(EXAMPLES)):
        p = plain["targets"][i][plain["target_mask"][i] == 1].tolist()
        m = marked["targets"][i][marked["target_mask"][i] == 1].tolist()
        assert m == [sid] + p and p[-1] == model.config.eos_token_id
    assert (marked["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()
    assert (marked["decoder_input_ids"][:, 1] == sid).all()
    # the sentinel counts towards task.max_target_length; truncation keeps it and EOS
    long = [{"inputs": "review: x", "targets": "good bad fine poor dull"}]
    (_, row, cut), = encoding.tokenize(model, long, 16, 4, (sid,))
    assert cut and len(row) == 4 and row[0] == sid and row[-1] == model.config.eos_token_id
    stream = pipeline.TrainStream(model, {0: EXAMPLES}, 1, 2, 16, 4, 0, target_prefix=(sid,))
    assert (stream.batch(0)[0]["targets"][:, 0] == sid).all()


def _logprob(model, prompt, text, target_ids):
    ids = np.asarray([model.tokenizer(text)["input_ids"]])
    dec = np.asarray([[model.config.decoder_start_token_id] + target_ids[:-1]])
    logp = jax.nn.log_softmax(model.logits(model.params, ids, decoder_input_ids=dec,
                                           prompt=prompt))[0]
    return float(sum(logp[i, t] for i, t in enumerate(target_ids)))


def test_rank_classification_scores_sentinel_plus_label(model):
    (sid,) = encoding.target_prefix(model, True, 5)
    task = Task("t", {"validation": EXAMPLES}, labels=("negative", "positive"))
    dev = build_dev_set(model, task, "auto", 16, 5, target_prefix=(sid,))
    prompts = jax.random.normal(jax.random.key(0), (1, 3, model.config.hidden_size))
    preds = predict(model, for_model(model), {"prompt": prompts}, model.params, dev,
                    batch_size=8, max_new_tokens=5)
    want = [_logprob(model, prompts[0], ex["inputs"], [sid] + model.tokenizer(lab)["input_ids"])
            for ex in EXAMPLES for lab in task.labels]
    np.testing.assert_allclose(preds.scores[0], want, rtol=1e-5, atol=1e-5)
    assert set(preds.texts[0]) <= set(task.labels)
    # a label that only fits without the sentinel is refused, naming it
    with pytest.raises(PtjaxError, match="label 'negative'.*max_target_length"):
        build_dev_set(model, task, "auto", 16, 2, target_prefix=(sid,))


def test_models_without_a_sentinel_are_one_line_errors(tmp_path):
    t5 = load_model(build_tiny_model(str(tmp_path / "t5"), family="t5", extra_ids=0))
    gpt2 = load_model(build_tiny_model(str(tmp_path / "gpt2"), family="gpt2"))
    with pytest.raises(PtjaxError, match="no <extra_id_0> token"):
        encoding.target_prefix(t5, True, 4)
    with pytest.raises(PtjaxError, match="decoder-only"):
        encoding.target_prefix(gpt2, True, 4)


def _args(run_dir, model_path, tiny_dir, **kw):
    args = {"run_dir": run_dir, "model.path": model_path, "model.tiny_dir": tiny_dir,
            "prompt.length": 4, "prompt.init": "class_label", "task.max_input_length": 24,
            "task.max_target_length": 4, "task.dev_size": 16, "task.target_sentinel": "true",
            "train.batch_size": 8, "train.eval_batch_size": 16, "train.steps": 2,
            "train.eval_every": 2, "train.checkpoint_every": 2, "train.progress": False}
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def test_train_and_eval_with_the_sentinel(sentinel_dir, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert cli.main(["train", *_args(run_dir, sentinel_dir, str(tmp_path))]) == 0
    assert load_config(os.path.join(run_dir, "config.yaml")).task.target_sentinel
    assert os.path.exists(os.path.join(run_dir, "export", "prompts.npy"))
    capsys.readouterr()
    assert cli.main(["eval", run_dir]) == 0
    assert "accuracy" in capsys.readouterr().out
    # a T5 without sentinels: one line, exit 2, nothing written
    bare = build_tiny_model(str(tmp_path / "t5-bare"), family="t5", extra_ids=0)
    bad = str(tmp_path / "bad")
    assert cli.main(["train", *_args(bad, bare, str(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no <extra_id_0> token" in err and not os.path.exists(bad)


def test_report_draws_span_corruption_plus_sentinel_as_its_own_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import pandas as pd

    from ptjax.report import figures

    rows = [{"model.path": path, "task.target_sentinel": sentinel, "task.name": task,
             "method.name": "prompt", "parameters": size, "seed": seed,
             "best": 50.0 + 10 * sentinel + 20 * ("lm-adapt" in path) + seed}
            for size, name in ((77e6, "small"), (248e6, "base"))
            for path, sentinel in ((f"google/t5-v1_1-{name}", False),
                                   (f"google/t5-v1_1-{name}", True),
                                   (f"google/t5-{name}-lm-adapt", False))
            for task in ("rte", "cb") for seed in (0, 1)]
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)  # keep the figures to read them
    written = figures(pd.DataFrame(rows), str(tmp_path), "accuracy")
    assert [os.path.basename(w) for w in written] == ["fig1_size.png", "fig3c_pretraining.png"]
    handles, labels = closed[-1].axes[0].get_legend_handles_labels()
    assert labels == ["LM adapted", "span corruption (T5 1.1)", "span corruption + sentinel"]
    # each line: the mean over seeds of the task-averaged score, at both sizes
    assert [list(h.lines[0].get_ydata()) for h in handles] == [[70.5] * 2, [50.5] * 2,
                                                               [60.5] * 2]


def test_the_built_in_tiny_t5_has_t5s_sentinels(tmp_path, capfd):
    """Issue 31: templates' {mask} and task.target_sentinel need <extra_id_0>; the built-in
    tiny T5 has T5's 100 sentinels, so they work on it as on a real T5 (train: one step,
    {mask} and the sentinel target). `ptjax tiny` prints its one line, nothing else (the
    tokenizer trainer's progress bar wrote blank lines to the terminal: capfd sees them)."""
    assert cli.main(["tiny", str(tmp_path / "t5")]) == 0
    assert capfd.readouterr().out == f"tiny t5 model written to {tmp_path / 't5'}\n"
    t5 = load_model(str(tmp_path / "t5"))
    V, tok = t5.config.vocab_size, t5.tokenizer
    assert [tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in (0, 99)] == [V - 1, V - 100]
    assert cli.main(["train", *_args(str(tmp_path / "run"), "tiny-t5", str(tmp_path / "m"),
                                     **{"task.template": "{soft:3} {inputs} it was {mask}",
                                        "train.steps": 1, "train.eval_every": 1})]) == 0


def test_a_tiny_t5_built_without_sentinels_is_not_reused_as_the_built_in(tmp_path, capsys):
    """A built-in tiny T5 written by an older ptjax (no sentinels) is named, not used."""
    old = build_tiny_model(str(tmp_path / "tiny-t5"), family="t5", extra_ids=0)
    with pytest.raises(PtjaxError, match="0 sentinel tokens, not 100.*delete the directory"):
        build_tiny_model(old, family="t5")
    assert cli.main(["train", *_args(str(tmp_path / "run"), "tiny-t5", str(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "0 sentinel tokens" in err
