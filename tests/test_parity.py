"""ptjax's Flax T5 / GPT-2 against transformers' PyTorch classes on the same checkpoints:
logits (fp32, max abs error <= 1e-4), with and without a soft prompt, the gradient with
respect to the prompt, greedy decoding, and bf16 against fp32."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPT2_CONFIGS, T5_CONFIGS, padded_batch, torch

import ptjax

ATOL = 1e-4
P = 5


def t5_inputs(seed=0, vocab=96):
    rng = np.random.default_rng(seed)
    ids, mask = padded_batch(rng, 3, 40, vocab, [40, 23, 7])  # > max_distance: far buckets
    dec, dec_mask = padded_batch(rng, 3, 9, vocab, [9, 9, 4])
    dec[:, 0] = 0  # decoder_start_token_id
    return ids, mask, dec, dec_mask


def t5_torch(model, ids, mask, dec, dec_mask, prompt_BxPxD=None):
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    kw = dict(decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask))
    if prompt_BxPxD is None:
        return model(input_ids=ids_t, attention_mask=mask_t, **kw).logits
    embeds = torch.cat([prompt_BxPxD, model.shared(ids_t)], dim=1)
    mask_t = torch.cat([torch.ones(ids.shape[0], prompt_BxPxD.shape[1], dtype=torch.long),
                        mask_t], dim=1)
    return model(inputs_embeds=embeds, attention_mask=mask_t, **kw).logits


def gpt2_torch(model, ids, mask, prompt_BxPxD=None):
    """Reference GPT-2 logits for the real positions; positions = cumsum(mask) - 1."""
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    embeds = model.transformer.wte(ids_t)
    if prompt_BxPxD is not None:
        embeds = torch.cat([prompt_BxPxD, embeds], dim=1)
        mask_t = torch.cat([torch.ones(ids.shape[0], prompt_BxPxD.shape[1], dtype=torch.long),
                            mask_t], dim=1)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
    logits = model(inputs_embeds=embeds, attention_mask=mask_t, position_ids=pos).logits
    return logits[:, logits.shape[1] - ids.shape[1]:]


def max_err_on(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


@pytest.mark.parametrize("name", list(T5_CONFIGS))
@pytest.mark.parametrize("prompt_kind", [None, "shared", "per_example"])
def test_t5_logits(loaded, name, prompt_kind):
    ref_model, model = loaded[name]
    ids, mask, dec, dec_mask = t5_inputs()
    D = model.config.d_model
    prompt = None
    prompt_t = None
    if prompt_kind == "shared":
        prompt = np.random.default_rng(1).normal(size=(P, D)).astype(np.float32)
        prompt_t = torch.tensor(prompt)[None].expand(3, -1, -1)
    elif prompt_kind == "per_example":
        prompt = np.random.default_rng(1).normal(size=(3, P, D)).astype(np.float32)
        prompt_t = torch.tensor(prompt)
    with torch.no_grad():
        ref = t5_torch(ref_model, ids, mask, dec, dec_mask, prompt_t).numpy()
    out = model.logits(model.params, ids, attention_mask=mask, decoder_input_ids=dec,
                       decoder_attention_mask=dec_mask, prompt=prompt)
    assert out.shape == (3, 9, 96) and out.dtype == jnp.float32
    assert max_err_on(out, ref, dec_mask) <= ATOL


def test_t5_prompt_changes_output(loaded):
    _, model = loaded["t5_v1_1"]
    ids, mask, dec, dec_mask = t5_inputs()
    a = model.logits(model.params, ids, attention_mask=mask, decoder_input_ids=dec)
    b = model.logits(model.params, ids, attention_mask=mask, decoder_input_ids=dec,
                     prompt=np.ones((P, 32), np.float32))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize("name", list(GPT2_CONFIGS))
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_gpt2_logits(loaded, name, left, with_prompt):
    ref_model, model = loaded[name]
    rng = np.random.default_rng(0)
    ids, mask = padded_batch(rng, 3, 14, 96, [14, 9, 3], left=left)
    prompt = rng.normal(size=(3, P, model.config.n_embd)).astype(np.float32) \
        if with_prompt else None
    with torch.no_grad():
        ref = gpt2_torch(ref_model, ids, mask,
                         None if prompt is None else torch.tensor(prompt)).numpy()
    out = model.logits(model.params, ids, attention_mask=mask, prompt=prompt)
    assert out.shape == (3, 14, 96)
    assert max_err_on(out, ref, mask) <= ATOL


def test_gpt2_right_padding_matches_plain_hf_forward(loaded):
    """With right padding ptjax's positions are HF's (and PEFT's) default arange."""
    ref_model, model = loaded["gpt2"]
    ids, mask = padded_batch(np.random.default_rng(3), 2, 10, 96, [10, 6])
    prompt = np.random.default_rng(4).normal(size=(P, 32)).astype(np.float32)
    with torch.no_grad():
        embeds = torch.cat([torch.tensor(prompt)[None].expand(2, -1, -1),
                            ref_model.transformer.wte(torch.tensor(ids))], 1)
        m = torch.cat([torch.ones(2, P, dtype=torch.long), torch.tensor(mask)], 1)
        ref = ref_model(inputs_embeds=embeds, attention_mask=m).logits[:, P:].numpy()
    out = model.logits(model.params, ids, attention_mask=mask, prompt=prompt)
    assert max_err_on(out, ref, mask) <= ATOL


def _rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("name", ["t5_v1_0", "t5_v1_1", "gpt2"])
def test_prompt_gradient_matches_torch_autograd(loaded, name):
    """d(loss)/d(prompt) from jax.grad equals torch autograd within 1e-4 relative."""
    ref_model, model = loaded[name]
    rng = np.random.default_rng(7)
    D = model.config.hidden_size
    prompt = rng.normal(size=(P, D)).astype(np.float32)
    if model.is_encoder_decoder:
        ids, mask, dec, dec_mask = t5_inputs(seed=2)
        targets = rng.integers(0, 96, dec.shape)
        weights = dec_mask.astype(np.float32)

        def torch_logits(p):
            return t5_torch(ref_model, ids, mask, dec, dec_mask, p[None].expand(3, -1, -1))

        def jax_logits(p):
            return model.logits(model.params, ids, attention_mask=mask, decoder_input_ids=dec,
                                decoder_attention_mask=dec_mask, prompt=p)
    else:
        ids, mask = padded_batch(rng, 3, 12, 96, [12, 8, 5])
        targets = rng.integers(0, 96, ids.shape)
        weights = mask.astype(np.float32)

        def torch_logits(p):
            return gpt2_torch(ref_model, ids, mask, p[None].expand(3, -1, -1))

        def jax_logits(p):
            return model.logits(model.params, ids, attention_mask=mask, prompt=p)

    def jax_loss(p):
        logp = jax.nn.log_softmax(jax_logits(p))
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights) / weights.sum()

    p_t = torch.tensor(prompt, requires_grad=True)
    logp_t = torch.log_softmax(torch_logits(p_t), -1)
    nll_t = -torch.gather(logp_t, -1, torch.tensor(targets)[..., None])[..., 0]
    loss_t = (nll_t * torch.tensor(weights)).sum() / weights.sum()
    loss_t.backward()
    loss_j, grad_j = jax.value_and_grad(jax_loss)(jnp.asarray(prompt))
    assert abs(float(loss_j) - loss_t.item()) <= ATOL
    assert _rel_err(grad_j, p_t.grad.numpy()) <= 1e-4


