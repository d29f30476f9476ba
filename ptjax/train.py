"""Prompt tuning (and model tuning) on a frozen model: loss, optimizer, the jitted step.

The trainable state is a small pytree; the frozen params are a separate argument of the
jitted step that is never donated, never updated and never given optimizer state::

    state = init_state(tx, {"prompt": table_KxPxD}, seed)
    step = make_train_step(model, tx, method="prompt", dropout=0.1)
    state, metrics = step(state, model.params, batch)   # state donated; params untouched

With K prompts (``[K, P, D]``) every train batch is seen by each prompt and the optimizer
is vmapped over K, so the K prompts train exactly as K separate runs would (own Adafactor
statistics, own gradient clipping), in one forward pass of K x B rows.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ptjax.errors import PtjaxError


@flax.struct.dataclass
class TrainState:
    """step: int32 []; trainable: {"prompt": [K, P, D] fp32} or {"params": ...};
    opt_state: the optimizer's state for ``trainable`` only; rng: uint32 [2]."""
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """cfg.schedule after ``cfg.warmup_steps`` of linear warm-up from 0."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    rest = max(total_steps - warm, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, 0.0, rest)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, rest)
    elif cfg.schedule == "rsqrt":  # T5's inverse square root, flat during warm-up
        def main(count):
            return lr * jnp.sqrt(max(warm, 1)) / jnp.sqrt(jnp.maximum(count + warm, max(warm, 1)))
    else:
        raise PtjaxError(f"unknown schedule {cfg.schedule!r}; valid: constant, linear, "
                         "cosine, rsqrt")
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """The Optax optimizer an ``OptimConfig`` names; defaults are the paper's Adafactor."""
    lr = learning_rate_schedule(cfg, total_steps)
    if cfg.name == "adafactor":
        tx = optax.adafactor(lr, decay_rate=cfg.decay_rate,
                             multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
                             clipping_threshold=cfg.clipping_threshold or None,
                             weight_decay_rate=cfg.weight_decay or None)
    elif cfg.name == "adam":
        tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "adamw":
        tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        tx = optax.sgd(lr)
    else:
        raise PtjaxError(f"unknown optimizer {cfg.name!r}; valid: adafactor, adam, adamw, sgd")
    if cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return tx


def per_prompt(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` vmapped over the leading K axis of every leaf: K independent optimizers."""
    return optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update))


def init_state(tx, trainable, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                      opt_state=tx.init(trainable), rng=jax.random.PRNGKey(seed))


def sequence_nll(model, params, batch, prompt_rows, rngs=None, deterministic=True):
    """Summed target-token NLL and target-token count per row: ([R], [R]) fp32.

    batch: arrays of ``ptjax.data.pipeline.encode`` with R rows; prompt_rows [R, P, D] or
    None. Padding and (for GPT-2) input tokens carry no loss.
    """
    module = model.module(deterministic=deterministic)
    variables = {"params": params}
    if model.is_encoder_decoder:
        logits = module.apply(variables, batch["input_ids"], batch["input_mask"],
                              batch["decoder_input_ids"], None, prompt_rows, rngs=rngs)
    else:
        logits = module.apply(variables, batch["input_ids"], batch["input_mask"], prompt_rows,
                              rngs=rngs)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                          batch["targets"])
    mask = batch["target_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def tile_rows(batch, k: int):
    """Every array [B, ...] -> [K*B, ...], prompt-major (rows k*B .. k*B+B-1 = prompt k)."""
    return jax.tree.map(lambda x: jnp.tile(x, (k,) + (1,) * (x.ndim - 1)), batch)


def prompt_rows(prompt_KxPxD, batch_size: int):
    """[K, P, D] -> [K*B, P, D], matching ``tile_rows``."""
    return jnp.repeat(prompt_KxPxD, batch_size, axis=0)


def loss_fn(model, method: str, trainable, frozen, batch, rng, dropout: float):
    """Sum over prompts of each prompt's mean target-token NLL, and the [K] per-prompt
    means. Summing keeps each prompt's gradient equal to that of its own mean loss."""
    deterministic = dropout == 0.0
    rngs = None if deterministic else {"dropout": rng}
    if method == "prompt":
        table = trainable["prompt"]
        K, B = table.shape[0], batch["input_ids"].shape[0]
        nll, count = sequence_nll(model, frozen, tile_rows(batch, K), prompt_rows(table, B),
                                  rngs, deterministic)
        per_k = nll.reshape(K, B).sum(1) / jnp.maximum(count.reshape(K, B).sum(1), 1.0)
    else:
        # fp32 master weights, cast to the model's dtype for the forward
        params = jax.tree.map(lambda p: p.astype(model.dtype), trainable["params"])
        nll, count = sequence_nll(model, params, batch, None, rngs, deterministic)
        per_k = (nll.sum() / jnp.maximum(count.sum(), 1.0))[None]
    return per_k.sum(), per_k


def make_train_step(model, tx, method: str = "prompt", dropout: float = 0.1):
    """The jitted step ``(state, frozen_params, batch) -> (state, {"loss": [K]})``.

    ``state`` is donated (its buffers are reused for the new state); ``frozen_params`` is
    only read. For model tuning pass ``frozen_params=None``: the weights are the state.
    """
    def step(state: TrainState, frozen, batch):
        rng, drop_rng = jax.random.split(state.rng)
        grads, per_k = jax.grad(
            functools.partial(loss_fn, model, method), has_aux=True)(
                state.trainable, frozen, batch, drop_rng, dropout)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                         rng=rng)
        return new, {"loss": per_k}

    return jax.jit(step, donate_argnums=(0,))


def trainable_params(model, method: str, prompt_table=None):
    """The trainable pytree of a method: {"prompt": [K, P, D]} or fp32 {"params": ...}."""
    if method == "prompt":
        return {"prompt": jnp.asarray(prompt_table, jnp.float32)}
    # a copy: the state is donated and must not take the loaded model's buffers with it
    return {"params": jax.tree.map(lambda p: jnp.array(p, jnp.float32), model.params)}
