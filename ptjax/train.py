"""Training on a frozen model, for every method: loss, optimizer, the jitted step.

The trainable state is a small pytree (a ``ptjax.methods`` method's, every leaf with a
leading K axis); the frozen params are a separate argument of the jitted step that is
never donated, never updated and never given optimizer state::

    method = ptjax.methods.build(cfg, model.config, model.dtype)
    tx = method.optimizer(cfg.optim, steps)
    state = init_state(tx, method.init(model, cfg, task), seed, prompt_seeds=[0, 1, ...])
    step = make_train_step(model, method, tx, dropout=0.1)
    state, metrics = step(state, model.params, batch)   # state donated; params untouched

With K members (K prompts, prefixes or prompt encoders) every train batch is seen by each
in one forward pass of K x B rows (``vmap`` over K), each with its own dropout key, and
the optimizer is vmapped over K, so the K members train as K separate runs would (own
Adafactor statistics, own gradient clipping, own dropout masks). Model tuning is K = 1.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ptjax.errors import PtjaxError
from ptjax.models.common import ModelOptions, as_prompt_inputs
from ptjax.sharding import batch_sharding
from ptjax.verbalizers import answer_position, class_nll, class_scores, scoring

PRNGS = ("threefry", "rbg", "unsafe_rbg")  # the dropout masks' PRNG (train.prng)


@flax.struct.dataclass
class TrainState:
    """step: int32 []; trainable: the method's tree, every leaf [K, ...] fp32 (e.g.
    {"prompt": [K, P, D]}); opt_state: the optimizer's state for ``trainable`` only;
    rng: uint32 [2]; prompt_seeds: int32 [K], member k's seed (its dropout masks, see
    ``prompt_keys``)."""
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array
    prompt_seeds: jax.Array


def init_state(tx, trainable, seed: int, prompt_seeds=None) -> TrainState:
    """A fresh train state; ``seed`` seeds the step rng (dropout), prompt_seeds (default
    0..K-1) name each prompt's own dropout stream. Built under jit, so on a mesh the
    optimizer state takes the shardings of the trainable leaves it mirrors (model tuning's
    sharded weights)."""
    K = jax.tree.leaves(trainable)[0].shape[0]
    seeds = jnp.asarray(range(K) if prompt_seeds is None else prompt_seeds, jnp.int32)
    if seeds.shape != (K,):
        raise PtjaxError(f"{seeds.shape[0]} prompt seeds for {K} prompts")
    build = _state_builder(tx, seed)
    return jax.jit(build, out_shardings=state_shardings(tx, trainable, build, seeds))(
        trainable, seeds)


def _state_builder(tx, seed: int):
    def build(trainable, seeds):
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                          opt_state=tx.init(trainable), rng=jax.random.PRNGKey(seed),
                          prompt_seeds=seeds)
    return build


def setup(model, method, cfg, mesh, trainable, frozen, abstract: bool = False):
    """What ``ptjax train`` and ``ptjax plan`` both build: (optimizer, initial state,
    jitted step). trainable / frozen: placed arrays, or ``jax.ShapeDtypeStruct`` leaves
    with shardings when ``abstract`` (then the state is abstract too); frozen is None
    when the method tunes the weights. ``model.remat`` is a policy, never "auto"
    (``ptjax.aot.auto_remat`` resolves that first: it compiles this step)."""
    if model.remat == "auto":
        raise ValueError("train.setup needs a remat policy; resolve model.remat=auto with "
                         "ptjax.aot.auto_remat first")
    tx = method.optimizer(cfg.optim, cfg.train.steps)
    seeds = jnp.asarray(method.seeds, jnp.int32)
    if abstract:
        build = _state_builder(tx, cfg.train.seed)
        shardings = state_shardings(tx, trainable, build, seeds)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(build, trainable, seeds), shardings)
    else:
        state = init_state(tx, trainable, cfg.train.seed, method.seeds)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    step = make_train_step(model, method, tx, cfg.train.dropout,
                           shardings=(state_sh, frozen_sh, batch_sharding(mesh)),
                           **step_settings(cfg))
    return tx, state, step


def state_shardings(tx, trainable, build, *args):
    """Shardings of the state ``build(trainable, *args)`` makes: each optimizer-state leaf
    shaped like a trainable leaf takes that leaf's sharding (Adam's moments of a sharded
    weight are sharded alike), everything else is replicated. None off a mesh.
    (Zeros carry no data dependency, so jit alone would replicate them.)"""
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(trainable)]
    if not shardings or not isinstance(shardings[0], jax.sharding.NamedSharding):
        return None
    rep = jax.sharding.NamedSharding(shardings[0].mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(build, trainable, *args)
    if all(s.is_fully_replicated for s in shardings):  # prompts: replicated everywhere
        return jax.tree.map(lambda _: rep, abstract)
    t_sh = jax.tree.map(lambda x: x.sharding, trainable)
    # An optimizer-state leaf mirrors the trainable leaf whose key path ends its own (Adam's
    # mu["params"]["encoder"]... mirrors trainable["params"]["encoder"]...) and shape it has.
    by_path = {tuple(path): (x.shape, x.sharding)
               for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}

    def mirror(path, leaf):
        for i in range(len(path)):
            shape, sh = by_path.get(tuple(path[i:]), (None, None))
            if shape == leaf.shape:
                return sh
        return rep
    opt = jax.tree_util.tree_map_with_path(mirror, abstract.opt_state)
    return jax.tree.map(lambda _: rep, abstract).replace(
        trainable=t_sh, opt_state=opt)


def dropout_settings(train_cfg) -> dict:
    """make_train_step's dropout keywords from a ``TrainConfig``."""
    return dict(attention_dropout=train_cfg.attention_dropout,
                dropout_broadcast=train_cfg.dropout_broadcast, prng=train_cfg.prng)


