"""Decoding with a KV cache, for T5 (encoder once, then the decoder token by token) and
GPT-2 (the prompt and input in one pass, then token by token), jitted whole: greedy (the
default), beam search (transformers' ``generate(num_beams=...)``: its scores, length
penalty, early stopping and EOS handling) or sampling (temperature, top-k, top-p, seeded).

Beams are folded into the batch: row ``b * num_beams + n`` is beam n of input b, and the
KV cache is reordered by each step's chosen beams.
"""
from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp

from ptjax.errors import PtjaxError
from ptjax.models import gpt2, t5
from ptjax.models.common import ModelOptions, as_prompt_inputs, site_prefix

# What transformers adds to a log-probability to rule a candidate out (kept bit for bit:
# fp32 sums with it decide which beams survive).
_NEG = -1.0e9


@flax.struct.dataclass
class Decoding:
    """How ``generate`` picks tokens. A pytree: the static fields choose the compiled loop,
    the numbers are traced, so another temperature, top-p, length penalty or seed reuses the
    compiled loop.

    num_beams > 1: beam search; the best ``num_return_sequences`` beams of each input come
    back, ranked by sum of log-probs / (new tokens ** length_penalty), EOS included.
    early_stopping: False (transformers' default: stop once no running beam can beat the
    worst finished one, judged at the current length), True (stop once ``num_beams`` beams
    have finished) or "never" (judged at the longest length when length_penalty > 0).
    do_sample: sample from softmax(logits / temperature) after top-k (0: off) and top-p
    (1.0: off) filtering, with ``jax.random.key(seed)`` folded with the step.
    """
    num_beams: int = flax.struct.field(pytree_node=False, default=1)
    num_return_sequences: int = flax.struct.field(pytree_node=False, default=1)
    early_stopping: bool | str = flax.struct.field(pytree_node=False, default=False)
    do_sample: bool = flax.struct.field(pytree_node=False, default=False)
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.num_beams == 1 and not self.do_sample


def decoding(*, num_beams: int = 1, num_return_sequences: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, do_sample: bool = False,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0) -> Decoding:
    """A checked ``Decoding``: one-line errors for values that have no meaning.
    temperature / top_k / top_p apply only with do_sample; left out, they are transformers'
    defaults (1.0, 50, 1.0)."""
    def is_int(x):  # numpy's too, and one a jitted int32 can hold
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) \
            and -2**31 <= x < 2**31

    def is_num(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not is_int(num_beams) or num_beams < 1:
        raise PtjaxError(f"num_beams={num_beams!r}: must be an integer >= 1 (1: no beam search)")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise PtjaxError(f"num_return_sequences={num_return_sequences!r}: must be an integer "
                         f"from 1 to num_beams={num_beams}")
    if early_stopping not in (True, False, "never") or is_num(early_stopping) \
            and not isinstance(early_stopping, bool):
        raise PtjaxError(f"early_stopping={early_stopping!r}: must be True, False or 'never'")
    early_stopping = early_stopping if isinstance(early_stopping, str) else bool(early_stopping)
    if not is_num(length_penalty):
        raise PtjaxError(f"length_penalty={length_penalty!r}: must be a number")
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if not do_sample and any(v is not None for v in sampling.values()):
        given = ", ".join(f"{k}={v!r}" for k, v in sampling.items() if v is not None)
        raise PtjaxError(f"{given}: only applies with do_sample=True (sampling)")
    temperature = 1.0 if temperature is None else temperature
    top_k = 50 if top_k is None else top_k
    top_p = 1.0 if top_p is None else top_p
    if not is_num(temperature) or not temperature > 0:
        raise PtjaxError(f"temperature={temperature!r}: must be a number > 0")
    if not is_int(top_k) or top_k < 0:
        raise PtjaxError(f"top_k={top_k!r}: must be an integer >= 0 (0: no top-k filter)")
    if not is_num(top_p) or not 0 < top_p <= 1:
        raise PtjaxError(f"top_p={top_p!r}: must be a number in (0, 1] (1: no top-p filter)")
    if not is_int(seed):
        raise PtjaxError(f"seed={seed!r}: must be an integer in [-2**31, 2**31)")
    if do_sample and num_beams > 1:
        raise PtjaxError(f"do_sample with num_beams={num_beams}: beam sampling is not "
                         "supported; sample with num_beams=1 or search beams without sampling")
    return Decoding(num_beams=int(num_beams), num_return_sequences=int(num_return_sequences),
                    early_stopping=early_stopping, do_sample=bool(do_sample),
                    length_penalty=float(length_penalty), temperature=float(temperature),
                    top_k=int(top_k), top_p=float(top_p), seed=int(seed))


def _token_loop(step, pick, logits_BxV, max_new_tokens, eos, pad, carry):
    """Run ``step(carry, token_B, i) -> (logits_BxV, carry)``, choosing each token with
    ``pick(logits_BxV, i) -> ids [B]``, until every row has emitted EOS or
    ``max_new_tokens`` are out. logits_BxV: the first token's. Returns ids [B, max_new_tokens]."""
    first_token_B = pick(logits_BxV, 0)
    B = first_token_B.shape[0]
    tokens = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(first_token_B)
    done = first_token_B == eos

    def cond(state):
        i, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, done, carry = state
        logits, carry = step(carry, tokens[:, i - 1], i)
        nxt = jnp.where(done, pad, pick(logits, i))
        return i + 1, tokens.at[:, i].set(nxt), done | (nxt == eos), carry

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (1, tokens, done, carry))
    return tokens


