"""The deterministic, sharded train stream (``TrainStream``, ``MixtureStream``) over
examples that ``ptjax.data.encoding`` turns into fixed-shape numpy arrays, its prefetch
thread, and evaluation batches.
"""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ptjax.data.encoding import assemble, soft_width, stack_members, tokenize
from ptjax.errors import PtjaxError
from ptjax.verbalizers import expand, word_mask


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
                                            len(self.target_prefix),
                                            self.model.kind != "masked").astype(np.int32)
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


def bucketed_batches(arrays: dict, sizes):
    """Chunks of the largest of ``sizes`` rows in order; the last (or only) chunk filled
    with copies of row 0 up to the smallest size that holds it, so batches take only
    these shapes (a server that never recompiles). Yields (batch, n_valid)."""
    sizes = sorted(sizes)
    n = len(next(iter(arrays.values())))
    for start in range(0, n, sizes[-1]):
        valid = int(min(sizes[-1], n - start))
        idx = np.zeros(next(s for s in sizes if s >= valid), np.int64)
        idx[:valid] = np.arange(start, start + valid)
        yield take(arrays, idx), valid
