"""Pre-training: T5's objectives against their definitions (t5.data.preprocessors), the
corpus and its tokenizer, and `ptjax pretrain` end to end (exact resume, a Hugging Face
checkpoint that ptjax and transformers load with equal logits)."""
import collections
import json
import os
import shutil

import numpy as np
import pytest
from conftest import torch

from ptjax import cli, objectives
from ptjax.errors import PtjaxError
from ptjax.objectives import (noise_counts, prefix_lm, random_spans_helper,
                              random_spans_noise_mask, span_corruption)

SENTINELS = np.arange(999, 899, -1)  # <extra_id_i> = 999 - i: the vocabulary's last ids
EOS = 1


def spans(mask):
    """[(is_noise, length)] runs of a boolean mask."""
    out = []
    for m in mask:
        if out and out[-1][0] == m:
            out[-1][1] += 1
        else:
            out.append([bool(m), 1])
    return [tuple(x) for x in out]


@pytest.mark.parametrize("length", [2, 3, 10, 20, 33, 100, 141, 568])
def test_noise_mask_follows_t5s_counts(length):
    """round(length * 0.15) noise tokens in round(noise / 3) spans (at least one of each,
    at least one clean token), alternating, non-noise first, so the mask ends in noise."""
    num_noise, num_spans = noise_counts(length, 0.15, 3.0)
    assert num_noise == min(max(int(np.round(np.float32(length) * np.float32(0.15))), 1),
                            length - 1)
    assert num_spans == max(int(np.round(num_noise / 3.0)), 1)
    for seed in range(20):
        mask = random_spans_noise_mask(length, 0.15, np.random.default_rng(seed))
        runs = spans(mask)
        assert mask.sum() == num_noise
        assert [r[0] for r in runs] == [False, True] * num_spans
        assert sum(n for noise, n in runs if noise) == num_noise


def test_t5s_documented_numbers():
    """T5's own figures: 512 input tokens take 568 raw tokens and 114 target tokens; 568
    tokens hold 85 noise tokens in 28 spans; tf.round's float32 ties go to even."""
    assert random_spans_helper(512, 0.15, 3.0) == (568, 114)
    assert noise_counts(568, 0.15, 3.0) == (85, 28)
    assert noise_counts(30, 0.15, 3.0) == (4, 1)  # 4.5 -> 4 (ties to even)
    assert noise_counts(50, 0.15, 3.0) == (8, 3)  # 7.5 -> 8


def test_span_lengths_average_the_mean_and_partitions_are_uniform():
    lengths = []
    for seed in range(200):
        mask = random_spans_noise_mask(568, 0.15, np.random.default_rng(seed))
        lengths += [n for noise, n in spans(mask) if noise]
    assert np.mean(lengths) == pytest.approx(85 / 28)
    assert max(lengths) > 3 and min(lengths) == 1  # random lengths, not fixed ones
    # "all masks equally likely": 5 noise tokens in 2 spans -> 4 splits, each ~1/4
    counts = collections.Counter(
        tuple(n for noise, n in spans(random_spans_noise_mask(
            33, 0.15, np.random.default_rng(s), 2.5)) if noise) for s in range(4000))
    assert sorted(counts) == [(1, 4), (2, 3), (3, 2), (4, 1)]
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())


def reconstruct(inputs, targets):
    """The original tokens from span-corrupted inputs and targets (EOS dropped)."""
    pieces, key = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            key = t
            pieces[key] = []
        else:
            pieces[key].append(t)
    out = []
    for t in inputs[:-1]:
        out += pieces[t] if t in SENTINELS else [t]
    return out


@pytest.mark.parametrize("length", [10, 37, 141, 568])
def test_span_corruption_inputs_and_targets(length):
    tokens = np.random.default_rng(length).integers(3, 800, length)
    inputs, targets = span_corruption(tokens, np.random.default_rng(0), SENTINELS, EOS)
    num_noise, num_spans = noise_counts(length, 0.15, 3.0)
    assert inputs[-1] == EOS and targets[-1] == EOS
    in_sent = [t for t in inputs if t in SENTINELS]
    out_sent = [t for t in targets if t in SENTINELS]
    # one sentinel per span, in order <extra_id_0>, <extra_id_1>, ...: descending ids
    assert in_sent == out_sent == list(SENTINELS[:num_spans])
    assert targets[0] == SENTINELS[0]  # targets start with <extra_id_0>
    assert inputs[-2] in SENTINELS  # the sequence ends in noise
    assert len(inputs) == length - num_noise + num_spans + 1
    assert len(targets) == num_noise + num_spans + 1
    assert reconstruct(list(inputs), list(targets)) == list(tokens)


