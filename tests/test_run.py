"""`ptjax train` / `ptjax eval` end to end on the built-in tiny models: run directory,
metrics, early stopping, orbax checkpoints of the trainable state only, exact resume after
SIGKILL, exports that PEFT loads, and one-line errors that leave the run resumable."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import torch

from ptjax import cli
from ptjax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


def base_args(run_dir, tiny_dir, **kw):
    args = {"run_dir": run_dir, "model.tiny_dir": tiny_dir, "model.path": "tiny-t5",
            "prompt.length": 4, "prompt.init": "sampled_vocab", "task.max_input_length": 24,
            "task.max_target_length": 4, "task.dev_size": 16, "train.batch_size": 8,
            "train.eval_batch_size": 16, "train.steps": 6, "train.eval_every": 3,
            "train.checkpoint_every": 3, "train.log_every": 2, "train.dropout": 0.0,
            "train.progress": False}
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


def ptjax(*argv, capsys=None):
    code = cli.main(list(argv))
    out = capsys.readouterr() if capsys else None
    return code, out


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def t5_run(tiny_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("t5-run"))
    code, _ = ptjax("train", *base_args(run_dir, tiny_dir, **{"prompt.seeds": "[0,1]"}))
    assert code == 0
    return run_dir


def test_run_directory(t5_run):
    cfg = load_config(os.path.join(t5_run, "config.yaml"))
    assert cfg.prompt.seeds == (0, 1) and cfg.train.steps == 6
    rows = read_rows(t5_run)
    train = [r for r in rows if r["split"] == "train"]
    dev = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in train] == [2, 2, 3, 3, 4, 4, 6, 6]  # log, eval and ckpt steps
    assert all(np.isfinite(r["loss"]) and r["learning_rate"] == 0.3 for r in train)
    assert [(r["step"], r["prompt"]) for r in dev] == [(3, 0), (3, 1), (6, 0), (6, 1)]
    assert os.listdir(os.path.join(t5_run, "tb"))  # TensorBoard events
    results = json.load(open(os.path.join(t5_run, "results.json")))
    for k, p in enumerate(results["prompts"]):
        best = max((r for r in dev if r["prompt"] == k), key=lambda r: r["accuracy"])
        assert p["best_accuracy"] == best["accuracy"] and p["seed"] == k
        assert p["best_step"] == min(r["step"] for r in dev
                                     if r["prompt"] == k and r["accuracy"] == best["accuracy"])
    table = np.load(os.path.join(t5_run, "export", "prompts.npy"))
    assert table.shape == (2, 4, 64) and table.dtype == np.float32
    for k in range(2):
        d = os.path.join(t5_run, "export", f"prompt-{k}")
        np.testing.assert_array_equal(np.load(os.path.join(d, "prompt.npy")), table[k])
        assert {"prompt.safetensors", "adapter_config.json",
                "adapter_model.safetensors"} <= set(os.listdir(d))


def test_eval_reproduces_the_best_metric(t5_run, capsys):
    """`ptjax eval RUN_DIR` on the exported best prompts gives the logged best accuracy."""
    out = os.path.join(t5_run, "eval.json")
    code, _ = ptjax("eval", t5_run, "--out", out, capsys=capsys)
    assert code == 0
    results = json.load(open(os.path.join(t5_run, "results.json")))
    assert json.load(open(out))["accuracy"] == [p["best_accuracy"] for p in results["prompts"]]


def test_checkpoints_hold_only_the_trainable_state(t5_run):
    ckpt = os.path.join(t5_run, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["3", "6"]
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpt, "6", "state"))
    assert set(state) == {"step", "trainable", "opt_state", "rng", "prompt_seeds"}
    assert set(state["trainable"]) == {"prompt"} and int(state["step"]) == 6
    for leaf in jax.tree.leaves(state):
        assert leaf.size <= 2 * 4 * 64  # never a [vocab, D] embedding or a layer kernel
    meta = json.load(open(os.path.join(ckpt, "6", "meta", "metadata")))
    assert meta["data_position"] == 6 * 8 and len(meta["best_metric"]) == 2


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_peft_loads_the_adapter_with_equal_logits(family, t5_run, tiny_dir, tmp_path):
    """The exported adapter directory is a PEFT prompt-tuning adapter of the same base
    model: PEFT's logits on the same inputs equal ptjax's."""
    peft = pytest.importorskip("peft")
    import transformers

    from ptjax.models.model import load_model

    if family == "t5":
        adapter = os.path.join(t5_run, "export", "prompt-1")
    else:
        run_dir = str(tmp_path / "gpt2")
        code, _ = ptjax("train", *base_args(run_dir, tiny_dir, **{
            "model.path": "tiny-gpt2", "task.name": "synthetic_qa", "train.steps": 3}))
        assert code == 0
        adapter = os.path.join(run_dir, "export", "prompt-0")
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    base = config["base_model_name_or_path"]
    assert base == os.path.join(tiny_dir, f"tiny-{family}")
    model = load_model(base)
    auto = (transformers.AutoModelForSeq2SeqLM if family == "t5"
            else transformers.AutoModelForCausalLM)
    peft_model = peft.PeftModel.from_pretrained(auto.from_pretrained(base), adapter).eval()
    prompt = np.load(os.path.join(adapter, "prompt.npy"))
    tok = model.tokenizer
    batch = tok(["review: the movie was great", "review: a dull film"], padding=True,
                return_tensors="np")
    kw = {}
    if family == "t5":
        dec = np.array([[0, 5, 9], [0, 7, 3]])
        kw = dict(decoder_input_ids=dec)
    ours = np.asarray(model.logits(model.params, batch["input_ids"],
                                   attention_mask=batch["attention_mask"], prompt=prompt, **kw))
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(batch["input_ids"]),
                            attention_mask=torch.tensor(batch["attention_mask"]),
                            **{k: torch.tensor(v) for k, v in kw.items()}).logits.numpy()
    if family == "gpt2":
        theirs = theirs[:, prompt.shape[0]:]  # PEFT returns logits for the prompt too
        real = batch["attention_mask"] == 1  # pad positions' logits carry no meaning
        ours, theirs = ours[real], theirs[real]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_gpt2_generative_task_scores_exact_match(tmp_path, tiny_dir, capsys):
    run_dir = str(tmp_path / "qa")
    code, _ = ptjax("train", *base_args(run_dir, tiny_dir, **{
        "model.path": "tiny-gpt2", "task.name": "synthetic_qa", "train.steps": 2,
        "train.eval_every": 2}), capsys=capsys)
    assert code == 0
    dev = [r for r in read_rows(run_dir) if r["split"] == "validation"]
    assert [r["step"] for r in dev] == [2] and 0.0 <= dev[0]["exact_match"] <= 100.0


def _finished_steps(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


METHOD_ARGS = {
    "prompt": {},
    "prefix": {"method.name": "prefix", "method.prefix.hidden": 16},
    "ptuning": {"method.name": "ptuning", "method.ptuning.encoder": "lstm",
                "method.ptuning.hidden": 16},
    "model": {"method.name": "model", "prompt.seeds": "[3]", "optim.name": "adam",
              "optim.learning_rate": 1e-3},
}


def _files(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_dir, method):
    """Kill -9 a run after its first checkpoint, rerun the same command: the trained
    members, their exports, optimizer-driven metrics and results equal an uninterrupted
    run's exactly (CPU), for every method."""
    steps = 60 if method == "prompt" else 30

    def command(run_dir):
        args = base_args(run_dir, tiny_dir, **{
            "prompt.seeds": "[3,4]", "train.steps": steps, "train.eval_every": 10,
            "train.checkpoint_every": 5, "train.log_every": 5, "train.dropout": 0.1,
            **METHOD_ARGS[method]})
        return [sys.executable, "-m", "ptjax.cli", "train", *args]

    env = dict(os.environ, PYTHONPATH=ROOT)
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert ptjax(*command(ref)[3:])[0] == 0  # the uninterrupted reference, in-process
    proc = subprocess.Popen(command(cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _finished_steps(os.path.join(cut, "checkpoints")) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _finished_steps(os.path.join(cut, "checkpoints"))
    assert killed_at and killed_at[-1] < steps, "the run was not killed mid-way"
    out = subprocess.run(command(cut), check=True, env=env, capture_output=True, text=True)
    assert f"resuming {cut} from step {killed_at[-1]}" in out.stdout
    exports = [_files(os.path.join(d, "export")) for d in (ref, cut)]
    assert exports[0] and exports[0] == exports[1]

    def rows(d):
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in read_rows(d)]

    assert rows(ref) == rows(cut)
    a, b = (json.load(open(os.path.join(d, "results.json"))) for d in (ref, cut))
    assert {**a, "run_dir": "", "export": ""} == {**b, "run_dir": "", "export": ""}
    state = [ocp.StandardCheckpointer().restore(
        os.path.join(d, "checkpoints", str(steps), "state")) for d in (ref, cut)]
    jax.tree.map(np.testing.assert_array_equal, *state)


def test_overflow_stops_the_run_and_every_checkpoint_is_finite(tmp_path, tiny_dir, capsys):
    """A learning rate that overflows fp32 within a few steps (Adam moves every prompt
    entry by ~lr per step): the run stops naming the step, every checkpoint is finite,
    and rerunning resumes from the named one and stops at the same step the same way."""
    run_dir = str(tmp_path / "nan")
    args = base_args(run_dir, tiny_dir, **{
        "optim.name": "adam", "optim.learning_rate": 1e38, "train.steps": 30,
        "train.checkpoint_every": 2, "train.log_every": 1, "train.eval_every": 100})
    code, out = ptjax("train", *args, capsys=capsys)
    assert code == 2
    msg = out.err.strip()
    match = re.fullmatch(r"ptjax: error: (?:loss is (?:nan|inf|-inf) at step (\d+) \(member "
                         r"\d\)|the update at step (\d+) is not finite \(the learning rate "
                         r"may be too high\)); training stopped and the last good checkpoint "
                         r"is step (\d+) in (\S+)", msg)
    assert match, msg
    bad_step, named = int(match[1] or match[2]), int(match[3])
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert match[4] == ckpt_dir and _finished_steps(ckpt_dir)[-1] == named < bad_step
    _assert_checkpoints_finite(ckpt_dir)
    assert all(np.isfinite(r["loss"]) for r in read_rows(run_dir))
    code, again = ptjax("train", *args, capsys=capsys)
    assert code == 2 and f"resuming {run_dir} from step {named}" in again.out
    assert again.err.strip() == msg  # resumed exactly: the same step fails the same way


def _assert_checkpoints_finite(ckpt_dir):
    for step in _finished_steps(ckpt_dir):
        for item in ("state", "best"):
            tree = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(step), item))
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
                       if np.issubdtype(np.asarray(x).dtype, np.floating)), (step, item)


