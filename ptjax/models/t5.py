"""Flax (Linen) T5: v1.0 (ReLU, tied output with d_model**-0.5 rescale) and v1.1 /
LM-adapted (gated-GELU, separate lm_head), with prompt inputs (soft prompts prepended to
the encoder input; prefix keys/values at three attention sites) and a KV cache.

Layers are stacked on a leading [layers] axis and run with ``nn.scan`` so compile time
does not grow with depth. Only layer 0 of each stack owns the relative-position bias in
T5, so here it lives outside the scanned layers (``relpos_bias``) and is computed once.

Prefix keys (prefix tuning) and relative positions: a prefix of P keys sits at positions
0..P-1 and the stack's own tokens follow at P, P+1, ..., so the relative bias treats the
prefix as tokens just before the sequence, as a prepended soft prompt would be. In the
decoder this is Hugging Face's convention for past keys (queries at P.., keys at 0..), so
PEFT's decoder prefix gives the same logits. Cross-attention has no position bias: its
prefix keys get none either. Prefix keys are masked only where a site's prefix "mask" says
so (rows of several runs left-padded to one P, ``ptjax.multirun``): the real keys
then keep their distances to the tokens.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ptjax.models.common import (ACTIVATIONS, MASK_VALUE, KeyMask, ModelOptions, MultiHeadAttention,
                                 RMSNorm, Unembed, as_prompt_inputs, broadcast_prompt,
                                 constrain_hidden, dropout, embeds_key_mask, logical,
                                 place_embeds, prefix_keys, prefix_length, remat_layer,
                                 scan_layers, site_prefix, tied_logits)
from ptjax.models.convert import Rule

SITES = ("encoder", "decoder", "cross")  # where prefix keys/values can enter


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The architecture of a T5 checkpoint; field names follow Hugging Face's T5Config."""
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    # T5 v1.0 multiplies the decoder output by d_model**-0.5 before the (tied) output
    # projection; v1.1 does not.
    scale_decoder_outputs: bool = True
    # False when the checkpoint has its own lm_head (v1.1); True = project with `shared`.
    tie_lm_head: bool = True
    dropout_rate: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"

    @property
    def hidden_size(self) -> int:
        """The embedding width D a prompt must have."""
        return self.d_model

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        if self.feed_forward_proj == "gated-gelu":  # T5 v1.1's name for the tanh GELU
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def max_prompt_positions(self) -> int | None:
        """Relative positions put no limit on prompt + input length."""
        return None


