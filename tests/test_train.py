"""The training core: losses against transformers' PyTorch loss, the jitted step (only the
prompt differentiated, frozen params untouched, compiled once, state donated), K prompts
trained as K separate runs, model tuning, and the optimizers' paper defaults."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import padded_batch, torch

from ptjax import config as C
from ptjax.methods import for_model
from ptjax.optim import learning_rate_schedule, make_optimizer, per_prompt
from ptjax.train import (
    init_state,
    loss_fn,
    make_train_step,
)


def t5_batch(rng, B=3, L=7, T=4, vocab=96):
    ids, mask = padded_batch(rng, B, L, vocab, [7, 5, 3])
    tgt, tmask = padded_batch(rng, B, T, vocab, [4, 2, 3])
    dec = np.concatenate([np.zeros((B, 1), np.int64), tgt[:, :-1]], 1)
    return dict(input_ids=ids, input_mask=mask, decoder_input_ids=dec, targets=tgt,
                target_mask=tmask)


def gpt2_batch(rng, B=3, L=9, vocab=96):
    """Right-padded sequences; the last n_tgt real tokens of each row are the target."""
    ids, mask = padded_batch(rng, B, L, vocab, [9, 6, 5])
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], 1)
    tmask = np.zeros_like(mask)
    for i, (n, n_tgt) in enumerate(zip([9, 6, 5], [3, 2, 1])):
        tmask[i, n - n_tgt - 1:n - 1] = 1  # positions predicting the target tokens
    return dict(input_ids=ids, input_mask=mask, targets=targets, target_mask=tmask)


def to_jnp(batch):
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@pytest.mark.parametrize("name", ["t5_v1_1", "gpt2"])
def test_loss_equals_transformers_loss(loaded, name):
    """Target-token CE behind a prompt (padding and GPT-2 input tokens ignored) equals the
    loss transformers computes with -100 labels, as PEFT trains it."""
    tmodel, model = loaded[name]
    rng = np.random.default_rng(0)
    batch = t5_batch(rng) if model.is_encoder_decoder else gpt2_batch(rng)
    P, D = 4, model.config.hidden_size
    prompt = rng.normal(size=(1, P, D)).astype(np.float32)
    loss, per_k = loss_fn(model, for_model(model), {"prompt": jnp.asarray(prompt)}, model.params,
                          to_jnp(batch), jax.random.PRNGKey(0), 0.0)
    B = batch["input_ids"].shape[0]
    t = {k: torch.tensor(v) for k, v in batch.items()}
    emb = tmodel.get_input_embeddings()(t["input_ids"])
    embeds = torch.cat([torch.tensor(prompt).expand(B, P, D), emb], 1)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), t["input_mask"]], 1)
    with torch.no_grad():
        if model.is_encoder_decoder:
            labels = torch.where(t["target_mask"] == 1, t["targets"], -100)
            ref = tmodel(inputs_embeds=embeds, attention_mask=attn,
                         decoder_input_ids=t["decoder_input_ids"], labels=labels).loss
        else:
            shifted = torch.where(t["target_mask"] == 1, t["targets"], -100)
            labels = torch.cat([torch.full((B, P + 1), -100), shifted[:, :-1]], 1)
            ref = tmodel(inputs_embeds=embeds, attention_mask=attn, labels=labels).loss
    np.testing.assert_allclose(float(per_k[0]), float(ref), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)


def _prompt_setup(model, K=2, P=3, optim=None, seed=0):
    optim = optim or C.OptimConfig()
    tx = per_prompt(make_optimizer(optim, 10))
    table = jax.random.uniform(jax.random.PRNGKey(seed), (K, P, model.config.hidden_size),
                               minval=-0.5, maxval=0.5)
    return tx, init_state(tx, {"prompt": table}, seed)


@pytest.mark.parametrize("name, dropout", [("t5_v1_0", 0.0), ("gpt2", 0.1)])
def test_step_trains_only_the_prompt(loaded, name, dropout):
    _, model = loaded[name]
    rng = np.random.default_rng(1)
    make = t5_batch if model.is_encoder_decoder else gpt2_batch
    frozen_before = jax.tree.map(np.array, model.params)
    tx, state = _prompt_setup(model)
    step = make_train_step(model, for_model(model), tx, dropout=dropout)
    first = state.trainable["prompt"]
    old_prompt = np.array(first)  # a copy: a zero-copy view would block donation
    losses = []
    for _ in range(4):
        old = state
        state, metrics = step(state, model.params, to_jnp(make(rng)))
        losses.append(np.asarray(metrics["loss"]))
    # the prompt moved; the state was donated (its old buffers are gone)
    assert not np.allclose(np.asarray(state.trainable["prompt"]), np.asarray(old_prompt))
    assert first.is_deleted() and old.trainable["prompt"].is_deleted()
    assert int(state.step) == 4 and losses[0].shape == (2,)
    # compiled once for all steps: no retracing
    assert step._cache_size() == 1
    # the frozen params are bit-identical and were never donated
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 model.params, frozen_before)
    # optimizer state: only [K, ...] leaves of the prompt's [P, D] shape or smaller
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(model.params)}
    P, D = state.trainable["prompt"].shape[1:]
    for leaf in jax.tree.leaves(state.opt_state):
        assert leaf.shape[0] == 2 and leaf.size <= 2 * P * D
        assert tuple(leaf.shape) not in param_shapes and tuple(leaf.shape[1:]) not in param_shapes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_k_prompts_train_as_separate_runs(loaded, dropout):
    """K prompts packed in one step end where K one-prompt runs with the same seeds end,
    dropout included: prompt k's masks come from its own seed, not its slot."""
    _, model = loaded["t5_v1_1"]
    batches = [to_jnp(t5_batch(np.random.default_rng(i))) for i in range(3)]
    tx, both = _prompt_setup(model, K=2)
    table = np.array(both.trainable["prompt"])  # a copy: the state's buffer is donated
    seeds = (7, 3)
    both = init_state(tx, {"prompt": jnp.asarray(table)}, 0, seeds)
    singles = [init_state(tx, {"prompt": jnp.asarray(table[k:k + 1])}, 0, seeds[k:k + 1])
               for k in range(2)]
    step = make_train_step(model, for_model(model), tx, dropout=dropout)
    for b in batches:
        both, _ = step(both, model.params, b)
        singles = [step(s, model.params, b)[0] for s in singles]
    assert step._cache_size() == 2  # one compilation for K=2, one for K=1 (any seed)
    # K*B rows vs B rows change fp32 matmul blocking: gradients differ by ~1e-6 relative,
    # 7.6e-6 absolute on the prompt after 3 Adafactor steps (jax 0.10.2, 2-core CPU).
    for k in range(2):
        np.testing.assert_allclose(np.asarray(both.trainable["prompt"][k]),
                                   np.asarray(singles[k].trainable["prompt"][0]),
                                   rtol=1e-5, atol=2e-5)
    if dropout:  # and the masks matter: another seed for prompt 0 ends elsewhere
        s = init_state(tx, {"prompt": jnp.asarray(table[0:1])}, 0, (8,))
        for b in batches:
            s, _ = step(s, model.params, b)
        assert np.abs(np.asarray(s.trainable["prompt"][0]) -
                      np.asarray(both.trainable["prompt"][0])).max() > 1e-3


