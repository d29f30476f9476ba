"""The attention cores (``ptjax.models.attention``): the fused path (jax.nn.
dot_product_attention) equals the einsum path in logits and in prompt and prefix
gradients, with padding, prompts, prefixes at every site and T5's relative bias; the cuDNN
argument form (lengths, causality folded into the bias) checked on CPU through XLA; the
automatic choice; dropout settings; model.remat=auto."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import padded_batch

from ptjax.models import attention
from ptjax.errors import PtjaxError
from ptjax.models.common import ModelOptions, PromptInputs

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; measured differences are ~1e-7


def _inputs(model, left=False, seed=0):
    rng = np.random.default_rng(seed)
    cfg = model.config
    ids, mask = padded_batch(rng, 3, 12, 96, [12, 7, 3], left=left)
    P, D = 4, cfg.hidden_size
    prompt = jnp.asarray(rng.normal(size=(3, P, D)), jnp.float32)
    if model.is_encoder_decoder:
        H, Dh = cfg.num_heads, cfg.d_kv
        dec, dec_mask = padded_batch(rng, 3, 6, 96, [6, 6, 2])
        sites = {"encoder": cfg.num_layers, "decoder": cfg.num_decoder_layers,
                 "cross": cfg.num_decoder_layers}
    else:
        H, Dh = cfg.n_head, cfg.n_embd // cfg.n_head
        dec = dec_mask = None
        sites = {"decoder": cfg.n_layer}
    prefix = {s: {n: jnp.asarray(rng.normal(size=(n_layers, 3, 2, H, Dh)), jnp.float32)
                  for n in ("k", "v")} for s, n_layers in sites.items()}
    return ids, mask, dec, dec_mask, prompt, prefix


def _value_and_grads(model, options, inputs):
    ids, mask, dec, dec_mask, prompt, prefix = inputs
    module = model.module(options=options)

    def logits_of(embeds, prefix):
        p = PromptInputs(embeds=embeds, prefix=prefix)
        if model.is_encoder_decoder:
            return module.apply({"params": model.params}, ids, mask, dec, dec_mask, p)
        return module.apply({"params": model.params}, ids, mask, p)

    def loss(embeds, prefix):
        logits = logits_of(embeds, prefix)
        w = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
        return jnp.sum(logits * w), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        prompt, prefix)
    return logits, grads


def _assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], **TOL)  # logits
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):  # prompt, prefix grads
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))


@pytest.mark.parametrize("name, left", [("t5_v1_0", False), ("t5_v1_1", False),
                                        ("gpt2", False), ("gpt2", True)])
def test_xla_path_equals_einsum_path(loaded, name, left):
    """Logits and prompt / prefix gradients; GPT-2 also left-padded (a mask, not lengths)."""
    _, model = loaded[name]
    inputs = _inputs(model, left=left)
    ref = _value_and_grads(model, ModelOptions(attention="einsum"), inputs)
    _assert_same(_value_and_grads(model, ModelOptions(attention="xla"), inputs), ref)
    assert np.abs(np.asarray(ref[1][0])).max() > 0  # the prompt's gradient is not empty


@pytest.fixture
def cudnn_through_xla(monkeypatch):
    """The cudnn call's arguments (lengths, bias in the compute dtype, is_causal) run by
    XLA's implementation, which takes the same arguments on CPU."""
    real = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation=None, **kw):
        calls.append((implementation, kw.get("key_value_seq_lengths") is not None,
                      kw.get("is_causal"), kw.get("mask")))
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(attention.jax.nn, "dot_product_attention", fake)
    return calls


@pytest.mark.parametrize("name", ["t5_v1_1", "gpt2"])
def test_cudnn_arguments_equal_einsum_path_on_right_padded_inputs(loaded, name,
                                                                  cudnn_through_xla):
    """Padding as key_value_seq_lengths, causality bottom-right in the bias (prefix keys
    before the tokens), no [B, H, T, S] mask: same logits and gradients."""
    _, model = loaded[name]
    inputs = _inputs(model)
    ref = _value_and_grads(model, ModelOptions(attention="einsum"), inputs)
    got = _value_and_grads(model, ModelOptions(attention="cudnn", right_padded=True,
                                               platform="gpu"), inputs)
    _assert_same(got, ref)
    assert cudnn_through_xla and all(impl == "cudnn" and lengths and mask is None
                                     for impl, lengths, _, mask in cudnn_through_xla)
    # without a prefix GPT-2's causal self-attention uses cuDNN's own causal mask
    cudnn_through_xla.clear()
    no_prefix = inputs[:5] + ({},)
    if not model.is_encoder_decoder:
        _assert_same(_value_and_grads(model, ModelOptions(attention="cudnn", right_padded=True,
                                                          platform="gpu"), no_prefix),
                     _value_and_grads(model, ModelOptions(attention="einsum"), no_prefix))
        assert any(causal for _, _, causal, _ in cudnn_through_xla)


