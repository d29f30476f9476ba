"""Model mechanics beyond parity: scanned layers, remat, dropout, one compilation per
shape, prompt checks, the built-in tiny models (which transformers must read back) and
the CLI's one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from conftest import padded_batch, torch

import ptjax
from ptjax import cli
from ptjax.models.tiny import build_tiny_model


def test_layers_are_stacked_for_scan(loaded):
    _, t5 = loaded["t5_v1_1"]
    q = t5.params["encoder"]["layers"]["attn"]["q"]["kernel"]
    assert q.shape == (2, 32, 4, 8)  # [layers, D, H, K]
    assert t5.params["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (3, 32, 48)
    _, g = loaded["gpt2"]
    assert g.params["h"]["attn"]["o"]["kernel"].shape == (2, 4, 8, 32)  # [layers, H, K, D]


@pytest.mark.parametrize("name", ["t5_v1_0", "gpt2"])
def test_remat_gives_same_values_and_gradients(loaded, name):
    _, model = loaded[name]
    rng = np.random.default_rng(0)
    ids, mask = padded_batch(rng, 2, 8, 96, [8, 5])
    prompt = jnp.asarray(rng.normal(size=(3, model.config.hidden_size)), jnp.float32)
    args = (ids, mask, ids) if model.is_encoder_decoder else (ids, mask)

    def loss(p, remat):
        m = model.module(remat=remat)
        kw = {"prompt": p}
        return jnp.sum(m.apply({"params": model.params}, *args, **kw) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base_v, base_g = value_and_grad(prompt, "none")
    for policy in ("full", "dots"):
        v, g = value_and_grad(prompt, policy)
        np.testing.assert_allclose(v, base_v, rtol=1e-5)
        np.testing.assert_allclose(g, base_g, rtol=1e-4, atol=1e-5)


def test_unknown_remat_policy_is_a_clear_error(loaded):
    _, model = loaded["gpt2"]
    with pytest.raises(ValueError, match="unknown remat policy 'everything'"):
        model.module(remat="everything").apply({"params": model.params}, np.ones((1, 2), int))


@pytest.mark.parametrize("name", ["t5_v1_1", "gpt2"])
def test_dropout_is_active_only_when_not_deterministic(loaded, name):
    _, model = loaded[name]
    ids = np.arange(2, 10)[None]
    args = (ids, None, ids) if model.is_encoder_decoder else (ids,)
    train = jax.jit(lambda key: model.module(deterministic=False).apply(
        {"params": model.params}, *args, rngs={"dropout": key}))
    a, b, c = train(jax.random.key(1)), train(jax.random.key(2)), train(jax.random.key(1))
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(a, c)
    evals = jax.jit(lambda: model.module().apply({"params": model.params}, *args))()
    assert np.abs(np.asarray(a - evals)).max() > 1e-3


def test_logits_compile_once_per_shape(saved_models):
    model = ptjax.load_model(saved_models["t5_v1_0"][1])  # fresh jit cache
    ids = np.ones((2, 6), np.int32)
    for seed in range(3):
        prompt = np.random.default_rng(seed).normal(size=(4, 32)).astype(np.float32)
        model.logits(model.params, ids + seed, decoder_input_ids=ids, prompt=prompt)
    assert model._jit_logits._cache_size() == 1
    model.generate(model.params, ids, max_new_tokens=4)
    model.generate(model.params, ids + 1, max_new_tokens=4)
    assert model._jit_generate._cache_size() == 1


def test_prompt_and_input_errors(loaded):
    _, t5 = loaded["t5_v1_0"]
    ids = np.ones((2, 6), np.int32)
    with pytest.raises(ptjax.PtjaxError, match=r"prompt has shape \(4, 7\); expected \[P, 32\]"):
        t5.logits(t5.params, ids, decoder_input_ids=ids, prompt=np.zeros((4, 7)))
    with pytest.raises(ptjax.PtjaxError, match="needs decoder_input_ids"):
        t5.logits(t5.params, ids)
    _, gpt2 = loaded["gpt2"]  # 64 positions
    with pytest.raises(ptjax.PtjaxError, match="prompt length 60 \\+ sequence length 6 "
                                               "exceeds the model's 64 positions"):
        gpt2.logits(gpt2.params, ids, prompt=np.zeros((60, 32), np.float32))
    with pytest.raises(ptjax.PtjaxError, match="decoder-only"):
        gpt2.logits(gpt2.params, ids, decoder_input_ids=ids)


@pytest.mark.parametrize("family", ["t5", "gpt2", "bert", "roberta"])
@pytest.mark.torch
def test_tiny_model_is_a_valid_hf_checkpoint(tmp_path, family):
    """ptjax writes the built-in tiny model in Hugging Face form: transformers reads it and
    computes the same logits, and its tokenizer round-trips text."""
    path = build_tiny_model(str(tmp_path / family), family=family)
    model = ptjax.load_model(path)
    batch = model.tokenizer(["the movie was great", "a dull film"], padding=True,
                            return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert model.tokenizer.decode(ids[0], skip_special_tokens=True) == "the movie was great"
    if family == "t5":
        assert ids[0, -1] == model.config.eos_token_id == 1
        ref = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
        dec = np.zeros((2, 3), np.int64)
        out = model.logits(model.params, ids, attention_mask=mask, decoder_input_ids=dec)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       decoder_input_ids=torch.tensor(dec)).logits.numpy()
        np.testing.assert_allclose(out, want, atol=1e-4)
    elif family in ("bert", "roberta"):  # [CLS] ... [SEP] / <s> ... </s>, a mask token
        tok = model.tokenizer
        batch = tok([f"the movie was {tok.mask_token}", "a dull film"], ["yes", "no"],
                    padding=True, return_tensors="np")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        types = batch.get("token_type_ids", np.zeros_like(ids))
        assert tok.mask_token_id in ids[0] and ids[0, 0] == tok.cls_token_id
        assert types.max() == (family == "bert")  # RoBERTa has one token type
        cls = (transformers.BertForMaskedLM if family == "bert"
               else transformers.RobertaForMaskedLM)
        ref = cls.from_pretrained(path).eval()
        params = dict(model.params, head_bias=np.linspace(-1, 1, model.config.vocab_size,
                                                         dtype=np.float32))
        with torch.no_grad():  # the head's bias (0 when built) is read where it is written
            head = ref.cls.predictions if family == "bert" else ref.lm_head
            head.bias.copy_(torch.tensor(params["head_bias"]))
            want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(types)).logits.numpy()
        out = model.logits(params, ids, attention_mask=mask, token_type_ids=types)
        m = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(out)[m], want[m], atol=1e-4)
    else:
        ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        out = model.logits(model.params, ids, attention_mask=mask)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        m = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(out)[m], want.numpy()[m], atol=1e-4)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: no such directory" in err
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    assert cli.main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("'llama' is not supported; supported: t5, gpt2, bert, "
                                      "roberta") in err


def test_cli_tiny_info_generate(tmp_path, capsys):
    path = str(tmp_path / "tiny")
    assert cli.main(["tiny", path, "--family", "gpt2"]) == 0
    assert cli.main(["info", path]) == 0
    assert "type:       gpt2" in capsys.readouterr().out
    assert cli.main(["generate", path, "the cat", "a dog is", "--max-new-tokens", "3",
                     "--prompt-length", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("'the cat' -> ")
