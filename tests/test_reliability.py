"""A catalogue of bad inputs and damaged files (issue 18): configs, model files,
checkpoints, prompt files, data, numerics, permissions, run directories. Each case asserts
the one-line error, exit status 2, and that nothing on disk changed; damaged checkpoints
fall back to the newest intact one (saying so); a run directory is the one named on the
command line and is trained by one process at a time."""
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_run import ROOT, _files, base_args, ptjax, read_rows

from ptjax.models.tiny import build_tiny_model
from ptjax.rundir import RunLock


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Both built-in tiny models, built before any case so that building them is not a
    change a case made."""
    d = str(tmp_path_factory.mktemp("tiny-models"))
    for family in ("t5", "gpt2"):
        build_tiny_model(os.path.join(d, f"tiny-{family}"), family=family)
    return d


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6 (never modified: cases
    work on copies)."""
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    code, _ = ptjax("train", *base_args(run_dir, tiny_dir, **{"prompt.seeds": "[0,1]"}))
    assert code == 0
    return run_dir


def snapshot(*dirs):
    """Every file and directory under ``dirs``: path -> (mode, content hash)."""
    out = {}
    for top in dirs:
        for root, names, files in os.walk(top):
            for name in names:
                p = os.path.join(root, name)
                out[p] = (os.stat(p).st_mode, None)
            for name in files:
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    out[p] = (os.stat(p).st_mode, hashlib.sha256(f.read()).hexdigest())
        if not os.path.isdir(top):
            out[top] = os.path.exists(top)
    return out


def one_line_error(capsys, *argv):
    code, out = ptjax(*argv, capsys=capsys)
    err = out.err.strip()
    assert code == 2, (code, out)
    assert err.startswith("ptjax: error: ") and "\n" not in err, err
    assert "Traceback" not in out.err + out.out
    return err


def write(path, data: bytes | str):
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return str(path)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


ROWS = [{"inputs": f"review: {w} film", "targets": lab}
        for w, lab in [("great", "yes"), ("awful", "no")] * 4]


def _save_npy(path, array):
    np.save(path, array)
    return str(path)


def _bad_model(path):
    """A checkpoint directory whose config.json is cut short."""
    path.mkdir()
    write(path / "config.json", '{"model_type": "t5", "d_model": ')
    return str(path)


def _unsaved_run(path, tiny_dir):
    """A run directory killed before its first checkpoint (config.yaml, no checkpoints)."""
    path.mkdir()
    write(path / "config.yaml", f"run_dir: elsewhere\nmodel: {{tiny_dir: {tiny_dir}}}\n")
    write(path / "metrics.jsonl", "")
    return str(path)


def _case_files(tmp_path, tiny_dir):
    """Inputs of the catalogue cases, written in ``tmp_path/in``."""
    d = tmp_path / "in"
    d.mkdir()
    good = write(d / "good.jsonl", jsonl(ROWS))
    files = {
        "empty": write(d / "empty.yaml", "# nothing but a comment\n"),
        "latin1_yaml": write(d / "latin1.yaml", "prompt:\n  text: caf\xe9\n".encode("latin-1")),
        "bad_yaml": write(d / "bad.yaml", "train: {steps: 3\n"),
        "list_yaml": write(d / "list.yaml", "- train\n"),
        "latin1": write(d / "latin1.jsonl", (jsonl(ROWS[:2]) + json.dumps(
            {"inputs": "caf\xe9", "targets": "yes"}, ensure_ascii=False) + "\n").encode(
                "latin-1")),
        "bad_json": write(d / "bad.jsonl", jsonl(ROWS[:3]) + "{inputs: 1}\n"),
        "bad_label": write(d / "bad_label.jsonl", jsonl(ROWS + [
            {"inputs": "review: dull film", "targets": "maybe"}])),
        "txt_prompt": write(d / "p.txt", "0 0 0"),
        "bad_npy": write(d / "p.npy", b"\x93NUMPY garbage"),
        "nan_npy": _save_npy(d / "nan.npy", np.full((4, 64), np.nan, np.float32)),
        "wide_npy": _save_npy(d / "wide.npy", np.zeros((2, 4, 32), np.float32)),
        "bad_model": _bad_model(d / "model"),
        "good": good,
        "unsaved_run": _unsaved_run(d / "unsaved", tiny_dir),
        "a_file": write(d / "a_file", "x"),
        "no_config_dir": str(d),
    }
    return files


