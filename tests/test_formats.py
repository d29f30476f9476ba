"""T5 text-to-text formats: one TFDS-shaped example per task (bytes strings, int labels,
dict-of-lists sequences) and the exact strings Google's T5 preprocessors write for it."""
import numpy as np
import pytest

from ptjax import PtjaxError
from ptjax.data.formats import FORMATS, _pad_punctuation, format_example

TF = ("False", "True")


def one(task, ex, labels=(), **kw):
    out = format_example(task, ex, labels, **kw)
    assert len(out) == 1
    return out[0]


def test_every_task_has_a_format():
    assert sorted(FORMATS) == sorted(["boolq", "cb", "copa", "multirc", "record", "rte",
                                      "wic", "wsc", "mrpc", "qqp", "sst2", "squad", "mrqa"])


def test_unknown_task_lists_the_valid_names_on_one_line():
    with pytest.raises(PtjaxError) as e:
        format_example("mnli", {}, ())
    msg = str(e.value)
    assert "\n" not in msg and "'mnli'" in msg
    assert all(name in msg for name in FORMATS)


# ---------------------------------------------------------------- SuperGLUE, GLUE style

BOOLQ = {"question": b"is france the same timezone as the uk",
         "passage": b"At the Liberation of France in the summer of 1944, Metropolitan France "
                    b"kept GMT+2.",
         "label": 0, "idx": 3}


def test_boolq_sorted_features_with_and_without_prefix():
    body = ("passage: At the Liberation of France in the summer of 1944, Metropolitan "
            "France kept GMT+2. question: is france the same timezone as the uk")
    assert one("boolq", BOOLQ, TF) == {"inputs": body, "targets": "False"}
    assert one("boolq", BOOLQ, TF, prefix=True) == {"inputs": "boolq " + body,
                                                    "targets": "False"}
    # str instead of bytes, numpy ints: the same output
    as_str = {k: v.decode() if isinstance(v, bytes) else np.int64(v) for k, v in BOOLQ.items()}
    assert one("boolq", as_str, TF) == {"inputs": body, "targets": "False"}


def test_cb_hypothesis_before_premise():
    ex = {"premise": b"It was a complex language. Not written down but handed down.",
          "hypothesis": b"the language was peeled down", "label": 1, "idx": 0}
    labels = ("entailment", "contradiction", "neutral")
    assert one("cb", ex, labels, prefix=True) == {
        "inputs": "cb hypothesis: the language was peeled down premise: It was a complex "
                  "language. Not written down but handed down.",
        "targets": "contradiction"}
    assert one("cb", ex, labels)["inputs"] == (
        "hypothesis: the language was peeled down premise: It was a complex language. Not "
        "written down but handed down.")


def test_copa_targets_are_label_names_not_choice_text():
    ex = {"premise": b"My body cast a shadow over the grass.",
          "choice1": b"The sun was rising.", "choice2": b"The grass was cut.",
          "question": b"cause", "label": 0, "idx": 0}
    assert one("copa", ex, ("choice1", "choice2")) == {
        "inputs": "choice1: The sun was rising. choice2: The grass was cut. premise: My body "
                  "cast a shadow over the grass. question: cause",
        "targets": "choice1"}
    assert one("copa", ex, ("choice1", "choice2"), prefix=True)["inputs"].startswith(
        "copa choice1: The sun was rising.")


def test_multirc_html_removed_and_grouped_by_question():
    ex = {"paragraph": b"<b>Sent 1: </b>Susan wanted a party.<br><b>Sent 2: </b>She sent "
                       b"invites.<br>",
          "question": b"What did Susan want?", "answer": b"A party", "label": 1,
          "idx": {"paragraph": 0, "question": 7, "answer": 2}}
    body = ("question: What did Susan want? answer: A party paragraph: Sent 1: Susan wanted "
            "a party. Sent 2: She sent invites. ")
    assert one("multirc", ex, TF) == {"inputs": body, "targets": "True", "group": 7}
    assert one("multirc", ex, TF, prefix=True)["inputs"] == "multirc " + body


def test_rte_with_and_without_prefix_and_unlabeled_test():
    ex = {"premise": b"No Weapons of Mass Destruction Found in Iraq Yet.",
          "hypothesis": b"Weapons of Mass Destruction Found in Iraq.", "label": 1, "idx": 0}
    labels = ("entailment", "not_entailment")
    body = ("hypothesis: Weapons of Mass Destruction Found in Iraq. premise: No Weapons of "
            "Mass Destruction Found in Iraq Yet.")
    assert one("rte", ex, labels) == {"inputs": body, "targets": "not_entailment"}
    assert one("rte", ex, labels, prefix=True)["inputs"] == "rte " + body
    assert one("rte", {**ex, "label": -1}, labels, split="test")["targets"] == "<unk>"


