"""Pieces shared by the Flax T5 and GPT-2 modules.

Shape suffixes follow nanodo: ``B`` batch, ``T`` query length, ``S`` key length,
``H`` heads, ``Dh`` head size, ``D`` model width, ``P`` prompt length, ``L`` layers. (``K``
is reserved for the number of members, prompts or prefixes, trained together.)

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv``,
``mlp``, ``layers``, ...); ``ptjax.sharding`` maps them to mesh axes with one table.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ptjax.models.attention import (MASK_VALUE, KeyMask, ModelOptions,  # noqa: F401
                                    einsum_attention, fused_attention, resolve)

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class PromptInputs:
    """What a prompt method feeds the frozen model; any part may be None.

    embeds: [P, D] (shared) or [B, P, D] input embeddings prepended to the input (T5: the
      encoder's), as in prompt tuning and P-tuning.
    prefix: {site: {"k": kv, "v": kv}} keys and values prepended at every layer of an
      attention site, kv [L, P, H, Dh] (shared) or [L, B, P, H, Dh] (prefix tuning).
      Sites: T5 "encoder" (self-attention), "decoder" (self-attention), "cross" (decoder
      cross-attention); GPT-2 "decoder".
    slots: [B, L] int, set by a template's soft slots: where ``embeds`` go *inside* the
      input (the index of the vector at each place, -1 for a token), instead of before it.
    embeds_mask: [B, P] bool, which prepended vectors are real (None: all). Rows of
      several runs share a batch (``ptjax.multirun``) with their prompts left-padded to
      one P: a padded vector is a masked key, and as it sits before the real ones the
      relative distances (T5) and positions (GPT-2, from the mask) stay the run's own.
      With it, no row has both prompt vectors and an encoder prefix, and T5 puts the
      encoder prefix keys just before the tokens (after the prompt slots); with ``slots``
      too the vectors go both where the slots say and, where this mask says, before the
      input (rows of runs with and without soft slots share the batch; a row of the
      former has its mask all False, one of the latter its slots all -1).
      A site's prefix may likewise carry "mask" [B, P] bool next to "k" / "v" (a row
      whose run has no prefix there has it all False).
    """
    embeds: Any = None
    prefix: Any = None
    slots: Any = None
    embeds_mask: Any = None


def as_prompt_inputs(prompt) -> PromptInputs:
    """A bare [P, D] / [B, P, D] array (the public ``prompt=`` argument) or PromptInputs."""
    if prompt is None or isinstance(prompt, PromptInputs):
        return prompt if prompt is not None else PromptInputs()
    return PromptInputs(embeds=prompt)


def site_prefix(prompt: PromptInputs, site: str, batch: int, dtype):
    """One site's prefix as {"k", "v"} [L, B, P, H, Dh] in ``dtype`` (and its "mask"
    [B, P] bool if it has one), or None."""
    if prompt.prefix is None or prompt.prefix.get(site) is None:
        return None
    out = {}
    for name in ("k", "v"):
        kv = prompt.prefix[site][name]
        if kv.ndim == 4:
            kv = jnp.broadcast_to(kv[:, None], (kv.shape[0], batch) + kv.shape[1:])
        elif kv.ndim != 5 or kv.shape[1] != batch:
            raise ValueError(f"prefix {site}.{name} must have shape [L, P, H, Dh] or "
                             f"[L, {batch}, P, H, Dh], got {tuple(kv.shape)}")
        out[name] = kv.astype(dtype)
    if prompt.prefix[site].get("mask") is not None:
        out["mask"] = jnp.asarray(prompt.prefix[site]["mask"]).astype(bool)
    return out


def prefix_keys(prefix, batch: int):
    """A site prefix (``site_prefix``) -> (its {"k", "v"}, what the scanned layers take,
    and the mask of its keys [B, P] bool: all True unless the prefix carries one), or
    (None, None) without a prefix."""
    if prefix is None:
        return None, None
    mask = prefix.get("mask")
    if mask is None:
        mask = jnp.ones((batch, prefix["k"].shape[2]), bool)
    return {"k": prefix["k"], "v": prefix["v"]}, mask


def embeds_key_mask(prompt: PromptInputs, batch: int, length: int):
    """The key mask [B, P] of prepended prompt vectors: ``prompt.embeds_mask`` or all
    True."""
    if prompt.embeds_mask is None:
        return jnp.ones((batch, length), bool)
    return jnp.asarray(prompt.embeds_mask).astype(bool)


def place_embeds(x_BxLxD, prompt: PromptInputs, dtype):
    """Token embeddings with a template's soft vectors put at their slots ([B, L, D])."""
    B = x_BxLxD.shape[0]
    embeds_BxPxD = broadcast_prompt(prompt.embeds, B, dtype)
    slots = prompt.slots
    picked = jnp.take_along_axis(embeds_BxPxD, jnp.maximum(slots, 0)[..., None], axis=1)
    return jnp.where((slots >= 0)[..., None], picked, x_BxLxD)


