"""Soft-prompt tables and the initialisation strategies of Lester et al. (2021) and PEFT.

A prompt table is one fp32 array [K, P, D]: K prompts (several seeds / inits trained
together, or an ensemble), P prompt positions, D the model's embedding width. Each of the
K prompts draws from its own rng key.
"""
from __future__ import annotations

import io
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load, load_file

from ptjax import storage
from ptjax.data.templates import parse
from ptjax.errors import PtjaxError
from ptjax.sharding import to_host

STRATEGIES = ("random_uniform", "sampled_vocab", "class_label", "text", "file")
# PEFT's adapter_model.safetensors names the prompt table so; ptjax exports use it too.
PEFT_PROMPT_KEY = "prompt_embeddings"


def random_uniform(key, length: int, dim: int, low: float = -0.5, high: float = 0.5):
    """[P, D] uniform in [low, high): the paper uses [-0.5, 0.5], its code [0, 0.5)."""
    return jax.random.uniform(key, (length, dim), jnp.float32, low, high)


def sampled_vocab(key, length: int, embedding_VxD, vocab_limit: int = 5000):
    """[P, D] rows of the embedding drawn from the first ``vocab_limit`` ids (T5's
    SentencePiece ids are ordered by frequency), without replacement unless P > N."""
    n = min(vocab_limit, embedding_VxD.shape[0])
    ids = jax.random.choice(key, n, (length,), replace=length > n)
    return jnp.asarray(embedding_VxD)[ids].astype(jnp.float32)


def class_label(key, length: int, embedding_VxD, label_ids: Sequence[Sequence[int]],
                fallback: str = "sampled_vocab", vocab_limit: int = 5000,
                low: float = -0.5, high: float = 0.5):
    """[P, D]: position c holds the mean embedding of class c's label tokens; the
    remaining positions come from ``fallback`` (sampled_vocab or random_uniform). With more
    labels than positions the first P labels are used, as the official code does (e.g. a
    1-token prompt for CB's 3 classes in the length ablation)."""
    if not label_ids:
        raise PtjaxError("class_label init needs the task's label strings; none were given "
                         "(set the task's labels or choose another init)")
    label_ids = list(label_ids)[:length]
    emb = jnp.asarray(embedding_VxD)
    labels = jnp.stack([emb[jnp.asarray(ids)].astype(jnp.float32).mean(0) for ids in label_ids])
    rest = length - labels.shape[0]
    if rest == 0:
        return labels
    if fallback == "sampled_vocab":
        filler = sampled_vocab(key, rest, emb, vocab_limit)
    elif fallback == "random_uniform":
        filler = random_uniform(key, rest, emb.shape[1], low, high)
    else:
        raise PtjaxError(f"class_label fallback {fallback!r} is not valid; valid: "
                         "sampled_vocab, random_uniform")
    return jnp.concatenate([labels, filler], axis=0)


def text(length: int, embedding_VxD, token_ids: Sequence[int]):
    """[P, D] from text token ids, PEFT's TEXT semantics: ids tiled cyclically, truncated
    to P. ``initial_prompts`` passes the tokenizer's full encoding (T5: with its EOS), as
    PEFT does."""
    if len(token_ids) == 0:
        raise PtjaxError("text init needs a non-empty init text")
    ids = np.resize(np.asarray(token_ids), length)  # cyclic tiling, then truncation
    return jnp.asarray(embedding_VxD)[ids].astype(jnp.float32)


def load_table(path: str, dim: int, length: int | None = None):
    """A prompt table [K, P, D] from a .npy ([P, D] or [K, P, D]; the official released
    prompts are [P, D]) or a safetensors file with ``prompt_embeddings`` (a PEFT
    adapter_model.safetensors or a ptjax export)."""
    if not storage.exists(path):
        raise PtjaxError(f"{path}: prompt file not found")
    # a URL (gs://): read whole, then parsed from memory
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    try:
        if path.endswith(".npy"):
            table = np.load(source)
        elif path.endswith(".safetensors"):
            tensors = load(source.getvalue()) if storage.is_remote(path) else load_file(path)
            if PEFT_PROMPT_KEY not in tensors:
                raise PtjaxError(f"{path}: no {PEFT_PROMPT_KEY!r} tensor (found: "
                                 f"{', '.join(sorted(tensors)) or 'none'})")
            table = tensors[PEFT_PROMPT_KEY]
        else:
            raise PtjaxError(f"{path}: prompt files must be .npy or .safetensors")
    except (ValueError, OSError) as e:
        raise PtjaxError(f"{path}: cannot be read as a prompt ({str(e).splitlines()[0]})") \
            from None
    shape = tuple(table.shape)
    if not np.issubdtype(np.asarray(table).dtype, np.floating) or \
            not np.isfinite(table).all():  # a diverged run's prompt would poison this one
        raise PtjaxError(f"{path}: the prompt holds non-finite or non-float values "
                         f"({np.asarray(table).dtype}); give a finite float array")
    if table.ndim == 2:
        table = table[None]
    want = f"({length if length else 'P'}, {dim})"
    if table.ndim != 3 or table.shape[2] != dim or (length and table.shape[1] != length):
        raise PtjaxError(f"{path}: prompt has shape {shape}, expected {want} or (K, {want[1:]} "
                         "(prompt length, model width)")
    return jnp.asarray(table, jnp.float32)


