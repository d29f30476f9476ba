"""Meshes on 8 CPU devices (PTJAX_TEST_DEVICES=8, XLA_FLAGS in conftest): parameters are
sharded as the logical axis rules say, training on meshes (8,1), (4,2), (2,4) follows one
device, and a real two-process job (SLURM environment, gloo collectives) reproduces a
one-process run."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import xla_flags
from jax._src import compilation_cache as jax_cache
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from ptjax import cli
from ptjax.config import load_config
from ptjax.data.tasks import load_task
from ptjax.errors import PtjaxError
from ptjax.models.model import load_model
from ptjax.models.tiny import build_tiny_model
from ptjax.prompts import initial_prompts
from ptjax.sharding import logical_rules, make_mesh, spec_for

pytestmark = pytest.mark.mesh  # the whole module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {f: build_tiny_model(str(d / f"tiny-{f}"), family=f) for f in ("t5", "gpt2")}


def test_eight_cpu_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("data, model, shape", [(-1, 1, (8, 1)), (4, 2, (4, 2)),
                                                 (-1, 4, (2, 4)), (8, -1, (8, 1)),
                                                 (2, 1, (2, 1))])
def test_mesh_shapes(data, model, shape):
    mesh = make_mesh(data, model)
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == ("data", "model")


@pytest.mark.parametrize("data, model, message", [
    (3, -1, "mesh data=3 x model=-1 does not divide the 8 devices present"),
    (4, 4, "mesh data=4 x model=4 = 16 devices, but 8 are present"),
    (0, 1, "mesh.data=0 must be a positive size or -1"),
    (-1, -1, "mesh.data and mesh.model cannot both be -1"),
])
def test_bad_meshes_are_one_line_errors(data, model, message):
    with pytest.raises(PtjaxError, match=message):
        make_mesh(data, model)


def test_rules_replicate_what_the_mesh_does_not_divide():
    mesh = make_mesh(2, 4)
    rules = logical_rules()
    assert spec_for(("layers", "embed", "heads", "kv"), (2, 64, 4, 16), mesh, rules) == \
        P(None, None, "model")
    # T5-small's 6 heads on a model axis of 4: replicated rather than an error
    assert spec_for(("layers", "embed", "heads", "kv"), (2, 64, 6, 16), mesh, rules) == P()
    fsdp = logical_rules(fsdp=True)
    assert spec_for(("vocab", "embed"), (96, 64), mesh, fsdp) == P("model", "data")
    # one mesh axis at most once per array
    assert spec_for(("mlp", "heads"), (8, 8), mesh, rules) == P("model")


@pytest.mark.parametrize("fsdp", [False, True])
def test_weights_are_loaded_into_the_shards_the_rules_name(tiny, fsdp):
    mesh = make_mesh(2, 4)
    model = load_model(tiny["t5"], mesh=mesh, fsdp=fsdp)
    p = model.params
    embed = "data" if fsdp else None
    expect = {
        ("shared", "embedding"): P("model", embed),  # [vocab, embed]
        ("encoder", "layers", "attn", "q", "kernel"): P(None, embed, "model"),  # [L,D,H,K]
        ("encoder", "layers", "attn", "o", "kernel"): P(None, "model", None, embed),
        ("decoder", "layers", "mlp", "wi_0", "kernel"): P(None, embed, "model"),  # [L,D,F]
        ("decoder", "layers", "mlp", "wo", "kernel"): P(None, "model", embed),
        ("lm_head", "kernel"): P(embed, "model"),  # [embed, vocab]
        ("encoder", "relpos_bias", "embedding"): P(None, "model"),  # [buckets, heads]
    }
    for path, spec in expect.items():
        leaf = p
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == _trimmed(spec), (path, leaf.sharding.spec)
        shard = leaf.addressable_shards[0].data.shape
        expected = tuple(d // (mesh.shape[a] if a else 1)
                         for d, a in zip(leaf.shape, list(spec) + [None] * leaf.ndim))
        assert shard == expected, (path, shard, expected)
    # the same logits as the unsharded model
    plain = load_model(tiny["t5"])
    ids = np.arange(2, 18, dtype=np.int32).reshape(2, 8)
    a = plain.logits(plain.params, ids, decoder_input_ids=ids[:, :4])
    b = model.logits(model.params, ids, decoder_input_ids=ids[:, :4])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _trimmed(spec):
    """PartitionSpec without trailing Nones, as ``spec_for`` writes them."""
    out = list(spec)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _train(run_dir, tiny_dir, family="t5", **kw):
    args = {"run_dir": run_dir, "model.tiny_dir": tiny_dir, "model.path": f"tiny-{family}",
            "prompt.length": 4, "prompt.seeds": "[0,1]", "task.max_input_length": 24,
            "task.max_target_length": 4, "task.dev_size": 16, "train.batch_size": 8,
            "train.eval_batch_size": 16, "train.steps": 4, "train.eval_every": 4,
            "train.checkpoint_every": 4, "train.log_every": 1, "train.dropout": 0.1,
            "optim.name": "sgd", "optim.learning_rate": 1.0, "train.progress": False}
    args.update(kw)
    assert cli.main(["train", *[f"{k}={v}" for k, v in args.items()]]) == 0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return rows, os.path.join(run_dir, "export")


def _losses(rows):
    return np.array([r["loss"] for r in rows if r["split"] == "train"])


@pytest.mark.slow
@pytest.mark.parametrize("family, meshes", [("t5", [(8, 1), (4, 2), (2, 4)]),
                                            ("gpt2", [(2, 4)])])
def test_meshes_train_as_one_device(tiny, tmp_path, family, meshes):
    """Same loss curve and final prompts (1e-5) on one device and on meshes (8,1), (4,2),
    (2,4), with dropout on. SGD keeps fp32 reduction-order noise from being amplified (see
    the Adafactor note in the README)."""
    tiny_dir = os.path.dirname(tiny["t5"])
    ref_rows, ref = _train(str(tmp_path / "one"), tiny_dir, family, **{
        "mesh.data": 1, "mesh.model": 1})
    ref_prompts = np.load(os.path.join(ref, "prompts.npy"))
    cfg = load_config(os.path.join(tmp_path, "one", "config.yaml"))
    start = initial_prompts(load_model(tiny[family]), cfg.prompt, load_task(cfg.task))
    assert np.abs(ref_prompts - start).max() > 0.05  # the prompts really trained
    for data, model in meshes:
        rows, out = _train(str(tmp_path / f"{data}x{model}"), tiny_dir, family, **{
            "mesh.data": data, "mesh.model": model})
        np.testing.assert_allclose(_losses(rows), _losses(ref_rows), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.load(os.path.join(out, "prompts.npy")), ref_prompts,
                                   rtol=1e-5, atol=1e-5)
        dev = [r for r in rows if r["split"] == "validation"]
        assert dev == [r for r in ref_rows if r["split"] == "validation"]


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [{"train.prng": "rbg"}, {"train.prng": "unsafe_rbg"},
                                     {"train.dropout_broadcast": "true"}])
def test_dropout_variants_train_as_one_device(tiny, tmp_path, dropout):
    """The non-default dropout masks (docs/benchmarks.md) keep the mesh invariance: the
    same loss curve and prompts on an (8, 1) mesh as on one device, and not the default
    masks' run (the option is really on)."""
    tiny_dir = os.path.dirname(tiny["t5"])
    runs = {name: _train(str(tmp_path / name), tiny_dir, "t5", **{"mesh.data": data, **kw})
            for name, data, kw in (("one", 1, dropout), ("eight", 8, dropout),
                                   ("default", 1, {}))}
    ref_rows, rows = runs["one"][0], runs["eight"][0]
    np.testing.assert_allclose(_losses(rows), _losses(ref_rows), rtol=1e-5, atol=1e-5)
    prompts = {k: np.load(os.path.join(v[1], "prompts.npy")) for k, v in runs.items()}
    np.testing.assert_allclose(prompts["eight"], prompts["one"], rtol=1e-5, atol=1e-5)
    assert np.abs(prompts["default"] - prompts["one"]).max() > 1e-3


