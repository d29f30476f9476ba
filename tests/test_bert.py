"""A masked LM (BERT) through ptjax's data, verbalizers and training: a template's {mask}
is the tokenizer's mask token, label words are scored there (against transformers'
``BertForMaskedLM`` fed the same text through its own tokenizer), what does not apply to a
masked LM is one line, and `ptjax train` runs P-tuning's (P1, x, P2, [MASK], P3) from a
config file on a BERT written by transformers."""
import json
import os

import numpy as np
import pytest
import transformers

import ptjax
from conftest import torch
from ptjax import cli
from ptjax.data import templates
from ptjax.data.encoding import encode, target_prefix
from ptjax.data.tasks import Task
from ptjax.evaluation import build_dev_set, member_scores, verbalize
from ptjax.models.gpt2 import GPT2Config
from ptjax.models.model import Model
from ptjax.models.tiny import train_tokenizer

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "ptuning_bert.yaml")
VERBALIZER = (("negative", ("bad", "wonderfulness")), ("positive", ("good", "great")))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A BERT written by transformers (BertForMaskedLM.save_pretrained, safetensors) with
    the tiny WordPiece tokenizer; weights drawn wide (initializer_range 0.3) so its output
    depends on its input."""
    if torch is None:
        pytest.skip("needs PyTorch, the reference side")
    tok = train_tokenizer("bert")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, initializer_range=0.3)).eval()
    directory = str(tmp_path_factory.mktemp("bert_tm"))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.mark.torch
def test_mask_template_layout(bert_dir):
    """[CLS] P1 x P2 [MASK] x M P3 [SEP]: the text as the tokenizer writes it, the soft
    slots in their places, the target's tokens (" " + word) at the first masks."""
    model = ptjax.load_model(bert_dir)
    tok = model.tokenizer
    t = templates.parse("{soft:2} {inputs} {soft:1} it was {mask} {soft:2}")
    arrays, cut = encode(model, [{"inputs": "the movie was great", "targets": "bad"},
                                 {"inputs": "dull", "targets": "wonderfulness"}], 16, 3, (), t)
    n_word = len(tok(" wonderfulness", add_special_tokens=False)["input_ids"])
    assert cut == (n_word > 3) and arrays["input_ids"].shape == (2, 16 + 5)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]
    soft = -1
    for row, text, word in ((0, "the movie was great", "bad"), (1, "dull", "wonderfulness")):
        want = ([tok.cls_token_id, soft, soft] + ids(text) + [soft] + ids(" it was")
                + [tok.mask_token_id] * 3 + [soft, soft, tok.sep_token_id])
        n = len(want)
        got = np.where(arrays["slots"][row] >= 0, soft, arrays["input_ids"][row])
        assert got[:n].tolist() == want and arrays["input_mask"][row].tolist() == [1] * n + [0] * (
            21 - n)
        assert arrays["slots"][row][arrays["slots"][row] >= 0].tolist() == [0, 1, 2, 3, 4]
        masks = np.flatnonzero(arrays["input_ids"][row] == tok.mask_token_id)
        word_ids = ids(" " + word)[:3]
        assert arrays["targets"][row][masks[:len(word_ids)]].tolist() == word_ids
        assert np.flatnonzero(arrays["target_mask"][row]).tolist() == masks[
            :len(word_ids)].tolist()


