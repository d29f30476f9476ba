"""``ptjax pretrain``: every weight of a T5 trained on a text corpus with one of T5's
pre-training objectives (``ptjax.objectives``), from scratch or continued from a
checkpoint (the paper's LM adaptation: prefix LM on a span-corruption checkpoint).

    runs/NAME/
      config.yaml      the resolved config (a rerun must match it to resume)
      init/            scratch: the initial weights and the corpus tokenizer, HF form
      metrics.jsonl    train loss; validation loss on held-out scenes
      checkpoints/     orbax: the weights, Adafactor's state, step, data position
      model/           the final weights + tokenizer as a Hugging Face checkpoint, which
                       ptjax.load_model and transformers' T5ForConditionalGeneration load
      results.json     steps, parameters, final validation loss

It is ``ptjax train``'s machinery with the model-tuning method: the same jitted step
(``ptjax.train.setup``), the same loop (``ptjax.loop.step_loop``: metrics log, progress,
a non-finite loss stops the run naming the last good checkpoint), shardings, Orbax
checkpoints (damaged ones moved aside on resume), exact resume and run-directory lock;
only the data (a corpus through an objective instead of a task) and the evaluation
(validation loss instead of a task metric) differ. Rerunning a killed command
resumes it; rerunning with a larger train.steps continues a finished one.

The data: the corpus's train documents are tokenized once (no EOS), concatenated in order
and cut into segments of the raw length the objective needs (span corruption: T5's
``random_spans_helper``, so inputs fill pretrain.input_length; prefix LM: input_length - 1).
Batch ``step`` takes segments by the seeded per-epoch permutation of ``ptjax.data.pipeline``
and corrupts row r with a generator seeded by (train.seed, step, r): a batch is a pure
function of the step, whatever the process count.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil

import jax
import numpy as np

from ptjax import methods, objectives, sharding, storage
from ptjax.aot import auto_remat
from ptjax.data.corpus import load_corpus
from ptjax.data.encoding import assemble
from ptjax.data.pipeline import eval_batches, train_indices
from ptjax.errors import PtjaxError
from ptjax.evaluation import rows_per_batch
from ptjax.loop import step_loop
from ptjax.methods.base import place_trainable
from ptjax.models import t5
from ptjax.models.model import Model, count_params, init_params, load_model, load_tokenizer
from ptjax.models.tiny import train_tokenizer
from ptjax.rundir import (MetricsLog, NullLog, check_resumable, claim_run_dir, locked_run,
                          newest_checkpoint, open_checkpoints, write_json)
from ptjax.sharding import check_batch_size, is_main_process, make_mesh, sync, to_host
from ptjax.train import member_nll, setup

VALIDATION_SEED = 20_2104  # validation corruption is fixed, so losses compare across seeds


# ---------------------------------------------------------------------------- tokenizer


def tokenizer_path(pc) -> str:
    """Where the tokenizer of a scratch run is cached (one per corpus, size, documents)."""
    name = f"{pc.corpus}-unigram{pc.vocab_size}-x{pc.extra_ids}"
    if pc.documents:
        name += f"-docs{pc.documents}"
    return os.path.join(pc.tokenizer_dir, name)


def train_documents(pc):
    corpus = load_corpus(pc.corpus)
    train = corpus.train[:pc.documents] if pc.documents else corpus.train
    return corpus, train


def corpus_tokenizer(pc):
    """The SentencePiece-style (unigram) tokenizer trained on the corpus's train documents:
    <pad>=0, </s>=1, <unk>=2, <extra_id_0> the last id; trained once, then read from
    ``tokenizer_path``."""
    path = tokenizer_path(pc)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        _, docs = train_documents(pc)
        texts = [p for d in docs for p in d.paragraphs]
        tok = train_tokenizer("t5", vocab_size=pc.vocab_size, texts=texts,
                              extra_ids=pc.extra_ids, kind="unigram", words=False,
                              normalize=True)
        tmp = f"{path}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        if not os.path.exists(path):  # another process may have won the race
            os.replace(tmp, path)
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(path)


def encode_documents(tokenizer, docs) -> np.ndarray:
    """[n tokens] int32: every document's ids (no EOS), concatenated in order."""
    backend = tokenizer.backend_tokenizer
    encs = backend.encode_batch([d.text for d in docs], add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, np.int32) for e in encs] or
                          [np.zeros(0, np.int32)])


# ---------------------------------------------------------------------------- data


def lengths(pc) -> tuple[int, int, int]:
    """(raw tokens per segment, inputs length, targets length), EOS included."""
    if pc.objective == "span_corruption":
        raw, targets = objectives.random_spans_helper(pc.input_length, pc.noise_density,
                                                      pc.mean_span_length)
        return raw, pc.input_length, targets
    return pc.input_length - 1, pc.input_length, pc.input_length


