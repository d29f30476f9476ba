"""T5's pre-training objectives on token ids, in numpy, after t5.data.preprocessors.

span_corruption (Raffel et al. 2020; T5 1.1's pre-training)::

    inputs, targets = span_corruption(tokens, rng, sentinels, eos_id)
    # tokens  [We, hold, these, truths, to, be, self, evident, ...]
    # inputs  [We, hold, <extra_id_0>, to, be, <extra_id_1>, ..., </s>]
    # targets [<extra_id_0>, these, truths, <extra_id_1>, self, evident, ..., </s>]

The noise mask is ``random_spans_noise_mask``: round(length * noise_density) noise tokens
(at least 1, at most length - 1) in round(noise / mean_noise_span_length) spans (at least
1), the noise and non-noise tokens each partitioned at random into that many non-empty
spans, spans alternating non-noise first (so the sequence ends in noise). Each noise span
becomes one sentinel in the inputs; the targets hold each span behind its sentinel.
Sentinels go in order <extra_id_0>, <extra_id_1>, ... which are the vocabulary's last ids
counting down (T5's ``sentinel_id`` = vocab_size - 1). Both sides end in EOS. Rounding is
T5's: float32 products, ties to even (``tf.round``).

prefix_lm (T5's ``prefix_lm``, the "LM adaptation" of Lester et al. 2021): the tokens are
split at a point drawn uniformly from [1, length - 1]: inputs = the prefix + EOS, targets
= the rest + EOS.

Each function takes a ``numpy.random.Generator``; the stream that calls them seeds it
from (seed, step, row), so a batch is a pure function of the step (exact resume).
"""
from __future__ import annotations

import numpy as np

from ptjax.errors import PtjaxError

OBJECTIVES = ("span_corruption", "prefix_lm")


def _round(x: float) -> int:
    """tf.round of a float32: ties to even."""
    return int(np.round(np.float32(x)))


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float
                 ) -> tuple[int, int]:
    """(noise tokens, noise spans) of ``random_spans_noise_mask`` for ``length`` tokens."""
    length = max(length, 2)  # T5: "increase length to avoid degeneracy"
    num_noise = _round(np.float32(length) * np.float32(noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(_round(np.float32(num_noise) / np.float32(mean_noise_span_length)), 1)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng) -> np.ndarray:
    """[num_segments] positive ints summing to num_items, all partitions equally likely:
    a shuffled marker of the first item of each segment after the first."""
    first = (np.arange(num_items - 1) < num_segments - 1).astype(np.int64)
    rng.shuffle(first)
    segment_id = np.cumsum(np.concatenate([[0], first]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, rng,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """bool [length]: True at noise tokens (see the module docstring)."""
    if noise_density == 0.0:
        return np.zeros(length, bool)
    orig_length, length = length, max(length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    starts = np.zeros(length, np.int64)
    starts[np.cumsum(interleaved)[:-1]] = 1
    is_noise = np.cumsum(starts) % 2 == 1
    return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens, noise_mask, sentinels) -> np.ndarray:
    """Each run of noise tokens replaced by the next sentinel (sentinels[i] = the id of
    <extra_id_i>); T5's ``noise_span_to_unique_sentinel``."""
    tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask, bool)
    prev = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~prev
    n = int(first.sum())
    if n > len(sentinels):
        raise PtjaxError(f"{n} noise spans need {n} sentinels but the vocabulary has "
                         f"{len(sentinels)} (<extra_id_0> .. <extra_id_{len(sentinels) - 1}>); "
                         "use shorter sequences or a tokenizer with more extra_ids")
    out = tokens.copy()
    out[first] = np.asarray(sentinels, tokens.dtype)[np.cumsum(first)[first] - 1]
    return out[~(noise_mask & prev)]


def span_corruption(tokens, rng, sentinels, eos_id: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of T5's span corruption for one sequence of token ids (no EOS)."""
    tokens = np.asarray(tokens, np.int64)
    mask = random_spans_noise_mask(len(tokens), noise_density, rng, mean_noise_span_length)
    inputs = noise_span_to_unique_sentinel(tokens, mask, sentinels)
    targets = noise_span_to_unique_sentinel(tokens, ~mask, sentinels)
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def random_spans_helper(inputs_length: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(tokens per raw segment, targets length) so that span-corrupted inputs fill
    ``inputs_length`` (EOS included) without padding: T5's ``random_spans_helper`` with
    one sentinel per span on each side (e.g. 512 -> (568, 114))."""
    def lengths(tokens_length):
        num_noise = _round(np.float32(tokens_length) * np.float32(noise_density))
        num_spans = _round(np.float32(num_noise) / np.float32(mean_noise_span_length))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # T5's "minor hack"
        tokens_length, targets_length = tokens_length - 1, targets_length - 1
    return tokens_length, targets_length


def prefix_split(length: int, rng, noise_density: float = 0.5) -> int:
    """The prefix length of T5's ``random_prefix_noise_mask``: uniform in
    [max(1, round((1 - 2 * noise_density) * (length - 1))), length - 1]."""
    if noise_density > 0.5:
        raise PtjaxError(f"prefix_lm: noise_density={noise_density} must not exceed 0.5")
    if length < 2:
        raise PtjaxError(f"prefix_lm needs sequences of at least 2 tokens, got {length}")
    high = length - 1
    low = min(high, max(1, _round((1 - 2 * noise_density) * np.float32(high))))
    return int(rng.integers(low, high + 1))


def prefix_lm(tokens, rng, eos_id: int, noise_density: float = 0.5
              ) -> tuple[np.ndarray, np.ndarray]:
    """(prefix + EOS, continuation + EOS) of one sequence of token ids (no EOS)."""
    tokens = np.asarray(tokens, np.int64)
    k = prefix_split(len(tokens), rng, noise_density)
    return np.append(tokens[:k], eos_id), np.append(tokens[k:], eos_id)


def sentinel_ids(tokenizer, count: int | None = None) -> np.ndarray:
    """[n] ids of <extra_id_0>, <extra_id_1>, ...: the tokenizer's last ids, counting down
    from len(tokenizer) - 1, as T5 lays them out; an error names what is missing."""
    n = len(tokenizer)
    ids = []
    while count is None or len(ids) < count:
        i = tokenizer.convert_tokens_to_ids(f"<extra_id_{len(ids)}>")
        if i is None or i == tokenizer.unk_token_id:
            break
        ids.append(int(i))
    if not ids or (count is not None and len(ids) < count):
        raise PtjaxError(f"the tokenizer has {len(ids)} sentinels <extra_id_N>; span "
                         "corruption needs T5's sentinels (a tokenizer with extra_ids)")
    if ids != list(range(n - 1, n - 1 - len(ids), -1)):
        raise PtjaxError(f"the tokenizer's sentinels are not its last ids counting down from "
                         f"<extra_id_0> = {n - 1} (got <extra_id_0> = {ids[0]}), as T5 "
                         "lays them out")
    return np.asarray(ids, np.int64)
