"""Flax (Linen) BERT / RoBERTa masked LM: word + token type + learned absolute position
embeddings, post-LN blocks with bidirectional attention, and the MLM head (dense,
activation, LayerNorm, then the word embeddings transposed plus a bias). One module for
both: RoBERTa is BERT with positions offset by ``pad_token_id + 1`` (Hugging Face's
``create_position_ids_from_input_ids``), one token type and a head that is always exact
gelu.

A soft prompt [P, D] takes the place of word embeddings before the input, with token type
0, and positions count from the prompt's first vector: the real tokens sit at P, P+1, ...
(after the offset), as when PEFT hands ``inputs_embeds`` with the prompt concatenated to
``BertForMaskedLM``. Positions count attended tokens (``cumsum(mask) - 1``, as ptjax's
GPT-2): for right-padded rows (BERT and RoBERTa tokenizers pad right) this is Hugging
Face's ``arange``; a pad's own position differs, and a pad is a masked key whose logits
nobody reads.

A prefix (prefix tuning, site "encoder") of P keys per layer shifts the tokens' positions
by P, Hugging Face's convention for a cache of P keys (``cache_length``), so PEFT's prefix
on a BERT gives the same logits.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ptjax.models.common import (ACTIVATIONS, KeyMask, ModelOptions, MultiHeadAttention,
                                 as_prompt_inputs, constrain_hidden, dropout, logical,
                                 prefix_keys, prefix_length, remat_layer, scan_layers,
                                 site_prefix, tied_logits, with_prompt)
from ptjax.models.convert import Rule
from ptjax.models.gpt2 import positions_from_mask

SITES = ("encoder",)  # where prefix keys/values can enter
ARCHITECTURES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture of a BERT / RoBERTa masked-LM checkpoint; names follow Hugging
    Face's BertConfig / RobertaConfig (``model_type`` says which)."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "bert"  # bert | roberta

    @property
    def position_offset(self) -> int:
        """The position of the first token: RoBERTa's start after its padding index."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @property
    def head_act(self) -> str:
        """The MLM head's activation: RobertaLMHead calls gelu whatever hidden_act says."""
        return "gelu" if self.model_type == "roberta" else self.hidden_act

    @property
    def max_prompt_positions(self) -> int:
        """Prompt + input must fit the learned position table (after RoBERTa's offset)."""
        return self.max_position_embeddings - self.position_offset


def layer_norm(cfg: BertConfig, dtype, name=None):
    return nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, name=name,
                        scale_init=logical(nn.initializers.ones, "embed"),
                        bias_init=logical(nn.initializers.zeros, "embed"))


def dense(features: int, dtype, name: str, axes):
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=logical(nn.initializers.lecun_normal(), *axes),
                    bias_init=logical(nn.initializers.zeros, axes[-1]))


class Layer(nn.Module):
    """One post-LN encoder layer: LN(x + attention(x)), then LN(x + ffn(x))."""
    config: BertConfig
    dtype: Any
    deterministic: bool
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x_BxTxD, mask, prefix):
        """mask: ``KeyMask`` over [prefix keys, tokens]; prefix: this layer's {"k", "v"}
        [B, P, H, Dh] or None."""
        cfg = self.config
        drop = dropout(self.options.hidden_rate(cfg.hidden_dropout_prob), self.options,
                       self.options.hidden_broadcast_dims)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        h, _ = MultiHeadAttention(
            num_heads=cfg.num_attention_heads, head_dim=head_dim, out_dim=cfg.hidden_size,
            dropout_rate=self.options.attention_rate(cfg.attention_probs_dropout_prob),
            dtype=self.dtype, deterministic=self.deterministic, use_bias=True,
            scale=head_dim ** -0.5, options=self.options,
            name="attn")(x_BxTxD, x_BxTxD, None, prefix=prefix, mask=mask)
        x_BxTxD = layer_norm(cfg, self.dtype, "attn_ln")(
            x_BxTxD + drop(h, deterministic=self.deterministic))
        h = dense(cfg.intermediate_size, self.dtype, "ffn_in", ("embed", "mlp"))(x_BxTxD)
        h_BxTxF = self.options.constrain(ACTIVATIONS[cfg.hidden_act](h),
                                         "batch", "length", "mlp")
        h = dense(cfg.hidden_size, self.dtype, "ffn_out", ("mlp", "embed"))(h_BxTxF)
        x_BxTxD = layer_norm(cfg, self.dtype, "ffn_ln")(
            x_BxTxD + drop(constrain_hidden(self.options, h), deterministic=self.deterministic))
        return constrain_hidden(self.options, x_BxTxD), None


