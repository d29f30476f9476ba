"""Preemption (ptjax.preemption): a SIGTERM at any point of a run (mid step, mid
evaluation, mid save; one process or two) saves the step in flight and exits 75, and
rerunning the same command ends exactly where an uninterrupted run ends: the same trained
state, exports, results and metrics.jsonl, bit for bit on the CPU. A preempted sweep
resumes the same way."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from conftest import xla_flags
from test_run import ROOT, _files, _finished_steps, base_args, ptjax, read_rows

from ptjax import checkpoint, loop, run
from ptjax.preemption import EXIT_PREEMPTED
from ptjax.sweep import load_sweep

STEPS = 12
ARGS = {"prompt.seeds": "[3,4]", "train.steps": STEPS, "train.eval_every": 4,
        "train.checkpoint_every": 6, "train.log_every": 4, "train.dropout": 0.1}
# signalled from outside: long enough that the signal lands mid-run
LONG = {**ARGS, "train.steps": 150, "train.eval_every": 50, "train.checkpoint_every": 5}
TWO = {"train.steps": 60, "train.data_shards": 2}  # two processes: slower steps


def _same_run(ref: str, other: str, steps: int):
    """Everything a finished run leaves equals the reference's (timings aside)."""
    def rows(d):
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in read_rows(d)]

    assert rows(other) == rows(ref)
    exports = [_files(os.path.join(d, "export")) for d in (ref, other)]
    assert exports[0] and exports[0] == exports[1]
    a, b = (json.load(open(os.path.join(d, "results.json"))) for d in (ref, other))
    assert {**a, "run_dir": "", "export": ""} == {**b, "run_dir": "", "export": ""}
    state = [_host_restore(os.path.join(d, "checkpoints", str(steps), "state"))
             for d in (ref, other)]
    jax.tree.map(np.testing.assert_array_equal, *state)


def _host_restore(path):
    """A checkpoint item as numpy arrays, whatever devices and processes saved it."""
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata.tree
        return reader.restore(path, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    assert ptjax("train", *base_args(run_dir, tiny_dir, **ARGS))[0] == 0
    return run_dir


def _sigterm_on_call(monkeypatch, owner, name, call: int, after: bool = False):
    """SIGTERM this process at the ``call``-th call of ``owner.name`` (before it runs, or
    right ``after`` it returns: a save still in flight)."""
    real, calls = getattr(owner, name), []

    def hooked(*args, **kw):
        calls.append(1)
        if len(calls) == call and not after:
            os.kill(os.getpid(), signal.SIGTERM)
        out = real(*args, **kw)
        if len(calls) == call and after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(owner, name, hooked)


# (where, what is hooked, which call, after the call) -> the step the run stops at
POINTS = {
    # step 5's batch is placed, then SIGTERM: step 5 (no log, eval or checkpoint step)
    # finishes and is saved with its loss not yet logged
    "mid step": ((loop, "global_batch", 5, False), 5),
    "mid evaluation": ((run, "evaluate", 1, False), 4),  # the dev set at step 4
    # heard while step 6's checkpoint is still being written (orbax saves asynchronously):
    # step 7 runs, and its checkpoint waits for step 6's to land before it is written
    "mid save": ((checkpoint.Checkpointer, "save", 1, True), 7),
}


@pytest.mark.parametrize("where", sorted(POINTS))
def test_sigterm_saves_the_step_and_the_rerun_is_exact(where, reference, tiny_dir, tmp_path,
                                                       monkeypatch, capsys):
    (owner, name, call, after), stop = POINTS[where]
    run_dir = str(tmp_path / "run")
    argv = ["train", *base_args(run_dir, tiny_dir, **ARGS)]
    with monkeypatch.context() as m:
        _sigterm_on_call(m, owner, name, call, after)
        code, out = ptjax(*argv, capsys=capsys)
    assert code == EXIT_PREEMPTED
    assert f"preempted (SIGTERM) after step {stop}; its checkpoint is " in out.err
    assert _finished_steps(os.path.join(run_dir, "checkpoints"))[-1] == stop
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler put back
    code, out = ptjax(*argv, capsys=capsys)
    assert code == 0 and f"resuming {run_dir} from step {stop}" in out.out
    _same_run(reference, run_dir, STEPS)


def test_a_preempted_sweep_resumes_its_job(tiny_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM in a sweep's second job: the sweep exits 75; the rerun skips the first job,
    resumes the second from its checkpoint, and both equal an uninterrupted sweep's."""
    def write(name):
        path = tmp_path / f"{name}.yaml"
        config = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in base_args(
            "", tiny_dir, **{**ARGS, "train.steps": 8}))}
        for key in ("run_dir", "prompt.seeds"):
            config.pop(key)
        path.write_text(yaml.safe_dump({"name": name, "dir": str(tmp_path / name),
                                        "config": config, "seeds": [3],
                                        "grid": {"prompt.length": [2, 4]}}))
        return str(path)

    ref, cut = write("ref"), write("cut")
    assert ptjax("sweep", ref, "--no-report")[0] in (0, None)
    with monkeypatch.context() as m:
        _sigterm_on_call(m, loop, "global_batch", 8 + 3)  # the second job's step 3
        code, out = ptjax("sweep", cut, "--no-report", capsys=capsys)
    assert code == EXIT_PREEMPTED and "after step 3" in out.err
    code, out = ptjax("sweep", cut, "--no-report", capsys=capsys)
    assert code == 0 and "finished earlier, skipped" in out.out and "from step 3" in out.out
    jobs = [[j.run_dir for j in load_sweep(p).jobs] for p in (ref, cut)]
    assert len(jobs[0]) == 2
    for a, b in zip(*jobs):
        _same_run(a, b, steps=8)