def _force_nan_at(monkeypatch, bad_step, where):
    """From step ``bad_step`` (1-based) on, make the train loss NaN (``where="loss"``), or
    only its gradient, so the logged loss stays finite while the update is not
    (``where="update"``: the fault a check of the loss alone misses). Any method: the step
    function gets a "poison" row vector (0, or NaN from that step on) that the loss uses."""
    from ptjax import train as train_lib

    real_loss, real_make = train_lib.loss_fn, train_lib.make_train_step

    def loss_fn(model, method, trainable, frozen, batch, *args, **kwargs):
        poison = batch["poison"].sum()
        batch = {k: v for k, v in batch.items() if k != "poison"}
        total, per_k = real_loss(model, method, trainable, frozen, batch, *args, **kwargs)
        if where == "loss":
            return total + poison, per_k + poison
        leaf = jax.tree.leaves(trainable)[0]
        return total + poison * leaf.sum(), per_k

    def make_train_step(*args, **kwargs):
        step = real_make(*args, **kwargs)

        def forced(state, frozen, batch):
            rows = batch["input_ids"]
            value = np.nan if int(state.step) + 1 >= bad_step else 0.0
            poison = jax.device_put(np.full(rows.shape[:1], value, np.float32), rows.sharding)
            return step(state, frozen, {**batch, "poison": poison})
        return forced

    monkeypatch.setattr(train_lib, "loss_fn", loss_fn)
    monkeypatch.setattr(train_lib, "make_train_step", make_train_step)