def segments(tokens: np.ndarray, length: int, where: str) -> np.ndarray:
    """[N, length]: the token stream cut into whole segments (a short tail is dropped)."""
    n = len(tokens) // length
    if n == 0:
        raise PtjaxError(f"{where}: {len(tokens)} tokens make no segment of {length}; use "
                         "more documents (pretrain.documents) or a shorter "
                         "pretrain.input_length")
    return tokens[:n * length].reshape(n, length)


class PretrainStream:
    """This process's rows of every pre-training batch, as a pure function of the step
    (the interface of ``ptjax.data.pipeline.TrainStream``: ``batch(step)``)."""

    def __init__(self, model, segments_NxL: np.ndarray, pc, batch_size: int, seed: int,
                 rows: range | None = None):
        self.model, self.segments, self.pc, self.seed = model, segments_NxL, pc, seed
        self.batch_size = batch_size
        self.rows = range(batch_size) if rows is None else rows
        _, self.input_length, self.target_length = lengths(pc)
        self.sentinels = (objectives.sentinel_ids(model.tokenizer)
                          if pc.objective == "span_corruption" else None)

    def corrupt(self, tokens, rng) -> tuple[list, list, bool]:
        """One segment -> (input ids, target ids, False), as encoding.tokenize gives."""
        eos = self.model.config.eos_token_id
        if self.pc.objective == "span_corruption":
            a, b = objectives.span_corruption(tokens, rng, self.sentinels, eos,
                                              self.pc.noise_density, self.pc.mean_span_length)
        else:
            a, b = objectives.prefix_lm(tokens, rng, eos)
        return a.tolist(), b.tolist(), False

    def examples(self, step: int) -> list:
        index = train_indices(step, self.batch_size, len(self.segments), self.seed)
        return [self.corrupt(self.segments[index[r]],
                             np.random.default_rng([self.seed, step, r])) for r in self.rows]

    def batch(self, step: int) -> tuple[dict, int]:
        return assemble(self.model, self.examples(step), self.input_length,
                        self.target_length), 0


def validation_set(model, segments_NxL: np.ndarray, pc) -> dict:
    """The first pretrain.eval_examples held-out segments, corrupted with a fixed seed."""
    stream = PretrainStream(model, segments_NxL, pc, 1, 0)
    n = min(pc.eval_examples, len(segments_NxL))
    rows = [stream.corrupt(segments_NxL[i], np.random.default_rng([VALIDATION_SEED, i]))
            for i in range(n)]
    return assemble(model, rows, stream.input_length, stream.target_length)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nll(model, method, trainable, batch):
    nll, count = member_nll(model, method, trainable, None, batch)
    return nll[0], count[0]


def validation_loss(model, method, trainable, arrays: dict, batch_size: int, mesh) -> float:
    """Mean target-token NLL over the validation set (dropout off)."""
    total, count = 0.0, 0.0
    for b, n in eval_batches(arrays, rows_per_batch(batch_size, mesh)):
        nll, c = _nll(model, method, trainable, sharding.replicated_batch(b, mesh))
        total += float(sharding.to_host(nll)[:n].sum())
        count += float(sharding.to_host(c)[:n].sum())
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------- model


def scratch_config(pc, vocab_size: int, dropout: float):
    """A T5 v1.1 of the configured size: gated-GELU, untied lm_head, no output rescale."""
    return t5.T5Config(vocab_size=vocab_size, d_model=pc.d_model, d_kv=pc.d_kv, d_ff=pc.d_ff,
                       num_layers=pc.num_layers, num_decoder_layers=pc.num_layers,
                       num_heads=pc.num_heads, feed_forward_proj="gated-gelu",
                       scale_decoder_outputs=False, tie_lm_head=False, dropout_rate=dropout)


def initial_model_dir(cfg) -> str:
    """The checkpoint training starts from: pretrain.init (checked to be a directory before
    the run directory is claimed), or (scratch) ``init/`` in the run directory, written
    once by process 0 with the corpus tokenizer and weights drawn from train.seed."""
    pc = cfg.pretrain
    if pc.init != "scratch":
        return pc.init
    path = os.path.join(cfg.run_dir, "init")
    if is_main_process() and not os.path.exists(os.path.join(path, "config.json")):
        tok = corpus_tokenizer(pc)
        config = scratch_config(pc, len(tok), cfg.train.dropout)
        model = Model(config=config, params=None, tokenizer=tok)
        params = init_params(model.module(), jax.random.key(cfg.train.seed))
        tmp = f"{path}.tmp"
        model.save_pretrained(tmp, params=params)
        os.replace(tmp, path)
    sync("ptjax-pretrain-init")
    return path


# ---------------------------------------------------------------------------- the loop


