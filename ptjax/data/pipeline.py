"""Text-to-text examples -> fixed-shape numpy batches, and the deterministic, sharded train
stream (``TrainStream``).

Shapes are fixed by the config (inputs ``Li`` = task.max_input_length, targets ``Lt`` =
task.max_target_length), so the jitted step compiles once.

T5 (teacher forcing): input_ids/input_mask [N, Li]; decoder_input_ids, targets and
target_mask [N, Lt], the decoder input being the targets shifted right behind
decoder_start_token_id. Both sides end in EOS, as T5's tokenizer writes them.

With ``task.target_sentinel`` (T5 only) every target starts with the sentinel
``<extra_id_0>`` in token space, as span-corruption pre-training targets do: the paper's
"span corruption + sentinel" setting (Figure 3c). ``target_prefix`` gives those ids.

GPT-2: one sequence ``inputs + " " + targets + EOS`` right-padded to Li + Lt:
input_ids/input_mask [N, Li+Lt]; targets[t] = the token at t+1 and target_mask marks only
the target tokens (the loss never sees the input), as PEFT's causal-LM labels do.

With a template (``ptjax.data.templates``) the input is laid out by it, and its P soft
tokens take places of their own: inputs are Li + P wide, and ``slots`` (same shape as
input_ids, and gen_slots as gen_ids) holds at each place the index of the soft vector
that goes there (-1 elsewhere). Tokenized inputs mark a soft token as id -(1 + index).

With several templates (a tuple, ``task.templates``: one per member) every array gets a
member axis after the rows, [N, K, ...], each member's layout padded to the widest
(Li + the most soft tokens of any); rows stay the first axis, so batches shard and split
as before, and member k reads ``[:, k]``.
"""
from __future__ import annotations

import collections
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tokenizers

from ptjax.data.templates import field_values
from ptjax.errors import PtjaxError
from ptjax.verbalizers import expand, word_mask


def _clip(ids, limit, keep_last=None):
    """ids cut to ``limit`` tokens (keeping a final EOS if given); also says if it cut."""
    if len(ids) <= limit:
        return list(ids), False
    if keep_last is not None and ids and ids[-1] == keep_last:
        return list(ids[:limit - 1]) + [keep_last], True
    return list(ids[:limit]), True


_TRUNCATING = weakref.WeakKeyDictionary()  # tokenizer -> {max_length: Rust tokenizer}


def _truncating(tokenizer, max_length: int):
    """The tokenizer's Rust backend set to truncate at ``max_length`` (special tokens such
    as T5's EOS kept, as ``truncation=True`` does), or None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    by_length = _TRUNCATING.setdefault(tokenizer, {})
    if max_length not in by_length:
        copy = tokenizers.Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.enable_truncation(max_length)
        by_length[max_length] = copy
    return by_length[max_length]


CHARS_PER_TOKEN = 8  # prefix budget for long texts (English averages about 4)
_SPLITTING = ("Metaspace", "ByteLevel", "Whitespace", "WhitespaceSplit", "BertPreTokenizer")


def _splits_at_spaces(backend) -> bool:
    """True when the pre-tokenizer cuts words at spaces, so tokens never span one."""
    text = repr(backend.pre_tokenizer)  # also lists the parts of a Sequence
    return any(f"{name}(" in text for name in _SPLITTING) and "split=False" not in text


def _tokenize(tokenizer, texts, max_length: int, eos=None):
    """[(ids, truncated)] for each text: tokenized with the tokenizer's special tokens, cut
    to ``max_length`` in the Rust tokenizer (a long passage never becomes a Python list).
    eos: append this id after the text's own tokens (GPT-2 targets), within max_length."""
    if not texts:
        return []
    limit = max_length - (eos is not None)
    fast = _truncating(tokenizer, limit)
    if fast is None:  # a slow (pure Python) tokenizer
        rows = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        if eos is not None:
            return [_clip(ids + [eos], max_length, eos) for ids in rows]
        specials = tokenizer.all_special_ids
        return [_clip(ids, max_length, ids[-1] if ids and ids[-1] in specials else None)
                for ids in rows]
    texts = list(texts)
    # A text far longer than the limit is tokenized from a prefix cut at a space: with a
    # pre-tokenizer that splits words at spaces the first tokens are the same, and if the
    # prefix still overflows, the kept tokens are exact. Otherwise the whole text is used.
    budget = CHARS_PER_TOKEN * max_length if _splits_at_spaces(fast) else None
    cuts = [t.find(" ", budget) if budget and len(t) > budget else -1 for t in texts]
    encs = fast.encode_batch([t[:c] if c > 0 else t for t, c in zip(texts, cuts)])
    redo = [i for i, (c, e) in enumerate(zip(cuts, encs)) if c > 0 and not e.overflowing]
    for i, e in zip(redo, fast.encode_batch([texts[i] for i in redo])):
        encs[i] = e
    out = [(e.ids, bool(e.overflowing)) for e in encs]
    if eos is not None:
        out = [(ids + [eos], cut) for ids, cut in out]
    return out