@pytest.mark.slow
@pytest.mark.parametrize("method, where", [("prompt", "loss"), ("prompt", "update"),
                                           ("model", "update")])
def test_forced_non_finite_step_keeps_checkpoints_finite_and_resume_is_exact(
        method, where, tmp_path, tiny_dir, capsys, monkeypatch):
    """A loss (or only its update) forced NaN at step 4, a checkpoint step: the run stops
    there naming checkpoint 2, which (like every checkpoint) is finite (step 4's is never
    written); rerunning without the fault resumes from it and ends exactly where an
    uninterrupted run ends."""
    extra = {**METHOD_ARGS[method], "train.steps": 8, "train.checkpoint_every": 2,
             "train.log_every": 1, "train.eval_every": 4}
    ref, run_dir = str(tmp_path / "ref"), str(tmp_path / "nan")
    assert ptjax("train", *base_args(ref, tiny_dir, **extra))[0] == 0
    with monkeypatch.context() as m:
        _force_nan_at(m, 4, where)
        code, out = ptjax("train", *base_args(run_dir, tiny_dir, **extra), capsys=capsys)
    assert code == 2
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    what = ("loss is nan at step 4 (member 0)" if where == "loss" else
            "the update at step 4 is not finite (the learning rate may be too high)")
    assert out.err.strip() == (f"ptjax: error: {what}; training stopped and the last good "
                               f"checkpoint is step 2 in {ckpt_dir}")
    assert _finished_steps(ckpt_dir) == [2]
    _assert_checkpoints_finite(ckpt_dir)
    code, out = ptjax("train", *base_args(run_dir, tiny_dir, **extra), capsys=capsys)
    assert code == 0 and f"resuming {run_dir} from step 2" in out.out
    assert _files(os.path.join(run_dir, "export")) == _files(os.path.join(ref, "export"))
    state = [ocp.StandardCheckpointer().restore(os.path.join(d, "checkpoints", "8", "state"))
             for d in (ref, run_dir)]
    jax.tree.map(np.testing.assert_array_equal, *state)


