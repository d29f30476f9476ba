"""``ptjax.load_model``: a frozen Flax T5 / GPT-2 / BERT (RoBERTa) with its params,
tokenizer and jitted ``logits`` / ``generate``.

The stable public API (outside checks call exactly this)::

    model = ptjax.load_model(path_or_hub_id, dtype="float32")
    model.config, model.params, model.tokenizer     # tokenizer may be None
    model.logits(params, input_ids, *, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, prompt=None, token_type_ids=None)
        -> [B, T, vocab]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
# transformers loads its submodules on first use (its lazy module): importing it is cheap
import transformers
from flax import traverse_util
from flax.linen import meta as nn_meta
from safetensors.flax import save_file

from ptjax.errors import PtjaxError
from ptjax.models import bert, checkpoint_files, gpt2, t5
from ptjax.models.common import ModelOptions, as_prompt_inputs
from ptjax.models.convert import load_params, to_hf_state_dict
from ptjax.models.generate import decoding, gpt2_generate, t5_generate
from ptjax.models.hf_config import family_of, hf_config_dict, read_hf_config
from ptjax.sharding import logical_rules
from ptjax.sharding import place as place_sharded
from ptjax.sharding import tree_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
    config: t5.T5Config | gpt2.GPT2Config | bert.BertConfig
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
    # layers written out instead of scanned: for counting FLOPs (``ModelOptions``)
    unroll_layers: bool = False

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.config, t5.T5Config)

    @property
    def kind(self) -> str:
        """"seq2seq" (T5: targets from the decoder), "causal" (GPT-2: targets after the
        input, scored left to right) or "masked" (BERT / RoBERTa: label words at the
        input's mask tokens)."""
        return kind_of(self.config)

    def module(self, *, deterministic: bool = True, remat: str | None = None,
               options: ModelOptions | None = None, **kw):
        """The Flax module; ``deterministic=False`` turns dropout on (needs a 'dropout' rng).
        remat: none | full | dots | dots_no_batch (default: ``self.remat``).
        options: ``ModelOptions`` (attention implementation, dropout rates); default:
        ``self.options()``."""
        cls = family_of(self.config).module
        if options is None:
            options = self.options()
        return cls(self.config, dtype=self.dtype, deterministic=deterministic,
                   remat=self.remat if remat is None else remat, options=options, **kw)

    def options(self, **kw) -> ModelOptions:
        """``ModelOptions(**kw)`` with this model's attention implementation and, on a mesh,
        its mesh and logical axis rules (activation sharding constraints)."""
        if self.mesh is not None:
            kw = dict(mesh=self.mesh, rules=logical_rules(self.fsdp),
                      platform=self.mesh.devices.flat[0].platform, **kw)
        return ModelOptions(attention=self.attention, unroll_layers=self.unroll_layers, **kw)

    @functools.cached_property
    def _jit_logits(self):
        return jax.jit(functools.partial(_logits, self.module(remat="none")))

    @functools.cached_property
    def _jit_generate(self):
        fn = t5_generate if self.is_encoder_decoder else gpt2_generate
        return jax.jit(functools.partial(fn, self.config, self.dtype, self.options()),
                       static_argnames=("max_new_tokens",))

    def logits(self, params, input_ids, *, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, prompt=None, token_type_ids=None):
        """fp32 logits over the real positions only, never the prompt's.

        input_ids / attention_mask: [B, L]. prompt: [P, D] shared or [B, P, D], or a
        ``PromptInputs`` (embeddings and/or per-layer prefix keys/values).
        T5: decoder_input_ids / decoder_attention_mask [B, T] -> [B, T, vocab].
        GPT-2: -> [B, L, vocab] (decoder_* must be None).
        BERT / RoBERTa: -> [B, L, vocab], the MLM head's; token_type_ids [B, L] (None: 0;
        only these take it).
        """
        if self.is_encoder_decoder:
            if decoder_input_ids is None:
                raise PtjaxError("T5 needs decoder_input_ids ([B, T] ids starting with "
                                 f"decoder_start_token_id={self.config.decoder_start_token_id})")
        elif decoder_input_ids is not None or decoder_attention_mask is not None:
            name = "GPT-2 is decoder-only" if self.kind == "causal" else \
                f"{self.config.model_type} is encoder-only"
            raise PtjaxError(f"{name}: pass input_ids/attention_mask, "
                             "not decoder_input_ids/decoder_attention_mask")
        if token_type_ids is not None and self.kind != "masked":
            raise PtjaxError(f"token_type_ids: {self.config.model_type} has no token types; "
                             "only BERT / RoBERTa take them")
        self.check_prompt(prompt, np.shape(input_ids)[1])
        if token_type_ids is not None:
            return self._jit_logits(params, input_ids, attention_mask, decoder_input_ids,
                                    decoder_attention_mask, prompt, token_type_ids)
        return self._jit_logits(params, input_ids, attention_mask, decoder_input_ids,
                                decoder_attention_mask, prompt)

    def generate(self, params, input_ids, *, attention_mask=None, prompt=None,
                 max_new_tokens: int = 32, num_beams: int = 1, num_return_sequences: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool | str = False,
                 do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 return_scores: bool = False):
        """Decoding with a KV cache -> new token ids [B, max_new_tokens].

        Greedy by default. num_beams > 1: beam search as transformers' ``generate`` (same
        scores, length_penalty, early_stopping), the best ``num_return_sequences`` beams of
        each input -> [B * num_return_sequences, max_new_tokens] (input b's in rows b*R ..);
        return_scores=True also returns their scores [B * R] (sum of log-probs / new tokens
        ** length_penalty). do_sample: softmax(logits / temperature) after top-k (0: off)
        and top-p (1.0: off), reproducible by seed; these three only with do_sample.
        Defaults are transformers' (temperature 1.0, top_k 50, top_p 1.0).

        After a row emits EOS it is filled with the pad id (EOS for GPT-2 without one).
        GPT-2 inputs must be left-padded so every row's context ends at the same slot.
        """
        if self.kind == "masked":
            raise PtjaxError(f"generate: {self.config.model_type} is a masked LM, which "
                             "predicts tokens at its input's mask tokens and has no "
                             "left-to-right decoding; use logits")
        dec = decoding(num_beams=num_beams, num_return_sequences=num_return_sequences,
                       length_penalty=length_penalty, early_stopping=early_stopping,
                       do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed)
        if return_scores and dec.num_beams == 1:
            raise PtjaxError("return_scores needs beam search (num_beams > 1): its scores are "
                             "the beams' length-penalised log-probabilities")
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise PtjaxError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        max_new_tokens = int(max_new_tokens)
        self.check_prompt(prompt, np.shape(input_ids)[1] + max_new_tokens)
        if attention_mask is None:
            attention_mask = jnp.ones(np.shape(input_ids), jnp.int32)
        kw = {} if dec.is_greedy else {"decoding": dec}  # greedy: the loop plan compiles
        out = self._jit_generate(params, input_ids, attention_mask, prompt,
                                 max_new_tokens=max_new_tokens, **kw)
        if dec.num_beams == 1:
            return out
        return out if return_scores else out[0]

    @property
    def prefix_sites(self) -> tuple:
        """Attention sites that take prefix keys/values (``PromptInputs.prefix``)."""
        return {"seq2seq": t5.SITES, "causal": gpt2.SITES, "masked": bert.SITES}[self.kind]

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
            if not self.is_encoder_decoder:  # its one site's keys take positions
                used += np.shape(kv["k"])[-3]
        limit = self.config.max_prompt_positions
        if limit is not None and used + length > limit:
            raise PtjaxError(f"prompt length {used} + sequence length {length} exceeds the "
                             f"model's {limit} positions")

    def save_pretrained(self, directory: str, params=None):
        """Write ``config.json`` + ``model.safetensors`` (+ tokenizer) in Hugging Face form."""
        os.makedirs(directory, exist_ok=True)
        params = self.params if params is None else params
        state = to_hf_state_dict(family_of(self.config).hf_rules(self.config), params)
        save_file({k: jnp.asarray(v) for k, v in state.items()},
                  os.path.join(directory, checkpoint_files.SAFETENSORS))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf_config_dict(self.config), f, indent=2)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def _logits(module, params, input_ids, attention_mask, decoder_input_ids,
            decoder_attention_mask, prompt, token_type_ids=None):
    variables = {"params": params}
    if isinstance(module, t5.T5):
        return module.apply(variables, input_ids, attention_mask, decoder_input_ids,
                            decoder_attention_mask, prompt)
    if isinstance(module, bert.BertMLM):
        return module.apply(variables, input_ids, attention_mask, prompt, token_type_ids)
    return module.apply(variables, input_ids, attention_mask, prompt)


