"""Greedy decoding with a KV cache, for T5 (encoder once, then the decoder token by token)
and GPT-2 (the prompt and input in one pass, then token by token), jitted whole."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax.models import gpt2, t5
from ptjax.models.common import ModelOptions, as_prompt_inputs, site_prefix


def _greedy_loop(step, first_token_B, max_new_tokens, eos, pad, carry):
    """Run ``step(carry, token_B, i) -> (logits_BxV, carry)`` greedily until every row
    has emitted EOS or ``max_new_tokens`` are out. Returns ids [B, max_new_tokens]."""
    B = first_token_B.shape[0]
    tokens = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(first_token_B)
    done = first_token_B == eos

    def cond(state):
        i, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, done, carry = state
        logits, carry = step(carry, tokens[:, i - 1], i)
        nxt = jnp.where(done, pad, jnp.argmax(logits, -1).astype(jnp.int32))
        return i + 1, tokens.at[:, i].set(nxt), done | (nxt == eos), carry

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (1, tokens, done, carry))
    return tokens


def _cache_sharded(options: ModelOptions, cache):
    """A fresh KV cache ({"k", "v"} [L, B, S, H, Dh] leaves) split as the attention's keys
    and values are: rows on ``data``, heads on ``model``."""
    return jax.tree.map(
        lambda kv: options.constrain(kv, "layers", "batch", "length", "heads", "kv"), cache)


def t5_generate(cfg, dtype, options, params, input_ids, attention_mask, prompt, *,
                 max_new_tokens):
    model = t5.T5(cfg, dtype, options=options)
    variables = {"params": params}
    enc, enc_mask = model.apply(variables, input_ids, attention_mask, prompt,
                                method=t5.T5.encode)
    B = input_ids.shape[0]
    cache = _cache_sharded(options, t5.init_cache(cfg, B, max_new_tokens, enc.shape[1], dtype))
    start = jnp.full((B, 1), cfg.decoder_start_token_id, jnp.int32)
    # The first step also fills the cross-attention keys/values, reused afterwards.
    logits, cache = t5.T5(cfg, dtype, prefill=True, options=options).apply(
        variables, start, None, enc, enc_mask, cache, 0, prompt, method=t5.T5.decode)

    def step(cache, token_B, i):
        logits, cache = model.apply(variables, token_B[:, None], None, enc, enc_mask, cache, i,
                                    prompt, method=t5.T5.decode)
        return logits[:, -1], cache

    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    return _greedy_loop(step, first, max_new_tokens, cfg.eos_token_id, cfg.pad_token_id, cache)


def gpt2_generate(cfg, dtype, options, params, input_ids, attention_mask, prompt, *,
                   max_new_tokens):
    model = gpt2.GPT2(cfg, dtype, options=options)
    variables = {"params": params}
    prompt = as_prompt_inputs(prompt)
    x, mask, _ = model.apply(variables, input_ids, attention_mask, prompt.embeds,
                             prompt.slots, prompt.embeds_mask, method=gpt2.GPT2.embed)
    B, T0 = mask.shape
    prefix = site_prefix(prompt, "decoder", B, dtype)
    # Slots after the context hold generated tokens, all attended.
    key_mask = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
    cache = _cache_sharded(options, gpt2.init_cache(cfg, B, T0 + max_new_tokens, dtype))
    logits, cache = model.apply(variables, x, gpt2.positions_from_mask(mask), key_mask, cache, 0,
                                prefix, method=gpt2.GPT2.forward)
    n_real = jnp.sum(mask, axis=1, dtype=jnp.int32)

    def step(cache, token_B, i):
        emb = model.apply(variables, token_B[:, None], method=lambda m, t: m.wte(t))
        pos = (n_real + i - 1)[:, None]
        logits, cache = model.apply(variables, emb, pos, key_mask, cache, T0 + i - 1,
                                    prefix, method=gpt2.GPT2.forward)
        return logits[:, -1], cache

    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    pad = cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    return _greedy_loop(step, first, max_new_tokens, cfg.eos_token_id, pad, cache)