def _pad(rows, length, pad_id, left=False):
    out = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, length - len(r):], mask[i, length - len(r):] = r, 1
        else:
            out[i, :len(r)], mask[i, :len(r)] = r, 1
    return out, mask


SENTINEL = "<extra_id_0>"  # T5's first span-corruption sentinel, the vocabulary's last id


def _tokenizer(model):
    if model.tokenizer is None:
        raise PtjaxError(f"{model.path}: the checkpoint has no tokenizer files, so task text "
                         "cannot be encoded")
    return model.tokenizer


def target_prefix(model, sentinel: bool, max_target_length: int,
                  why: str = "task.target_sentinel=true") -> tuple:
    """Token ids put before every target: () or, with ``sentinel`` (task.target_sentinel),
    T5's ``<extra_id_0>``, so downstream targets look like span-corruption targets.
    why: the setting that asked for the sentinel, named by the errors."""
    if not sentinel:
        return ()
    if max_target_length < 2:
        raise PtjaxError(f"{why} puts {SENTINEL} before every target; "
                         f"task.max_target_length={max_target_length} leaves no room for it")
    if not model.is_encoder_decoder:
        raise PtjaxError(f"{why} needs a T5 checkpoint with span-"
                         f"corruption sentinels; {model.path} is a decoder-only model")
    tok = _tokenizer(model)
    i = tok.convert_tokens_to_ids(SENTINEL)
    if i is None or i == tok.unk_token_id or i >= model.config.vocab_size:
        raise PtjaxError(f"{why}: the tokenizer of {model.path} has no "
                         f"{SENTINEL} token; only T5 checkpoints with extra_ids have one")
    return (int(i),)


def tokenize(model, examples, max_input_length: int, max_target_length: int,
             target_prefix: tuple = (), template=None) -> list:
    """Per example (input ids, target ids, truncated), cut to the configured lengths;
    ``target_prefix`` ids (T5) start every target and count towards its length.
    template: lay the input out by a ``Template`` (soft tokens as ids -(1 + index))."""
    tok, cfg = _tokenizer(model), model.config
    if not examples:  # e.g. a batch whose examples were all tokenized before (the cache)
        return []
    if template is not None:
        inputs = _tokenize_template(model, template, examples, max_input_length)
    else:
        inputs = _tokenize(tok, [e["inputs"] for e in examples], max_input_length)
    if model.is_encoder_decoder:
        targets = _tokenize(tok, [e["targets"] for e in examples],
                            max_target_length - len(target_prefix))
        targets = [(list(target_prefix) + ids, cut) for ids, cut in targets]
    else:  # " " + target, then EOS: what PEFT's causal-LM labels hold
        targets = _tokenize(tok, [" " + e["targets"] for e in examples], max_target_length,
                            eos=cfg.eos_token_id)
    return [(a, b, ca or cb) for (a, ca), (b, cb) in zip(inputs, targets)]


def _split_slots(ids_NxL, pad_id):
    """Soft tokens (ids < 0) -> (ids with the pad id there, slots: vector index or -1)."""
    slots = np.where(ids_NxL < 0, -ids_NxL - 1, -1).astype(np.int32)
    return np.where(ids_NxL < 0, pad_id, ids_NxL).astype(np.int32), slots


