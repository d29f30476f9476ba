"""train.microbatches: a step split into microbatches (a scan, one update) equals the
one-pass step for every method, dropout included; the strided split keeps each device's
rows; a run in microbatches resumes exactly; `ptjax plan` shows what they save; and the
one-line errors of a batch that does not split."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptjax import cli, methods
from ptjax.aot import abstract_batch, as_abstract
from ptjax.config import load_config
from ptjax.errors import PtjaxError
from ptjax.methods.base import check_run, place_trainable
from ptjax.models.named import prepare
from ptjax.plan import format_plan, plan
from ptjax.sharding import check_batch_size, global_batch, make_mesh
from ptjax.trained import load_run
from ptjax.taskdata import prepare_data
from ptjax.train import setup, split_microbatches

# Every method, K = 2 where it packs members; dropout on (hidden and attention: both kinds
# of mask must follow their rows into the microbatches).
CASES = {
    "prompt-t5": {},
    "prefix-t5": {"method.name": "prefix", "method.prefix.hidden": 8},
    "ptuning-gpt2": {"model.path": "tiny-gpt2", "method.name": "ptuning",
                     "method.ptuning.hidden": 8},
    "model-t5": {"method.name": "model", "prompt.seeds": "[3]"},
    # the class-level loss: W = 2 rows per example, the mean taken over examples
    "soft-verbalizer-gpt2": {
        "model.path": "tiny-gpt2", "task.verbalizer_kind": "soft",
        "task.template": "{inputs} it was {mask}",
        "task.verbalizer": "{negative: [bad, awful], positive: [good, great]}"},
}


WORDS = "good bad film plot cast music long short great awful fine dull".split()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """A jsonl task whose targets have 1 to 3 words: the microbatches' target-token counts
    differ, so a mean of microbatch means would differ from the batch's mean."""
    d = tmp_path_factory.mktemp("task")
    rng = np.random.default_rng(0)
    paths = []
    for split, n in (("train", 64), ("dev", 8)):
        paths.append(str(d / f"{split}.jsonl"))
        with open(paths[-1], "w") as f:
            for _ in range(n):
                inputs = " ".join(rng.choice(WORDS, rng.integers(3, 9)))
                targets = " ".join(rng.choice(WORDS, rng.integers(1, 4)))
                f.write(json.dumps({"inputs": inputs, "targets": targets}) + "\n")
    return {"task.name": "jsonl", "task.train_file": paths[0], "task.dev_file": paths[1]}


def _config(tiny_dir, **kw):
    args = {"model.tiny_dir": tiny_dir, "model.path": "tiny-t5", "prompt.length": 3,
            "prompt.seeds": "[0,1]", "prompt.init": "random_uniform",
            "task.max_input_length": 24, "task.max_target_length": 4, "task.dev_size": 8,
            "train.batch_size": 8, "train.dropout": 0.1, "train.attention_dropout": 0.1,
            "optim.name": "sgd", "optim.learning_rate": 1000.0, "mesh.data": 1, **kw}
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


def _one_step(cfg, microbatches_list):
    """(initial trainable, {M: (trainable after one step, [K] losses)}, the batch) from the
    same state and batch for each M."""
    mesh, model = prepare(cfg)
    method = methods.build(cfg, model.config, model.dtype)
    check_run(model, method, cfg, mesh)
    data = prepare_data(model, cfg, 1)
    trainable = place_trainable(method, method.init(model, cfg, data.task), mesh, cfg)
    frozen = None if method.tunes_weights else model.params
    batch = global_batch(data.stream.batch(0)[0], mesh)
    out = {}
    for M in microbatches_list:
        cfg_m = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=M))
        # a fresh copy: the state is donated, and model tuning's trainable is the weights
        _, state, step = setup(model, method, cfg_m, mesh, jax.tree.map(jnp.copy, trainable),
                               frozen)
        state, metrics = step(state, frozen, batch)
        out[M] = (jax.tree.map(np.asarray, state.trainable), np.asarray(metrics["loss"]))
    return jax.tree.map(np.asarray, trainable), out, batch


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a),
                                                           jax.tree.leaves(b)))