@pytest.mark.parametrize("overrides, message", [
    ({"prompt.init": "class_label", "task.name": "synthetic_qa"},
     "prompt.init=class_label needs class labels; task 'synthetic_qa' has none"),
    ({"model.path": "tiny-gpt2", "prompt.length": 300},
     "prompt.length=300 is longer than the model's 256 positions"),
    ({"model.path": "tiny-gpt2", "prompt.length": 200, "task.max_input_length": 60},
     "prompt.length (200) + task.max_input_length (60) + task.max_target_length (4) = 264 "
     "exceeds the model's 256 positions"),
    ({"optim.name": "adagrad"}, "optim.name='adagrad' is not valid; valid: adafactor"),
    ({"prompt.init": "zeros"}, "prompt.init='zeros' is not valid"),
    ({"prompt.init": "file", "prompt.file": "/nonexistent/p.npy"},
     "/nonexistent/p.npy: prompt file not found"),
    ({"prompt.init": "file", "prompt.file": "WRONG"}, "prompt has shape (4, 32), expected "
                                                      "(4, 64)"),
    ({"task.name": "jsonl", "task.train_file": "/nonexistent/t.jsonl",
      "task.dev_file": "/nonexistent/d.jsonl"}, "/nonexistent/t.jsonl: task file not found"),
])
def test_bad_runs_are_one_line_errors_and_leave_the_run_resumable(
        overrides, message, tmp_path, tiny_dir, capsys):
    run_dir = str(tmp_path / "run")
    if overrides.get("prompt.file") == "WRONG":
        overrides = {**overrides, "prompt.file": str(tmp_path / "p.npy")}
        np.save(overrides["prompt.file"], np.zeros((4, 32), np.float32))
    code, out = ptjax("train", *base_args(run_dir, tiny_dir, **overrides), capsys=capsys)
    assert code == 2
    err = out.err.strip()
    assert err.startswith("ptjax: error: ") and "\n" not in err and message in err, err
    # nothing was written that would stop the corrected run from starting here
    code, _ = ptjax("train", *base_args(run_dir, tiny_dir, **{"train.steps": 1}),
                    capsys=capsys)
    assert code == 0


def test_rerun_with_another_config_is_refused(t5_run, tiny_dir, capsys):
    code, out = ptjax("train", *base_args(t5_run, tiny_dir, **{
        "prompt.seeds": "[0,1]", "optim.learning_rate": 0.1}), capsys=capsys)
    assert code == 2
    assert "this run was started with optim.learning_rate=0.3, not 0.1" in out.err


def test_model_tuning_and_jsonl_task(tmp_path, tiny_dir, capsys):
    """train.method=model (the old name of method.name) on a JSONL task with labels: all
    weights train, the best model is exported in Hugging Face form and `ptjax eval` scores
    it."""
    rows = [{"inputs": f"review: {w} film", "targets": lab}
            for w, lab in [("great", "yes"), ("awful", "no"), ("lovely", "yes"),
                           ("dull", "no")] * 4]
    for split in ("train", "dev"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    run_dir = str(tmp_path / "model-tuning")
    args = base_args(run_dir, tiny_dir, **{
        "train.method": "model", "optim.name": "adam", "optim.learning_rate": 3e-3,
        "task.name": "jsonl", "task.train_file": str(tmp_path / "train.jsonl"),
        "task.dev_file": str(tmp_path / "dev.jsonl"), "task.labels": "[no, yes]",
        "train.steps": 20, "train.eval_every": 10, "train.checkpoint_every": 10})
    code, _ = ptjax("train", *args, capsys=capsys)
    assert code == 0
    train = [r["loss"] for r in read_rows(run_dir) if r["split"] == "train"]
    assert train[-1] < train[0]
    state = ocp.StandardCheckpointer().restore(
        os.path.join(run_dir, "checkpoints", "20", "state"))
    assert set(state["trainable"]) == {"params"}  # model tuning saves the weights it trains
    results = json.load(open(os.path.join(run_dir, "results.json")))
    code, out = ptjax("eval", run_dir, capsys=capsys)
    assert code == 0
    assert f"validation accuracy {results['prompts'][0]['best_accuracy']:.2f}" in out.out
