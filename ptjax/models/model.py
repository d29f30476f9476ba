"""``ptjax.load_model``: a frozen Flax T5 / GPT-2 with its params, tokenizer and jitted
``logits`` / ``generate``.

The stable public API (outside checks call exactly this)::

    model = ptjax.load_model(path_or_hub_id, dtype="float32")
    model.config, model.params, model.tokenizer     # tokenizer may be None
    model.logits(params, input_ids, *, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, prompt=None) -> [B, T, vocab]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen import meta as nn_meta
from safetensors.flax import save_file
from transformers import AutoTokenizer

from ptjax.errors import PtjaxError
from ptjax.models import checkpoint_files, gpt2, t5
from ptjax.models.common import ACTIVATIONS, ModelOptions, as_prompt_inputs, site_prefix
from ptjax.models.convert import load_params, to_hf_state_dict
from ptjax.models.presets import preset
from ptjax.sharding import logical_rules
from ptjax.sharding import place as place_sharded
from ptjax.sharding import tree_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SUPPORTED_MODEL_TYPES = ("t5", "gpt2")


def _dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PtjaxError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A frozen language model: architecture, weights, tokenizer and its pure forward.

    ``params`` is a plain nested dict of arrays; per-layer weights carry a leading
    [layers] axis. ``logits`` and ``generate`` are jitted once per input shape.
    """
    config: t5.T5Config | gpt2.GPT2Config
    params: Any
    tokenizer: Any = None
    dtype: Any = jnp.float32
    path: str | None = None
    remat: str = "none"  # the default rematerialisation policy of ``module()`` (training)
    attention: str = "auto"  # auto | xla | cudnn | einsum (ptjax.models.attention)
    # the mesh the weights were placed on (and whether with fsdp): activations are pinned
    # to it by the same logical axis rules (``ModelOptions.constrain``); None = one device
    mesh: Any = None
    fsdp: bool = False

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.config, t5.T5Config)

    def module(self, *, deterministic: bool = True, remat: str | None = None,
               options: ModelOptions | None = None, **kw):
        """The Flax module; ``deterministic=False`` turns dropout on (needs a 'dropout' rng).
        remat: none | full | dots | dots_no_batch (default: ``self.remat``).
        options: ``ModelOptions`` (attention implementation, dropout rates); default:
        ``self.options()``."""
        cls = t5.T5 if self.is_encoder_decoder else gpt2.GPT2
        if options is None:
            options = self.options()
        return cls(self.config, dtype=self.dtype, deterministic=deterministic,
                   remat=self.remat if remat is None else remat, options=options, **kw)

    def options(self, **kw) -> ModelOptions:
        """``ModelOptions(**kw)`` with this model's attention implementation and, on a mesh,
        its mesh and logical axis rules (activation sharding constraints)."""
        if self.mesh is not None:
            kw = dict(mesh=self.mesh, rules=logical_rules(self.fsdp), **kw)
        return ModelOptions(attention=self.attention, **kw)

    @functools.cached_property
    def _jit_logits(self):
        return jax.jit(functools.partial(_logits, self.module(remat="none")))

    @functools.cached_property
    def _jit_generate(self):
        fn = _t5_generate if self.is_encoder_decoder else _gpt2_generate
        return jax.jit(functools.partial(fn, self.config, self.dtype, self.options()),
                       static_argnames=("max_new_tokens",))

    def logits(self, params, input_ids, *, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, prompt=None):
        """fp32 logits over the real positions only, never the prompt's.

        input_ids / attention_mask: [B, L]. prompt: [P, D] shared or [B, P, D], or a
        ``PromptInputs`` (embeddings and/or per-layer prefix keys/values).
        T5: decoder_input_ids / decoder_attention_mask [B, T] -> [B, T, vocab].
        GPT-2: -> [B, L, vocab] (decoder_* must be None).
        """
        if self.is_encoder_decoder:
            if decoder_input_ids is None:
                raise PtjaxError("T5 needs decoder_input_ids ([B, T] ids starting with "
                                 f"decoder_start_token_id={self.config.decoder_start_token_id})")
        elif decoder_input_ids is not None or decoder_attention_mask is not None:
            raise PtjaxError("GPT-2 is decoder-only: pass input_ids/attention_mask, "
                             "not decoder_input_ids/decoder_attention_mask")
        self.check_prompt(prompt, np.shape(input_ids)[1])
        return self._jit_logits(params, input_ids, attention_mask, decoder_input_ids,
                                decoder_attention_mask, prompt)

    def generate(self, params, input_ids, *, attention_mask=None, prompt=None,
                 max_new_tokens: int = 32):
        """Greedy decoding with a KV cache -> new token ids [B, max_new_tokens].

        After a row emits EOS it is filled with the pad id (EOS for GPT-2 without one).
        GPT-2 inputs must be left-padded so every row's context ends at the same slot.
        """
        self.check_prompt(prompt, np.shape(input_ids)[1] + max_new_tokens)
        if attention_mask is None:
            attention_mask = jnp.ones(np.shape(input_ids), jnp.int32)
        return self._jit_generate(params, input_ids, attention_mask, prompt,
                                  max_new_tokens=max_new_tokens)

    @property
    def prefix_sites(self) -> tuple:
        """Attention sites that take prefix keys/values (``PromptInputs.prefix``)."""
        return t5.SITES if self.is_encoder_decoder else gpt2.SITES

    def check_prompt(self, prompt, length: int):
        """One-line errors for a prompt of the wrong width or one that overflows positions."""
        if prompt is None:
            return
        prompt = as_prompt_inputs(prompt)
        D, used = self.config.hidden_size, 0
        if prompt.embeds is not None:
            shape = tuple(np.shape(prompt.embeds))
            if len(shape) not in (2, 3) or shape[-1] != D:
                raise PtjaxError(f"prompt has shape {shape}; expected [P, {D}] or [B, P, {D}]")
            used = 0 if prompt.slots is not None else shape[-2]
        for site, kv in (prompt.prefix or {}).items():
            if site not in self.prefix_sites:
                raise PtjaxError(f"prefix site {site!r} is not one of this model's: "
                                 f"{', '.join(self.prefix_sites)}")
            if site == "decoder" and not self.is_encoder_decoder:
                used += np.shape(kv["k"])[-3]
        limit = self.config.max_prompt_positions
        if limit is not None and used + length > limit:
            raise PtjaxError(f"prompt length {used} + sequence length {length} exceeds the "
                             f"model's {limit} positions")

    def save_pretrained(self, directory: str, params=None):
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer) in Hugging Face form."""
        os.makedirs(directory, exist_ok=True)
        params = self.params if params is None else params
        state = to_hf_state_dict(_family(self.config).hf_rules(self.config), params)
        save_file({k: jnp.asarray(v) for k, v in state.items()},
                  os.path.join(directory, checkpoint_files.SAFETENSORS))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf_config_dict(self.config), f, indent=2)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def _logits(module, params, input_ids, attention_mask, decoder_input_ids,
            decoder_attention_mask, prompt):
    variables = {"params": params}
    if isinstance(module, t5.T5):
        return module.apply(variables, input_ids, attention_mask, decoder_input_ids,
                            decoder_attention_mask, prompt)
    return module.apply(variables, input_ids, attention_mask, prompt)


def _greedy_loop(step, first_token_B, max_new_tokens, eos, pad, carry):
    """Run ``step(carry, token_B, i) -> (logits_BxV, carry)`` greedily until every row
    has emitted EOS or ``max_new_tokens`` are out. Returns ids [B, max_new_tokens]."""
    B = first_token_B.shape[0]
    tokens = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(first_token_B)
    done = first_token_B == eos

    def cond(state):
        i, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, done, carry = state
        logits, carry = step(carry, tokens[:, i - 1], i)
        nxt = jnp.where(done, pad, jnp.argmax(logits, -1).astype(jnp.int32))
        return i + 1, tokens.at[:, i].set(nxt), done | (nxt == eos), carry

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (1, tokens, done, carry))
    return tokens


def _cache_sharded(options: ModelOptions, cache):
    """A fresh KV cache ({"k", "v"} [L, B, S, H, Dh] leaves) split as the attention's keys
    and values are: rows on ``data``, heads on ``model``."""
    return jax.tree.map(
        lambda kv: options.constrain(kv, "layers", "batch", "length", "heads", "kv"), cache)


def _t5_generate(cfg, dtype, options, params, input_ids, attention_mask, prompt, *,
                 max_new_tokens):
    model = t5.T5(cfg, dtype, options=options)
    variables = {"params": params}
    enc, enc_mask = model.apply(variables, input_ids, attention_mask, prompt,
                                method=t5.T5.encode)
    B = input_ids.shape[0]
    cache = _cache_sharded(options, t5.init_cache(cfg, B, max_new_tokens, enc.shape[1], dtype))
    start = jnp.full((B, 1), cfg.decoder_start_token_id, jnp.int32)
    # The first step also fills the cross-attention keys/values, reused afterwards.
    logits, cache = t5.T5(cfg, dtype, prefill=True, options=options).apply(
        variables, start, None, enc, enc_mask, cache, 0, prompt, method=t5.T5.decode)

    def step(cache, token_B, i):
        logits, cache = model.apply(variables, token_B[:, None], None, enc, enc_mask, cache, i,
                                    prompt, method=t5.T5.decode)
        return logits[:, -1], cache

    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    return _greedy_loop(step, first, max_new_tokens, cfg.eos_token_id, cfg.pad_token_id, cache)


def _gpt2_generate(cfg, dtype, options, params, input_ids, attention_mask, prompt, *,
                   max_new_tokens):
    model = gpt2.GPT2(cfg, dtype, options=options)
    variables = {"params": params}
    prompt = as_prompt_inputs(prompt)
    x, mask, _ = model.apply(variables, input_ids, attention_mask, prompt.embeds,
                             prompt.slots, method=gpt2.GPT2.embed)
    B, T0 = mask.shape
    prefix = site_prefix(prompt, "decoder", B, dtype)
    # Slots after the context hold generated tokens, all attended.
    key_mask = jnp.concatenate([mask, jnp.ones((B, max_new_tokens), bool)], axis=1)
    cache = _cache_sharded(options, gpt2.init_cache(cfg, B, T0 + max_new_tokens, dtype))
    logits, cache = model.apply(variables, x, gpt2.positions_from_mask(mask), key_mask, cache, 0,
                                prefix, method=gpt2.GPT2.forward)
    n_real = jnp.sum(mask, axis=1, dtype=jnp.int32)

    def step(cache, token_B, i):
        emb = model.apply(variables, token_B[:, None], method=lambda m, t: m.wte(t))
        pos = (n_real + i - 1)[:, None]
        logits, cache = model.apply(variables, emb, pos, key_mask, cache, T0 + i - 1,
                                    prefix, method=gpt2.GPT2.forward)
        return logits[:, -1], cache

    first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    pad = cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    return _greedy_loop(step, first, max_new_tokens, cfg.eos_token_id, pad, cache)


# ---------------------------------------------------------------- configs and loading


def _require(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise PtjaxError(f"{where}: config.json has no {key!r}")
    return cfg[key]


def _t5_config(c: dict, weights, where: str) -> t5.T5Config:
    ff = c.get("feed_forward_proj", "relu")
    act = "gelu_new" if ff == "gated-gelu" else ff.split("-")[-1]
    if act not in ACTIVATIONS or len(ff.split("-")) > 2:
        raise PtjaxError(f"{where}: feed_forward_proj {ff!r} is not supported; valid: relu, "
                         f"gated-gelu or [gated-]{{{', '.join(ACTIVATIONS)}}}")
    num_layers = _require(c, "num_layers", where)
    # transformers 5 saves scale_decoder_outputs; older configs say tie_word_embeddings.
    scale = c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True) is not False)
    # A legacy v1.1 config (tie_word_embeddings false, no scale_decoder_outputs) promises
    # its own lm_head: never silently fall back to `shared` when it is missing.
    legacy_untied = "scale_decoder_outputs" not in c and c.get("tie_word_embeddings") is False
    if weights.has("lm_head.weight"):
        # .bin files store the tied head as a second name for the same tensor
        tie_lm_head = weights.has("shared.weight") and np.array_equal(
            weights.get("lm_head.weight"), weights.get("shared.weight"))
    else:
        tie_lm_head = not legacy_untied
    return t5.T5Config(
        vocab_size=_require(c, "vocab_size", where), d_model=_require(c, "d_model", where),
        d_kv=_require(c, "d_kv", where), d_ff=_require(c, "d_ff", where),
        num_layers=num_layers, num_decoder_layers=c.get("num_decoder_layers") or num_layers,
        num_heads=_require(c, "num_heads", where),
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6), feed_forward_proj=ff,
        scale_decoder_outputs=bool(scale), tie_lm_head=bool(tie_lm_head),
        dropout_rate=c.get("dropout_rate", 0.1), pad_token_id=c.get("pad_token_id", 0),
        eos_token_id=c.get("eos_token_id", 1),
        decoder_start_token_id=c.get("decoder_start_token_id", c.get("pad_token_id", 0)))


def _gpt2_config(c: dict, weights, where: str) -> gpt2.GPT2Config:
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c.get(flag):
            raise PtjaxError(f"{where}: config.json sets {flag}=true, which ptjax's GPT-2 does "
                             "not support")
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise PtjaxError(f"{where}: activation_function {act!r} is not supported; valid: "
                         f"{', '.join(ACTIVATIONS)}")
    return gpt2.GPT2Config(
        vocab_size=_require(c, "vocab_size", where), n_positions=_require(c, "n_positions", where),
        n_embd=_require(c, "n_embd", where), n_layer=_require(c, "n_layer", where),
        n_head=_require(c, "n_head", where), n_inner=c.get("n_inner"),
        activation_function=act, layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
        resid_pdrop=c.get("resid_pdrop", 0.1), embd_pdrop=c.get("embd_pdrop", 0.1),
        attn_pdrop=c.get("attn_pdrop", 0.1), scale_attn_weights=c.get("scale_attn_weights", True),
        bos_token_id=c.get("bos_token_id", 50256), eos_token_id=c.get("eos_token_id", 50256),
        pad_token_id=c.get("pad_token_id"))


@dataclasses.dataclass(frozen=True)
class _Family:
    config_from_hf: Any
    hf_rules: Any
    module: Any
    rename: Any = None


_FAMILIES = {
    "t5": _Family(_t5_config, t5.hf_rules, t5.T5),
    # GPT2LMHeadModel saves "transformer.h.0..."; the original hub files say "h.0...".
    "gpt2": _Family(_gpt2_config, gpt2.hf_rules, gpt2.GPT2,
                    rename=lambda k: k.removeprefix("transformer.")),
}


def _family(config) -> _Family:
    return _FAMILIES[config.model_type]


def hf_config_dict(config) -> dict:
    """A Hugging Face ``config.json`` dict for a ptjax config."""
    d = dataclasses.asdict(config)
    if isinstance(config, t5.T5Config):
        tie = d.pop("tie_lm_head")
        d["tie_word_embeddings"] = d["scale_decoder_outputs"]
        d["architectures"] = ["T5ForConditionalGeneration"]
        d["is_encoder_decoder"] = True
        if not tie and d["scale_decoder_outputs"]:
            raise PtjaxError("cannot save a T5 with both a separate lm_head and output "
                             "scaling in Hugging Face form")
    else:
        d["architectures"] = ["GPT2LMHeadModel"]
    return d


def param_shapes(config, dtype=jnp.float32) -> dict:
    """Flat {path: shape} of the params a config implies (no weights are made)."""
    shapes = abstract_params(config, dtype)
    return {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(shapes).items()}


def _boxed_init(module, rng):
    ids = jnp.ones((1, 2), jnp.int32)
    args = (ids, None, ids) if isinstance(module, t5.T5) else (ids,)
    return module.init(rng, *args)["params"]


def init_params(module, rng):
    """Random params for a module (used for the built-in tiny models and benchmarks)."""
    # jitted: eager init of scanned layers runs op by op and takes seconds
    return jax.jit(lambda r: nn_meta.unbox(_boxed_init(module, r)))(rng)


def abstract_params(config, dtype=jnp.float32):
    """The params tree of a config as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    module = _family(config).module(config, dtype)
    return jax.eval_shape(lambda: nn_meta.unbox(_boxed_init(module, jax.random.key(0))))