def relative_position_bucket(rel_pos, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """T5's bucketing of (key - query) distances; int32 of the same shape as ``rel_pos``."""
    buckets = jnp.zeros_like(rel_pos)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel_pos > 0).astype(jnp.int32) * num_buckets
        rel_pos = jnp.abs(rel_pos)
    else:
        rel_pos = -jnp.minimum(rel_pos, 0)
    max_exact = num_buckets // 2
    # fp32 like the reference so that bucket edges land on the same distances.
    safe = jnp.maximum(rel_pos, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(rel_pos < max_exact, rel_pos, large)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for each distance bucket -> [1, H, T, S] in fp32."""
    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_pos_T, k_pos_S):
        cfg = self.config
        table = self.param("embedding", logical(nn.initializers.normal(1.0), "relpos", "heads"),
                           (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
        buckets_TxS = relative_position_bucket(
            k_pos_S[None, :] - q_pos_T[:, None], bidirectional=self.bidirectional,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance)
        return jnp.transpose(table[buckets_TxS].astype(jnp.float32), (2, 0, 1))[None]


class FeedForward(nn.Module):
    config: T5Config
    dtype: Any
    deterministic: bool
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.config
        act = ACTIVATIONS[cfg.activation]

        def dense(features, name, axes):
            return nn.Dense(features, use_bias=False, dtype=self.dtype, name=name,
                            kernel_init=logical(nn.initializers.lecun_normal(), *axes))

        up = ("embed", "mlp")
        if cfg.is_gated:
            h = act(dense(cfg.d_ff, "wi_0", up)(x_BxTxD)) * dense(cfg.d_ff, "wi_1", up)(x_BxTxD)
        else:
            h = act(dense(cfg.d_ff, "wi", up)(x_BxTxD))
        h_BxTxF = self.options.constrain(h, "batch", "length", "mlp")
        h_BxTxF = _dropout(cfg, self.options)(h_BxTxF, deterministic=self.deterministic)
        return constrain_hidden(self.options, dense(cfg.d_model, "wo", ("mlp", "embed"))(h_BxTxF))


def _by_heads(options: ModelOptions, bias_1xHxTxS):
    """The relative position bias split over heads as the attention scores are."""
    return options.constrain(bias_1xHxTxS, None, "heads", "length", "length")


def _dropout(cfg: T5Config, options: ModelOptions):
    """Hidden dropout at the options' rate (default: the checkpoint's)."""
    return dropout(options.hidden_rate(cfg.dropout_rate), options,
                   options.hidden_broadcast_dims)


def _attention(cfg: T5Config, dtype, deterministic, name, options, cross=False,
               prefill=False):
    return MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.d_kv, out_dim=cfg.d_model,
                              dropout_rate=options.attention_rate(cfg.dropout_rate),
                              dtype=dtype, deterministic=deterministic, cross=cross,
                              prefill=prefill, options=options, name=name)


class EncoderLayer(nn.Module):
    config: T5Config
    dtype: Any
    deterministic: bool
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x_BxSxD, attn_bias, prefix):
        """attn_bias: (relative bias [1, H, S', S], ``KeyMask``) where S counts the prefix
        keys; prefix: this layer's {"k", "v"} [B, P, H, Dh] or None."""
        cfg = self.config
        drop = _dropout(cfg, self.options)
        bias, mask = attn_bias
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="attn_norm")(x_BxSxD)
        h, _ = _attention(cfg, self.dtype, self.deterministic, "attn", self.options)(
            h, h, bias, prefix=prefix, mask=mask)
        x_BxSxD = x_BxSxD + drop(h, deterministic=self.deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="mlp_norm")(x_BxSxD)
        h = FeedForward(cfg, self.dtype, self.deterministic, self.options, name="mlp")(h)
        x_BxSxD = x_BxSxD + drop(h, deterministic=self.deterministic)
        return constrain_hidden(self.options, x_BxSxD), None


class DecoderLayer(nn.Module):
    config: T5Config
    dtype: Any
    deterministic: bool
    prefill: bool = False
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x_BxTxD, enc_BxSxD, self_attn, cross_mask, cache_index, layer_xs):
        """self_attn: (relative bias [1, H, T, S], causal ``KeyMask``); cross_mask: the
        encoder keys' ``KeyMask``; layer_xs: (this layer's cache or None, self-attention
        prefix or None, cross-attention prefix or None)."""
        cfg = self.config
        drop = _dropout(cfg, self.options)
        cache, self_prefix, cross_prefix = layer_xs
        cache = cache or {}
        self_bias, self_mask = self_attn
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="self_attn_norm")(x_BxTxD)
        h, self_cache = _attention(cfg, self.dtype, self.deterministic, "self_attn",
                                   self.options)(
            h, h, self_bias, cache.get("self"), cache_index, prefix=self_prefix,
            mask=self_mask)
        x_BxTxD = x_BxTxD + drop(h, deterministic=self.deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="cross_attn_norm")(x_BxTxD)
        h, cross_cache = _attention(cfg, self.dtype, self.deterministic, "cross_attn",
                                    self.options, cross=True, prefill=self.prefill)(
            h, enc_BxSxD, None, cache.get("cross"), prefix=cross_prefix, mask=cross_mask)
        x_BxTxD = x_BxTxD + drop(h, deterministic=self.deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="mlp_norm")(x_BxTxD)
        h = FeedForward(cfg, self.dtype, self.deterministic, self.options, name="mlp")(h)
        new_cache = None if self_cache is None else {"self": self_cache, "cross": cross_cache}
        x_BxTxD = x_BxTxD + drop(h, deterministic=self.deterministic)
        return constrain_hidden(self.options, x_BxTxD), new_cache


