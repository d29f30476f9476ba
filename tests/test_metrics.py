"""ptjax.data.metrics against hand-worked numbers (T5's metric definitions)."""
import pytest

from ptjax.data import benchmarks, metrics
from ptjax.errors import PtjaxError

approx = pytest.approx

E, C, N = "entailment", "contradiction", "neutral"
CB_LABELS = (E, C, N)
EQ, NEQ = "equivalent", "not_equivalent"


# ---------------------------------------------------------------- accuracy


def test_accuracy_exact_string_match():
    # right: 0 and 2; "x" is no label; " b" is not "b" (no stripping) -> 2 / 4
    out = metrics.accuracy(["a", "b", "a", "b"], ["a", "x", "a", " b"])
    assert out == {"accuracy": approx(50.0)}
    assert metrics.accuracy(["a"], ["a"]) == {"accuracy": 100.0}


# ---------------------------------------------------------------- MRPC / QQP F1


def test_f1_and_accuracy_invalid_prediction_counts_against_its_target():
    targets = [EQ, EQ, EQ, NEQ, NEQ, NEQ]
    preds = [EQ, EQ, NEQ, EQ, NEQ, "maybe"]
    # TP = 2 (rows 0, 1); FN = 1 (row 2); FP = 1 (row 3) + 1 (row 5: T5 flips an invalid
    # prediction to the wrong class, here positive); TN = 1 (row 4).
    # F1 = 2TP / (2TP + FP + FN) = 4 / (4 + 2 + 1) = 4/7; accuracy = 3/6.
    out = metrics.f1_and_accuracy(targets, preds, positive=EQ)
    assert out == {"f1": approx(400 / 7), "accuracy": approx(50.0)}
    # Read as "not positive" the invalid row would be a TN: F1 = 4/6. T5 says 4/7.
    assert out["f1"] != approx(400 / 6)


def test_f1_invalid_prediction_on_positive_target_is_a_false_negative():
    # TP = 1, FN = 1 (row 1, invalid on a positive target), FP = 0 -> 2 / (2 + 1) = 2/3
    out = metrics.f1_and_accuracy([EQ, EQ, NEQ], [EQ, "?", NEQ], positive=EQ)
    assert out["f1"] == approx(200 / 3)
    assert out["accuracy"] == approx(200 / 3)


def test_f1_no_positive_anywhere_is_zero():
    # sklearn's zero_division default: TP = FP = FN = 0 -> F1 0 (accuracy still 100)
    out = metrics.f1_and_accuracy([NEQ, NEQ], [NEQ, NEQ], positive=EQ)
    assert out == {"f1": 0.0, "accuracy": 100.0}


def test_f1_targets_with_three_labels_rejected():
    with pytest.raises(ValueError, match="more than two labels"):
        metrics.f1_and_accuracy(["a", "b", "c"], ["a", "b", "c"], positive="a")


# ---------------------------------------------------------------- CB


def test_cb_macro_f1_with_a_class_never_predicted():
    targets = [E, E, C, C, N]
    preds = [E, C, C, C, E]
    # entailment:    TP 1, FP 1 (row 4), FN 1 (row 1) -> 2/(2+1+1) = 0.5
    # contradiction: TP 2, FP 1 (row 1), FN 0         -> 4/(4+1)   = 0.8
    # neutral:       never predicted: TP 0, FN 1       -> 0
    # macro = (0.5 + 0.8 + 0) / 3 = 43.333...; accuracy = 3/5 = 60
    out = metrics.cb_metrics(targets, preds, CB_LABELS)
    assert out["macro_f1"] == approx(130 / 3)
    assert out["accuracy"] == approx(60.0)
    assert out["score"] == approx((60 + 130 / 3) / 2)  # 51.666...


def test_cb_prediction_outside_labels_is_wrong_but_no_false_alarm():
    # row 1 "maybe": a miss for contradiction, a false positive for no class.
    # E: 2/2 = 1; C: TP 0, FN 1 -> 0; N: 2/2 = 1 -> macro 2/3; accuracy 2/3
    out = metrics.cb_metrics([E, C, N], [E, "maybe", N], CB_LABELS)
    assert out["macro_f1"] == approx(200 / 3)
    assert out["accuracy"] == approx(200 / 3)


def test_cb_macro_averages_over_all_labels_even_absent_ones():
    # T5 passes labels=range(3): a class in neither targets nor predictions scores 0.
    # E: 1, C: 0, N: 0 -> 33.33 although every prediction is right.
    out = metrics.cb_metrics([E, E], [E, E], CB_LABELS)
    assert out["macro_f1"] == approx(100 / 3)
    assert out["accuracy"] == 100.0