# the default suite: one T5 and one GPT-2 case; the others (20-48 s each under load) slow
SLOW_CASES = ("model-t5", "prefix-t5", "soft-verbalizer-gpt2")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES
                                  else c for c in sorted(CASES)])
def test_microbatches_equal_the_whole_batch(tiny_dir, task_files, case):
    """One SGD step with train.microbatches=2 and 4 makes the update the one-pass step
    makes (the update is the learning rate times the gradient, so a gradient off by a
    microbatch's weight shows): updates and each member's loss within fp32 rounding
    (rtol 1e-5), dropout on."""
    task = {} if "task.verbalizer" in CASES[case] else task_files
    start, out, batch = _one_step(_config(tiny_dir, **task, **CASES[case]), (1, 2, 4))
    if task:  # the microbatches' token counts differ: their means' mean would be wrong
        counts = np.asarray(split_microbatches(batch["target_mask"], 8, 4)).sum((1, 2))
        assert len(set(counts.tolist())) > 1, counts
    ref_tree, ref_loss = out[1]
    ref_update = jax.tree.map(np.subtract, ref_tree, start)
    assert min(float(np.abs(u).max()) for u in jax.tree.leaves(ref_update)) > 1e-4
    for M in (2, 4):
        tree, loss = out[M]
        update = jax.tree.map(np.subtract, tree, start)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max())), update, ref_update)
        biggest = max(float(np.abs(u).max()) for u in jax.tree.leaves(ref_update))
        print(f"{case} M={M}: max |loss diff| {np.abs(loss - ref_loss).max():.3g}, "
              f"max |update diff| {_max_diff(update, ref_update):.3g} (max |update| "
              f"{biggest:.3g})")


@pytest.mark.mesh
def test_microbatches_on_a_mesh_keep_each_devices_rows(tiny_dir, task_files):
    """On 4 data-parallel devices, 2 microbatches of 4 rows equal one device's one-pass
    step, and the compiled step moves no batch rows between devices: its only
    collectives are the gradients' sums (all-reduce), as in the one-pass step."""
    cfg = _config(tiny_dir, **task_files, **{"mesh.data": 4})
    start, out, _ = _one_step(cfg, (1, 2))
    one = _one_step(_config(tiny_dir, **task_files), (1,))[1][1]
    for M in (1, 2):
        np.testing.assert_allclose(out[M][1], one[1], rtol=1e-5)
        jax.tree.map(lambda a, b, s: np.testing.assert_allclose(
            a - s, b - s, rtol=1e-5, atol=1e-5 * float(np.abs(b - s).max())),
            out[M][0], one[0], start)
    mesh, model = prepare(cfg)
    method = methods.build(cfg, model.config, model.dtype)
    trainable = place_trainable(method, method.init(model, cfg, None), mesh, cfg)
    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=2))
    _, state, step = setup(model, method, cfg2, mesh, as_abstract(trainable),
                           as_abstract(model.params), abstract=True)
    hlo = step.lower(state, as_abstract(model.params),
                     abstract_batch(model, cfg2, mesh)).compile().as_text()
    assert "all-reduce" in hlo
    for op in ("all-to-all", "all-gather", "collective-permute"):
        assert op not in hlo, op