@pytest.mark.slow
def test_model_tuning_on_a_mesh_shards_the_optimizer_state(tiny):
    """Model tuning on a (2, 4) mesh: Adam's moments take the weights' shardings; with SGD
    (no normalisation to amplify reduction-order noise) the losses follow one device's."""
    from ptjax import methods
    from ptjax.config import OptimConfig
    from ptjax.methods.base import place_trainable
    from ptjax.sharding import batch_sharding, global_batch
    from ptjax.train import init_state, make_train_step

    cfg = load_config(None, ["method.name=model"])
    mesh = make_mesh(2, 4)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 60, (8, 12)).astype(np.int32)
    batch = dict(input_ids=ids, input_mask=np.ones_like(ids), decoder_input_ids=ids[:, :4],
                 targets=ids[:, 1:5], target_mask=np.ones_like(ids[:, :4]))
    losses = {}
    for name, m in (("one", None), ("2x4", mesh)):
        model = load_model(tiny["t5"], mesh=m)
        method = methods.build(cfg, model.config, model.dtype)
        if m is not None:
            adam = method.optimizer(OptimConfig(name="adam", learning_rate=1e-3), 10)
            state = init_state(adam, place_trainable(method, method.init(model, cfg, None), m,
                                                     cfg), 0)
            q = state.opt_state[0].mu["params"]["encoder"]["layers"]["attn"]["q"]["kernel"]
            # as the weight it mirrors, behind the K axis
            assert q.sharding.spec == P(None, None, None, "model")
            assert q.addressable_shards[0].data.shape == (1, 2, 64, 1, 16)
        tx = method.optimizer(OptimConfig(name="sgd", learning_rate=0.1), 10)
        tree = method.init(model, cfg, None)
        state = init_state(tx, tree if m is None else place_trainable(method, tree, m, cfg), 0)
        shardings = None
        if m is not None:
            shardings = (jax.tree.map(lambda x: x.sharding, state), None, batch_sharding(m))
        step = make_train_step(model, method, tx, dropout=0.0, shardings=shardings)
        out = []
        for _ in range(3):
            state, metrics = step(state, None, batch if m is None else global_batch(batch, m))
            out.append(float(metrics["loss"][0]))
        losses[name] = out
    assert losses["one"][-1] < losses["one"][0]
    np.testing.assert_allclose(losses["2x4"], losses["one"], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_reproduce_one(tiny, tmp_path):
    """A job of two processes x 4 CPU devices, started as SLURM would start it
    (jax.distributed via SLURM_* variables, gloo collectives), trains exactly the batches
    of a one-process 8-device run with train.data_shards=2; process 0 alone writes."""
    tiny_dir = os.path.dirname(tiny["t5"])
    common = {"model.tiny_dir": tiny_dir, "prompt.length": 4, "prompt.seeds": "[0,1]",
              "task.max_input_length": 24, "task.max_target_length": 4,
              "task.dev_size": 16, "train.batch_size": 8, "train.eval_batch_size": 16,
              "train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
              "train.log_every": 1, "train.dropout": 0.1, "optim.name": "sgd",
              "optim.learning_rate": 1.0, "train.progress": False}
    multi = str(tmp_path / "multi")
    argv = [sys.executable, "-m", "ptjax.cli", "train", f"run_dir={multi}",
            *[f"{k}={v}" for k, v in common.items()]]
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, SLURM_JOB_ID=str(1000 + os.getpid() % 3000),
                   SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   XLA_FLAGS=xla_flags(4))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    rows, single = _train(str(tmp_path / "single"), tiny_dir, **{
        k: v for k, v in common.items() if k != "model.tiny_dir"},
        **{"train.data_shards": 2})
    multi_rows = [json.loads(line) for line in open(os.path.join(multi, "metrics.jsonl"))]
    np.testing.assert_allclose(_losses(multi_rows), _losses(rows), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(os.path.join(multi, "export", "prompts.npy")),
                               np.load(os.path.join(single, "prompts.npy")), atol=1e-5)
    meta = json.load(open(os.path.join(multi, "checkpoints", "4", "meta", "metadata")))
    assert meta["data_shards"] == 2 and meta["data_position"] == 32