def _argmax(logits_BxV, i):
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)


def filtered_logits(logits_BxV, temperature, top_k, top_p):
    """fp32 logits / temperature with the tokens top-k and then top-p rule out set to -inf
    (transformers' order). top-k keeps every token scoring at least the k-th best (0: off);
    top-p keeps the most probable tokens until their probability reaches top_p (the first
    always; 1.0: off). All three may be traced."""
    x = logits_BxV.astype(jnp.float32) / temperature
    V = x.shape[-1]
    sorted_desc = -jnp.sort(-x, axis=-1)
    kth = jnp.take(sorted_desc, jnp.clip(top_k, 1, V) - 1, axis=-1)[..., None]
    x = jnp.where((top_k > 0) & (x < kth), -jnp.inf, x)
    order = jnp.argsort(-x, axis=-1)
    p_sorted = jnp.take_along_axis(jax.nn.softmax(x, -1), order, -1)
    before = jnp.cumsum(p_sorted, -1) - p_sorted  # mass of the more probable tokens
    keep = jnp.take_along_axis(before < top_p, jnp.argsort(order, -1), -1)
    return jnp.where((top_p < 1) & ~keep, -jnp.inf, x)


def _sampler(dec: Decoding):
    key = jax.random.key(dec.seed)

    def pick(logits_BxV, i):
        x = filtered_logits(logits_BxV, dec.temperature, dec.top_k, dec.top_p)
        return jax.random.categorical(jax.random.fold_in(key, i), x, -1).astype(jnp.int32)
    return pick