def test_plan_shows_what_microbatches_save(tmp_path):
    """`ptjax plan` with train.microbatches=4 compiles the step both ways: the microbatched
    step's peak is below the one-pass peak (a quarter of the activations alive at a time),
    and the report says how much that saves. model.remat=auto compiles the step with its
    microbatches: against 64 MiB it keeps remat none (the microbatched step fits), which
    the one-pass step would not."""
    cfg = load_config(None, ["model.path=tiny-t5", f"model.tiny_dir={tmp_path}",
                             "prompt.length=8", "task.max_input_length=128",
                             "train.batch_size=32", "mesh.data=1", "train.dropout=0",
                             "train.microbatches=4", "model.remat=auto"])
    limit = 64 * 2 ** 20
    p = plan(cfg, device_memory=limit)
    d = p["per_device"]
    assert (p["microbatches"], p["microbatch_size"]) == (4, 8)
    assert d["accelerator_peak"] < 0.8 * d["one_pass_peak"], d
    assert p["remat"] == "none" and p["remat_tried"] == {"none": d["accelerator_peak"]}
    assert d["accelerator_peak"] < 0.9 * limit < d["one_pass_peak"]
    out = format_plan(p)
    assert "batch 32 x (inputs 128 + targets 8) in 4 microbatches of 8" in out
    line = next(x for x in out.splitlines() if "without microbatches" in x)
    saved = (d["one_pass_peak"] - d["accelerator_peak"]) / 2 ** 20
    assert f"train.microbatches=4 saves {saved:.2f} MiB" in line, line
    print(out)


def _train(tmp_path, name, tiny_dir, **kw):
    args = {"run_dir": str(tmp_path / name), "model.tiny_dir": tiny_dir,
            "model.path": "tiny-t5", "prompt.length": 3, "prompt.seeds": "[0,1]",
            "task.max_input_length": 24, "task.max_target_length": 4, "task.dev_size": 8,
            "train.batch_size": 8, "train.eval_batch_size": 8, "train.steps": 4,
            "train.eval_every": 2, "train.checkpoint_every": 2, "train.progress": False,
            "train.dropout": 0.1, "train.microbatches": 2, "mesh.data": 1, **kw}
    assert cli.main(["train", *[f"{k}={v}" for k, v in args.items()]]) == 0
    return args["run_dir"]


def _train_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in r.items() if k != "steps_per_s"}
                for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_a_run_in_microbatches_resumes_exactly(tmp_path, tiny_dir):
    """A run in 2 microbatches stopped after step 2 and resumed ends exactly where an
    uninterrupted one ends (trainable and train losses); resumed in 4 microbatches instead
    (allowed: the same step up to rounding) it ends within fp32 rounding of it (1e-5)."""
    ref = _train(tmp_path, "ref", tiny_dir)
    _train(tmp_path, "cut", tiny_dir, **{"train.steps": 2})
    cut = _train(tmp_path, "cut", tiny_dir)
    _train(tmp_path, "other", tiny_dir, **{"train.steps": 2})
    other = _train(tmp_path, "other", tiny_dir, **{"train.microbatches": 4})
    runs = {d: load_run(d).trainables for d in (ref, cut, other)}
    jax.tree.map(np.testing.assert_array_equal, runs[cut], runs[ref])
    assert _train_rows(cut) == _train_rows(ref)
    # Adafactor's normalised steps carry the rounding into small entries: 1e-5 absolute on
    # prompts of scale 1 (measured: 2.7e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 runs[other], runs[ref])


@pytest.mark.parametrize("overrides, message", [
    (["train.microbatches=3"], "config: train.microbatches=3 does not divide "
     "train.batch_size=8; give a divisor of it"),
    (["train.microbatches=0"], "config: train.microbatches=0 must be >= 1"),
])
def test_bad_microbatches_are_one_line_errors(overrides, message):
    with pytest.raises(PtjaxError) as e:
        load_config(None, ["train.batch_size=8", *overrides])
    assert str(e.value) == message


@pytest.mark.mesh
def test_microbatches_must_split_over_the_mesh():
    mesh = make_mesh(4, 1)
    check_batch_size(16, mesh, microbatches=4)  # 4 examples per microbatch, 1 per device
    with pytest.raises(PtjaxError) as e:
        check_batch_size(8, mesh, microbatches=4)
    assert str(e.value) == (
        "train.microbatches=4 leaves 2 examples per microbatch (train.batch_size=8), not a "
        "multiple of the mesh's 4 data-parallel devices (mesh.data); valid: a divisor of 2")
