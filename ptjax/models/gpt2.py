"""Flax (Linen) GPT-2: learned absolute positions, pre-LN blocks, gelu_new, tied lm_head.

A soft prompt [P, D] is prepended to the embedded input and takes positions 0..P-1; the
real tokens follow at P, P+1, ... (PEFT's convention). Positions count attended tokens
(``cumsum(mask) - 1``), so a left-padded row still puts its first real token right after
the prompt, where PEFT would leave the pads in between.

A prefix (prefix tuning: keys/values prepended at every layer, site "decoder") of P keys
takes positions 0..P-1 the same way: the tokens' learned positions start at P, Hugging
Face's convention for P past keys, so PEFT's prefix gives the same logits.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ptjax.models.common import (ACTIVATIONS, MASK_VALUE, KeyMask, ModelOptions, MultiHeadAttention,
                                 as_prompt_inputs, constrain_hidden, dropout, logical, prefix_keys,
                                 prefix_length, remat_layer, scan_layers, site_prefix,
                                 tied_logits, with_prompt)
from ptjax.models.convert import Rule

SITES = ("decoder",)  # where prefix keys/values can enter


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The architecture of a GPT-2 checkpoint; names follow Hugging Face's GPT2Config."""
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    scale_attn_weights: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int | None = None
    model_type: str = "gpt2"

    @property
    def hidden_size(self) -> int:
        """The embedding width D a prompt must have."""
        return self.n_embd

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def max_prompt_positions(self) -> int:
        """Prompt + input must fit the learned position table."""
        return self.n_positions


def layer_norm(cfg: GPT2Config, dtype, name=None):
    return nn.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name=name,
                        scale_init=logical(nn.initializers.ones, "embed"),
                        bias_init=logical(nn.initializers.zeros, "embed"))


def dense(features: int, dtype, name: str, axes):
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=logical(nn.initializers.lecun_normal(), *axes),
                    bias_init=logical(nn.initializers.zeros, axes[-1]))


class Block(nn.Module):
    config: GPT2Config
    dtype: Any
    deterministic: bool
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x_BxTxD, attn_mask, cache_index, layer_xs):
        """attn_mask: (an additive bias or None, ``KeyMask``); layer_xs: (this layer's
        cache or None, its prefix {"k", "v"} [B, P, H, Dh] or None)."""
        cfg = self.config
        cache, prefix = layer_xs
        bias, mask = attn_mask
        drop = dropout(self.options.hidden_rate(cfg.resid_pdrop), self.options,
                       self.options.hidden_broadcast_dims)
        head_dim = cfg.n_embd // cfg.n_head
        h = layer_norm(cfg, self.dtype, "ln_1")(x_BxTxD)
        h, new_cache = MultiHeadAttention(
            num_heads=cfg.n_head, head_dim=head_dim, out_dim=cfg.n_embd,
            dropout_rate=self.options.attention_rate(cfg.attn_pdrop), dtype=self.dtype,
            deterministic=self.deterministic, use_bias=True,
            scale=head_dim ** -0.5 if cfg.scale_attn_weights else 1.0, options=self.options,
            name="attn")(h, h, bias, cache, cache_index, prefix=prefix, mask=mask)
        x_BxTxD = x_BxTxD + drop(h, deterministic=self.deterministic)
        h = layer_norm(cfg, self.dtype, "ln_2")(x_BxTxD)
        h = dense(cfg.d_ff, self.dtype, "c_fc", ("embed", "mlp"))(h)
        h_BxTxF = self.options.constrain(ACTIVATIONS[cfg.activation_function](h),
                                         "batch", "length", "mlp")
        h = dense(cfg.n_embd, self.dtype, "c_proj", ("mlp", "embed"))(h_BxTxF)
        x_BxTxD = x_BxTxD + drop(constrain_hidden(self.options, h),
                                 deterministic=self.deterministic)
        return constrain_hidden(self.options, x_BxTxD), new_cache


