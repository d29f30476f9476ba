"""The command line a newcomer meets: `--version`, `config show` (every key, resolved),
`export` of a run's best members from its checkpoint (mid-run too), `--no-progress`
logging a line per log step, TensorBoard tags named by the members' settings, optional
W&B in offline mode, and no third-party noise on stderr."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ptjax import __version__, cli
from ptjax.config import load_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_TUNING = os.path.join(ROOT, "experiments", "prompt_tuning.yaml")


def run_args(run_dir, tiny_dir, **kw):
    args = {"run_dir": run_dir, "model.tiny_dir": tiny_dir, "prompt.length": 4,
            "prompt.seeds": "[0,1]", "task.max_input_length": 24, "task.max_target_length": 4,
            "task.dev_size": 16, "train.batch_size": 8, "train.eval_batch_size": 16,
            "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
            "train.log_every": 1, "train.dropout": 0.0}
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"ptjax {__version__} (jax ")


def test_config_show_prints_every_key_resolved(capsys):
    assert cli.main(["config", "show", PROMPT_TUNING, "prompt.length=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    want = load_config(PROMPT_TUNING, ["prompt.length=7"])
    assert shown == to_dict(want) and shown["prompt"]["length"] == 7
    assert shown["optim"]["learning_rate"] == want.optim.learning_rate  # a default, filled in
    assert cli.main(["config", "show", "optim.learnig_rate=1"]) == 2
    assert "did you mean 'optim.learning_rate'" in capsys.readouterr().err


def ptjax(*args, cwd):
    """``ptjax ARGS`` as a user runs it: a subprocess, its output captured."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # the CLI must quiet transformers itself
    return subprocess.run([sys.executable, "-m", "ptjax.cli", *args], capture_output=True,
                          text=True, env=env, cwd=str(cwd), timeout=600)


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    """A 4-step, 2-member run with --no-progress, as a user runs it (a subprocess)."""
    tmp = tmp_path_factory.mktemp("cli")
    run_dir, tiny = str(tmp / "run"), str(tmp / "models")
    out = ptjax("train", PROMPT_TUNING, *run_args(run_dir, tiny), "--no-progress", cwd=tmp)
    assert out.returncode == 0, out.stderr
    return run_dir, out


def test_no_progress_logs_a_line_per_log_step(quiet_run):
    run_dir, out = quiet_run
    lines = out.stdout.splitlines()
    train = [x for x in lines if ": loss " in x]
    assert [x.split(" step ")[1].split(":")[0] for x in train] == ["1/4", "2/4", "3/4", "4/4"]
    assert len([x for x in lines if ": validation accuracy " in x]) == 2
    assert "PyTorch was not found" not in out.stderr and "[transformers]" not in out.stderr


def test_a_normal_run_prints_nothing_from_third_parties(quiet_run, tmp_path):
    """Issue 31: train, resume, eval, export and generate print ptjax's own lines alone:
    no absl warning from orbax's read-only checkpoint reader ("Given directory is read
    only"), no blank lines from the tokenizer trainer, nothing on stderr; and eval names the
    task it scored (here a transfer task)."""
    run_dir, train = quiet_run
    copy = str(tmp_path / "run")  # a copied run continues where it is (quiet_run stays)
    shutil.copytree(run_dir, copy)
    runs = {"train": train,
            "resume": ptjax("train", copy, "train.steps=5", "--no-progress", cwd=tmp_path),
            "eval": ptjax("eval", copy, "task.name=synthetic_sentiment_shifted", cwd=tmp_path),
            "export": ptjax("export", copy, "--out", str(tmp_path / "exported"), cwd=tmp_path),
            "generate": ptjax("generate", copy, "the movie was great", "--max-new-tokens", "2",
                              cwd=tmp_path)}
    for what, out in runs.items():
        assert out.returncode == 0, (what, out.stderr)
        assert out.stderr == "", (what, out.stderr)
        assert out.stdout.strip() and "" not in out.stdout.rstrip("\n").split("\n"), \
            (what, out.stdout)
    assert "resuming" in runs["resume"].stdout and "step 5/5" in runs["resume"].stdout
    lines = runs["eval"].stdout.splitlines()
    assert len(lines) == 2 and all(x.startswith(f"member {k}: validation accuracy ") and
                                   x.endswith(" on task synthetic_sentiment_shifted")
                                   for k, x in enumerate(lines)), lines


def test_tensorboard_tags_name_the_members_settings(quiet_run):
    run_dir, _ = quiet_run
    tb = os.path.join(run_dir, "tb")
    events = b"".join(open(os.path.join(tb, f), "rb").read() for f in os.listdir(tb))
    for seed in (0, 1):
        assert f"train/loss/prompt-P4-class_label-seed{seed}".encode() in events
        assert f"validation/accuracy/prompt-P4-class_label-seed{seed}".encode() in events


def test_export_rewrites_the_runs_export_from_its_checkpoint(quiet_run, tmp_path, capsys):
    run_dir, _ = quiet_run
    out = str(tmp_path / "exported")
    assert cli.main(["export", run_dir, "--out", out]) == 0
    assert "2 member(s) from checkpoint step 4" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(os.path.join(out, "prompts.npy")),
                                  np.load(os.path.join(run_dir, "export", "prompts.npy")))
    adapter = json.load(open(os.path.join(out, "prompt-1", "adapter_config.json")))
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 4


def test_wandb_offline_logs_the_same_metrics(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = str(tmp_path / "run")
    code = cli.main(["train", PROMPT_TUNING, *run_args(run_dir, str(tmp_path / "models"),
                     **{"prompt.seeds": "[0]", "train.steps": 2, "train.wandb": "ptjax-test"}),
                     "--no-progress"])
    assert code == 0
    runs = [d for d in os.listdir(os.path.join(run_dir, "wandb")) if d.startswith("offline-run")]
    assert len(runs) == 1, wandb.__version__
    history = os.listdir(os.path.join(run_dir, "wandb", runs[0]))
    assert any(f.endswith(".wandb") for f in history)
