"""Automatic templates: LM-BFF's automatic template generation (Gao, Fisch & Chen 2021,
"Making Pre-trained Language Models Better Few-shot Learners", section 5.2) with the run's
T5, ranked on dev (``ptjax template``).

A shape lays out an example, its label word and the spans T5 fills, e.g. the paper's
``<S1> <X> M(y) <Y>`` is ``"{inputs} {fill} {mask} {fill}"``: ``{mask}`` is where the
label word M(y) stands (and, in the template made of it, where the answer goes), fill j is
T5's sentinel <extra_id_j>. For a shape with F fills:

1. every train example (x, y) becomes the T5 input T_g(x, y): the shape with the class's
   label word (its first in task.verbalizer, else the class name) at {mask} and
   <extra_id_0> .. <extra_id_{F-1}> at the fills;
2. one output T = t_1 .. t_m, the fills separated by <extra_id_1> .. and ended by
   <extra_id_F>, is decoded for all examples at once: beam search (``--beam``, LM-BFF:
   100) whose score of a partial output is the paper's objective
   sum over (x, y) in D_train of log P_T5(t_1 .. t_j | T_g(x, y)),
   each term the model's own log-softmax (the decoder starts with <extra_id_0>, as
   span-corruption targets do); ``generate.beam_search`` (transformers' beam search with
   no length penalty) runs it on beam x example rows;
3. each finished output's fills go into the shape: a ptjax template string with the
   example's fields and {mask};
4. the templates of every shape are ranked by the zero-shot dev metric of the frozen model
   behind them (rank classification over the task's labels, ``ptjax.evaluation``; LM-BFF
   fine-tunes a model per template and ranks by dev after it; not done here).

What a beam may emit: ordinary tokens of the vocabulary and, in order, the next sentinel
(<extra_id_1> after fill 0, ...); pad, EOS, unk and other sentinels never (they have no
place in a template). Removing a token removes it from the search, not from the
distribution: the scores stay the model's log-probabilities. LM-BFF's code averages the
logits over examples and forbids three SentencePiece ids; ptjax follows the paper's sum
of log-probabilities.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.autoverbalizer import few_shot, labels_of
from ptjax.config.load import parse_yaml
from ptjax.data import templates
from ptjax.data.encoding import tokenize
from ptjax.data.tasks import load_task
from ptjax.errors import PtjaxError
from ptjax.evaluation import build_dev_set, evaluate, metric_names
from ptjax.models import t5
from ptjax.models.generate import beam_search, decoding
from ptjax.models.named import TINY, load_run_model
from ptjax.taskdata import encoding, verbalizing

METHOD = "LM-BFF automatic template generation with T5 (Gao et al. 2021)"
FINAL_CHOICE = ("zero-shot dev metric of the frozen model behind each generated template "
                "(LM-BFF fine-tunes a model per template and ranks by dev after it; not "
                "done here)")
# LM-BFF's single-sentence shapes: <S1> <X> M(y) <Y>, <S1> <X> M(y), <X> M(y) <Y> <S1>
SHAPES = ("{inputs} {fill} {mask} {fill}", "{inputs} {fill} {mask}",
          "{fill} {mask} {fill} {inputs}")
FILL = "{fill}"
_SENTINEL = re.compile(r"<extra_id_\d+>")
_NEG = -1.0e9  # generate's rule-out score: beams at or below half of it are not outputs


# ---------------------------------------------------------------- shapes and templates


def sentinel(j: int) -> str:
    return f"<extra_id_{j}>"


def escape(text: str) -> str:
    """Text as template text: braces doubled."""
    return text.replace("{", "{{").replace("}", "}}")


def check_shape(shape: str) -> int:
    """The number of fills of a shape, or one line: it needs one {mask}, at least one
    {fill}, a field of the example, and no soft slots."""
    fills = shape.count(FILL)
    if fills == 0:
        raise PtjaxError(f"--shape {shape!r} has no {FILL}; T5 fills the spans marked "
                         f"{FILL} (e.g. {SHAPES[0]!r})")
    t = templates.parse(shape.replace(FILL, "x"), "--shape")
    if not t.has_mask:
        raise PtjaxError(f"--shape {shape!r} has no {{mask}}, where the label word stands "
                         f"(e.g. {SHAPES[0]!r})")
    if t.soft_tokens:
        raise PtjaxError(f"--shape {shape!r} has soft slots; T5 reads the shape as text")
    return fills


def generation_template(shape: str, word: str) -> str:
    """T_g for a class: the shape with ``word`` at {mask} and <extra_id_j> at fill j, as a
    template string (its {FIELD}s filled per example by ``tokenize``)."""
    parts = shape.split(FILL)
    out = parts[0]
    for j, part in enumerate(parts[1:]):
        out += sentinel(j) + part
    return out.replace("{mask}", escape(word))


def to_template(shape: str, fills: list[str]) -> str:
    """The shape with fill j replaced by ``fills[j]`` (escaped), spaces collapsed."""
    parts = shape.split(FILL)
    out = parts[0]
    for text, part in zip(fills, parts[1:]):
        out += f" {escape(text)} " + part
    return re.sub(r"\s+", " ", out).strip()


def label_words(tcfg, classes) -> list[str]:
    """M(c) per class: its first word in task.verbalizer, else the class itself."""
    first = {c: words[0] for c, words in tcfg.verbalizer}
    return [first.get(c, c) for c in classes]


# ---------------------------------------------------------------- the joint beam search


def sentinel_ids(model, n: int) -> list[int]:
    """Ids of <extra_id_0> .. <extra_id_{n-1}>; one line when the tokenizer lacks one."""
    tok = model.tokenizer
    out = []
    for j in range(n):
        i = tok.convert_tokens_to_ids(sentinel(j))
        if i is None or i == tok.unk_token_id or i >= model.config.vocab_size:
            raise PtjaxError(f"the tokenizer of {model.path} has no {sentinel(j)} token; a "
                             f"shape with {n - 1} fill(s) needs <extra_id_0> .. "
                             f"{sentinel(n - 1)}")
        out.append(int(i))
    return out


def ordinary_tokens(model) -> np.ndarray:
    """[vocab_size] bool: the ids a fill may hold: the tokenizer's, none of its special
    ones (pad, EOS, unk, sentinels), not the embedding's padding rows."""
    V, tok = model.config.vocab_size, model.tokenizer
    ok = np.zeros(V, bool)
    ok[:min(len(tok), V)] = True
    special = set(tok.all_special_ids) | {i for t, i in tok.get_vocab().items()
                                          if _SENTINEL.fullmatch(t)}
    ok[[i for i in special if i < V]] = False
    return ok


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("max_new_tokens",))
def _joint(model, dec, params, input_ids, input_mask, allowed, sentinels, *, max_new_tokens):
    """The beam search of the module docstring on E inputs [E, L]: ids [N, T] and summed
    scores [N] of the N finished beams, best first. allowed [V] bool: ordinary tokens a
    fill may hold; sentinels [F + 1]: <extra_id_0> .. <extra_id_F> (the last ends)."""
    cfg, N, T = model.config, dec.num_beams, max_new_tokens
    E = input_ids.shape[0]
    module = t5.T5(cfg, model.dtype, options=model.options())
    variables = {"params": params}
    enc, enc_mask = module.apply(variables, input_ids, input_mask, method=t5.T5.encode)
    enc, enc_mask = jnp.tile(enc, (N, 1, 1)), jnp.tile(enc_mask, (N, 1))  # row n*E + e
    cache = t5.init_cache(cfg, N * E, T + 1, enc.shape[1], model.dtype)
    start = jnp.stack([jnp.full((N * E,), cfg.decoder_start_token_id, jnp.int32),
                       jnp.full((N * E,), sentinels[0], jnp.int32)], 1)
    logits, cache = t5.T5(cfg, model.dtype, prefill=True, options=model.options()).apply(
        variables, start, None, enc, enc_mask, cache, 0, method=t5.T5.decode)
    F = sentinels.shape[0] - 1

    def scores(logits_RxV, count_N, i):
        """Summed log-probs [N, V] of token i, the tokens a beam may not emit ruled out:
        sentinels but the next; any other token once the sentinels still to come need
        every place left."""
        lp = jax.nn.log_softmax(logits_RxV.astype(jnp.float32), -1)
        total = lp.reshape(N, E, -1).sum(1)
        nxt = sentinels[jnp.minimum(count_N + 1, F)]  # the next sentinel only
        free = (T - i > F - count_N)[:, None]
        ok = (allowed[None, :] & free) | (jnp.arange(total.shape[1])[None, :] == nxt[:, None])
        return jnp.where(ok, total, -jnp.inf)

    def by_beam(c):  # [L, N*E, ...] <-> [L, N, E, ...]: rows follow the beams
        return jax.tree.map(lambda x: x.reshape(x.shape[0], N, E, *x.shape[2:]), c)

    def flat(c):
        return jax.tree.map(lambda x: x.reshape(x.shape[0], N * E, *x.shape[3:]), c)

    def step(carry, token_N, i):
        count = carry["count"][0] + jnp.isin(token_N, sentinels[1:]).astype(jnp.int32)
        logits, c = module.apply(variables, jnp.repeat(token_N, E)[:, None], None, enc,
                                 enc_mask, flat(carry["cache"]), i + 1, method=t5.T5.decode)
        return scores(logits[:, -1], count, i), {"cache": by_beam(c), "count": count[None]}

    carry = {"cache": by_beam(cache), "count": jnp.zeros((1, N), jnp.int32)}
    first = scores(logits[:, -1], carry["count"][0], 0)
    return beam_search(dec, step, first, T, sentinels[F], cfg.pad_token_id, carry,
                       normalize=False)