def beam_search(dec: Decoding, step, logits_BNxV, max_new_tokens, eos, pad, cache,
                normalize: bool = True):
    """transformers' ``_beam_search`` (5.x) without sampling, on ``num_beams`` rows per input
    (row b*N + n), step for step: the same candidates, -1e9 masks and stopping rules.
    Returns (ids [B*R, max_new_tokens], scores [B*R]), R = num_return_sequences, best first;
    a finished beam is filled with ``pad`` after its EOS.

    ``step(cache, token_BN, i) -> (logits [B*N, V], cache)``; every leaf of ``cache`` has
    its rows on axis 1 (they follow the chosen beams). normalize=False: the step returns
    each token's score itself (e.g. log-probabilities summed over several inputs,
    ``ptjax.autotemplate``), added to the beams' as it is, without a log_softmax."""
    N, T = dec.num_beams, max_new_tokens
    BN, V = logits_BNxV.shape
    B = BN // N
    K2 = 2 * N  # candidates kept per input, so N can run on when N of them end in EOS
    lp = jnp.asarray(dec.length_penalty, jnp.float32)
    first_N = jnp.arange(K2) < N  # only the N best candidates may finish
    never = dec.early_stopping == "never"
    stop_when_full = dec.early_stopping is True

    def gather(x_BxN, idx_BxM):  # x [B, N, ...] -> [B, M, ...]: beams idx of each input
        idx = idx_BxM.reshape(idx_BxM.shape + (1,) * (x_BxN.ndim - 2))
        return jnp.take_along_axis(x_BxN, idx, axis=1)

    def select(i, logits, s):
        """Choose token i of every beam from logits [B*N, V]; -> new state and, for each new
        running beam, the flat row [B*N] its cache comes from."""
        logp = logits.astype(jnp.float32)
        logp = (jax.nn.log_softmax(logp, -1) if normalize else logp).reshape(B, N, V)
        top_lp, idx = jax.lax.top_k((logp + s["scores"][..., None]).reshape(B, N * V), K2)
        src, tok = idx // V, (idx % V).astype(jnp.int32)
        cand = gather(s["seqs"], src).at[:, :, i].set(tok)  # [B, K2, T]
        hits = (tok == eos) | (i + 1 >= T)
        run_lp = top_lp + hits.astype(jnp.float32) * _NEG
        nxt = jax.lax.top_k(run_lp, N)[1]
        rows = (gather(src, nxt) + jnp.arange(B)[:, None] * N).reshape(BN)
        # finished hypotheses: the best N of the old ones and the candidates that just ended
        pen = top_lp / jnp.asarray(i + 1, jnp.float32) ** lp
        full = jnp.all(s["fin"], -1, keepdims=True) & stop_when_full
        pen = pen + full.astype(jnp.float32) * _NEG
        pen = pen + (~s["unsat"]).astype(jnp.float32)[:, None] * _NEG
        pen = pen + (~(hits & first_N)).astype(jnp.float32) * _NEG
        m_seqs = jnp.concatenate([s["fin_seqs"], cand], 1)
        m_scores = jnp.concatenate([s["fin_scores"], pen], 1)
        m_fin = jnp.concatenate([s["fin"], hits & first_N], 1)
        best = jax.lax.top_k(m_scores, N)[1]
        new = dict(seqs=gather(cand, nxt), scores=gather(run_lp, nxt),
                   fin_seqs=gather(m_seqs, best), fin_scores=gather(m_scores, best),
                   fin=gather(m_fin, best), hits=hits)
        # can a running beam still beat the worst finished one? (its best, at this length or,
        # with "never" and a positive penalty, at the longest)
        length = jnp.where(never & (lp > 0), T, i + 1).astype(jnp.float32)
        best_running = new["scores"][:, :1] / length ** lp
        worst = jnp.where(new["fin"], jnp.min(new["fin_scores"], -1, keepdims=True), _NEG)
        new["unsat"] = s["unsat"] & jnp.any(best_running > worst, -1)
        return new, rows

    def reorder(cache, rows):
        return jax.tree.map(lambda kv: jnp.take(kv, rows, axis=1), cache)

    def go_on(s):
        return (jnp.any(s["unsat"]) & ~(jnp.all(s["fin"]) & stop_when_full)
                & ~jnp.all(s["hits"]))

    seqs = jnp.full((B, N, T), pad, jnp.int32)
    state = dict(seqs=seqs, scores=jnp.zeros((B, N), jnp.float32).at[:, 1:].set(_NEG),
                 fin_seqs=seqs, fin_scores=jnp.full((B, N), _NEG, jnp.float32),
                 fin=jnp.zeros((B, N), bool), unsat=jnp.ones((B,), bool),
                 hits=jnp.zeros((B, K2), bool))
    state, rows = select(0, logits_BNxV, state)
    cache = reorder(cache, rows)

    def cond(carry):
        i, s, _ = carry
        return (i < T) & go_on(s)

    def body(carry):
        i, s, cache = carry
        logits, cache = step(cache, s["seqs"][:, :, i - 1].reshape(BN), i)
        s, rows = select(i, logits, s)
        return i + 1, s, reorder(cache, rows)

    _, state, _ = jax.lax.while_loop(cond, body, (1, state, cache))
    R = dec.num_return_sequences
    return (state["fin_seqs"][:, :R].reshape(B * R, T),
            state["fin_scores"][:, :R].reshape(B * R))