class BertMLM(nn.Module):
    """BERT / RoBERTa with its MLM head. ``dtype`` is the compute dtype; logits are fp32."""
    config: BertConfig
    dtype: Any = jnp.float32
    deterministic: bool = True
    remat: str = "none"
    options: ModelOptions = ModelOptions()
    # the state the tied output embeddings meet (fp32 [B, T, D]: the last layer's after the
    # head's dense, activation and LayerNorm) in place of the logits (ptjax.verbalizers)
    hidden: bool = False

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                        embedding_init=logical(init, "vocab", "embed"))
        self.position_embeddings = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
            embedding_init=logical(init, "positions", "embed"))
        self.token_type_embeddings = nn.Embed(
            cfg.type_vocab_size, cfg.hidden_size, dtype=self.dtype,
            embedding_init=logical(init, None, "embed"))
        self.emb_ln = layer_norm(cfg, self.dtype)
        self.layers = scan_layers(remat_layer(Layer, self.remat), cfg.num_hidden_layers, 1,
                                  self.options.unroll_layers)(
            cfg, self.dtype, self.deterministic, self.options)
        self.head_dense = dense(cfg.hidden_size, self.dtype, "head_dense", ("embed", "mlp"))
        self.head_ln = layer_norm(cfg, self.dtype)
        self.head_bias = self.param("head_bias", logical(nn.initializers.zeros, "vocab"),
                                    (cfg.vocab_size,), jnp.float32)
        self.drop = dropout(self.options.hidden_rate(cfg.hidden_dropout_prob), self.options,
                            self.options.hidden_broadcast_dims)

    def embed(self, input_ids_BxL, attention_mask_BxL=None, prompt=None, slots=None,
              prompt_mask=None):
        """-> (word embeddings [B, P+L, D] with the prompt's vectors, mask [B, P+L], P);
        as ``GPT2.embed`` (``common.with_prompt``)."""
        if attention_mask_BxL is None:
            attention_mask_BxL = jnp.ones(input_ids_BxL.shape, bool)
        return with_prompt(self.word_embeddings(input_ids_BxL),
                           attention_mask_BxL.astype(bool), prompt, slots, prompt_mask,
                           self.dtype)

    def forward(self, embeds_BxTxD, positions_BxT, key_mask_BxT, token_types_BxT,
                prefix=None):
        """Word embeddings at ``positions`` (counted from 0: the offset and a prefix's shift
        are added here) -> fp32 logits [B, T, vocab] (with ``hidden``, the head's state).
        prefix: {"k", "v"} [L, B, P, H, Dh] keys attended (all, or those its "mask"
        [B, P] marks) before the tokens."""
        cfg = self.config
        B = embeds_BxTxD.shape[0]
        key_mask = key_mask_BxT
        prefix, prefix_mask = prefix_keys(prefix, B)
        shift = cfg.position_offset
        if prefix_length(prefix):
            key_mask = jnp.concatenate([prefix_mask, key_mask_BxT], 1)
            shift = shift + jnp.sum(prefix_mask, axis=1, dtype=jnp.int32)[:, None]
        x = (embeds_BxTxD + self.token_type_embeddings(token_types_BxT)
             + self.position_embeddings(positions_BxT + shift))
        x = self.drop(self.emb_ln(x), deterministic=self.deterministic)
        x, _ = self.layers(constrain_hidden(self.options, x), KeyMask(key_mask), prefix)
        h = ACTIVATIONS[cfg.head_act](self.head_dense(x))
        h = constrain_hidden(self.options, self.head_ln(h))
        if self.hidden:
            return h.astype(jnp.float32)
        logits = tied_logits(h, self.word_embeddings.embedding, self.dtype) + self.head_bias
        return self.options.constrain(logits, "batch", "length", "vocab")

    def __call__(self, input_ids, attention_mask=None, prompt=None, token_type_ids=None):
        """Logits [B, L, vocab] for the input positions (prompt positions dropped).
        prompt: [P, D], [B, P, D] or ``PromptInputs``; token_type_ids: [B, L] (None: 0)."""
        prompt = as_prompt_inputs(prompt)
        x, mask, P = self.embed(input_ids, attention_mask, prompt.embeds, prompt.slots,
                                prompt.embeds_mask)
        B, L = input_ids.shape
        types = (jnp.zeros((B, L), jnp.int32) if token_type_ids is None
                 else jnp.asarray(token_type_ids, jnp.int32))
        types = jnp.concatenate([jnp.zeros((B, P), jnp.int32), types], 1)  # prompt: type 0
        prefix = site_prefix(prompt, "encoder", B, self.dtype)
        logits = self.forward(x, positions_from_mask(mask), mask, types, prefix=prefix)
        return logits[:, P:]


