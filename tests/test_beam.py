"""Beam search and sampling (issue 28, item 5) against definitions written elsewhere:
transformers' ``generate(num_beams=...)`` on the same weights (ids and sequence scores),
and a plain loop over the vocabulary for what top-k / top-p keep."""
import dataclasses
from functools import partial

import jax
import numpy as np
import pytest
import torch
from conftest import padded_batch

import ptjax
from ptjax import cli
from ptjax.errors import PtjaxError
from ptjax.models.common import PromptInputs
from ptjax.models.generate import filtered_logits
from ptjax.sharding import make_mesh

N_NEW = 7
# (length_penalty, early_stopping): transformers' default, a stop once num_beams beams have
# ended with a penalty favouring long beams, "never" with a penalty below 1
CASES = [(1.0, False), (2.0, True), (0.5, "never")]


def _inputs(model, seed=3):
    """Three rows of different lengths: right-padded for T5, left-padded for GPT-2."""
    return padded_batch(np.random.default_rng(seed), 3, 9, 96, [9, 5, 2],
                        left=not model.is_encoder_decoder)


def _with_eos(model, eos):
    return ptjax.Model(config=dataclasses.replace(model.config, eos_token_id=eos),
                       params=model.params)


def _hf_beams(ref_model, model, num_beams, R, length_penalty, early_stopping, **inputs):
    """transformers' best R beams per row as ptjax returns them: new tokens only, [B*R, N_NEW],
    filled with the pad id after EOS; and their sequences_scores [B*R]."""
    cfg = model.config
    pad = cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    kw = dict(max_new_tokens=N_NEW, num_beams=num_beams, num_return_sequences=R,
              do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
              eos_token_id=cfg.eos_token_id, pad_token_id=pad, return_dict_in_generate=True,
              output_scores=True)
    if getattr(cfg, "num_decoder_layers", 0) != getattr(cfg, "num_layers", 0):
        kw["use_cache"] = False  # transformers 5 sizes T5's decoder cache by the encoder depth
    with torch.no_grad():
        out = ref_model.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, **kw)
    seq = out.sequences.numpy()
    if model.is_encoder_decoder:
        seq = seq[:, 1:]  # decoder_start_token_id
    elif "input_ids" in inputs:
        seq = seq[:, inputs["input_ids"].shape[1]:]
    ids = np.full((len(seq), N_NEW), pad)
    for r, row in enumerate(seq):  # transformers fills short beams with `pad or eos`: EOS
        ends = np.nonzero(row == cfg.eos_token_id)[0]  # for T5, whose pad id 0 is falsy
        n = ends[0] + 1 if len(ends) else len(row)
        ids[r, :n] = row[:n]
    return ids, out.sequences_scores.numpy()


# One length penalty / early stopping per model in the default suite, each where some
# returned beam ends with EOS before the last step; all of them on every model in the slow
# suite (each early_stopping value compiles its own loop).
FAST = {("t5_v1_0", *CASES[1]), ("t5_v1_1", *CASES[2]), ("gpt2", *CASES[0])}


@pytest.mark.parametrize("name,length_penalty,early_stopping", [
    pytest.param(name, lp, es, marks=() if (name, lp, es) in FAST else pytest.mark.slow)
    for name in ("t5_v1_0", "t5_v1_1", "gpt2") for lp, es in CASES])
def test_beam_search_equals_transformers(loaded, name, length_penalty, early_stopping):
    """Ids and scores of all 4 beams, best first, equal transformers' for rows of different
    lengths."""
    ref_model, model = loaded[name]
    ids, mask = _inputs(model)
    beam = partial(_hf_beams, ref_model, num_beams=4, R=4, length_penalty=length_penalty,
                   early_stopping=early_stopping, input_ids=ids, attention_mask=mask)
    # The random tiny models rarely emit their own EOS: take as EOS the first token of
    # transformers' beams with which one of them ends before the last step, if any.
    for eos in dict.fromkeys(beam(model)[0][:, :-1].T.ravel()):
        with_eos = _with_eos(model, int(eos))
        if (beam(with_eos)[0][:, :-1] == eos).any():
            model = with_eos
            break
    ended = (name, length_penalty, early_stopping) in FAST
    assert not ended or model is with_eos  # the default suite checks EOS handling
    want, want_scores = beam(model)
    out, scores = model.generate(model.params, ids, attention_mask=mask, max_new_tokens=N_NEW,
                                 num_beams=4, num_return_sequences=4,
                                 length_penalty=length_penalty, early_stopping=early_stopping,
                                 return_scores=True)
    np.testing.assert_array_equal(np.asarray(out), want)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["t5_v1_0", "gpt2"])