@pytest.mark.slow
def test_sigterm_at_a_random_moment(tiny_dir, tmp_path):
    """The command line, signalled from outside at a random moment after its first
    checkpoint: exit status 75, and the rerun ends as the uninterrupted run."""
    reference, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    assert ptjax("train", *base_args(reference, tiny_dir, **LONG))[0] == 0
    argv = [sys.executable, "-m", "ptjax.cli", "train", *base_args(run_dir, tiny_dir, **LONG)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not _finished_steps(os.path.join(run_dir, "checkpoints")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(np.random.default_rng().uniform(0, 2.0))
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal (a slow start); nothing to resume")
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    stop = _finished_steps(os.path.join(run_dir, "checkpoints"))[-1]
    assert f"after step {stop};" in err
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    assert f"resuming {run_dir} from step {stop}" in out.stdout
    _same_run(reference, run_dir, LONG["train.steps"])


def _two_processes(run_dir, tiny_dir, sigterm_rank=None):
    """A job of two processes x 2 CPU devices started as SLURM would (gloo collectives);
    with ``sigterm_rank`` that process alone is sent SIGTERM after the first checkpoint.
    -> ([return codes], [outputs])."""
    argv = [sys.executable, "-m", "ptjax.cli", "train",
            *base_args(run_dir, tiny_dir, **{**LONG, **TWO})]
    procs = []
    job = str(2000 + os.getpid() % 3000 + (sigterm_rank or 0) * 7)
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, SLURM_JOB_ID=job,
                   SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   XLA_FLAGS=xla_flags(2))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    if sigterm_rank is not None:
        deadline = time.time() + 180
        while not _finished_steps(os.path.join(run_dir, "checkpoints")) \
                and time.time() < deadline:
            time.sleep(0.01)
        procs[sigterm_rank].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_two_processes_stop_at_one_step_and_resume_exactly(tiny_dir, tmp_path):
    """SIGTERM to one process of two: JAX's preemption sync point stops both after the same
    step, they save it together and exit 75; rerun, the job ends as an uninterrupted
    two-process job, bit for bit."""
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    codes, outs = _two_processes(ref, tiny_dir)
    assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    codes, outs = _two_processes(cut, tiny_dir, sigterm_rank=1)
    assert codes == [EXIT_PREEMPTED] * 2, outs[0][-2000:] + outs[1][-2000:]
    stops = {int(o.split("preempted (SIGTERM) after step ")[1].split(";")[0]) for o in outs}
    assert len(stops) == 1 and stops.pop() == _finished_steps(
        os.path.join(cut, "checkpoints"))[-1]
    codes, outs = _two_processes(cut, tiny_dir)
    assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    _same_run(ref, cut, TWO["train.steps"])