def assemble(model, tokenized, max_input_length: int, max_target_length: int,
             soft_tokens: int = 0) -> dict:
    """Tokenized examples (``tokenize``) -> the fixed-shape arrays of the module docstring.
    soft_tokens: P of a template with soft slots (inputs are Li + P wide, with ``slots``)."""
    cfg = model.config
    width = max_input_length + soft_tokens
    if model.is_encoder_decoder:
        input_ids, input_mask = _pad([a for a, _, _ in tokenized], width, cfg.pad_token_id)
        targets, target_mask = _pad([b for _, b, _ in tokenized], max_target_length,
                                    cfg.pad_token_id)
        dec = np.concatenate([np.full((len(tokenized), 1), cfg.decoder_start_token_id,
                                      np.int32), targets[:, :-1]], axis=1)
        out = dict(input_ids=input_ids, input_mask=input_mask, decoder_input_ids=dec,
                   targets=targets, target_mask=target_mask)
        if soft_tokens:
            out["input_ids"], out["slots"] = _split_slots(input_ids, cfg.pad_token_id)
        return out
    pad = cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    seqs = [a + b for a, b, _ in tokenized]
    input_ids, input_mask = _pad(seqs, width + max_target_length, pad)
    targets = np.concatenate([input_ids[:, 1:], np.full((len(seqs), 1), pad, np.int32)], 1)
    targets = np.maximum(targets, 0)  # a soft token is never a target (target_mask is 0)
    target_mask = np.zeros_like(input_mask)
    for i, (a, b, _) in enumerate(tokenized):
        target_mask[i, len(a) - 1:len(a) + len(b) - 1] = 1  # positions predicting the target
    # generation reads the inputs alone, left-padded so every row ends at the same slot
    gen_ids, gen_mask = _pad([a for a, _, _ in tokenized], width, pad, left=True)
    out = dict(input_ids=input_ids, input_mask=input_mask, targets=targets,
               target_mask=target_mask, gen_ids=gen_ids, gen_mask=gen_mask)
    if soft_tokens:
        out["input_ids"], out["slots"] = _split_slots(input_ids, pad)
        out["gen_ids"], out["gen_slots"] = _split_slots(gen_ids, pad)
    return out


def soft_width(template) -> int:
    """The soft tokens an encoding's inputs make room for: a template's, the most of
    several templates', 0 without one."""
    if isinstance(template, tuple):
        return max(t.soft_tokens for t in template)
    return 0 if template is None else template.soft_tokens


def stack_members(per_member: list) -> dict:
    """K arrays dicts (one per template) -> one dict of [N, K, ...] arrays."""
    return {k: np.stack([a[k] for a in per_member], axis=1) for k in per_member[0]}


def encode(model, examples, max_input_length: int, max_target_length: int,
           target_prefix: tuple = (), template=None) -> tuple[dict, int]:
    """Examples -> (arrays as in the module docstring, number of truncated examples).
    template: a Template, a tuple of them (one per member: arrays [N, K, ...]) or None."""
    width = soft_width(template)
    per_member = []
    for t in (template if isinstance(template, tuple) else (template,)):
        tokenized = tokenize(model, examples, max_input_length, max_target_length,
                             target_prefix, t)
        per_member.append(assemble(model, tokenized, max_input_length, max_target_length,
                                   width))
    cut = sum(c for _, _, c in tokenized)
    if isinstance(template, tuple):
        return stack_members(per_member), cut
    return per_member[0], cut