def step_settings(cfg) -> dict:
    """make_train_step's keywords from a ``RunConfig``: dropout settings, the verbalizer's
    class-level scoring (``verbalizers.scoring``) and train.microbatches."""
    return dict(dropout_settings(cfg.train), scoring=scoring(cfg.task),
                microbatches=cfg.train.microbatches)


def model_options(model, dropout: float | None = None, attention_dropout: float | None = None,
                  dropout_broadcast: bool = False, rows=None) -> ModelOptions:
    """The options ``sequence_nll`` runs the model with: ``model.options()`` (attention;
    on a mesh, activation sharding constraints), the given dropout rates (None = the
    checkpoint's), and right-padded keys, which is what ``ptjax.data.encoding`` makes (so
    cuDNN may take padding as sequence lengths). rows: int [B], each row's index in the
    step's whole batch, which its dropout masks are drawn from (``ModelOptions.
    dropout_rows``; None = 0..B-1)."""
    return model.options(dropout=dropout, attention_dropout=attention_dropout,
                         broadcast_dropout=dropout_broadcast, right_padded=True,
                         dropout_rows=rows)


def dropout_key(rng, prng: str):
    """A raw threefry key -> a key of the ``prng`` implementation for the dropout masks
    (threefry: unchanged; rbg / unsafe_rbg: XLA's RngBitGenerator, much cheaper per bit on
    GPUs), so the train state keeps one key format whatever the choice."""
    if prng == "threefry":
        return rng
    if prng not in PRNGS:
        raise PtjaxError(f"unknown PRNG {prng!r}; valid: {', '.join(PRNGS)}")
    bits = jax.random.bits(jax.random.wrap_key_data(rng, impl="threefry2x32"), (4,),
                           jnp.uint32)
    return jax.random.wrap_key_data(bits, impl=prng)


def forward(model, params, batch, prompt=None, rngs=None, deterministic=True,
            options: ModelOptions | None = None, hidden: bool = False):
    """The model over a batch's rows: fp32 logits [B, T, vocab] at the target positions
    (T5: decoder positions; GPT-2: input positions), or with ``hidden`` the hidden state
    the LM head reads there, [B, T, D]. A batch's ``slots`` (a template's soft slots) say
    where the prompt's embeddings go."""
    module = model.module(deterministic=deterministic,
                          options=options or model_options(model), hidden=hidden)
    variables = {"params": params}
    if "slots" in batch and prompt is not None:  # a template's soft slots
        prompt = as_prompt_inputs(prompt).replace(slots=batch["slots"])
    if model.is_encoder_decoder:
        return module.apply(variables, batch["input_ids"], batch["input_mask"],
                            batch["decoder_input_ids"], None, prompt, rngs=rngs)
    return module.apply(variables, batch["input_ids"], batch["input_mask"], prompt, rngs=rngs)


