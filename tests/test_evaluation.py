"""Rank classification and greedy exact match for K prompts at once, checked against a
plain loop over ``Model.logits`` / ``Model.generate`` one prompt and one label at a time."""
import jax
import numpy as np
import pytest

from ptjax.data.tasks import Task
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, evaluate, predict
from ptjax.methods import for_model
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model

EXAMPLES = [{"inputs": "review: the movie was great", "targets": "positive"},
            {"inputs": "review: a dull and boring film", "targets": "negative"},
            {"inputs": "review: what a lovely day", "targets": "positive"},
            {"inputs": "review: bad", "targets": "negative"},
            {"inputs": "review: the song was fine", "targets": "positive"}]


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def model(request, tmp_path_factory):
    return load_model(build_tiny_model(str(tmp_path_factory.mktemp(request.param)),
                                       family=request.param))


def _prompts(model, K=2, P=3):
    return jax.random.normal(jax.random.PRNGKey(0), (K, P, model.config.hidden_size))


def _padded(ids, length):
    """[1, length] ids and mask, right-padded (one shape: one compilation)."""
    out, mask = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
    out[0, :len(ids)], mask[0, :len(ids)] = ids, 1
    return out, mask


def _label_logprob(model, prompt, text, label):
    tok = model.tokenizer
    if model.is_encoder_decoder:
        ids, mask = _padded(tok(text)["input_ids"], 16)
        tgt = tok(label)["input_ids"]
        dec, _ = _padded([model.config.decoder_start_token_id] + tgt[:-1], 4)
        logp = jax.nn.log_softmax(model.logits(model.params, ids, attention_mask=mask,
                                               decoder_input_ids=dec, prompt=prompt))[0]
        return float(sum(logp[i, t] for i, t in enumerate(tgt)))
    inp = tok(text)["input_ids"]
    tgt = tok(" " + label)["input_ids"] + [model.config.eos_token_id]
    seq, mask = _padded(inp + tgt, 20)
    logp = jax.nn.log_softmax(model.logits(model.params, seq, attention_mask=mask,
                                           prompt=prompt))[0]
    return float(sum(logp[len(inp) - 1 + i, t] for i, t in enumerate(tgt)))


def test_rank_classification_matches_a_plain_loop(model):
    task = Task("t", {"validation": EXAMPLES}, labels=("negative", "positive"))
    dev = build_dev_set(model, task, "auto", 16, 4)
    prompts = _prompts(model)
    got = evaluate(model, for_model(model), {"prompt": prompts}, model.params, dev,
                   batch_size=4, max_new_tokens=4)
    want = []
    for k in range(2):
        preds = [int(np.argmax([_label_logprob(model, prompts[k], ex["inputs"], lab)
                                for lab in task.labels])) for ex in EXAMPLES]
        gold = [task.labels.index(ex["targets"]) for ex in EXAMPLES]
        want.append(100.0 * np.mean(np.asarray(preds) == gold))
    assert got == {"accuracy": want}


def test_exact_match_matches_a_plain_loop(model):
    tok = model.tokenizer
    prompts = _prompts(model)
    # targets: what the model decodes behind prompt 1 for the first two examples (all
    # five in one batch with a shared [P, D] prompt), so EM is not 0
    tok.padding_side = "right" if model.is_encoder_decoder else "left"
    batch = tok([ex["inputs"] for ex in EXAMPLES], padding=True, return_tensors="np")
    out = model.generate(model.params, batch["input_ids"], attention_mask=batch["attention_mask"],
                         prompt=prompts[1], max_new_tokens=4)
    outs = [o.strip() for o in tok.batch_decode(np.asarray(out), skip_special_tokens=True)]
    examples = [{**ex, "targets": outs[i] if i < 2 else "no such output"}
                for i, ex in enumerate(EXAMPLES)]
    dev = build_dev_set(model, Task("t", {"validation": examples}), "auto", 16, 4)
    got = evaluate(model, for_model(model), {"prompt": prompts}, model.params, dev,
                   batch_size=2, max_new_tokens=4)
    assert got["exact_match"][1] == pytest.approx(40.0)
    assert len(got["exact_match"]) == 2


def test_ensemble_votes_and_mean_log_probability():
    """Hand-worked: 3 prompts, 2 examples with candidates (a, b) and (x, y, z)."""
    from ptjax.evaluation import DevSet, Predictions, ensemble, ensemble_table

    examples = [{"inputs": "1", "targets": "a"}, {"inputs": "2", "targets": "z"}]
    dev = DevSet("rank", "accuracy", examples, {}, [["a", "b"], ["x", "y", "z"]])
    scores = np.array([[-1.0, -2.0, -1.0, -5.0, -3.0],    # prompt 0: a, x
                       [-3.0, -0.5, -4.0, -0.1, -9.0],    # prompt 1: b, y
                       [-1.5, -1.0, -2.0, -3.0, -1.0]])   # prompt 2: b, z
    preds = Predictions([["a", "x"], ["b", "y"], ["b", "z"]], scores)
    # example 0: b wins 2-1; example 1: a three-way tie broken by mean log-likelihood
    # (x: -7/3, y: -8.1/3, z: -13/3) -> x
    assert ensemble(dev, preds, "majority") == ["b", "x"]
    # mean log-likelihood: a -5.5/3 vs b -3.5/3 -> b; x -> x
    assert ensemble(dev, preds, "mean_logprob") == ["b", "x"]
    table = ensemble_table(dev, preds)
    assert table["prompts"]["accuracy"] == [50.0, 0.0, 50.0]
    assert table["average"]["accuracy"] == pytest.approx(100 / 3)
    assert table["best"]["accuracy"] == 50.0 and table["ensemble"]["accuracy"] == 0.0
    generated = Predictions([["a", "q"], ["b", "r"], ["c", "q"]])
    assert ensemble(dev, generated, "majority") == ["a", "q"]  # tie -> the first prompt's
    with pytest.raises(PtjaxError, match="mean_logprob needs rank classification"):
        ensemble(dev, generated, "mean_logprob")


