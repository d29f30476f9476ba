"""Prefix tuning (Li & Liang 2021): trained keys and values prepended at every layer.

Sites (``method.prefix.sites``): T5 "encoder" (self-attention), "decoder" (self-attention)
and "cross" (decoder cross-attention): the paper's [PREFIX; x; PREFIX'; y]; GPT-2
"decoder". Each site has its own stack of L layers x (key, value) x H heads x Dh (T5's
d_kv, which need not be d_model / H).

Reparameterisation (``projection: true``, the paper's): per site P' [P, k] -> Linear(k, h)
-> tanh -> Linear(h, L x 2 x H x Dh); ``projection: false`` trains [P, L x 2 x H x Dh]
directly (P-tuning v2, PEFT without projection). The last axis is ordered (layer,
key/value, head, head dim), PEFT's layout, so exports load into PEFT unchanged.

Checkpoints hold the reparameterisation (exact resume); the export holds the materialised
prefix of each member, plus a PEFT PREFIX_TUNING adapter where PEFT can express it.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from ptjax.config.schema import PREFIX_INITS, PrefixConfig  # noqa: F401 (re-exported)
from ptjax.errors import PtjaxError
from ptjax.export import peft_geometry
from ptjax.methods.base import Method, stack_members, uniform_init
from ptjax.models.common import PromptInputs
from ptjax.models.model import kind_of
from ptjax.prompts import strip_special


def site_geometry(config, site: str) -> tuple[int, int, int]:
    """(layers L, heads H, head size Dh) of an attention site."""
    if config.model_type == "t5":
        layers = config.num_layers if site == "encoder" else config.num_decoder_layers
        return layers, config.num_heads, config.d_kv
    if kind_of(config) == "masked":
        H = config.num_attention_heads
        return config.num_hidden_layers, H, config.hidden_size // H
    return config.n_layer, config.n_head, config.n_embd // config.n_head


def model_sites(config) -> tuple:
    return {"seq2seq": ("encoder", "decoder", "cross"), "causal": ("decoder",),
            "masked": ("encoder",)}[kind_of(config)]


def peft_site(config) -> str:
    """The site a PEFT prefix (``past_key_values``) enters: the decoder's self-attention,
    a masked LM's (encoder) self-attention."""
    return "encoder" if kind_of(config) == "masked" else "decoder"


def materialise(site_params: dict, geometry) -> dict:
    """One member's site parameters -> {"k", "v"} [L, P, H, Dh] (fp32)."""
    L, H, Dh = geometry
    if "kv" in site_params:
        flat = site_params["kv"]
    else:
        hidden = jnp.tanh(site_params["embed"] @ site_params["w1"] + site_params["b1"])
        flat = hidden @ site_params["w2"] + site_params["b2"]
    kv = flat.reshape(flat.shape[0], L, 2, H, Dh)  # [P, L, k/v, H, Dh]
    return {"k": jnp.transpose(kv[:, :, 0], (1, 0, 2, 3)),
            "v": jnp.transpose(kv[:, :, 1], (1, 0, 2, 3))}


def flatten_kv(kv: dict) -> np.ndarray:
    """{"k", "v"} [L, P, H, Dh] -> PEFT's [P, L x 2 x H x Dh]."""
    k, v = np.asarray(kv["k"]), np.asarray(kv["v"])
    L, P, H, Dh = k.shape
    both = np.stack([k, v], axis=2)  # [L, P, 2, H, Dh]
    return np.transpose(both, (1, 0, 2, 3, 4)).reshape(P, L * 2 * H * Dh)