class GPT2(nn.Module):
    """GPT-2 LM. ``dtype`` is the compute dtype; logits are always fp32."""
    config: GPT2Config
    dtype: Any = jnp.float32
    deterministic: bool = True
    remat: str = "none"
    options: ModelOptions = ModelOptions()
    # the final hidden state (fp32 [B, T, D]) in place of the logits (ptjax.verbalizers)
    hidden: bool = False

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype,
                            embedding_init=logical(init, "vocab", "embed"))
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=self.dtype,
                            embedding_init=logical(init, "positions", "embed"))
        self.h = scan_layers(remat_layer(Block, self.remat), cfg.n_layer, 2,
                             self.options.unroll_layers)(
            cfg, self.dtype, self.deterministic, self.options)
        self.ln_f = layer_norm(cfg, self.dtype)
        self.drop = dropout(self.options.hidden_rate(cfg.embd_pdrop), self.options,
                            self.options.hidden_broadcast_dims)

    def embed(self, input_ids_BxL, attention_mask_BxL=None, prompt=None, slots=None,
              prompt_mask=None):
        """-> (embeddings [B, P+L, D] without positions, mask [B, P+L], P); with a
        template's ``slots`` [B, L] the prompt goes inside the input (P = 0).
        prompt_mask: [B, P] bool, which prompt vectors are real (None: all); with slots
        too (a mixed batch), the vectors also go before the input where it says."""
        if attention_mask_BxL is None:
            attention_mask_BxL = jnp.ones(input_ids_BxL.shape, bool)
        mask = attention_mask_BxL.astype(bool)
        return with_prompt(self.wte(input_ids_BxL), mask, prompt, slots, prompt_mask,
                           self.dtype)

    def forward(self, embeds_BxTxD, positions_BxT, key_mask_BxS, cache=None, cache_index=None,
                prefix=None):
        """Embedded tokens at ``positions`` -> (fp32 logits [B, T, vocab], cache).

        Without a cache S == T. With one, the T new tokens fill slots ``cache_index``..
        of a cache of S slots and ``key_mask_BxS`` says which slots hold real tokens.
        prefix: {"k", "v"} [L, B, P, H, Dh] keys attended (all, or those its "mask" [B, P]
        marks), before the slots; the tokens' positions are then shifted by the row's
        attended prefix keys (P).
        """
        B, T = embeds_BxTxD.shape[:2]
        P = prefix_length(prefix)
        key_mask = key_mask_BxS
        prefix, prefix_mask = prefix_keys(prefix, B)
        shift = 0
        if P:
            key_mask = jnp.concatenate([prefix_mask, key_mask_BxS], 1)
            # the tokens follow the real prefix keys (P of them unless some are masked)
            shift = jnp.sum(prefix_mask, axis=1, dtype=jnp.int32)[:, None]
        if cache is None:  # causality as a static pattern: the fused paths need no mask
            attn_mask = (None, KeyMask(key_mask, causal=True))
        else:  # the cache's causality moves with cache_index: one [1, 1, T, S] bias
            q_pos = cache_index + jnp.arange(T)
            causal_TxS = jnp.arange(key_mask_BxS.shape[1])[None, :] <= q_pos[:, None]
            if P:
                causal_TxS = jnp.concatenate([jnp.ones((T, P), bool), causal_TxS], 1)
            attn_mask = (jnp.where(causal_TxS, 0.0, MASK_VALUE)[None, None], KeyMask(key_mask))
        x = embeds_BxTxD + self.wpe(positions_BxT + shift)
        x = constrain_hidden(self.options, self.drop(x, deterministic=self.deterministic))
        x, cache = self.h(x, attn_mask, cache_index, (cache, prefix))
        x = constrain_hidden(self.options, self.ln_f(x))
        if self.hidden:
            return x.astype(jnp.float32), cache
        logits = tied_logits(x, self.wte.embedding, self.dtype)
        return self.options.constrain(logits, "batch", "length", "vocab"), cache

    def __call__(self, input_ids, attention_mask=None, prompt=None):
        """Logits [B, L, vocab] for the real input positions (prompt positions dropped).
        prompt: [P, D], [B, P, D] or ``PromptInputs``."""
        prompt = as_prompt_inputs(prompt)
        x, mask, P = self.embed(input_ids, attention_mask, prompt.embeds, prompt.slots,
                                prompt.embeds_mask)
        prefix = site_prefix(prompt, "decoder", input_ids.shape[0], self.dtype)
        logits, _ = self.forward(x, positions_from_mask(mask), mask, prefix=prefix)
        return logits[:, P:]


def positions_from_mask(mask_BxT):
    """Position of each token = number of attended tokens before it (pads clipped to 0)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def init_cache(config: GPT2Config, batch: int, max_len: int, dtype):
    """Zeros for the KV cache: {"k", "v"} each [layers, B, max_len, H, Dh]."""
    shape = (config.n_layer, batch, max_len, config.n_head, config.n_embd // config.n_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def hf_rules(config: GPT2Config):
    """{params path: Rule} mapping each ptjax parameter to its Hugging Face tensor."""
    n = config.n_layer
    rules = {
        ("wte", "embedding"): Rule("wte.weight"),
        ("wpe", "embedding"): Rule("wpe.weight"),
        ("ln_f", "scale"): Rule("ln_f.weight"),
        ("ln_f", "bias"): Rule("ln_f.bias"),
    }
    for ln in ("ln_1", "ln_2"):
        rules[("h", ln, "scale")] = Rule(f"h.{{i}}.{ln}.weight", layers=n)
        rules[("h", ln, "bias")] = Rule(f"h.{{i}}.{ln}.bias", layers=n)
    for idx, proj in enumerate("qkv"):  # c_attn fuses [q | k | v] on its output axis
        rules[("h", "attn", proj, "kernel")] = Rule(
            "h.{i}.attn.c_attn.weight", "conv1d", part=(idx, 3), layers=n)
        rules[("h", "attn", proj, "bias")] = Rule(
            "h.{i}.attn.c_attn.bias", part=(idx, 3), layers=n, flatten=True)
    rules[("h", "attn", "o", "kernel")] = Rule("h.{i}.attn.c_proj.weight", "conv1d", n_in=2,
                                               layers=n)
    rules[("h", "attn", "o", "bias")] = Rule("h.{i}.attn.c_proj.bias", layers=n)
    for name in ("c_fc", "c_proj"):
        rules[("h", name, "kernel")] = Rule(f"h.{{i}}.mlp.{name}.weight", "conv1d", layers=n)
        rules[("h", name, "bias")] = Rule(f"h.{{i}}.mlp.{name}.bias", layers=n)
    return rules
