"""Prompt exports: a ``.npy`` [P, D] (the official released prompts' form), a
safetensors file, and a PEFT prompt-tuning adapter directory.

    export/prompt-0/prompt.npy
    export/prompt-0/prompt.safetensors          {"prompt_embeddings": [P, D]}
    export/prompt-0/adapter_config.json         PEFT PROMPT_TUNING, base model = model.path
    export/prompt-0/adapter_model.safetensors
    export/prompts.npy                          all K prompts [K, P, D]

The PEFT adapter puts the prompt on the encoder only (``num_transformer_submodules=1``),
as in Lester et al.; PEFT's own seq2seq default would also prompt the decoder. A masked LM
(BERT / RoBERTa) gets task_type FEATURE_EXTRACTION: PEFT has no masked-LM task type, and
that one hands the prompted ``inputs_embeds`` (or the prefix as ``past_key_values``) to
``BertForMaskedLM`` as it is, returning its MLM logits.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from ptjax.prompts import PEFT_PROMPT_KEY


def peft_geometry(model) -> tuple[str, int, int]:
    """(PEFT task_type, num_layers, num_attention_heads) of an adapter for ``model``."""
    cfg = model.config
    if model.kind == "seq2seq":
        return "SEQ_2_SEQ_LM", cfg.num_layers, cfg.num_heads
    if model.kind == "masked":
        return "FEATURE_EXTRACTION", cfg.num_hidden_layers, cfg.num_attention_heads
    return "CAUSAL_LM", cfg.n_layer, cfg.n_head


def peft_adapter_config(model, length: int, base_model: str) -> dict:
    task_type, layers, heads = peft_geometry(model)
    return {
        "peft_type": "PROMPT_TUNING", "task_type": task_type, "num_virtual_tokens": length,
        "token_dim": model.config.hidden_size, "num_transformer_submodules": 1,
        "num_attention_heads": heads, "num_layers": layers, "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_model, "inference_mode": True, "revision": None,
    }


def export_prompt(directory: str, prompt_PxD, model, base_model: str, peft: bool = True) -> str:
    """Write one prompt [P, D] as .npy, safetensors and (``peft``) a PEFT adapter; returns
    directory."""
    table = np.asarray(prompt_PxD, np.float32)
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "prompt.npy"), table)
    save_file({PEFT_PROMPT_KEY: table}, os.path.join(directory, "prompt.safetensors"))
    if not peft:
        return directory
    save_file({PEFT_PROMPT_KEY: table}, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_adapter_config(model, table.shape[0], base_model), f, indent=2)
    return directory


def export_prompts(directory: str, table_KxPxD, model, base_model: str,
                   peft: bool = True) -> list[str]:
    """All K prompts: ``prompts.npy`` [K, P, D] and one ``prompt-k/`` export each; no PEFT
    adapter when ``peft`` is false (a template puts the prompt where PEFT cannot)."""
    table = np.asarray(table_KxPxD, np.float32)
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "prompts.npy"), table)
    return [export_prompt(os.path.join(directory, f"prompt-{k}"), p, model, base_model, peft)
            for k, p in enumerate(table)]
