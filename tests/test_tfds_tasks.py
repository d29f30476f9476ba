"""TFDS tasks with no network: every registered task read through `tfds.load` under
`tfds.testing.mock_data`, formatted, turned into a dev set and scored; a missing dataset
is a one-line error saying how to prepare it; a TFDS task trains end to end."""
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from ptjax import cli  # noqa: E402
from ptjax.config import TaskConfig  # noqa: E402
from ptjax.data.tasks import TFDS_TASKS, load_task  # noqa: E402
from ptjax.errors import PtjaxError  # noqa: E402
from ptjax.evaluation import build_dev_set, metric_names, task_metrics  # noqa: E402
from ptjax.models.model import load_model  # noqa: E402
from ptjax.models.tiny import build_tiny_model  # noqa: E402

# Random mock text cannot satisfy ReCoRD (answers among the entities) or WSC (the pronoun
# at span2_index): these two read hand-written examples through the same mock.
HAND = {
    "super_glue/record": dict(
        passage="the cat is red .\n@highlight\nthe dog is blue", query="@placeholder is red",
        entities=["cat", "dog"], answers=["cat"], idx={"passage": 0, "query": 0}),
    "super_glue/wsc.fixed": dict(
        text="Mark told Pete many lies about himself . He should have been more truthful .",
        span1_index=0, span2_index=8, span1_text="Mark", span2_text="He", label=1, idx=0),
}


def _as_dataset(self, split, **kwargs):
    import tensorflow as tf

    ex = HAND[self.info.full_name.rsplit("/", 1)[0]]
    return tf.data.Dataset.from_generator(
        lambda: (dict(ex, idx=ex["idx"]) for _ in range(4)),
        output_signature=self.info.features.get_tensor_spec())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(build_tiny_model(str(tmp_path_factory.mktemp("t5")), family="t5"))


@pytest.mark.parametrize("name", sorted(TFDS_TASKS))
def test_every_tfds_task_loads_formats_and_scores(name, model):
    spec = TFDS_TASKS[name]
    cfg = TaskConfig(name=name, max_input_length=48, max_target_length=16)
    if spec.tfds_name in HAND:
        with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
            task = load_task(cfg)
    else:
        with tfds.testing.mock_data(num_examples=5):
            task = load_task(cfg)
    train, dev = task.splits.get("train", []), task.split("validation")  # MRQA: eval only
    assert dev and all(isinstance(ex["inputs"], str) and isinstance(ex["targets"], str)
                       for ex in train + dev)
    if spec.labels or task.labels:
        assert set(ex["targets"] for ex in dev) <= set(task.labels)
    devset = build_dev_set(model, task, "auto", 48, 16)
    assert devset.mode == ("generate" if spec.metric in ("squad", "wsc") else "rank")
    # perfect predictions score 100 on every metric of the set
    gold = [(ex.get("answers") or [ex["targets"]])[0] for ex in dev]
    scores = task_metrics(devset.metric_set, dev, gold, task.labels)
    assert set(scores) == set(metric_names(devset.metric_set))
    assert task.metric in scores
    if spec.metric not in ("cb", "f1_accuracy", "multirc"):  # F1 of an absent class is 0
        assert all(v == pytest.approx(100.0) for v in scores.values()), scores


def test_prefix_setting_keeps_the_task_name():
    with tfds.testing.mock_data(num_examples=2):
        plain = load_task(TaskConfig(name="rte"))
        kept = load_task(TaskConfig(name="rte", prefix=True))
    assert plain.split("train")[0]["inputs"].startswith("hypothesis: ")
    assert kept.split("train")[0]["inputs"] == "rte " + plain.split("train")[0]["inputs"]


def test_qqp_mrpc_transfer_renames_the_labels():
    with tfds.testing.mock_data(num_examples=4):
        task = load_task(TaskConfig(name="mrpc_as_qqp"))
    assert task.labels == ("not_duplicate", "duplicate")
    assert {ex["targets"] for ex in task.split("validation")} <= set(task.labels)
    assert task.split("validation")[0]["inputs"].startswith("sentence1: ")


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(PtjaxError) as e:
        load_task(TaskConfig(name="rte", data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"run `tfds build super_glue/rte --data_dir {tmp_path}`" in msg


def test_a_tfds_task_trains_end_to_end(tmp_path, capsys):
    run_dir = str(tmp_path / "boolq")
    args = [f"run_dir={run_dir}", f"model.tiny_dir={tmp_path}", "task.name=boolq",
            "prompt.length=4", "prompt.init=class_label", "task.max_input_length=48",
            "task.max_target_length=8", "train.batch_size=8", "train.steps=2",
            "train.eval_every=2", "train.dropout=0", "train.progress=false"]
    with tfds.testing.mock_data(num_examples=8):
        assert cli.main(["train", *args]) == 0
    rows = [r for r in map(eval, open(os.path.join(run_dir, "metrics.jsonl")))
            if r["split"] == "validation"]
    assert len(rows) == 1 and 0.0 <= rows[0]["accuracy"] <= 100.0
    assert np.load(os.path.join(run_dir, "export", "prompts.npy")).shape[1] == 4