def test_cb_rejects_targets_outside_labels():
    with pytest.raises(ValueError, match="not among the labels"):
        metrics.cb_metrics([E, "maybe"], [E, E], CB_LABELS)


# ---------------------------------------------------------------- MultiRC


MRC_TARGETS = ["True", "False", "True", "False", "True", "False"]
MRC_PREDS = ["True", "False", "False", "False", "True", "True"]
MRC_GROUPS = ["q1", "q1", "q1", "q2", "q2", "q3"]


def test_multirc_one_wrong_answer_fails_the_whole_question():
    # q1: rows 0-2, row 2 wrong -> 0; q2: rows 3-4 all right -> 100; q3: row 5 wrong -> 0
    # em = (0 + 100 + 0) / 3 = 33.33 (per answer, 4 of 6 are right: not what EM counts)
    # f1a over all 6 answers: TP 2 (rows 0, 4), FN 1 (row 2), FP 1 (row 5)
    #   -> 4 / (4 + 1 + 1) = 66.67; score = (66.67 + 33.33) / 2 = 50
    out = metrics.multirc_metrics(MRC_TARGETS, MRC_PREDS, MRC_GROUPS)
    assert out["em"] == approx(100 / 3)
    assert out["f1a"] == approx(200 / 3)
    assert out["score"] == approx(50.0)


def test_multirc_groups_need_not_be_contiguous_and_may_be_dicts():
    order = [5, 0, 3, 2, 4, 1]
    groups = [{"paragraph": 0, "question": int(g[1])} for g in MRC_GROUPS]
    out = metrics.multirc_metrics([MRC_TARGETS[i] for i in order],
                                  [MRC_PREDS[i] for i in order],
                                  [groups[i] for i in order])
    assert out["em"] == approx(100 / 3)
    assert out["f1a"] == approx(200 / 3)


def test_multirc_invalid_prediction_fails_question_and_counts_in_f1():
    # q1: "yes" on a False target -> question wrong, and a false positive (T5's flip)
    # TP 1 (row 0), FP 1 (row 1) -> f1a = 2/3; em: q1 0, q2 100 -> 50
    out = metrics.multirc_metrics(["True", "False", "False"], ["True", "yes", "False"],
                                  ["q1", "q1", "q2"])
    assert out["f1a"] == approx(200 / 3)
    assert out["em"] == approx(50.0)


# ---------------------------------------------------------------- SQuAD


@pytest.mark.parametrize("raw, normalized", [
    ("  The Quick, Brown-Fox!  ", "quick brownfox"),  # case, punctuation, article, ends
    ("An apple a day", "apple day"),                    # all three articles go
    ("theatre anthem", "theatre anthem"),               # whole words only
    ("A.B.C.", "abc"),                                  # punctuation deleted, not spaced
    ("new\t\n  york", "new york"),                      # whitespace runs collapse
    ("THE", ""),
])
def test_normalize_answer(raw, normalized):
    assert metrics.normalize_answer(raw) == normalized


def test_squad_token_f1_partial_overlap():
    # "the Denver team" -> "denver team"; gold "denver broncos": 1 common token,
    # P = 1/2, R = 1/2 -> F1 = 0.5; EM 0
    assert metrics.squad_metrics([["Denver Broncos"]], ["the Denver team"]) == {
        "em": 0.0, "f1": approx(50.0)}
    # gold "the cat sat on the mat" -> 4 tokens; "cat sat": P = 1, R = 1/2 -> F1 = 2/3
    assert metrics.squad_metrics([["the cat sat on the mat"]], ["cat sat"])["f1"] == \
        approx(200 / 3)
    # repeated tokens count with multiplicity: "cat cat cat" vs "cat cat dog": 2 common,
    # P = 2/3, R = 2/3 -> F1 = 2/3
    assert metrics.squad_metrics([["cat cat dog"]], ["the cat cat cat"])["f1"] == \
        approx(200 / 3)


def test_squad_max_over_gold_answers():
    answers = [
        ["Broncos", "Denver Broncos", "the Broncos team"],
        ["Saint Bernadette Soubirous", "a copper statue"],
    ]
    preds = ["Denver Broncos!", "statue of Bernadette"]
    # ex 0: normalises to gold 1 exactly -> EM 1, F1 1
    # ex 1: "statue of bernadette" (3 tokens)
    #   vs "saint bernadette soubirous": 1 common, P = R = 1/3 -> F1 = 1/3
    #   vs "copper statue":              1 common, P = 1/3, R = 1/2 -> F1 = 0.4  (max)
    #   EM 0
    # em = (1 + 0) / 2 = 50; f1 = (1 + 0.4) / 2 = 70
    out = metrics.squad_metrics(answers, preds)
    assert out == {"em": approx(50.0), "f1": approx(70.0)}


