"""Prompt-table initialisation: shapes, per-prompt seeds, the paper's strategies, PEFT's
TEXT semantics (checked against PEFT itself) and one-line errors."""
import numpy as np
import pytest

from ptjax import PtjaxError
from ptjax.models.tiny import build_tiny_model
from ptjax.prompts import init_prompts

V, D = 40, 8
EMB = np.random.default_rng(0).normal(size=(V, D)).astype(np.float32)


def test_random_uniform_range_and_seeds():
    t = np.asarray(init_prompts("random_uniform", [0, 1, 0], 100, EMB))
    assert t.shape == (3, 100, 8) and t.dtype == np.float32
    assert t.min() >= -0.5 and t.max() < 0.5 and t.min() < -0.45 and t.max() > 0.45
    np.testing.assert_array_equal(t[0], t[2])  # same seed, same prompt
    assert not np.allclose(t[0], t[1])
    official = np.asarray(init_prompts("random_uniform", [0], 50, EMB, low=0.0, high=0.5))
    assert official.min() >= 0.0 and official.max() < 0.5


def _row_ids(table):
    """Which embedding row each prompt position equals (-1 if none)."""
    eq = (table[:, None, :] == EMB[None]).all(-1)
    return np.where(eq.any(1), eq.argmax(1), -1)


def test_sampled_vocab_draws_distinct_frequent_rows():
    t = np.asarray(init_prompts("sampled_vocab", [3], 10, EMB, vocab_limit=20))[0]
    ids = _row_ids(t)
    assert (ids >= 0).all() and (ids < 20).all() and len(set(ids)) == 10  # no replacement
    many = np.asarray(init_prompts("sampled_vocab", [3], 30, EMB, vocab_limit=20))[0]
    assert (_row_ids(many) < 20).all()  # P > N: with replacement, still the first N


def test_class_label_averages_multi_token_labels_then_fills():
    labels = [[5], [6, 7, 9]]
    t = np.asarray(init_prompts("class_label", [0], 6, EMB, label_ids=labels,
                                vocab_limit=30))[0]
    np.testing.assert_allclose(t[0], EMB[5])
    np.testing.assert_allclose(t[1], EMB[[6, 7, 9]].mean(0), rtol=1e-6)
    assert (_row_ids(t[2:]) >= 0).all() and (_row_ids(t[2:]) < 30).all()
    rnd = np.asarray(init_prompts("class_label", [0], 4, EMB, label_ids=labels,
                                  fallback="random_uniform"))[0]
    assert np.abs(rnd[2:]).max() <= 0.5
    # more labels than positions: the first P labels, as the official code does
    one = np.asarray(init_prompts("class_label", [0], 1, EMB, label_ids=labels))[0]
    np.testing.assert_allclose(one, EMB[[5]])


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_text_init_matches_peft(family, tmp_path):
    """PEFT's TEXT init on the same tokenizer and embedding gives the same table, through
    the ids ptjax's config path chooses (T5: its EOS included, as PEFT encodes the text)."""
    peft = pytest.importorskip("peft")
    import transformers

    import ptjax
    from ptjax.config import PromptConfig
    from ptjax.prompts import initial_prompts

    path = build_tiny_model(str(tmp_path / family), family=family)
    model = ptjax.load_model(path)
    init_text = "the movie was great"
    hf_class = (transformers.T5ForConditionalGeneration if family == "t5"
                else transformers.GPT2LMHeadModel)
    for P in (3, 11):
        cfg = peft.PromptTuningConfig(
            task_type="SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM",
            prompt_tuning_init=peft.PromptTuningInit.TEXT, num_virtual_tokens=P,
            prompt_tuning_init_text=init_text, tokenizer_name_or_path=path,
            num_transformer_submodules=1)  # the encoder only, as ptjax's export
        peft_model = peft.get_peft_model(hf_class.from_pretrained(path), cfg)
        want = peft_model.prompt_encoder["default"].embedding.weight.detach().numpy()
        got = initial_prompts(model, PromptConfig(length=P, init="text", text=init_text),
                              task=None)[0]
        np.testing.assert_allclose(got, want, atol=1e-6)
    if family == "t5":  # the difference this test guards: the EOS is part of the text
        assert model.tokenizer(init_text)["input_ids"][-1] == model.tokenizer.eos_token_id


def test_file_init_npy_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    table = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
    np.save(tmp_path / "p.npy", table)
    save_file({"prompt_embeddings": table}, str(tmp_path / "adapter_model.safetensors"))
    for name in ("p.npy", "adapter_model.safetensors"):
        got = np.asarray(init_prompts("file", [0, 1], 5, EMB, path=str(tmp_path / name)))
        assert got.shape == (2, 5, D)
        np.testing.assert_array_equal(got[1], table)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="zeros"), "unknown prompt init 'zeros'; valid: random_uniform"),
    (dict(strategy="class_label"), "class_label init needs the task's label strings"),
    (dict(strategy="class_label", label_ids=[[1]], fallback="zeros"), "fallback 'zeros'"),
    (dict(strategy="text", text_ids=[]), "text init needs a non-empty init text"),
    (dict(strategy="file", path="/nonexistent/p.npy"), "/nonexistent/p.npy: prompt file "
                                                       "not found"),
])
def test_init_errors_are_one_line(kwargs, message):
    strategy = kwargs.pop("strategy")
    with pytest.raises(PtjaxError, match=message) as excinfo:
        init_prompts(strategy, [0], 5, EMB, **kwargs)
    assert "\n" not in str(excinfo.value)


def test_file_of_wrong_shape(tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((4, D), np.float32))
    with pytest.raises(PtjaxError, match=r"has shape \(4, 8\), expected \(5, 8\)"):
        init_prompts("file", [0], 5, EMB, path=str(tmp_path / "p.npy"))