class Encoder(nn.Module):
    config: T5Config
    dtype: Any
    deterministic: bool
    remat: str = "none"
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, embeds_BxSxD, mask_BxS, prefix=None, prefix_offset: int = 0):
        """prefix: {"k", "v"} [L, B, P, H, Dh] prepended at every layer, or None.
        prefix_offset: positions the prefix keys sit later (static): a mixed batch's
        prompt slots, so that for a row whose slots are all masked (a prefix run's) the
        prefix sits just before its tokens, as when it runs alone."""
        cfg = self.config
        P, S = prefix_length(prefix), embeds_BxSxD.shape[1]
        q_pos = P + jnp.arange(S)
        k_pos = jnp.concatenate([prefix_offset + jnp.arange(P), q_pos])
        key_mask = mask_BxS
        prefix, prefix_mask = prefix_keys(prefix, mask_BxS.shape[0])
        if P:
            key_mask = jnp.concatenate([prefix_mask, mask_BxS], 1)
        # The relative bias [1, H, S, S] and the key mask [B, S] stay apart, combined inside
        # each layer's attention: their sum would be a [B, H, S, S] fp32 buffer held for the
        # whole step (1.5 GiB for T5-XL at 612 tokens); cuDNN never builds it at all.
        relpos = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(q_pos, k_pos)
        attn_bias = (_by_heads(self.options, relpos), KeyMask(key_mask))
        drop = _dropout(cfg, self.options)
        x = constrain_hidden(self.options, drop(embeds_BxSxD, deterministic=self.deterministic))
        layers = scan_layers(remat_layer(EncoderLayer, self.remat), cfg.num_layers, 1,
                             self.options.unroll_layers)
        x, _ = layers(cfg, self.dtype, self.deterministic, self.options, name="layers")(
            x, attn_bias, prefix)
        x = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="final_norm")(x)
        return constrain_hidden(self.options, _dropout(cfg, self.options)(
            x, deterministic=self.deterministic))


class Decoder(nn.Module):
    config: T5Config
    dtype: Any
    deterministic: bool
    remat: str = "none"
    prefill: bool = False
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, embeds_BxTxD, mask_BxS, enc_BxSxD, enc_mask_BxS, cache=None,
                 cache_index=None, self_prefix=None, cross_prefix=None):
        """``mask_BxS`` masks decoder keys: [B, T] without a cache, [B, cache_len] with one.

        With a cache, the T new positions start at ``cache_index``. self_prefix /
        cross_prefix: {"k", "v"} [L, B, P, H, Dh] or None (never written to the cache).
        """
        cfg = self.config
        B, T = embeds_BxTxD.shape[:2]
        P = prefix_length(self_prefix)
        if cache is None:
            q_pos = P + jnp.arange(T)
            tok_pos = q_pos
        else:
            q_pos = P + cache_index + jnp.arange(T)
            tok_pos = P + jnp.arange(cache["self"]["k"].shape[2])
        key_mask = mask_BxS
        self_prefix, self_prefix_mask = prefix_keys(self_prefix, B)
        if P:
            key_mask = jnp.concatenate([self_prefix_mask, mask_BxS], 1)
        k_pos = jnp.arange(P + tok_pos.shape[0])
        relpos = _by_heads(self.options, RelativePositionBias(
            cfg, bidirectional=False, name="relpos_bias")(q_pos, k_pos))
        if cache is None:  # causality as a static pattern: the fused paths need no mask
            self_attn = (relpos, KeyMask(key_mask, causal=True))
        else:  # the cache's causality moves with cache_index: one [B, 1, T, S] mask
            causal_TxS = tok_pos[None, :] <= q_pos[:, None]
            if P:
                causal_TxS = jnp.concatenate([jnp.ones((T, P), bool), causal_TxS], 1)
            self_attn = ((relpos, jnp.where(causal_TxS, 0.0, MASK_VALUE)[None, None]),
                         KeyMask(key_mask))
        Pc = prefix_length(cross_prefix)
        enc_key_mask = enc_mask_BxS
        cross_prefix, cross_prefix_mask = prefix_keys(cross_prefix, B)
        if Pc:
            enc_key_mask = jnp.concatenate([cross_prefix_mask, enc_mask_BxS], 1)
        drop = _dropout(cfg, self.options)
        x = constrain_hidden(self.options, drop(embeds_BxTxD, deterministic=self.deterministic))
        layer = remat_layer(DecoderLayer, self.remat)
        layers = scan_layers(layer, cfg.num_decoder_layers, 4, self.options.unroll_layers)
        x, new_cache = layers(cfg, self.dtype, self.deterministic, self.prefill, self.options,
                              name="layers")(x, enc_BxSxD, self_attn, KeyMask(enc_key_mask),
                                             cache_index, (cache, self_prefix, cross_prefix))
        x = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="final_norm")(x)
        return constrain_hidden(self.options, _dropout(cfg, self.options)(
            x, deterministic=self.deterministic)), new_cache