def _hf_new_tokens(out, n, pad):
    out = out.numpy()
    if out.shape[1] < n:  # HF stops once every row is done
        out = np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=pad)
    return out


@pytest.mark.parametrize("name", list(T5_CONFIGS))
@pytest.mark.parametrize("with_prompt", [False, True])
def test_t5_greedy_matches_hf_generate(loaded, name, with_prompt):
    ref_model, model = loaded[name]
    ids, mask, _, _ = t5_inputs(seed=5)
    n = 8
    prompt = (np.random.default_rng(8).normal(size=(P, model.config.d_model))
              .astype(np.float32) if with_prompt else None)
    kw = dict(max_new_tokens=n, do_sample=False, num_beams=1)
    if name == "t5_v1_1":
        # transformers 5 sizes the decoder cache by the encoder depth; no cache needed.
        kw["use_cache"] = False
    with torch.no_grad():
        if prompt is None:
            ref = ref_model.generate(input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask), **kw)
        else:
            embeds = torch.cat([torch.tensor(prompt)[None].expand(3, -1, -1),
                                ref_model.shared(torch.tensor(ids))], 1)
            m = torch.cat([torch.ones(3, P, dtype=torch.long), torch.tensor(mask)], 1)
            ref = ref_model.generate(inputs_embeds=embeds, attention_mask=m, **kw)
    ref = _hf_new_tokens(ref[:, 1:], n, 0)  # drop decoder_start_token_id
    out = np.asarray(model.generate(model.params, ids, attention_mask=mask, prompt=prompt,
                                    max_new_tokens=n))
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_gpt2_greedy_matches_hf_generate(loaded, with_prompt):
    ref_model, model = loaded["gpt2"]
    ids, mask = padded_batch(np.random.default_rng(9), 3, 10, 96, [10, 6, 3], left=True, low=1)
    n = 8
    prompt = (np.random.default_rng(10).normal(size=(P, 32)).astype(np.float32)
              if with_prompt else None)
    kw = dict(max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0)
    with torch.no_grad():
        if prompt is None:
            ref = ref_model.generate(input_ids=torch.tensor(ids),
                                     attention_mask=torch.tensor(mask), **kw)[:, ids.shape[1]:]
        else:
            embeds = torch.cat([torch.tensor(prompt)[None].expand(3, -1, -1),
                                ref_model.transformer.wte(torch.tensor(ids))], 1)
            m = torch.cat([torch.ones(3, P, dtype=torch.long), torch.tensor(mask)], 1)
            ref = ref_model.generate(inputs_embeds=embeds, attention_mask=m, **kw)
    out = np.asarray(model.generate(model.params, ids, attention_mask=mask, prompt=prompt,
                                    max_new_tokens=n))
    np.testing.assert_array_equal(out, _hf_new_tokens(ref, n, 0))