@pytest.mark.torch
def test_verbalizer_scores_equal_transformers_at_the_masks(bert_dir):
    """Rank classification with a verbalizer: each class's score is the mean over its
    words of the mean log-probability of the word's tokens at the masks (PET's one pass:
    as many masks as the longest word, a shorter word at the first ones), as
    BertForMaskedLM computes it from the text with [MASK] tokens written in."""
    model = ptjax.load_model(bert_dir)
    tok = model.tokenizer
    M = max(len(tok(" " + w, add_special_tokens=False)["input_ids"])
            for _, words in VERBALIZER for w in words)
    assert M > 1  # a multi-token word: "wonderfulness"
    inputs = ["the movie was great", "a dull boring film", "what a lovely song"]
    task = Task("t", {"validation": [{"inputs": x, "targets": c} for x, c in
                                     zip(inputs, ["positive", "negative", "positive"])]},
                labels=("negative", "positive"))
    dev = build_dev_set(model, task, "rank", 24, M,
                        template=templates.parse("{inputs} it was {mask} ."),
                        verbalizer=VERBALIZER, word_tokens="mean")
    lp = np.asarray(member_scores(model, None, None, model.params,
                                  {k: v for k, v in dev.arrays.items()}, True))
    got = verbalize(lp, dev).reshape(len(inputs), 2)

    ref = transformers.BertForMaskedLM.from_pretrained(bert_dir).eval()
    want = np.zeros((len(inputs), 2))
    for i, x in enumerate(inputs):
        enc = tok(x + " it was " + " ".join([tok.mask_token] * M) + " .",
                  return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(ref(**enc).logits[0], -1).numpy()
        at = np.flatnonzero(enc["input_ids"][0].numpy() == tok.mask_token_id)
        for c, (_, words) in enumerate(VERBALIZER):
            scores = [np.mean([logp[at[j], t] for j, t in enumerate(
                tok(" " + w, add_special_tokens=False)["input_ids"])]) for w in words]
            want[i, c] = np.mean(scores)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.torch
def test_what_a_masked_lm_does_not_do_is_one_line(bert_dir):
    model = ptjax.load_model(bert_dir)
    ex = [{"inputs": "a film", "targets": "good"}]
    with pytest.raises(ptjax.PtjaxError, match="needs task.template with {mask}"):
        encode(model, ex, 16, 2)
    with pytest.raises(ptjax.PtjaxError, match="needs exactly one, not 0"):
        templates.check_for_model(templates.parse("{inputs} ."), model.kind)
    with pytest.raises(ptjax.PtjaxError, match="masked LM.*no left-to-right decoding"):
        model.generate(model.params, np.ones((1, 3), np.int32))
    task = Task("t", {"validation": ex})
    with pytest.raises(ptjax.PtjaxError, match="decodes left to right, which a masked LM"):
        build_dev_set(model, task, "generate", 16, 2)
    with pytest.raises(ptjax.PtjaxError, match="span-corruption sentinels.*is a masked LM"):
        target_prefix(model, True, 4)
    gpt2 = Model(config=GPT2Config(8, 8, 8, 1, 1), params=None)
    with pytest.raises(ptjax.PtjaxError, match="only BERT / RoBERTa take them"):
        gpt2.logits(None, np.ones((1, 2), np.int32), token_type_ids=np.zeros((1, 2)))


@pytest.mark.slow
@pytest.mark.torch
def test_ptjax_train_runs_ptuning_template_on_a_bert_written_by_transformers(bert_dir,
                                                                           tmp_path):
    """The issue's done-when: `ptjax train experiments/ptuning_bert.yaml` (P-tuning's
    (P1, x, P2, [MASK], P3), LSTM encoder) end to end on the transformers-written BERT:
    the loss falls, the dev set is scored, the run exports."""
    run_dir = str(tmp_path / "run")
    code = cli.main(["train", EXPERIMENT, f"run_dir={run_dir}", f"model.path={bert_dir}",
                     "train.steps=40", "train.log_every=10", "train.eval_every=20",
                     "optim.learning_rate=0.01", "train.progress=false", "task.dev_size=32"])
    assert code == 0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    assert [r["step"] for r in rows if r["split"] == "validation"] == [20, 40]
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["method"] == "ptuning"
    assert os.path.exists(os.path.join(run_dir, "export"))


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("prompt", {"task.template": "{soft:3} {inputs} it was {mask} ."}),
    ("ptuning", {"method.ptuning.encoder": "mlp", "method.ptuning.hidden": 16}),
    ("prefix", {"method.prefix.hidden": 16, "task.template": "{inputs} it was {mask} ."}),
    ("model", {"task.template": "{inputs} it was {mask} .", "optim.learning_rate": 0.001}),
    ("ptuning", {"model.path": "tiny-roberta", "task.max_target_length": 3}),
])
def test_each_method_trains_on_tiny_bert(tmp_path, method, extra):
    """Prompt tuning, P-tuning (MLP), prefix tuning and model tuning on the built-in tiny
    BERT (P-tuning on tiny-roberta too, whose label words are several tokens) with a
    {mask} template and a verbalizer: `ptjax train` runs, scores and exports."""
    args = {"run_dir": str(tmp_path / method), "model.tiny_dir": str(tmp_path / "models"),
            "model.path": "tiny-bert", "method.name": method, "task.name": "synthetic_sentiment",
            "task.template": "{soft:2} {inputs} {soft:2} {mask} {soft:2}",
            "task.verbalizer": "{negative: [bad, awful], positive: [good, great]}",
            "task.max_input_length": 24, "task.max_target_length": 1, "task.dev_size": 16,
            "train.batch_size": 8, "train.eval_batch_size": 16, "train.steps": 4,
            "train.eval_every": 4, "train.checkpoint_every": 4, "train.progress": False,
            "optim.name": "adam", "optim.learning_rate": 0.01, **extra}
    assert cli.main(["train", *[f"{k}={v}" for k, v in args.items()]]) == 0
    results = json.load(open(os.path.join(args["run_dir"], "results.json")))
    assert results["method"] == method


@pytest.mark.slow
def test_plan_compiles_a_masked_lm_without_decoding(tmp_path, capsys):
    """`ptjax plan` compiles the train and eval steps of experiments/ptuning_bert.yaml on
    tiny-bert and leaves out decoding, which a masked LM does not do."""
    assert cli.main(["plan", EXPERIMENT, f"model.tiny_dir={tmp_path / 'models'}",
                     f"run_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "eval step peak" in out and "decoding peak" not in out


def test_roberta_mask_template_layout(tmp_path):
    """tiny-roberta: <s> x it was <mask> x M </s>, " " + word's byte-level BPE tokens at the
    masks, pads of id 1 (RoBERTa's)."""
    from ptjax.models.tiny import build_tiny_model
    model = ptjax.load_model(build_tiny_model(str(tmp_path / "r"), family="roberta"))
    tok = model.tokenizer
    arrays, cut = encode(model, [{"inputs": "the movie", "targets": "good"}], 16, 3, (),
                         templates.parse("{inputs} it was {mask}"))
    assert cut == 0
    ids = tok("the movie", add_special_tokens=False)["input_ids"]
    want = ([tok.cls_token_id] + ids + tok(" it was", add_special_tokens=False)["input_ids"]
            + [tok.mask_token_id] * 3 + [tok.sep_token_id])
    assert arrays["input_ids"][0].tolist() == want + [1] * (16 - len(want))
    word = tok(" good", add_special_tokens=False)["input_ids"]
    at = len(want) - 4
    assert arrays["targets"][0, at:at + len(word)].tolist() == word
    assert arrays["target_mask"][0].sum() == len(word)
