"""Attention cores behind one call, chosen per attention site.

    out_BxTxHxDh = attend(q_BxTxHxDh, k_BxSxHxDh, v_BxSxHxDh, bias_parts, mask, ...)

Implementations (``ModelOptions.attention``, config key ``model.attention``):
  einsum  fp32 [B, H, T, S] scores + additive parts + fp32 softmax + dropout on the
          probabilities: the only one with attention dropout, and the one KV-cache
          decoding uses.
  xla     ``jax.nn.dot_product_attention(implementation="xla")``: the same arithmetic, with
          the key mask as a boolean ``mask`` (no fp32 mask bias is built).
  cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")``: fused flash attention
          on NVIDIA GPUs. The position bias is one bf16 [1, H, T, S] array (an fp32 bias
          gave NaN gradients on H100, jax #32242), padding goes in as
          ``key_value_seq_lengths`` and causality (bottom-right aligned, so prefix keys stay
          visible) is folded into that bias: nothing of size [B, H, T, S] is built.
          Needs attention dropout 0, bf16 / fp16, a head size that is a multiple of 8 and
          <= 256, right-padded keys (valid keys first), which ptjax's pipeline gives, and
          even query and key lengths: jax 0.10.2 replaces ``bias=None`` by a zeros(0)
          placeholder before its flash-attention check, so cuDNN's backward pass asks for
          even T and S with or without a bias (an odd length failed while tracing).
  auto    cudnn when the step is compiled for a GPU (the platform of the model's mesh,
          else the default backend: a plan for an H100 made on a CPU chooses cuDNN) and
          all of the above hold, else xla; einsum whenever attention dropout is active
          (training with ``attention_dropout > 0``) or a KV cache is in use.

T5 numerics are kept on every path: scores and softmax in fp32, masked keys get no weight
(a row whose keys are all masked, a padding query, gets uniform weights, as before).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ptjax.errors import PtjaxError
from ptjax.sharding import constrain

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")

# Added to the scores of masked keys. Finite (unlike -inf) so that a row with every key
# masked (a padding query) softmaxes to uniform weights instead of NaN.
MASK_VALUE = -1e10


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a model runs (not what it is): a static, hashable module attribute.

    attention: auto | xla | cudnn | einsum (see the module docstring).
    dropout: hidden dropout rate in training (embeddings, residual branches, MLP); None =
      the checkpoint's own rate (T5 ``dropout_rate``, GPT-2 ``resid_pdrop`` /
      ``embd_pdrop``).
    attention_dropout: dropout on the attention probabilities; None = the checkpoint's
      rate (T5 ``dropout_rate``, GPT-2 ``attn_pdrop``), as Hugging Face applies it.
      Anything above 0 forces the einsum path in training.
    broadcast_dropout: T5X's masks: hidden masks shared over the sequence ([B, 1, D]),
      attention masks shared over the queries ([B, H, 1, S]); far fewer random bits.
    right_padded: every key-mask row is ones then zeros (ptjax's pipeline pads on the
      right); only then may ``cudnn`` take padding as sequence lengths. The public
      ``Model.logits`` accepts any mask and leaves this False.
    mesh, rules: where activations are pinned by ``constrain`` (the model's mesh and the
      logical axis rules its weights were placed with); None = nowhere (no mesh).
    platform: what the step is compiled for ("gpu", "tpu", "cpu": the mesh's devices',
      which may be a target without the hardware); None = ``jax.default_backend()``.
    unroll_layers: the layer stacks unrolled instead of scanned (same arithmetic): XLA's
      cost analysis counts a loop body once, so FLOPs are counted on this form.
    dropout_rows: int [B], each row's index in the whole train batch, or None (= 0..B-1):
      row b's dropout masks are drawn from its own key, the layer's folded with
      ``dropout_rows[b]`` (``common.Dropout``), so a microbatch's rows get exactly the masks
      they get in the whole batch (``train.microbatches``). The one field that may be a
      traced array: it is left out of equality and the hash.
    """
    attention: str = "auto"
    dropout: float | None = None
    attention_dropout: float | None = None
    broadcast_dropout: bool = False
    right_padded: bool = False
    mesh: Any = None
    rules: tuple = ()
    platform: str | None = None
    unroll_layers: bool = False
    dropout_rows: Any = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {self.attention!r}; "
                             f"valid: {', '.join(IMPLEMENTATIONS)}")

    def hidden_rate(self, checkpoint_rate: float) -> float:
        return checkpoint_rate if self.dropout is None else self.dropout

    def attention_rate(self, checkpoint_rate: float) -> float:
        return checkpoint_rate if self.attention_dropout is None else self.attention_dropout

    @property
    def hidden_broadcast_dims(self) -> tuple:
        return (-2,) if self.broadcast_dropout else ()

    def constrain(self, x, *axes: str | None):
        """Activation ``x`` pinned to the sharding its logical ``axes`` name on ``mesh``
        (``ptjax.sharding.constrain``); ``x`` untouched without a multi-device mesh."""
        return constrain(x, axes, self.mesh, self.rules)


