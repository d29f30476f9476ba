"""Prompt tuning (Lester et al. 2021): K soft prompts [K, P, D] prepended to the embedded
(encoder) input of the frozen model. Config: the ``prompt`` section (length, init, seeds).

Export: ``prompts.npy`` [K, P, D] and per prompt ``prompt-k/`` with prompt.npy,
prompt.safetensors and a PEFT PROMPT_TUNING adapter (see ``ptjax.export``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ptjax.export import export_prompts
from ptjax.methods.base import Method
from ptjax.models.common import PromptInputs
from ptjax.prompts import initial_prompts


class PromptMethod(Method):
    name = "prompt"
    summary = "soft prompt [P, D] prepended to the input embeddings"
    prompt_init = True

    def init(self, model, cfg, task):
        return {"prompt": initial_prompts(model, self.prompt, task, self.templates)}

    def shapes(self):
        D = self.model_config.hidden_size
        return {"prompt": jax.ShapeDtypeStruct((self.K, self.prompt.length, D), jnp.float32)}

    def inputs(self, member, frozen):
        return frozen, PromptInputs(embeds=member["prompt"])

    def positions(self) -> int:
        return self.prompt.length

    def describe(self, k: int) -> dict:
        inits = self.prompt.inits or (self.prompt.init,) * self.K
        return {"init": inits[k]}

    def export(self, directory, best, model, base_model):
        export_prompts(directory, best["prompt"], model, base_model, self.peft_prepends)
