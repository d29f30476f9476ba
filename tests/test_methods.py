"""Prefix tuning and P-tuning against Hugging Face PEFT in PyTorch: logits and gradients
of the method's own parameters (fp32, <= 1e-4) on random models written by transformers,
PEFT's parameters converted into ptjax's layout. The torch side is tests/peft_reference.py.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import ptjax
from conftest import padded_batch, torch

try:  # the PEFT / PyTorch side; the tests that use it are `torch` tests (conftest)
    import peft_reference as ref
except ImportError:
    ref = None
from ptjax.methods import for_model
from ptjax.methods.prefix import peft_layer_slots, peft_site

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def t5_odd(tmp_path_factory):
    """A T5 with 3 encoder and 3 decoder layers: PEFT's T5 prefix maps decoder layer n to
    its own layer slot 2n mod N, a permutation only for odd N (see ``peft_layer_slots``)."""
    torch.manual_seed(0)
    tmodel = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="relu", decoder_start_token_id=0)).eval()
    directory = str(tmp_path_factory.mktemp("t5_odd"))
    tmodel.save_pretrained(directory)
    return tmodel, ptjax.load_model(directory)


def _batch(model):
    rng = np.random.default_rng(0)
    ids, mask = padded_batch(rng, 3, 7, 96, [7, 5, 3])
    if not model.is_encoder_decoder:
        return dict(input_ids=ids, attention_mask=mask)
    dec, dmask = padded_batch(rng, 3, 4, 96, [4, 2, 3])
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dmask)


def _jax_logits_and_grads(model, method, member, batch):
    """Logits of ptjax with the method's member applied, and d sum(logits * W) / d member."""
    module = model.module()
    out_mask = batch.get("decoder_attention_mask", batch["attention_mask"])

    def logits_of(m):
        params, prompt = method.inputs(m, model.params)
        if model.is_encoder_decoder:
            return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                batch["decoder_input_ids"], batch["decoder_attention_mask"],
                                prompt)
        return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            prompt)

    logits = logits_of(member)
    w = jnp.asarray(ref.loss_weights(logits.shape, out_mask))
    grads = jax.grad(lambda m: jnp.sum(logits_of(m) * w))(member)
    return np.asarray(logits), grads


def _masked(logits, batch):
    mask = batch.get("decoder_attention_mask", batch["attention_mask"])
    return logits * np.asarray(mask)[..., None]


def _prefix_member(state, projection, cols):
    """PEFT's prefix encoder -> ptjax's site parameters (torch Linear weights transposed;
    output columns reordered by ``cols``, ptjax's layer order)."""
    if not projection:
        return {"kv": state["embedding.weight"][:, cols]}
    return {"embed": state["embedding.weight"], "w1": state["transform.0.weight"].T,
            "b1": state["transform.0.bias"], "w2": state["transform.2.weight"].T[:, cols],
            "b2": state["transform.2.bias"][cols]}


def _prefix_grads_as_peft(g, projection, cols):
    """ptjax gradients laid out as PEFT's parameters (the inverse of ``_prefix_member``)."""
    inv = np.argsort(cols)
    if not projection:
        return {"embedding.weight": np.asarray(g["kv"])[:, inv]}
    return {"embedding.weight": g["embed"], "transform.0.weight": np.asarray(g["w1"]).T,
            "transform.0.bias": g["b1"], "transform.2.weight": np.asarray(g["w2"])[:, inv].T,
            "transform.2.bias": np.asarray(g["b2"])[inv]}


@pytest.mark.parametrize("name, projection", [("gpt2", True), ("gpt2", False),
                                              ("t5_odd", True), ("t5_odd", False),
                                              ("bert", True), ("roberta", False)])
def test_prefix_matches_peft(loaded, t5_odd, name, projection):
    """GPT-2, BERT / RoBERTa: keys/values at every layer (BERT's positions shifted by P, as
    transformers shifts them behind a cache of P keys). T5: the decoder self-attention
    alone, which is all a PEFT prefix reaches (with its layer slots 2n mod N)."""
    tmodel, model = t5_odd if name == "t5_odd" else loaded[name]
    P = 3
    pm = ref.prefix_model(tmodel, P, projection, hidden=16)
    batch = _batch(model)
    want_logits, want_grads = ref.logits_and_grads(pm, **batch)
    site = peft_site(model.config)
    method = for_model(model, "prefix", [f"prompt.length={P}", f"method.prefix.sites=[{site}]",
                                         f"method.prefix.projection={projection}",
                                         "method.prefix.hidden=16"])
    cols = peft_layer_slots(model.config)
    member = {"prefix": {site: _prefix_member(ref.adapter_state(pm), projection, cols)}}
    logits, grads = _jax_logits_and_grads(model, method, member, batch)
    np.testing.assert_allclose(_masked(logits, batch), _masked(want_logits, batch), **TOL)
    got = _prefix_grads_as_peft(grads["prefix"][site], projection, cols)
    for key, want in want_grads.items():
        np.testing.assert_allclose(np.asarray(got[key]), want, **TOL, err_msg=key)