def hf_rules(config: BertConfig):
    """{params path: Rule} mapping each ptjax parameter to its Hugging Face tensor, by
    the names ``BertForMaskedLM`` / ``RobertaForMaskedLM`` save (the decoder is tied to
    the word embeddings and its bias to the head's, so neither is read)."""
    n = config.num_hidden_layers
    base = config.model_type  # "bert." / "roberta."
    rules = {
        ("word_embeddings", "embedding"): Rule(f"{base}.embeddings.word_embeddings.weight"),
        ("position_embeddings", "embedding"): Rule(
            f"{base}.embeddings.position_embeddings.weight"),
        ("token_type_embeddings", "embedding"): Rule(
            f"{base}.embeddings.token_type_embeddings.weight"),
        ("emb_ln", "scale"): Rule(f"{base}.embeddings.LayerNorm.weight"),
        ("emb_ln", "bias"): Rule(f"{base}.embeddings.LayerNorm.bias"),
    }
    layer = f"{base}.encoder.layer.{{i}}"
    for proj, hf in (("q", "query"), ("k", "key"), ("v", "value")):
        rules[("layers", "attn", proj, "kernel")] = Rule(
            f"{layer}.attention.self.{hf}.weight", "linear", layers=n)
        rules[("layers", "attn", proj, "bias")] = Rule(
            f"{layer}.attention.self.{hf}.bias", layers=n, flatten=True)
    rules[("layers", "attn", "o", "kernel")] = Rule(
        f"{layer}.attention.output.dense.weight", "linear", n_in=2, layers=n)
    rules[("layers", "attn", "o", "bias")] = Rule(f"{layer}.attention.output.dense.bias",
                                                  layers=n)
    for name, hf in (("attn_ln", "attention.output.LayerNorm"), ("ffn_ln", "output.LayerNorm")):
        rules[("layers", name, "scale")] = Rule(f"{layer}.{hf}.weight", layers=n)
        rules[("layers", name, "bias")] = Rule(f"{layer}.{hf}.bias", layers=n)
    for name, hf in (("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense")):
        rules[("layers", name, "kernel")] = Rule(f"{layer}.{hf}.weight", "linear", layers=n)
        rules[("layers", name, "bias")] = Rule(f"{layer}.{hf}.bias", layers=n)
    if config.model_type == "roberta":
        dense_, ln, bias = "lm_head.dense", "lm_head.layer_norm", "lm_head.bias"
    else:
        dense_, ln = "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm"
        bias = "cls.predictions.bias"
    rules[("head_dense", "kernel")] = Rule(f"{dense_}.weight", "linear")
    rules[("head_dense", "bias")] = Rule(f"{dense_}.bias")
    rules[("head_ln", "scale")] = Rule(f"{ln}.weight")
    rules[("head_ln", "bias")] = Rule(f"{ln}.bias")
    rules[("head_bias",)] = Rule(bias)
    return rules