def _tokenize_template(model, template, examples, max_length: int) -> list:
    """[(input ids with soft tokens as -(1 + index), truncated)] laid out by ``template``:
    pieces tokenized one by one (a space before a piece that follows text), T5's
    <extra_id_0> at {mask} and EOS at the end; fields cut longest-first so the text
    tokens fit ``max_length`` (soft tokens come on top)."""
    tok, cfg = _tokenizer(model), model.config
    enc_dec = model.is_encoder_decoder

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    fixed, seen_text = [], False  # per piece: ids (text, mask, soft) or None (a field)
    for p in template.pieces:
        lead = " " if p.space and seen_text else ""
        if p.kind == "text":
            fixed.append(ids(lead + p.text))
        elif p.kind == "mask":
            fixed.append(list(target_prefix(model, True, 2)) if enc_dec else [])
        elif p.kind == "soft":
            fixed.append([-(1 + p.start + j) for j in range(p.n)])
        else:
            fixed.append(None)
        seen_text |= p.kind in ("text", "field")
    eos = [cfg.eos_token_id] if enc_dec else []
    n_fixed = sum(len([i for i in f if i >= 0]) for f in fixed if f is not None) + len(eos)
    if n_fixed >= max_length:
        raise PtjaxError(f"task.template={template.source!r}: its own text takes {n_fixed} of "
                         f"task.max_input_length={max_length} tokens, leaving none for the "
                         "example's fields; raise task.max_input_length")
    values = [field_values(ex) for ex in examples]
    for name in template.fields:
        if values and name not in values[0]:
            raise PtjaxError(f"task.template={template.source!r}: the examples have no field "
                             f"{{{name}}}; they have: "
                             f"{', '.join('{' + k + '}' for k in values[0])}")
    field_ids, seen_text = {}, False
    for i, p in enumerate(template.pieces):
        if p.kind == "field":
            lead = " " if p.space and seen_text else ""
            rows = tok([lead + str(v[p.name]) for v in values],
                       add_special_tokens=False)["input_ids"]
            field_ids[i] = rows
        seen_text |= p.kind in ("text", "field")
    out = []
    for r in range(len(examples)):
        fields = {i: list(rows[r]) for i, rows in field_ids.items()}
        excess = n_fixed + sum(map(len, fields.values())) - max_length
        cut = excess > 0
        while excess > 0:  # shorten the longest field first
            i = max(fields, key=lambda k: len(fields[k]))
            fields[i].pop()
            excess -= 1
        seq = []
        for i, f in enumerate(fixed):
            seq += fields[i] if f is None else f
        out.append((seq + eos, cut))
    return out


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``n_shards`` contiguous, near-equal shards of n examples."""
    return [(q * n // n_shards, (q + 1) * n // n_shards) for q in range(n_shards)]


def owned_shards(n_shards: int, process_index: int, process_count: int) -> range:
    """The shards process p of P reads: a contiguous block of n_shards / P."""
    if n_shards % process_count:
        raise PtjaxError(f"train.data_shards={n_shards} is not a multiple of the "
                         f"{process_count} processes")
    per = n_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


def train_indices(step: int, batch_size: int, n: int, seed: int, shard: int = 0) -> np.ndarray:
    """Example indices (within one shard of n examples) of train batch ``step``: epochs are
    seeded permutations laid end to end, so batch ``step`` depends only on (step, seed,
    shard) and a resumed run reads exactly what an uninterrupted one would."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, shard, epoch]).permutation(n)
        out.extend(perm[offset:offset + batch_size - len(out)])
    return np.asarray(out)


class TrainStream:
    """This process's rows of every global train batch, as a pure function of the step.

    The train split is cut into ``n_shards`` contiguous shards; each contributes
    ``batch_size / n_shards`` rows to every global batch, drawn from its own seeded
    per-epoch permutation, in shard order. Batch ``step`` therefore depends only on (seed,
    step, n_shards), not on how many processes read it: process p reads only the shards it
    owns (``owned_shards``), a resumed run sees exactly the examples it would have seen,
    and one process given the same ``n_shards`` reproduces a multi-host run's batches.
    Examples are tokenized batch by batch (``prefetch`` runs this off the main thread) and,
    with ``cache``, kept tokenized: after the first epoch a batch is only gathered and padded.

    shards: {shard index: examples} for the shards this process owns. target_prefix:
    ids that start every target (``target_prefix``). scoring: a ``verbalizers.Scoring``
    (class-level loss, soft verbalizer): every example becomes W rows, one per
    ``scoring.words``, and the batch also holds "label" [B] (gold class) and "word_mask"
    [B x W, T] (``verbalizers``).
    """

    def __init__(self, model, shards: dict, n_shards: int, batch_size: int,
                 max_input_length: int, max_target_length: int, seed: int,
                 cache: bool = True, target_prefix: tuple = (), template=None, scoring=None):
        if batch_size % n_shards:
            raise PtjaxError(f"train.batch_size={batch_size} is not a multiple of the "
                             f"{n_shards} data shards (train.data_shards)")
        for q, examples in shards.items():
            if not examples:
                raise PtjaxError(f"train data shard {q} of {n_shards} is empty; use fewer "
                                 "shards (train.data_shards) or more examples")
        self.model, self.shards, self.seed = model, dict(sorted(shards.items())), seed
        self.rows_per_shard = batch_size // n_shards
        self.lengths = (max_input_length, max_target_length)
        self.target_prefix = tuple(target_prefix)
        self.template = template
        self.scoring = scoring
        self._cache = {} if cache else None  # (shard, index) -> its rows' tokenize() triples

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(shard, index in shard) of this process's rows of batch ``step``."""
        return [(q, int(i)) for q in self.shards
                for i in train_indices(step, self.rows_per_shard, len(self.shards[q]),
                                       self.seed, q)]

    def examples(self, step: int) -> list[dict]:
        return [self.shards[q][i] for q, i in self.indices(step)]

    def batch(self, step: int) -> tuple[dict, int]:
        """(local arrays [rows, ...], number of truncated examples) for global ``step``."""
        keys = self.indices(step)
        several = isinstance(self.template, tuple)
        templates = self.template if several else (self.template,)
        W = 1 if self.scoring is None else self.scoring.W

        def tok(examples):  # per example: its W rows, each one tokenize() triple per template
            rows = examples
            if self.scoring is not None:
                rows, _ = expand(examples, self.scoring, "train", "train")
            per_row = list(zip(*(tokenize(self.model, rows, *self.lengths,
                                          self.target_prefix, t) for t in templates)))
            return [per_row[i * W:(i + 1) * W] for i in range(len(examples))]
        if self._cache is None:
            tokenized = tok([self.shards[q][i] for q, i in keys])
        else:
            missing = sorted({k for k in keys if k not in self._cache})
            self._cache.update(zip(missing, tok([self.shards[q][i] for q, i in missing])))
            tokenized = [self._cache[k] for k in keys]
        rows = [row for ex in tokenized for row in ex]
        width = soft_width(self.template)
        per_member = [assemble(self.model, [row[m] for row in rows], *self.lengths, width)
                      for m in range(len(templates))]
        arrays = stack_members(per_member) if several else per_member[0]
        if self.scoring is not None:
            _, arrays["label"] = expand([self.shards[q][i] for q, i in keys], self.scoring,
                                        "train", "train")
            arrays["word_mask"] = word_mask(arrays["target_mask"],
                                            len(self.target_prefix)).astype(np.int32)
        return arrays, sum(cut for _, _, cut in (ex[0][0] for ex in tokenized))