def _ptuning_member(state, encoder):
    lin = lambda n: {"w": state[f"mlp_head.{n}.weight"].T, "b": state[f"mlp_head.{n}.bias"]}  # noqa: E731
    if encoder == "mlp":
        return {"embed": state["embedding.weight"],
                "mlp": {"l0": lin(0), "l1": lin(2), "l2": lin(4)}}
    lstm = {}
    for layer in (0, 1):
        lstm[f"l{layer}"] = {d: {"w_ih": state[f"lstm_head.weight_ih_l{layer}{s}"].T,
                                 "w_hh": state[f"lstm_head.weight_hh_l{layer}{s}"].T,
                                 "b_ih": state[f"lstm_head.bias_ih_l{layer}{s}"],
                                 "b_hh": state[f"lstm_head.bias_hh_l{layer}{s}"]}
                             for d, s in (("fwd", ""), ("bwd", "_reverse"))}
    return {"embed": state["embedding.weight"], "lstm": lstm,
            "head": {"l0": lin(0), "l1": lin(2)}}


# BERT and RoBERTa take one encoder each in the default suite, the other in the slow one
@pytest.mark.parametrize("encoder, name", [
    (e, n) for e in ("mlp", "lstm") for n in ("gpt2", "t5_v1_0")] + [
    ("lstm", "bert"), ("mlp", "roberta"),
    pytest.param("mlp", "bert", marks=pytest.mark.slow),
    pytest.param("lstm", "roberta", marks=pytest.mark.slow)])
def test_ptuning_matches_peft(loaded, name, encoder):
    tmodel, model = loaded[name]
    P = 3
    kw = {"num_transformer_submodules": 1} if model.is_encoder_decoder else {}
    pm = ref.ptuning_model(tmodel, P, encoder.upper(), hidden=16, **kw)
    batch = _batch(model)
    want_logits, want_grads = ref.logits_and_grads(pm, **batch)
    method = for_model(model, "ptuning", [f"prompt.length={P}", f"method.ptuning.encoder={encoder}",
                                          "method.ptuning.hidden=16"])
    state = ref.adapter_state(pm)
    member = {"encoder": _ptuning_member(state, encoder)}
    logits, grads = _jax_logits_and_grads(model, method, member, batch)
    np.testing.assert_allclose(_masked(logits, batch), _masked(want_logits, batch), **TOL)
    flat_got = _ptuning_grads_as_peft(grads["encoder"], encoder)
    for key, want in want_grads.items():
        np.testing.assert_allclose(flat_got[key], want, **TOL, err_msg=key)


def _ptuning_grads_as_peft(g, encoder):
    out = {"embedding.weight": np.asarray(g["embed"])}
    heads = ({"l0": 0, "l1": 2, "l2": 4}, g["mlp"]) if encoder == "mlp" else \
        ({"l0": 0, "l1": 2}, g["head"])
    for ours, n in heads[0].items():
        out[f"mlp_head.{n}.weight"] = np.asarray(heads[1][ours]["w"]).T
        out[f"mlp_head.{n}.bias"] = np.asarray(heads[1][ours]["b"])
    if encoder == "lstm":
        for layer in (0, 1):
            for d, s in (("fwd", ""), ("bwd", "_reverse")):
                p = g["lstm"][f"l{layer}"][d]
                out[f"lstm_head.weight_ih_l{layer}{s}"] = np.asarray(p["w_ih"]).T
                out[f"lstm_head.weight_hh_l{layer}{s}"] = np.asarray(p["w_hh"]).T
                out[f"lstm_head.bias_ih_l{layer}{s}"] = np.asarray(p["b_ih"])
                out[f"lstm_head.bias_hh_l{layer}{s}"] = np.asarray(p["b_hh"])
    return out


# ---------------------------------------------------------------- exports PEFT loads


def _peft_logits(pm, batch):
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        logits = pm(**kw).logits.numpy()
    return logits[:, logits.shape[1] - batch["input_ids"].shape[1]:] \
        if "decoder_input_ids" not in batch else logits