# (name, arguments after `ptjax`, expected part of the message); {name} is a case file,
# {run} a fresh run directory under tmp_path, {tiny} the tiny models.
CASES = [
    # configs
    ("empty config file", ["train", "{empty}"], "the config file is empty"),
    ("config not UTF-8", ["train", "{latin1_yaml}"], "not UTF-8 text"),
    ("config not YAML", ["train", "{bad_yaml}"], "not valid YAML"),
    ("config a list", ["train", "{list_yaml}"], "must hold a mapping of config sections"),
    ("config missing", ["train", "/nonexistent/c.yaml"], "/nonexistent/c.yaml: config file "
                                                          "not found"),
    ("dir without config", ["train", "{no_config_dir}"], "a directory with no config.yaml"),
    ("negative learning rate", ["train", "optim.learning_rate=-0.1"],
     "optim.learning_rate=-0.1 is out of range; valid: (0, inf)"),
    ("infinite learning rate", ["train", "optim.learning_rate=.inf"],
     "optim.learning_rate=inf is out of range"),
    ("negative dev size", ["train", "task.dev_size=-1"], "task.dev_size=-1 is out of range; "
                                                         "valid: [0, inf)"),
    ("negative warmup", ["train", "optim.warmup_steps=-5"], "optim.warmup_steps=-5"),
    ("b2 of one", ["train", "optim.name=adam", "optim.b2=1"], "optim.b2=1.0 is out of range"),
    ("dropout of one", ["train", "train.dropout=1"], "train.dropout=1.0 is out of range"),
    ("decay rate zero", ["train", "optim.decay_rate=0"], "optim.decay_rate=0.0"),
    ("negative weight decay", ["train", "optim.weight_decay=-1e-5"], "optim.weight_decay"),
    ("zero steps", ["train", "train.steps=0"], "train.steps=0 must be >= 1"),
    ("uniform range", ["train", "prompt.low=0.5", "prompt.high=0.5"],
     "prompt.low=0.5 must be below prompt.high=0.5"),
    ("override not YAML", ["train", "train.steps={{3"], "override 'train.steps={{3': the "
                                                        "value is not valid YAML"),
    ("override a mapping", ["train", "train.steps={{a: 1}}"], "train.steps={{'a': 1}} is not "
                                                              "an integer"),
    ("empty run_dir", ["train", "run_dir= "], "run_dir is empty; name the directory"),
    # output paths (checked before the model is loaded)
    ("run_dir is a file", ["train", "run_dir={a_file}"], "a_file is a file, not a directory"),
    ("run_dir under a file", ["train", "run_dir={a_file}/run"], "is a file, not a directory"),
    ("eval --out a directory", ["eval", "{no_config_dir}", "--out", "{no_config_dir}"],
     "--out {no_config_dir}: is a directory; name a file"),
    ("plan --out nowhere", ["plan", "--out", "/nonexistent/dir/plan.json"],
     "its directory /nonexistent/dir does not exist"),
    ("tiny into another model", ["tiny", "{tiny}/tiny-t5", "--family", "gpt2"],
     "already holds a model of type 't5', not a tiny gpt2"),
    ("tiny into other files", ["tiny", "{no_config_dir}"], "is not empty and holds no model"),
    # model files
    ("model missing", ["train", "run_dir={run}", "model.path=/nonexistent/model"],
     "/nonexistent/model: no such directory"),
    ("model config cut short", ["train", "run_dir={run}", "model.path={bad_model}"],
     "config.json: not valid JSON"),
    ("eval a run without checkpoints", ["eval", "{unsaved_run}"],
     "{unsaved_run}/checkpoints: no checkpoint; the run has not saved its trained members yet"),
    # data
    ("jsonl not UTF-8", ["train", "run_dir={run}", "task.name=jsonl",
                         "task.train_file={latin1}", "task.dev_file={good}"],
     "latin1.jsonl:3: not UTF-8 text"),
    ("jsonl bad line", ["train", "run_dir={run}", "task.name=jsonl", "task.train_file={good}",
                        "task.dev_file={bad_json}"], "bad.jsonl:4: not valid JSON"),
    ("jsonl a directory", ["train", "run_dir={run}", "task.name=jsonl",
                           "task.train_file={no_config_dir}", "task.dev_file={good}"],
     "is a directory, not a JSONL task file"),
    ("train label not a class", ["train", "run_dir={run}", "task.name=jsonl",
                                 "task.train_file={bad_label}", "task.dev_file={good}",
                                 "task.labels=[no, yes]"],
     "bad_label.jsonl: example 9 has target 'maybe', which is not one of the task's labels "
     "(no, yes)"),
    ("dev label not a class", ["train", "run_dir={run}", "task.name=jsonl",
                               "task.train_file={good}", "task.dev_file={bad_label}",
                               "task.labels=[no, yes]"],
     "target 'maybe' is not one of its candidates"),
    # prompt files
    ("prompt file not npy", ["train", "run_dir={run}", "prompt.init=file",
                             "prompt.file={txt_prompt}"],
     "prompt files must be .npy or .safetensors"),
    ("prompt file corrupt", ["train", "run_dir={run}", "prompt.init=file",
                             "prompt.file={bad_npy}"], "cannot be read as a prompt"),
    ("prompt file not finite", ["train", "run_dir={run}", "prompt.init=file",
                                "prompt.file={nan_npy}"], "nan.npy: the prompt holds non-finite"),
    ("eval prompt of another width", ["eval", "model.path=tiny-t5", "model.tiny_dir={tiny}",
                                      "--prompt", "{wide_npy}"],
     "wide.npy: prompt has shape (2, 4, 32), expected (P, 64)"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_catalogue(name, argv, message, tmp_path, tiny_dir, capsys):
    files = _case_files(tmp_path, tiny_dir)
    fill = {**files, "run": str(tmp_path / "run"), "tiny": tiny_dir}
    argv = [a.format(**fill) for a in argv]
    message = message.format(**fill)
    if argv[0] == "train":
        small = base_args(fill["run"], tiny_dir)
        keys = {a.split("=", 1)[0] for a in argv[1:]}
        argv = [argv[0], *[a for a in argv[1:] if "=" not in a],
                *[a for a in small if a.split("=", 1)[0] not in keys],
                *[a for a in argv[1:] if "=" in a]]
    before = snapshot(str(tmp_path), tiny_dir)
    err = one_line_error(capsys, *argv)
    assert message in err, err
    assert snapshot(str(tmp_path), tiny_dir) == before


def test_read_only_run_dir(tmp_path, tiny_dir, capsys, monkeypatch):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make access() answer as for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if str(p) == str(run_dir)
                            and m & os.W_OK else real(p, m, **kw))
    before = snapshot(str(tmp_path))
    err = one_line_error(capsys, "train", *base_args(str(run_dir), tiny_dir))
    assert f"{run_dir} is not writable" in err
    assert snapshot(str(tmp_path)) == before


def test_debug_shows_the_traceback(tmp_path):
    from ptjax import cli
    from ptjax.errors import PtjaxError

    with pytest.raises(PtjaxError, match="config file is empty"):
        cli.main(["train", write(tmp_path / "e.yaml", ""), "--debug"])


def test_missing_transfer_data_stops_before_the_first_step(tmp_path, tiny_dir, capsys):
    pytest.importorskip("tensorflow_datasets")
    run_dir = str(tmp_path / "run")
    err = one_line_error(capsys, "train", *base_args(run_dir, tiny_dir, **{
        "task.transfer": "[rte]", "task.data_dir": str(tmp_path / "tfds")}))
    assert "task 'rte': TFDS dataset super_glue/rte (validation) is not prepared" in err
    assert not os.path.exists(run_dir)  # found before the run directory was made


# ------------------------------------------------------------------ run directories


def test_what_is_scored_after_training_may_change_on_resume(trained, tmp_path, capsys):
    """A rerun that adds (or drops) a transfer task resumes the run rather than refusing
    it: transfer and ensembles are scored after training and change nothing before."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    code, out = ptjax("train", run_dir, "task.transfer=[synthetic_sentiment_shifted]",
                      "train.ensemble=majority", capsys=capsys)
    assert code == 0, out.err
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert set(results["transfer"]) == {"synthetic_sentiment_shifted"} and results["ensemble"]
    assert _files(os.path.join(run_dir, "export")) == _files(os.path.join(trained, "export"))


def test_a_copied_run_continues_in_its_copy(trained, tiny_dir, tmp_path, capsys):
    """The copy's config.yaml still names the original run_dir: training the copy must
    train the copy and leave the original untouched."""
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    before = snapshot(trained)
    code, out = ptjax("train", copy, "train.steps=9", capsys=capsys)
    assert code == 0, out.err
    assert f"resuming {copy} from step 6" in out.out
    assert snapshot(trained) == before
    assert json.load(open(os.path.join(copy, "results.json")))["steps"] == 9
    from ptjax.config import load_config

    assert load_config(os.path.join(copy, "config.yaml")).run_dir == copy
    # the same through the copy's config.yaml
    code, out = ptjax("train", os.path.join(copy, "config.yaml"), "train.steps=9",
                      capsys=capsys)
    assert code == 0 and snapshot(trained) == before


def test_a_second_process_on_a_run_is_refused(trained, tiny_dir, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    lock = RunLock(run_dir)  # another process training it (flock: per open file)
    before = snapshot(run_dir)
    try:
        err = one_line_error(capsys, "train", run_dir, "train.steps=9")
    finally:
        lock.release()
    assert f"run_dir={run_dir}: another ptjax process is training this run now" in err
    assert snapshot(run_dir) == before


def test_a_killed_process_leaves_no_lock(tmp_path):
    run_dir = str(tmp_path)
    code = ("import sys, time; from ptjax.rundir import RunLock; RunLock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, run_dir], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT), text=True)
    assert proc.stdout.readline().strip() == "locked"
    from ptjax.errors import PtjaxError

    with pytest.raises(PtjaxError, match="another ptjax process"):
        RunLock(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    RunLock(run_dir).release()  # the kernel dropped the dead process's lock


# ------------------------------------------------------------------ damaged checkpoints


def _damage(ckpt_step_dir, how, item="state"):
    """Damage one orbax checkpoint step directory the way a crash or a disk would (the
    array data of ``item``)."""
    if how == "truncated metadata":
        path = os.path.join(ckpt_step_dir, "meta", "metadata")
        with open(path, "rb") as f:
            data = f.read()
        write(path, data[:len(data) // 2])
    elif how == "missing item":
        shutil.rmtree(os.path.join(ckpt_step_dir, "best"))
    elif how == "corrupted array data":
        data_dir = os.path.join(ckpt_step_dir, item)
        for root, _, names in os.walk(data_dir):
            for name in names:
                p = os.path.join(root, name)
                if os.sep + "d" + os.sep in p:  # ocdbt's data files
                    size = os.path.getsize(p)
                    with open(p, "r+b") as f:
                        f.seek(size // 3)
                        f.write(b"\xff" * max(1, size // 3))
    else:
        raise AssertionError(how)


DAMAGE = ["truncated metadata", "missing item", "corrupted array data"]


@pytest.mark.parametrize("how", DAMAGE)
def test_eval_falls_back_from_a_damaged_checkpoint(how, trained, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    _damage(os.path.join(run_dir, "checkpoints", "6"), how, item="best")  # eval reads best
    before = snapshot(run_dir)
    code, out = ptjax("eval", run_dir, capsys=capsys)
    assert code == 0 and "Traceback" not in out.err
    warn = [line for line in out.err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warn) == 1 and f"{run_dir}/checkpoints/6 (step 6) is damaged" in warn[0]
    assert "using step 3 instead" in warn[0]
    assert snapshot(run_dir) == before  # evaluating never changes a run


def test_damaged_checkpoints_leave_no_asyncio_errors_behind(trained, tmp_path, capsys,
                                                            caplog, monkeypatch):
    """Issue 31: orbax reads a checkpoint's arrays as concurrent tasks and, at the first
    failure, leaves the others behind with its event loop closed: when they were collected
    (at the end of `make test`, or in whichever test ran then), asyncio logged each failure
    ("Task exception was never retrieved", a traceback per array) and each pending read met
    the closed loop ("RuntimeError: Event loop is closed"). They repeat the one line ptjax
    prints; ptjax collects them while it looks for an intact checkpoint."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    for step in ("3", "6"):
        _damage(os.path.join(run_dir, "checkpoints", step), "corrupted array data")
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        err = one_line_error(capsys, "train", run_dir, "train.steps=9")
        gc.collect()  # what is left is heard now, not in a later test
    assert "no older checkpoint" in err
    assert not [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not [str(u.exc_value) for u in unraisable]


@pytest.mark.parametrize("how", DAMAGE)
def test_no_intact_checkpoint_is_one_line(how, trained, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    for step in ("3", "6"):
        _damage(os.path.join(run_dir, "checkpoints", step), how)
    before = snapshot(run_dir)
    err = one_line_error(capsys, "train", run_dir, "train.steps=9")
    assert f"checkpoint {run_dir}/checkpoints/6 (step 6) is damaged" in err
    assert "no older checkpoint" in err and "is intact" in err
    assert snapshot(run_dir) == before


def test_training_falls_back_and_reaches_the_uninterrupted_result(trained, tmp_path,
                                                                 capsys):
    """A damaged newest checkpoint: the run says so, moves it aside, resumes from the
    one before and ends exactly where the undamaged run ended."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    _damage(os.path.join(run_dir, "checkpoints", "6"), "corrupted array data")
    code, out = ptjax("train", run_dir, capsys=capsys)
    assert code == 0, out.err
    assert f"{run_dir}/checkpoints/6 (step 6) is damaged" in out.err
    assert f"moved to {run_dir}/damaged-checkpoints/6" in out.err
    assert f"resuming {run_dir} from step 3" in out.out
    assert _files(os.path.join(run_dir, "export")) == _files(os.path.join(trained, "export"))
    rows = [[{k: v for k, v in r.items() if k != "steps_per_s"} for r in read_rows(d)]
            for d in (run_dir, trained)]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_kill_during_the_fallback_then_resume(trained, tmp_path):
    """SIGKILL a run while it falls back from a damaged checkpoint; the rerun still ends
    bit-identical to the uninterrupted run."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained, run_dir)
    _damage(os.path.join(run_dir, "checkpoints", "6"), "corrupted array data")
    cmd = [sys.executable, "-m", "ptjax.cli", "train", run_dir]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(run_dir, "damaged-checkpoints", "6")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert os.path.exists(os.path.join(run_dir, "damaged-checkpoints", "6"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _files(os.path.join(run_dir, "export")) == _files(os.path.join(trained, "export"))
    state = [ocp.StandardCheckpointer().restore(os.path.join(d, "checkpoints", "6", "state"))
             for d in (trained, run_dir)]
    jax.tree.map(np.testing.assert_array_equal, *state)
