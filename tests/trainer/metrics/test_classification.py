"""classification_metrics against scikit-learn, which is a test-only reference here."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from kubetrain_trainer.evaluate import classification_metrics, labelled_scores

LABEL_POOL = ["positive", "negative", "neutral", "mixed", "other"]


def sklearn_scores(y_true, y_pred, labels, average, pos_label=None):
    kwargs = {"pos_label": pos_label} if average == "binary" else {}
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=average, zero_division=0, **kwargs
    )
    return {"accuracy": accuracy_score(y_true, y_pred), "precision": p, "recall": r, "f1": f}


def assert_scores_equal(ours, reference):
    assert set(ours) == {"accuracy", "precision", "recall", "f1"}
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


@st.composite
def multiclass_cases(draw):
    labels = draw(st.lists(st.sampled_from(LABEL_POOL), min_size=2, max_size=5, unique=True))
    # Values outside `labels` too: an unlisted true class, and predictions nobody asked for.
    pool = [*labels, "unlisted"] if draw(st.booleans()) else labels
    values = st.sampled_from(pool)
    n = draw(st.integers(1, 40))
    y_true = draw(st.lists(values, min_size=n, max_size=n))
    y_pred = draw(st.lists(values, min_size=n, max_size=n))
    return y_true, y_pred, labels


@settings(max_examples=200, deadline=None)
@given(case=multiclass_cases(), average=st.sampled_from(["macro", "micro", "weighted"]))
def test_multiclass_averages_equal_sklearn(case, average):
    y_true, y_pred, labels = case
    ours = classification_metrics(y_true, y_pred, labels, average)
    assert_scores_equal(ours, sklearn_scores(y_true, y_pred, labels, average))


@st.composite
def binary_cases(draw):
    labels = draw(st.lists(st.sampled_from(LABEL_POOL), min_size=2, max_size=2, unique=True))
    n = draw(st.integers(1, 40))
    y_true = draw(st.lists(st.sampled_from(labels), min_size=n, max_size=n))
    y_pred = draw(st.lists(st.sampled_from(labels), min_size=n, max_size=n))
    return y_true, y_pred, labels


@settings(max_examples=200, deadline=None)
@given(case=binary_cases(), explicit=st.booleans())
def test_binary_equals_sklearn(case, explicit):
    y_true, y_pred, labels = case
    pos = labels[1] if explicit else None
    ours = classification_metrics(y_true, y_pred, labels, "binary", pos_label=pos)
    reference = sklearn_scores(y_true, y_pred, labels, "binary", pos_label=pos or labels[0])
    assert_scores_equal(ours, reference)


def test_label_never_predicted_scores_zero_and_drags_macro_down():
    y_true = ["a", "a", "b", "c"]
    y_pred = ["a", "a", "b", "b"]  # c is never predicted: precision 0/0 -> 0
    macro = classification_metrics(y_true, y_pred, ["a", "b", "c"], "macro")
    assert macro["accuracy"] == 0.75
    assert macro["precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert macro["recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert macro["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert_scores_equal(macro, sklearn_scores(y_true, y_pred, ["a", "b", "c"], "macro"))


def test_weighted_without_any_listed_true_class_is_zero():
    y_true, y_pred, labels = ["z", "z"], ["a", "z"], ["a", "b"]
    ours = classification_metrics(y_true, y_pred, labels, "weighted")
    assert ours == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert_scores_equal(ours, sklearn_scores(y_true, y_pred, labels, "weighted"))


def test_binary_uses_first_label_as_positive_by_default():
    y_true = ["yes", "yes", "no", "no"]
    y_pred = ["yes", "no", "no", "no"]
    first = classification_metrics(y_true, y_pred, ["yes", "no"], "binary")
    assert (first["precision"], first["recall"]) == (1.0, 0.5)
    other = classification_metrics(y_true, y_pred, ["yes", "no"], "binary", pos_label="no")
    assert (other["precision"], other["recall"]) == (2 / 3, 1.0)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "average", "pos_label", "message"),
    [
        (["a"], ["a", "b"], ["a", "b"], "macro", None, "predictions"),
        ([], [], ["a"], "macro", None, "no examples"),
        (["a"], ["a"], ["a", "a"], "macro", None, "distinct"),
        (["a"], ["a"], ["a", "b"], "binary", "z", "pos_label"),
    ],
)
def test_bad_input_is_rejected(y_true, y_pred, labels, average, pos_label, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred, labels, average, pos_label=pos_label)


# ---- the label set of a dataset: hallucinated answers are misses, not classes ---------


def test_hallucinated_answers_are_misses_of_the_true_class():
    y_true = ["paris", "rome", "paris", "oslo"]
    y_pred = ["paris", "Rome.", "london", "oslo"]  # two answers no label has
    for average in ("macro", "micro", "weighted"):
        assert_scores_equal(
            labelled_scores(y_true, y_pred, None, average),
            sklearn_scores(y_true, y_pred, ["oslo", "paris", "rome"], average),
        )
    macro = labelled_scores(y_true, y_pred, None, "macro")
    # paris 1/1, oslo 1/1, rome 0 predicted: precision (1 + 1 + 0) / 3, with no "london" or
    # "Rome." class of precision 0 dragging it to 2/5.
    assert macro["precision"] == pytest.approx(2 / 3)
    assert macro["recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert macro["accuracy"] == 0.5


def test_every_answer_hallucinated_scores_zero():
    scores = labelled_scores(["a", "b"], ["x", "y"], None, "macro")
    assert scores == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert_scores_equal(
        labelled_scores(["a", "b"], ["x", "y"], None, "micro"),
        sklearn_scores(["a", "b"], ["x", "y"], ["a", "b"], "micro"),
    )


def test_a_dataset_label_list_is_the_label_set():
    # "c" is a listed class nobody's truth: it counts (0 recall, 0 precision) in macro.
    y_true, y_pred = ["a", "b", "a"], ["a", "c", "zzz"]
    assert_scores_equal(
        labelled_scores(y_true, y_pred, ["a", "b", "c"], "macro"),
        sklearn_scores(y_true, y_pred, ["a", "b", "c"], "macro"),
    )


@st.composite
def answer_cases(draw):
    truths = st.sampled_from(LABEL_POOL[:3])
    answers = st.sampled_from([*LABEL_POOL[:3], "hallucinated", "Positive", ""])
    n = draw(st.integers(1, 30))
    return draw(st.lists(truths, min_size=n, max_size=n)), draw(
        st.lists(answers, min_size=n, max_size=n)
    )


@settings(max_examples=150, deadline=None)
@given(case=answer_cases(), average=st.sampled_from(["macro", "micro", "weighted"]))
def test_generated_answers_equal_sklearn_over_the_true_label_set(case, average):
    y_true, y_pred = case
    assert_scores_equal(
        labelled_scores(y_true, y_pred, None, average),
        sklearn_scores(y_true, y_pred, sorted(set(y_true)), average),
    )