class PrefixMethod(Method):
    name = "prefix"
    summary = "keys/values prepended at every layer (MLP reparameterisation)"

    @property
    def sites(self) -> tuple:
        return tuple(self.settings.sites) or model_sites(self.model_config)

    @property
    def embed_dim(self) -> int:
        return self.settings.embed_dim or self.model_config.hidden_size

    def _site_shapes(self, site) -> dict:
        L, H, Dh = site_geometry(self.model_config, site)
        P, out = self.prompt.length, L * 2 * H * Dh
        if not self.settings.projection:
            return {"kv": (P, out)}
        k, h = self.embed_dim, self.settings.hidden
        return {"embed": (P, k), "w1": (k, h), "b1": (h,), "w2": (h, out), "b2": (out,)}

    def shapes(self):
        return {"prefix": {site: {name: jax.ShapeDtypeStruct((self.K,) + shape, jnp.float32)
                                  for name, shape in self._site_shapes(site).items()}
                           for site in self.sites}}

    def check(self, model):
        valid = model_sites(self.model_config)
        for site in self.settings.sites:
            if site not in valid:
                raise PtjaxError(f"method.prefix.sites has {site!r}; this "
                                 f"{self.model_config.model_type} model's sites are "
                                 f"{', '.join(valid)}")
        if len(set(self.sites)) != len(self.sites):
            raise PtjaxError(f"method.prefix.sites={list(self.sites)} names a site twice")

    def init(self, model, cfg, task):
        targets = _text_targets(self, model) if self.settings.init == "text" else None
        members = []
        for seed in self.seeds:
            rng = np.random.default_rng(seed)
            member = {}
            for site in self.sites:
                shapes = self._site_shapes(site)
                if "kv" in shapes:  # PEFT: an nn.Embedding, N(0, 1)
                    p = {"kv": rng.standard_normal(shapes["kv"]).astype(np.float32)}
                    if targets is not None:
                        p["kv"] = targets[site]
                else:
                    k, h = shapes["w1"]
                    p = {"embed": rng.standard_normal(shapes["embed"]).astype(np.float32),
                         "w1": uniform_init(rng, shapes["w1"], k),
                         "b1": uniform_init(rng, shapes["b1"], k),
                         "w2": uniform_init(rng, shapes["w2"], h),
                         "b2": uniform_init(rng, shapes["b2"], h)}
                    if targets is not None:
                        p = _fit_output_layer(p, targets[site])
                member[site] = p
            members.append(member)
        return {"prefix": stack_members(members)}

    def inputs(self, member, frozen):
        prefix = {site: materialise(member["prefix"][site],
                                    site_geometry(self.model_config, site))
                  for site in self.sites}
        return frozen, PromptInputs(prefix=prefix)

    def positions(self) -> int:  # GPT-2's / BERT's tokens follow the prefix's P positions
        if kind_of(self.model_config) == "seq2seq":  # T5's positions are relative
            return self.prompt.length if "decoder" in self.sites else 0
        return self.prompt.length

    def materialised(self, member) -> dict:
        """{site: {"k", "v"} [L, P, H, Dh]} as numpy, for export and inference."""
        return {site: {n: np.asarray(a) for n, a in materialise(
            member["prefix"][site], site_geometry(self.model_config, site)).items()}
            for site in self.sites}

    def export(self, directory, best, model, base_model):
        """prefix-k/prefix.safetensors ({site}.k / {site}.v [L, P, H, Dh]) per member, and
        a PEFT PREFIX_TUNING adapter where PEFT can express the prefix: GPT-2, BERT /
        RoBERTa (FEATURE_EXTRACTION, ``ptjax.export``), and T5 with
        the decoder self-attention site alone, as many decoder as encoder layers, an odd
        number of them (``peft_layer_slots``) and d_kv x heads = d_model."""
        os.makedirs(directory, exist_ok=True)
        for k in range(self.K):
            out = os.path.join(directory, f"prefix-{k}")
            os.makedirs(out, exist_ok=True)
            kv = self.materialised(self.member(best, k))
            save_file({f"{site}.{n}": np.ascontiguousarray(a) for site, d in kv.items()
                       for n, a in d.items()}, os.path.join(out, "prefix.safetensors"))
            if peft_expressible(self.model_config, self.sites):
                write_peft_prefix(out, flatten_kv(kv[peft_site(self.model_config)]), model,
                                  base_model)


def peft_layer_slots(config) -> np.ndarray:
    """Column order taking PEFT's flat prefix [P, N x 2 x H x Dh] to ptjax's decoder layers.

    GPT-2: layer n reads PEFT's slot n. T5: PEFT builds an encoder-decoder cache by
    concatenating two copies of its N layer slots and cutting them in fours (self k, v,
    cross k, v), so decoder layer n reads slot 2n mod N, and the cross half is dropped:
    only an odd N gives every layer a slot of its own."""
    L, H, Dh = site_geometry(config, peft_site(config))
    width = 2 * H * Dh
    slots = [(2 * n) % L for n in range(L)] if config.model_type == "t5" else range(L)
    return np.concatenate([np.arange(s * width, (s + 1) * width) for s in slots])