def with_prompt(x_BxLxD, mask_BxL, prompt, slots, prompt_mask, dtype):
    """Token embeddings and their mask with a prompt -> (embeddings [B, P+L, D], mask
    [B, P+L], P): prompt vectors [P, D] / [B, P, D] go before the input, or, with a
    template's ``slots`` [B, L], inside it (P = 0). prompt_mask: [B, P] bool, which prompt
    vectors are real (None: all); with slots too (a mixed batch), the vectors also go
    before the input where it says."""
    if slots is not None and prompt is not None:
        x_BxLxD = place_embeds(x_BxLxD, PromptInputs(embeds=prompt, slots=slots), dtype)
        if prompt_mask is None:  # else a mixed batch: prepended too, where the mask says
            return x_BxLxD, mask_BxL, 0
    if prompt is None:
        return x_BxLxD, mask_BxL, 0
    prompt_BxPxD = broadcast_prompt(prompt, x_BxLxD.shape[0], dtype)
    x = jnp.concatenate([prompt_BxPxD, x_BxLxD], axis=1)
    B, P = prompt_BxPxD.shape[:2]
    mask = jnp.concatenate([embeds_key_mask(PromptInputs(embeds_mask=prompt_mask), B, P),
                            mask_BxL], axis=1)
    return x, mask, P


def prefix_length(prefix) -> int:
    """P of a site prefix from ``site_prefix`` (0 for None)."""
    return 0 if prefix is None else prefix["k"].shape[2]


def broadcast_prompt(prompt: jax.Array, batch: int, dtype) -> jax.Array:
    """A prompt of shape [P, D] (shared) or [B, P, D] -> [B, P, D] in ``dtype``."""
    if prompt.ndim == 2:
        prompt = jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
    elif prompt.ndim != 3 or prompt.shape[0] != batch:
        raise ValueError(
            f"prompt must have shape [P, D] or [{batch}, P, D], got {tuple(prompt.shape)}")
    return prompt.astype(dtype)


def constrain_hidden(options: ModelOptions, x_BxTxD):
    """A hidden state [batch, length, embed] pinned to its sharding on the options' mesh
    (rows on ``data``; ``ModelOptions.constrain``)."""
    return options.constrain(x_BxTxD, "batch", "length", "embed")


def logical(init, *axes: str | None):
    """``init`` whose parameter is annotated with logical axis names, one per dimension."""
    return nn.with_logical_partitioning(init, axes)


def remat_layer(layer_cls, remat: str):
    """Wrap a layer class in ``nn.remat`` with the named policy ('none' = no remat; 'auto'
    is resolved by ``ptjax.aot.auto_remat`` from the compiled step's memory, see
    ``ptjax.aot.choose_remat``)."""
    if remat == "auto":  # resolved by ptjax.aot.auto_remat for the train step; a forward
        return layer_cls  # pass alone (evaluation) has nothing to rematerialise
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; valid: {sorted(REMAT_POLICIES)}")
    if remat == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)


