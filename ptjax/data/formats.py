"""T5's text-to-text formats for SuperGLUE, GLUE (MRPC, QQP, SST-2), SQuAD and MRQA.

One TFDS example (a dict of plain Python values; strings may be bytes) becomes a list of
``{"inputs": str, "targets": str}`` dicts that match, string for string, Google's T5
preprocessors in ``google-research/text-to-text-transfer-transformer``:
``t5/data/preprocessors.py`` (``glue``, ``record``, ``wsc_simple``/``_wsc_inputs``,
``squad``, ``_pad_punctuation``/``_string_join``), with the feature orders of
``t5/data/glue_utils.get_glue_text_preprocessor`` and the splits of ``t5/data/tasks.py``.
T5 has no MRQA task; MRQA follows Lester et al. (2021)'s ``google-research/prompt-tuning``
(``scripts/mrqa_to_tsv.py`` then ``preprocessors.preprocess_tsv_to_qa``).

``prefix=False`` (the default) drops the leading benchmark name, as prompt-tuning's
``remove_first_text_token`` does: "rte hypothesis: ..." becomes "hypothesis: ...". SQuAD
and MRQA have no benchmark name, so ``prefix`` changes nothing for them.

Extra keys, where they apply: "candidates" (ReCoRD's entities), "answers" (every gold
answer: ReCoRD, SQuAD, MRQA), "group" (MultiRC's question idx, ReCoRD's query idx) and
"label" (WSC's 0/1/-1: the target is always the span's referent, right or wrong).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

from ptjax.errors import PtjaxError

Example = dict[str, Any]
Format = Callable[[Example, Sequence[str], bool, str], list[Example]]

# TF's regex ops run RE2, where \w is ASCII-only and \s is [\t\n\f\r ]: T5 pads *every*
# other character with spaces (accented letters too: "Beyoncé" -> "Beyonc é") and
# collapses only ASCII whitespace (a no-break space survives, padded). Python's \W and \s
# are Unicode-aware, so the classes are spelt out.
_RE2_NON_WORD = re.compile(r"([^0-9A-Za-z_])")
_RE2_SPACES = re.compile(r"[\t\n\f\r ]+")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: Iterable[Any]) -> list[str]:
    return [_text(v) for v in values]


def _pad_punctuation(text: str) -> str:
    """T5: a space either side of each non-word character, whitespace runs collapsed.
    Nothing is stripped, so "Why?" becomes "Why ? " (trailing space kept)."""
    return _RE2_SPACES.sub(" ", _RE2_NON_WORD.sub(r" \1 ", text))


def _string_join(parts: Iterable[str]) -> str:
    """T5: join on a space, then collapse whitespace runs (again without stripping)."""
    return _RE2_SPACES.sub(" ", " ".join(parts))


def _label_name(ex: Example, label_names: Sequence[str]) -> str:
    label = int(ex["label"])
    if label == -1:  # the unlabeled test split
        return "<unk>"
    if not 0 <= label < len(label_names):
        raise PtjaxError(f"label {label} is out of range for label names "
                         f"({', '.join(label_names) or 'none given'})")
    return label_names[label]


def _with_prefix(name: str, inputs: str, prefix: bool) -> str:
    return f"{name} {inputs}" if prefix else inputs


# T5's ``glue`` preprocessor writes "<benchmark> key1: value1 key2: value2 ...". The keys
# are glue_utils' explicit lists for MultiRC and WiC (WiC's start/end indices are left
# out), and otherwise every TFDS feature except label and idx, SORTED BY NAME: hence
# "hypothesis" before "premise", and COPA's choices before its premise.
_GLUE_FEATURES: dict[str, tuple[str, ...]] = {
    "boolq": ("passage", "question"),
    "cb": ("hypothesis", "premise"),
    "copa": ("choice1", "choice2", "premise", "question"),
    "multirc": ("question", "answer", "paragraph"),
    "rte": ("hypothesis", "premise"),
    "wic": ("sentence1", "sentence2", "word"),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "sst2": ("sentence",),
}


def _glue(name: str) -> Format:
    def fmt(ex: Example, label_names: Sequence[str], prefix: bool, split: str) -> list[Example]:
        # A plain tf.strings.join: no whitespace clean-up, unlike SQuAD.
        inputs = " ".join(f"{key}: {_text(ex[key])}" for key in _GLUE_FEATURES[name])
        inputs = _with_prefix(name, inputs, prefix)
        out = {"inputs": inputs, "targets": _label_name(ex, label_names)}
        if name == "multirc":
            # T5 strips the paragraph's HTML from the joined string: <br> becomes a space
            # (double spaces are kept), <b> and </b> vanish.
            out["inputs"] = re.sub(r"</?b>", "", inputs.replace("<br>", " "))
            out["group"] = int(ex["idx"]["question"])  # EM is grouped by question
        return [out]
    return fmt


def _record(ex: Example, label_names: Sequence[str], prefix: bool,
            split: str) -> list[Example]:
    # Each highlight bullet "\n@highlight\n" becomes a sentence break: after end
    # punctuation (. ? ! " ') just a space, otherwise ". ".
    passage = re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", _text(ex["passage"]))
    passage = passage.replace("\n@highlight\n", ". ")
    entities, answers = _texts(ex["entities"]), _texts(ex["answers"])
    inputs = " ".join(["query:", _text(ex["query"]), "entities:", ", ".join(entities),
                       "passage:", passage])
    inputs = _with_prefix("record", inputs, prefix)
    # T5 writes one example per answer ("<unk>" when there is none, as in test); for eval
    # we keep one example per query, scored against all answers.
    targets = (answers or ["<unk>"]) if split == "train" else [
        answers[0] if answers else "<unk>"]
    return [{"inputs": inputs, "targets": t, "candidates": list(entities),
             "answers": list(answers), "group": int(ex["idx"]["query"])} for t in targets]


# Two WSC texts whose pronoun is not the whitespace word at span2_index; T5 hard-codes them.
_WSC_SPECIAL_CASES = {
    'The boy continued to whip the pony , and eventually the pony threw him over. John '
    'laughed out quite loud. "Good for him," he said. ':
    'The boy continued to whip the pony , and eventually the pony threw him over. John '
    'laughed out quite loud. "Good for X ," he said.',
    'When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the '
    'magic pebble in an iron safe . Some day they might want to use it , but really for '
    'now, what more could they wish for?':
    'When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the '
    'magic pebble in an iron safe . Some day they might want to use X , but really for '
    'now, what more could they wish for?',
}


def _wsc_inputs(ex: Example) -> str:
    """T5's ``_wsc_inputs``: the text with the pronoun (word span2_index, splitting on
    single spaces) replaced by X."""
    text, pronoun = _text(ex["text"]), _text(ex["span2_text"])
    if text in _WSC_SPECIAL_CASES:
        return _WSC_SPECIAL_CASES[text]
    words, i = text.split(" "), int(ex["span2_index"])
    if not 0 < i < len(words) or words[i] != pronoun:  # T5 asserts both
        found = words[i] if 0 <= i < len(words) else "nothing"
        raise PtjaxError(f"wsc example {ex.get('idx')}: word {i} is {found!r}, not "
                         f"span2_text {pronoun!r} (use TFDS super_glue/wsc.fixed)")
    return " ".join([" ".join(words[:i]), "X", " ".join(words[i + 1:])])


def _wsc(ex: Example, label_names: Sequence[str], prefix: bool, split: str) -> list[Example]:
    # T5's "WSC simple": the target is the candidate referent (span1) whatever the label,
    # so training keeps only the examples where it is the right one (label 1).
    label = int(ex.get("label", 0))
    if split == "train" and not label:
        return []
    # Every " X " is replaced, as T5's global regex_replace does.
    marked = _wsc_inputs(ex).replace(" X ", f" *{_text(ex['span2_text'])}* ")
    return [{"inputs": _with_prefix("wsc:", marked, prefix),
             "targets": _text(ex["span1_text"]), "label": label}]


def _qa(question: str, context: str, answers: list[str], first: str | None) -> list[Example]:
    """T5's ``squad``: "question: {q} context: {c}" with all text punctuation-padded."""
    answers = [_pad_punctuation(a) for a in answers]
    inputs = _string_join(["question:", _pad_punctuation(question), "context:",
                           _pad_punctuation(context)])
    target = _pad_punctuation(first) if first is not None else (
        answers[0] if answers else "<unk>")
    return [{"inputs": inputs, "targets": target, "answers": answers}]


