"""The paper's tasks from Hugging Face datasets (task.source=hf), with no TensorFlow: small
Parquet files written here in the hub's layout (aps/super_glue, nyu-mll/glue,
rajpurkar/squad: their features, ClassLabel names in the schema metadata) read into the
same examples, fields included, as the TFDS path gives for the same rows; train shards cut
as tfds.even_splits cuts them; a run with TensorFlow not importable; one-line errors."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

datasets = pytest.importorskip("datasets")

from ptjax.config import TaskConfig  # noqa: E402
from ptjax.data import hf  # noqa: E402
from ptjax.data.pipeline import shard_bounds  # noqa: E402
from ptjax.data.tasks import TFDS_TASKS, TfdsTask, load_task  # noqa: E402
from ptjax.errors import PtjaxError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, TF = datasets.Value, ("False", "True")


def _label(*names):
    return datasets.ClassLabel(names=list(names))


# The hub's features per config (its dataset_info), which datasets writes into each Parquet
# file's schema metadata and reads back: the label names come from here, not from TFDS.
S, N = V("string"), V("int32")
FEATURES = {
    "boolq": {"question": S, "passage": S, "idx": N, "label": _label(*TF)},
    "cb": {"premise": S, "hypothesis": S, "idx": N,
           "label": _label("entailment", "contradiction", "neutral")},
    "copa": {"premise": S, "choice1": S, "choice2": S, "question": S, "idx": N,
             "label": _label("choice1", "choice2")},
    "multirc": {"paragraph": S, "question": S, "answer": S,
                "idx": {"paragraph": N, "question": N, "answer": N}, "label": _label(*TF)},
    "record": {"passage": S, "query": S, "entities": datasets.Sequence(S),
               "entity_spans": datasets.Sequence({"text": S, "start": N, "end": N}),
               "answers": datasets.Sequence(S), "idx": {"passage": N, "query": N}},
    "rte": {"premise": S, "hypothesis": S, "idx": N,
            "label": _label("entailment", "not_entailment")},
    "wic": {"word": S, "sentence1": S, "sentence2": S, "start1": N, "start2": N, "end1": N,
            "end2": N, "idx": N, "label": _label(*TF)},
    "wsc.fixed": {"text": S, "span1_index": N, "span2_index": N, "span1_text": S,
                  "span2_text": S, "idx": N, "label": _label(*TF)},
    "mrpc": {"sentence1": S, "sentence2": S, "label": _label("not_equivalent", "equivalent"),
             "idx": N},
    "qqp": {"question1": S, "question2": S, "label": _label("not_duplicate", "duplicate"),
            "idx": N},
    "sst2": {"sentence": S, "label": _label("negative", "positive"), "idx": N},
    "plain_text": {"id": S, "title": S, "context": S, "question": S,
                   "answers": datasets.Sequence({"text": S, "answer_start": N})},
}
WORDS = "river Beyoncé cat dog place film party truck sun grass".split()
SIZES = {"train": 5, "validation": 3, "test": 2}


def row(config: str, split: str, i: int) -> dict:
    """Example i of a split, shaped as the hub's rows are (test rows unlabeled: -1)."""
    w, label = WORDS[i % len(WORDS)], -1 if split == "test" else i
    if config == "boolq":
        return {"question": f"is the {w} long", "passage": f"The {w} is long, said Beyoncé "
                f"(in {1990 + i}).", "idx": i, "label": label if label < 0 else label % 2}
    if config in ("cb", "rte"):
        k = 3 if config == "cb" else 2
        return {"premise": f"It was a {w}. Not written down but handed down.",
                "hypothesis": f"the {w} was peeled down", "idx": i,
                "label": label if label < 0 else label % k}
    if config == "copa":
        return {"premise": f"My {w} cast a shadow over the grass.", "choice1":
                "The sun was rising.", "choice2": "The grass was cut.",
                "question": ("cause", "effect")[i % 2], "idx": i,
                "label": label if label < 0 else label % 2}
    if config == "multirc":
        return {"paragraph": f"<b>Sent 1: </b>Susan wanted a {w}.<br><b>Sent 2: </b>She "
                             "sent invites.<br>", "question": f"What did Susan want {i}?",
                "answer": f"A {w}", "idx": {"paragraph": i // 4, "question": i // 2,
                                            "answer": i},
                "label": label if label < 0 else label % 2}
    if config == "record":
        return {"passage": f"the {w} is red .\n@highlight\nthe dog is blue",
                "query": "@placeholder is red", "entities": [w, "dog"],
                "entity_spans": {"text": [w, "dog"], "start": [4, 30], "end": [4 + len(w), 33]},
                "answers": [] if split == "test" else [w], "idx": {"passage": i, "query": i}}
    if config == "wic":
        return {"word": w, "sentence1": f"Do you want to come over to my {w} later?",
                "sentence2": f"A system with no {w} for the less prominent groups.",
                "start1": 31, "start2": 17, "end1": 31 + len(w), "end2": 17 + len(w),
                "idx": i, "label": label if label < 0 else label % 2}
    if config == "wsc.fixed":
        return {"text": f"Mark told Pete many lies about the {w} . He should have been more "
                        "truthful .", "span1_index": 0, "span2_index": 9, "span1_text": "Mark",
                "span2_text": "He", "idx": i, "label": label if label < 0 else label % 2}
    if config == "mrpc":
        return {"sentence1": f'Amrozi accused his {w} , whom he called " the witness " .',
                "sentence2": f'Referring to him as only " the witness " , Amrozi accused {w} .',
                "label": label if label < 0 else label % 2, "idx": i}
    if config == "qqp":
        return {"question1": f"How is the life of a {w}?", "question2": "Which level is "
                f"enough for the {w} exam?", "label": label if label < 0 else label % 2,
                "idx": i}
    if config == "sst2":
        return {"sentence": f"hide new {w} from the parental units ",
                "label": label if label < 0 else label % 2, "idx": i}
    assert config == "plain_text"
    context = f"The {w} was seen in Paris (France) in {1990 + i}; nobody knew why."
    return {"id": f"{i:024x}", "title": w, "context": context,
            "question": f"Where was the {w} seen?",
            "answers": {"text": ["Paris", "Paris (France)"],
                        "answer_start": [context.index("Paris")] * 2}}


