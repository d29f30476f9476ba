"""Model tuning (the paper's Figure 1 baseline): every weight of the model is trained, in
fp32 master copies cast to the model's dtype for the forward. One member (K = 1); the
weights keep their logical-axis shardings (behind the K axis) and so does Adam's state.

Export: ``model/``, the best weights as a Hugging Face checkpoint.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from ptjax.methods.base import Method
from ptjax.models.model import abstract_params, param_shardings


def weights_init(model) -> dict:
    """{"params": the model's weights as fp32 [1, ...] master copies}: a copy, since the
    state is donated and must not take the loaded model's buffers with it."""
    return {"params": jax.tree.map(lambda p: jnp.array(p, jnp.float32)[None], model.params)}


def weights_shapes(model_config) -> dict:
    return {"params": jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((1,) + tuple(s.shape), jnp.float32),
        abstract_params(model_config))}


def weights_shardings(model_config, mesh, rules) -> dict:
    """The weights' logical-axis shardings behind the K axis (and so Adam's state's)."""
    P = jax.sharding.PartitionSpec
    return {"params": jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, P(None, *s.spec)),
                                   param_shardings(model_config, mesh, rules))}


def weights_for_forward(member, dtype):
    """A member's fp32 master weights cast to the model's compute dtype."""
    return jax.tree.map(lambda p: p.astype(dtype), member["params"])


def export_weights(directory: str, best, model):
    """``directory``/model: the best weights as a Hugging Face checkpoint."""
    params = jax.tree.map(lambda p: jnp.asarray(p[0]).astype(model.dtype), best["params"])
    model.save_pretrained(os.path.join(directory, "model"), params=params)


class ModelMethod(Method):
    name = "model"
    packs = False
    tunes_weights = True
    summary = "every weight of the model trained"

    prompt_tokens = 0

    def init(self, model, cfg, task):
        return weights_init(model)

    def shapes(self):
        return weights_shapes(self.model_config)

    def shardings(self, shapes, mesh, rules):
        return weights_shardings(self.model_config, mesh, rules)

    def inputs(self, member, frozen):
        return weights_for_forward(member, self.dtype), None

    def export(self, directory, best, model, base_model):
        export_weights(directory, best, model)
