"""A soft verbalizer (WARP, task.verbalizer_kind=soft) added to any trained method: the
method's trainable tree gains ``verbalizer`` [K, C, D], class vectors trained jointly
with the method's own parameters, so checkpoints, resume, K-packing, the best-member
selection and load_run carry them like any other leaf.

Class logits are computed by ``ptjax.train.member_class_logits``; the vectors start
from the output embedding of each class's label words (``ptjax.verbalizers``). Export:
the method's own files plus ``verbalizer.npy`` [K, C, D] and ``verbalizer.json`` (the
class names in order).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.verbalizers import initial_class_vectors


@dataclasses.dataclass(frozen=True)
class SoftVerbalized:
    """``inner`` (a ``Method``) plus class vectors; everything else is the inner method's.
    verbalizer: ((class, (word, ...)), ...)."""
    inner: Any
    verbalizer: tuple

    def __getattr__(self, name):
        if name in ("inner", "verbalizer") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def C(self) -> int:
        return len(self.verbalizer)

    def _split(self, tree):
        return {k: v for k, v in tree.items() if k != "verbalizer"}

    def init(self, model, cfg, task):
        tree = dict(self.inner.init(model, cfg, task))
        tree["verbalizer"] = initial_class_vectors(model, self.verbalizer, self.inner.K)
        return tree

    def shapes(self):
        D = self.inner.model_config.hidden_size
        return {**self.inner.shapes(),
                "verbalizer": jax.ShapeDtypeStruct((self.inner.K, self.C, D), jnp.float32)}

    def shardings(self, shapes, mesh, rules):
        out = dict(self.inner.shardings(self._split(shapes), mesh, rules))
        out["verbalizer"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return out

    def inputs(self, member, frozen):
        return self.inner.inputs(self._split(member), frozen)

    def export(self, directory, best, model, base_model):
        self.inner.export(directory, self._split(best), model, base_model)
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, "verbalizer.npy"),
                np.asarray(best["verbalizer"], np.float32))
        with open(os.path.join(directory, "verbalizer.json"), "w") as f:
            json.dump({"classes": [c for c, _ in self.verbalizer],
                       "label_words": {c: list(w) for c, w in self.verbalizer}}, f, indent=2)
