"""Metric functions against examples worked by hand."""

from __future__ import annotations

import pytest

from lomotune.evaluate.metrics import (
    argmax,
    choice_scores,
    macro_f1,
    max_over_golds,
    mean_stderr,
    multirc_scores,
    squad_exact,
    squad_f1,
)


def test_argmax_takes_the_first_of_ties():
    assert argmax([-1.0, -0.5, -0.5]) == 1


def test_acc_norm_divides_by_characters():
    # raw: choice 0 (-2 > -3); per character: -2/2 = -1 < -3/6 = -0.5 -> choice 1
    scores = choice_scores([[-2.0, -3.0]], [["ab", "abcdef"]], [1], [7])
    assert scores.metrics == {"acc": 0.0, "acc_norm": 1.0}
    assert scores.predictions == [
        {"idx": 7, "prediction": 0, "gold": 1, "loglikelihoods": [-2.0, -3.0]}
    ]


def test_mean_stderr_uses_the_sample_deviation():
    # values 1, 0, 1, 0: mean 0.5, sample variance 4 * 0.25 / 3 = 1/3, / n=4 -> 1/12
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx((1 / 12) ** 0.5)
    assert mean_stderr([1.0]) is None


def test_cb_macro_f1():
    golds = [0, 0, 1, 2, 2]
    preds = [0, 1, 1, 2, 0]
    # class 0: tp 1, fp 1 (last), fn 1 (second) -> 2/4 = 0.5
    # class 1: tp 1, fp 1 (second), fn 0 -> 2/3
    # class 2: tp 1, fp 0, fn 1 (last) -> 2/3
    assert macro_f1(preds, golds, 3) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    # A class never predicted nor present scores 0, as sklearn's f1_score does.
    assert macro_f1([0, 0], [0, 0], 3) == pytest.approx(1 / 3)


def test_multirc_f1a_over_answers_and_em_per_question():
    questions = ["p0-q0", "p0-q0", "p0-q0", "p0-q1", "p0-q1"]
    labels = [1, 0, 1, 1, 0]
    preds = [1, 0, 0, 1, 1]
    # positives: tp 2 (answers 0, 3), fp 1 (answer 4), fn 1 (answer 2) -> 4 / 6
    # q0 has answer 2 wrong, q1 answer 4 wrong -> EM 0
    f1a, em = multirc_scores(questions, preds, labels)
    assert f1a == pytest.approx(2 / 3)
    assert em == 0.0
    f1a, em = multirc_scores(questions, [1, 0, 1, 1, 1], labels)
    assert f1a == pytest.approx(6 / 7)  # tp 3, fp 1, fn 0
    assert em == 0.5


def test_record_f1_and_em_take_the_best_gold():
    # Normalisation drops case, punctuation and articles.
    assert squad_exact("The Eiffel Tower!", "eiffel tower") == 1.0
    # prediction "Paris France" vs gold "Paris": precision 1/2, recall 1 -> 2/3
    assert squad_f1("Paris", "Paris France") == pytest.approx(2 / 3)
    assert max_over_golds(squad_f1, "Paris France", ["London", "Paris"]) == pytest.approx(2 / 3)
    assert max_over_golds(squad_exact, "paris", ["London", "Paris."]) == 1.0
    assert squad_f1("the", "a") == 1.0  # both normalise to nothing
    assert squad_f1("London", "Paris") == 0.0
