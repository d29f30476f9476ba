"""Prompt design (the paper's Figure 1 third curve, after GPT-3's few-shot evaluation): a
frozen model with a hand-written template and ``task.shots`` in-context examples, no
training. The run evaluates the bare model once (step 0) and writes the usual
metrics.jsonl and results.json, so sweeps, reports and notebooks treat it like any run.
"""
from __future__ import annotations

from ptjax.methods.base import Method


class DesignMethod(Method):
    name = "design"
    packs = False
    trains = False
    summary = "no training: a manual template and k in-context examples"

    def init(self, model, cfg, task):
        return {}

    def shapes(self):
        return {}

    def inputs(self, member, frozen):
        return frozen, None

    @property
    def prompt_tokens(self) -> int:  # type: ignore[override]
        return 0

    def export(self, directory, best, model, base_model):
        pass
