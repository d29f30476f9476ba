"""Several trained runs on one frozen model, evaluated in shared batches: the paper's
case for prompt tuning (one frozen model serves many tasks, each row carrying its own
task's prompt), for prompt tuning, P-tuning and prefix tuning alike.

    multi = ptjax.load_runs(["runs/sentiment", "runs/qa-prefix"])
    multi.evaluate()       # {run_dir: {metric: [K]}}: what ``ptjax eval RUN_DIR`` gives each
    multi.score([{"run": "runs/sentiment", "inputs": "review: the film was great"}])
    multi.logits(input_ids, entries=[(0, 0), (1, 0)], ...)   # row b behind (run, member)

Every member of every run is one entry of a prompt table, built once: a soft prompt's (or
a P-tuning encoder's) vectors [P_r, D] left-padded to the longest prompt with a mask
(``PromptInputs.embeds_mask``), a prefix's keys and values [L, P_r, H, Dh] at each site
left-padded likewise (a site's "mask"; a run without a prefix there has it all masked).
A masked position gets no attention weight, and as the padding comes before the real
vectors, T5's relative distances and GPT-2's positions (counted from the mask) are the
run's own: each row's logits are those of its run alone, to fp32 rounding.

Evaluation: every run's dev set (``ptjax eval``'s, ``taskdata.run_dev_set``), one copy per
member, padded to common widths, each row carrying its entry's index, interleaved so that
batches mix runs. Rank classification (labels, candidates, a manual verbalizer): one
jitted forward scores every row's targets behind its own prompt. Greedy generation: the
rows of every run decoded greedily share the decoding batches (as many new tokens as the
longest task.max_target_length; each output cut to its run's own, as a row's greedy
tokens do not depend on the other rows). Each run's scores or answers then go through its
own prediction and metric code (``evaluation.rank_predictions`` / ``score``), so its
metrics are ``ptjax eval``'s.

All K members of every run are evaluated (``ptjax eval`` reports each member); ``score``
answers with one member per request (the run's best by default). A soft verbalizer's
rows (class vectors read at the answer position's hidden state) share batches of their
own, each row with its entry's class vectors. Refused with one line: model tuning and
P-tuning with tune_model (they change the weights) and runs on different models.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ptjax import sharding
from ptjax.data import pipeline
from ptjax.data.templates import parse
from ptjax.data.tasks import load_task
from ptjax.errors import PtjaxError
from ptjax.evaluation import (Predictions, member_inputs, rank_predictions, rows_per_batch,
                              score, soft_predictions)
from ptjax.methods.prefix import site_geometry
from ptjax.models.common import PromptInputs
from ptjax.models.named import model_dir
from ptjax.taskdata import dev_task_config, run_dev_set
from ptjax.train import forward, model_options, sequence_nll
from ptjax.trained import TrainedRun, load_run, run_config
from ptjax.verbalizers import answer_position

METHODS = ("prompt", "ptuning", "prefix")  # what a mixed batch can carry per row


def model_key(cfg) -> tuple:
    """What must match for runs to share a frozen model: the checkpoint (a local
    directory resolved), its dtype and attention implementation."""
    where = model_dir(cfg.model)
    if os.path.isdir(os.path.expanduser(where)):
        where = os.path.realpath(os.path.expanduser(where))
    return where, cfg.model.dtype, cfg.model.attention


def _different_models(a: str, cfg_a, b: str, cfg_b) -> PtjaxError:
    (pa, da, aa), (pb, db, ab) = model_key(cfg_a), model_key(cfg_b)
    what = ", ".join(f"{k} {x} vs {y}" for k, x, y in (
        ("model.path", pa, pb), ("model.dtype", da, db), ("model.attention", aa, ab))
        if x != y)
    return PtjaxError(f"{a} and {b} are on different models ({what}); runs evaluated "
                      "together must share one frozen model")


def load_runs(run_dirs, overrides=()) -> MultiRun:
    """Trained run directories on one frozen model, loaded once (``load_run`` each,
    sharing the first's model). overrides: ``key=value`` strings applied to every run."""
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise PtjaxError("load_runs needs at least one run directory")
    first_cfg = run_config(run_dirs[0], overrides)
    cfgs = [first_cfg] + [run_config(d, overrides) for d in run_dirs[1:]]
    for d, cfg in zip(run_dirs[1:], cfgs[1:]):  # before any weights are read
        if model_key(cfg) != model_key(first_cfg):
            raise _different_models(run_dirs[0], first_cfg, d, cfg)
    first = load_run(run_dirs[0], overrides)
    runs = [first] + [load_run(d, overrides, prepared=(first.mesh, first.model))
                      for d in run_dirs[1:]]
    return MultiRun(runs)


def check_mixable(run: TrainedRun):
    """One-line errors for a run whose rows cannot share the frozen model's batches."""
    method = run.method
    if method.tunes_weights:
        raise PtjaxError(f"{run.run_dir}: method.name={method.name} trains the model's "
                         "weights (model tuning, or P-tuning with tune_model), so its rows "
                         "cannot share a frozen model with other runs; evaluate it alone "
                         f"(ptjax eval {run.run_dir})")
    if method.name not in METHODS:
        raise PtjaxError(f"{run.run_dir}: method.name={method.name} cannot be mixed; "
                         f"mixed evaluation takes {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the prompt table: member ``k`` of run ``run`` (an index)."""
    run: int
    k: int


def prompt_table(runs, model_config) -> tuple[PromptInputs, tuple]:
    """(every member's prompt material with a leading entry axis E, the entries in order).

    embeds [E, P, D] fp32 and embeds_mask [E, P] (None when no run has prompt vectors);
    prefix {site: {"k", "v" [E, L, P, H, Dh], "mask" [E, P]}} over every site any run
    uses (None when none). Shorter prompts are padded on the left."""
    parts = [member_inputs(run.method, run.trainables, None)[1] for run in runs]
    entries = tuple(Entry(i, k) for i, run in enumerate(runs) for k in range(run.K))
    Ks = [run.K for run in runs]
    embeds = embeds_mask = None
    lengths = [0 if p.embeds is None else p.embeds.shape[1] for p in parts]
    if max(lengths):
        P, D = max(lengths), model_config.hidden_size
        embeds = np.concatenate([_left_pad(p.embeds, P, 1, (K, 0, D))
                                 for p, K in zip(parts, Ks)])
        embeds_mask = np.concatenate([_mask(K, n, P) for K, n in zip(Ks, lengths)])
    prefix = None
    sites = [s for s in ("encoder", "decoder", "cross")
             if any(p.prefix is not None and s in p.prefix for p in parts)]
    if sites:
        P = max(next(iter(p.prefix.values()))["k"].shape[2] for p in parts
                if p.prefix is not None)
        prefix = {}
        for site in sites:
            L, H, Dh = site_geometry(model_config, site)
            have = [p.prefix is not None and site in p.prefix for p in parts]
            prefix[site] = {
                name: np.concatenate([
                    _left_pad(p.prefix[site][name] if h else None, P, 2, (K, L, 0, H, Dh))
                    for p, K, h in zip(parts, Ks, have)])
                for name in ("k", "v")}
            prefix[site]["mask"] = np.concatenate([
                _mask(K, p.prefix[site]["k"].shape[2] if h else 0, P)
                for p, K, h in zip(parts, Ks, have)])
    return PromptInputs(embeds=embeds, prefix=prefix, embeds_mask=embeds_mask), entries


def _left_pad(x, P: int, axis: int, empty_shape) -> np.ndarray:
    """``x`` (fp32) zero-padded on the left of ``axis`` to length P; None -> all zeros."""
    if x is None:
        shape = list(empty_shape)
        shape[axis] = P
        return np.zeros(shape, np.float32)
    x = np.asarray(x, np.float32)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (P - x.shape[axis], 0)
    return np.pad(x, widths)


def _mask(K: int, n: int, P: int) -> np.ndarray:
    """[K, P] bool: the last n positions real."""
    return np.broadcast_to(np.arange(P) >= P - n, (K, P)).copy()


def rows_prompt(table: PromptInputs, entry_B, slots_BxL=None, slotted_B=None) -> PromptInputs:
    """Each row's prompt material gathered from the table by its entry index:
    embeds [B, P, D], prefix {site: {"k", "v" [L, B, P, H, Dh], "mask" [B, P]}}.
    slots_BxL: where a template puts each row's vectors inside its input (indices into
    the padded table row; -1 elsewhere), slotted_B: the rows whose run has such a template
    (their vectors go only there, never before the input)."""
    embeds = None if table.embeds is None else table.embeds[entry_B]
    embeds_mask = None if table.embeds_mask is None else table.embeds_mask[entry_B]
    if slots_BxL is not None:
        embeds_mask = embeds_mask & (slotted_B == 0)[:, None]
    prefix = None
    if table.prefix is not None:
        prefix = {site: {"k": jnp.swapaxes(d["k"][entry_B], 0, 1),
                         "v": jnp.swapaxes(d["v"][entry_B], 0, 1),
                         "mask": d["mask"][entry_B]}
                  for site, d in table.prefix.items()}
    return PromptInputs(embeds=embeds, prefix=prefix, embeds_mask=embeds_mask,
                        slots=slots_BxL)


def _batch_prompt(table, rows: dict) -> PromptInputs:
    """A batch's prompt inputs from its "entry" (and "slots", "slotted") columns, popped
    from ``rows``."""
    return rows_prompt(table, rows.pop("entry"), rows.pop("slots", None),
                       rows.pop("slotted", None))


def uses_slots(method) -> bool:
    """Whether a method's template(s) put soft tokens inside the input (``slots``)."""
    return any(parse(t).soft_tokens for t in method.templates)


def mixed_options(model):
    """``sequence_nll``'s options for mixed rows: a left-padded prompt makes key masks
    that are not ones-then-zeros, so padding is never handed to cuDNN as lengths."""
    return dataclasses.replace(model_options(model), right_padded=False)


def class_table(runs, entries, D: int) -> dict:
    """Soft verbalizers' class vectors per entry: {"vectors" [E, C, D] fp32, "mask" [E, C]
    bool} (C: the most classes of any run; zeros and False for a run without), or None
    when no run has one."""
    Cs = [np.shape(run.trainables["verbalizer"])[1] if "verbalizer" in run.trainables
          else 0 for run in runs]
    if not max(Cs):
        return None
    C = max(Cs)
    vectors = np.zeros((len(entries), C, D), np.float32)
    mask = np.zeros((len(entries), C), bool)
    for e, entry in enumerate(entries):
        n = Cs[entry.run]
        if n:
            vectors[e, :n] = np.asarray(runs[entry.run].trainables["verbalizer"][entry.k])
            mask[e, :n] = True
    return {"vectors": vectors, "mask": mask}


@functools.partial(jax.jit, static_argnums=(0,))
def _row_class_scores(model, params, table, classes, batch):
    """Soft-verbalizer rows: each row's class log-probabilities [B, C] from its own
    entry's class vectors (-inf past its run's classes), as ``evaluation``'s soft scores
    alone."""
    rows = dict(batch)
    entry_B, word_mask = rows["entry"], rows.pop("word_mask")
    prompt = _batch_prompt(table, rows)
    h = forward(model, params, rows, prompt, options=mixed_options(model), hidden=True)
    h_BxD = jnp.take_along_axis(h, answer_position(word_mask)[:, None, None], axis=1)[:, 0]
    logits = jnp.einsum("bd,bcd->bc", h_BxD, classes["vectors"][entry_B],
                        preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(jnp.where(classes["mask"][entry_B], logits, -jnp.inf), -1)


@jax.jit
def _gather(table, batch):
    rows = dict(batch)
    return _batch_prompt(table, rows)


@functools.partial(jax.jit, static_argnums=(0,))
def _row_token_scores(model, params, table, batch):
    """Each row's target-token log-probabilities behind its own entry's prompt, [B, T]
    (0 off the targets)."""
    rows = dict(batch)
    prompt = _batch_prompt(table, rows)
    nll, _ = sequence_nll(model, params, rows, prompt, options=mixed_options(model),
                          per_token=True)
    return -nll


@functools.partial(jax.jit, static_argnums=(0,))
def _row_logits(model, params, table, entry_B, input_ids, attention_mask,
                decoder_input_ids, decoder_attention_mask):
    prompt = rows_prompt(table, entry_B)
    module = model.module(options=mixed_options(model))
    args = ((input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, prompt)
            if model.is_encoder_decoder else (input_ids, attention_mask, prompt))
    return module.apply({"params": params}, *args)


def _columns(model) -> tuple:
    """The dev-set arrays a rank-classification forward reads."""
    base = ("input_ids", "input_mask", "targets", "target_mask")
    return base + (("decoder_input_ids",) if model.is_encoder_decoder else ())


def _gen_columns(model) -> tuple:
    """The dev-set arrays greedy decoding reads (GPT-2's are left-padded)."""
    return ("input_ids", "input_mask") if model.is_encoder_decoder else ("gen_ids", "gen_mask")


KINDS = ("rank", "soft", "generate")  # rows that share batches with each other


@dataclasses.dataclass(frozen=True)
class Shape:
    """One kind of batch's fixed layout: {column: width}, and whether it carries the
    "slots"/"slotted" columns (some run's template puts soft tokens inside the input)."""
    widths: dict
    slotted: bool


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Serving shapes (``MultiRun.buckets``): batch sizes (rows), each kind's Shape,
    the new tokens every decoding batch runs for."""
    sizes: tuple
    shapes: dict
    new_tokens: int


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Requests of one (run, member), checked and encoded: their dev set, the entry's
    arrays (``MultiRun._member_arrays``), their kind (``KINDS``) and positions in the
    request list."""
    run: int
    k: int
    entry: int
    dev: object
    arrays: dict
    kind: str
    positions: tuple


def _pad_to(x: np.ndarray, width: int, left: bool = False, fill: int = 0) -> np.ndarray:
    extra = width - x.shape[1]
    return np.pad(x, [(0, 0), (extra, 0) if left else (0, extra)], constant_values=fill)


class MultiRun:
    """Trained runs (``TrainedRun``, from ``ptjax.load_run`` or ``load_runs``) of prompt
    tuning, P-tuning or prefix tuning on one frozen model, run through it together.

    runs: the runs in order; model: the shared frozen model; entries: (run, member k) of
    each row of the prompt table (``prompt_table``), run-major.
    """

    def __init__(self, runs):
        runs = list(runs)
        if not runs:
            raise PtjaxError("MultiRun needs at least one trained run")
        for run in runs:
            check_mixable(run)
        first = runs[0]
        for run in runs[1:]:
            same = (run.model is first.model
                    or model_key(run.config) == model_key(first.config))
            if not same or run.model.config != first.model.config:
                raise _different_models(first.run_dir, first.config, run.run_dir,
                                        run.config)
        self.runs = tuple(runs)
        self.model = first.model
        self.mesh = first.mesh
        table, self.entries = prompt_table(runs, self.model.config)
        self._entry = {(e.run, e.k): i for i, e in enumerate(self.entries)}
        # a template's slot j is row j + shift of its entry's left-padded table row
        self._shift = ([0] * len(self.entries) if table.embeds_mask is None
                       else (~table.embeds_mask).sum(1).tolist())
        # on the devices once (replicated), not sent with every batch
        self.table = self._place(table)
        self.classes = self._place(class_table(runs, self.entries,
                                               self.model.config.hidden_size))
        self._tasks = {}

    # ------------------------------------------------------------------ lookups

    def index(self, run) -> int:
        """A run given as its index, its run directory or its dev task's name (when one
        run has it)."""
        if isinstance(run, (int, np.integer)):
            if not 0 <= run < len(self.runs):
                raise PtjaxError(f"run {run} is not one of these runs; valid: 0.."
                                 f"{len(self.runs) - 1}")
            return int(run)
        by_dir = [i for i, r in enumerate(self.runs)
                  if os.path.normpath(r.run_dir) == os.path.normpath(str(run))]
        by_task = [i for i, r in enumerate(self.runs)
                   if dev_task_config(r.config).name == run]
        if by_dir or len(by_task) == 1:
            return (by_dir or by_task)[0]
        why = "names several runs' task" if by_task else "is not one of these runs"
        raise PtjaxError(f"run {run!r} {why}; give a run directory: "
                         + ", ".join(r.run_dir for r in self.runs))

    def entry(self, run, k: int | None = None) -> int:
        """The table row of member k of a run (default: its best member)."""
        i = self.index(run)
        k = self.runs[i].best_member if k is None else k
        if (i, k) not in self._entry:
            raise PtjaxError(f"{self.runs[i].run_dir}: k={k} is not a member of this run; "
                             f"valid: 0..{self.runs[i].K - 1}")
        return self._entry[(i, k)]

    def _place(self, tree):
        if tree is None:
            return None
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.tree.map(lambda x: sharding.place(np.asarray(x), sharding.replicated(
            self.mesh)), tree)

    def _put(self, batch: dict) -> dict:
        return batch if self.mesh is None else sharding.replicated_batch(batch, self.mesh)

    # ------------------------------------------------------------------ forward

    def logits(self, input_ids, entries, *, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None):
        """fp32 logits [B, T, vocab] as ``TrainedRun.logits``, row b behind member k of run
        r for ``entries[b] = (r, k)`` (r: index, run directory or task name)."""
        entry_B = np.asarray([self.entry(r, k) for r, k in entries], np.int32)
        for e in sorted(set(entry_B.tolist())):
            run = self.runs[self.entries[e].run]
            if uses_slots(run.method):
                raise PtjaxError(f"{run.run_dir}: its template puts soft tokens inside the "
                                 "input ({soft:N}); logits takes runs whose prompts are "
                                 "prepended (evaluate and score take both)")
        B, L = np.shape(input_ids)
        if len(entry_B) != B:
            raise PtjaxError(f"entries has {len(entry_B)} (run, member) pairs for {B} rows")
        if attention_mask is None:
            attention_mask = np.ones((B, L), np.int32)
        if self.model.is_encoder_decoder and decoder_input_ids is None:
            raise PtjaxError("T5 needs decoder_input_ids ([B, T] ids starting with "
                             "decoder_start_token_id="
                             f"{self.model.config.decoder_start_token_id})")
        return _row_logits(self.model, self.model.params, self.table, entry_B,
                           input_ids, attention_mask, decoder_input_ids,
                           decoder_attention_mask)

    def _batches(self, columns: dict, batch_size: int, sizes=None):
        """(batch, n_valid) of ``batch_size`` rows, or of the bucket ``sizes``."""
        if sizes:
            return pipeline.bucketed_batches(columns, sizes)
        return pipeline.eval_batches(columns, rows_per_batch(batch_size, self.mesh))

    def _token_scores(self, columns: dict, batch_size: int, sizes=None) -> np.ndarray:
        """Target-token log-probabilities [R, T] of rows that carry an "entry" column
        (with a "word_mask" column: soft-verbalizer rows, class log-probabilities [R, C]),
        in fixed-size batches (one compile per width), or batches of the bucket sizes."""
        if "word_mask" in columns:
            fn = functools.partial(_row_class_scores, self.model, self.model.params,
                                   self.table, self.classes)
        else:
            fn = functools.partial(_row_token_scores, self.model, self.model.params,
                                   self.table)
        out = [sharding.to_host(fn(self._put(b)))[:n]
               for b, n in self._batches(columns, batch_size, sizes)]
        return np.concatenate(out)

    def _pack(self, parts, left: bool = False, shape: Shape | None = None
              ) -> tuple[dict, list]:
        """Rows of several (entry, arrays) parts, padded to common widths (on the right,
        or the left for GPT-2's decoding inputs) and interleaved (row j of every part,
        then row j + 1, ...) -> (columns, where: each part's row indices into them).
        shape: fixed widths (and slots columns whether or not a part has them), so that
        batches of any parts have one shape (serving); default: the parts' widest."""
        names = [c for c in parts[0][1] if c not in ("slots", "slotted")]
        widths = {c: max(a[c].shape[1] for _, a in parts) for c in names}
        if shape is not None:
            for c, w in widths.items():
                if w > shape.widths[c]:
                    raise PtjaxError(f"a request's {c} is {w} wide, over its bucket's "
                                     f"{shape.widths[c]}")
            widths = dict(shape.widths)
        sizes = [len(a[names[0]]) for _, a in parts]
        part_of = np.concatenate([np.full(n, p) for p, n in enumerate(sizes)])
        local = np.concatenate([np.arange(n) for n in sizes])
        order = np.lexsort((part_of, local))  # by local row, then part
        columns = {c: np.concatenate([_pad_to(np.asarray(a[c]), widths[c], left)
                                      for _, a in parts])[order] for c in names}
        if (shape.slotted if shape is not None else any("slots" in a for _, a in parts)):
            # as wide as the ids; -1: no vector
            ids = names[0]
            columns["slots"] = np.concatenate([
                _pad_to(a["slots"], widths[ids], left, -1) if "slots" in a
                else np.full((n, widths[ids]), -1, np.int32)
                for (_, a), n in zip(parts, sizes)])[order]
            columns["slotted"] = np.concatenate([
                np.full(n, int("slots" in a), np.int32) for (_, a), n in zip(parts, sizes)
            ])[order]
        columns["entry"] = np.concatenate([np.full(n, e, np.int32)
                                           for (e, _), n in zip(parts, sizes)])[order]
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        starts = np.cumsum([0] + sizes)
        return columns, [position[a:b] for a, b in zip(starts[:-1], starts[1:])]

    # ------------------------------------------------------------------ evaluation

    def dev_sets(self, split: str = "validation") -> list:
        """Each run's dev set, as ``ptjax eval`` builds it."""
        return [run_dev_set(run.model, run.method, run.config, split, self._task(run, split))
                for run in self.runs]

    def _task(self, run, split: str):
        key = (run.run_dir, split)
        if key not in self._tasks:
            self._tasks[key] = load_task(dev_task_config(run.config), splits=(split,))
        return self._tasks[key]

    def _member_arrays(self, dev, entry: int) -> dict:
        """An entry's rows of its run's dev set (several templates: its member's own
        layout, ``[:, k]``), with a template's soft slots as indices into its padded table
        row ("slots")."""
        k = self.entries[entry].k
        rank = dev.mode == "rank"
        names = _columns(self.model) if rank else _gen_columns(self.model)
        slots = "slots" if rank or self.model.is_encoder_decoder else "gen_slots"
        pick = ((lambda a: a[:, k]) if dev.arrays["input_ids"].ndim == 3
                else (lambda a: a))
        out = {c: pick(dev.arrays[c]) for c in names}
        if dev.soft:  # a soft verbalizer reads the hidden state at each row's answer
            out["word_mask"] = pick(dev.word_mask).astype(np.int32)
        if slots in dev.arrays:
            s = pick(dev.arrays[slots])
            out["slots"] = np.where(s >= 0, s + self._shift[entry], -1).astype(np.int32)
        return out

    def scores(self, split: str = "validation", batch_size: int | None = None,
               devs=None) -> list:
        """Every rank-classification run's scores as ``evaluation.predict`` computes them
        alone: [K, rows] summed log-likelihoods, [K, rows, T] token log-probabilities with
        a verbalizer, [K, examples, C] class log-probabilities with a soft one; one per
        run, in order (None for a run decoded greedily)."""
        devs = self.dev_sets(split) if devs is None else devs
        out = [None] * len(devs)
        for soft in (False, True):  # soft verbalizers read hidden states: batches of their own
            entries = [e for e in self.entries
                       if devs[e.run].mode == "rank" and devs[e.run].soft == soft]
            if not entries:
                continue
            columns, where = self._pack([(self._entry[(e.run, e.k)],
                                          self._member_arrays(devs[e.run],
                                                              self._entry[(e.run, e.k)]))
                                         for e in entries])
            values = self._token_scores(columns, batch_size or self.batch_size)
            rows = {(e.run, e.k): w for e, w in zip(entries, where)}
            for i in {e.run for e in entries}:
                dev = devs[i]
                width = len(dev.verbalizer) if soft else dev.arrays["targets"].shape[-1]
                per = np.stack([values[rows[(i, k)], :width]
                                for k in range(self.runs[i].K)])  # [K, rows, T or C]
                out[i] = per if dev.verbalizer else per.sum(-1)
        return out

    def texts(self, split: str = "validation", batch_size: int | None = None,
              devs=None) -> list:
        """Every greedily decoded run's answers as ``evaluation.predict`` gives them alone:
        K lists of N strings; one per run, in order (None for a rank-classification run).
        Rows of every such run share the decoding batches, for as many new tokens as the
        longest task.max_target_length; each row's output is cut to its run's own."""
        devs = self.dev_sets(split) if devs is None else devs
        out = [None] * len(devs)
        entries = [e for e in self.entries if devs[e.run].mode == "generate"]
        if not entries:
            return out
        columns, where = self._pack([(self._entry[(e.run, e.k)],
                                      self._member_arrays(devs[e.run],
                                                          self._entry[(e.run, e.k)]))
                                     for e in entries], left=not self.model.is_encoder_decoder)
        lengths = {i: self.runs[i].config.task.max_target_length for i in
                   {e.run for e in entries}}
        tokens = self._decode(columns, max(lengths.values()),
                              batch_size or self.batch_size)
        for i in lengths:
            out[i] = [[t.strip() for t in self.model.tokenizer.batch_decode(
                tokens[w, :lengths[i]], skip_special_tokens=True)]
                for e, w in zip(entries, where) if e.run == i]
        return out

    def _decode(self, columns: dict, max_new_tokens: int, batch_size: int,
                sizes=None) -> np.ndarray:
        """Greedy ids [R, max_new_tokens] of rows carrying an "entry" column."""
        ids, mask = _gen_columns(self.model)
        out = []
        for b, n in self._batches(columns, batch_size, sizes):
            b = self._put(b)
            prompt = _gather(self.table, {c: b[c] for c in ("entry", "slots", "slotted")
                                          if c in b})
            out.append(sharding.to_host(self.model.generate(
                self.model.params, b[ids], attention_mask=b[mask], prompt=prompt,
                max_new_tokens=max_new_tokens))[:n])
        return np.concatenate(out)

    @property
    def batch_size(self) -> int:
        """Rows per shared batch: the largest of the runs' train.eval_batch_size."""
        return max(run.config.train.eval_batch_size for run in self.runs)

    def predict(self, split: str = "validation", batch_size: int | None = None,
                devs=None) -> list:
        """Every run's ``evaluation.Predictions`` (K members' answers), in order."""
        devs = self.dev_sets(split) if devs is None else devs
        scores = self.scores(split, batch_size, devs)
        texts = self.texts(split, batch_size, devs)
        return [Predictions(t) if t is not None
                else soft_predictions(dev, s) if dev.soft else rank_predictions(dev, s)
                for dev, s, t in zip(devs, scores, texts)]

    def evaluate(self, split: str = "validation", batch_size: int | None = None) -> dict:
        """{run_dir: {metric: [K]}}: each run's metrics, equal to ``ptjax eval RUN_DIR``'s."""
        devs = self.dev_sets(split)
        return {run.run_dir: score(dev, preds.texts)
                for run, dev, preds in zip(self.runs, devs, self.predict(split, batch_size,
                                                                         devs))}

    # ------------------------------------------------------------------ requests

    def score(self, requests, batch_size: int | None = None) -> list[dict]:
        """Rank scores of requests of any runs, in shared batches.

        requests: [{"run": index | run directory | task name, "inputs": text, "fields":
          {name: text} (a template's fields, optional), "candidates": [...] (optional,
          per-example candidates), "k": member (optional, default the run's best)}].
        -> per request {"run": run_dir, "k", "classes": candidates in order, "scores":
          their log-likelihoods (a verbalizer: class scores), "probabilities": softmax of
          the scores, "prediction": the best class}.
        """
        return self._answer_requests(requests, "rank", batch_size)

    def generate(self, requests, batch_size: int | None = None) -> list[dict]:
        """Greedy answers to requests of runs decoded greedily, in shared batches (as
        ``ptjax eval`` decodes their dev sets: task.max_target_length new tokens).

        requests: as ``score``'s (without candidates) -> per request {"run": run_dir,
        "k", "text"}."""
        return self._answer_requests(requests, "generate", batch_size)

    def _answer_requests(self, requests, mode, batch_size) -> list[dict]:
        prepared = self.prepare(requests, mode)
        out = [None] * len(requests)
        for prep, answers in zip(prepared, self.answer(prepared, batch_size)):
            for n, a in zip(prep.positions, answers):
                out[n] = a
        return out

    def prepare(self, requests, mode: str | None = None) -> list[Prepared]:
        """Requests checked and encoded (one-line errors naming the request), grouped by
        (run, member): what ``answer`` runs. mode: "rank" or "generate" to refuse runs
        of the other kind (None: each run's own)."""
        groups = {}  # (run index, k) -> request positions
        for n, req in enumerate(requests):
            if not isinstance(req, dict) or "run" not in req or "inputs" not in req:
                have = ", ".join(sorted(req)) if isinstance(req, dict) else type(req).__name__
                raise PtjaxError(f"request {n} needs 'run' and 'inputs'; it has "
                                 f"{have or 'nothing'}")
            i = self.index(req["run"])
            k = self.runs[i].best_member if req.get("k") is None else req["k"]
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
                raise PtjaxError(f"request {n}: k={k!r} is not an integer; valid: 0.."
                                 f"{self.runs[i].K - 1}")
            self.entry(i, int(k))  # a one-line error for a member the run has not
            groups.setdefault((i, int(k)), []).append(n)
        out = []
        for (i, k), members in groups.items():
            dev = self._request_dev(i, [requests[n] for n in members], mode)
            entry = self._entry[(i, k)]
            kind = "generate" if dev.mode == "generate" else "soft" if dev.soft else "rank"
            out.append(Prepared(i, k, entry, dev, self._member_arrays(dev, entry), kind,
                                tuple(members)))
        return out

    def answer(self, prepared, batch_size: int | None = None,
               buckets: Buckets | None = None) -> list[list[dict]]:
        """Each prepared group's answers (``score``'s or ``generate``'s dicts), its rows
        run in shared batches: rank rows, soft-verbalizer rows and decoded rows each in
        batches of their own. buckets: fixed widths and batch sizes (``buckets``), so
        that no batch has a shape unseen after ``warm_up``; default: batch_size rows
        (the runs' eval batch size) as wide as the widest."""
        out = [None] * len(prepared)
        for kind in KINDS:
            chosen = [p for p, prep in enumerate(prepared) if prep.kind == kind]
            if not chosen:
                continue
            values = self._run_kind(kind, [prepared[p] for p in chosen], batch_size,
                                    buckets)
            for p, rows in zip(chosen, values):
                out[p] = (self._texts(prepared[p], rows) if kind == "generate"
                          else self._rank_answers(prepared[p], rows))
        return out

    def _run_kind(self, kind, prepared, batch_size, buckets) -> list:
        """The rows of prepared groups of one kind through the model -> per group its
        rows' values (token scores, class scores, or greedy ids)."""
        columns, where = self._pack(
            [(p.entry, p.arrays) for p in prepared],
            left=kind == "generate" and not self.model.is_encoder_decoder,
            shape=None if buckets is None else buckets.shapes[kind])
        sizes = None if buckets is None else buckets.sizes
        batch_size = batch_size or self.batch_size
        if kind == "generate":
            new = (buckets.new_tokens if buckets is not None else
                   max(self.runs[p.run].config.task.max_target_length for p in prepared))
            values = self._decode(columns, new, batch_size, sizes)
        else:
            values = self._token_scores(columns, batch_size, sizes)
        return [values[rows] for rows in where]

    def _rank_answers(self, prep: Prepared, values) -> list[dict]:
        dev, run = prep.dev, self.runs[prep.run]
        if dev.soft:
            preds = soft_predictions(dev, values[:, :len(dev.verbalizer)][None])
        else:
            per = values[:, :dev.arrays["targets"].shape[-1]][None]
            preds = rank_predictions(dev, per if dev.verbalizer else per.sum(-1))
        bounds = np.cumsum([0] + [len(c) for c in dev.candidates])
        out = []
        for j in range(len(dev.examples)):
            s = np.asarray(preds.scores[0][bounds[j]:bounds[j + 1]], np.float64)
            p = np.exp(s - s.max())
            out.append({"run": run.run_dir, "k": prep.k, "classes": list(dev.candidates[j]),
                        "scores": s.tolist(), "probabilities": (p / p.sum()).tolist(),
                        "prediction": preds.texts[0][j]})
        return out

    def _texts(self, prep: Prepared, tokens) -> list[dict]:
        """Greedy ids cut to the run's task.max_target_length, as text (``texts``)."""
        run = self.runs[prep.run]
        texts = self.model.tokenizer.batch_decode(
            tokens[:, :run.config.task.max_target_length], skip_special_tokens=True)
        return [{"run": run.run_dir, "k": prep.k, "text": t.strip()} for t in texts]

    # ------------------------------------------------------------------ serving shapes

    def sample(self, i: int) -> Prepared:
        """Run i's first validation example as a prepared request (for ``buckets`` and
        ``warm_up``)."""
        ex = self._task(self.runs[i], "validation").split("validation")[0]
        req = {"run": i, "inputs": ex["inputs"], "fields": ex.get("fields") or {},
               **({"candidates": ex["candidates"]} if ex.get("candidates") else {})}
        return self.prepare([req])[0]

    def buckets(self, sizes, samples=None) -> Buckets:
        """Fixed shapes for serving: batches of ``sizes`` rows (each a multiple of the
        mesh's data axis), every kind's columns as wide as its widest run's (a run's
        widths are fixed by its config: task.max_input_length, max_target_length, its
        template's soft tokens), decoding the most new tokens of any run.
        samples: a prepared request of each run (default ``sample``)."""
        samples = [self.sample(i) for i in range(len(self.runs))] if samples is None \
            else samples
        sizes = tuple(sorted({rows_per_batch(int(s), self.mesh) for s in sizes}))
        shapes = {}
        for kind in KINDS:
            mine = [p for p in samples if p.kind == kind]
            if mine:
                names = [c for c in mine[0].arrays if c != "slots"]
                shapes[kind] = Shape({c: max(p.arrays[c].shape[1] for p in mine)
                                      for c in names},
                                     any("slots" in p.arrays for p in mine))
        new = max([self.runs[p.run].config.task.max_target_length for p in samples
                   if p.kind == "generate"] or [0])
        return Buckets(sizes, shapes, new)

    def warm_up(self, buckets: Buckets, samples=None) -> None:
        """Compiles every (kind, size) of ``buckets``: batches of copies of each run's
        sample rows, so that serving requests of these runs compiles nothing new."""
        samples = [self.sample(i) for i in range(len(self.runs))] if samples is None \
            else samples
        for kind in buckets.shapes:
            mine = [p for p in samples if p.kind == kind]
            columns, _ = self._pack([(p.entry, p.arrays) for p in mine],
                                    left=kind == "generate" and not
                                    self.model.is_encoder_decoder,
                                    shape=buckets.shapes[kind])
            rows = len(columns["entry"])
            for size in buckets.sizes:
                batch = pipeline.take(columns, np.arange(size) % rows)
                if kind == "generate":
                    self._decode(batch, buckets.new_tokens, size, (size,))
                else:
                    self._token_scores(batch, size, (size,))

    def _request_dev(self, i: int, requests, mode: str | None = None):
        """Requests of run i as a dev set of its task (targets stand in: not scored).
        mode: the kind of run asked for ("rank", "generate"; None: either)."""
        run = self.runs[i]
        task = self._task(run, "validation")
        tcfg = dev_task_config(run.config)
        stand_in = tcfg.verbalizer[0][0] if tcfg.verbalizer else "<unk>"
        examples = [{"inputs": str(r["inputs"]), "fields": dict(r.get("fields") or {}),
                     "targets": stand_in,
                     **({"candidates": list(r["candidates"])} if r.get("candidates")
                        else {})} for r in requests]
        task = dataclasses.replace(task, splits={"validation": examples})
        dev = run_dev_set(run.model, run.method, run.config, "validation", task)
        if mode == "rank" and dev.mode != "rank":
            raise PtjaxError(f"{run.run_dir}: task {tcfg.name!r} has no labels or candidates "
                             "to score (it is decoded greedily); score takes rank "
                             "classification runs")
        if mode == "generate" and dev.mode != "generate":
            raise PtjaxError(f"{run.run_dir}: task {tcfg.name!r} is scored by rank "
                             "classification (task.eval_mode); generate takes runs decoded "
                             "greedily")
        return dev