def test_squad_bare_string_is_one_answer():
    assert metrics.squad_metrics(["Denver Broncos"], ["denver broncos."]) == {
        "em": 100.0, "f1": 100.0}


def test_squad_empty_after_normalisation_is_em_but_not_f1():
    # T5 / SQuAD v1.1: "the" and "a" both normalise to "" -> equal (EM 1), but token F1
    # has no common token -> 0
    assert metrics.squad_metrics([["the"]], ["a"]) == {"em": 100.0, "f1": 0.0}


def test_squad_example_without_gold_answers_rejected():
    with pytest.raises(ValueError, match="no gold answers"):
        metrics.squad_metrics([["x"], []], ["x", "y"])


# ---------------------------------------------------------------- ReCoRD


REC_ANSWERS = [["Obama", "Barack Obama"], ["Obama", "Barack Obama"], ["Paris"],
               ["New York City"], ["New York City"], ["New York City"]]
REC_PREDS = ["obama", "Trump", "London", "New York", "New York", "New York"]
REC_GROUPS = [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (1, 0)]


def test_record_dedup_keeps_first_example_per_query():
    # kept: rows 0, 2, 3 (row 1's "Trump" is a later copy of query (0, 0) and ignored)
    #   row 0 "obama" vs "obama": EM 1, F1 1
    #   row 2 "london" vs "paris": EM 0, F1 0
    #   row 3 "new york" vs "new york city": P = 1, R = 2/3 -> F1 = 0.8, EM 0
    # em = 1/3 = 33.33; f1 = 1.8/3 = 60; score = (33.33 + 60) / 2 = 46.67
    out = metrics.record_metrics(REC_ANSWERS, REC_PREDS, REC_GROUPS)
    assert out["em"] == approx(100 / 3)
    assert out["f1"] == approx(60.0)
    assert out["score"] == approx((100 / 3 + 60) / 2)


def test_record_without_groups_counts_every_copy():
    # all 6: EM 1, 0, 0, 0, 0, 0 -> 16.67; F1 1, 0, 0, .8, .8, .8 -> 3.4/6 = 56.67
    out = metrics.record_metrics(REC_ANSWERS, REC_PREDS)
    assert out["em"] == approx(100 / 6)
    assert out["f1"] == approx(340 / 6)


def test_record_groups_as_tfds_idx_dicts():
    groups = [{"passage": p, "query": q} for p, q in REC_GROUPS]
    assert metrics.record_metrics(REC_ANSWERS, REC_PREDS, groups)["f1"] == approx(60.0)


# ---------------------------------------------------------------- benchmark averages


SG = {
    "boolq": {"accuracy": 80.0},
    "cb": {"accuracy": 90.0, "macro_f1": 70.0, "score": 80.0},
    "copa": {"accuracy": 70.0},
    "multirc": {"f1a": 75.0, "em": 35.0},
    "record": {"em": 80.0, "f1": 82.0},
    "rte": {"accuracy": 85.0},
    "wic": {"accuracy": 65.0},
    "wsc": 75.0,
}


def test_superglue_score_is_mean_of_task_means():
    # task scores: 80, cb (90+70)/2 = 80, 70, multirc (75+35)/2 = 55, record (80+82)/2
    # = 81, 85, 65, 75 -> 591 / 8 = 73.875 (a flat mean of the 11 metrics: 807/11)
    assert benchmarks.superglue_score(SG) == approx(73.875)
    assert benchmarks.superglue_score(SG) != approx(807 / 11)


def test_superglue_score_from_metric_outputs_and_diagnostics_ignored():
    scores = dict(SG)
    scores["cb"] = metrics.cb_metrics([E, E, C, C, N], [E, C, C, C, E], CB_LABELS)
    scores["axb"] = {"matthews_corrcoef": 10.0}
    # cb = (60 + 43.33) / 2 = 51.67 replaces 80
    assert benchmarks.superglue_score(scores) == approx((591 - 80 + (60 + 130 / 3) / 2) / 8)


def test_superglue_score_wsc_by_exact_match_and_score_fallback():
    scores = dict(SG, wsc={"exact_match": 75.0}, multirc={"score": 55.0})
    assert benchmarks.superglue_score(scores) == approx(73.875)


def test_superglue_score_rejects_missing_unknown_and_half_metrics():
    with pytest.raises(ValueError, match="missing wsc"):
        benchmarks.superglue_score({k: v for k, v in SG.items() if k != "wsc"})
    with pytest.raises(ValueError, match="unknown boolq2"):
        benchmarks.superglue_score(dict(SG, boolq2=1.0))
    with pytest.raises(ValueError, match="accuracy, macro_f1"):
        benchmarks.superglue_score(dict(SG, cb={"accuracy": 90.0}))
    with pytest.raises(ValueError, match="no task scores"):
        benchmarks.superglue_score({})


