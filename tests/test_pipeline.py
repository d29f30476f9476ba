"""The train stream: batches are a pure function of (seed, step, data shards), each process
reads only its own shards (TFDS even splits on a real prepared dataset), epochs cover each
shard exactly once, the prefetcher keeps order, and bad layouts are one-line errors."""
import time

import numpy as np
import pytest

from ptjax.config import TaskConfig
from ptjax.data import encoding, pipeline
from ptjax.data.tasks import TFDS_TASKS, TfdsTask, load_task, synthetic
from ptjax.errors import PtjaxError
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_tiny_model(str(tmp_path_factory.mktemp("t5")), family="t5"))


def _stream(model, examples, n_shards, owned, batch_size=8, seed=0):
    bounds = pipeline.shard_bounds(len(examples), n_shards)
    shards = {q: examples[bounds[q][0]:bounds[q][1]] for q in owned}
    return pipeline.TrainStream(model, shards, n_shards, batch_size, 24, 4, seed)


def test_processes_read_disjoint_rows_of_one_global_batch(model):
    """Two processes (shards {0} and {1} of 2) produce the two halves of the batch one
    process reading both shards produces: the order never depends on the process count."""
    examples = synthetic("synthetic_sentiment").split("train")[:100]
    whole = _stream(model, examples, 2, range(2))
    halves = [_stream(model, examples, 2, [q]) for q in range(2)]
    for step in (0, 7, 30):  # 30: past the first epoch of each 50-example shard
        rows = whole.examples(step)
        assert rows == halves[0].examples(step) + halves[1].examples(step)
        arrays, _ = whole.batch(step)
        parts = [h.batch(step)[0] for h in halves]
        for key in arrays:
            np.testing.assert_array_equal(arrays[key], np.concatenate([p[key] for p in parts]))
    # shard 0's rows come from its half only
    assert all(ex in examples[:50] for s in range(20) for ex in halves[0].examples(s))


def test_epochs_cover_each_shard_once_and_batches_are_reproducible(model):
    examples = [{"inputs": f"review: {i}", "targets": "positive"} for i in range(24)]
    stream = _stream(model, examples, 1, [0], batch_size=8, seed=3)
    epoch = [ex["inputs"] for s in range(3) for ex in stream.examples(s)]
    assert sorted(epoch) == sorted(ex["inputs"] for ex in examples)
    again = _stream(model, examples, 1, [0], batch_size=8, seed=3)
    assert again.examples(5) == stream.examples(5)  # a resumed run reads the same batch
    other = _stream(model, examples, 1, [0], batch_size=8, seed=4)
    assert other.examples(0) != stream.examples(0)


def test_truncation_is_counted_and_shapes_are_fixed(model):
    long = {"inputs": "review: " + " ".join(["good"] * 60), "targets": "positive"}
    stream = pipeline.TrainStream(model, {0: [long, long]}, 1, 2, 24, 4, 0)
    arrays, cut = stream.batch(0)
    assert cut == 2 and arrays["input_ids"].shape == (2, 24)
    assert arrays["input_ids"][0, -1] == model.config.eos_token_id  # EOS kept at the cut


@pytest.mark.parametrize("args, message", [
    (dict(n_shards=3, owned=range(3), batch_size=8),
     "train.batch_size=8 is not a multiple of the 3 data shards"),
])
def test_bad_layouts_are_one_line_errors(model, args, message):
    examples = synthetic("synthetic_sentiment").split("train")[:30]
    with pytest.raises(PtjaxError, match=message):
        _stream(model, examples, **args)


def test_owned_shards():
    assert list(pipeline.owned_shards(4, 1, 2)) == [2, 3]
    with pytest.raises(PtjaxError, match="train.data_shards=3 is not a multiple of the 2 "
                                         "processes"):
        pipeline.owned_shards(3, 0, 2)
    with pytest.raises(PtjaxError, match="train data shard 0 of 1 is empty"):
        pipeline.TrainStream(None, {0: []}, 1, 4, 8, 4, 0)


def test_prefetch_keeps_order_and_runs_ahead():
    seen = []

    def work(step):
        seen.append(step)
        return step * step

    out = pipeline.prefetch(work, range(10), depth=3)
    assert next(out) == 0
    deadline = time.time() + 5
    while len(seen) < 4 and time.time() < deadline:  # steps 1..3 run while we wait
        time.sleep(0.01)
    assert seen == [0, 1, 2, 3]
    assert list(out) == [s * s for s in range(1, 10)]


def test_load_task_shards_in_memory_sources():
    cfg = TaskConfig(name="synthetic_sentiment")
    whole = load_task(cfg).split("train")
    task = load_task(cfg, shards=([1, 2], 4))
    bounds = pipeline.shard_bounds(len(whole), 4)
    assert set(task.shards) == {1, 2}
    assert task.shards[2] == whole[bounds[2][0]:bounds[2][1]]