def _decode(dec, step, logits_BxV, max_new_tokens, eos, pad, carry):
    if dec is None or dec.is_greedy:
        return _token_loop(step, _argmax, logits_BxV, max_new_tokens, eos, pad, carry)
    if dec.num_beams > 1:
        return beam_search(dec, step, logits_BxV, max_new_tokens, eos, pad, carry)
    return _token_loop(step, _sampler(dec), logits_BxV, max_new_tokens, eos, pad, carry)


def repeat_rows(prompt, n: int):
    """PromptInputs with every per-row part ([B, P, D] embeddings, [L, B, P, H, Dh] prefix
    keys/values, [B, L] slots) repeated n times row by row (row b -> rows b*n .. b*n+n-1);
    shared parts as they are."""
    if prompt is None or n == 1:
        return prompt
    prompt = as_prompt_inputs(prompt)

    def rows(x, axis, ndim):
        return x if x is None or x.ndim != ndim else jnp.repeat(x, n, axis=axis)
    prefix = None if prompt.prefix is None else {
        site: None if kv is None else {k: rows(v, 1, 5) for k, v in kv.items()}
        for site, kv in prompt.prefix.items()}
    return prompt.replace(embeds=rows(prompt.embeds, 0, 3), prefix=prefix,
                          slots=rows(prompt.slots, 0, 2))


def _cache_sharded(options: ModelOptions, cache):
    """A fresh KV cache ({"k", "v"} [L, B, S, H, Dh] leaves) split as the attention's keys
    and values are: rows on ``data``, heads on ``model``."""
    return jax.tree.map(
        lambda kv: options.constrain(kv, "layers", "batch", "length", "heads", "kv"), cache)


def t5_generate(cfg, dtype, options, params, input_ids, attention_mask, prompt, *,
                 max_new_tokens, decoding: Decoding | None = None):
    """New ids [B, max_new_tokens] (beam search: ids [B*R, max_new_tokens] and scores
    [B*R]); decoding: None or greedy ``Decoding`` = greedy."""
    model = t5.T5(cfg, dtype, options=options)
    variables = {"params": params}
    enc, enc_mask = model.apply(variables, input_ids, attention_mask, prompt,
                                method=t5.T5.encode)
    if decoding is not None and decoding.num_beams > 1:  # the encoder once per input
        n = decoding.num_beams
        enc, enc_mask = jnp.repeat(enc, n, axis=0), jnp.repeat(enc_mask, n, axis=0)
        prompt = repeat_rows(prompt, n)
    B = enc.shape[0]
    cache = _cache_sharded(options, t5.init_cache(cfg, B, max_new_tokens, enc.shape[1], dtype))
    start = jnp.full((B, 1), cfg.decoder_start_token_id, jnp.int32)
    # The first step also fills the cross-attention keys/values, reused afterwards.
    logits, cache = t5.T5(cfg, dtype, prefill=True, options=options).apply(
        variables, start, None, enc, enc_mask, cache, 0, prompt, method=t5.T5.decode)

    def step(cache, token_B, i):
        logits, cache = model.apply(variables, token_B[:, None], None, enc, enc_mask, cache, i,
                                    prompt, method=t5.T5.decode)
        return logits[:, -1], cache

    return _decode(decoding, step, logits[:, -1], max_new_tokens, cfg.eos_token_id,
                   cfg.pad_token_id, cache)


def gpt2_generate(cfg, dtype, options, params, input_ids, attention_mask, prompt, *,
                   max_new_tokens, decoding: Decoding | None = None):
    """As ``t5_generate``; input_ids left-padded."""
    model = gpt2.GPT2(cfg, dtype, options=options)
    variables = {"params": params}
    if decoding is not None and decoding.num_beams > 1:  # every beam its own row
        n = decoding.num_beams
        input_ids, attention_mask = (jnp.repeat(input_ids, n, axis=0),
                                     jnp.repeat(attention_mask, n, axis=0))
        prompt = repeat_rows(prompt, n)
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

    pad = cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    return _decode(decoding, step, logits[:, -1], max_new_tokens, cfg.eos_token_id, pad, cache)