def test_beam_search_behind_a_soft_prompt_equals_transformers_inputs_embeds(loaded, name):
    """A [B, P, D] soft prompt (one per row, so each beam must get its row's) gives the beams
    transformers gives when fed [prompt; token embeddings] as inputs_embeds."""
    ref_model, model = loaded[name]
    ids, mask = _inputs(model, seed=4)
    P, D = 3, model.config.hidden_size
    prompt = np.random.default_rng(5).normal(size=(3, P, D)).astype(np.float32)
    embed = ref_model.shared if model.is_encoder_decoder else ref_model.transformer.wte
    with torch.no_grad():
        embeds = torch.cat([torch.tensor(prompt), embed(torch.tensor(ids))], 1).numpy()
    full_mask = np.concatenate([np.ones((3, P), np.int64), mask], 1)
    want, want_scores = _hf_beams(ref_model, model, 3, 1, 1.0, False, inputs_embeds=embeds,
                                  attention_mask=full_mask)
    out, scores = model.generate(model.params, ids, attention_mask=mask, prompt=prompt,
                                 max_new_tokens=N_NEW, num_beams=3, return_scores=True)
    np.testing.assert_array_equal(np.asarray(out), want)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-6)


def test_beam_search_with_template_slots_equals_transformers(loaded):
    """GPT-2 with a template's soft vectors inside the left-padded input (each row its own
    vectors) equals transformers fed those vectors in place of the token embeddings."""
    ref_model, model = loaded["gpt2"]
    ids, mask = _inputs(model, seed=6)
    vectors = np.random.default_rng(7).normal(size=(3, 2, 32)).astype(np.float32)
    slots = np.full(ids.shape, -1)
    slots[:, -2], slots[0, 1], slots[1, 5] = 0, 1, 1  # the last but one and one more
    with torch.no_grad():
        embeds = ref_model.transformer.wte(torch.tensor(ids)).numpy()
    for b, i in zip(*np.nonzero(slots >= 0)):
        embeds[b, i] = vectors[b, slots[b, i]]
    want, _ = _hf_beams(ref_model, model, 4, 1, 1.0, False, inputs_embeds=embeds,
                        attention_mask=mask)
    prompt = PromptInputs(embeds=vectors, slots=slots)
    out = model.generate(model.params, ids, attention_mask=mask, prompt=prompt,
                         max_new_tokens=N_NEW, num_beams=4)
    np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.parametrize("name", ["t5_v1_0", "gpt2"])
def test_beam_search_with_a_prefix_per_row_equals_each_row_alone(loaded, name):
    """Prefix keys/values [L, B, P, H, Dh] at every site follow their row into its beams:
    a batch of two gives what each row gives alone, and the prefix changes the beams."""
    _, model = loaded[name]
    cfg = model.config
    rng = np.random.default_rng(8)
    if model.is_encoder_decoder:
        layers = {"encoder": cfg.num_layers, "decoder": cfg.num_decoder_layers,
                  "cross": cfg.num_decoder_layers}
        H, Dh = cfg.num_heads, cfg.d_kv
    else:
        layers, H, Dh = {"decoder": cfg.n_layer}, cfg.n_head, cfg.n_embd // cfg.n_head
    prefix = {site: {k: 3 * rng.normal(size=(L, 2, 2, H, Dh)).astype(np.float32)
                     for k in ("k", "v")} for site, L in layers.items()}
    ids, mask = padded_batch(rng, 2, 6, 96, [6, 4], left=not model.is_encoder_decoder)
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=3)
    both = np.asarray(model.generate(model.params, ids, attention_mask=mask,
                                     prompt=PromptInputs(prefix=prefix), **kw))
    for b in range(2):
        row = {site: {k: v[:, b:b + 1] for k, v in kv.items()} for site, kv in prefix.items()}
        alone = model.generate(model.params, ids[b:b + 1], attention_mask=mask[b:b + 1],
                               prompt=PromptInputs(prefix=row), **kw)
        np.testing.assert_array_equal(both[3 * b:3 * b + 3], np.asarray(alone))
    swapped = {site: {k: v[:, ::-1] for k, v in kv.items()} for site, kv in prefix.items()}
    other = model.generate(model.params, ids, attention_mask=mask,
                           prompt=PromptInputs(prefix=swapped), **kw)
    assert not np.array_equal(both, np.asarray(other))  # each row's prefix steers its beams