def test_wic_ignores_the_indices():
    ex = {"word": b"place", "sentence1": b"Do you want to come over to my place later?",
          "sentence2": b"A political system with no place for the less prominent groups.",
          "start1": 31, "start2": 27, "end1": 36, "end2": 32, "label": 0, "idx": 0}
    assert one("wic", ex, TF) == {
        "inputs": "sentence1: Do you want to come over to my place later? sentence2: A "
                  "political system with no place for the less prominent groups. word: place",
        "targets": "False"}


def test_glue_mrpc_qqp_sst2():
    mrpc = {"sentence1": b'Amrozi accused his brother , whom he called " the witness " , of '
                         b'deliberately distorting his evidence .',
            "sentence2": b'Referring to him as only " the witness " , Amrozi accused his '
                         b'brother of deliberately distorting his evidence .',
            "label": 1, "idx": 0}
    assert one("mrpc", mrpc, ("not_equivalent", "equivalent"), prefix=True) == {
        "inputs": 'mrpc sentence1: Amrozi accused his brother , whom he called " the witness '
                  '" , of deliberately distorting his evidence . sentence2: Referring to him '
                  'as only " the witness " , Amrozi accused his brother of deliberately '
                  'distorting his evidence .',
        "targets": "equivalent"}
    qqp = {"question1": b"How is the life of a math student? Could you describe your own "
                        b"experiences?",
           "question2": b"Which level of prepration is enough for the exam jlpt5?",
           "label": 0, "idx": 0}
    labels = ("not_duplicate", "duplicate")
    assert one("qqp", qqp, labels) == {
        "inputs": "question1: How is the life of a math student? Could you describe your own "
                  "experiences? question2: Which level of prepration is enough for the exam "
                  "jlpt5?",
        "targets": "not_duplicate"}
    assert one("qqp", {**qqp, "label": -1}, labels, split="test")["targets"] == "<unk>"
    # GLUE-style joins keep the text as is: no whitespace clean-up, trailing space kept.
    sst2 = {"sentence": b"hide new secretions from the parental units ", "label": 0, "idx": 0}
    assert one("sst2", sst2, ("negative", "positive")) == {
        "inputs": "sentence: hide new secretions from the parental units ",
        "targets": "negative"}
    assert one("sst2", sst2, ("negative", "positive"), prefix=True)["inputs"] == (
        "sst2 sentence: hide new secretions from the parental units ")


def test_label_out_of_range_and_missing_field_are_one_line_errors():
    with pytest.raises(PtjaxError, match="label 2 is out of range"):
        format_example("boolq", {**BOOLQ, "label": 2}, TF)
    with pytest.raises(PtjaxError, match="no field 'passage'") as e:
        format_example("boolq", {"question": b"q", "label": 0, "idx": 0}, TF)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- ReCoRD

RECORD = {"passage": b"Tracy Morgan hospitalized after crash.\n@highlight\nMorgan is in "
                     b"critical condition\n@highlight\nThe truck driver was charged",
          "query": b"@placeholder's lawyer said the comedian is improving.",
          "entities": [b"Morgan", b"Tracy Morgan"], "answers": [b"Morgan", b"Tracy Morgan"],
          "idx": {"passage": 4, "query": 17}}
RECORD_BODY = ("query: @placeholder's lawyer said the comedian is improving. entities: "
               "Morgan, Tracy Morgan passage: Tracy Morgan hospitalized after crash. Morgan "
               "is in critical condition. The truck driver was charged")


def test_record_train_yields_one_example_per_answer():
    out = format_example("record", RECORD, (), split="train")
    assert [ex["inputs"] for ex in out] == [RECORD_BODY] * 2
    assert [ex["targets"] for ex in out] == ["Morgan", "Tracy Morgan"]
    out = format_example("record", RECORD, (), prefix=True, split="train")
    assert out[0]["inputs"] == "record " + RECORD_BODY


def test_record_eval_yields_one_example_with_all_answers_and_candidates():
    ex = one("record", {**RECORD, "entities": np.array(RECORD["entities"], dtype=object)},
             split="validation")
    assert ex == {"inputs": RECORD_BODY, "targets": "Morgan",
                  "candidates": ["Morgan", "Tracy Morgan"],
                  "answers": ["Morgan", "Tracy Morgan"], "group": 17}


def test_record_test_without_answers_targets_unk():
    for split in ("train", "test"):
        ex = one("record", {**RECORD, "answers": []}, split=split)
        assert ex["targets"] == "<unk>" and ex["answers"] == []