def from_file(path: str, length: int, dim: int):
    """[P, D] from a one-prompt file (see ``load_table``)."""
    table = load_table(path, dim, length)
    if table.shape[0] != 1:
        raise PtjaxError(f"{path}: holds {table.shape[0]} prompts; expected one [P, D]")
    return table[0]


def init_prompts(strategy: str, seeds: Sequence[int], length: int, embedding_VxD, *,
                 low: float = -0.5, high: float = 0.5, vocab_limit: int = 5000,
                 label_ids: Sequence[Sequence[int]] | None = None,
                 fallback: str = "sampled_vocab", text_ids: Sequence[int] | None = None,
                 path: str | None = None):
    """A prompt table [K, P, D] in fp32, prompt k drawn with ``seeds[k]``.

    embedding_VxD: the frozen model's input embedding (T5 ``shared``, GPT-2 ``wte``).
    """
    if strategy not in STRATEGIES:
        raise PtjaxError(f"unknown prompt init {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if length < 1:
        raise PtjaxError(f"prompt length must be >= 1, got {length}")
    dim = embedding_VxD.shape[1]

    def one(seed):
        key = jax.random.key(seed)
        if strategy == "random_uniform":
            return random_uniform(key, length, dim, low, high)
        if strategy == "sampled_vocab":
            return sampled_vocab(key, length, embedding_VxD, vocab_limit)
        if strategy == "class_label":
            return class_label(key, length, embedding_VxD, label_ids or [], fallback,
                               vocab_limit, low, high)
        if strategy == "text":
            return text(length, embedding_VxD, text_ids or [])
        raise AssertionError(strategy)

    if strategy == "file":
        if not path:
            raise PtjaxError("file init needs a prompt file path")
        table = load_table(path, dim, length)
        if table.shape[0] not in (1, len(seeds)):
            raise PtjaxError(f"{path}: holds {table.shape[0]} prompts; expected 1 or one per "
                             f"seed ({len(seeds)})")
        return jnp.broadcast_to(table, (len(seeds),) + table.shape[1:])
    return jnp.stack([one(s) for s in seeds])


def initial_prompts(model, p, task, templates=()) -> np.ndarray:
    """The [K, P, D] fp32 prompt table: prompt k from ``prompt.inits[k]`` (or
    ``prompt.init``) and ``prompt.seeds[k]``. Built on the host from a host copy of the
    input embedding, identically on every process. p: the run's ``prompt`` section.
    templates: each prompt's template (or none); its {soft:N=words} slots start from the
    words' embeddings (ids tiled to N, PEFT's TEXT rule)."""
    emb = to_host(input_embedding(model))
    tok = model.tokenizer
    inits = p.inits or (p.init,) * len(p.seeds)
    label_ids = text_ids = None
    if "class_label" in inits:
        if not task.labels:
            raise PtjaxError(f"prompt.init=class_label needs class labels; task {task.name!r} "
                             "has none (set task.labels or choose another prompt.init)")
        # T5's tokenizer appends EOS: the label's embedding is its word pieces alone
        label_ids = [strip_special(tok, lab) for lab in task.labels]
    if "text" in inits:
        # PEFT's TEXT init: the ids as the tokenizer encodes the text, special tokens
        # included (T5's EOS ends them), so a ptjax prompt equals PEFT's on every model
        text_ids = tok(p.text)["input_ids"]
    if "file" in inits:  # one [P, D] for every file-initialised prompt, or one per seed
        from_file = np.asarray(init_prompts("file", p.seeds, p.length, emb, path=p.file))
    rows = [from_file[k] if init == "file" else
            np.asarray(init_prompts(init, [seed], p.length, emb, low=p.low, high=p.high,
                                    vocab_limit=p.vocab_limit, label_ids=label_ids,
                                    fallback=p.fallback, text_ids=text_ids))[0]
            for k, (init, seed) in enumerate(zip(inits, p.seeds))]
    table = np.stack(rows)
    for k, template in enumerate(templates):
        for start, n, words in parse(template).soft_inits:
            table[k, start:start + n] = np.asarray(text(n, emb, strip_special(tok, words)))
    return table


def input_embedding(model):
    name = {"seq2seq": "shared", "causal": "wte", "masked": "word_embeddings"}[model.kind]
    return model.params[name]["embedding"]


def strip_special(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [i for i in ids if i not in set(tok.all_special_ids)]
