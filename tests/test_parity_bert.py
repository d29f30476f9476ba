"""ptjax's Flax BERT / RoBERTa masked LM against transformers' PyTorch ``BertForMaskedLM``
/ ``RobertaForMaskedLM`` on the same checkpoints (saved by transformers, safetensors):
logits (fp32) with padding and token types, with a soft prompt where PEFT puts one
(``inputs_embeds`` with the prompt before the input, token type 0, its mask 1), and the
gradient with respect to the prompt."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BERT_CONFIGS, padded_batch, torch


ATOL = 1e-5
P = 4


def inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = padded_batch(rng, 3, 12, 96, [12, 7, 3], low=3)
    pad = BERT_CONFIGS[name][2]["pad_token_id"]
    ids = np.where(mask == 1, ids, pad)
    types = (rng.integers(0, 2, ids.shape) * mask if name == "bert"
             else np.zeros_like(ids))
    return ids, mask, types


def torch_logits(model, ids, mask, types, prompt_BxPxD=None):
    """The reference; with a prompt, PEFT's way: inputs_embeds = [prompt, words]."""
    ids_t, mask_t, types_t = (torch.tensor(a) for a in (ids, mask, types))
    if prompt_BxPxD is None:
        return model(input_ids=ids_t, attention_mask=mask_t, token_type_ids=types_t).logits
    B, n = ids.shape[0], prompt_BxPxD.shape[1]
    embeds = torch.cat([prompt_BxPxD, model.get_input_embeddings()(ids_t)], 1)
    mask_t = torch.cat([torch.ones(B, n, dtype=torch.long), mask_t], 1)
    types_t = torch.cat([torch.zeros(B, n, dtype=torch.long), types_t], 1)
    out = model(inputs_embeds=embeds, attention_mask=mask_t, token_type_ids=types_t).logits
    return out[:, n:]


def max_err_on(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


@pytest.mark.parametrize("name", list(BERT_CONFIGS))
@pytest.mark.parametrize("prompt_kind", [None, "shared", "per_example"])
def test_logits(loaded, name, prompt_kind):
    ref_model, model = loaded[name]
    assert model.kind == "masked"
    ids, mask, types = inputs(name)
    prompt = prompt_t = None
    if prompt_kind == "shared":
        prompt = np.random.default_rng(1).normal(size=(P, 32)).astype(np.float32)
        prompt_t = torch.tensor(prompt)[None].expand(3, -1, -1)
    elif prompt_kind == "per_example":
        prompt = np.random.default_rng(1).normal(size=(3, P, 32)).astype(np.float32)
        prompt_t = torch.tensor(prompt)
    with torch.no_grad():
        ref = torch_logits(ref_model, ids, mask, types, prompt_t).numpy()
    out = model.logits(model.params, ids, attention_mask=mask, prompt=prompt,
                       token_type_ids=types if name == "bert" else None)
    assert out.shape == (3, 12, 96) and out.dtype == jnp.float32
    assert max_err_on(out, ref, mask) <= ATOL
    if name == "bert":  # the token types matter (and are read)
        other = model.logits(model.params, ids, attention_mask=mask, prompt=prompt)
        assert max_err_on(other, ref, mask) > 1e-3


@pytest.mark.parametrize("name", list(BERT_CONFIGS))
def test_prompt_gradient(loaded, name):
    """d(weighted logits at the real positions)/d(prompt) as PyTorch's autograd says."""
    ref_model, model = loaded[name]
    ids, mask, types = inputs(name, seed=2)
    rng = np.random.default_rng(3)
    prompt = rng.normal(size=(P, 32)).astype(np.float32)
    weights = (rng.normal(size=(3, 12, 96)) * mask[..., None]).astype(np.float32)
    prompt_t = torch.tensor(prompt, requires_grad=True)
    ref = torch_logits(ref_model, ids, mask, types, prompt_t[None].expand(3, -1, -1))
    (ref * torch.tensor(weights)).sum().backward()

    def loss(p):
        return jnp.sum(model.logits(model.params, ids, attention_mask=mask, prompt=p,
                                    token_type_ids=types if name == "bert" else None)
                       * weights)

    grad = jax.grad(loss)(jnp.asarray(prompt))
    want = prompt_t.grad.numpy()
    assert np.abs(np.asarray(grad) - want).max() <= ATOL * max(1.0, np.abs(want).max())