def test_record_highlight_after_quote_keeps_the_quote():
    ex = {**RECORD, "passage": b'He said "go."\n@highlight\nIt went'}
    assert one("record", ex, split="validation")["inputs"].endswith(
        'passage: He said "go." It went')


# ------------------------------------------------------------------------ WSC simple

WSC = {"text": b"Mark told Pete many lies about himself, which Pete included in his book. "
               b"He should have been more truthful.",
       "span1_index": 0, "span2_index": 13, "span1_text": b"Mark", "span2_text": b"He",
       "label": 1, "idx": 0}
WSC_BODY = ("Mark told Pete many lies about himself, which Pete included in his book. *He* "
            "should have been more truthful.")


def test_wsc_marks_the_pronoun_and_targets_the_referent():
    assert one("wsc", WSC) == {"inputs": WSC_BODY, "targets": "Mark", "label": 1}
    assert one("wsc", WSC, prefix=True)["inputs"] == "wsc: " + WSC_BODY


def test_wsc_train_drops_wrong_referents_eval_keeps_them():
    wrong = {**WSC, "span1_index": 2, "span1_text": b"Pete", "label": 0}
    assert format_example("wsc", wrong, TF, split="train") == []
    assert one("wsc", wrong, TF, split="validation") == {
        "inputs": WSC_BODY, "targets": "Pete", "label": 0}
    assert one("wsc", {**WSC, "label": -1}, TF, split="test") == {
        "inputs": WSC_BODY, "targets": "Mark", "label": -1}


def test_wsc_special_case_and_index_mismatch():
    text = ('The boy continued to whip the pony , and eventually the pony threw him over. '
            'John laughed out quite loud. "Good for him," he said. ')
    ex = {"text": text.encode(), "span1_index": 0, "span2_index": 22,
          "span1_text": b"The boy", "span2_text": b"him", "label": 1, "idx": 5}
    assert one("wsc", ex)["inputs"] == (
        'The boy continued to whip the pony , and eventually the pony threw him over. John '
        'laughed out quite loud. "Good for *him* ," he said.')
    with pytest.raises(PtjaxError, match="word 12 is 'book.', not span2_text 'He'"):
        format_example("wsc", {**WSC, "span2_index": 12}, TF)


# ------------------------------------------------------------------------ SQuAD, MRQA

def test_pad_punctuation_is_re2_ascii():
    assert _pad_punctuation("Why?") == "Why ? "
    assert _pad_punctuation("café, \t ok") == "caf é , ok"
    assert _pad_punctuation("a\xa0b") == "a \xa0 b"  # RE2's \s does not cover U+00A0


def test_squad_question_context_with_padded_punctuation():
    ex = {"id": b"56be85543aeaaa14008c9063", "title": b"Beyonc\xc3\xa9",
          "question": "Which group was Beyoncé the lead singer of?".encode(),
          "context": "Beyoncé rose to fame in the late 1990s as lead singer of "
                     "Destiny's Child.".encode(),
          "answers": {"text": [b"Destiny's Child", b"Destiny's Child"],
                      "answer_start": [57, 57]}}
    expected = {"inputs": "question: Which group was Beyonc é the lead singer of ? context: "
                          "Beyonc é rose to fame in the late 1990s as lead singer of "
                          "Destiny ' s Child . ",
                "targets": "Destiny ' s Child",
                "answers": ["Destiny ' s Child", "Destiny ' s Child"]}
    assert one("squad", ex) == expected
    assert one("squad", ex, prefix=True, split="validation") == expected


def test_mrqa_normalizes_whitespace_and_carries_all_answers():
    ex = {"subset": b"SQuAD", "qid": b"b0626b3af0764c80b1e6f22c114982c1",
          "question": b"What is the longest river\nin Africa?",
          "context": b"The Nile\xc2\xa0is  the longest river\nin Africa.",
          "context_tokens": {"tokens": [b"The", b"Nile"], "offsets": [0, 4]},
          "question_tokens": {"tokens": [b"What"], "offsets": [0]},
          "detected_answers": {"text": [b"Nile"],
                               "char_spans": {"start": [[4]], "end": [[7]]},
                               "token_spans": {"start": [[1]], "end": [[1]]}},
          "answers": [b"the Nile", b"Nile"]}
    assert one("mrqa", ex, split="validation") == {
        "inputs": "question: What is the longest river in Africa ? context: The Nile is the "
                  "longest river in Africa . ",
        "targets": "Nile", "answers": ["the Nile", "Nile"]}
    # MRQA's jsonl shape (a list of detected-answer dicts) works too
    jsonl = {**ex, "detected_answers": [{"text": "Nile", "char_spans": [[4, 7]]}]}
    assert one("mrqa", jsonl)["targets"] == "Nile"
