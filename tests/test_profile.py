"""train.profile_steps: a jax.profiler trace of the chosen steps in run_dir/profile, with
the train step's device work in it; a resumed run past its window writes none; the
timeline tools/profile_timeline.py draws from it (docs/images/profile.png); and the
key's one-line errors."""
import collections
import glob
import gzip
import importlib.util
import json
import os

import pytest

from ptjax import cli
from ptjax.config import load_config
from ptjax.errors import PtjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timeline():
    spec = importlib.util.spec_from_file_location(
        "profile_timeline", os.path.join(ROOT, "tools", "profile_timeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(run_dir, tiny_dir, steps, capsys):
    args = {"run_dir": run_dir, "model.tiny_dir": tiny_dir, "model.path": "tiny-t5",
            "prompt.length": 3, "task.max_input_length": 24, "task.max_target_length": 4,
            "task.dev_size": 8, "train.batch_size": 8, "train.eval_batch_size": 8,
            "train.steps": steps, "train.eval_every": 4, "train.checkpoint_every": 4,
            "train.progress": False, "train.profile_steps": "[2,3]", "mesh.data": 1}
    assert cli.main(["train", *[f"{k}={v}" for k, v in args.items()]]) == 0
    return capsys.readouterr().out


def test_profile_steps_trace_the_train_step(tmp_path, capsys):
    """Steps 2-3 of a 4-step run: TensorBoard's xplane file and Perfetto's trace in
    run_dir/profile; the trace holds the XLA ops of exactly two executions of the jitted
    train step (the step before was awaited first, the step after comes after the stop).
    Resumed to step 6, the run is past its window: no second trace. The timeline tool
    draws the trace."""
    run_dir, tiny_dir = str(tmp_path / "run"), str(tmp_path / "models")
    out = _train(run_dir, tiny_dir, 4, capsys)
    profile = os.path.join(run_dir, "profile")
    assert f"profile of steps 2-3 written to {profile}" in out
    traces = glob.glob(os.path.join(profile, "plugins", "profile", "*"))
    assert len(traces) == 1
    files = os.listdir(traces[0])
    assert "perfetto_trace.json.gz" in files and any(f.endswith(".xplane.pb") for f in files)
    with gzip.open(os.path.join(traces[0], "perfetto_trace.json.gz"), "rt") as f:
        events = json.load(f)["traceEvents"]
    runs = collections.Counter(e["args"]["run_id"] for e in events
                               if e.get("args", {}).get("hlo_module") == "jit_step")
    assert len(runs) == 2, runs  # steps 2 and 3
    assert len(set(runs.values())) == 1  # both whole: the same ops
    assert any(e.get("name") == "PjitFunction(step)" for e in events)  # their dispatch

    assert "profile of steps" not in _train(run_dir, tiny_dir, 6, capsys)
    assert glob.glob(os.path.join(profile, "plugins", "profile", "*")) == traces

    png = str(tmp_path / "profile.png")
    assert _timeline().main([profile, png, "--first-step", "2"]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    boxes, rows = _timeline().read_trace(os.path.join(traces[0], "perfetto_trace.json.gz"))
    assert len(_timeline().step_spans(boxes)) == 2 and any("python" in r for r in rows.values())


@pytest.mark.parametrize("value", ["[3]", "[0,2]", "[3,2]", "[2,7]", "[1,2,3]"])
def test_bad_profile_steps_are_one_line_errors(value):
    with pytest.raises(PtjaxError) as e:
        load_config(None, ["train.steps=6", f"train.profile_steps={value}"])
    shown = value.replace(",", ", ")
    assert str(e.value) == (
        f"config: train.profile_steps={shown} is not valid; give [first, last] with 0 < "
        "first <= last <= train.steps (6), e.g. [100, 105], or [] for no trace")