def test_weighted_ensemble_by_hand():
    """PET's weighted fusion on the hand-worked case above: votes and log-likelihoods
    weighted per prompt."""
    from ptjax.evaluation import DevSet, Predictions, ensemble, ensemble_table

    examples = [{"inputs": "1", "targets": "a"}, {"inputs": "2", "targets": "z"}]
    dev = DevSet("rank", "accuracy", examples, {}, [["a", "b"], ["x", "y", "z"]])
    scores = np.array([[-1.0, -2.0, -1.0, -5.0, -3.0],
                       [-3.0, -0.5, -4.0, -0.1, -9.0],
                       [-1.5, -1.0, -2.0, -3.0, -1.0]])
    preds = Predictions([["a", "x"], ["b", "y"], ["b", "z"]], scores)
    # one prompt alone decides, by votes and by log-likelihood
    assert ensemble(dev, preds, "majority", [1, 0, 0]) == ["a", "x"]
    assert ensemble(dev, preds, "mean_logprob", [0, 0, 1]) == ["b", "z"]
    # votes 3 : 1 + 1: prompt 0's a beats the two b's; x, y, z 3 : 1 : 1 -> x
    assert ensemble(dev, preds, "majority", [3, 1, 1]) == ["a", "x"]
    # weighted log-likelihoods (4, 1, 1): a (-4 - 3 - 1.5) / 6 = -1.417 beats
    # b (-8 - 0.5 - 1) / 6 = -1.583; x -10/6, y -23.1/6, z -22/6 -> x
    assert ensemble(dev, preds, "mean_logprob", [4, 1, 1]) == ["a", "x"]
    table = ensemble_table(dev, preds, "majority", [3, 1, 1])
    assert table["weights"] == [3.0, 1.0, 1.0] and table["ensemble"]["accuracy"] == 50.0
    assert ensemble_table(dev, preds)["weights"] is None
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(PtjaxError, match="give 3 .one per prompt., none negative"):
            ensemble(dev, preds, "majority", bad)


def _word_token_logprobs(model, prompt, text, word):
    """The log-probability of each of the word's own tokens (no EOS), by a plain loop."""
    tok = model.tokenizer
    if model.is_encoder_decoder:
        ids, mask = _padded(tok(text)["input_ids"], 16)
        tgt = tok(word)["input_ids"]  # word pieces + EOS
        dec, _ = _padded([model.config.decoder_start_token_id] + tgt[:-1], 6)
        logp = jax.nn.log_softmax(model.logits(model.params, ids, attention_mask=mask,
                                               decoder_input_ids=dec, prompt=prompt))[0]
        return [float(logp[i, t]) for i, t in enumerate(tgt[:-1])]
    inp = tok(text)["input_ids"]
    tgt = tok(" " + word)["input_ids"]
    seq, mask = _padded(inp + tgt + [model.config.eos_token_id], 24)
    logp = jax.nn.log_softmax(model.logits(model.params, seq, attention_mask=mask,
                                           prompt=prompt))[0]
    return [float(logp[len(inp) - 1 + i, t]) for i, t in enumerate(tgt)]


@pytest.mark.parametrize("word_tokens", ["first", "mean", "max"])
def test_verbalizer_scores_equal_a_plain_loop_over_label_words(model, word_tokens):
    """Class score = mean over the class's label words of the word's score (its first
    token's log-probability, the mean or the max of its tokens'); single- and multi-token
    words; the prediction is the best class."""
    verbalizer = (("negative", ("bad", "awful terrible")), ("positive", ("good", "very great",
                                                                        "fine")))
    assert any(len(model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) > 1
               for _, ws in verbalizer for w in ws)
    task = Task("t", {"validation": EXAMPLES}, labels=("negative", "positive"))
    dev = build_dev_set(model, task, "auto", 16, 6, verbalizer=verbalizer,
                        word_tokens=word_tokens)
    prompts = _prompts(model)
    preds = predict(model, for_model(model), {"prompt": prompts}, model.params, dev,
                    batch_size=8, max_new_tokens=4)
    agg = {"first": lambda x: x[0], "mean": np.mean, "max": np.max}[word_tokens]
    for k in range(2):
        want, labels = [], []
        for ex in EXAMPLES:
            classes = [np.mean([agg(_word_token_logprobs(model, prompts[k], ex["inputs"], w))
                                for w in words]) for _, words in verbalizer]
            want += classes
            labels.append(verbalizer[int(np.argmax(classes))][0])
        np.testing.assert_allclose(preds.scores[k], want, rtol=1e-5, atol=1e-5)
        assert preds.texts[k] == labels
