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
from ptjax.models.tiny import build_tiny_model

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


def test_config_show_prints_every_key_resolved(capsys, tmp_path):
    overrides = ["prompt.length=7", f"model.tiny_dir={tmp_path}"]
    assert cli.main(["config", "show", PROMPT_TUNING, *overrides]) == 0
    assert not os.listdir(tmp_path)  # it checks the built-in model, never writes it
    shown = yaml.safe_load(capsys.readouterr().out)
    want = load_config(PROMPT_TUNING, overrides)
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
def bare_t5(tmp_path_factory):
    """A tiny T5 without sentinels (as most hub checkpoints but T5's own)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("bare") / "t5"), "t5", extra_ids=0)


@pytest.mark.parametrize("overrides, message", [
    (["task.template={premise} it was {mask}"], "the examples have no field {premise}"),
    (["model.path=BARE", "task.template={inputs} it was {mask}"], "no <extra_id_0> token"),
    (["model.path=/nonexistent/t5"], "model.path=/nonexistent/t5: no such directory"),
    (["model.path=tiny-t6"], "did you mean 'tiny-t5'? give a checkpoint directory, a "
                             "Hugging Face hub id (e.g. google/t5-small-lm-adapt) or a "
                             "built-in model: tiny-t5, tiny-gpt2, tiny-bert"),
])
def test_config_show_refuses_what_train_refuses(tmp_path, capsys, bare_t5, overrides,
                                                message):
    """Issue 31: `ptjax config show` exited 0 for configs `ptjax train` refuses; now it gives
    train's own one-line error (and a mistyped built-in name lists the built-ins)."""
    args = [PROMPT_TUNING, f"model.tiny_dir={tmp_path / 'models'}",
            f"run_dir={tmp_path / 'run'}", *[o.replace("BARE", bare_t5) for o in overrides]]
    assert cli.main(["train", *args]) == 2
    train = capsys.readouterr().err
    assert cli.main(["config", "show", *args]) == 2
    shown = capsys.readouterr()
    assert shown.out == "" and shown.err == train and train.count("\n") == 1, train
    assert message in train and not os.path.exists(tmp_path / "run")


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