def test_glue_score_t5_average():
    # cola 50, sst2 90, mrpc (88+84)/2 = 86, stsb (88+86)/2 = 87, qqp (70+90)/2 = 80,
    # mnli (84+86)/2 = 85, qnli 91, rte 70 -> 639 / 8 = 79.875 (no WNLI, as T5)
    scores = {
        "cola": {"matthews_corrcoef": 50.0}, "sst2": 90.0,
        "mrpc": {"f1": 88.0, "accuracy": 84.0},
        "stsb": {"pearson_corrcoef": 88.0, "spearman_corrcoef": 86.0},
        "qqp": {"f1": 70.0, "accuracy": 90.0},
        "mnli_matched": {"accuracy": 84.0}, "mnli_mismatched": {"accuracy": 86.0},
        "qnli": {"accuracy": 91.0}, "rte": {"accuracy": 70.0},
    }
    assert benchmarks.glue_score(scores) == approx(79.875)


# ---------------------------------------------------------------- errors, registry


@pytest.mark.parametrize("call", [
    lambda: metrics.accuracy([], []),
    lambda: metrics.f1_and_accuracy([], [], positive=EQ),
    lambda: metrics.cb_metrics([], [], CB_LABELS),
    lambda: metrics.multirc_metrics([], [], []),
    lambda: metrics.squad_metrics([], []),
    lambda: metrics.record_metrics([], []),
    lambda: metrics.record_metrics([], [], []),
])
def test_empty_inputs_raise_clear_value_error(call):
    with pytest.raises(ValueError, match="no examples"):
        call()


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.multirc_metrics(["True"], ["True"], ["q1", "q2"])


def test_metric_error_is_a_ptjax_error():
    with pytest.raises(PtjaxError):
        metrics.accuracy([], [])


def test_metrics_registry_and_compute():
    assert set(metrics.METRICS) == {"accuracy", "f1_accuracy", "cb", "multirc", "squad",
                                    "record", "wsc"}
    assert set(metrics.METRICS) == set(metrics.METRIC_KEYS)
    ex = [{"targets": t} for t in [EQ, EQ, EQ, NEQ, NEQ, NEQ]]
    out = metrics.compute("f1_accuracy", ex, [EQ, EQ, NEQ, EQ, NEQ, "maybe"], (NEQ, EQ))
    assert out == {"f1": approx(400 / 7), "accuracy": approx(50.0),
                   "score": approx((400 / 7 + 50) / 2)}
    mrc = [{"targets": t, "group": g} for t, g in zip(MRC_TARGETS, MRC_GROUPS)]
    assert metrics.compute("multirc", mrc, MRC_PREDS, ("False", "True"))["score"] == \
        approx(50.0)
    rec = [{"targets": a[0], "answers": a, "group": g}
           for a, g in zip(REC_ANSWERS, REC_GROUPS)]
    assert metrics.compute("record", rec, REC_PREDS)["f1"] == approx(60.0)
    sq = [{"targets": "Denver Broncos"}]  # no "answers": the target is the one answer
    assert metrics.compute("squad", sq, ["the Denver team"]) == {
        "em": 0.0, "f1": approx(50.0), "score": approx(25.0)}
    cb = [{"targets": t} for t in [E, E, C, C, N]]
    assert metrics.compute("cb", cb, [E, C, C, C, E], CB_LABELS)["macro_f1"] == \
        approx(130 / 3)
    for name, keys in metrics.METRIC_KEYS.items():
        assert name in metrics.METRICS and keys
    with pytest.raises(ValueError, match="unknown metric set"):
        metrics.compute("bleu", ex, [EQ] * 6)
    with pytest.raises(ValueError, match="no examples"):
        metrics.compute("accuracy", [], [])


def test_wsc_simple_referent_match_scored_against_the_label():
    """T5's wsc_simple: determiners dropped, lower-cased, word sets nested = "refers to
    span1"; that bool is compared with the label."""
    ex = [{"targets": "Mark", "label": 1},          # "the mark" -> {mark} == {mark}: 1, right
          {"targets": "the dog", "label": 1},       # "a big dog" -> {big, dog} >= {dog}: 1
          {"targets": "Pete", "label": 0},          # "Pete" matches but label 0: wrong
          {"targets": "the cat's owner", "label": 1},  # no apostrophe in prediction: 0
          {"targets": "the trophy", "label": 0}]    # "suitcase" vs {trophy}: 0, right
    preds = ["the Mark", "a big dog", "Pete", "cat owner", "suitcase"]
    assert metrics.compute("wsc", ex, preds) == {"accuracy": approx(60.0)}