def _ptjax_logits(model, method, member, batch):
    params, prompt = method.inputs(member, model.params)
    kw = {k: batch[k] for k in ("decoder_input_ids", "decoder_attention_mask") if k in batch}
    return np.asarray(model.logits(params, batch["input_ids"],
                                   attention_mask=batch["attention_mask"], prompt=prompt, **kw))


@pytest.mark.parametrize("name, method_name", [("gpt2", "prefix"), ("t5_odd", "prefix"),
                                               ("gpt2", "ptuning"), ("t5_v1_0", "ptuning"),
                                               ("bert", "prefix"), ("roberta", "ptuning"),
                                               ("bert", "prompt")])
def test_exported_adapter_loads_in_peft_with_equal_logits(loaded, t5_odd, tmp_path, name,
                                                          method_name):
    """The export of a trained member is a PEFT adapter (PREFIX_TUNING with the
    materialised prefix; P_TUNING with the encoder's output) giving ptjax's logits."""
    tmodel, model = t5_odd if name == "t5_odd" else loaded[name]
    overrides = ["prompt.length=3", "prompt.seeds=[0,1]", "prompt.init=random_uniform",
                 f"method.prefix.sites=[{peft_site(model.config)}]",
                 "method.prefix.hidden=16",
                 "method.ptuning.encoder=lstm", "method.ptuning.hidden=16"]
    method = for_model(model, method_name, overrides)
    tree = method.init(model, None, None)
    method.export(str(tmp_path), tree, model, "unused-base")
    kind = "prefix" if method_name == "prefix" else "prompt"
    batch = _batch(model)
    for k in range(2):
        pm = ref.from_adapter_dir(tmodel, str(tmp_path / f"{kind}-{k}"))
        ours = _ptjax_logits(model, method, method.member(tree, k), batch)
        np.testing.assert_allclose(_masked(ours, batch), _masked(_peft_logits(pm, batch), batch),
                                   **TOL)


def test_prefix_without_a_peft_form_exports_the_materialised_prefix(loaded, tmp_path):
    """PEFT cannot hold an encoder or cross-attention prefix (nor a T5 of even depth): the
    export is then prefix.safetensors alone, {site}.k / {site}.v [L, P, H, Dh]."""
    from safetensors.numpy import load_file

    _, model = loaded["t5_v1_1"]
    method = for_model(model, "prefix", ["prompt.length=2", "method.prefix.hidden=8"])
    tree = method.init(model, None, None)
    method.export(str(tmp_path), tree, model, "unused")
    files = sorted(os.listdir(tmp_path / "prefix-0"))
    assert files == ["prefix.safetensors"]
    saved = load_file(str(tmp_path / "prefix-0" / "prefix.safetensors"))
    want = method.materialised(method.member(tree, 0))
    assert sorted(saved) == ["cross.k", "cross.v", "decoder.k", "decoder.v", "encoder.k",
                             "encoder.v"]
    assert saved["encoder.k"].shape == (2, 2, 4, 8) and saved["cross.v"].shape == (3, 2, 4, 8)
    np.testing.assert_array_equal(saved["decoder.v"], want["decoder"]["v"])


# ---------------------------------------------------------------- generation, packing


@pytest.mark.parametrize("name", ["t5_v1_1", "gpt2"])
def test_greedy_kv_cache_generation_with_a_prefix_equals_a_loop_over_logits(loaded, name):
    """KV-cache decoding with prefixes at every site (T5: encoder, decoder, cross) gives the
    tokens that re-running the whole forward and taking the argmax gives."""
    _, model = loaded[name]
    method = for_model(model, "prefix", ["prompt.length=3", "method.prefix.hidden=8"])
    member = method.member(method.init(model, None, None), 0)
    member = jax.tree.map(lambda x: x * 3.0, member)  # a prefix strong enough to steer
    params, prompt = method.inputs(member, model.params)
    rng = np.random.default_rng(1)
    if model.is_encoder_decoder:
        ids, mask = padded_batch(rng, 2, 6, 96, [6, 4])
    else:
        ids, mask = padded_batch(rng, 2, 6, 96, [6, 4], left=True)
    out = np.asarray(model.generate(params, ids, attention_mask=mask, prompt=prompt,
                                    max_new_tokens=5))
    plain = np.asarray(model.generate(params, ids, attention_mask=mask, max_new_tokens=5))
    assert not np.array_equal(out, plain)  # the prefix changed what is generated
    for b in range(2):
        if model.is_encoder_decoder:
            dec = [model.config.decoder_start_token_id]
            for t in range(5):
                logits = model.logits(params, ids[b:b + 1], attention_mask=mask[b:b + 1],
                                      decoder_input_ids=np.array([dec]), prompt=prompt)
                dec.append(int(np.argmax(logits[0, -1])))
            want = dec[1:]
        else:
            seq = list(ids[b][mask[b] == 1])
            want = []
            for t in range(5):
                logits = model.logits(params, np.array([seq]), prompt=prompt)
                want.append(int(np.argmax(logits[0, -1])))
                seq.append(want[-1])
        eos = model.config.eos_token_id
        n = want.index(eos) + 1 if eos in want else 5
        assert list(out[b][:n]) == want[:n]