def sequence_nll(model, params, batch, prompt=None, rngs=None, deterministic=True,
                 options: ModelOptions | None = None, per_token: bool = False):
    """Summed target-token NLL and target-token count per row: ([B], [B]) fp32; with
    ``per_token`` each target position's NLL and mask instead: ([B, T], [B, T]).

    batch: arrays of ``ptjax.data.encoding.encode`` with B rows (right-padded: every mask
    row is ones then zeros); prompt: ``PromptInputs`` (or [P, D] / [B, P, D]) or None; a
    batch's ``slots`` (a template's soft slots) say where its embeddings go. Padding and
    (for GPT-2) input tokens carry no loss. options: default ``model_options(model)``.
    """
    logits = forward(model, params, batch, prompt, rngs, deterministic, options)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                          batch["targets"])
    mask = batch["target_mask"].astype(jnp.float32)
    if per_token:
        return nll * mask, mask
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def _per_member(method, trainable, frozen, batch, rngs_K, prng, fn):
    """``fn(member, params, prompt, rows, rngs)`` for each of K members over the same
    batch, in one forward pass of K x B rows (vmap over K)."""
    def one(member, rows, rng):
        params, prompt = method.inputs(member, frozen)
        rngs = None if rng is None else {"dropout": dropout_key(rng, prng)}
        return fn(member, params, prompt, rows, rngs)

    # several templates: arrays [B, K, ...], member k reads [:, k] (see data.encoding)
    rows_axis = 1 if batch["input_ids"].ndim == 3 else None
    if jax.tree.leaves(trainable)[0].shape[0] == 1:
        # One member (model tuning, a single prompt) runs unbatched, its outputs given the
        # K axis: the same values, and a trained position bias then reaches cuDNN's
        # attention as [1, H, T, S], which its vmap rule cannot take batched.
        rows = batch if rows_axis is None else jax.tree.map(lambda x: x[:, 0], batch)
        out = one(jax.tree.map(lambda x: x[0], trainable), rows,
                  None if rngs_K is None else rngs_K[0])
        return jax.tree.map(lambda x: x[None], out)
    if rngs_K is None:
        return jax.vmap(lambda m, b: one(m, b, None), in_axes=(0, rows_axis))(trainable, batch)
    return jax.vmap(one, in_axes=(0, rows_axis, 0))(trainable, batch, rngs_K)


def member_nll(model, method, trainable, frozen, batch, rngs_K=None, options=None,
               prng: str = "threefry", per_token: bool = False):
    """Each of K members over the same batch: summed NLL and token count, ([K, B], [K, B])
    (``per_token``: ([K, B, T], [K, B, T])).

    One forward pass over K x B rows (``vmap`` over K; the frozen params are shared, read
    once). With ``rngs_K`` ([K] dropout keys) member k's dropout masks come from its own
    key, so they are the ones a separate run of that member would draw.
    options: ``ModelOptions`` (dropout rates; default ``model_options(model)``); prng: the
    dropout masks' PRNG (``dropout_key``).
    """
    def fn(member, params, prompt, rows, rngs):
        return sequence_nll(model, params, rows, prompt, rngs, deterministic=rngs is None,
                            options=options, per_token=per_token)
    return _per_member(method, trainable, frozen, batch, rngs_K, prng, fn)


def member_class_logits(model, method, trainable, frozen, batch, word_mask_BxT, rngs_K=None,
                        options=None, prng: str = "threefry"):
    """A soft verbalizer's class logits of K members, [K, B, C] fp32: the hidden state at
    each row's answer position (``verbalizers.answer_position``) dot member k's class
    vectors ``trainable["verbalizer"]`` [K, C, D]."""
    at = answer_position(word_mask_BxT)

    def fn(member, params, prompt, rows, rngs):
        h = forward(model, params, rows, prompt, rngs, deterministic=rngs is None,
                    options=options, hidden=True)  # [B, T, D]
        h_BxD = jnp.take_along_axis(h, at[:, None, None], axis=1)[:, 0]
        return jnp.einsum("bd,cd->bc", h_BxD, member["verbalizer"],
                          preferred_element_type=jnp.float32)
    return _per_member(method, trainable, frozen, batch, rngs_K, prng, fn)


def class_losses(model, method, trainable, frozen, batch, scoring, rngs_K=None,
                 options=None, prng: str = "threefry"):
    """[K, N]: each example's class-level loss, -log softmax over classes of the gold
    class's score (manual: ``verbalizers.class_scores`` of the rows' token
    log-probabilities; soft: the class logits). batch: rows plus "label" [N] and
    "word_mask" [N x W, T] (``verbalizers``)."""
    batch = dict(batch)
    labels, wm = batch.pop("label"), batch.pop("word_mask")
    if scoring.kind == "soft":
        scores = member_class_logits(model, method, trainable, frozen, batch, wm, rngs_K,
                                     options, prng)
    else:
        nll, _ = member_nll(model, method, trainable, frozen, batch, rngs_K, options, prng,
                            per_token=True)
        scores = class_scores(-nll, wm, scoring)
    return class_nll(scores, labels)