class T5(nn.Module):
    """T5 encoder-decoder. ``dtype`` is the compute dtype; logits are always fp32."""
    config: T5Config
    dtype: Any = jnp.float32
    deterministic: bool = True
    remat: str = "none"
    prefill: bool = False
    options: ModelOptions = ModelOptions()
    # the hidden state the LM head reads (fp32 [B, T, D], after v1.0's rescale) in place of
    # the logits: what a soft verbalizer's class vectors multiply (ptjax.verbalizers)
    hidden: bool = False

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype,
                               embedding_init=logical(nn.initializers.normal(1.0),
                                                      "vocab", "embed"))
        self.encoder = Encoder(cfg, self.dtype, self.deterministic, self.remat, self.options)
        self.decoder = Decoder(cfg, self.dtype, self.deterministic, self.remat, self.prefill,
                               self.options)
        if not cfg.tie_lm_head:
            self.lm_head = Unembed(cfg.vocab_size, self.dtype)

    def encode(self, input_ids_BxL, attention_mask_BxL=None, prompt=None):
        """Token ids [B, L] (+ prompt: [P, D], [B, P, D] or ``PromptInputs``) -> encoder
        states [B, P+L, D] and their mask [B, P+L] (ones over the prompt embeddings, or
        ``prompt.embeds_mask``; an encoder prefix adds keys, not states)."""
        if attention_mask_BxL is None:
            attention_mask_BxL = jnp.ones(input_ids_BxL.shape, bool)
        prompt = as_prompt_inputs(prompt)
        B = input_ids_BxL.shape[0]
        mask = attention_mask_BxL.astype(bool)
        x = self.shared(input_ids_BxL)
        offset = 0
        if prompt.slots is not None:  # a template's soft slots: inside the input
            x = place_embeds(x, prompt, self.dtype)
        # with slots, prepended too only in a mixed batch (embeds_mask: rows without slots)
        if prompt.embeds is not None and (prompt.slots is None
                                          or prompt.embeds_mask is not None):
            prompt_BxPxD = broadcast_prompt(prompt.embeds, B, self.dtype)
            x = jnp.concatenate([prompt_BxPxD, x], axis=1)
            mask = jnp.concatenate([embeds_key_mask(prompt, B, prompt_BxPxD.shape[1]), mask],
                                   axis=1)
            if prompt.embeds_mask is not None:  # a mixed batch: no row has both
                offset = prompt_BxPxD.shape[1]
        x = constrain_hidden(self.options, x)
        return self.encoder(x, mask, site_prefix(prompt, "encoder", B, self.dtype),
                            offset), mask

    def decode(self, decoder_input_ids_BxT, decoder_mask, enc_BxSxD, enc_mask_BxS, cache=None,
               cache_index=None, prompt=None):
        """Decoder ids [B, T] -> (fp32 logits [B, T, vocab], updated cache or None).
        prompt: ``PromptInputs`` whose "decoder" / "cross" prefixes apply (or None)."""
        if decoder_mask is None:
            length = decoder_input_ids_BxT.shape[1] if cache is None else \
                cache["self"]["k"].shape[2]
            decoder_mask = jnp.ones((decoder_input_ids_BxT.shape[0], length), bool)
        x = self.shared(decoder_input_ids_BxT)
        prompt, B = as_prompt_inputs(prompt), decoder_input_ids_BxT.shape[0]
        x, cache = self.decoder(x, decoder_mask.astype(bool), enc_BxSxD, enc_mask_BxS, cache,
                                cache_index, site_prefix(prompt, "decoder", B, self.dtype),
                                site_prefix(prompt, "cross", B, self.dtype))
        if self.config.scale_decoder_outputs:
            x = x * (self.config.d_model ** -0.5)
        if self.hidden:
            return x.astype(jnp.float32), cache
        if self.config.tie_lm_head:
            logits = tied_logits(x, self.shared.embedding, self.dtype)
        else:
            logits = self.lm_head(x)
        return self.options.constrain(logits, "batch", "length", "vocab"), cache

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, prompt=None):
        enc, enc_mask = self.encode(input_ids, attention_mask, prompt)
        logits, _ = self.decode(decoder_input_ids, decoder_attention_mask, enc, enc_mask,
                                prompt=prompt)
        return logits