# ------------------------------------------------ activation sharding constraints

def _activation_case(tiny, family, method_name, mesh=None, fsdp=False, remat="none"):
    """(model on ``mesh``, method with K=2 members, members, batch of 8 rows)."""
    import dataclasses

    from ptjax.methods import for_model

    model = dataclasses.replace(load_model(tiny[family], mesh=mesh, fsdp=fsdp), remat=remat)
    method = for_model(model, method_name, ["prompt.length=3", "prompt.seeds=[0,1]"])
    rng = np.random.default_rng(0)
    members = jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32),
                           method.shapes())
    ids = rng.integers(3, 60, (8, 10)).astype(np.int32)
    mask = (np.arange(10)[None] < rng.integers(4, 11, (8, 1))).astype(np.int32)
    batch = dict(input_ids=ids, input_mask=mask, targets=ids, target_mask=mask)
    if family == "t5":
        batch.update(decoder_input_ids=ids[:, :4], targets=ids[:, 1:5],
                     target_mask=mask[:, :4])
    return model, method, members, batch


def _logits_and_grads(model, method, members, batch, mesh=None):
    """Each member's logits [K, B, T, V] and d(loss)/d(members), one jitted call (the K
    members vmapped, as in training); on ``mesh`` the batch is split over ``data``."""
    from ptjax.sharding import batch_sharding, replicated
    from ptjax.train import forward, loss_fn

    def run(members, frozen, batch):
        def logits(member):
            params, prompt = method.inputs(member, frozen)
            return forward(model, params, batch, prompt)
        grads = jax.grad(lambda m: loss_fn(model, method, m, frozen, batch, None, 0.0)[0])(
            members)
        return jax.vmap(logits)(members), grads

    if mesh is not None:
        members = jax.device_put(members, replicated(mesh))
        batch = jax.device_put(batch, batch_sharding(mesh))
    return jax.device_get(jax.jit(run)(members, model.params, batch))