def test_auto_picks_cudnn_only_where_it_serves():
    ok = dict(head_dim=64, dtype=jnp.bfloat16, T=612, S=612, dropout_active=False,
              cached=False)
    right = ModelOptions(right_padded=True, platform="gpu")
    assert attention.resolve(right, **ok) == "cudnn"
    cpu = ModelOptions(right_padded=True, platform="cpu")
    assert attention.resolve(cpu, **ok) == "xla"
    assert attention.resolve(ModelOptions(platform="gpu"), **ok) == "xla"  # any padding: a mask
    assert attention.resolve(right, **{**ok, "dtype": jnp.float32}) == "xla"
    assert attention.resolve(right, **{**ok, "head_dim": 60}) == "xla"
    # jax 0.10.2's cuDNN backward asks for even T and S with or without a bias
    assert attention.resolve(right, **{**ok, "T": 611}) == "xla"
    assert attention.resolve(right, **{**ok, "S": 227}) == "xla"
    assert attention.resolve(right, **{**ok, "dropout_active": True}) == "einsum"
    assert attention.resolve(right, **{**ok, "cached": True}) == "einsum"
    assert attention.resolve(ModelOptions(attention="einsum"), **ok) == "einsum"
    with pytest.raises(ValueError, match="valid: auto, xla, cudnn, einsum"):
        ModelOptions(attention="flash")


def test_cudnn_asked_for_off_a_gpu_is_one_line():
    """model.attention=cudnn compiled for a CPU: ptjax's line, not jax's 'cuDNN is not
    detected' from inside the trace."""
    with pytest.raises(PtjaxError, match=r"^model.attention=cudnn needs an NVIDIA GPU, and "
                                         r"this step is compiled for cpu; .*--target h100$"):
        attention.resolve(ModelOptions(attention="cudnn", platform="cpu"), head_dim=64,
                          dtype=jnp.bfloat16, T=8, S=8, dropout_active=False, cached=False)


@pytest.mark.mesh
def test_auto_decides_by_the_mesh_platform_not_the_host(loaded):
    """A model placed on a mesh compiles for the mesh's devices: its options name their
    platform (a GPU target's mesh says gpu though the host is a CPU)."""
    _, model = loaded["t5_v1_1"]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("data", "model"))
    assert dataclasses.replace(model, mesh=mesh).options().platform == "cpu"
    assert model.options().platform is None  # no mesh: the default backend decides


def _step_loss(model, **kw):
    import optax

    from ptjax.methods import for_model
    from ptjax.optim import per_prompt
    from ptjax.train import init_state, make_train_step

    rng = np.random.default_rng(0)
    ids, mask = padded_batch(rng, 4, 10, 96, [10, 8, 5, 2])
    tgt, tmask = padded_batch(rng, 4, 4, 96, [4, 4, 3, 1])
    batch = dict(input_ids=ids, input_mask=mask, decoder_input_ids=tgt, targets=tgt,
                 target_mask=tmask)
    tx = per_prompt(optax.sgd(0.1))
    state = init_state(tx, {"prompt": jnp.ones((1, 3, model.config.hidden_size))}, 0)
    step = make_train_step(model, for_model(model), tx, **kw)
    return float(step(state, model.params, batch)[1]["loss"][0])


@pytest.mark.slow
def test_dropout_settings(loaded):
    """Hidden and attention dropout apart; rbg masks and broadcast masks train too."""
    _, model = loaded["t5_v1_0"]
    off = _step_loss(model, dropout=0.0)
    hidden = _step_loss(model, dropout=0.1, attention_dropout=0.0)
    both = _step_loss(model, dropout=0.1, attention_dropout=0.1)
    assert len({off, hidden, both}) == 3
    # attention_dropout=None is the checkpoint's rate (0.1): the computation before the key
    assert _step_loss(model, dropout=0.1) == both
    for kw in ({"prng": "rbg"}, {"prng": "unsafe_rbg"}, {"dropout_broadcast": True}):
        loss = _step_loss(model, dropout=0.1, attention_dropout=0.1, **kw)
        assert np.isfinite(loss) and loss != both


def test_choose_remat_takes_the_first_policy_that_fits():
    from ptjax.aot import choose_remat

    peaks = {"none": 100, "dots": 60, "full": 30}
    assert choose_remat(peaks.get, 200) == ("none", {"none": 100})
    assert choose_remat(peaks.get, 80) == ("dots", {"none": 100, "dots": 60})
    assert choose_remat(peaks.get, 40)[0] == "full"
    assert choose_remat(peaks.get, 10)[0] == "full"  # nothing fits: the smallest
    assert choose_remat(peaks.get, None)[0] == "none"  # unknown memory: no remat


@pytest.mark.slow
def test_remat_auto_plans_against_a_small_device(tmp_path):
    """With a fake device between the policies' compiled peaks, auto picks the first
    policy under 90% of it; a large device keeps remat off."""
    from ptjax.config import from_dict
    from ptjax.aot import HEADROOM
    from ptjax.plan import plan

    def cfg(remat):
        return from_dict({"model": {"path": "tiny-t5", "tiny_dir": str(tmp_path),
                                    "remat": remat},
                          "prompt": {"length": 8}, "mesh": {"data": 1},
                          "task": {"max_input_length": 128, "max_target_length": 4},
                          "train": {"batch_size": 16, "dropout": 0.0}})

    big = plan(cfg("auto"), device_memory=1e12)
    assert big["remat"] == "none" and list(big["remat_tried"]) == ["none"]
    peaks = big["remat_tried"]
    full = plan(cfg("full"))["per_device"]["accelerator_peak"]
    assert full < peaks["none"]
    small = (full + peaks["none"]) / 2 / HEADROOM
    got = plan(cfg("auto"), device_memory=small)
    tried = got["remat_tried"]
    assert got["remat"] in ("dots", "full") and tried[got["remat"]] <= HEADROOM * small
    assert all(tried[p] > HEADROOM * small for p in tried if p != got["remat"])
    assert got["fits"] is True and "remat " + got["remat"] + " (auto)" in _fmt(got)


def _fmt(p):
    from ptjax.plan import format_plan
    return format_plan(p)