def test_model_tuning_updates_all_weights(loaded):
    _, model = loaded["t5_v1_0"]
    method = for_model(model, "model")
    tx = method.optimizer(C.OptimConfig(name="adam", learning_rate=1e-3), 10)
    state = init_state(tx, method.init(model, None, None), 0)
    n_params = len(jax.tree.leaves(model.params))
    assert len([x for x in jax.tree.leaves(state.opt_state) if x.ndim > 1]) == 2 * n_params
    step = make_train_step(model, method, tx, dropout=0.0)
    batch = to_jnp(t5_batch(np.random.default_rng(0)))
    losses = []
    for _ in range(5):
        state, m = step(state, None, batch)
        losses.append(float(m["loss"][0]))
    assert losses[-1] < losses[0]
    moved = jax.tree.map(lambda a, b: not np.allclose(np.asarray(a)[0], np.asarray(b)),
                         state.trainable["params"], model.params)
    assert all(jax.tree.leaves(moved))


def test_adafactor_defaults_are_the_papers():
    """The default optimizer is optax's Adafactor with the paper's settings."""
    cfg = C.OptimConfig()
    ours = make_optimizer(cfg, 100)
    ref = optax.adafactor(0.3, decay_rate=0.8, multiply_by_parameter_scale=False,
                          clipping_threshold=1.0, weight_decay_rate=1e-5)
    params = {"p": jnp.linspace(-1, 1, 20 * 8).reshape(20, 8)}
    grads = {"p": jnp.cos(params["p"] * 3)}
    a, b = ours.init(params), ref.init(params)
    for _ in range(3):
        ua, a = ours.update(grads, a, params)
        ub, b = ref.update(grads, b, params)
        np.testing.assert_array_equal(np.asarray(ua["p"]), np.asarray(ub["p"]))


