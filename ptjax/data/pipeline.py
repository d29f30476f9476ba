"""Text-to-text examples -> fixed-shape numpy batches, and the deterministic, sharded train
stream (``TrainStream``).

Shapes are fixed by the config (inputs ``Li`` = task.max_input_length, targets ``Lt`` =
task.max_target_length), so the jitted step compiles once.

T5 (teacher forcing): input_ids/input_mask [N, Li]; decoder_input_ids, targets and
target_mask [N, Lt], the decoder input being the targets shifted right behind
decoder_start_token_id. Both sides end in EOS, as T5's tokenizer writes them.

GPT-2: one sequence ``inputs + " " + targets + EOS`` right-padded to Li + Lt:
input_ids/input_mask [N, Li+Lt]; targets[t] = the token at t+1 and target_mask marks only
the target tokens (the loss never sees the input), as PEFT's causal-LM labels do.
"""
from __future__ import annotations

import numpy as np

from ptjax.errors import PtjaxError


def _tokenize(tokenizer, texts):
    return tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []


def _clip(ids, limit, keep_last=None):
    """ids cut to ``limit`` tokens (keeping a final EOS if given); also says if it cut."""
    if len(ids) <= limit:
        return list(ids), False
    if keep_last is not None and ids and ids[-1] == keep_last:
        return list(ids[:limit - 1]) + [keep_last], True
    return list(ids[:limit]), True


def _pad(rows, length, pad_id, left=False):
    out = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, length - len(r):], mask[i, length - len(r):] = r, 1
        else:
            out[i, :len(r)], mask[i, :len(r)] = r, 1
    return out, mask


def encode(model, examples, max_input_length: int, max_target_length: int) -> tuple[dict, int]:
    """Examples -> (arrays as in the module docstring, number of truncated examples)."""
    tok, cfg = model.tokenizer, model.config
    if tok is None:
        raise PtjaxError(f"{model.path}: the checkpoint has no tokenizer files, so task text "
                         "cannot be encoded")
    inputs = [e["inputs"] for e in examples]
    if model.is_encoder_decoder:
        eos = cfg.eos_token_id
        enc = [_clip(ids, max_input_length, eos) for ids in _tokenize(tok, inputs)]
        tgt = [_clip(ids, max_target_length, eos)
               for ids in _tokenize(tok, [e["targets"] for e in examples])]
        input_ids, input_mask = _pad([ids for ids, _ in enc], max_input_length, cfg.pad_token_id)
        targets, target_mask = _pad([ids for ids, _ in tgt], max_target_length, cfg.pad_token_id)
        dec = np.concatenate([np.full((len(examples), 1), cfg.decoder_start_token_id, np.int32),
                              targets[:, :-1]], axis=1)
        arrays = dict(input_ids=input_ids, input_mask=input_mask, decoder_input_ids=dec,
                      targets=targets, target_mask=target_mask)
        cut = sum(a or b for (_, a), (_, b) in zip(enc, tgt))
        return arrays, cut
    eos = cfg.eos_token_id
    pad = eos if cfg.pad_token_id is None else cfg.pad_token_id
    L = max_input_length + max_target_length
    enc = [_clip(ids, max_input_length) for ids in _tokenize(tok, inputs)]
    tgt = [_clip(ids + [eos], max_target_length, eos)
           for ids in _tokenize(tok, [" " + e["targets"] for e in examples])]
    seqs = [a + b for (a, _), (b, _) in zip(enc, tgt)]
    input_ids, input_mask = _pad(seqs, L, pad)
    targets = np.concatenate([input_ids[:, 1:], np.full((len(seqs), 1), pad, np.int32)], 1)
    target_mask = np.zeros_like(input_mask)
    for i, ((a, _), (b, _)) in enumerate(zip(enc, tgt)):
        target_mask[i, len(a) - 1:len(a) + len(b) - 1] = 1  # positions predicting the target
    # generation reads the inputs alone, left-padded so every row ends at the same slot
    gen_ids, gen_mask = _pad([a for a, _ in enc], max_input_length, pad, left=True)
    arrays = dict(input_ids=input_ids, input_mask=input_mask, targets=targets,
                  target_mask=target_mask, gen_ids=gen_ids, gen_mask=gen_mask)
    cut = sum(a or b for (_, a), (_, b) in zip(enc, tgt))
    return arrays, cut


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
    Examples are tokenized batch by batch (``prefetch`` runs this off the main thread).

    shards: {shard index: examples} for the shards this process owns.
    """

    def __init__(self, model, shards: dict, n_shards: int, batch_size: int,
                 max_input_length: int, max_target_length: int, seed: int):
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

    def examples(self, step: int) -> list[dict]:
        return [self.shards[q][i] for q in self.shards
                for i in train_indices(step, self.rows_per_shard, len(self.shards[q]),
                                       self.seed, q)]

    def batch(self, step: int) -> tuple[dict, int]:
        """(local arrays [rows, ...], number of truncated examples) for global ``step``."""
        return encode(self.model, self.examples(step), *self.lengths)


def prefetch(fn, steps, depth: int = 2):
    """Yield ``fn(step)`` for each step, computed ``depth`` steps ahead in a thread, so
    tokenization overlaps the device's work (the Rust tokenizer releases the GIL)."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

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