@pytest.mark.parametrize("family, method_name, remat", [
    pytest.param("t5", "prompt", "none", marks=pytest.mark.slow),
    pytest.param("t5", "prefix", "full", marks=pytest.mark.slow),
    pytest.param("gpt2", "prompt", "dots", marks=pytest.mark.slow),
    ("gpt2", "prefix", "none")])
def test_constrained_activations_give_one_devices_logits_and_gradients(
        tiny, family, method_name, remat):
    """Meshes data=2 x model=2 and data=4 (activations pinned to them, scanned and
    rematerialised layers, K=2 members vmapped): the logits and the prompt's / prefix's
    gradients of one device, within fp32 reduction-order noise (measured: logits 6e-6 of
    their scale, gradients 6e-5 of theirs at worst, T5 prefix with remat)."""
    model, method, members, batch = _activation_case(tiny, family, method_name, remat=remat)
    ref_logits, ref_grads = _logits_and_grads(model, method, members, batch)
    assert np.abs(ref_logits).max() > 0.1
    for data, tp in ((2, 2), (4, 1)):
        mesh = make_mesh(data, tp, devices=jax.devices()[:4])
        model, *_ = _activation_case(tiny, family, method_name, mesh, remat=remat)
        logits, grads = _logits_and_grads(model, method, members, batch, mesh)
        # fp32 reduction-order noise (the same with the constraints removed: CPU matmuls
        # of 8 and of 2-4 rows round differently), bounded relative to each array's scale
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5 * np.abs(ref_logits).max())
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, atol=2e-4 * np.abs(b).max()), grads, ref_grads)