def joint_beam_search(model, input_ids, input_mask, n_fills: int, beam: int,
                      max_new_tokens: int, allowed=None) -> list[tuple[list[int], float]]:
    """The finished outputs of the joint beam search, best first: [(ids up to and with
    <extra_id_F>, summed log-probability)]; every output is complete within
    ``max_new_tokens`` (its sentinels are forced once they need every place left).
    input_ids / input_mask [E, L]; allowed [V] bool (default
    ``ordinary_tokens``)."""
    if beam < 1:
        raise PtjaxError(f"--beam {beam}: must be at least 1")
    if max_new_tokens < n_fills:
        raise PtjaxError(f"--max-tokens {max_new_tokens}: {n_fills} fill(s) need at least "
                         f"{n_fills} tokens (their sentinels)")
    sentinels = sentinel_ids(model, n_fills + 1)
    allowed = ordinary_tokens(model) if allowed is None else np.asarray(allowed, bool)
    dec = decoding(num_beams=beam, num_return_sequences=beam, length_penalty=0.0)
    ids, score = _joint(model, dec, model.params, jnp.asarray(input_ids, jnp.int32),
                        jnp.asarray(input_mask, bool), jnp.asarray(allowed),
                        jnp.asarray(sentinels, jnp.int32), max_new_tokens=max_new_tokens)
    out = []
    for row, s in zip(np.asarray(ids), np.asarray(score)):
        ends = np.nonzero(row == sentinels[-1])[0]
        if s > _NEG / 2 and len(ends):
            out.append(([int(i) for i in row[:ends[0] + 1]], float(s)))
    return out


