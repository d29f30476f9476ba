"""Optax optimizers and learning-rate schedules from an ``OptimConfig`` (the paper's
Adafactor by default), and the per-member wrapper that gives each of K members its own
optimizer state."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ptjax.errors import PtjaxError


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
