"""Finding a checkpoint (local directory or Hugging Face hub id) and reading its tensors.

Formats, in order of preference: ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), ``flax_model.msgpack`` (Hugging Face's Flax layout),
``pytorch_model.bin`` (sharded too; read with ``torch.load(weights_only=True)`` and only
when torch is installed). Every reader yields tensors under their PyTorch names.
"""
from __future__ import annotations

import json
import os
import re
import socket
from typing import Callable
from urllib.parse import urlparse

import huggingface_hub as hub
import jax
import numpy as np
from flax import serialization, traverse_util
from safetensors import safe_open

from ptjax.errors import PtjaxError

SAFETENSORS = "model.safetensors"
MSGPACK = "flax_model.msgpack"
TORCH_BIN = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "tokenizer.model")
_WEIGHT_FILES = (SAFETENSORS, SAFETENSORS + ".index.json", MSGPACK, TORCH_BIN,
                 TORCH_BIN + ".index.json")


# "name" or "org/name" as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled as a Hugging Face hub id ("name" or "org/name")."""
    return bool(_HUB_ID.match(name))


def resolve(path_or_hub_id: str) -> str:
    """A local directory holding config.json and weights; hub ids are downloaded."""
    path = os.path.expanduser(str(path_or_hub_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not _HUB_ID.match(path):
        raise PtjaxError(f"{path_or_hub_id}: no such directory (give a checkpoint directory "
                         "or a Hugging Face hub id such as google/t5-small-lm-adapt)")
    return _download(path)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, found in seconds (None: it can, or the
    hub is offline by choice): without it, huggingface_hub retries for ~25 s first."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None  # huggingface_hub reads only its local cache, at once
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"{host} is not reachable ({e.strerror or type(e).__name__})"
    return None


def _download(repo_id: str) -> str:
    why = hub_unreachable()
    if why:
        try:  # a checkpoint downloaded before is still usable
            return hub.snapshot_download(repo_id, local_files_only=True)
        except Exception:
            raise PtjaxError(f"{repo_id}: not a local directory, not in the Hugging Face "
                             f"cache, and {why}; give a checkpoint directory, or download "
                             "it where there is network (HF_HUB_OFFLINE=1 then reads the "
                             "cache only)") from None
    try:
        files = set(hub.list_repo_files(repo_id))
        wanted = [f for f in ("config.json",) + TOKENIZER_FILES if f in files]
        weights = next((f for f in _WEIGHT_FILES if f in files), None)
        if weights is None:
            raise PtjaxError(f"{repo_id}: the hub repository has no weights in a supported "
                             f"format ({', '.join(_WEIGHT_FILES)})")
        wanted.append(weights)
        if weights.endswith(".index.json"):
            index = json.load(open(hub.hf_hub_download(repo_id, weights)))
            wanted += sorted(set(index["weight_map"].values()))
        return hub.snapshot_download(repo_id, allow_patterns=wanted)
    except PtjaxError:
        raise
    except Exception as e:  # network, auth, missing repo: all reported in one line
        raise PtjaxError(f"{repo_id}: not a local directory and could not be fetched from "
                         f"the Hugging Face hub ({type(e).__name__}: {first_line(e)})") from None


def download_config(repo_id: str) -> str:
    """The directory holding a hub checkpoint's config.json alone (no weights)."""
    if not _HUB_ID.match(repo_id):
        raise PtjaxError(f"{repo_id}: no such directory (give a checkpoint directory or a "
                         "Hugging Face hub id such as google/t5-small-lm-adapt)")
    try:
        return os.path.dirname(hub.hf_hub_download(repo_id, "config.json"))
    except Exception as e:  # network, auth, missing repo: all reported in one line
        raise PtjaxError(f"{repo_id}: not a local directory, not a known checkpoint, and its "
                         f"config.json could not be fetched from the Hugging Face hub "
                         f"({type(e).__name__}: {first_line(e)})") from None


class Weights:
    """Tensors of one checkpoint by PyTorch name, read lazily where the format allows."""

    def __init__(self, directory: str):
        self.directory = directory
        self._readers: dict[str, Callable[[], np.ndarray]] = {}
        self.filename = self._open()

    def keys(self):
        return self._readers.keys()

    def has(self, key: str) -> bool:
        return key in self._readers

    def get(self, key: str) -> np.ndarray:
        return self._readers[key]()

    def rename(self, fn: Callable[[str], str]):
        """Rename every key (e.g. strip GPT-2's ``transformer.`` prefix)."""
        self._readers = {fn(k): v for k, v in self._readers.items()}

    def _open(self) -> str:
        d = self.directory
        for name in (SAFETENSORS, SAFETENSORS + ".index.json"):
            if os.path.exists(os.path.join(d, name)):
                shards = _shards(d, name)
                for shard in shards:
                    self._read(self._add_safetensors, os.path.join(d, shard))
                return name
        if os.path.exists(os.path.join(d, MSGPACK)):
            self._read(self._add_msgpack, os.path.join(d, MSGPACK))
            return MSGPACK
        for name in (TORCH_BIN, TORCH_BIN + ".index.json"):
            if os.path.exists(os.path.join(d, name)):
                try:
                    import torch  # noqa: F401, PLC0415 (optional: PyTorch .bin checkpoints)
                except ImportError:
                    raise PtjaxError(
                        f"{os.path.join(d, name)}: this checkpoint is a PyTorch pickle; "
                        "install torch to read it (pip install torch) or convert it to "
                        "model.safetensors") from None
                for shard in _shards(d, name):
                    self._read(self._add_torch, os.path.join(d, shard))
                return name
        raise PtjaxError(f"{d}: no weights found (looked for {', '.join(_WEIGHT_FILES)})")

    @staticmethod
    def _read(add: Callable[[str], None], file: str):
        """Run a reader; a missing, truncated or corrupt file becomes one PtjaxError line."""
        if not os.path.exists(file):
            raise PtjaxError(f"{file}: not found (named by the checkpoint's index)")
        try:
            add(file)
        except PtjaxError:
            raise
        except Exception as e:
            raise PtjaxError(f"{file}: cannot be read, the file looks corrupt or truncated "
                             f"({type(e).__name__}: {first_line(e)})") from None

    def _add_safetensors(self, file: str):
        # The "flax" framework reads bfloat16, which numpy's reader cannot; tensors are
        # materialised on the host CPU, one at a time, when asked for.
        cpu = jax.local_devices(backend="cpu")[0]  # this process's own, on every host
        handle = safe_open(file, framework="flax")
        for key in handle.keys():
            def read(key=key):
                with jax.default_device(cpu):
                    return np.asarray(handle.get_tensor(key))
            self._readers[key] = read

    def _add_msgpack(self, file: str):
        with open(file, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        for path, value in traverse_util.flatten_dict(tree).items():
            key, value = _flax_to_torch_name(path, np.asarray(value))
            self._readers[key] = lambda value=value: value

    def _add_torch(self, file: str):
        import torch  # noqa: PLC0415 (optional: PyTorch .bin checkpoints)

        state = torch.load(file, map_location="cpu", weights_only=True)
        for key, tensor in state.items():
            def read(tensor=tensor):
                t = tensor.detach()
                return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
            self._readers[key] = read


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _shards(directory: str, name: str) -> list[str]:
    if not name.endswith(".index.json"):
        return [name]
    path = os.path.join(directory, name)
    try:
        with open(path) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PtjaxError(f"{path}: not a valid index (needs a JSON object with a "
                         f"'weight_map'; {type(e).__name__}: {first_line(e)})") from None


def _flax_to_torch_name(path: tuple, value: np.ndarray):
    """Hugging Face Flax names/layout -> PyTorch names/layout.

    Flax ``kernel`` is the transpose of the PyTorch weight (true for Dense and for GPT-2's
    FlaxConv1D alike); ``embedding`` and LayerNorm ``scale`` are PyTorch ``weight``.
    """
    *prefix, leaf = [str(p) for p in path]
    if leaf == "kernel":
        value = value.T
    if leaf in ("kernel", "embedding", "scale"):
        leaf = "weight"
    return ".".join(prefix + [leaf]), value