def split_fills(ids: list[int], sentinels: list[int]) -> list[list[int]]:
    """A finished output (``joint_beam_search``) -> the token ids of each fill."""
    fills, cur = [], []
    for i in ids:
        if i in sentinels[1:]:
            fills.append(cur)
            cur = []
        else:
            cur.append(i)
    return fills


# ---------------------------------------------------------------- the search


def generation_inputs(model, shape: str, examples, labels_N, words, max_input_length: int):
    """T_g(x, y) of every example as T5 inputs: ids and mask [E, L] (L: the longest)."""
    rows = [None] * len(examples)
    for c, word in enumerate(words):
        idx = [i for i in range(len(examples)) if labels_N[i] == c]
        t = templates.parse(generation_template(shape, word), "--shape")
        for i, (ids, _, _) in zip(idx, tokenize(model, [examples[i] for i in idx],
                                                max_input_length, 2, (), t)):
            rows[i] = ids
    L = max(map(len, rows))
    ids = np.full((len(rows), L), model.config.pad_token_id, np.int32)
    mask = np.zeros((len(rows), L), bool)
    for r, seq in enumerate(rows):
        ids[r, :len(seq)], mask[r, :len(seq)] = seq, True
    return ids, mask


def generate(model, shape: str, examples, labels_N, words, beam: int, max_new_tokens: int,
             max_input_length: int) -> list[dict]:
    """The shape's generated templates, best first: [{"template", "shape", "fills",
    "score" (summed log-prob), "mean_score" (per example)}]."""
    F = check_shape(shape)
    ids, mask = generation_inputs(model, shape, examples, labels_N, words, max_input_length)
    sentinels = sentinel_ids(model, F + 1)
    out = []
    for seq, score in joint_beam_search(model, ids, mask, F, beam, max_new_tokens):
        fills = [model.tokenizer.decode(f, skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False).strip()
                 for f in split_fills(seq, sentinels)]
        out.append({"template": to_template(shape, fills), "shape": shape, "fills": fills,
                    "score": score, "mean_score": score / len(examples)})
    return out