@pytest.mark.mesh
@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5_v1_1", "gpt2"])
def test_beam_search_and_sampling_on_a_mesh_match_one_device(saved_models, loaded, name):
    """On data=2 x model=2 (beams split with their rows, the cache reordered across
    devices) beam search and sampling give one device's tokens."""
    _, model = loaded[name]
    mesh = make_mesh(2, 2, devices=jax.devices()[:4])
    sharded = ptjax.load_model(saved_models[name][1], mesh=mesh)
    ids, mask = padded_batch(np.random.default_rng(9), 2, 6, 96, [6, 3],
                             left=not model.is_encoder_decoder)
    for kw in (dict(num_beams=3, num_return_sequences=3), dict(do_sample=True, seed=2)):
        a, b = (m.generate(m.params, ids, attention_mask=mask, max_new_tokens=5, **kw)
                for m in (model, sharded))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- sampling


def _kept_probs(logits, temperature, top_k, top_p):
    """What sampling draws from, by a loop: softmax(logits / temperature) over the top-k
    tokens (every token scoring at least the k-th best; 0: all), then the most probable of
    those until their mass reaches top_p; renormalised. [V] -> [V] probabilities."""
    x = np.asarray(logits, np.float64) / temperature
    V = len(x)
    ranked = sorted(range(V), key=lambda j: -x[j])
    kept = [j for j in range(V) if top_k == 0 or x[j] >= x[ranked[top_k - 1]]]
    p = np.zeros(V)
    for j in kept:
        p[j] = np.exp(x[j] - x[ranked[0]])
    p /= p.sum()
    if top_p < 1:
        mass, nucleus = 0.0, []
        for j in sorted(kept, key=lambda j: -p[j]):
            nucleus.append(j)
            mass += p[j]
            if mass >= top_p:
                break
        p = np.where(np.isin(np.arange(V), nucleus), p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 10, 0.5), (0.5, 50, 0.95),
    (1.0, 1, 1.0), (2.0, 3, 0.01)])
def test_filtered_distribution_equals_a_plain_loop(temperature, top_k, top_p):
    logits = np.random.default_rng(top_k).normal(0, 2, (4, 96)).astype(np.float32)
    logits[1, :10] = logits[1, 10]  # ties at the k-th score are all kept
    got = np.asarray(jax.nn.softmax(filtered_logits(logits, temperature, top_k, top_p), -1))
    for b in range(4):
        want = _kept_probs(logits[b], temperature, top_k, top_p)
        np.testing.assert_array_equal(got[b] > 0, want > 0)
        np.testing.assert_allclose(got[b], want, atol=1e-6)


def test_sampled_tokens_follow_the_filtered_distribution(loaded):
    """4096 copies of one GPT-2 input sample their first token from exactly the tokens the
    loop keeps, at the loop's frequencies."""
    _, model = loaded["gpt2"]
    ids = np.tile(np.array([[5, 17, 42, 8]]), (4096, 1))
    kw = dict(temperature=0.7, top_k=6, top_p=0.8)
    out = np.asarray(model.generate(model.params, ids, max_new_tokens=1, do_sample=True,
                                    seed=11, **kw))[:, 0]
    logits = np.asarray(model.logits(model.params, ids[:1]))[0, -1]
    p = _kept_probs(logits, kw["temperature"], kw["top_k"], kw["top_p"])
    assert (p > 0).sum() >= 2  # the filters leave a choice
    freq = np.bincount(out, minlength=len(p)) / len(out)
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(p)[0])
    # 4096 draws: each frequency within 4 standard errors of its probability
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / len(out)) + 1e-9)