@pytest.mark.parametrize("method_name, extra", [
    ("prefix", ["method.prefix.hidden=8"]),
    ("prefix", ["method.prefix.projection=false"]),
    ("ptuning", ["method.ptuning.encoder=lstm", "method.ptuning.hidden=8"]),
])
def test_k_members_train_as_separate_runs(loaded, method_name, extra):
    """K prefixes / prompt encoders packed in one step (dropout on) end where K one-member
    runs with the same seeds end."""
    from ptjax.config import OptimConfig
    from ptjax.train import init_state, make_train_step

    _, model = loaded["t5_v1_1"]
    common = ["prompt.length=3", "prompt.init=random_uniform", *extra]
    both_m = for_model(model, method_name, ["prompt.seeds=[7,3]", *common])
    tree = both_m.init(model, None, None)
    tx = both_m.optimizer(OptimConfig(name="sgd", learning_rate=0.5), 10)
    batches = []
    for i in range(3):
        b = _batch(model)
        rng = np.random.default_rng(i)
        b = {k: np.roll(v, i, axis=0) for k, v in b.items()}
        batches.append({"input_ids": b["input_ids"], "input_mask": b["attention_mask"],
                        "decoder_input_ids": b["decoder_input_ids"],
                        "targets": rng.integers(2, 96, b["decoder_input_ids"].shape),
                        "target_mask": b["decoder_attention_mask"]})
    step_both = make_train_step(model, both_m, tx, dropout=0.1)
    both = init_state(tx, tree, 0, (7, 3))
    singles = []
    for k, seed in enumerate((7, 3)):
        one_m = for_model(model, method_name, [f"prompt.seeds=[{seed}]", *common])
        s = init_state(tx, jax.tree.map(lambda x: x[k:k + 1], tree), 0, (seed,))
        singles.append((make_train_step(model, one_m, tx, dropout=0.1), s))
    for b in batches:
        both, _ = step_both(both, model.params, b)
        singles = [(f, f(s, model.params, b)[0]) for f, s in singles]
    for k, (_, s) in enumerate(singles):
        jax.tree.map(lambda a, c: np.testing.assert_allclose(
            np.asarray(a)[k], np.asarray(c)[0], rtol=1e-5, atol=2e-5), both.trainable,
            s.trainable)
    moved = jax.tree.map(lambda a, c: float(np.abs(np.asarray(a) - np.asarray(c)).max()),
                         both.trainable, tree)
    assert max(jax.tree.leaves(moved)) > 1e-3  # they trained


# ---------------------------------------------------------------- runs of every method


def _train(tmp_path, name, **kw):
    from ptjax import cli

    args = {"run_dir": str(tmp_path / name), "model.tiny_dir": str(tmp_path / "models"),
            "model.path": "tiny-t5", "prompt.length": 3, "prompt.seeds": "[0,1]",
            "task.max_input_length": 24, "task.max_target_length": 4, "task.dev_size": 16,
            "train.batch_size": 8, "train.eval_batch_size": 16, "train.steps": 4,
            "train.eval_every": 2, "train.checkpoint_every": 2, "train.progress": False,
            "train.ensemble": "majority", **kw}
    return cli.main(["train", *[f"{k}={v}" for k, v in args.items()]]), args["run_dir"]


