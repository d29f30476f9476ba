"""Verbalizers in training: class scores computed as evaluation computes them, the
class-level loss, and the soft verbalizer (OpenPrompt's ManualVerbalizer and WARP's
SoftVerbalizer; see ../shared/DESIGN.md).

task.verbalizer_loss=class (manual verbalizer): every train example is paired with every
label word of every class (rows example-major, words grouped by class, as the dev set
lays them out); a word scores its tokens' log-probabilities under task.verbalizer_tokens
(first | mean | max), a class the mean of its words' scores, and the loss is the
cross-entropy of the gold class under softmax over the class scores.

task.verbalizer_kind=soft: learned class vectors [K, C, D] (``trainable["verbalizer"]``),
initialised from the output embedding of each class's label words' tokens (mean); a class
logit is the hidden state the LM head reads at the answer position (T5: the decoder
position that predicts the word's first token, after <extra_id_0> with {mask}; GPT-2: the
position predicting the answer) dot the class vector. One row per example.

A train batch then carries, besides the rows, ``label`` [B] (the gold class) and
``word_mask`` [B x W, T] (the rows' word tokens: targets after the prefix, no EOS).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ptjax.errors import PtjaxError

KINDS = ("manual", "soft")
LOSSES = ("first_word", "class")


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How a train batch's rows become class scores (static: hashable for jit).

    classes: class names in verbalizer order; words: the rows each example is paired
    with (manual: every label word, grouped by class; soft: one word, where the answer
    goes); row_class: each row's class; word_tokens: first | mean | max; kind: manual |
    soft."""
    classes: tuple
    words: tuple
    row_class: tuple
    word_tokens: str = "mean"
    kind: str = "manual"

    @property
    def W(self) -> int:
        return len(self.words)

    def class_matrix(self) -> np.ndarray:
        """[W, C]: row w's weight in class c's mean (1 / words of c, 0 elsewhere)."""
        m = np.zeros((self.W, len(self.classes)), np.float32)
        m[np.arange(self.W), list(self.row_class)] = 1.0
        return m / m.sum(0, keepdims=True)


def scoring(tcfg) -> Scoring | None:
    """The Scoring a TaskConfig trains with, or None (targets are first label words)."""
    verbalizer = tcfg.verbalizer
    if not verbalizer:
        return None
    classes = tuple(c for c, _ in verbalizer)
    if tcfg.verbalizer_kind == "soft":
        return Scoring(classes, (verbalizer[0][1][0],), (0,), tcfg.verbalizer_tokens, "soft")
    if tcfg.verbalizer_loss != "class":
        return None
    rows = [(c, w) for c, (_, words) in enumerate(verbalizer) for w in words]
    return Scoring(classes, tuple(w for _, w in rows), tuple(c for c, _ in rows),
                   tcfg.verbalizer_tokens, "manual")


def word_mask(target_mask, prefix_length: int, eos: bool = True) -> np.ndarray:
    """[R, T] bool: each row's word tokens, the target tokens after ``prefix_length`` ids
    (T5's <extra_id_0>) and before the final EOS (``eos=False``: a masked LM's targets,
    the word's tokens at the mask tokens, have none). target_mask: [R, T] or [R, K, T]
    (several templates: targets are the same for every member)."""
    mask = np.asarray(target_mask).astype(bool)
    if mask.ndim == 3:
        mask = mask[:, 0]
    out = mask.copy()
    if not eos:
        return out
    rows = np.arange(len(mask))
    first = mask.argmax(1)
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(1)
    out[rows, last] = False
    for j in range(prefix_length):
        out[rows, first + j] = False
    return out


def expand(examples, s: Scoring, task_name: str, where: str) -> tuple[list, np.ndarray]:
    """(rows: each example paired with each of ``s.words``, example-major; labels [N]:
    each example's gold class index). A target without label words is a one-line error."""
    labels = class_indices(examples, s.classes, task_name, where,
                           f"has no label words in task.verbalizer (classes: "
                           f"{', '.join(s.classes)})")
    rows = [{**ex, "targets": w} for ex in examples for w in s.words]
    return rows, labels