@flax.struct.dataclass
class KeyMask:
    """Which keys each query may attend, without building [B, H, T, S].

    keys_BxS: bool, False = padding key (prefix keys included, always True).
    causal: static; query t (of T) may attend keys s <= t + S - T (bottom-right aligned:
      with P prefix keys and T tokens, query t sees the prefix and tokens 0..t).
    """
    keys_BxS: jax.Array
    causal: bool = flax.struct.field(pytree_node=False, default=False)

    def dense(self, T: int):
        """bool [B, 1, T, S] (True = attend), or [B, 1, 1, S] when not causal."""
        keys = self.keys_BxS[:, None, None, :]
        if not self.causal:
            return keys
        return keys & causal_TxS(T, keys.shape[-1])[None, None]


def causal_TxS(T: int, S: int):
    """bool [T, S]: query t attends keys s <= t + S - T."""
    return jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)


def mask_bias(mask) -> jax.Array:
    """Boolean mask (True = attend) -> additive fp32 bias of the same shape."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


def platform(options: ModelOptions) -> str:
    """The platform a step with these options is compiled for: "gpu", "tpu" or "cpu"."""
    return options.platform or jax.default_backend()


def cudnn_serves(options: ModelOptions, *, head_dim: int, dtype, T: int, S: int) -> bool:
    """Whether cuDNN's fused attention can take this call (see the module docstring)."""
    return (platform(options) == "gpu" and options.right_padded
            and head_dim % 8 == 0 and head_dim <= 256
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and T % 2 == 0 and S % 2 == 0)


def resolve(options: ModelOptions, *, head_dim: int, dtype, T: int, S: int,
            dropout_active: bool, cached: bool) -> str:
    """The implementation one attention call uses (see the module docstring)."""
    if dropout_active or cached:
        return "einsum"  # only einsum drops probabilities; decoding steps are tiny
    if options.attention == "cudnn" and platform(options) != "gpu":
        raise PtjaxError(f"model.attention=cudnn needs an NVIDIA GPU, and this step is "
                         f"compiled for {platform(options)}; use model.attention=auto (cuDNN "
                         "where it can serve) or xla, or plan for a GPU: ptjax plan --target "
                         "h100")
    if options.attention != "auto":
        return options.attention
    return "cudnn" if cudnn_serves(options, head_dim=head_dim, dtype=dtype, T=T, S=S) \
        else "xla"


def _parts(bias):
    if bias is None:
        return ()
    return bias if isinstance(bias, tuple) else (bias,)