def pretrain(cfg) -> dict:
    """Run (or resume) the pre-training a ``RunConfig``'s pretrain section describes;
    returns results.json's dict. Every process of a multi-host job runs this; process 0
    holds the run directory's lock throughout (``ptjax.rundir.locked_run``)."""
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="model"),
                              prompt=dataclasses.replace(cfg.prompt, seeds=(0,), inits=()))
    if storage.is_remote(cfg.run_dir):  # its model is loaded back from run_dir/init
        raise PtjaxError(f"run_dir={cfg.run_dir}: ptjax pretrain writes a local directory; "
                         "give a local path (and copy the model up after: gcloud storage cp "
                         "-r); ptjax train, eval and sweep take gs:// directories")
    return locked_run(cfg, _pretrain)


def _pretrain(cfg, main: bool, locks: list) -> dict:
    run_dir, tc, pc = cfg.run_dir, cfg.train, cfg.pretrain
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.model)
    check_batch_size(tc.batch_size, mesh, microbatches=tc.microbatches)
    if tc.batch_size % jax.process_count():  # each process draws its own rows of a batch
        raise PtjaxError(f"train.batch_size={tc.batch_size} is not a multiple of the "
                         f"{jax.process_count()} processes")
    if main:
        check_resumable(run_dir, cfg)
    if pc.init != "scratch" and not os.path.isdir(pc.init):
        raise PtjaxError(f"pretrain.init={pc.init!r} is neither 'scratch' nor a checkpoint "
                         "directory")
    claim_run_dir(run_dir, main, locks)  # a scratch run writes its initial weights there
    model = load_model(initial_model_dir(cfg), dtype=cfg.model.dtype, mesh=mesh,
                       fsdp=cfg.mesh.fsdp)
    model = dataclasses.replace(model, remat=cfg.model.remat)
    if not model.is_encoder_decoder:
        what = "a decoder-only model" if model.kind == "causal" else \
            "a masked LM (span corruption writes T5 sentinels into a decoder's targets)"
        raise PtjaxError(f"pretrain.init={pc.init!r} is {what}; ptjax pretrain "
                         "trains T5 (encoder-decoder) checkpoints")
    if model.tokenizer is None:
        raise PtjaxError(f"{model.path}: the checkpoint has no tokenizer files, so the corpus "
                         "cannot be encoded")
    corpus, docs = train_documents(pc)
    raw, _, _ = lengths(pc)
    train_segments = segments(encode_documents(model.tokenizer, docs), raw,
                              f"pretrain.corpus={pc.corpus} (train)")
    val_segments = segments(encode_documents(model.tokenizer, corpus.validation), raw,
                            f"pretrain.corpus={pc.corpus} (validation)")
    per_process = tc.batch_size // jax.process_count()
    rows = range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    stream = PretrainStream(model, train_segments, pc, tc.batch_size, tc.seed, rows)
    val = validation_set(model, val_segments, pc)

    method = methods.build(cfg, model.config, model.dtype)
    trainable = place_trainable(method, method.init(model, cfg, None), mesh, cfg)
    model = dataclasses.replace(model, params=None)  # the state holds the weights now
    _, state, step_fn = setup(auto_remat(model, method, cfg, mesh, trainable, None), method, cfg,
                              mesh, trainable, None)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    start, restored, damaged = newest_checkpoint(
        ckpt_dir, tc.keep_checkpoints, lambda r, step: r.restore(step, state, None))
    if restored is not None:
        state, _, meta = restored
        assert meta["data_position"] == start * tc.batch_size
    ckpt = open_checkpoints(ckpt_dir, tc.keep_checkpoints, main, damaged, start)
    log = MetricsLog(run_dir, start) if main else NullLog()
    val_loss = None

    def evaluate_at(s, trainable):
        nonlocal val_loss
        val_loss = validation_loss(model, method, trainable, val, tc.eval_batch_size, mesh)
        if not tc.progress and main:
            print(f"{os.path.basename(run_dir.rstrip('/'))} step {s}/{tc.steps}: validation "
                  f"loss {val_loss:.4f}", flush=True)
        log.write([{"step": s, "split": "validation", "loss": val_loss}])

    try:
        state = step_loop(cfg, main, ckpt, stream, state, step_fn, None, mesh, start, log,
                          evaluate_at, lambda: (None, {}), members=False)
    finally:
        log.close()
    if val_loss is None:  # nothing left to train: score what the checkpoint holds
        val_loss = validation_loss(model, method, state.trainable, val, tc.eval_batch_size,
                                   mesh)
    out_dir = os.path.join(run_dir, "model")
    host = jax.tree.map(to_host, state.trainable)
    results = {"run_dir": run_dir, "objective": pc.objective, "corpus": pc.corpus,
               "init": pc.init, "steps": tc.steps, "model": out_dir,
               "parameters": count_params(host),
               "train_tokens": int(train_segments.size),
               "tokens_seen": int(tc.steps * tc.batch_size * raw),
               "validation_loss": val_loss,
               "validation_perplexity": math.exp(min(val_loss, 50.0))}
    if main:
        method.export(run_dir, host, model, "")  # writes run_dir/model in HF form
        write_json(os.path.join(run_dir, "results.json"), results)
    ckpt.close()
    return results