def scan_layers(layer_cls, length: int, n_broadcast: int, unroll: bool = False):
    """Stack ``length`` copies of ``layer_cls`` with ``nn.scan``.

    The layer is called as ``layer(carry, *broadcast_args, per_layer_xs)`` and returns
    ``(carry, per_layer_ys)``; parameters get a leading [layers] axis, each layer gets its
    own dropout rng, and ``per_layer_xs`` (a KV cache, or None) is sliced on axis 0.
    The stacked axis is the logical axis ``layers``. ``unroll`` (``ModelOptions.
    unroll_layers``) writes out every layer: the same arithmetic, counted whole by XLA's
    cost analysis.
    """
    return nn.scan(
        layer_cls,
        # intermediates: ``capture_intermediates`` sees every layer (prefix text init)
        variable_axes={"params": 0, "intermediates": 0},
        metadata_params={nn.PARTITION_NAME: "layers"},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * n_broadcast + (0,),
        length=length,
        unroll=length if unroll else 1,
    )


class Dropout(nn.Module):
    """Flax's ``nn.Dropout`` with one key per row: row b's mask is drawn from the layer's
    dropout key folded with ``rows[b]`` (its index in the whole train batch; None = 0..B-1).
    A row's mask then does not depend on which other rows share its batch, so a step split
    into microbatches draws the masks of the whole batch (``ptjax.train``), and a mesh
    draws those of one device. Axis 0 is the rows; ``broadcast_dims`` (never 0) share a mask.

    With threefry keys this costs what one mask for the batch costs (the same bits, plus a
    fold per row). ``rbg`` / ``unsafe_rbg`` keys are the exception: jax batches XLA's
    RngBitGenerator by drawing every row's bits from the first row's key, so their masks
    depend on the first row of the (micro)batch (valid masks, but a microbatched step's
    differ from the whole batch's).
    """
    rate: float
    broadcast_dims: tuple = ()
    rows: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:  # no 0/0 in the gradient
            return jnp.zeros_like(x)
        dims = {d % x.ndim for d in self.broadcast_dims}
        if 0 in dims:
            raise ValueError("Dropout: axis 0 is the rows, each with its own mask; it "
                             "cannot be a broadcast dim")
        keep = 1.0 - self.rate
        row_shape = tuple(1 if d in dims else n for d, n in enumerate(x.shape))[1:]
        rng = self.make_rng("dropout")
        rows = jnp.arange(x.shape[0]) if self.rows is None else self.rows
        mask = jax.vmap(lambda r: jax.random.bernoulli(jax.random.fold_in(rng, r), keep,
                                                       row_shape))(rows)
        return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / keep, jnp.zeros_like(x))