@pytest.mark.parametrize("name", ["t5_v1_0", "gpt2"])
def test_greedy_stops_at_eos_like_hf(loaded, name):
    """Pick a token the model emits mid-sequence as EOS: rows that emit it are padded after
    it, exactly as transformers pads finished rows."""
    ref_model, model = loaded[name]
    n = 8
    if model.is_encoder_decoder:
        ids, mask, _, _ = t5_inputs(seed=5)
    else:
        ids, mask = padded_batch(np.random.default_rng(9), 3, 10, 96, [10, 6, 3], left=True,
                                 low=1)
    free = np.asarray(model.generate(model.params, ids, attention_mask=mask, max_new_tokens=n))
    eos = int(free[0, 2])
    pad = 0 if model.is_encoder_decoder else eos  # GPT-2 has no pad id: pads with EOS
    eos_model = ptjax.Model(config=dataclasses.replace(model.config, eos_token_id=eos),
                            params=model.params)
    out = np.asarray(eos_model.generate(model.params, ids, attention_mask=mask,
                                        max_new_tokens=n))
    assert out[0, 2] == eos and (out[0, 3:] == pad).all()
    kw = dict(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=eos,
              pad_token_id=pad)
    with torch.no_grad():
        ref = ref_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                 **kw)
    ref = ref[:, 1:] if model.is_encoder_decoder else ref[:, ids.shape[1]:]
    np.testing.assert_array_equal(out, _hf_new_tokens(ref, n, pad))


# bf16 weights and activations (softmax, norms and logits in fp32) stay within this
# fraction of the logits' range of the fp32 model on these tiny random models.
BF16_REL_TOL = 0.03


@pytest.mark.parametrize("name", ["t5_v1_1", "gpt2"])
def test_bf16_close_to_fp32(saved_models, loaded, name):
    _, directory = saved_models[name]
    _, fp32 = loaded[name]
    bf16 = ptjax.load_model(directory, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
    prompt = np.random.default_rng(2).normal(size=(P, fp32.config.hidden_size)) \
        .astype(np.float32)
    if fp32.is_encoder_decoder:
        ids, mask, dec, dec_mask = t5_inputs()
        kw = dict(attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                  prompt=prompt)
        valid = dec_mask
    else:
        ids, valid = padded_batch(np.random.default_rng(0), 3, 14, 96, [14, 9, 3])
        kw = dict(attention_mask=valid, prompt=prompt)
    a = np.asarray(fp32.logits(fp32.params, ids, **kw))
    b = bf16.logits(bf16.params, ids, **kw)
    assert b.dtype == jnp.float32
    b = np.asarray(b)
    scale = np.abs(a).max()
    assert max_err_on(a, b, valid) <= BF16_REL_TOL * scale
    # and it is not trivially equal: bf16 really changed the arithmetic
    assert max_err_on(a, b, valid) > 0