class MixtureStream:
    """This process's rows of every global train batch of a task mixture (task.mixture),
    as a pure function of the step (resume reads what an uninterrupted run reads).

    Each row's task is drawn with probability proportional to ``weights`` and its example
    uniformly from that task's part of the row's shard (with replacement), from a
    generator seeded by (seed, shard, step): every shard contributes ``batch_size /
    n_shards`` rows, as in ``TrainStream``. Each task keeps its own encoding (template,
    target prefix); tokenized examples are cached per task.

    parts: one ``TrainStream`` per task (its shards and encoding); weights: one >= 0 per
    part, not all 0.
    """

    def __init__(self, parts: list, weights, seed: int):
        w = np.asarray(weights, np.float64)
        self.parts, self.seed = parts, seed
        self.active = np.flatnonzero(w > 0)
        self.p = w[self.active] / w[self.active].sum()
        first = parts[self.active[0]]
        self.model, self.lengths = first.model, first.lengths
        self.rows_per_shard, self.shard_ids = first.rows_per_shard, list(first.shards)
        self._cache = {}  # (task, shard, index) -> tokenize()'s triple

    def indices(self, step: int) -> list[tuple[int, int, int]]:
        """(task, shard, index in that task's shard) of this process's rows of ``step``."""
        out = []
        for q in self.shard_ids:
            rng = np.random.default_rng([self.seed, q, step])
            tasks = self.active[rng.choice(len(self.active), self.rows_per_shard, p=self.p)]
            for t in tasks:
                out.append((int(t), q, int(rng.integers(len(self.parts[t].shards[q])))))
        return out

    def batch(self, step: int) -> tuple[dict, int]:
        """(local arrays [rows, ...], number of truncated examples) for global ``step``."""
        keys = self.indices(step)
        for t in sorted({t for t, _, _ in keys}):
            part = self.parts[t]
            missing = sorted({k for k in keys if k[0] == t} - set(self._cache))
            rows = tokenize(part.model, [part.shards[q][i] for _, q, i in missing],
                            *part.lengths, part.target_prefix, part.template)
            self._cache.update(zip(missing, rows))
        tokenized = [self._cache[k] for k in keys]
        arrays = assemble(self.model, tokenized, *self.lengths)
        return arrays, sum(cut for _, _, cut in tokenized)


def prefetch(fn, steps, depth: int = 2):
    """Yield ``fn(step)`` for each step, computed ``depth`` steps ahead in a thread, so
    tokenization overlaps the device's work (the Rust tokenizer releases the GIL)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptjax-data") as pool:
        queue = collections.deque()
        it = iter(steps)
        for step in it:
            queue.append(pool.submit(fn, step))
            if len(queue) > depth:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


def take(arrays: dict, idx) -> dict:
    return {k: v[idx] for k, v in arrays.items()}


def eval_batches(arrays: dict, batch_size: int):
    """Fixed-size chunks in order; the last is filled with copies of row 0.
    Yields (batch, n_valid)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = int(min(batch_size, n - start))
        idx[valid:] = 0
        yield take(arrays, idx), valid