def test_tfds_processes_read_only_their_even_split(tmp_path, monkeypatch):
    """A real prepared TFDS dataset (not a mock): each process reads its own
    tfds.even_splits piece from disk, and the pieces of all shards are the whole split."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    feats = tfds.features.FeaturesDict({
        "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(), "idx": tf.int32,
        "label": tfds.features.ClassLabel(names=["entailment", "not_entailment"])})

    def split(n, offset):
        return tf.data.Dataset.from_tensor_slices({
            "premise": [f"premise {i}" for i in range(offset, offset + n)],
            "hypothesis": [f"hypothesis {i}" for i in range(offset, offset + n)],
            "idx": list(range(offset, offset + n)), "label": [i % 2 for i in range(n)]})

    tfds.dataset_builders.store_as_tfds_dataset(
        name="ptjax_test_rte", version="1.0.0", features=feats, data_dir=str(tmp_path),
        split_datasets={"train": split(10, 0), "validation": split(4, 100)})
    monkeypatch.setitem(TFDS_TASKS, "test_rte", TfdsTask("ptjax_test_rte", "rte"))
    cfg = TaskConfig(name="test_rte", data_dir=str(tmp_path))
    everything = load_task(cfg, shards=(range(3), 3))
    pieces = [load_task(cfg, shards=([q], 3)).shards[q] for q in range(3)]
    assert [ex for p in pieces for ex in p] == everything.split("train")
    assert len(everything.split("train")) == 10 and all(pieces)
    assert pieces[1] == everything.shards[1]
    assert everything.split("validation")[0]["inputs"].startswith("hypothesis: hypothesis 10")


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_rust_truncation_equals_tokenize_then_cut(family, tmp_path):
    """Cutting long texts inside the Rust tokenizer gives the ids of tokenizing everything
    and cutting in Python (T5 keeps its EOS; GPT-2 targets end in EOS)."""
    model = load_model(build_tiny_model(str(tmp_path / family), family=family))
    tok, eos = model.tokenizer, model.config.eos_token_id
    long = "review: " + " ".join(["the movie was very good and"] * 30)
    examples = [{"inputs": long, "targets": "positive " * 12},
                {"inputs": "review: dull", "targets": "negative"}]
    got = encoding.tokenize(model, examples, 20, 6)
    for (a, b, cut), ex in zip(got, examples):
        full_in = tok(ex["inputs"])["input_ids"]
        if family == "t5":
            want_a, cut_a = encoding._clip(full_in, 20, eos)
            want_b, cut_b = encoding._clip(tok(ex["targets"])["input_ids"], 6, eos)
        else:
            want_a, cut_a = encoding._clip(full_in, 20)
            want_b, cut_b = encoding._clip(tok(" " + ex["targets"])["input_ids"] + [eos], 6,
                                           eos)
        assert (a, b, cut) == (want_a, want_b, cut_a or cut_b)
    assert got[0][2] and not got[1][2]


def test_cached_stream_equals_uncached(model):
    examples = synthetic("synthetic_sentiment").split("train")[:40]
    cached = pipeline.TrainStream(model, {0: examples}, 1, 8, 24, 4, 0)
    fresh = pipeline.TrainStream(model, {0: examples}, 1, 8, 24, 4, 0, cache=False)
    for step in range(10):  # steps 5-9: the second epoch, served from the cache
        a, b = cached.batch(step), fresh.batch(step)
        assert a[1] == b[1]
        for k in a[0]:
            np.testing.assert_array_equal(a[0][k], b[0][k])
    assert len(cached._cache) == 40


@pytest.mark.parametrize("several", [False, True])
def test_template_stream_serves_later_epochs_from_the_cache(model, several):
    """Once every example is cached a batch tokenizes nothing (an empty list once crashed
    the template path in the second epoch)."""
    from ptjax.data import templates

    examples = synthetic("synthetic_sentiment").split("train")[:16]
    t = templates.parse("review: {inputs} {soft:2}")
    template = (t, templates.parse("{soft:1} {inputs} ok")) if several else t
    cached = pipeline.TrainStream(model, {0: examples}, 1, 8, 24, 4, 0, template=template)
    fresh = pipeline.TrainStream(model, {0: examples}, 1, 8, 24, 4, 0, cache=False,
                                 template=template)
    for step in range(6):  # steps 2-5: later epochs, all from the cache
        a, b = cached.batch(step), fresh.batch(step)
        for k in a[0]:
            np.testing.assert_array_equal(a[0][k], b[0][k])


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_long_texts_tokenized_from_a_prefix_are_exact(family, tmp_path, monkeypatch):
    """Texts far over the limit are tokenized from a prefix; the kept ids equal those of
    the whole text, including when the prefix turns out too short (then the whole text is
    tokenized)."""
    model = load_model(build_tiny_model(str(tmp_path / family), family=family))
    tok = model.tokenizer
    dense = " ".join(["excellent"] * 200)  # few characters per token: the prefix suffices
    sparse = " ".join(["a"] * 5) + " " + "x" * 400 + " " + " ".join(["good"] * 50)
    examples = [{"inputs": t, "targets": "positive"} for t in (dense, sparse, "short")]
    monkeypatch.setattr(encoding, "CHARS_PER_TOKEN", 2)  # force the prefix path
    got = encoding.tokenize(model, examples, 16, 4)
    for (ids, _, cut), ex in zip(got, examples):
        full = tok(ex["inputs"])["input_ids"]
        eos = model.config.eos_token_id if family == "t5" else None
        assert (ids, cut) == encoding._clip(full, 16, eos)