def dev_metrics(model, tcfg, task, template: str, batch_size: int = 32):
    """The frozen model's dev metrics behind ``template`` ({metric: value}), rank
    classification over the task's labels with task.verbalizer, as training evaluates."""
    t = dataclasses.replace(tcfg, template=template, templates=())
    dev = build_dev_set(model, task, "rank", tcfg.max_input_length, tcfg.max_target_length,
                        **encoding(model, t), **verbalizing(t))
    values = evaluate(model, None, None, model.params, dev, batch_size, 1)
    return dev, {m: float(v[0]) for m, v in values.items()}


@dataclasses.dataclass
class Search:
    """What ``search`` found: ``templates`` [{"template", "shape", "fills", "score",
    "mean_score", "dev": {metric: value}}] ranked by the dev ``metric`` (ties: the better
    generation score first)."""
    templates: list
    metric: str

    @property
    def best(self) -> str:
        return self.templates[0]["template"]


def search(model, tcfg, task, classes, train, train_labels, shapes, beam: int,
           max_new_tokens: int, metric: str = "", batch_size: int = 32) -> Search:
    """Steps 1-4 of the module docstring; ``task`` gives the dev split; metric "" = the
    task's own selection metric."""
    words = label_words(tcfg, classes)
    for c, name in enumerate(classes):
        if not np.any(train_labels == c):
            raise PtjaxError(f"class {name!r} has no train examples; every class's label "
                             "word goes into the generation")
    found, seen = [], set()
    for shape in shapes:
        for row in generate(model, shape, train, train_labels, words, beam, max_new_tokens,
                            tcfg.max_input_length):
            if row["template"] not in seen:  # two fills may read back as one text
                seen.add(row["template"])
                found.append(row)
    if not found:
        raise PtjaxError(f"no output finished within --max-tokens {max_new_tokens}; raise it")
    for row in found:
        dev, row["dev"] = dev_metrics(model, tcfg, task, row["template"],
                                      batch_size=batch_size)
    metric = metric or dev.select
    if metric not in row["dev"]:
        raise PtjaxError(f"train.metric={metric!r} is not computed for task {task.name!r}; "
                         f"its metrics: {', '.join(metric_names(dev.metric_set))}")
    found.sort(key=lambda r: (-r["dev"][metric], -r["score"]))
    return Search(found, metric)