def _squad(ex: Example, label_names: Sequence[str], prefix: bool,
           split: str) -> list[Example]:
    return _qa(_text(ex["question"]), _text(ex["context"]), _texts(ex["answers"]["text"]),
               None)


def _mrqa(ex: Example, label_names: Sequence[str], prefix: bool, split: str) -> list[Example]:
    # prompt-tuning's mrqa_to_tsv.py first turns every Unicode whitespace run into one
    # space; the target is the first *detected* answer (a span found in the context), the
    # metric uses all `answers`.
    def norm(value: Any) -> str:
        return re.sub(r"\s+", " ", _text(value))

    detected = ex.get("detected_answers") or []  # TFDS: a dict of lists; jsonl: dicts
    detected = (detected.get("text", []) if isinstance(detected, dict)
                else [d["text"] for d in detected])
    first = norm(detected[0]) if len(detected) else None
    return _qa(norm(ex["question"]), norm(ex["context"]), [norm(a) for a in ex["answers"]],
               first)


FORMATS: dict[str, Format] = {
    **{name: _glue(name) for name in ("boolq", "cb", "copa", "multirc", "rte", "wic")},
    "record": _record,
    "wsc": _wsc,
    **{name: _glue(name) for name in ("mrpc", "qqp", "sst2")},
    "squad": _squad,
    "mrqa": _mrqa,
}


def format_example(task: str, ex: dict, label_names: Sequence[str], *, prefix: bool = False,
                   split: str = "train") -> list[dict]:
    """One TFDS example of ``task`` as T5 text-to-text examples (see the module docstring).
    ``label_names``: the TFDS ClassLabel names (label -1 gives "<unk>"). ``split``:
    "train" expands ReCoRD per answer and drops WSC's wrong referents; anything else is
    an evaluation split."""
    fmt = FORMATS.get(task)
    if fmt is None:
        raise PtjaxError(f"unknown task format {task!r}; valid: {', '.join(FORMATS)}")
    try:
        return fmt(ex, label_names, prefix, split)
    except KeyError as e:
        raise PtjaxError(f"{task} example has no field {e.args[0]!r} (it has: "
                         f"{', '.join(map(str, ex))})") from None