def test_span_corruption_fills_the_configured_lengths():
    raw, target_length = random_spans_helper(64)
    inputs, targets = span_corruption(np.arange(3, 3 + raw), np.random.default_rng(1),
                                      SENTINELS, EOS)
    assert len(inputs) <= 64 and len(inputs) >= 63 and len(targets) == target_length


def test_objectives_are_deterministic_in_their_seed():
    tokens = np.arange(10, 150)
    a = span_corruption(tokens, np.random.default_rng([0, 5, 1]), SENTINELS, EOS)
    b = span_corruption(tokens, np.random.default_rng([0, 5, 1]), SENTINELS, EOS)
    c = span_corruption(tokens, np.random.default_rng([0, 5, 2]), SENTINELS, EOS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    p = [prefix_lm(tokens, np.random.default_rng([3, s]), EOS) for s in (1, 1, 2, 3)]
    assert np.array_equal(p[0][0], p[1][0])
    assert len({len(x[0]) for x in p}) > 1


def test_prefix_lm_splits_uniformly_and_keeps_every_token():
    tokens = np.arange(10, 16)  # 6 tokens: the prefix is 1..5 tokens, each equally likely
    seen = collections.Counter()
    for s in range(3000):
        inputs, targets = prefix_lm(tokens, np.random.default_rng(s), EOS)
        assert inputs[-1] == EOS and targets[-1] == EOS
        assert list(inputs[:-1]) + list(targets[:-1]) == list(tokens)
        seen[len(inputs) - 1] += 1
    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert all(abs(c / 3000 - 0.2) < 0.03 for c in seen.values())
    with pytest.raises(PtjaxError, match="at least 2 tokens"):
        prefix_lm([5], np.random.default_rng(0), EOS)


def test_too_many_spans_for_the_sentinels_is_an_error():
    with pytest.raises(PtjaxError, match="sentinels"):
        span_corruption(np.arange(3, 400), np.random.default_rng(0), SENTINELS[:3], EOS)


# ---------------------------------------------------------------- corpus and tokenizer


def test_corpus_is_real_text_split_stably():
    from ptjax.data.corpus import load_corpus

    corpus = load_corpus("shakespeare")
    assert corpus.size("train") > 4_000_000 and corpus.size("validation") > 100_000
    assert "public domain" in corpus.license
    keys = lambda docs: {(d.title, d.section) for d in docs}  # noqa: E731
    assert not keys(corpus.train) & keys(corpus.validation)
    assert len({d.title for d in corpus.train}) == 38
    hamlet = next(d for d in corpus.train if d.title == "Hamlet")
    assert hamlet.paragraphs[1] == "BERNARDO: Who's there?"
    again = load_corpus("shakespeare")
    assert again.validation == corpus.validation
    with pytest.raises(PtjaxError, match="valid: shakespeare"):
        load_corpus("wiki")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pretrain-tokenizers"))


def small(**kw):
    """A pretrain section small enough for a test: 60 scenes, a 600-id vocabulary."""
    from ptjax.config import PretrainConfig

    base = dict(documents=60, vocab_size=600, extra_ids=100, input_length=48,
                eval_examples=16, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return PretrainConfig(**{**base, **kw})


def test_corpus_tokenizer_has_t5s_special_ids(tok_dir):
    from ptjax.pretrain import corpus_tokenizer

    tok = corpus_tokenizer(small(tokenizer_dir=tok_dir))
    assert len(tok) == 600
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2)] == ["<pad>", "</s>", "<unk>"]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    ids = objectives.sentinel_ids(tok)
    assert list(ids) == list(range(599, 499, -1))  # <extra_id_0> = the last id
    assert tok("To be, or not to be")["input_ids"][-1] == 1  # EOS appended, as T5's
    # whitespace (the corpus's newlines) is normalised away, as SentencePiece does
    assert tok("a\n b")["input_ids"] == tok("a b")["input_ids"]


# ---------------------------------------------------------------- ptjax pretrain


def args(run_dir, tok_dir, objective, steps, **kw):
    a = {"run_dir": run_dir, "pretrain.objective": objective, "pretrain.documents": 60,
         "pretrain.vocab_size": 600, "pretrain.input_length": 48,
         "pretrain.tokenizer_dir": tok_dir, "pretrain.eval_examples": 16,
         "pretrain.d_model": 32, "pretrain.d_kv": 8, "pretrain.d_ff": 64,
         "train.steps": steps, "train.batch_size": 8, "train.eval_batch_size": 16,
         "train.eval_every": 2, "train.checkpoint_every": 2, "train.log_every": 1,
         "train.dropout": 0.1, "train.progress": False, "optim.name": "adafactor",
         "optim.learning_rate": 0.01, "optim.multiply_by_parameter_scale": True}
    a.update(kw)
    return ["pretrain"] + [f"{k}={v}" for k, v in a.items()]


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "steps_per_s"}
                for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["span_corruption", "prefix_lm"])