@pytest.mark.parametrize("name", ["t5_v1_0", "gpt2"])
def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy(loaded, name):
    _, model = loaded[name]
    ids, mask = _inputs(model)
    kw = dict(attention_mask=mask, max_new_tokens=N_NEW, do_sample=True, top_k=0)
    a = np.asarray(model.generate(model.params, ids, seed=0, **kw))
    b = np.asarray(model.generate(model.params, ids, seed=0, **kw))
    c = np.asarray(model.generate(model.params, ids, seed=1, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = np.asarray(model.generate(model.params, ids, attention_mask=mask,
                                       max_new_tokens=N_NEW))
    one = model.generate(model.params, ids, attention_mask=mask, max_new_tokens=N_NEW,
                         do_sample=True, top_k=1, temperature=0.3, seed=5)
    np.testing.assert_array_equal(np.asarray(one), greedy)


def test_decoding_numbers_do_not_recompile(loaded):
    """Another length penalty, temperature, top-k, top-p or seed reuses the compiled loop."""
    _, model = loaded["gpt2"]
    ids, mask = _inputs(model)
    kw = dict(attention_mask=mask, max_new_tokens=N_NEW)
    model.generate(model.params, ids, num_beams=4, **kw)
    model.generate(model.params, ids, do_sample=True, **kw)
    compiled = model._jit_generate._cache_size()
    model.generate(model.params, ids, num_beams=4, length_penalty=0.3, **kw)
    model.generate(model.params, ids, do_sample=True, seed=1, temperature=0.5, top_k=3,
                   top_p=0.9, **kw)
    assert model._jit_generate._cache_size() == compiled


# ---------------------------------------------------------------- errors, CLI


@pytest.mark.parametrize("kw,says", [
    (dict(num_beams=0), "num_beams=0: must be an integer >= 1"),
    (dict(num_beams=2.0), "num_beams=2.0"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3: must be an integer "
                                                "from 1 to num_beams=2"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping='sometimes'"),
    (dict(do_sample=True, temperature=0.0), "temperature=0.0: must be a number > 0"),
    (dict(do_sample=True, top_k=-1), "top_k=-1: must be an integer >= 0"),
    (dict(do_sample=True, top_p=0.0), "top_p=0.0: must be a number in (0, 1]"),
    (dict(do_sample=True, top_p=1.5), "top_p=1.5"),
    (dict(top_p=0.9), "top_p=0.9: only applies with do_sample=True"),
    (dict(do_sample=True, num_beams=3), "beam sampling is not supported"),
    (dict(return_scores=True), "return_scores needs beam search"),
    (dict(max_new_tokens=0), "max_new_tokens=0: must be an integer >= 1"),
])
def test_bad_decoding_options_are_one_line(loaded, kw, says):
    _, model = loaded["gpt2"]
    with pytest.raises(PtjaxError) as e:
        model.generate(model.params, np.ones((1, 3), np.int32), **kw)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_cli_beam_search_and_sampling(tmp_path, capsys):
    path = str(tmp_path / "tiny")
    assert cli.main(["tiny", path, "--family", "gpt2"]) == 0
    capsys.readouterr()
    texts = ["the cat", "a dog is"]
    assert cli.main(["generate", path, *texts, "--max-new-tokens", "4", "--num-beams", "3",
                     "--num-return-sequences", "2", "--length-penalty", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" -> ")[0] for line in out] == ["'the cat'"] * 2 + ["'a dog is'"] * 2
    sample = ["generate", path, *texts, "--max-new-tokens", "4", "--sample", "--top-p", "0.9",
              "--temperature", "0.8", "--seed", "3"]
    assert cli.main(sample) == 0 and cli.main(sample) == 0
    first, second = np.array_split(capsys.readouterr().out.splitlines(), 2)
    assert list(first) == list(second) and len(first) == 2
    for args, says in [(["--sample", "--top-p", "0"], "--top-p 0.0: must be a number in (0, 1]"),
                       (["--top-k", "5"], "--top-k: only with --sample"),
                       (["--sample", "--num-beams", "2"], "beam sampling is not supported"),
                       (["--num-beams", "0"], "--num-beams 0: must be at least 1"),
                       (["--num-beams", "2", "--num-return-sequences", "3"],
                        "--num-return-sequences 3: at most --num-beams (2)"),
                       (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1")]:
        assert cli.main(["generate", str(tmp_path / "absent"), "x", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
