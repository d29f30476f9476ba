"""P-tuning (Liu et al. 2021): prompt vectors [P, D] passed through a prompt encoder, the
result prepended to the embedded (encoder) input like a soft prompt.

Encoders, with PEFT's layouts and defaults (h = ``method.ptuning.hidden``, 0 = D):
  mlp:  Linear(D, h) ReLU Linear(h, h) ReLU Linear(h, D)
  lstm: 2-layer bidirectional LSTM(D -> h) -> Linear(2h, 2h) ReLU Linear(2h, D)
The prompt vectors are initialised like a soft prompt (``prompt.init``); the encoder's
Linear layers as torch initialises them. With ``tune_model: true`` the model's weights
train too, at their own learning rate (P-tuning's SuperGLUE recipe; one member, K = 1).

Export: the encoder's output per member as a soft prompt (prompts.npy, prompt-k/ with a
PEFT P_TUNING adapter in inference mode); model weights, when tuned, as ``model/``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptjax.config.schema import ENCODERS, PTuningConfig  # noqa: F401 (re-exported)
from ptjax.export import export_prompts
from ptjax.methods.base import Method, stack_members, uniform_init
from ptjax.methods.model import (export_weights, weights_for_forward, weights_init, weights_shapes,
                                 weights_shardings)
from ptjax.models.common import PromptInputs
from ptjax.optim import make_optimizer, per_prompt
from ptjax.prompts import initial_prompts


def _linear(rng, n_in, n_out):
    return {"w": uniform_init(rng, (n_in, n_out), n_in), "b": uniform_init(rng, (n_out,), n_in)}


def _dense(p, x):
    return x @ p["w"] + p["b"]


def lstm_direction(p, x_TxI, reverse: bool):
    """One direction of a torch-layout LSTM layer over [T, I] -> [T, h]. Gates (i, f, g,
    o) as torch orders them; p: w_ih [I, 4h], w_hh [h, 4h], b_ih, b_hh [4h]."""
    h_dim = p["w_hh"].shape[0]
    xs = x_TxI[::-1] if reverse else x_TxI
    pre = xs @ p["w_ih"] + p["b_ih"] + p["b_hh"]

    def cell(carry, pre_t):
        h, c = carry
        z = pre_t + h @ p["w_hh"]
        i, f, g, o = jnp.split(z, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((h_dim,), x_TxI.dtype)
    _, hs = jax.lax.scan(cell, (zeros, zeros), pre)
    return hs[::-1] if reverse else hs


def encode(member: dict, encoder: str):
    """The prompt encoder of one member -> the prompt [P, D] (fp32)."""
    x = member["embed"]
    if encoder == "mlp":
        mlp = member["mlp"]
        x = jax.nn.relu(_dense(mlp["l0"], x))
        x = jax.nn.relu(_dense(mlp["l1"], x))
        return _dense(mlp["l2"], x)
    for layer in ("l0", "l1"):
        p = member["lstm"][layer]
        x = jnp.concatenate([lstm_direction(p["fwd"], x, False),
                             lstm_direction(p["bwd"], x, True)], axis=-1)
    head = member["head"]
    return _dense(head["l1"], jax.nn.relu(_dense(head["l0"], x)))


class PTuningMethod(Method):
    name = "ptuning"
    summary = "prompt vectors through an MLP / biLSTM prompt encoder, prepended"
    prompt_init = True

    @property
    def packs(self) -> bool:  # type: ignore[override]
        return not self.settings.tune_model

    @property
    def tunes_weights(self) -> bool:  # type: ignore[override]
        return self.settings.tune_model

    @property
    def hidden(self) -> int:
        return self.settings.hidden or self.model_config.hidden_size

    def _member(self, rng, embed):
        D, h = self.model_config.hidden_size, self.hidden
        if self.settings.encoder == "mlp":
            return {"embed": embed, "mlp": {"l0": _linear(rng, D, h), "l1": _linear(rng, h, h),
                                            "l2": _linear(rng, h, D)}}
        lstm = {}
        for layer, n_in in (("l0", D), ("l1", 2 * h)):
            lstm[layer] = {d: {"w_ih": uniform_init(rng, (n_in, 4 * h), h),
                               "w_hh": uniform_init(rng, (h, 4 * h), h),
                               "b_ih": uniform_init(rng, (4 * h,), h),
                               "b_hh": uniform_init(rng, (4 * h,), h)}
                           for d in ("fwd", "bwd")}
        return {"embed": embed, "lstm": lstm,
                "head": {"l0": _linear(rng, 2 * h, 2 * h), "l1": _linear(rng, 2 * h, D)}}

    def init(self, model, cfg, task):
        table = initial_prompts(model, self.prompt, task, self.templates)
        # the encoder's weights draw from their own stream, after the prompt's seed
        members = [self._member(np.random.default_rng([seed, 1]), table[k])
                   for k, seed in enumerate(self.seeds)]
        tree = {"encoder": stack_members(members)}
        if self.tunes_weights:
            tree.update(weights_init(model))
        return tree

    def shapes(self):
        D = self.model_config.hidden_size
        member = jax.eval_shape(lambda: self._member(np.random.default_rng(0),
                                                     np.zeros((self.prompt.length, D),
                                                              np.float32)))
        tree = {"encoder": jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((self.K,) + tuple(s.shape), jnp.float32), member)}
        if self.tunes_weights:
            tree.update(weights_shapes(self.model_config))
        return tree

    def shardings(self, shapes, mesh, rules):
        out = super().shardings(shapes, mesh, rules)
        if self.tunes_weights:
            out.update(weights_shardings(self.model_config, mesh, rules))
        return out

    def inputs(self, member, frozen):
        params = frozen
        if self.tunes_weights:
            params = weights_for_forward(member, self.dtype)
        return params, PromptInputs(embeds=encode(member["encoder"], self.settings.encoder))

    def optimizer(self, optim_cfg, total_steps):
        tx = per_prompt(make_optimizer(optim_cfg, total_steps))
        if not self.tunes_weights:
            return tx
        model_tx = per_prompt(make_optimizer(dataclasses.replace(
            optim_cfg, learning_rate=self.settings.model_learning_rate), total_steps))
        # the weights at their own rate; the encoder (and a soft verbalizer) at the prompt's
        return optax.multi_transform(
            {"encoder": tx, "params": model_tx},
            lambda tree: {k: jax.tree.map(lambda _: "params" if k == "params" else "encoder", v)
                          for k, v in tree.items()})

    def positions(self) -> int:
        return self.prompt.length

    def describe(self, k: int) -> dict:
        inits = self.prompt.inits or (self.prompt.init,) * self.K
        return {"init": inits[k], "encoder": self.settings.encoder}

    def prompts(self, tree) -> np.ndarray:
        """The encoders' outputs [K, P, D]: what inference needs."""
        return np.asarray(jax.vmap(lambda m: encode(m, self.settings.encoder))(
            tree["encoder"]))

    def export(self, directory, best, model, base_model):
        table = self.prompts(best)
        paths = export_prompts(directory, table, model, base_model, self.peft_prepends)
        for path in paths if self.peft_prepends else ():  # as PEFT's P_TUNING adapter
            with open(os.path.join(path, "adapter_config.json")) as f:
                config = json.load(f)
            config.update(peft_type="P_TUNING", encoder_reparameterization_type=(
                self.settings.encoder.upper()), encoder_hidden_size=self.hidden,
                encoder_num_layers=2, encoder_dropout=0.0)
            for key in ("prompt_tuning_init", "prompt_tuning_init_text",
                        "tokenizer_name_or_path"):
                config.pop(key, None)
            with open(os.path.join(path, "adapter_config.json"), "w") as f:
                json.dump(config, f, indent=2)
        if self.tunes_weights:
            export_weights(directory, best, model)