def param_logical_axes(config):
    """The params tree with each leaf's logical axis names, e.g. ("layers", "embed",
    "heads", "kv") for an attention query kernel."""
    module = _family(config).module(config)
    boxed = jax.eval_shape(lambda: _boxed_init(module, jax.random.key(0)))
    return jax.tree.map(lambda b: tuple(b.names), boxed,
                        is_leaf=lambda x: isinstance(x, nn_meta.Partitioned))


def param_shardings(config, mesh, rules):
    """NamedShardings of a config's params on ``mesh`` under logical axis ``rules``."""
    shapes = jax.tree.map(lambda s: tuple(s.shape), abstract_params(config))
    return tree_shardings(param_logical_axes(config), shapes, mesh, rules)


def load_model(path_or_hub_id: str, dtype="float32", *, mesh=None, fsdp: bool = False
               ) -> Model:
    """Load a Hugging Face T5 / GPT-2 checkpoint into a frozen ptjax ``Model``.

    path_or_hub_id: a directory with config.json and weights, or a hub id.
    dtype: "float32", "bfloat16" or "float16": the weights' and activations' dtype
      (softmax, norms' variance and logits stay fp32).
    mesh: a ``jax.sharding.Mesh`` with axes (data, model): each weight goes straight from
      the file into its sharded array (``ptjax.sharding`` rules; ``fsdp`` also splits the
      embed axis over data), one weight at a time, so a model never sits whole on one
      device or in host memory.
    """
    jdtype = _dtype(dtype)
    directory = checkpoint_files.resolve(path_or_hub_id)
    config_path, hf_config = _read_hf_config(directory)
    model_type = hf_config.get("model_type")
    if model_type not in _FAMILIES:
        raise PtjaxError(f"{config_path}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    family = _FAMILIES[model_type]
    weights = checkpoint_files.Weights(directory)
    if family.rename:
        weights.rename(family.rename)
    where = os.path.join(directory, weights.filename)
    config = family.config_from_hf(hf_config, weights, config_path)
    if mesh is not None:
        shardings = traverse_util.flatten_dict(
            param_shardings(config, mesh, logical_rules(fsdp)))
        place = lambda path, array: place_sharded(array, shardings[path])  # noqa: E731
    else:
        place = lambda path, array: jnp.asarray(array)  # noqa: E731
    params = load_params(family.hf_rules(config), param_shapes(config), weights.get,
                         weights.has, jdtype, where, place)
    return Model(config=config, params=params, tokenizer=load_tokenizer(directory),
                 dtype=jdtype, path=directory, mesh=mesh, fsdp=fsdp)


class _NoWeights:
    def has(self, key):
        return False


def architecture(path_or_hub_id: str):
    """A checkpoint's config without reading its weights: from a local config.json, the
    built-in table of the paper's checkpoints (``ptjax.models.presets``), or the hub's
    config.json alone."""
    path = os.path.expanduser(str(path_or_hub_id))
    if not os.path.isdir(path):
        known = preset(path_or_hub_id)
        if known is not None:
            return known
        path = checkpoint_files.download_config(path_or_hub_id)
    config_path, hf_config = _read_hf_config(path)
    model_type = hf_config.get("model_type")
    if model_type not in _FAMILIES:
        raise PtjaxError(f"{config_path}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    config = _FAMILIES[model_type].config_from_hf(hf_config, _NoWeights(), config_path)
    if model_type == "t5":  # without weights: v1.0 ties and rescales, v1.1 does neither
        config = dataclasses.replace(config, tie_lm_head=config.scale_decoder_outputs)
    return config


def _read_hf_config(directory: str) -> tuple[str, dict]:
    """(path, contents) of a checkpoint's config.json, or a one-line error naming it."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise PtjaxError(f"{config_path}: not found; a checkpoint directory needs config.json")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except ValueError as e:
        raise PtjaxError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise PtjaxError(f"{config_path}: must hold a JSON object, got "
                         f"{type(hf_config).__name__}")
    return config_path, hf_config


def load_tokenizer(directory: str):
    """The checkpoint's Hugging Face tokenizer, or None when it ships no tokenizer files."""
    if not any(os.path.exists(os.path.join(directory, f))
               for f in checkpoint_files.TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise PtjaxError(f"{directory}: tokenizer files are present but could not be loaded "
                         f"({type(e).__name__}: {checkpoint_files.first_line(e)})") from None


def count_params(tree) -> int:
    """Parameters in a tree of arrays or ``jax.ShapeDtypeStruct`` leaves."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