def test_pretrain_resumes_exactly_and_exports_a_loadable_t5(objective, tok_dir, tmp_path):
    import transformers

    import ptjax

    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    assert cli.main(args(straight, tok_dir, objective, 4)) == 0
    assert cli.main(args(cut, tok_dir, objective, 2)) == 0  # "interrupted" after step 2
    assert cli.main(args(cut, tok_dir, objective, 4)) == 0  # the rerun resumes it
    assert rows(straight) == rows(cut)
    assert [r["step"] for r in rows(cut) if r["split"] == "validation"] == [2, 4]
    files = [open(os.path.join(d, "model", "model.safetensors"), "rb").read()
             for d in (straight, cut)]
    assert files[0] == files[1]  # bit-identical weights
    res = json.load(open(os.path.join(cut, "results.json")))
    assert res["objective"] == objective and np.isfinite(res["validation_loss"])

    model_dir = os.path.join(cut, "model")
    model = ptjax.load_model(model_dir)
    assert model.tokenizer is not None and len(model.tokenizer) == model.config.vocab_size
    hf = transformers.T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = hf_tok(["To be, or not to be: that is the question",
                  "Friends, Romans, countrymen <extra_id_0> ears"], padding=True,
                 return_tensors="np")
    dec = np.array([[0, 599, 5, 9], [0, 12, 599, 3]], np.int32)
    ours = np.asarray(model.logits(model.params, enc["input_ids"],
                                   attention_mask=enc["attention_mask"],
                                   decoder_input_ids=dec))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(enc["input_ids"]),
                 attention_mask=torch.tensor(enc["attention_mask"]),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_pretrain_shares_train_loop_safeguards(tok_dir, tmp_path, capsys):
    """ptjax train's loop and resume (run.step_loop, newest_checkpoint): a damaged newest
    checkpoint is named, moved aside and the run resumes from the one before to the same
    weights; a second process on the run is refused with one line."""
    from test_reliability import _damage

    from ptjax.rundir import RunLock

    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
    assert cli.main(args(straight, tok_dir, "span_corruption", 4)) == 0
    shutil.copytree(straight, run)
    _damage(os.path.join(run, "checkpoints", "4"), "corrupted array data")
    capsys.readouterr()
    assert cli.main(args(run, tok_dir, "span_corruption", 4)) == 0
    out = capsys.readouterr()
    assert f"{run}/checkpoints/4 (step 4) is damaged" in out.err
    assert f"moved to {run}/damaged-checkpoints/4" in out.err
    assert f"resuming {run} from step 2" in out.out
    files = [open(os.path.join(d, "model", "model.safetensors"), "rb").read()
             for d in (straight, run)]
    assert files[0] == files[1]
    assert rows(straight) == rows(run)
    lock = RunLock(run)
    try:
        assert cli.main(args(run, tok_dir, "span_corruption", 6)) == 2
    finally:
        lock.release()
    assert "another ptjax process is training this run now" in capsys.readouterr().err


@pytest.mark.slow
def test_continued_pretraining_from_a_checkpoint(tok_dir, tmp_path):
    """LM adaptation: prefix LM continued from a span-corruption run's checkpoint."""
    first, second = str(tmp_path / "span"), str(tmp_path / "lm")
    assert cli.main(args(first, tok_dir, "span_corruption", 2)) == 0
    assert cli.main(args(second, tok_dir, "prefix_lm", 2,
                         **{"pretrain.init": os.path.join(first, "model")})) == 0
    assert not os.path.exists(os.path.join(second, "init"))
    res = json.load(open(os.path.join(second, "results.json")))
    assert res["init"].endswith("model") and np.isfinite(res["validation_loss"])


def test_pretrain_errors_are_one_line(tok_dir, tmp_path, capsys):
    code = cli.main(args(str(tmp_path / "x"), tok_dir, "span_corruption", 2,
                         **{"pretrain.init": str(tmp_path / "missing")}))
    assert code == 2
    assert "pretrain.init=" in capsys.readouterr().err
    code = cli.main(args(str(tmp_path / "y"), tok_dir, "mlm", 2))
    assert code == 2 and "pretrain.objective='mlm' is not valid" in capsys.readouterr().err