def prompt_keys(rng, prompt_seeds_K):
    """Per-prompt dropout keys: the step's key folded with each prompt's seed, so a prompt
    draws the same masks whether it trains alone or packed with others."""
    return jax.vmap(lambda s: jax.random.fold_in(rng, s))(jnp.asarray(prompt_seeds_K))


def loss_sums(model, method, trainable, frozen, batch, rng, dropout: float,
              prompt_seeds_K=None, attention_dropout: float | None = None,
              dropout_broadcast: bool = False, prng: str = "threefry", scoring=None,
              rows=None):
    """Each member's summed loss over the batch and what its mean divides by, ([K], [K])
    fp32: the summed target-token NLL and the target-token count; with ``scoring`` the
    summed class-level losses and the example count. ``loss_fn`` divides them; a step in
    microbatches adds both up over its microbatches first (``microbatch_grads``).
    rows: int [R], each row's index in the step's whole batch (its dropout masks,
    ``model_options``; None = 0..R-1). The other arguments: see ``loss_fn``."""
    if prompt_seeds_K is None:  # member k's seed is k
        prompt_seeds_K = jnp.arange(jax.tree.leaves(trainable)[0].shape[0])
    active = dropout > 0.0 or bool(attention_dropout)
    rngs = prompt_keys(rng, prompt_seeds_K) if active else None
    options = model_options(model, dropout, attention_dropout, dropout_broadcast, rows)
    if scoring is not None:
        losses_KxN = class_losses(model, method, trainable, frozen, batch, scoring, rngs,
                                  options, prng)
        return losses_KxN.sum(1), jnp.full(losses_KxN.shape[:1], losses_KxN.shape[1],
                                           jnp.float32)
    nll, count = member_nll(model, method, trainable, frozen, batch, rngs, options, prng)
    return nll.sum(1), count.sum(1)


def loss_fn(model, method, trainable, frozen, batch, rng, dropout: float,
            prompt_seeds_K=None, attention_dropout: float | None = None,
            dropout_broadcast: bool = False, prng: str = "threefry", scoring=None, rows=None):
    """Sum over members of each member's mean target-token NLL, and the [K] per-member
    means. Summing keeps each member's gradient equal to that of its own mean loss.
    scoring: a ``verbalizers.Scoring`` (task.verbalizer_loss=class or a soft verbalizer):
    each member's loss is then its mean class-level loss over the batch's examples.
    dropout: the hidden dropout rate; attention_dropout: the attention-probability rate
    (None = the checkpoint's own, as Hugging Face applies it; 0 lets the fused attention
    run); dropout_broadcast: T5X's broadcast masks; prng: threefry | rbg | unsafe_rbg;
    rows: see ``loss_sums``."""
    total, count = loss_sums(model, method, trainable, frozen, batch, rng, dropout,
                             prompt_seeds_K, attention_dropout, dropout_broadcast, prng,
                             scoring, rows)
    per_k = total / jnp.maximum(count, 1.0)
    return per_k.sum(), per_k


def examples_in(batch) -> int:
    """The examples in a train batch: its rows, or with the class-level loss (W rows per
    example) its labels."""
    return batch["label"].shape[0] if "label" in batch else batch["input_ids"].shape[0]