def test_schedules_and_clipping():
    sched = learning_rate_schedule(C.OptimConfig(learning_rate=1.0, schedule="linear",
                                                 warmup_steps=10), 110)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0) and float(sched(60)) == pytest.approx(0.5)
    rsqrt = learning_rate_schedule(C.OptimConfig(learning_rate=1.0, schedule="rsqrt",
                                                 warmup_steps=100), 1000)
    assert float(rsqrt(100)) == pytest.approx(1.0)  # lr at the end of warm-up
    assert float(rsqrt(400)) == pytest.approx(0.5)  # then lr * sqrt(warmup / step)
    cos = learning_rate_schedule(C.OptimConfig(learning_rate=2.0, schedule="cosine"), 100)
    assert float(cos(0)) == 2.0 and float(cos(100)) == pytest.approx(0.0, abs=1e-6)
    # global-norm clipping: an sgd step of lr 1 moves at most max_grad_norm
    tx = make_optimizer(C.OptimConfig(name="sgd", learning_rate=1.0, max_grad_norm=0.5), 10)
    g = {"p": jnp.full((4,), 10.0)}
    u, _ = tx.update(g, tx.init(g), g)
    assert float(optax.global_norm(u)) == pytest.approx(0.5)
    for name in ("adam", "adamw"):
        make_optimizer(C.OptimConfig(name=name, learning_rate=1e-3), 10).init(g)


def test_ptuning_with_the_model_tuned_jointly_uses_two_learning_rates(loaded):
    """method.ptuning.tune_model: the prompt encoder at optim.learning_rate, the weights at
    method.ptuning.model_learning_rate (P-tuning's SuperGLUE recipe); 0 keeps them still."""
    _, model = loaded["t5_v1_0"]
    batch = to_jnp(t5_batch(np.random.default_rng(0)))
    moved = {}
    for model_lr in (0.0, 1e-2):
        method = for_model(model, "ptuning", [
            "method.ptuning.tune_model=true", f"method.ptuning.model_learning_rate={model_lr}",
            "method.ptuning.hidden=8", "prompt.length=2", "prompt.init=random_uniform"])
        tree = method.init(model, None, None)
        before = jax.tree.map(np.array, tree)
        tx = method.optimizer(C.OptimConfig(name="sgd", learning_rate=0.1), 10)
        state = init_state(tx, tree, 0)
        state, _ = make_train_step(model, method, tx, dropout=0.0)(state, None, batch)
        moved[model_lr] = {part: max(jax.tree.leaves(jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.trainable[part],
            before[part]))) for part in ("encoder", "params")}
    assert moved[0.0]["encoder"] > 0 and moved[0.0]["params"] == 0.0
    assert moved[1e-2]["params"] > 0
