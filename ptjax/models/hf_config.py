"""Hugging Face ``config.json`` <-> ptjax's T5 / GPT-2 / BERT configs, and each model family's
conversion rules and Flax module."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from ptjax.errors import PtjaxError
from ptjax.models import bert, checkpoint_files, gpt2, t5
from ptjax.models.common import ACTIVATIONS
from ptjax.models.presets import preset

SUPPORTED_MODEL_TYPES = ("t5", "gpt2", "bert", "roberta")


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


def _bert_config(c: dict, weights, where: str) -> bert.BertConfig:
    model_type = c["model_type"]
    for key, valid in (("position_embedding_type", "absolute"), ("is_decoder", False),
                       ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if c.get(key, valid) != valid:
            raise PtjaxError(f"{where}: config.json sets {key}={c[key]!r}; ptjax's "
                             f"{model_type} masked LM supports only {valid!r}")
    act = c.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise PtjaxError(f"{where}: hidden_act {act!r} is not supported; valid: "
                         f"{', '.join(ACTIVATIONS)}")
    defaults = (dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
                if model_type == "roberta" else
                dict(pad_token_id=0, bos_token_id=None, eos_token_id=None))
    return bert.BertConfig(
        vocab_size=_require(c, "vocab_size", where),
        hidden_size=_require(c, "hidden_size", where),
        num_hidden_layers=_require(c, "num_hidden_layers", where),
        num_attention_heads=_require(c, "num_attention_heads", where),
        intermediate_size=_require(c, "intermediate_size", where), hidden_act=act,
        hidden_dropout_prob=c.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=c.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=c.get("max_position_embeddings", 512),
        type_vocab_size=c.get("type_vocab_size", 2),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        **{k: c.get(k, v) for k, v in defaults.items()}, model_type=model_type)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family converts: its config from a config.json dict, its weight
    rules, its Flax module, and a rename of checkpoint keys (or None)."""
    config_from_hf: Any
    hf_rules: Any
    module: Any
    rename: Any = None


FAMILIES = {
    "t5": Family(_t5_config, t5.hf_rules, t5.T5),
    # GPT2LMHeadModel saves "transformer.h.0..."; the original hub files say "h.0...".
    "gpt2": Family(_gpt2_config, gpt2.hf_rules, gpt2.GPT2,
                    rename=lambda k: k.removeprefix("transformer.")),
    # BertForMaskedLM / RobertaForMaskedLM, by the names they save (``bert.hf_rules``)
    "bert": Family(_bert_config, bert.hf_rules, bert.BertMLM),
    "roberta": Family(_bert_config, bert.hf_rules, bert.BertMLM),
}


def family_of(config) -> Family:
    """The family of a ptjax config (T5Config / GPT2Config / BertConfig)."""
    return FAMILIES[config.model_type]


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
    elif isinstance(config, bert.BertConfig):
        d["architectures"] = [bert.ARCHITECTURES[config.model_type]]
    else:
        d["architectures"] = ["GPT2LMHeadModel"]
    return d


class NoWeights:
    """A checkpoint with no weights read (an architecture from config.json alone)."""

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
    config_path, hf_config, family = read_hf_config(path)
    config = family.config_from_hf(hf_config, NoWeights(), config_path)
    if config.model_type == "t5":  # without weights: v1.0 ties and rescales, v1.1 does neither
        config = dataclasses.replace(config, tie_lm_head=config.scale_decoder_outputs)
    return config


def read_hf_config(directory: str) -> tuple[str, dict, Family]:
    """(path, contents, family) of a checkpoint's config.json, or a one-line error naming
    it (missing, not JSON, or a model_type ptjax does not support)."""
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
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise PtjaxError(f"{config_path}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config_path, hf_config, FAMILIES[model_type]