def peft_expressible(config, sites) -> bool:
    """Whether a PEFT PREFIX_TUNING adapter can hold this prefix exactly."""
    if kind_of(config) != "seq2seq":  # PEFT's past_key_values: the one site, every layer
        return tuple(sites) == model_sites(config)
    heads_fit = config.d_kv * config.num_heads == config.d_model  # PEFT sizes Dh = D / H
    return (tuple(sites) == ("decoder",) and config.num_decoder_layers == config.num_layers
            and config.num_layers % 2 == 1 and heads_fit)


def write_peft_prefix(directory: str, flat_PxF, model, base_model: str):
    """A PEFT PREFIX_TUNING adapter holding the materialised prefix (inference mode)."""
    cfg = model.config
    task_type, layers, heads = peft_geometry(model)
    dim = cfg.hidden_size
    peft_flat = flat_PxF[:, np.argsort(peft_layer_slots(cfg))]  # ptjax layer n -> its slot
    save_file({"prompt_embeddings": np.ascontiguousarray(peft_flat, np.float32)},
              os.path.join(directory, "adapter_model.safetensors"))
    config = {"peft_type": "PREFIX_TUNING", "task_type": task_type,
              "num_virtual_tokens": int(flat_PxF.shape[0]), "token_dim": dim,
              "num_transformer_submodules": 2 if model.is_encoder_decoder else 1,
              "num_attention_heads": heads,
              "num_layers": layers, "encoder_hidden_size": dim, "prefix_projection": False,
              "base_model_name_or_path": base_model, "inference_mode": True,
              "revision": None}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _text_targets(method, model) -> dict:
    """{site: [P, L x 2 x H x Dh]}: the frozen model's own keys and values of
    ``prompt.text`` at every layer (token ids tiled cyclically to P, PEFT's TEXT rule),
    Li & Liang's initialisation from real words' activations."""
    if not method.prompt.text:
        raise PtjaxError("method.prefix.init=text needs prompt.text (the words whose keys "
                         "and values initialise the prefix)")
    ids = np.resize(np.asarray(strip_special(model.tokenizer, method.prompt.text)),
                    method.prompt.length)[None]
    kv = model_keys_values(model, ids)
    return {site: flatten_kv({n: a[:, 0] for n, a in kv[site].items()})
            for site in method.sites}


def model_keys_values(model, ids_BxT) -> dict:
    """{site: {"k", "v"} [L, B, T, H, Dh]} the frozen model computes for ``ids`` (T5: the
    same ids feed encoder and decoder; cross keys are projections of the encoder states)."""
    ids = jnp.asarray(ids_BxT, jnp.int32)
    module = model.module()
    args = (ids, None, ids) if model.is_encoder_decoder else (ids,)
    _, state = module.apply({"params": model.params}, *args, capture_intermediates=True,
                            mutable=["intermediates"])
    inter = state["intermediates"]
    if model.is_encoder_decoder:
        where = {"encoder": inter["encoder"]["layers"]["attn"],
                 "decoder": inter["decoder"]["layers"]["self_attn"],
                 "cross": inter["decoder"]["layers"]["cross_attn"]}
    else:
        where = {"decoder": inter["h"]["attn"]}
    return {site: {n: np.asarray(node[n]["__call__"][0], np.float32) for n in ("k", "v")}
            for site, node in where.items()}


def _fit_output_layer(p: dict, target_PxF: np.ndarray) -> dict:
    """Solve the second Linear so the MLP's output equals ``target`` exactly at init:
    tanh(P' W1 + b1) [P, h] has rank P <= h, so W2 = lstsq(hidden, target), b2 = 0."""
    hidden = np.tanh(p["embed"] @ p["w1"] + p["b1"]).astype(np.float64)
    w2, *_ = np.linalg.lstsq(hidden, target_PxF.astype(np.float64), rcond=None)
    return dict(p, w2=w2.astype(np.float32), b2=np.zeros_like(p["b2"]))