def split_microbatches(tree, examples: int, microbatches: int, mesh=None):
    """Every leaf [examples x r, ...] (r rows per example, example-major: 1, or the class-
    level loss's W) -> [M, examples / M x r, ...]; microbatch i holds examples i, M + i,
    2M + i, ... Strided, not blocks: the block of rows each device holds then splits
    evenly among the microbatches, so no row moves between devices (``mesh``: each
    microbatch's rows pinned on data, as the batch's are)."""
    M, n = microbatches, examples // microbatches
    pin = mesh is not None and mesh.shape["data"] > 1

    def one(x):
        r = x.shape[0] // examples
        x = jnp.moveaxis(x.reshape((n, M, r) + x.shape[1:]), 1, 0)
        x = x.reshape((M, n * r) + x.shape[3:])
        if pin:
            x = jax.lax.with_sharding_constraint(
                x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")))
        return x
    return jax.tree.map(one, tree)


def microbatch_grads(model, method, trainable, frozen, batch, rng, microbatches: int,
                     *loss_args, mesh=None, shardings=None):
    """``jax.grad(loss_fn)``'s (gradients, [K] per-member losses) for the whole batch,
    computed in ``microbatches`` forward and backward passes one after another (a
    ``lax.scan``), so that only one microbatch's activations are alive at a time.

    Each member's summed loss, its count (``loss_sums``) and the gradient of the sum are
    added up over the microbatches and divided by the count once at the end: the whole
    batch's mean over its target tokens (or examples), not a mean of the microbatches'
    means, which would weigh a token by how many share its microbatch. Each row's
    dropout masks are those of its index in the whole batch (``model_options``), so the
    result equals the one-pass step's up to float rounding. loss_args: ``loss_fn``'s
    after ``rng``; mesh: the batch's (``split_microbatches``); shardings: the trainable
    leaves', which the summed gradients keep (model tuning's sharded weights: a
    replicated sum would be a whole copy of the weights on every device)."""
    R = batch["input_ids"].shape[0]
    micro, rows = split_microbatches((batch, jnp.arange(R)), examples_in(batch),
                                     microbatches, mesh)

    def summed(trainable, batch, rows):
        total_K, count_K = loss_sums(model, method, trainable, frozen, batch, rng,
                                     *loss_args, rows=rows)
        return total_K.sum(), (total_K, count_K)

    def pin(grads):
        if shardings is None or mesh is None or mesh.size == 1:
            return grads
        return jax.lax.with_sharding_constraint(grads, shardings)

    def add(acc, xs):
        grads, (total_K, count_K) = jax.grad(summed, has_aux=True)(trainable, *xs)
        acc = jax.tree.map(jnp.add, acc, (grads, total_K, count_K))
        return (pin(acc[0]),) + acc[1:], None

    K = jax.tree.leaves(trainable)[0].shape[0]
    zeros = (pin(jax.tree.map(jnp.zeros_like, trainable)), jnp.zeros(K), jnp.zeros(K))
    (grads, total_K, count_K), _ = jax.lax.scan(add, zeros, (micro, rows))
    count_K = jnp.maximum(count_K, 1.0)
    grads = jax.tree.map(  # every trainable leaf is [K, ...]: member k's by its own count
        lambda g: g / count_K.reshape((K,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads)
    return grads, total_K / count_K


def make_train_step(model, method, tx, dropout: float = 0.1, shardings=None, *,
                    attention_dropout: float | None = None, dropout_broadcast: bool = False,
                    prng: str = "threefry", scoring=None, microbatches: int = 1):
    """The jitted step ``(state, frozen_params, batch) -> (state, {"loss": [K], "finite":
    []})``; a step that would make the state non-finite returns the old state and
    finite=False.

    dropout / attention_dropout / dropout_broadcast / prng: see ``loss_fn`` (the config
    keys train.dropout, train.attention_dropout, train.dropout_broadcast, train.prng);
    scoring: a ``verbalizers.Scoring`` for the class-level loss (see ``loss_fn``);
    microbatches: train.microbatches, the batch's passes one after another with one
    update (``microbatch_grads``; the batch's examples must split evenly, and on a mesh
    each microbatch over the data-parallel devices: ``sharding.check_batch_size``).

    ``state`` is donated (its buffers are reused for the new state); ``frozen_params`` is
    only read. When the method tunes the weights pass ``frozen_params=None``: the weights
    are the state.
    shardings: ``(state, frozen, batch)`` shardings (``ptjax.sharding``), or None to let
    jit follow its inputs; metrics come back replicated.
    """
    mesh = None if shardings is None else shardings[2].mesh
    trainable_sh = None if shardings is None or shardings[0] is None \
        else shardings[0].trainable

    def step(state: TrainState, frozen, batch):
        rng, drop_rng = jax.random.split(state.rng)
        loss_args = (dropout, state.prompt_seeds, attention_dropout, dropout_broadcast, prng,
                     scoring)
        if microbatches == 1:
            grads, per_k = jax.grad(functools.partial(loss_fn, model, method), has_aux=True)(
                state.trainable, frozen, batch, drop_rng, *loss_args)
        else:
            grads, per_k = microbatch_grads(model, method, state.trainable, frozen, batch,
                                            drop_rng, microbatches, *loss_args, mesh=mesh,
                                            shardings=trainable_sh)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                         rng=rng, prompt_seeds=state.prompt_seeds)
        # A step whose loss or new state is not finite keeps the old state, so no
        # checkpoint ever holds one; the flag is read with the losses (no extra host sync)
        # and stops the run.
        finite = jnp.isfinite(per_k).all() & all_finite((trainable, opt_state))
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, {"loss": per_k, "finite": finite}

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    state_sh, frozen_sh, batch_sh = shardings
    metrics_sh = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, {"loss": metrics_sh, "finite": metrics_sh}),
                   donate_argnums=(0,))


def all_finite(tree) -> jax.Array:
    """bool []: every floating leaf of ``tree`` is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