def _batch_gathers(model, method, members, batch, mesh):
    """(result shape, op name) of every all-gather in the compiled train step whose result
    holds all B rows of a batch-split array."""
    import re

    from ptjax.config import OptimConfig
    from ptjax.sharding import batch_sharding, global_batch, replicated
    from ptjax.train import init_state, make_train_step

    tx = method.optimizer(OptimConfig(name="sgd", learning_rate=0.1), 10)
    state = init_state(tx, jax.device_put(members, replicated(mesh)), 0)
    step = make_train_step(model, method, tx, dropout=0.0, shardings=(
        jax.tree.map(lambda x: x.sharding, state),
        jax.tree.map(lambda x: x.sharding, model.params), batch_sharding(mesh)))
    hlo = step.lower(state, model.params, global_batch(batch, mesh)).compile().as_text()
    B = batch["input_ids"].shape[0]
    out = []
    for shape, name in re.findall(
            r"= \w+\[([\d,]*)\]\S* all-gather\(.*?op_name=\"([^\"]*)\"", hlo):
        if B in [int(d) for d in shape.split(",") if d]:
            out.append((shape, name))
    return out


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_train_step_never_gathers_activations_over_the_batch(tiny, family):
    """The compiled train step on data=2 x model=2 with fsdp (weights split over ``data``
    too, where XLA on its own follows the weights and gathers the layers' activations back
    to all rows: checked by removing the constraints): no all-gather yields all rows of an
    activation; only the embedding lookups gather their token / position ids. Rows = 10,
    a size no other dimension of the tiny models has."""
    mesh = make_mesh(2, 2, devices=jax.devices()[:4])
    model, method, members, batch = _activation_case(tiny, family, "prompt", mesh, fsdp=True)
    batch = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}  # 10 rows
    gathers = _batch_gathers(model, method, members, batch, mesh)
    lookups = ("/shared/", "/wte/", "/wpe/")
    assert all(any(t in name for t in lookups) and "_take" in name for _, name in gathers), \
        gathers


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_one_device_traces_no_constraints(tiny, family):
    """Without a mesh or on a one-device mesh the constraints add nothing to the trace (the
    train step's jaxpr is the one of a model that never heard of meshes); on data=2 x
    model=2 they are there."""
    import dataclasses

    from ptjax.train import loss_fn

    model, method, members, batch = _activation_case(tiny, family, "prefix")

    def jaxpr(m):
        grad = jax.grad(lambda tr, fr, b: loss_fn(m, method, tr, fr, b, jax.random.key(0),
                                                  0.1)[0])
        return str(jax.make_jaxpr(grad)(members, model.params, batch))

    plain = jaxpr(model)
    assert "sharding_constraint" not in plain
    one = make_mesh(1, 1, devices=jax.devices()[:1])
    assert jaxpr(dataclasses.replace(model, mesh=one)) == plain
    assert jaxpr(dataclasses.replace(model, mesh=one, fsdp=True)) == plain
    many = jaxpr(dataclasses.replace(model, mesh=make_mesh(2, 2, devices=jax.devices()[:4])))
    assert "sharding_constraint" in many


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_kv_cache_decoding_on_a_mesh_matches_one_device(tiny, family):
    """Greedy decoding with the KV cache (cache and keys pinned: rows on data, heads on
    model) on data=2 x model=2 emits one device's tokens, with a prompt."""
    mesh = make_mesh(2, 2, devices=jax.devices()[:4])
    plain, sharded = load_model(tiny[family]), load_model(tiny[family], mesh=mesh)
    rng = np.random.default_rng(1)
    prompt = (0.5 * rng.standard_normal((3, plain.config.hidden_size))).astype(np.float32)
    ids = rng.integers(3, 60, (4, 6)).astype(np.int32)
    a = plain.generate(plain.params, ids, prompt=prompt, max_new_tokens=5)
    b = sharded.generate(sharded.params, ids, prompt=prompt, max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))



def test_cpu_programs_over_several_devices_stay_out_of_the_compilation_cache():
    """XLA:CPU executables over several devices can deadlock when read back from JAX's
    persistent cache (cli._single_device_cpu_entries). With the guard conftest installs,
    one over two devices is neither written nor read; a single-device one round-trips."""
    cache_dir = jax.config.jax_compilation_cache_dir
    backend = jax.devices()[0].client
    f = jax.jit(lambda v: (v * 3.0).sum())
    pair = NamedSharding(make_mesh(2, 1, jax.devices()[:2]), P("data"))
    one = SingleDeviceSharding(jax.devices()[0])
    for sharding, cached in ((pair, False), (one, True)):
        exe = f.lower(jax.device_put(np.arange(8.0), sharding)).compile().runtime_executable()
        key = f"ptjax-test-guard-{len(exe.local_devices())}-{os.getpid()}"
        jax_cache.put_executable_and_time(key, "f", exe, backend, 5)
        assert os.path.exists(os.path.join(cache_dir, f"{key}-cache")) == cached
        got, _ = jax_cache.get_executable_and_time(key, None, backend,
                                                   sharding._internal_device_list)
        assert (got is not None) == cached
    # an entry that is there is still not read back onto two CPU devices
    got, _ = jax_cache.get_executable_and_time(key, None, backend, pair._internal_device_list)
    assert got is None
