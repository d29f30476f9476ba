"""Hugging Face checkpoint names (PyTorch layout) <-> ptjax params pytrees.

One rule per ptjax parameter says which Hugging Face tensor it comes from and how the
layout changes. Rules are keyed by the parameter's path in the pytree (structure, not a
regex over names); per-layer tensors are stacked on a leading [layers] axis.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

from ptjax.errors import PtjaxError


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one ptjax parameter is read from Hugging Face tensors.

    kind: "linear" (torch Linear weight [out, in]), "conv1d" (GPT-2 Conv1D weight
      [in, out]) or "copy" (same values, possibly flattened: embeddings, norms, biases).
    n_in: for linear/conv1d, how many leading axes of the ptjax kernel are input axes.
    part: (index, count) to take one of ``count`` equal slices of the output axis
      (GPT-2's fused c_attn holds q, k and v).
    layers: number of stacked layers; ``key`` then contains ``{i}``.
    flatten: for copy, the Hugging Face tensor is 1-D (a per-head bias [H, Dh] is [H*Dh]).
    """
    key: str
    kind: str = "copy"
    n_in: int = 1
    part: tuple[int, int] | None = None
    layers: int | None = None
    flatten: bool = False

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of one layer's tensor for a ptjax shape (no layer axis)."""
        if self.kind == "copy":
            hf = (math.prod(shape),) if self.flatten else tuple(shape)
            if self.part:
                hf = (hf[0] * self.part[1],) + hf[1:]
            return hf
        d_in, d_out = math.prod(shape[:self.n_in]), math.prod(shape[self.n_in:])
        if self.part:
            d_out *= self.part[1]
        return (d_out, d_in) if self.kind == "linear" else (d_in, d_out)

    def to_ptjax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.part:
            idx, count = self.part
            axis = 0 if self.kind in ("linear", "copy") else 1
            w = np.split(w, count, axis=axis)[idx]
        if self.kind == "linear":
            w = w.T
        return np.ascontiguousarray(w).reshape(shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        """Inverse of ``to_ptjax`` for one layer (no part handling; see ``merge_parts``)."""
        if self.kind == "copy":
            return p.reshape(-1) if self.flatten else p
        d_in = math.prod(p.shape[:self.n_in])
        w = p.reshape(d_in, -1)
        return w.T if self.kind == "linear" else w


def load_params(rules: Mapping[tuple, Rule], shapes: Mapping[tuple, tuple],
                get: Callable[[str], np.ndarray], has: Callable[[str], bool], dtype,
                where: str, place: Callable = lambda path, array: array):
    """Build the nested params dict from a checkpoint.

    shapes: flat {path: expected shape} from ``jax.eval_shape`` of the module's init.
    get / has: read / test a Hugging Face tensor by name. ``where`` names the checkpoint
    in errors. place(path, host_array) puts each finished parameter where it belongs
    (a device or a sharded array) before the next is read, so the host holds one at a time.
    """
    flat = {}
    for path, shape in shapes.items():
        rule = rules[path]
        layer_shape = tuple(shape[1:]) if rule.layers else tuple(shape)
        want = rule.hf_shape(layer_shape)
        keys = [rule.key.format(i=i) for i in range(rule.layers)] if rule.layers else [rule.key]
        arrays = []
        for key in keys:
            if not has(key):
                raise PtjaxError(f"{where}: missing weight {key!r} (expected shape {want})")
            w = get(key)
            if tuple(w.shape) != want:
                raise PtjaxError(f"{where}: weight {key!r} has shape {tuple(w.shape)}, "
                                 f"the config expects {want}")
            arrays.append(rule.to_ptjax(np.asarray(w), layer_shape).astype(dtype))
        flat[path] = place(path, np.stack(arrays) if rule.layers else arrays[0])
        del arrays
    return traverse_util.unflatten_dict(flat)


def to_hf_state_dict(rules: Mapping[tuple, Rule], params) -> dict[str, np.ndarray]:
    """ptjax params -> {Hugging Face name: array}; parts of fused tensors re-joined."""
    parts: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        rule = rules[path]
        value = np.asarray(value)
        layers = range(rule.layers) if rule.layers else [None]
        for i in layers:
            key = rule.key.format(i=i) if rule.layers else rule.key
            hf = rule.to_hf(value[i] if rule.layers else value)
            if rule.part:
                parts.setdefault(key, {})[rule.part[0]] = (hf, rule)
            else:
                out[key] = hf
    for key, pieces in parts.items():
        rule = next(iter(pieces.values()))[1]
        axis = 0 if rule.kind in ("linear", "copy") else 1
        out[key] = np.concatenate([pieces[j][0] for j in range(rule.part[1])], axis=axis)
    return out