def quoted(value: str) -> str:
    """``value`` as a dotted override's value the config reads back as this string."""
    try:
        plain = parse_yaml(value) == value and value.strip() == value
    except Exception:  # noqa: BLE001 - any YAML error: quote it
        plain = False
    return value if plain else json.dumps(value)


def overrides(best: str, top: list[str]) -> dict:
    """The lines to pass on: ``task.template=...`` for the best; ``task.templates=[...]``
    with ``prompt.seeds`` (one member per template) for the top K."""
    return {"template": "task.template=" + quoted(best),
            "templates": ["task.templates=" + json.dumps(top),
                          "prompt.seeds=" + json.dumps(list(range(len(top))))]}


def check_task_config(cfg):
    """One line for what the search cannot run on: a mixture, several templates, a
    built-in model that is not a T5 (before it is built)."""
    tcfg = cfg.task
    if tcfg.mixture or tcfg.templates:
        raise PtjaxError("ptjax template generates templates for one task; unset "
                         "task.mixture / task.templates")
    if TINY.get(cfg.model.path, "t5") != "t5":
        raise PtjaxError(f"model.path={cfg.model.path}: ptjax template fills spans with T5's "
                         "sentinels (<extra_id_N>); use a T5 checkpoint (e.g. tiny-t5)")


def run_search(cfg, shapes=SHAPES, beam: int = 100, top: int = 3, per_class: int | None = 16,
               seed: int = 0, max_new_tokens: int = 20) -> dict:
    """``ptjax template``: the search on the config's model and task (train split, or
    ``per_class`` examples of each class drawn with ``seed``; dev: the validation split)
    -> the results JSON (``results``)."""
    check_task_config(cfg)
    for name, v in (("--beam", beam), ("--top", top), ("--max-tokens", max_new_tokens)):
        if v < 1:
            raise PtjaxError(f"{name} {v}: must be at least 1")
    if per_class is not None and per_class < 1:
        raise PtjaxError(f"--per-class {per_class}: must be at least 1")
    shapes = tuple(shapes) or SHAPES
    fills = max(check_shape(shape) for shape in shapes)
    if max_new_tokens < fills:
        raise PtjaxError(f"--max-tokens {max_new_tokens}: a shape with {fills} fills needs at "
                         f"least {fills} tokens (their sentinels)")
    task = load_task(cfg.task)
    if not task.labels:
        raise PtjaxError(f"task {task.name!r} has no labels (a generative task); the search "
                         "puts each class's label word into the template: set task.labels")
    model = load_run_model(cfg.model)
    if model.kind != "seq2seq":
        what = {"causal": "a decoder-only model", "masked": "a masked LM"}[model.kind]
        raise PtjaxError(f"model.path={cfg.model.path}: ptjax template fills spans with T5's "
                         f"sentinels (<extra_id_N>); this is {what}")
    sentinel_ids(model, fills + 1)
    classes = tuple(task.labels)
    train = task.split("train")
    train_labels = labels_of(train, classes, task.name, "train")
    if per_class is not None:
        train, train_labels = few_shot(train, train_labels, len(classes), per_class, seed)
    found = search(model, cfg.task, task, classes, train, train_labels, shapes, beam,
                   max_new_tokens, cfg.train.metric, cfg.train.eval_batch_size)
    return results(found, cfg, shapes, beam, top, per_class, seed, max_new_tokens, len(train),
                   len(task.split("validation")))


def results(found: Search, cfg, shapes, beam, top, per_class, seed, max_new_tokens,
            n_train, n_dev) -> dict:
    """The search's JSON: method, settings, every template ranked, the overrides."""
    best_k = [r["template"] for r in found.templates[:top]]
    return {"method": METHOD, "final_choice": FINAL_CHOICE, "model": cfg.model.path,
            "task": cfg.task.name, "shapes": list(shapes), "beam": beam,
            "max_tokens": max_new_tokens, "per_class": per_class, "seed": seed,
            "train_examples": n_train, "dev_examples": n_dev, "metric": found.metric,
            "templates": found.templates, "template": found.best, "top": best_k,
            "overrides": overrides(found.best, best_k)}