def class_indices(examples, classes, task_name: str, where: str, missing: str) -> np.ndarray:
    """[N] int32: each example's target as an index into ``classes``; a target that is no
    class is one line ("task T <where> example i: target 'x' <missing>")."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for i, ex in enumerate(examples):
        if ex["targets"] not in index:
            raise PtjaxError(f"task {task_name!r} {where} example {i}: target "
                             f"{ex['targets']!r} {missing}")
        out.append(index[ex["targets"]])
    return np.asarray(out, np.int32)


def class_scores(token_logprobs_KxRxT, word_mask_RxT, s: Scoring):
    """[K, N, C] class scores from each (example, word) row's target-token
    log-probabilities (R = N x W rows, example-major): the word's score under
    ``s.word_tokens``, then each class's mean over its words (``evaluation.verbalize``)."""
    lp, m = token_logprobs_KxRxT, word_mask_RxT.astype(bool)[None]
    if s.word_tokens == "first":
        first = jnp.argmax(m[0], axis=1)  # [R]
        word = jnp.take_along_axis(lp, first[None, :, None], axis=2)[..., 0]
    elif s.word_tokens == "mean":
        word = jnp.sum(jnp.where(m, lp, 0.0), 2) / jnp.maximum(jnp.sum(m, 2), 1)
    else:
        word = jnp.max(jnp.where(m, lp, -jnp.inf), axis=2)
    K = word.shape[0]
    word_KxNxW = word.reshape(K, -1, s.W)
    return jnp.einsum("knw,wc->knc", word_KxNxW, jnp.asarray(s.class_matrix()))


def class_nll(scores_KxNxC, labels_N):
    """[K, N]: -log softmax_c(score)[gold] (fp32)."""
    logp = jax.nn.log_softmax(scores_KxNxC.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels_N[None, :, None], axis=2)[..., 0]


def answer_position(word_mask_RxT):
    """[R]: the position whose output predicts the word's first token."""
    return jnp.argmax(word_mask_RxT.astype(bool), axis=1)


def label_token_ids(model, words) -> list[int]:
    """The ids of a class's label words as the targets hold them (GPT-2, a masked LM:
    " " + word)."""
    tok = model.tokenizer
    ids = []
    for w in words:
        text = w if model.is_encoder_decoder else " " + w
        ids += tok(text, add_special_tokens=False)["input_ids"]
    return ids


def output_embeddings(model, params=None):
    """[V, D] fp32: the rows the LM head multiplies the (scaled) hidden state by (T5 v1.1's
    lm_head, else the tied input embedding; T5 v1.0's d_model**-0.5 is on the hidden side,
    see ``T5.decode``; a masked LM's tied word embeddings, which its head's transformed
    hidden state meets)."""
    params = model.params if params is None else params
    if "lm_head" in params:
        return jnp.asarray(params["lm_head"]["kernel"], jnp.float32).T
    table = params[{"seq2seq": "shared", "causal": "wte", "masked": "word_embeddings"}[
        model.kind]]
    return jnp.asarray(table["embedding"], jnp.float32)


def initial_class_vectors(model, verbalizer, K: int) -> np.ndarray:
    """[K, C, D]: each class's vector is the mean output embedding of its label words'
    tokens (the same for every member)."""
    table = output_embeddings(model)
    vectors = []
    for c, words in verbalizer:
        ids = label_token_ids(model, words)
        if not ids:
            raise PtjaxError(f"task.verbalizer: class {c!r} has label words with no tokens")
        vectors.append(np.asarray(table[np.asarray(ids)]).mean(0))
    return np.broadcast_to(np.stack(vectors)[None], (K, len(vectors), table.shape[1])).astype(
        np.float32).copy()