@pytest.mark.parametrize("method_name, extra", [
    ("prefix", {"method.prefix.hidden": 16, "method.prefix.sites": "[encoder,cross]"}),
    ("ptuning", {"method.ptuning.hidden": 16}),
])
def test_a_run_of_each_method_evaluates_ensembles_and_loads(tmp_path, capsys, method_name,
                                                            extra):
    """`ptjax train` for prefix tuning / P-tuning: results with both members and their
    ensemble; `ptjax eval RUN` reproduces the best dev metric from the checkpoint;
    `ptjax.load_run` gives member k's logits; `ptjax generate RUN` decodes behind it."""
    import json

    from ptjax import cli

    code, run_dir = _train(tmp_path, method_name, **{"method.name": method_name, **extra})
    assert code == 0
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["method"] == method_name and len(results["prompts"]) == 2
    assert set(results["ensemble"]) >= {"prompts", "average", "best", "ensemble"}
    capsys.readouterr()
    assert cli.main(["eval", run_dir]) == 0
    out = capsys.readouterr().out
    for k, p in enumerate(results["prompts"]):
        assert f"member {k}: validation accuracy {p['best_accuracy']:.2f}" in out
    run = ptjax.load_run(run_dir)
    assert run.K == 2 and run.method.name == method_name
    ids = np.array([[5, 6, 7, 1]])
    dec = np.array([[0, 9]])
    params, prompt = run.inputs(1)
    np.testing.assert_array_equal(
        np.asarray(run.logits(ids, k=1, decoder_input_ids=dec)),
        np.asarray(run.model.logits(params, ids, decoder_input_ids=dec, prompt=prompt)))
    assert not np.allclose(run.logits(ids, k=0, decoder_input_ids=dec),
                           run.logits(ids, k=1, decoder_input_ids=dec))
    assert cli.main(["generate", run_dir, "the movie was great", "--k", "1",
                     "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("'the movie was great' -> ")


@pytest.mark.parametrize("overrides, message", [
    ({"method.name": "lora"}, "method.name='lora' is not valid; valid: prompt, prefix, "
                              "ptuning, model"),
    ({"method.name": "prefix", "method.prefix.sites": "[self]"},
     "method.prefix.sites has 'self'; valid: encoder, decoder, cross"),
    ({"method.name": "prefix", "model.path": "tiny-gpt2", "method.prefix.sites": "[cross]"},
     "method.prefix.sites has 'cross'; this gpt2 model's sites are decoder"),
    ({"method.name": "prefix", "method.prefix.hidden": 0}, "method.prefix.hidden=0 must be >= 1"),
    ({"method.name": "prefix", "method.prefix.init": "text"},
     "method.prefix.init=text needs prompt.text"),
    ({"method.name": "prefix", "method.prefix.projection": "maybe"},
     "method.prefix.projection='maybe' is not a boolean"),
    ({"method.name": "ptuning", "method.ptuning.encoder": "gru"},
     "method.ptuning.encoder='gru' is not valid; valid: mlp, lstm"),
    ({"method.name": "ptuning", "method.ptuning.tune_model": True},
     "method.name=ptuning with method.ptuning.tune_model=true trains one model; prompt.seeds "
     "must hold one seed"),
    ({"method.name": "model"}, "method.name=model trains one model"),
    ({"method.name": "prefix", "train.method": "model"},  # the old name, given last, wins
     "method.name=model trains one model"),
    ({"method.prefx.hidden": 3}, "unknown config key 'method.prefx.hidden'; did you mean "
                                 "'method.prefix.hidden'?"),
])
def test_bad_method_settings_are_one_line_errors(tmp_path, capsys, overrides, message):
    code, run_dir = _train(tmp_path, "bad", **overrides)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


def test_prefix_text_init_starts_from_the_models_own_keys_and_values(loaded):
    """init=text: the prefix at step 0 is the frozen model's keys/values of the text (ids
    tiled to P), exactly, with and without the MLP (its output layer solved for them)."""
    from ptjax.methods.prefix import model_keys_values

    _, model = loaded["t5_v1_0"]
    from ptjax.models.tiny import train_tokenizer

    model = dataclasses.replace(model, tokenizer=train_tokenizer("t5", vocab_size=96))
    text = "the movie was great"
    ids = [i for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    want = model_keys_values(model, np.resize(np.asarray(ids), 5)[None])
    for projection in (True, False):
        method = for_model(model, "prefix", ["prompt.length=5", "method.prefix.init=text",
                                             f"prompt.text={text}", "method.prefix.hidden=64",
                                             f"method.prefix.projection={projection}"])
        got = method.materialised(method.member(method.init(model, None, None), 0))
        for site in ("encoder", "decoder", "cross"):
            for n in ("k", "v"):
                np.testing.assert_allclose(got[site][n], want[site][n][:, 0], atol=1e-4)


def test_a_config_file_naming_two_methods_is_an_error():
    from ptjax.config import from_dict
    from ptjax.errors import PtjaxError

    with pytest.raises(PtjaxError, match="train.method='model' and method.name='prefix' "
                                         "disagree; train.method is the old name"):
        from_dict({"train": {"method": "model"}, "method": {"name": "prefix"}})
    assert from_dict({"train": {"method": "model"}}).method.name == "model"