def einsum_attention(q_BxTxHxDh, k_BxSxHxDh, v_BxSxHxDh, bias, mask, *, scale, dtype,
                     dropout: nn.Module | None = None):
    """The reference path: fp32 scores, additive parts, fp32 softmax, dropout, values.
    bias: None, an array or a tuple of parts broadcastable to [B, H, T, S]; mask: a
    ``KeyMask``, a boolean array broadcastable to [B, H, T, S], or None."""
    scores = jnp.einsum("bthk,bshk->bhts", q_BxTxHxDh, k_BxSxHxDh.astype(dtype),
                        preferred_element_type=jnp.float32)
    if scale != 1.0:
        scores = scores * scale
    if isinstance(mask, KeyMask):
        mask = mask.dense(q_BxTxHxDh.shape[1])
    parts = _parts(bias) + (() if mask is None else (mask_bias(mask),))
    for part in parts:
        scores = scores + part  # parts broadcast to [B, H, T, S]; XLA fuses the adds
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bhts,bshk->bthk", weights, v_BxSxHxDh.astype(dtype))


def _summed(parts, dtype):
    out = None
    for part in parts:
        out = part if out is None else out + part
    return None if out is None else out.astype(dtype)


def fused_attention(q_BxTxHxDh, k_BxSxHxDh, v_BxSxHxDh, bias, mask: KeyMask | None, *,
                    scale, implementation: str):
    """``jax.nn.dot_product_attention`` with ptjax's bias parts and key mask.

    bias parts must not carry a batch axis larger than 1 on the cudnn path (T5's relative
    bias is [1, H, T, S]); the key mask is a boolean ``mask`` for xla and sequence lengths
    (plus causality folded into the bias) for cudnn.
    """
    T, S = q_BxTxHxDh.shape[1], k_BxSxHxDh.shape[1]
    k, v = k_BxSxHxDh.astype(q_BxTxHxDh.dtype), v_BxSxHxDh.astype(q_BxTxHxDh.dtype)
    parts = _parts(bias)
    if implementation == "xla":
        # fp32 bias keeps the scores' arithmetic that of the einsum path
        return jax.nn.dot_product_attention(
            q_BxTxHxDh, k, v, bias=_summed(parts, jnp.float32),
            mask=None if mask is None else mask.dense(T), scale=scale, implementation="xla")
    if implementation != "cudnn":
        raise ValueError(f"fused_attention: unknown implementation {implementation!r}")
    lengths = None if mask is None else jnp.sum(mask.keys_BxS, axis=1, dtype=jnp.int32)
    q, k, v, lengths = _batched_alike(q_BxTxHxDh, k, v, lengths)
    q_lengths = None
    is_causal = False
    if mask is not None:
        # Every query is valid (ptjax pads keys only). Given explicitly, derived from the
        # key lengths so it carries their batch axis (jax's own [B] placeholder has none).
        q_lengths = lengths * 0 + T
        if mask.causal and T == S and not parts:
            is_causal = True  # cuDNN skips the masked blocks (top-left = bottom-right here)
        elif mask.causal:
            # half the dtype's largest value: far below any score, finite in bf16 / fp16
            low = -0.5 * float(jnp.finfo(q_BxTxHxDh.dtype).max)
            parts = parts + (jnp.where(causal_TxS(T, S), 0.0, low)[None, None],)
    return jax.nn.dot_product_attention(
        q, k, v, bias=_summed(parts, q.dtype), scale=scale, is_causal=is_causal,
        query_seq_lengths=q_lengths, key_value_seq_lengths=lengths, implementation="cudnn")


def _batched_alike(q, k, v, lengths):
    """The cuDNN call's operands, each plus an exact zero taken from all of q, k and v.

    Under the K members' vmap some operands are batched and some are not (the key
    lengths never are; a site's keys may not depend on the member). jax 0.10.2's batching
    rules for cuDNN attention assume they all carry the vmapped axis: otherwise tracing
    fails, forward ("cannot reshape array of shape (8,) into shape (40,)": the lengths)
    and backward (a gradient with an extra axis). ``where(False, x, 0)`` is 0 whatever x
    holds and is batched wherever x is, so every operand becomes batched alike; outside
    vmap, and in value, nothing changes (XLA folds it away)."""
    zero = sum(jnp.where(False, x[(0,) * x.ndim], 0).astype(jnp.float32) for x in (q, k, v))
    return (q + zero.astype(q.dtype), k + zero.astype(k.dtype), v + zero.astype(v.dtype),
            None if lengths is None else lengths + zero.astype(jnp.int32))