def init_cache(config: T5Config, batch: int, max_len: int, enc_len: int, dtype):
    """Zeros for the decoder KV cache: self [L, B, max_len, H, Dh], cross [L, B, S, H, Dh]."""
    def kv(length):
        shape = (config.num_decoder_layers, batch, length, config.num_heads, config.d_kv)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return {"self": kv(max_len), "cross": kv(enc_len)}


def hf_rules(config: T5Config):
    """{params path: Rule} mapping each ptjax parameter to its Hugging Face tensor."""
    rules = {("shared", "embedding"): Rule("shared.weight")}
    if not config.tie_lm_head:
        rules[("lm_head", "kernel")] = Rule("lm_head.weight", "linear")
    mlp_names = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    stacks = {
        "encoder": (config.num_layers,
                    [("attn", 0, "SelfAttention"), ("mlp", 1, "DenseReluDense")]),
        "decoder": (config.num_decoder_layers,
                    [("self_attn", 0, "SelfAttention"), ("cross_attn", 1, "EncDecAttention"),
                     ("mlp", 2, "DenseReluDense")]),
    }
    for stack, (n, sublayers) in stacks.items():
        block = f"{stack}.block.{{i}}.layer"
        rules[(stack, "relpos_bias", "embedding")] = Rule(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        rules[(stack, "final_norm", "scale")] = Rule(f"{stack}.final_layer_norm.weight")
        for name, idx, hf_name in sublayers:
            norm = "mlp_norm" if name == "mlp" else f"{name}_norm"
            rules[(stack, "layers", norm, "scale")] = Rule(
                f"{block}.{idx}.layer_norm.weight", layers=n)
            projections = mlp_names if name == "mlp" else ("q", "k", "v", "o")
            for proj in projections:
                n_in = 2 if proj == "o" else 1  # o's kernel is [H, Dh, D]
                rules[(stack, "layers", name, proj, "kernel")] = Rule(
                    f"{block}.{idx}.{hf_name}.{proj}.weight", "linear", n_in=n_in, layers=n)
    return rules