def splits_of(config: str) -> tuple:
    return ("train", "validation") if config == "plain_text" else tuple(SIZES)


def write_hub_layout(root, configs=tuple(FEATURES), layout="{split}-00000-of-00001.parquet",
                     sizes=SIZES) -> str:
    """Each config's splits as the hub lays them out: root/<config>/<split>-....parquet."""
    for config in configs:
        for split in splits_of(config):
            path = os.path.join(root, config, layout.format(split=split))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ds = datasets.Dataset.from_list([row(config, split, i)
                                             for i in range(sizes[split])],
                                            features=datasets.Features(FEATURES[config]))
            if path.endswith(".arrow"):  # Arrow's stream format, as datasets writes it
                with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(
                        sink, ds.data.table.schema) as writer:
                    writer.write_table(ds.data.table)
            else:
                ds.to_parquet(path)
    return str(root)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # datasets' Arrow cache stays in the test's dirs
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield write_hub_layout(tmp_path_factory.mktemp("hub"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# ---------------------------------------------------------------- equal to TFDS's


def _tfds_rows(self, split, **kwargs):
    """TFDS's mock of a builder's split: the same rows as the Parquet files, read through
    the real TFDS builder's features (its label names, its keys)."""
    import tensorflow as tf

    config = hf.HUB[self.info.full_name.rsplit("/", 1)[0]][1]
    keys = list(self.info.features.keys())
    rows = [{k: r[k] for k in keys} for r in (row(config, str(split), i)
                                               for i in range(SIZES[str(split)]))]
    return tf.data.Dataset.from_generator(
        lambda: iter(rows), output_signature=self.info.features.get_tensor_spec())


PAPER = sorted(name for name, spec in TFDS_TASKS.items() if spec.tfds_name in hf.HUB)


def test_every_task_with_a_hub_dataset_is_covered():
    assert set(PAPER) == {"boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc",
                          "mrpc", "qqp", "sst2", "squad", "mrpc_as_qqp", "qqp_as_mrpc"}
    assert {hf.HUB[TFDS_TASKS[n].tfds_name][1] for n in PAPER} == set(FEATURES)


@pytest.mark.parametrize("name,prefix", [(n, False) for n in PAPER] + [("rte", True)])
def test_hf_examples_equal_the_tfds_paths(name, prefix, hub_dir):
    tfds = pytest.importorskip("tensorflow_datasets")
    splits = tuple(s for s, _ in TFDS_TASKS[name].splits)
    got = load_task(TaskConfig(name=name, source="hf", hf_path=hub_dir, prefix=prefix), splits)
    with tfds.testing.mock_data(as_dataset_fn=_tfds_rows):
        want = load_task(TaskConfig(name=name, prefix=prefix), splits)
    assert got.splits == want.splits  # inputs, targets, candidates, answers, group, fields
    assert (got.labels, got.metric, got.metric_set) == (want.labels, want.metric,
                                                         want.metric_set)
    n = sum(SIZES[s] for s in splits)
    assert sum(map(len, got.splits.values())) >= n - SIZES["train"]  # wsc drops wrong ones
    assert all(ex["fields"] for exs in got.splits.values() for ex in exs)


# ---------------------------------------------------------------- shards


def test_even_bounds_cut_as_tfds_even_splits_says():
    assert hf.even_bounds(11, 3) == [(0, 4), (4, 8), (8, 11)]  # tfds: 4, 4, 3
    assert shard_bounds(11, 3) == [(0, 3), (3, 7), (7, 11)]  # the in-memory sources' cut
    for n in range(0, 30):
        for k in range(1, 7):
            b = hf.even_bounds(n, k)
            assert b[0][0] == 0 and b[-1][1] == n and all(
                b[q][1] == b[q + 1][0] for q in range(k - 1))
            sizes = [stop - start for start, stop in b]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_hf_shards_are_the_tfds_even_splits_of_the_same_rows(tmp_path, monkeypatch):
    """A real prepared TFDS dataset (not a mock) and Parquet files of the same 11 rows in
    the order TFDS stored them (it shuffles on writing; the hub keeps the original order):
    each of 3 train shards holds the same examples from either source, and the shards make
    up the whole split."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    sizes = {"train": 11, "validation": 3, "test": 2}
    rows = {s: [row("rte", s, i) for i in range(n)] for s, n in sizes.items()}
    feats = tfds.features.FeaturesDict({
        "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(), "idx": tf.int32,
        "label": tfds.features.ClassLabel(names=["entailment", "not_entailment"])})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="ptjax_hf_rte", version="1.0.0", features=feats, data_dir=str(tmp_path / "tfds"),
        split_datasets={s: tf.data.Dataset.from_tensor_slices(
            {k: [r[k] for r in rows[s]] for k in rows[s][0]}) for s in ("train", "validation")})
    monkeypatch.setitem(TFDS_TASKS, "hf_rte", TfdsTask("ptjax_hf_rte", "rte"))
    monkeypatch.setitem(hf.HUB, "ptjax_hf_rte", ("ptjax/hf_rte", "rte"))
    from_tfds = TaskConfig(name="hf_rte", data_dir=str(tmp_path / "tfds"))
    stored = [int(ex["fields"]["idx"]) for ex in load_task(from_tfds).split("train")]
    assert sorted(stored) == list(range(11))
    hub = write_hub_layout(tmp_path / "hub", ("rte",), sizes=sizes)
    datasets.Dataset.from_list([rows["train"][i] for i in stored], features=datasets.Features(
        FEATURES["rte"])).to_parquet(os.path.join(hub, "rte", "train-00000-of-00001.parquet"))
    from_hf = TaskConfig(name="hf_rte", source="hf", hf_path=hub)
    whole = load_task(from_hf).split("train")
    for q in range(3):
        piece = load_task(from_hf, shards=([q], 3))
        assert piece.shards[q] == load_task(from_tfds, shards=([q], 3)).shards[q]
        assert piece.split("train") == piece.shards[q]
    every = load_task(from_hf, shards=(range(3), 3))
    assert [len(every.shards[q]) for q in range(3)] == [4, 4, 3]
    assert [ex for q in range(3) for ex in every.shards[q]] == every.split("train") == whole


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout,under", [
    ("{split}/0000.parquet", ""),  # the hub's Parquet conversion (refs/convert/parquet)
    ("{split}-00000-of-00001.parquet", "super_glue"),  # one folder per hub dataset
    ("{split}-00000-of-00001.arrow", ""),
])
def test_other_local_layouts_read_the_same(layout, under, tmp_path, hub_dir):
    root = tmp_path / "data"
    write_hub_layout(root / under if under else root, ("cb",), layout)
    cfg = TaskConfig(name="cb", source="hf", hf_path=str(root))
    assert load_task(cfg).splits == load_task(TaskConfig(name="cb", source="hf",
                                                         hf_path=hub_dir)).splits


# ---------------------------------------------------------------- errors


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_files_say_how_to_download_them(tmp_path, hub_dir):
    with pytest.raises(PtjaxError) as e:
        load_task(TaskConfig(name="rte", source="hf", hf_path=str(tmp_path)))
    msg = _one_line(e)
    assert f"no train files in {tmp_path}" in msg
    assert (f"hf download aps/super_glue --repo-type dataset --include 'rte/*' "
            f"--local-dir {tmp_path}") in msg
    with pytest.raises(PtjaxError, match="task.hf_path=/nonexistent/hf: no such directory"):
        load_task(TaskConfig(name="rte", source="hf", hf_path="/nonexistent/hf"))
    with pytest.raises(PtjaxError, match="'mrqa_drop' has no Hugging Face source.*"
                                         "use task.source=tfds"):
        load_task(TaskConfig(name="mrqa_drop", source="hf", hf_path=hub_dir))


def test_a_label_column_without_class_names_is_one_line(tmp_path):
    import pandas as pd

    (tmp_path / "rte").mkdir()
    for split in ("train", "validation"):  # plain ints: pandas writes no ClassLabel
        pd.DataFrame([row("rte", split, i) for i in range(2)]).to_parquet(
            tmp_path / "rte" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(PtjaxError) as e:
        load_task(TaskConfig(name="rte", source="hf", hf_path=str(tmp_path)))
    assert "column 'label' is Value('int64'), not a ClassLabel" in _one_line(e)


def test_an_unreachable_hub_fails_at_once_with_what_to_do(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest's, for checkpoints
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # refused at once
    with pytest.raises(PtjaxError) as e:
        load_task(TaskConfig(name="boolq", source="hf"))
    msg = _one_line(e)
    assert msg.startswith("task 'boolq': Hugging Face dataset aps/super_glue (boolq) cannot "
                          "be downloaded: 127.0.0.1 is not reachable")
    assert "HF_DATASETS_OFFLINE=1" in msg and "task.hf_path" in msg


def _python(code: str, tmp_path, *args, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), **env}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=300)


# Run in a fresh interpreter where TensorFlow and TFDS cannot be imported, as if not
# installed; LOADED fails if either was imported all the same.
NO_TENSORFLOW = """
import sys
for name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None
from ptjax.config import TaskConfig
from ptjax.data.tasks import load_task
from ptjax.errors import PtjaxError
"""
LOADED = """
assert all(sys.modules[m] is None for m in sys.modules
           if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
"""


def test_no_tensorflow_offline_and_one_line_errors(tmp_path, hub_dir):
    """With TensorFlow not importable and HF_DATASETS_OFFLINE=1: the local files read;
    the hub dataset, not cached, and the TFDS path each stop with one line."""
    code = NO_TENSORFLOW + f"""
task = load_task(TaskConfig(name="squad", source="hf", hf_path={hub_dir!r}))
print(len(task.split("train")), len(task.split("validation")))
for cfg in (TaskConfig(name="rte", source="hf"), TaskConfig(name="rte")):
    try:
        load_task(cfg)
    except PtjaxError as e:
        print(e)
""" + LOADED
    out = _python(code, tmp_path, HF_DATASETS_OFFLINE="1")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == "5 3"
    assert lines[1].startswith("task 'rte': Hugging Face dataset aps/super_glue (rte, train) "
                               "could not be loaded (ConnectionError: ")
    assert "HF_DATASETS_OFFLINE=1 then reads the cache" in lines[1]
    assert "--include 'rte/*' --local-dir DIR" in lines[1]
    assert lines[2].startswith("TFDS tasks need tensorflow-datasets and TensorFlow")
    assert lines[2].endswith("pip install -e '.[tfds]'")


def test_without_datasets_installed_the_error_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['datasets'] = None\n" + NO_TENSORFLOW +
            "try:\n    load_task(TaskConfig(name='rte', source='hf'))\n"
            "except PtjaxError as e:\n    print(e)\n")
    out = _python(code, tmp_path)
    assert out.stdout == ("task.source=hf needs Hugging Face datasets (not installed): "
                          "pip install -e '.[hf]'\n"), out.stderr[-3000:]


@pytest.mark.slow
def test_a_run_trains_on_hf_data_with_no_tensorflow(tmp_path, hub_dir):
    run_dir = tmp_path / "boolq"
    train = NO_TENSORFLOW + "from ptjax import cli\ncode = cli.main(sys.argv[1:])\n" + LOADED
    out = _python(train + "sys.exit(code)\n", tmp_path, "train", f"run_dir={run_dir}",
                  f"model.tiny_dir={tmp_path}", "task.name=boolq", "task.source=hf",
                  f"task.hf_path={hub_dir}", "prompt.length=4", "prompt.init=class_label",
                  "task.max_input_length=48", "task.max_target_length=8",
                  "train.batch_size=8", "train.steps=2", "train.eval_every=2",
                  "train.dropout=0", "train.progress=false")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    dev = [r for r in rows if r["split"] == "validation"]
    assert len(dev) == 1 and 0.0 <= dev[0]["accuracy"] <= 100.0