def dropout(rate: float, options: ModelOptions, broadcast_dims=()) -> Dropout:
    """A ``Dropout`` at ``rate`` that reads each row's index from ``options``."""
    return Dropout(rate, tuple(broadcast_dims), options.dropout_rows)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; variance in fp32."""
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD):
        scale = self.param("scale", logical(nn.initializers.ones, "embed"),
                           (x_BxTxD.shape[-1],), jnp.float32)
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x.astype(self.dtype) * scale.astype(self.dtype)


class Unembed(nn.Module):
    """Output projection [D] -> [vocab] with fp32 logits whatever the compute dtype."""
    vocab_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD):
        kernel = self.param("kernel", logical(nn.initializers.lecun_normal(), "embed", "vocab"),
                            (x_BxTxD.shape[-1], self.vocab_size), jnp.float32)
        return jnp.einsum("btd,dv->btv", x_BxTxD.astype(self.dtype), kernel.astype(self.dtype),
                          preferred_element_type=jnp.float32)


def tied_logits(x_BxTxD, embedding_VxD, dtype):
    """Logits against a tied input embedding, accumulated and returned in fp32."""
    return jnp.einsum("btd,vd->btv", x_BxTxD.astype(dtype), embedding_VxD.astype(dtype),
                      preferred_element_type=jnp.float32)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with an optional KV cache, used by T5 and GPT-2.

    Parameters ``q``/``k``/``v`` have kernels [D, H, Dh] and ``o`` has [H, Dh, D], so heads
    are an explicit axis for tensor-parallel sharding.

    Cache semantics (``cache`` is ``{"k": [B, S, H, Dh], "v": [B, S, H, Dh]}`` or None):
      * self-attention: the new keys/values of ``x`` are written at ``cache_index`` and
        the query attends over the whole cache (``mask`` masks unwritten slots);
      * cross-attention (``cross=True``): keys/values of ``kv`` are computed once when
        ``prefill`` is set and read from the cache afterwards.

    ``prefix`` ({"k", "v"} [B, P, H, Dh], prefix tuning) is prepended to the keys and values
    after the cache, never written into it; ``bias`` and ``mask`` then cover S = P + keys.
    ``bias``: None, an additive array or a tuple of parts broadcastable to [B, H, T, S];
    ``mask``: a ``KeyMask`` (or None). The core (einsum / xla / cudnn) is chosen by
    ``ptjax.models.attention.resolve`` from ``options``.
    """
    num_heads: int
    head_dim: int
    out_dim: int
    dropout_rate: float
    dtype: jnp.dtype
    deterministic: bool
    use_bias: bool = False
    scale: float = 1.0
    cross: bool = False
    prefill: bool = False
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x_BxTxD, kv_BxSxD, bias_BxHxTxS, cache=None, cache_index=None,
                 prefix=None, mask=None):
        def proj(name):
            return nn.DenseGeneral(
                (self.num_heads, self.head_dim), use_bias=self.use_bias, dtype=self.dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), "embed", "heads", "kv"),
                bias_init=logical(nn.initializers.zeros, "heads", "kv"), name=name)

        # heads split on the model axis, as the q/k/v/o kernels are (Megatron layout)
        def by_heads(a_BxTxHxDh):
            return self.options.constrain(a_BxTxHxDh, "batch", "length", "heads", "kv")

        q_BxTxHxDh = by_heads(proj("q")(x_BxTxD))
        if self.cross and cache is not None and not self.prefill:
            k_BxSxHxDh, v_BxSxHxDh = cache["k"], cache["v"]
        else:
            k_BxSxHxDh, v_BxSxHxDh = proj("k")(kv_BxSxD), proj("v")(kv_BxSxD)
        if cache is not None and not self.cross:
            start = (0, cache_index, 0, 0)
            k_BxSxHxDh = jax.lax.dynamic_update_slice(
                cache["k"], k_BxSxHxDh.astype(cache["k"].dtype), start)
            v_BxSxHxDh = jax.lax.dynamic_update_slice(
                cache["v"], v_BxSxHxDh.astype(cache["v"].dtype), start)
        k_BxSxHxDh, v_BxSxHxDh = by_heads(k_BxSxHxDh), by_heads(v_BxSxHxDh)
        new_cache = None if cache is None else {"k": k_BxSxHxDh, "v": v_BxSxHxDh}
        if prefix is not None:
            k_BxSxHxDh = by_heads(jnp.concatenate(
                [prefix["k"].astype(k_BxSxHxDh.dtype), k_BxSxHxDh], 1))
            v_BxSxHxDh = by_heads(jnp.concatenate(
                [prefix["v"].astype(v_BxSxHxDh.dtype), v_BxSxHxDh], 1))

        dropout_active = not self.deterministic and self.dropout_rate > 0.0
        impl = resolve(self.options, head_dim=self.head_dim, dtype=self.dtype,
                       T=q_BxTxHxDh.shape[1], S=k_BxSxHxDh.shape[1],
                       dropout_active=dropout_active, cached=cache is not None)
        if impl == "einsum":
            # T5X's broadcast_dropout: one mask for every query ([B, H, 1, S])
            drop = dropout(self.dropout_rate, self.options,
                           (2,) if self.options.broadcast_dropout else ())
            out_BxTxHxDh = einsum_attention(
                q_BxTxHxDh, k_BxSxHxDh, v_BxSxHxDh, bias_BxHxTxS, mask, scale=self.scale,
                dtype=self.dtype,
                dropout=lambda w: drop(w, deterministic=not dropout_active))
        else:
            out_BxTxHxDh = fused_attention(
                q_BxTxHxDh.astype(self.dtype), k_BxSxHxDh, v_BxSxHxDh, bias_BxHxTxS, mask,
                scale=self.scale, implementation=impl)
        out_BxTxHxDh = by_heads(out_BxTxHxDh)
        out_BxTxD = nn.DenseGeneral(
            self.out_dim, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), "heads", "kv", "embed"),
            bias_init=logical(nn.initializers.zeros, "embed"), name="o")(out_BxTxHxDh)
        return self.options.constrain(out_BxTxD, "batch", "length", "embed"), new_cache