def kind_of(config) -> str:
    """A config's model kind: "seq2seq", "causal" or "masked" (``Model.kind``)."""
    if isinstance(config, t5.T5Config):
        return "seq2seq"
    return "masked" if isinstance(config, bert.BertConfig) else "causal"


# ---------------------------------------------------------------- configs and loading


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


@functools.lru_cache(maxsize=32)
def _abstract_boxed(config, dtype):
    """The boxed (logically annotated) params tree of a config, shapes only. Traced once
    per config and dtype: loading a model asks for its shapes, axes and shardings, and
    tracing a large model's init takes seconds. (Configs are frozen dataclasses.)"""
    module = family_of(config).module(config, dtype)
    return jax.eval_shape(lambda: _boxed_init(module, jax.random.key(0)))


def abstract_params(config, dtype=jnp.float32):
    """The params tree of a config as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return nn_meta.unbox(_abstract_boxed(config, jnp.dtype(dtype)))


def param_logical_axes(config):
    """The params tree with each leaf's logical axis names, e.g. ("layers", "embed",
    "heads", "kv") for an attention query kernel."""
    return jax.tree.map(lambda b: tuple(b.names), _abstract_boxed(config, jnp.dtype("float32")),
                        is_leaf=lambda x: isinstance(x, nn_meta.Partitioned))


def param_shardings(config, mesh, rules):
    """NamedShardings of a config's params on ``mesh`` under logical axis ``rules``."""
    shapes = jax.tree.map(lambda s: tuple(s.shape), abstract_params(config))
    return tree_shardings(param_logical_axes(config), shapes, mesh, rules)


def load_model(path_or_hub_id: str, dtype="float32", *, mesh=None, fsdp: bool = False
               ) -> Model:
    """Load a Hugging Face T5 / GPT-2 / BERT / RoBERTa checkpoint into a frozen ptjax ``Model``.

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
    config_path, hf_config, family = read_hf_config(directory)
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


def load_tokenizer(directory: str):
    """The checkpoint's Hugging Face tokenizer, or None when it ships no tokenizer files."""
    if not any(os.path.exists(os.path.join(directory, f))
               for f in checkpoint_files.TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise PtjaxError(f"{directory}: tokenizer files are present but could not be loaded "
                         f"({type(e).__name__}: {checkpoint_files.first_line(e)})") from None


def count_params(tree) -> int:
    """Parameters in a tree of arrays or ``jax.ShapeDtypeStruct`` leaves."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
